//! Behaviour of the mock's admin API: faults, accounts, throttle, reset and bad input.

use serde_json::{json, Value};

use super::{start_mock, MimecastCall};
use crate::mock_vendor::{Fault, RecordedRequest, Vendor};

fn update(code: &str) -> Value {
    json!({"data": [{"accountCode": code, "numberOfUsers": 3}]})
}

#[tokio::test]
async fn admin_faults_are_queued_and_consumed_in_order() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let faults = json!({"vendor": "mimecast", "faults": [
        {"kind": "status", "status": 503},
        {"kind": "delay", "ms": 1},
    ]});

    let queued = client
        .post(format!("{}/admin/faults", mock.base_url()))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 204);

    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = MimecastCall::new(update("A1"))
            .send(&client, &mock)
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [503, 200, 200]);
    assert_eq!(mock.mimecast_account("A1").unwrap().user_count, 6);
}

#[tokio::test]
async fn admin_reports_requests_and_accounts_without_recording_itself() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    MimecastCall::new(update("A1"))
        .send(&client, &mock)
        .await
        .unwrap();

    let accounts: Value = client
        .get(format!("{}/admin/accounts", mock.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let requests: Vec<RecordedRequest> = client
        .get(format!("{}/admin/requests", mock.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    assert_eq!(accounts["mimecast"]["A1"]["user_count"], 3);
    assert_eq!(accounts["applied"]["mimecast"]["A1"], 1);
    assert_eq!(accounts["pncp"], json!({}));
    assert_eq!(requests, mock.requests());
    assert_eq!(requests.len(), 1);
}

#[tokio::test]
async fn admin_throttle_latency_and_reset_take_effect() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let admin = |path: &str, body: Value| {
        client
            .post(format!("{}/admin/{path}", mock.base_url()))
            .json(&body)
            .send()
    };
    MimecastCall::new(update("A1"))
        .send(&client, &mock)
        .await
        .unwrap();

    let throttled = admin("throttle", json!({"vendor": "mimecast", "per_second": 0}));
    assert_eq!(throttled.await.unwrap().status(), 204);
    let refused = MimecastCall::new(update("A1"))
        .send(&client, &mock)
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let lifted = admin(
        "throttle",
        json!({"vendor": "mimecast", "per_second": null}),
    );
    assert_eq!(lifted.await.unwrap().status(), 204);
    assert_eq!(
        admin("latency", json!({"ms": 1})).await.unwrap().status(),
        204
    );
    let served = MimecastCall::new(update("A1"))
        .send(&client, &mock)
        .await
        .unwrap();
    assert_eq!(served.status(), 200);

    assert_eq!(admin("reset", Value::Null).await.unwrap().status(), 204);
    assert!(mock.requests().is_empty());
    assert!(mock.mimecast_account("A1").is_none());
    assert_eq!(mock.applied_count(Vendor::Mimecast, "A1"), 0);
}

#[tokio::test]
async fn bad_admin_input_is_400_with_a_message() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let cases = [
        ("faults", json!({"vendor": "acme", "faults": []})),
        (
            "faults",
            json!({"vendor": "mimecast", "faults": [{"kind": "explode"}]}),
        ),
        (
            "faults",
            json!({"vendor": "mimecast", "faults": [{"kind": "accepted_task", "succeed": true, "polls": 1}]}),
        ),
        (
            "faults",
            json!({"vendor": "pncp", "faults": [{"kind": "status", "status": 42}]}),
        ),
        ("latency", json!({"ms": "slow"})),
        (
            "throttle",
            json!({"vendor": "pncp", "per_second": 5, "burst": 2}),
        ),
    ];

    for (path, body) in cases {
        let response = client
            .post(format!("{}/admin/{path}", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert!(answer["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn random_faults_follow_queued_ones_fault_every_call_at_rate_one_and_stop_at_zero() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let random = |body: Value| {
        client
            .post(format!("{}/admin/random-faults", mock.base_url()))
            .json(&body)
            .send()
    };
    mock.push_fault(Vendor::Mimecast, Fault::Status { status: 418 });
    let on = random(json!({"rate": 1.0, "seed": 3, "delay_ms": 1, "reset_ms": 1}));
    assert_eq!(on.await.unwrap().status(), 204);

    for i in 0..30 {
        // Drawn drops end the call without an answer: that is the point.
        let _ = MimecastCall::new(update(&format!("R{i}")))
            .send(&client, &mock)
            .await;
    }
    let records = mock.requests();
    assert_eq!(records.len(), 30);
    assert_eq!(
        (records[0].fault.as_deref(), records[0].status),
        (Some("status"), 418)
    );
    assert!(records.iter().all(|r| r.fault.is_some()), "{records:?}");
    for (i, record) in records.iter().enumerate() {
        let applied = mock.applied_count(Vendor::Mimecast, &format!("R{i}"));
        assert_eq!(applied, usize::from(record.applied), "{record:?}");
    }

    assert_eq!(random(json!({"rate": 2})).await.unwrap().status(), 400);
    assert_eq!(random(json!({"rate": 0})).await.unwrap().status(), 204);
    let calm = MimecastCall::new(update("CALM"))
        .send(&client, &mock)
        .await
        .unwrap();
    assert_eq!(calm.status(), 200);
    assert_eq!(mock.requests().last().unwrap().fault, None);
}

#[tokio::test]
async fn an_outage_answers_its_status_to_one_vendor_applies_nothing_and_ends_on_request() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let outage = |body: Value| {
        client
            .post(format!("{}/admin/outage", mock.base_url()))
            .json(&body)
            .send()
    };
    mock.push_fault(Vendor::Mimecast, Fault::Status { status: 418 });
    let on = outage(json!({"vendor": "mimecast", "status": 503}));
    assert_eq!(on.await.unwrap().status(), 204);

    let mut statuses = Vec::new();
    for i in 0..3 {
        let response = MimecastCall::new(update(&format!("O{i}")))
            .send(&client, &mock)
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    let other = super::pncp_put(
        &client,
        &mock,
        "77",
        &json!({"name": "Up", "email": "up@client.test"}),
    )
    .send()
    .await
    .unwrap();

    assert_eq!(statuses, [503, 503, 503]);
    assert_eq!(other.status(), 200, "the other vendor keeps answering");
    let records = mock.requests();
    for record in &records[..3] {
        assert_eq!(
            (record.fault.as_deref(), record.applied),
            (Some("outage"), false)
        );
    }
    assert!(mock.mimecast_account("O0").is_none());

    assert_eq!(
        outage(json!({"vendor": "mimecast", "status": 200}))
            .await
            .unwrap()
            .status(),
        400,
        "an outage answers an error status"
    );
    let off = outage(json!({"vendor": "mimecast", "status": null}));
    assert_eq!(off.await.unwrap().status(), 204);
    let mut after = Vec::new();
    for _ in 0..2 {
        let response = MimecastCall::new(update("BACK"))
            .send(&client, &mock)
            .await
            .unwrap();
        after.push(response.status().as_u16());
    }
    assert_eq!(
        after,
        [418, 200],
        "the queued fault waited for the outage to end"
    );
    assert_eq!(mock.applied_count(Vendor::Mimecast, "BACK"), 1);
}
