//! A fleet of workers on one queue and one Redis: every change applied once, every
//! job one outcome, and one rate ceiling and 429 pause for the whole fleet.
//! Needs RabbitMQ and Redis on localhost (`scripts/ensure-services --redis`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use account_worker::config::Settings;
use account_worker::job::{JobResult, VendorKind};
use account_worker::limiter::Limiters;
use account_worker::mock_vendor::{MockVendor, MockVendorConfig, ThrottleMode, Vendor};
use account_worker::worker::Worker;
// Each test takes its own Redis database, and rate keys are named after the
// mock vendor's random port, so parallel tests share no state.
use common::{redis_url, start_worker_with_handle, Queues, EVENT_TIMEOUT};
use redis::aio::ConnectionManager;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A mock vendor on a random port.
async fn start_mock() -> MockVendor {
    MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .expect("mock vendor starts")
}

/// A mock vendor, fresh queues and the environment of a fleet sharing `db`.
async fn fleet_setup(
    test: &str,
    db: u8,
) -> (
    MockVendor,
    Queues,
    HashMap<String, String>,
    tempfile::TempDir,
) {
    let mock = start_mock().await;
    let ledger_dir = tempfile::tempdir().expect("tempdir");
    let queue = common::unique_queue(test);
    let mut env = common::worker_env(&queue, &mock, ledger_dir.path());
    env.insert("LEDGER_URL".into(), redis_url(db));
    // Test entries need not outlive the test by a week.
    env.insert("LEDGER_RETENTION".into(), "1h".into());
    let queues = Queues::open(&queue).await;
    (mock, queues, env, ledger_dir)
}

/// The running workers of a fleet: stop token and task of each.
type Fleet = Vec<(CancellationToken, JoinHandle<()>)>;

