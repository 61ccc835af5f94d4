//! Hostile input against the real broker: huge field names and vendor strings,
//! an outcome the broker keeps refusing, and attacker-chosen metric labels.

mod common;

use std::collections::HashMap;

use account_worker::broker::headers;
use account_worker::metrics;
use account_worker::mock_vendor::{MockVendor, MockVendorConfig};
use common::{DeadLetter, Queues, TestApp};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// 200 KB: far past RabbitMQ's frame size (128 KB by default).
const HUGE: usize = 200 * 1024;

fn printable(value: &str) -> bool {
    value.chars().all(|c| c == ' ' || c.is_ascii_graphic())
}

/// Every header of a dead letter the worker wrote is small and printable.
fn assert_bounded(letter: &DeadLetter) {
    assert!(
        letter.code.len() <= headers::MAX_CODE_BYTES && printable(&letter.code),
        "x-error-code {} bytes: {:.200}",
        letter.code.len(),
        letter.code
    );
    assert!(
        letter.message.len() <= headers::MAX_MESSAGE_BYTES && printable(&letter.message),
        "x-error-message {} bytes: {:.200}",
        letter.message.len(),
        letter.message
    );
    let job_id = letter.job_id.as_deref().unwrap_or_default();
    assert!(job_id.len() <= headers::MAX_ID_BYTES && printable(job_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_field_names_and_vendor_strings_keep_one_session_and_bounded_headers() {
    let mut app = TestApp::spawn("hostile-headers").await;
    // Control characters too: a header must not be able to forge lines.
    let item_key = format!("k\r\n{}", "k".repeat(HUGE));
    let top_key = format!("t{}", "t".repeat(HUGE));
    let vendor = format!("v\u{0}{}", "v".repeat(HUGE));
    let mut jobs = HashMap::new();
    jobs.insert(
        "h-item-key",
        json!({"jobId": "h-item-key", "vendor": "mimecast",
               "data": [{"accountCode": "H1", item_key.clone(): 1}]}),
    );
    jobs.insert(
        "h-top-key",
        json!({"jobId": "h-top-key", "vendor": "mimecast",
               "data": [{"accountCode": "H2"}], top_key.clone(): 1}),
    );
    jobs.insert(
        "h-vendor",
        json!({"jobId": "h-vendor", "vendor": vendor.clone(), "data": [{"accountCode": "H3"}]}),
    );
    for job in jobs.values() {
        app.queues.publish(job).await;
    }

    let mut letters = HashMap::new();
    for _ in 0..jobs.len() {
        let letter = app.queues.next_dead_letter().await;
        assert_bounded(&letter);
        let job_id = letter.job_id.clone().expect("x-job-id");
        assert!(
            letters.insert(job_id.clone(), letter).is_none(),
            "{job_id} dead-lettered twice"
        );
    }
    let item = &letters["h-item-key"];
    assert!(
        item.code.starts_with("err_validation_k__kkk"),
        "a bounded field name: {}",
        item.code
    );
    assert!(item.message.ends_with("[truncated]"), "{}", item.message);
    assert_eq!(
        item.json()["data"][0][&item_key],
        1,
        "the body keeps the full item"
    );
    for (job_id, needle) in [("h-top-key", &top_key), ("h-vendor", &vendor)] {
        let letter = &letters[job_id];
        assert_eq!(letter.code, "err_job_malformed");
        assert!(
            letter.message.ends_with("[truncated]"),
            "{}",
            letter.message
        );
        assert_eq!(
            letter.body,
            serde_json::to_vec(&jobs[job_id]).unwrap(),
            "the body is the job byte for byte"
        );
        let body: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
        let kept = match job_id {
            "h-vendor" => body["vendor"] == needle.as_str(),
            _ => body.get(needle.as_str()).is_some(),
        };
        assert!(kept, "the body keeps the full {job_id}");
    }

    // One result each, with the full detail in the body.
    let results = app.queues.results_by_job(jobs.len()).await;
    assert_eq!(
        results.len(),
        jobs.len(),
        "one result per job: {:?}",
        results.keys()
    );
    let message = &results["h-item-key"].fail[0].errors[0].message;
    assert!(
        message.contains(&format!("{item_key:?}")),
        "full name in the body"
    );
    assert_eq!(results["h-vendor"].vendor, vendor);

    // The session survived: a job published after them is processed on it, and
    // nothing was redelivered or republished in between.
    app.queues
        .publish(
            &json!({"jobId": "h-after", "vendor": "mimecast", "data": [{"accountCode": "H4"}]}),
        )
        .await;
    let after = app.queues.next_result().await;
    assert_eq!(
        after.job_id, "h-after",
        "no hostile job was published twice"
    );
    assert_eq!(app.worker.health().reconnects(), 0, "one broker session");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_whose_outcome_the_broker_keeps_refusing_is_dead_lettered() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("refused");
    let env = common::worker_env(&queue, &mock, ledger.path());
    // An operator's limit the worker cannot meet: every result is refused (nack).
    let mut refuse = FieldTable::default();
    refuse.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    refuse.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let mut queues = Queues::open_with_results(&queue, refuse).await;
    let (stop, task, worker) = common::start_worker_with_handle(&env).await;

    queues
        .publish(&json!({"jobId": "refused-1", "vendor": "mimecast",
                         "data": [{"accountCode": "R1", "numberOfUsers": 1}]}))
        .await;
    let letter = queues.next_dead_letter().await;
    assert_bounded(&letter);
    assert_eq!(letter.code, "err_publish_failed");
    assert_eq!(letter.job_id.as_deref(), Some("refused-1"));
    assert!(
        letter.message.contains("nack"),
        "the reason: {}",
        letter.message
    );
    assert_eq!(letter.json()["jobId"], "refused-1");
    assert_eq!(
        mock.requests().len(),
        1,
        "the change was made once, however often its outcome was refused"
    );
    // It gave up after a bounded number of sessions instead of looping.
    let reconnects = worker.health().reconnects();
    assert!(
        (1..=u64::from(account_worker::broker::PublishFailures::MAX_FAILURES))
            .contains(&reconnects),
        "{reconnects} reconnects"
    );

    stop.cancel();
    let _ = tokio::time::timeout(common::EVENT_TIMEOUT, task).await;
    queues.delete().await;
    mock.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_chosen_strings_never_become_metric_labels() {
    let mut app = TestApp::spawn("hostile-labels").await;
    let listener = metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(metrics::serve(
        listener,
        app.worker.health().clone(),
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let scrape = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // A run of ordinary jobs first, so every family has its usual series.
    app.queues
        .publish(&json!({"jobId": "l-good", "vendor": "mimecast", "data": [{"accountCode": "L0"}]}))
        .await;
    app.queues.next_result().await;
    let before = scrape().await.len();

    const HOSTILE: usize = 40;
    let mut chosen = Vec::new();
    for n in 0..HOSTILE {
        let random = format!("zq{}", uuid::Uuid::new_v4().simple());
        let job = if n % 2 == 0 {
            json!({"jobId": format!("l-{n}"), "vendor": format!("{random}{}", "v".repeat(1000)),
                   "data": [{"accountCode": "L1"}]})
        } else {
            json!({"jobId": format!("l-{n}"), "vendor": "mimecast",
                   "data": [{"accountCode": "L1", format!("{random}{}", "f".repeat(1000)): 1}]})
        };
        app.queues.publish(&job).await;
        chosen.push(random);
    }
    app.queues.results_by_job(HOSTILE).await;

    let text = scrape().await;
    for random in &chosen {
        assert!(!text.contains(random.as_str()), "{random} became a label");
    }
    assert!(
        text.len() < before + 2048,
        "/metrics grew from {before} to {} bytes:\n{text}",
        text.len()
    );
    let series = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let half = (HOSTILE / 2) as f64;
    assert_eq!(
        series("account_worker_jobs_total{vendor=\"other\",outcome=\"malformed\"}"),
        half,
        "{text}"
    );
    assert_eq!(
        series("account_worker_dead_letters_total{code=\"other\"}"),
        half,
        "{text}"
    );
    stop.cancel();
    let _ = server.await;
    app.finish().await;
}
