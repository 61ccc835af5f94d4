//! A vendor that publishes no quota and only says 429 past it: the worker learns
//! a rate from the 429s themselves and wastes few calls once it has.
//! Needs RabbitMQ on localhost (`scripts/ensure-services`).

mod common;

use account_worker::job::JobStatus;
use account_worker::mock_vendor::{ThrottleMode, Vendor};
use common::{refused_after, TestApp};
use serde_json::json;

/// Jobs per test: at 10 calls/s about 15 s of calls, long enough that the
/// first 2 s (when nothing is known yet) are a small part of it.
const JOBS: usize = 150;

async fn run_against(test: &str, vendor: Vendor, mode: ThrottleMode) -> (usize, usize) {
    let mut app = TestApp::spawn_with(test, |env| {
        env.insert("WORKER_CONCURRENCY".into(), "16".into());
        env.insert("RETRY_MAX_ATTEMPTS".into(), "30".into());
    })
    .await;
    app.mock.set_throttle_mode(vendor, mode);
    app.mock.set_throttle(vendor, Some(10));
    for i in 0..JOBS {
        let job = match vendor {
            Vendor::Mimecast => {
                json!({"jobId": format!("{test}-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("LR{i}"), "numberOfUsers": 1}]})
            }
            Vendor::Pncp => {
                json!({"jobId": format!("{test}-{i}"), "vendor": "pncp", "data": [{"accountId": format!("{}", 1000 + i), "name": "Learned", "email": "ops@example.com"}]})
            }
        };
        app.queues.publish(&job).await;
    }
    let results = app.queues.results_by_job(JOBS).await;
    assert_eq!(results.len(), JOBS);
    assert!(
        results.values().all(|r| r.status == JobStatus::Succeeded),
        "every job completes"
    );
    for i in 0..JOBS {
        let account = match vendor {
            Vendor::Mimecast => format!("LR{i}"),
            Vendor::Pncp => format!("{}", 1000 + i),
        };
        assert_eq!(app.mock.applied_count(vendor, &account), 1, "{account}");
    }
    let requests = app.mock.requests();
    let (calls, refused) = refused_after(&requests, vendor, 2000);
    let (all, all_refused) = refused_after(&requests, vendor, 0);
    println!(
        "{test}: {all_refused} 429s in {all} calls; after the first 2 s {refused} in {calls} ({:.1}%)",
        refused as f64 / calls.max(1) as f64 * 100.0
    );
    app.finish().await;
    (calls, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_that_reports_its_quota_only_on_429s_refuses_at_most_5_percent_of_calls_after_2_s()
{
    let (calls, refused) = run_against(
        "learn_quota_on_429",
        Vendor::Mimecast,
        ThrottleMode::QuotaOn429,
    )
    .await;
    assert!(
        refused * 20 <= calls,
        "{refused} of {calls} calls refused after the first 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pncp_answering_only_retry_after_in_seconds_refuses_at_most_5_percent_of_calls_after_2_s() {
    let (calls, refused) = run_against(
        "learn_retry_after",
        Vendor::Pncp,
        ThrottleMode::RetryAfterOnly,
    )
    .await;
    assert!(
        refused * 20 <= calls,
        "{refused} of {calls} calls refused after the first 2 s"
    );
}
