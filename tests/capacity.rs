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
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    // Mimecast's jobs come first: three times the prefetch's share that a held
    // vendor may keep, so they fill every slot and the whole prefetch unless
    // held jobs give both up.
    let mimecast = 18;
    for i in 0..mimecast {
        app.queues
            .publish(&json!({"jobId": format!("cm-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("CM{i}"), "numberOfUsers": 1}]}))
            .await;
    }
    app.wait_held(VendorKind::Mimecast).await;
    let circuit = app.worker.circuits().get(VendorKind::Mimecast);
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
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    // More jobs of one account than the prefetch holds: while the vendor is
    // held, some go back to the tail of the queue and others are still in it.
    let jobs = 17;
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("ord-{i}"), "vendor": "mimecast", "data": [{"accountCode": "ORDER1", "products": [i]}]}))
            .await;
    }
    app.wait_held(VendorKind::Mimecast).await;
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

// ---------------------------------------------------------------------------
// Sequences found by an adversarial review of this change. The ignored ones are
// known limits, named in the README (Per-account order, Vendor outages).
// ---------------------------------------------------------------------------

/// Promise 2 (prefetch): jobs waiting for their account's turn behind a held
/// job are not counted in the held vendor's room and keep their place in the
/// prefetch until their own `HELD_DELIVERY_MAX` (10 min by default), so one
/// held account's Mimecast jobs fill the prefetch and the PNCP jobs behind them
/// are never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pncp_jobs_are_delivered_while_one_held_accounts_jobs_wait_for_their_turn() {
    let mut app = TestApp::spawn_with("capacity_review_turn", two_slots).await;
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    // One account's jobs: more than the prefetch (3 x 2).
    for i in 0..12 {
        app.queues
            .publish(&json!({"jobId": format!("rt-m{i}"), "vendor": "mimecast", "data": [{"accountCode": "RTHELD", "products": [i]}]}))
            .await;
    }
    app.wait_held(VendorKind::Mimecast).await;
    let pncp = 4;
    for i in 0..pncp {
        app.queues
            .publish(&json!({"jobId": format!("rt-p{i}"), "vendor": "pncp", "data": [{"accountId": format!("{}", 700 + i), "name": "Flowing", "email": "ops@example.com"}]}))
            .await;
    }
    let flowing =
        tokio::time::timeout(Duration::from_secs(30), app.queues.results_by_job(pncp)).await;
    let in_flight = app.worker.health().metrics().held_requeues();
    assert!(
        flowing.is_ok(),
        "no PNCP result within 30 s while Mimecast is held: the prefetch is full of one account's \
         Mimecast jobs waiting for their turn (held requeues so far: {in_flight})"
    );
    app.mock.reset();
    let _ = app.queues.results_by_job(12).await;
    app.finish().await;
}