/// Starts `n` workers with the same environment and waits until all consume.
async fn start_fleet(env: &HashMap<String, String>, n: usize) -> Fleet {
    let mut fleet = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..n {
        let (stop, task, worker) = start_worker_with_handle(env).await;
        fleet.push((stop, task));
        workers.push(worker);
    }
    let all_consuming = async {
        while !workers.iter().all(|w| w.health().is_consuming()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, all_consuming)
        .await
        .expect("every worker of the fleet starts consuming");
    fleet
}

async fn stop_fleet(fleet: Fleet) {
    for (stop, _) in &fleet {
        stop.cancel();
    }
    for (_, task) in fleet {
        let _ = tokio::time::timeout(EVENT_TIMEOUT, task).await;
    }
}

/// The most requests whose arrival falls in any 1-second window `[t, t + 1000 ms)`.
fn peak_per_second(mut at_ms: Vec<u64>) -> usize {
    at_ms.sort_unstable();
    (0..at_ms.len())
        .map(|i| {
            at_ms[i..]
                .iter()
                .take_while(|t| **t < at_ms[i] + 1000)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_apply_every_change_once_and_give_every_job_one_outcome() {
    let (mock, mut queues, env, _ledger_dir) = fleet_setup("fleet_once", 13).await;
    // Calls take a while, so copies of one job overlap on the two workers.
    mock.set_latency(Duration::from_millis(30));
    let fleet = start_fleet(&env, 2).await;

    let run = uuid::Uuid::new_v4().simple().to_string();
    let jobs: Vec<_> = (0..30)
        .map(|i| {
            json!({"jobId": format!("fleet-{run}-{i}"), "vendor": "mimecast", "data": [
                {"accountCode": format!("FLEET{i}"), "numberOfUsers": i + 1, "products": [9702]}
            ]})
        })
        .collect();
    // Even jobs are published twice in a row (both copies in flight at once, one
    // per worker); odd ones again at the end (a copy of a finished job).
    for (i, job) in jobs.iter().enumerate() {
        queues.publish(job).await;
        if i % 2 == 0 {
            queues.publish(job).await;
        }
    }
    for job in jobs.iter().skip(1).step_by(2) {
        queues.publish(job).await;
    }

    let mut outcomes: HashMap<String, Vec<JobResult>> = HashMap::new();
    for _ in 0..60 {
        let result = queues.next_result().await;
        outcomes
            .entry(result.job_id.clone())
            .or_default()
            .push(result);
    }
    assert_eq!(outcomes.len(), 30, "one outcome per jobId");
    for (job_id, copies) in &outcomes {
        assert_eq!(copies.len(), 2, "{job_id}: one result per copy published");
        assert_eq!(
            copies[0], copies[1],
            "{job_id}: a duplicate republishes the same outcome"
        );
        assert_eq!(
            copies[0].status,
            account_worker::job::JobStatus::Succeeded,
            "{job_id}"
        );
    }
    for i in 0..30 {
        let code = format!("FLEET{i}");
        assert_eq!(
            mock.applied_count(Vendor::Mimecast, &code),
            1,
            "{code} applied once"
        );
        let account = mock.mimecast_account(&code).expect("account exists");
        assert_eq!(
            account.user_count,
            i + 1,
            "{code}: numberOfUsers added once"
        );
    }
    assert_eq!(
        queues.depth(&queues.names.dead).await,
        0,
        "nothing dead-lettered"
    );

    stop_fleet(fleet).await;
    queues.delete().await;
    mock.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_in_the_fleet_scope_share_one_ceiling() {
    let (mock, mut queues, mut env, _ledger_dir) = fleet_setup("fleet_rate", 14).await;
    env.insert("RATE_LIMIT_SCOPE".into(), "fleet".into());
    env.insert("MIMECAST_RATE_LIMIT".into(), "20/s".into());
    let fleet = start_fleet(&env, 2).await;

    let run = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..100 {
        queues
            .publish(
                &json!({"jobId": format!("rate-{run}-{i}"), "vendor": "mimecast", "data": [
                    {"accountCode": format!("RATE{i}"), "numberOfUsers": 1}
                ]}),
            )
            .await;
    }
    let results = queues.results_by_job(100).await;
    assert_eq!(results.len(), 100);

    let arrivals: Vec<u64> = mock
        .requests()
        .iter()
        .filter(|r| r.vendor == Vendor::Mimecast)
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(arrivals.len(), 100, "one call per job");
    let span_ms = arrivals.iter().max().unwrap() - arrivals.iter().min().unwrap();
    let sustained = 99.0 * 1000.0 / span_ms.max(1) as f64;
    let peak = peak_per_second(arrivals);
    println!("fleet of 2 at 20/s: peak {peak} calls in a 1-s window, sustained {sustained:.2} calls/s ({:.0}% of the limit)", sustained / 20.0 * 100.0);
    // A ceiling the limiter guarantees, not a timing: two workers that each kept
    // their own 20/s would put close to 40 calls in a window. The limiter spaces its
    // grants to exactly 20/s; two calls of margin absorb the scheduling jitter
    // between a grant and the call's arrival on a loaded machine.
    assert!(peak <= 22, "peak {peak} calls in one second");

    stop_fleet(fleet).await;
    queues.delete().await;
    mock.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_learn_one_rate_for_the_fleet_from_a_vendor_that_says_only_429() {
    let (mock, mut queues, mut env, _ledger_dir) = fleet_setup("fleet_learned", 11).await;
    env.insert("RATE_LIMIT_SCOPE".into(), "fleet".into());
    env.insert("WORKER_CONCURRENCY".into(), "16".into());
    env.insert("RETRY_MAX_ATTEMPTS".into(), "30".into());
    // The quota belongs to the API user: 10 calls/s for both workers together,
    // reported (limit and reset) on 429s only.
    mock.set_throttle_mode(Vendor::Mimecast, ThrottleMode::QuotaOn429);
    mock.set_throttle(Vendor::Mimecast, Some(10));
    let fleet = start_fleet(&env, 2).await;

    let run = uuid::Uuid::new_v4().simple().to_string();
    // Long enough (about 30 s) that the share measures the learned rate, not
    // the few refusals of the first climb.
    let jobs = 300;
    for i in 0..jobs {
        queues
            .publish(
                &json!({"jobId": format!("learned-{run}-{i}"), "vendor": "mimecast", "data": [
                    {"accountCode": format!("LEARNED{i}"), "numberOfUsers": 1}
                ]}),
            )
            .await;
    }
    let results = queues.results_by_job(jobs).await;
    assert!(
        results
            .values()
            .all(|r| r.status == account_worker::job::JobStatus::Succeeded),
        "every job completes"
    );
    for i in 0..jobs {
        let code = format!("LEARNED{i}");
        assert_eq!(mock.applied_count(Vendor::Mimecast, &code), 1, "{code}");
    }
    let requests = mock.requests();
    let (calls, refused) = common::refused_after(&requests, Vendor::Mimecast, 2000);
    let (all, all_refused) = common::refused_after(&requests, Vendor::Mimecast, 0);
    println!("fleet of 2 against 10/s, quota on 429s only: {all_refused} 429s in {all} calls; after the first 2 s {refused} in {calls}");
    // Two workers that each learned their own 10/s would have half their
    // calls refused.
    assert!(
        refused * 20 <= calls,
        "{refused} of {calls} calls refused after the first 2 s"
    );

    stop_fleet(fleet).await;
    queues.delete().await;
    mock.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_scope_without_redis_refuses_to_start_and_names_both_settings() {
    let mock = start_mock().await;
    let ledger_dir = tempfile::tempdir().expect("tempdir");
    let mut env = common::worker_env(
        &common::unique_queue("fleet_no_redis"),
        &mock,
        ledger_dir.path(),
    );
    env.insert("RATE_LIMIT_SCOPE".into(), "fleet".into());
    let error = Worker::new(common::settings_from(&env))
        .await
        .expect_err("a fleet ceiling needs Redis");
    let message = error.to_string();
    assert!(
        message.contains("RATE_LIMIT_SCOPE") && message.contains("LEDGER_URL"),
        "{message}"
    );
    mock.shutdown();
}

/// Fleet-scope limiters of one "process", sharing Redis through `redis_url`.
async fn fleet_limiters(settings: &Settings, redis_url: &str) -> Limiters {
    let client = redis::Client::open(redis_url).expect("redis url");
    let connection = ConnectionManager::new(client)
        .await
        .expect("Redis must be running (scripts/ensure-services --redis starts it)");
    Limiters::from_settings(settings, Some(connection)).expect("fleet limiters")
}

fn fleet_settings(mock: &MockVendor, rate: &str) -> (Settings, tempfile::TempDir) {
    let ledger_dir = tempfile::tempdir().expect("tempdir");
    let mut env = common::worker_env(
        &common::unique_queue("fleet_limiter"),
        mock,
        ledger_dir.path(),
    );
    env.insert("RATE_LIMIT_SCOPE".into(), "fleet".into());
    env.insert("MIMECAST_RATE_LIMIT".into(), rate.into());
    env.insert("LEDGER_URL".into(), redis_url(15));
    (common::settings_from(&env), ledger_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pause_taken_by_one_process_holds_the_others() {
    let mock = start_mock().await;
    let (settings, _dir) = fleet_settings(&mock, "1000/s");
    let first = fleet_limiters(&settings, &redis_url(15)).await;
    let second = fleet_limiters(&settings, &redis_url(15)).await;
    assert!(
        second.get(VendorKind::Mimecast).acquire().await < Duration::from_secs(1),
        "nothing holds the first call"
    );

    let pause = Duration::from_secs(3);
    first.get(VendorKind::Mimecast).pause_for(pause);
    let paused_at = Instant::now();
    // The pause reaches Redis in the background: wait until it is visible there.
    let mut redis = redis::Client::open(redis_url(15))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pause_key = format!("account-worker:rate:mimecast:{}:pause", mock.addr());
    let visible = Instant::now();
    while redis::cmd("EXISTS")
        .arg(&pause_key)
        .query_async::<i64>(&mut redis)
        .await
        .unwrap()
        == 0
    {
        assert!(
            visible.elapsed() < Duration::from_secs(5),
            "the pause never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    second.get(VendorKind::Mimecast).acquire().await;
    // Measured from the pause, not from the acquire: however long Redis took to
    // show the pause, the other process's call must not go before it ends
    // (less a margin for the clock readings of the two sides).
    let held = paused_at.elapsed();
    assert!(
        held >= pause - Duration::from_millis(500),
        "the other process called {held:?} after a {pause:?} pause began"
    );
    mock.shutdown();
}

/// A TCP relay to Redis that the test can cut, to play a Redis outage.
async fn cuttable_relay(target: &str) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/15", listener.local_addr().unwrap());
    let cut = CancellationToken::new();
    let (target, stop) = (target.to_owned(), cut.clone());
    tokio::spawn(async move {
        let mut links = JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Ok((mut inbound, _)) = listener.accept() => {
                    let target = target.clone();
                    links.spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        }
        // Dropping the listener and every link refuses and breaks all connections.
        links.abort_all();
    });
    (url, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_goes_away_calls_keep_to_the_local_ceiling() {
    let mock = start_mock().await;
    let (settings, _dir) = fleet_settings(&mock, "10/s");
    let (relay, cut) = cuttable_relay("127.0.0.1:6379").await;
    let limiters = fleet_limiters(&settings, &relay).await;
    let limiter = limiters.get(VendorKind::Mimecast);
    limiter.acquire().await;

    cut.cancel();
    // Eleven more calls at 10/s take at least a second: never unlimited, never stuck.
    let started = Instant::now();
    for _ in 0..11 {
        tokio::time::timeout(Duration::from_secs(5), limiter.acquire())
            .await
            .expect("acquire returns while Redis is away");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "11 calls at 10/s took {took:?}"
    );
    mock.shutdown();
}
