//! Mimecast jobs end to end through a real RabbitMQ and the mock vendor.

mod common;

use account_worker::job::JobStatus;
use account_worker::mock_vendor::Vendor;
use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_item_job_succeeds_with_one_result_and_no_dead_letter() {
    let mut app = TestApp::spawn("multi_item").await;
    app.queues
        .publish(&json!({"jobId": "crm-1", "vendor": "mimecast", "data": [
            {"accountCode": "CUS1", "numberOfUsers": 50, "products": [9702]},
            {"accountCode": "CUS2", "accountName": "Two", "contactEmail": "ops@example.com"},
            {"accountCode": "CUS3", "numberOfUsers": -5}
        ]}))
        .await;

    let delivery = app.queues.next_result_delivery().await;
    let properties = &delivery.properties;
    assert_eq!(
        properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("crm-1")
    );
    assert_eq!(
        properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*properties.delivery_mode(), Some(2));
    let result: account_worker::job::JobResult = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(result.data.len(), 3);
    assert!(result.fail.is_empty());
    assert_eq!(result.attempts, 1);
    assert_eq!(result.meta.status, 200);
    assert_eq!(result.data[0]["accountCode"], "CUS1");
    assert_eq!(result.data[0]["userCount"], 50);

    let account = app.mock.mimecast_account("CUS1").unwrap();
    assert_eq!(account.user_count, 50);
    assert_eq!(account.products, vec![9702]);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "CUS1"), 1);
    assert_eq!(
        app.mock.requests().len(),
        1,
        "three items travel in one call"
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_account_is_partial_and_only_that_item_is_dead_lettered() {
    let mut app = TestApp::spawn("partial").await;
    app.queues
        .publish(&json!({"jobId": "crm-2", "vendor": "mimecast", "data": [
            {"accountCode": "CUS1", "numberOfUsers": 5},
            {"accountCode": "MISSING-9", "numberOfUsers": 5}
        ]}))
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Partial);
    assert_eq!(result.data.len(), 1);
    assert_eq!(result.fail.len(), 1);
    assert_eq!(result.fail[0].key["accountCode"], "MISSING-9");
    assert_eq!(result.fail[0].errors[0].code, "err_account_not_found");
    assert!(!result.fail[0].errors[0].retryable);

    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_account_not_found");
    assert_eq!(dead.job_id.as_deref(), Some("crm-2"));
    assert_eq!(dead.attempts.as_deref(), Some("1"));
    assert_eq!(
        dead.json(),
        json!({"jobId": "crm-2", "vendor": "mimecast", "data": [{"accountCode": "MISSING-9", "numberOfUsers": 5}]})
    );
    assert_eq!(
        app.mock.requests().len(),
        1,
        "a permanent failure is not retried"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_inputs_are_dead_lettered_and_the_jobs_behind_them_still_succeed() {
    let mut app = TestApp::spawn("malformed").await;
    let nested = "[".repeat(100_000);
    let too_many: Vec<_> = (0..101)
        .map(|i| json!({"accountCode": format!("C{i}")}))
        .collect();
    // (body, dead-letter code, readable jobId)
    let whole_messages: Vec<(Vec<u8>, Option<&str>)> = vec![
        (b"this is not json".to_vec(), None),
        (vec![b'{', 0xff, 0xfe, b'}'], None),
        (b"{}".to_vec(), None),
        (b"[{\"jobId\": \"x\"}]".to_vec(), None),
        (nested.into_bytes(), None),
        (
            serde_json::to_vec(
                &json!({"jobId": "m-vendor", "vendor": "acme", "data": [{"accountCode": "A"}]}),
            )
            .unwrap(),
            Some("m-vendor"),
        ),
        (
            serde_json::to_vec(
                &json!({"jobId": "m-notarray", "vendor": "mimecast", "data": {"accountCode": "A"}}),
            )
            .unwrap(),
            Some("m-notarray"),
        ),
        (
            serde_json::to_vec(&json!({"jobId": "m-empty", "vendor": "mimecast", "data": []}))
                .unwrap(),
            Some("m-empty"),
        ),
        (
            serde_json::to_vec(&json!({"jobId": "m-many", "vendor": "mimecast", "data": too_many}))
                .unwrap(),
            Some("m-many"),
        ),
    ];
    for (body, _) in &whole_messages {
        app.queues.publish_raw(body).await;
    }
    let bad_items = [
        (json!({"numberOfUsers": 1}), "err_validation_accountCode"),
        (
            json!({"accountCode": "B".repeat(5000)}),
            "err_validation_accountCode",
        ),
        (
            json!({"accountCode": "BAD1", "numberOfUsers": "10"}),
            "err_validation_numberOfUsers",
        ),
        (
            json!({"accountCode": "BAD2", "numberOfUsers": 2.5}),
            "err_validation_numberOfUsers",
        ),
        (
            json!({"accountCode": "BAD3", "contactEmail": "not-an-address"}),
            "err_validation_contactEmail",
        ),
        (
            json!({"accountCode": "BAD4", "products": [9702, "x"]}),
            "err_validation_products",
        ),
        (
            json!({"accountCode": "BAD5", "favouriteColour": "blue"}),
            "err_validation_favouriteColour",
        ),
    ];
    for (i, (item, _)) in bad_items.iter().enumerate() {
        app.queues
            .publish(
                &json!({"jobId": format!("bad-item-{i}"), "vendor": "mimecast", "data": [item]}),
            )
            .await;
    }
    app.queues
        .publish(&json!({"jobId": "good-after", "vendor": "mimecast", "data": [{"accountCode": "GOOD", "numberOfUsers": 3}]}))
        .await;

    // Every whole message is dead-lettered byte for byte as err_job_malformed.
    let mut dead = Vec::new();
    for _ in 0..(whole_messages.len() + bad_items.len()) {
        dead.push(app.queues.next_dead_letter().await);
    }
    for (body, job_id) in &whole_messages {
        let letter = dead.iter().find(|d| &d.body == body).unwrap_or_else(|| {
            panic!(
                "no dead letter for {:?}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            )
        });
        assert_eq!(letter.code, "err_job_malformed");
        assert!(!letter.message.is_empty());
        assert_eq!(letter.job_id.as_deref(), *job_id);
    }
    for (i, (_, code)) in bad_items.iter().enumerate() {
        let id = format!("bad-item-{i}");
        let letter = dead
            .iter()
            .find(|d| d.job_id.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no dead letter for {id}"));
        assert_eq!(&letter.code, code, "{id}");
    }

    // Results: one per readable jobId (4 malformed with ids, 7 invalid items, 1 good).
    let results = app.queues.results_by_job(4 + bad_items.len() + 1).await;
    assert_eq!(results["good-after"].status, JobStatus::Succeeded);
    for (i, (_, code)) in bad_items.iter().enumerate() {
        let result = &results[&format!("bad-item-{i}")];
        assert_eq!(result.status, JobStatus::Failed);
        assert_eq!(result.attempts, 0);
        assert_eq!(&result.fail[0].errors[0].code, code);
        assert!(!result.fail[0].errors[0].retryable);
    }
    for id in ["m-vendor", "m-notarray", "m-empty", "m-many"] {
        assert_eq!(results[id].status, JobStatus::Failed);
        assert_eq!(results[id].fail[0].errors[0].code, "err_job_malformed");
    }

    // No invalid item ever reached the vendor: only the good job's call was made.
    let requests = app.mock.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].body["data"][0]["accountCode"], "GOOD");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_mixing_valid_and_invalid_items_sends_only_the_valid_ones() {
    let mut app = TestApp::spawn("mixed").await;
    app.queues
        .publish(&json!({"jobId": "mixed-1", "vendor": "mimecast", "data": [
            {"accountCode": "OK1", "numberOfUsers": 1},
            {"accountCode": "OK2", "contactEmail": "nope"}
        ]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Partial);
    assert_eq!(result.fail[0].errors[0].code, "err_validation_contactEmail");
    let dead = app.queues.next_dead_letter().await;
    assert_eq!(
        dead.json()["data"],
        json!([{"accountCode": "OK2", "contactEmail": "nope"}])
    );
    let requests = app.mock.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].body["data"],
        json!([{"accountCode": "OK1", "numberOfUsers": 1}])
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfigured_vendor_fails_the_job_without_calling_anything() {
    let mut app = TestApp::spawn_with("unconfigured", |env| {
        env.remove("PNCP_BASE_URL");
    })
    .await;
    app.queues
        .publish(&json!({"jobId": "p-1", "vendor": "pncp", "data": [
            {"accountId": "99", "name": "N", "email": "n@example.com"}
        ]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Failed);
    assert_eq!(result.fail[0].errors[0].code, "err_vendor_not_configured");
    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_vendor_not_configured");
    assert!(app.mock.requests().is_empty());
    app.finish().await;
}
