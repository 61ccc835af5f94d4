//! Capacity is never lent to jobs that wait: a held vendor's jobs leave the
//! other vendor's jobs their slots and their place in the prefetch, and copies
//! of a job running elsewhere wait without a slot.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use account_worker::config::{LedgerLocation, LedgerSettings};
use account_worker::job::{JobId, JobStatus, VendorKind};
use account_worker::ledger::Ledger;
use account_worker::mock_vendor::{Fault, Vendor};
use common::{redis_url, TestApp, EVENT_TIMEOUT};
use serde_json::json;

/// This binary's Redis database (see `common::redis_url`).
const REDIS_DB: u8 = 7;

/// More failing answers than a test waits for: the outage lasts until the
/// test ends it with `MockVendor::reset`.
const OUTAGE_ANSWERS: usize = 40;

fn two_slots(env: &mut HashMap<String, String>) {
    env.insert("WORKER_CONCURRENCY".into(), "2".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pncp_jobs_finish_while_mimecast_is_held_on_the_same_queue() {
    let mut app = TestApp::spawn_with("capacity_outage", two_slots).await;
    for _ in 0..OUTAGE_ANSWERS {
        app.mock
            .push_fault(Vendor::Mimecast, Fault::Status { status: 401 });
    }
    // Mimecast's jobs come first: three times the prefetch's share that a held
    // vendor may keep, so they fill every slot and the whole prefetch unless
    // held jobs give both up.
    let mimecast = 18;
    for i in 0..mimecast {
        app.queues
            .publish(&json!({"jobId": format!("cm-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("CM{i}"), "numberOfUsers": 1}]}))
            .await;
    }
    let circuit = app.worker.circuits().get(VendorKind::Mimecast);
    tokio::time::timeout(EVENT_TIMEOUT, circuit.wait_open())
        .await
        .expect("Mimecast's 401 holds its jobs");
    let pncp = 12;
    for i in 0..pncp {
        app.queues
            .publish(&json!({"jobId": format!("cp-{i}"), "vendor": "pncp", "data": [{"accountId": format!("{}", 800 + i), "name": "Flowing", "email": "ops@example.com"}]}))
            .await;
    }

    // Every result until PNCP's last is PNCP's: Mimecast is still held.
    let mut answered = HashMap::new();
    while answered.len() < pncp {
        let result = app.queues.next_result().await;
        assert!(
            result.job_id.starts_with("cp-"),
            "{} answered while Mimecast was held",
            result.job_id
        );
        assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
        answered.insert(result.job_id.clone(), result);
    }
    assert!(!circuit.is_closed(), "the outage outlasted the PNCP jobs");
    for i in 0..pncp {
        let id = format!("{}", 800 + i);
        assert_eq!(
            app.mock.pncp_account(&id).expect("applied")["name"],
            "Flowing"
        );
    }

    // The outage ends: every held Mimecast job completes, applied once.
    app.mock.reset();
    let results = app.queues.results_by_job(mimecast).await;
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    for i in 0..mimecast {
        let account = format!("CM{i}");
        assert_eq!(app.mock.applied_count(Vendor::Mimecast, &account), 1);
    }
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_jobs_running_elsewhere_wait_without_a_slot() {
    let mut app = TestApp::spawn_with("capacity_copies", |env| {
        two_slots(env);
        env.insert("LEDGER_URL".into(), redis_url(REDIS_DB));
    })
    .await;
    // Another worker of the fleet holds two jobs: it is mid-call on each.
    let ledger = Ledger::open(&LedgerSettings {
        location: LedgerLocation::Redis(redis_url(REDIS_DB)),
        retention: Duration::from_secs(3600),
        lease: Duration::from_secs(30),
    })
    .await
    .expect("the tests' Redis is running (scripts/ensure-services --redis)");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let busy: Vec<String> = (0..2).map(|i| format!("busy-{i}-{run}")).collect();
    for id in &busy {
        let job = JobId::parse(id).expect("job id");
        ledger
            .claim(&job, "another-worker", Duration::from_secs(300), None)
            .await
            .expect("claim");
    }
    // Their copies arrive here first (one per slot), then other jobs.
    for (i, id) in busy.iter().enumerate() {
        app.queues
            .publish(&json!({"jobId": id, "vendor": "mimecast", "data": [{"accountCode": format!("CB{i}"), "numberOfUsers": 3}]}))
            .await;
    }
    let others = 10;
    for i in 0..others {
        app.queues
            .publish(&json!({"jobId": format!("co-{i}-{run}"), "vendor": "mimecast", "data": [{"accountCode": format!("CO{i}"), "products": [i]}]}))
            .await;
    }
    let mut answered = HashMap::new();
    while answered.len() < others {
        let result = app.queues.next_result().await;
        assert!(
            result.job_id.starts_with("co-"),
            "{} answered while another worker held it",
            result.job_id
        );
        assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
        answered.insert(result.job_id.clone(), result);
    }

    // The other worker stops without having sent anything: the copies run.
    for id in &busy {
        let job = JobId::parse(id).expect("job id");
        ledger
            .release(&job, "another-worker", None, None)
            .await
            .expect("release");
    }
    let results = app.queues.results_by_job(busy.len()).await;
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    for i in 0..busy.len() {
        let account = format!("CB{i}");
        assert_eq!(app.mock.applied_count(Vendor::Mimecast, &account), 1);
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_put_back_while_their_vendor_is_held_keep_their_account_order() {
    let mut app = TestApp::spawn_with("capacity_order", |env| {
        two_slots(env);
        env.insert("HELD_DELIVERY_MAX".into(), "1s".into());
    })
    .await;
    for _ in 0..OUTAGE_ANSWERS {
        app.mock
            .push_fault(Vendor::Mimecast, Fault::Status { status: 401 });
    }
    // More jobs of one account than the prefetch holds: while the vendor is
    // held, some go back to the tail of the queue and others are still in it.
    let jobs = 17;
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("ord-{i}"), "vendor": "mimecast", "data": [{"accountCode": "ORDER1", "products": [i]}]}))
            .await;
    }
    let circuit = app.worker.circuits().get(VendorKind::Mimecast);
    tokio::time::timeout(EVENT_TIMEOUT, circuit.wait_open())
        .await
        .expect("Mimecast's 401 holds its jobs");
    // Held deliveries cycle through the queue a few times.
    tokio::time::sleep(Duration::from_secs(5)).await;
    app.mock.reset();
    let results = app.queues.results_by_job(jobs).await;
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    let sent: Vec<i64> = app
        .mock
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.body["data"][0]["products"][0].as_i64())
        .collect();
    assert_eq!(
        sent,
        (0..jobs as i64).collect::<Vec<_>>(),
        "calls in queue order"
    );
    assert_eq!(
        app.mock.mimecast_account("ORDER1").map(|a| a.products),
        Some(vec![jobs as i64 - 1])
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pncp_jobs_finish_while_mimecast_calls_wait_out_a_long_429() {
    let mut app = TestApp::spawn_with("capacity_429", |env| {
        two_slots(env);
        env.insert("HELD_DELIVERY_MAX".into(), "2s".into());
    })
    .await;
    // The first Mimecast call is refused with a 20-s pause of every call.
    app.mock
        .push_fault(Vendor::Mimecast, Fault::RateLimited { reset_ms: 20_000 });
    let mimecast = 6;
    for i in 0..mimecast {
        app.queues
            .publish(&json!({"jobId": format!("cr-m{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("CRM{i}"), "numberOfUsers": 2}]}))
            .await;
    }
    tokio::time::timeout(EVENT_TIMEOUT, app.mock.wait_for_requests(1))
        .await
        .expect("the first Mimecast job meets the 429");
    let pncp = 6;
    for i in 0..pncp {
        app.queues
            .publish(&json!({"jobId": format!("cr-p{i}"), "vendor": "pncp", "data": [{"accountId": format!("{}", 850 + i), "name": "Unpaused", "email": "ops@example.com"}]}))
            .await;
    }
    let flowing = app.queues.results_by_job(pncp).await;
    assert!(
        flowing.keys().all(|job| job.starts_with("cr-p")),
        "{flowing:?}"
    );
    let mimecast_calls = |app: &TestApp| {
        app.mock
            .requests()
            .iter()
            .filter(|r| r.vendor == Vendor::Mimecast)
            .count()
    };
    assert_eq!(
        mimecast_calls(&app),
        1,
        "PNCP finished within Mimecast's pause"
    );

    let results = app.queues.results_by_job(mimecast).await;
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    for i in 0..mimecast {
        let account = format!("CRM{i}");
        assert_eq!(
            app.mock.mimecast_account(&account).map(|a| a.user_count),
            Some(2)
        );
    }
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}