/// Promise 2 (slots) and 1: a Mimecast 429 with a long reset holds every slot
/// (jobs sleep out the pause and their retry wait inside their slot), so PNCP
/// jobs on the same queue wait for the whole pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pncp_jobs_keep_their_slots_while_mimecast_is_paused_by_a_429() {
    let mut app = TestApp::spawn_with("capacity_review_429", two_slots).await;
    for _ in 0..8 {
        app.mock
            .push_fault(Vendor::Mimecast, Fault::RateLimited { reset_ms: 60_000 });
    }
    for i in 0..4 {
        app.queues
            .publish(&json!({"jobId": format!("rl-m{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("RL{i}"), "products": [i]}]}))
            .await;
    }
    // Let Mimecast's first calls meet the 429.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pncp = 4;
    for i in 0..pncp {
        app.queues
            .publish(&json!({"jobId": format!("rl-p{i}"), "vendor": "pncp", "data": [{"accountId": format!("{}", 720 + i), "name": "Flowing", "email": "ops@example.com"}]}))
            .await;
    }
    let started = tokio::time::Instant::now();
    let flowing =
        tokio::time::timeout(Duration::from_secs(20), app.queues.results_by_job(pncp)).await;
    assert!(
        flowing.is_ok(),
        "no PNCP result within 20 s: Mimecast's 60-s 429 pause holds every concurrency slot"
    );
    eprintln!("PNCP answered after {:?}", started.elapsed());
    app.finish().await;
}

/// Promise 1: a delivery whose job sleeps out a vendor's 429 reset is held
/// unacked for the whole reset (capped at 15 min per 429, and a throttled
/// round spends no attempt, so without end), never put back at
/// `HELD_DELIVERY_MAX`: the broker's consumer timeout can close the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_waiting_out_a_429_goes_back_after_held_delivery_max() {
    let mut app = TestApp::spawn_with("capacity_review_429_hold", |env| {
        two_slots(env);
        env.insert("HELD_DELIVERY_MAX".into(), "2s".into());
    })
    .await;
    app.mock
        .push_fault(Vendor::Mimecast, Fault::RateLimited { reset_ms: 8_000 });
    let started = tokio::time::Instant::now();
    app.queues
        .publish(&json!({"jobId": "rh-m0", "vendor": "mimecast", "data": [{"accountCode": "RH0", "products": [1]}]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    let held = started.elapsed();
    let requeued = app.worker.health().metrics().held_requeues();
    assert!(
        held < Duration::from_secs(2) || requeued > 0,
        "the delivery stayed unacked {held:?} (HELD_DELIVERY_MAX 2s) waiting out a 429, and was never put back (held requeues: {requeued})"
    );
    app.finish().await;
}

/// Promise 4 within one worker: a parked job is given up after 3 x
/// `HELD_DELIVERY_MAX` away, measured from when it went back, not from
/// whether its copy could have come back yet. A queue deeper than that many
/// seconds of work delivers the account's later job (queued before the copy)
/// first; it is then the one parked first, and the earlier job's copy goes
/// back behind it: the later job takes effect first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known limit: a parked job is given up after 3 x HELD_DELIVERY_MAX away (README, Per-account order)"]
async fn a_later_job_does_not_overtake_a_parked_job_whose_copy_is_still_queued() {
    let mut app = TestApp::spawn_with("capacity_review_stale", |env| {
        two_slots(env);
        env.insert("HELD_DELIVERY_MAX".into(), "2s".into());
    })
    .await;
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    // 50 ms a call and two slots: the PNCP backlog below takes about 12 s.
    app.mock.set_latency(Duration::from_millis(50));
    app.queues
        .publish(&json!({"jobId": "rs-a1", "vendor": "mimecast", "data": [{"accountCode": "RSTALE", "accountName": "first", "products": [1]}]}))
        .await;
    app.wait_held(VendorKind::Mimecast).await;
    let backlog = 480;
    for i in 0..backlog {
        app.queues
            .publish(&json!({"jobId": format!("rs-p{i}"), "vendor": "pncp", "data": [{"accountId": format!("{}", 10_000 + i), "name": "Backlog", "email": "ops@example.com"}]}))
            .await;
    }
    // The account's later job, queued before rs-a1 goes back to the tail (at 2 s).
    app.queues
        .publish(&json!({"jobId": "rs-a2", "vendor": "mimecast", "data": [{"accountCode": "RSTALE", "accountName": "second", "products": [2]}]}))
        .await;
    let _ = app.queues.results_by_job(backlog).await;
    // Both Mimecast jobs have come round; then the outage ends.
    tokio::time::sleep(Duration::from_secs(5)).await;
    app.mock.reset();
    let results = app.queues.results_by_job(2).await;
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
        .filter(|r| r.status == 200 && r.body["data"][0]["accountCode"] == "RSTALE")
        .filter_map(|r| r.body["data"][0]["products"][0].as_i64())
        .collect();
    let requeued = app.worker.health().metrics().held_requeues();
    assert_eq!(
        sent,
        vec![1, 2],
        "RSTALE's jobs in queue order (held requeues: {requeued})"
    );
    app.finish().await;
}

/// Promise 1 (and 2): a held vendor's probe takes the circuit's pass first
/// and a concurrency slot after, with no deadline; while the other vendor's
/// slow jobs hold every slot, the probing delivery stays unacked past
/// `HELD_DELIVERY_MAX`, and no probe of the held vendor goes out at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_holding_the_probe_pass_goes_back_when_no_slot_frees() {
    let mut app = TestApp::spawn_with("capacity_review_probe_slot", |env| {
        env.insert("WORKER_CONCURRENCY".into(), "1".into());
        env.insert("HELD_DELIVERY_MAX".into(), "1s".into());
    })
    .await;
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    app.queues
        .publish(&json!({"jobId": "rp-m", "vendor": "mimecast", "data": [{"accountCode": "RPROBE", "products": [1]}]}))
        .await;
    app.wait_held(VendorKind::Mimecast).await;
    // A slow PNCP call takes the only slot for 8 s.
    app.mock
        .push_fault(Vendor::Pncp, Fault::Delay { ms: 8_000 });
    app.queues
        .publish(&json!({"jobId": "rp-p", "vendor": "pncp", "data": [{"accountId": "760", "name": "Slow", "email": "ops@example.com"}]}))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let requeued = app.worker.health().metrics().held_requeues();
    app.mock.reset();
    let _ = app.queues.results_by_job(2).await;
    assert!(
        requeued > 0,
        "5 s into the wait (HELD_DELIVERY_MAX 1s) the held Mimecast job's delivery had not gone back (held requeues: {requeued})"
    );
    app.finish().await;
}

/// Promise 4 across a restart of the one worker of a queue (a deploy during
/// an outage): the order of the account's jobs lives only in the stopped
/// process's parked map, while the queue holds the copies in the order they
/// went back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known limit: the parked order lives in the worker; a restart mid-outage keeps only the queue order (README, Per-account order)"]
async fn jobs_put_back_keep_their_account_order_across_a_restart() {
    // A shared ledger, so the restarted worker can open it while the first
    // worker's handle is still alive.
    let mut app = TestApp::spawn_with("capacity_review_restart", |env| {
        two_slots(env);
        env.insert("HELD_DELIVERY_MAX".into(), "1s".into());
        env.insert("LEDGER_URL".into(), redis_url(REDIS_DB));
    })
    .await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    let jobs = 17;
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("rr-{i}-{run}"), "vendor": "mimecast", "data": [{"accountCode": "RRORDER", "products": [i]}]}))
            .await;
    }
    app.wait_held(VendorKind::Mimecast).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The worker is redeployed while the vendor is still held.
    app.stop_worker().await;
    app.mock.reset();
    let (stop, task) = common::start_worker(&app.env).await;
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
    stop.cancel();
    let _ = tokio::time::timeout(EVENT_TIMEOUT, task).await;
    assert_eq!(
        sent,
        (0..jobs as i64).collect::<Vec<_>>(),
        "calls in queue order after the restart"
    );
    app.finish().await;
}

