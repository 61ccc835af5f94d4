//! PNCP jobs end to end through a real RabbitMQ and the mock vendor's PNCP endpoint.

mod common;

use account_worker::job::{JobResult, JobStatus};
use account_worker::mock_vendor::{self, Fault, RecordedRequest, Vendor};
use common::{TestApp, EVENT_TIMEOUT};
use serde_json::{json, Value};

/// The path the mock sees for Modify Account of `id`.
fn account_path(id: &str) -> String {
    format!("{}/account/{id}", mock_vendor::PNCP_ROOT)
}

/// A valid PNCP item for `id`.
fn item(id: &str, name: &str) -> Value {
    json!({"accountId": id, "name": name, "email": format!("ops-{id}@example.com")})
}

/// The Modify Account calls the mock saw, in arrival order.
fn puts(requests: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    requests.iter().filter(|r| r.method == "PUT").collect()
}

fn first_error_code(result: &JobResult) -> &str {
    &result.fail[0].errors[0].code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_item_pncp_job_succeeds_with_the_responses_in_item_order() {
    let mut app = TestApp::spawn("pncp_three").await;
    // The first call to arrive answers last, so completion order differs from item order.
    app.mock.push_fault(Vendor::Pncp, Fault::Delay { ms: 100 });
    let items = [
        json!({"accountId": "101", "name": "One", "email": "one@example.com",
               "description": "first", "permissions": {"reseller": true, "virtual": false, "bareMetal": false}}),
        item("102", "Two"),
        item("103", "Three"),
    ];
    app.queues
        .publish(&json!({"jobId": "pncp-ok", "vendor": "pncp", "data": items}))
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.job_id, "pncp-ok");
    assert_eq!(result.vendor, "pncp");
    assert_eq!(result.status, JobStatus::Succeeded);
    assert!(result.fail.is_empty(), "{:?}", result.fail);
    assert_eq!(result.meta.status, 200);
    assert_eq!(result.attempts, 1);
    assert_eq!(result.data.len(), 3);
    for (data, (id, name)) in
        result
            .data
            .iter()
            .zip([("101", "One"), ("102", "Two"), ("103", "Three")])
    {
        // Each element is the vendor's response body for that item.
        assert_eq!(data["name"], name);
        assert_eq!(
            data["accountResource"]["resourceURL"],
            format!("/account/{id}")
        );
        assert!(data["signUpDate"].is_string(), "{data}");
    }
    assert_eq!(result.data[0]["permissions"]["reseller"], true);

    // One PUT per item, to the account's own URL, with the item less accountId as the body.
    let requests = app.mock.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for sent in &items {
        let id = sent["accountId"].as_str().unwrap();
        let call = requests
            .iter()
            .find(|r| r.path == account_path(id))
            .unwrap_or_else(|| panic!("no call for account {id}: {requests:?}"));
        assert_eq!(call.vendor, Vendor::Pncp);
        assert_eq!(call.method, "PUT");
        assert_eq!(call.status, 200);
        let mut expected = sent.clone();
        expected.as_object_mut().unwrap().remove("accountId");
        assert_eq!(call.body, expected);
        assert!(call.body.get("accountId").is_none());
        assert_eq!(app.mock.applied_count(Vendor::Pncp, id), 1);
    }
    assert_eq!(
        app.mock.pncp_account("101").unwrap()["description"],
        "first"
    );
    assert_eq!(
        app.mock.pncp_account("103").unwrap()["email"],
        "ops-103@example.com"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_items_of_a_pncp_job_are_sent_concurrently() {
    let mut app = TestApp::spawn("pncp_concurrent").await;
    // A first job lets the limiter learn the quota, so its start-up hold (one
    // call first, the rest after its answer) is over before the job under test.
    app.queues
        .publish(&json!({"jobId": "pncp-warm", "vendor": "pncp", "data": [item("110", "W")]}))
        .await;
    assert_eq!(app.queues.next_result().await.status, JobStatus::Succeeded);
    app.mock.reset();
    // Each call is held far longer than the test can take: sent one after
    // another, the second would not arrive before the first was answered.
    for _ in 0..3 {
        app.mock
            .push_fault(Vendor::Pncp, Fault::Delay { ms: 5_000 });
    }
    app.queues
        .publish(&json!({"jobId": "pncp-conc", "vendor": "pncp", "data": [
            item("111", "A"), item("112", "B"), item("113", "C")
        ]}))
        .await;
    tokio::time::timeout(common::EVENT_TIMEOUT, app.mock.wait_for_admitted(3))
        .await
        .expect("all three calls are under way");
    assert!(
        app.mock.requests().is_empty(),
        "all three arrived while none had been answered"
    );
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(app.mock.requests().len(), 3);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_pncp_account_is_partial_and_only_that_item_is_dead_lettered() {
    let mut app = TestApp::spawn("pncp_partial").await;
    let unknown = item("404-77", "Nobody");
    app.queues
        .publish(&json!({"jobId": "pncp-partial", "vendor": "pncp", "data": [
            item("201", "Known"), unknown.clone(), item("203", "Also known")
        ]}))
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Partial);
    assert_eq!(result.data.len(), 2);
    assert_eq!(result.data[0]["name"], "Known");
    assert_eq!(result.data[1]["name"], "Also known");
    assert_eq!(result.fail.len(), 1);
    let failure = &result.fail[0];
    assert_eq!(failure.key, unknown, "the key is the item as sent");
    assert_eq!(failure.errors[0].code, "err_http_404");
    // X-Application-Error-Description, passed through (the reference follows it).
    assert!(
        failure.errors[0]
            .message
            .starts_with("Account 404-77 not found"),
        "{}",
        failure.errors[0].message
    );
    assert!(!failure.errors[0].retryable);

    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_http_404");
    assert!(dead.message.starts_with("Account 404-77 not found"));
    assert_eq!(dead.job_id.as_deref(), Some("pncp-partial"));
    assert_eq!(dead.attempts.as_deref(), Some("1"));
    assert_eq!(
        dead.json(),
        json!({"jobId": "pncp-partial", "vendor": "pncp", "data": [unknown]})
    );

    let requests = app.mock.requests();
    assert_eq!(requests.len(), 3, "a 404 is not retried: {requests:?}");
    assert!(app.mock.pncp_account("404-77").is_none());
    assert!(app.mock.pncp_account("201").is_some());
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_task_poll_waits_and_polls_the_same_task_again() {
    let mut app = TestApp::spawn("pncp_task_429").await;
    app.mock.push_fault(
        Vendor::Pncp,
        Fault::AcceptedTask {
            succeed: true,
            polls: 0,
        },
    );
    // One request a second: the first poll, right after the 202, is refused.
    app.mock.set_throttle(Vendor::Pncp, Some(1));
    app.queues
        .publish(
            &json!({"jobId": "pncp-task-429", "vendor": "pncp", "data": [item("311", "Polled")]}),
        )
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    let requests = app.mock.requests();
    let calls: Vec<(&str, u16)> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.status))
        .collect();
    assert_eq!(
        calls,
        [("PUT", 202), ("GET", 429), ("GET", 200)],
        "the change is sent once and its task followed through the 429"
    );
    assert_eq!(app.mock.applied_count(Vendor::Pncp, "311"), 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_task_that_closes_successfully_succeeds_the_item() {
    let mut app = TestApp::spawn("pncp_task_ok").await;
    app.mock.push_fault(
        Vendor::Pncp,
        Fault::AcceptedTask {
            succeed: true,
            polls: 2,
        },
    );
    app.queues
        .publish(
            &json!({"jobId": "pncp-task-ok", "vendor": "pncp", "data": [item("301", "Later")]}),
        )
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    assert_eq!(result.attempts, 1);
    assert_eq!(result.data.len(), 1);
    assert_eq!(
        result.data[0]["accountResource"]["resourceURL"],
        "/account/301"
    );
    assert_eq!(app.mock.pncp_account("301").unwrap()["name"], "Later");
    assert_eq!(app.mock.applied_count(Vendor::Pncp, "301"), 1);

    // One PUT answered 202, then the task polled until it closed (two OPEN reads, one CLOSED).
    let requests = app.mock.requests();
    let (put, polls) = requests.split_first().expect("requests");
    assert_eq!((put.method.as_str(), put.status), ("PUT", 202));
    assert_eq!(polls.len(), 3, "{requests:?}");
    assert!(polls.iter().all(|r| r.method == "GET"
        && r.path
            .starts_with(&format!("{}/task/", mock_vendor::PNCP_ROOT))
        && r.status == 200));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_task_that_closes_failed_fails_the_item_and_dead_letters_it() {
    let mut app = TestApp::spawn("pncp_task_failed").await;
    app.mock.push_fault(
        Vendor::Pncp,
        Fault::AcceptedTask {
            succeed: false,
            polls: 1,
        },
    );
    let sent = item("302", "Never");
    app.queues
        .publish(&json!({"jobId": "pncp-task-failed", "vendor": "pncp", "data": [sent.clone()]}))
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Failed);
    assert!(result.data.is_empty());
    assert_eq!(result.fail[0].key, sent);
    assert_eq!(first_error_code(&result), "err_task_failed");
    // The task's own reason is passed through.
    assert_eq!(
        result.fail[0].errors[0].message,
        "Injected fault: the task failed"
    );
    assert!(!result.fail[0].errors[0].retryable);

    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_task_failed");
    assert_eq!(dead.job_id.as_deref(), Some("pncp-task-failed"));
    assert_eq!(dead.json()["data"], json!([sent]));

    assert!(
        app.mock.pncp_account("302").is_none(),
        "nothing was applied"
    );
    assert_eq!(
        puts(&app.mock.requests()).len(),
        1,
        "a failed task is final, not resent"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pncp_items_never_reach_the_vendor_and_name_the_field() {
    let mut app = TestApp::spawn("pncp_invalid").await;
    let bad_items = [
        (
            json!({"accountId": "501", "email": "a@example.com"}),
            "err_validation_name",
        ),
        (
            json!({"accountId": "502", "name": "N", "email": "not-an-address"}),
            "err_validation_email",
        ),
        (
            json!({"accountId": "50/3", "name": "N", "email": "a@example.com"}),
            "err_validation_accountId",
        ),
        (
            json!({"accountId": "5".repeat(65), "name": "N", "email": "a@example.com"}),
            "err_validation_accountId",
        ),
        // `/account/..` would address the collection, not an account.
        (
            json!({"accountId": "..", "name": "N", "email": "a@example.com"}),
            "err_validation_accountId",
        ),
    ];
    for (i, (bad, _)) in bad_items.iter().enumerate() {
        app.queues
            .publish(&json!({"jobId": format!("pncp-bad-{i}"), "vendor": "pncp", "data": [bad]}))
            .await;
    }
    // 64 characters is still a valid accountId.
    let longest = "6".repeat(64);
    app.queues
        .publish(&json!({"jobId": "pncp-good", "vendor": "pncp", "data": [
            {"accountId": longest, "name": "Long", "email": "long@example.com"}
        ]}))
        .await;

    let results = app.queues.results_by_job(bad_items.len() + 1).await;
    let mut dead = Vec::new();
    for _ in 0..bad_items.len() {
        dead.push(app.queues.next_dead_letter().await);
    }
    for (i, (bad, code)) in bad_items.iter().enumerate() {
        let id = format!("pncp-bad-{i}");
        let result = &results[&id];
        assert_eq!(result.status, JobStatus::Failed, "{id}");
        assert_eq!(result.attempts, 0, "{id}");
        assert_eq!(first_error_code(result), *code, "{id}");
        assert!(!result.fail[0].errors[0].retryable);
        assert_eq!(&result.fail[0].key, bad);
        let letter = dead
            .iter()
            .find(|d| d.job_id.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no dead letter for {id}"));
        assert_eq!(letter.code, *code, "{id}");
        assert_eq!(letter.json()["data"], json!([bad]));
    }
    assert_eq!(results["pncp-good"].status, JobStatus::Succeeded);

    let requests = app.mock.requests();
    assert_eq!(
        requests.len(),
        1,
        "only the valid item was sent: {requests:?}"
    );
    assert_eq!(requests[0].path, account_path(&longest));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pncp_server_error_is_resent_because_modify_account_is_idempotent() {
    let mut app = TestApp::spawn("pncp_503").await;
    app.mock
        .push_fault(Vendor::Pncp, Fault::Status { status: 503 });
    app.queues
        .publish(&json!({"jobId": "pncp-503", "vendor": "pncp", "data": [
            item("601", "First"), item("602", "Second")
        ]}))
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    assert_eq!(result.attempts, 2);
    assert_eq!(result.data[0]["name"], "First");
    assert_eq!(result.data[1]["name"], "Second");

    // Whichever item met the 503 was sent again, and only that one.
    let requests = app.mock.requests();
    let calls = puts(&requests);
    assert_eq!(calls.len(), 3, "{requests:?}");
    let failed = calls.iter().find(|r| r.status == 503).expect("a 503");
    let resent: Vec<_> = calls.iter().filter(|r| r.path == failed.path).collect();
    assert_eq!(resent.len(), 2, "{requests:?}");
    assert_eq!(resent[1].status, 200);
    assert_eq!(resent[1].body, failed.body);
    for id in ["601", "602"] {
        assert_eq!(app.mock.applied_count(Vendor::Pncp, id), 1, "{id}");
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pncp_429_waits_for_retry_after_and_then_succeeds() {
    let mut app = TestApp::spawn("pncp_429").await;
    // The mock answers `Retry-After: 1` (seconds).
    app.mock
        .push_fault(Vendor::Pncp, Fault::RateLimited { reset_ms: 1000 });
    app.queues
        .publish(&json!({"jobId": "pncp-429", "vendor": "pncp", "data": [item("651", "Patient")]}))
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    let requests = app.mock.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!((requests[0].status, requests[1].status), (429, 200));
    let waited = requests[1].at_ms - requests[0].at_ms;
    assert!(
        waited >= 1000,
        "resent after {waited} ms, before Retry-After"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_in_which_only_429s_left_items_pending_spend_no_attempts() {
    let mut app = TestApp::spawn_with("pncp_partly_throttled", |env| {
        env.insert("RETRY_MAX_ATTEMPTS".into(), "1".into());
    })
    .await;
    // One call per item, and after a 429 one call goes first: the first two
    // calls are refused 429 (never executed) and the other two answered. Had
    // the round counted, its single attempt would be spent and the two refused
    // items dead-lettered.
    for _ in 0..2 {
        app.mock
            .push_fault(Vendor::Pncp, Fault::RateLimited { reset_ms: 100 });
    }
    app.queues
        .publish(
            &json!({"jobId": "pncp-partly-429", "vendor": "pncp", "data": [
                item("661", "A"), item("662", "B"), item("663", "C"), item("664", "D")
            ]}),
        )
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    let statuses: Vec<u16> = app.mock.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pncp_shared_secret_holds_the_jobs_instead_of_dead_lettering_them() {
    let mut app = TestApp::spawn_with("pncp_wrong_secret", |env| {
        env.insert("PNCP_SHARED_SECRET".into(), "not-the-shared-secret".into());
    })
    .await;
    let jobs = ["pncp-held-0", "pncp-held-1"];
    for (i, job_id) in jobs.iter().enumerate() {
        app.queues
            .publish(&json!({"jobId": job_id, "vendor": "pncp", "data": [item(&format!("70{i}"), "Held")]}))
            .await;
    }
    // Both jobs are refused, then the worker probes again: the fault lasts.
    tokio::time::timeout(EVENT_TIMEOUT, app.mock.wait_for_requests(3))
        .await
        .expect("the worker keeps probing PNCP");
    let refused = app.mock.requests();
    assert!(
        refused.iter().all(|r| r.status == 401 && !r.applied),
        "{refused:?}"
    );
    let readiness = app.worker.health().readiness();
    assert!(
        readiness.as_ref().is_err_and(|why| why.contains("pncp")),
        "not ready while PNCP jobs are held: {readiness:?}"
    );
    app.stop_worker().await;
    assert_eq!(
        app.queues.depth(&app.queues.names.jobs).await,
        jobs.len() as u32,
        "every held job is back in the queue"
    );

    // The operator fixes the secret and starts a worker (its own ledger file: the
    // stopped worker's file is still open in this process). The first results are
    // the held jobs' successes, so none was published while they were held.
    let fixed_ledger = tempfile::tempdir().expect("tempdir");
    let mut env = app.env.clone();
    env.insert(
        "PNCP_SHARED_SECRET".into(),
        mock_vendor::DEMO_PNCP_SHARED_SECRET.into(),
    );
    env.insert(
        "LEDGER_URL".into(),
        format!("file:{}", fixed_ledger.path().join("ledger").display()),
    );
    let (stop, fixed) = common::start_worker(&env).await;
    for _ in &jobs {
        let result = app.queues.next_result().await;
        assert!(jobs.contains(&result.job_id.as_str()), "{}", result.job_id);
        assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    }
    // A job that must be dead-lettered: if a held job had been, its letter would come first.
    app.queues
        .publish(&json!({"jobId": "pncp-marker", "vendor": "pncp", "data": [{"accountId": "799"}]}))
        .await;
    let first_dead = app.queues.next_dead_letter().await;
    assert_eq!(first_dead.job_id.as_deref(), Some("pncp-marker"));
    assert_eq!(app.queues.next_result().await.job_id, "pncp-marker");

    stop.cancel();
    let _ = tokio::time::timeout(EVENT_TIMEOUT, fixed).await;
    app.finish().await;
}