/// Promise 4 within one worker, no outage at all: a later job that gives up
/// waiting for its turn (HELD_DELIVERY_MAX) behind a slow earlier job parks
/// only itself; its place in line is dropped, so its copy comes back with no
/// one ahead of it, finds itself first among the parked, and runs while the
/// earlier job is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_job_put_back_does_not_overtake_the_slow_earlier_job_it_waited_for() {
    let mut app = TestApp::spawn_with("capacity_review_overtake", |env| {
        two_slots(env);
        env.insert("HELD_DELIVERY_MAX".into(), "2s".into());
    })
    .await;
    // The first job's call takes 7 s (under VENDOR_TIMEOUT, 10 s).
    app.mock
        .push_fault(Vendor::Mimecast, Fault::Delay { ms: 7_000 });
    app.queues
        .publish(&json!({"jobId": "ro-1", "vendor": "mimecast", "data": [{"accountCode": "ROVER", "accountName": "first", "products": [1]}]}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.queues
        .publish(&json!({"jobId": "ro-2", "vendor": "mimecast", "data": [{"accountCode": "ROVER", "accountName": "second", "products": [2]}]}))
        .await;
    let results = app.queues.results_by_job(2).await;
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    let requeued = app.worker.health().metrics().held_requeues();
    assert_eq!(
        app.mock
            .mimecast_account("ROVER")
            .and_then(|a| a.account_name),
        Some("second".to_owned()),
        "ro-2 was applied before ro-1 (held requeues: {requeued})"
    );
    app.finish().await;
}

/// Runs `rabbitmqctl` against the test broker's node (`TEST_RABBIT_NODE`, or
/// the local default node).
fn rabbitmqctl(args: &[&str]) {
    let mut command = std::process::Command::new("rabbitmqctl");
    if let Ok(node) = std::env::var("TEST_RABBIT_NODE") {
        command.args(["-n", &node]);
    }
    let output = command.args(args).output().expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Promise 5 (no job is lost): putting a job back publishes a new message.
/// On a jobs queue with a length limit (`max-length`, whose default overflow
/// is `drop-head`) that is full of waiting jobs, every copy put back pushes
/// the oldest ready job out of the queue: it is dropped (or dead-lettered by
/// the broker). Holding or nack-requeueing the delivery adds no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known limit: a max-length jobs queue with drop-head drops jobs when held ones go back (README, Vendor outages)"]
async fn putting_held_jobs_back_loses_no_job_on_a_length_limited_queue() {
    let mut app = TestApp::spawn_with("capacity_review_maxlen", |env| {
        env.insert("WORKER_CONCURRENCY".into(), "1".into());
        env.insert("HELD_DELIVERY_MAX".into(), "1s".into());
    })
    .await;
    // The operator's limit, by policy, on this test's jobs queue only.
    let policy = format!("review-maxlen-{}", uuid::Uuid::new_v4().simple());
    let pattern = format!("^{}$", app.queues.names.jobs.replace('.', "\\."));
    rabbitmqctl(&[
        "set_policy",
        &policy,
        &pattern,
        r#"{"max-length":4}"#,
        "--apply-to",
        "queues",
    ]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    // Three delivered (the prefetch), then four ready: the queue is at its limit.
    for i in 0..3 {
        app.queues
            .publish(&json!({"jobId": format!("rm-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("RM{i}"), "products": [i]}]}))
            .await;
    }
    app.wait_held(VendorKind::Mimecast).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 3..7 {
        app.queues
            .publish(&json!({"jobId": format!("rm-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("RM{i}"), "products": [i]}]}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    app.mock.reset();
    let mut answered = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answered.len() < 7 {
        match tokio::time::timeout_at(deadline, app.queues.next_result()).await {
            Ok(result) => {
                answered.insert(result.job_id.clone(), result.status);
            }
            Err(_) => break,
        }
    }
    rabbitmqctl(&["clear_policy", &policy]);
    let requeued = app.worker.health().metrics().held_requeues();
    let mut missing: Vec<String> = (0..7)
        .map(|i| format!("rm-{i}"))
        .filter(|id| !answered.contains_key(id))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "jobs lost: {missing:?} never answered (held requeues: {requeued}, jobs queue depth now {})",
        app.queues.depth(&app.queues.names.jobs).await
    );
    app.finish().await;
}

/// Promise 6 / 4 in a fleet on one queue: a worker keeps an account parked
/// behind a job whose copy another worker took and settled; nothing unparks
/// it there but the 3 x `HELD_DELIVERY_MAX` give-up, so after the outage, with
/// the vendor answering and nothing of the account outstanding anywhere, the
/// account's new jobs are still sent back to the queue (and each one sent
/// back parks the account again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_one_queue_sends_back_no_job_once_nothing_is_ahead_of_it() {
    let mut app = TestApp::spawn_with("capacity_review_fleet", |env| {
        two_slots(env);
        env.insert("HELD_DELIVERY_MAX".into(), "2s".into());
        env.insert("LEDGER_URL".into(), redis_url(REDIS_DB));
    })
    .await;
    let (stop_b, task_b, worker_b) = common::start_worker_with_handle(&app.env).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    app.refuse_calls(Vendor::Mimecast, 401, OUTAGE_ANSWERS);
    for i in 0..6 {
        app.queues
            .publish(&json!({"jobId": format!("rf-{i}-{run}"), "vendor": "mimecast", "data": [{"accountCode": "RFLEET", "products": [i]}]}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    app.mock.reset();
    let _ = app.queues.results_by_job(6).await;
    let requeues = |app: &TestApp| {
        app.worker.health().metrics().held_requeues() + worker_b.health().metrics().held_requeues()
    };
    let before = requeues(&app);
    // The vendor answers and every job of the account is settled: one job at
    // a time, nothing is ahead of any of them.
    let started = tokio::time::Instant::now();
    for i in 0..6 {
        app.queues
            .publish(&json!({"jobId": format!("rf-new-{i}-{run}"), "vendor": "mimecast", "data": [{"accountCode": "RFLEET", "products": [100 + i]}]}))
            .await;
        let result = app.queues.next_result().await;
        assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    }
    let sent_back = requeues(&app) - before;
    let took = started.elapsed();
    stop_b.cancel();
    let _ = tokio::time::timeout(EVENT_TIMEOUT, task_b).await;
    assert_eq!(
        sent_back, 0,
        "jobs with nothing ahead of them were sent back {sent_back} times after the outage (6 jobs took {took:?})"
    );
    app.finish().await;
}
