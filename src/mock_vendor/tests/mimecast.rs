//! Behaviour of the mock update-account endpoint: checks, accounts, faults and throttle.

use std::time::Duration;

use serde_json::{json, Value};

use super::{header, start_mock, MimecastCall};
use crate::mock_vendor::{Fault, Vendor, STATUS_CLIENT_GONE, STATUS_DROPPED};

fn one_item(code: &str, users: i64) -> Value {
    json!({"data": [{"accountCode": code, "numberOfUsers": users, "products": [9702]}]})
}

async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["fail"][0]["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn signed_update_is_applied_and_number_of_users_adds_up() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();

    let first = MimecastCall::new(one_item("CUS1", 50))
        .send(&client, &mock)
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit"), Some("1000000"));
    assert_eq!(header(&first, "x-ratelimit-remaining"), Some("999999"));
    assert!(header(&first, "x-ratelimit-reset").is_some());
    let second = MimecastCall::new(one_item("CUS1", 25))
        .send(&client, &mock)
        .await
        .unwrap();
    let body: Value = second.json().await.unwrap();

    assert_eq!(body["meta"]["status"], 200);
    assert_eq!(body["fail"], json!([]));
    let entry = &body["data"][0];
    assert_eq!(entry["accountCode"], "CUS1");
    assert_eq!(entry["userCount"], 75);
    assert_eq!(entry["packages"], json!(["9702"]));
    assert_eq!(entry["domain"], "cus1.mimecast-mock.test");
    assert_eq!(entry["mimecastId"], "mc-CUS1");
    let account = mock.mimecast_account("CUS1").unwrap();
    assert_eq!((account.user_count, account.products), (75, vec![9702]));
    assert_eq!(mock.applied_count(Vendor::Mimecast, "CUS1"), 2);
    let records = mock.requests();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.applied && r.status == 200));
    assert_eq!(records[1].seq, 2);
    assert_eq!(records[0].body, one_item("CUS1", 50));
}

#[tokio::test]
async fn reused_request_id_is_refused_and_not_applied() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let call = MimecastCall::new(one_item("CUS1", 10)).with_request_id("same-id");
    assert_eq!(call.send(&client, &mock).await.unwrap().status(), 200);

    let again = MimecastCall::new(one_item("CUS1", 10)).with_request_id("same-id");
    let response = again.send(&client, &mock).await.unwrap();

    assert_eq!(response.status(), 401);
    assert_eq!(error_code(response).await, "err_xdk_request_id_reused");
    assert_eq!(mock.mimecast_account("CUS1").unwrap().user_count, 10);
    assert_eq!(mock.applied_count(Vendor::Mimecast, "CUS1"), 1);
    let last = mock.requests().pop().unwrap();
    assert_eq!((last.status, last.applied), (401, false));
    assert_eq!(last.request_id.as_deref(), Some("same-id"));
}

#[tokio::test]
async fn bad_signature_is_refused_with_401() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let mut call = MimecastCall::new(one_item("CUS1", 10));
    call.secret = b"not-the-secret".to_vec();

    let response = call.send(&client, &mock).await.unwrap();

    assert_eq!(response.status(), 401);
    assert!(header(&response, "x-ratelimit-limit").is_some());
    assert_eq!(error_code(response).await, "err_xdk_invalid_signature");
    assert!(mock.mimecast_account("CUS1").is_none());
}

#[tokio::test]
async fn header_checks_refuse_like_the_vendor() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let mut cases = Vec::new();
    let mut call = MimecastCall::new(one_item("C", 1));
    call.content_type = "text/plain";
    cases.push((call, 415, "err_invalid_content_type"));
    let mut call = MimecastCall::new(one_item("C", 1));
    call.access_key = "someone-else".into();
    cases.push((call, 401, "err_xdk_invalid_access_key"));
    let mut call = MimecastCall::new(one_item("C", 1));
    call.app_id = "other-app".into();
    cases.push((call, 401, "err_xdk_invalid_app_id"));
    let mut call = MimecastCall::new(one_item("C", 1));
    call.date = "Tue, 24 Nov 2015 12:50:11 UTC".into();
    cases.push((call, 401, "err_xdk_invalid_date"));
    let mut call = MimecastCall::new(json!({"items": []}));
    call.content_type = "application/json; charset=utf-8";
    cases.push((call, 400, "err_invalid_request_body"));

    for (call, status, code) in cases {
        let response = call.send(&client, &mock).await.unwrap();
        assert_eq!(response.status(), status, "{code}");
        assert_eq!(error_code(response).await, code);
    }
    assert!(mock.mimecast_account("C").is_none());
    assert!(mock.requests().iter().all(|r| !r.applied));
}

#[tokio::test]
async fn missing_codes_land_in_fail_with_err_account_not_found() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let missing = json!({"accountCode": "MISSING-7", "numberOfUsers": 5});
    let body = json!({"data": [missing, {"accountCode": "CUS2", "accountName": "Two"}]});

    let response = MimecastCall::new(body).send(&client, &mock).await.unwrap();

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["fail"][0]["key"], missing);
    let error = &body["fail"][0]["errors"][0];
    assert_eq!(error["code"], "err_account_not_found");
    assert_eq!(error["message"], "Account MISSING-7 was not found");
    assert_eq!(error["retryable"], false);
    assert_eq!(body["data"][0]["accountName"], "Two");
    assert!(mock.mimecast_account("MISSING-7").is_none());
}

#[tokio::test]
async fn drop_fault_gives_the_client_an_error_and_applies_nothing() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.push_fault(Vendor::Mimecast, Fault::Drop);

    let outcome = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await;

    assert!(
        outcome.is_err(),
        "expected a transport error, got {outcome:?}"
    );
    assert!(mock.mimecast_account("CUS1").is_none());
    let record = mock.requests().pop().unwrap();
    assert_eq!((record.status, record.applied), (STATUS_DROPPED, false));
    assert_eq!(record.fault.as_deref(), Some("drop"));
    // The next request is served normally: one fault per request.
    let next = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await;
    assert_eq!(next.unwrap().status(), 200);
}

#[tokio::test]
async fn drop_after_apply_applies_but_the_client_sees_an_error() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.push_fault(Vendor::Mimecast, Fault::DropAfterApply);

    let outcome = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await;

    assert!(outcome.is_err());
    assert_eq!(mock.mimecast_account("CUS1").unwrap().user_count, 5);
    assert!(mock.requests()[0].applied);
}

#[tokio::test]
async fn fail_after_apply_applies_and_answers_the_status() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.push_fault(Vendor::Mimecast, Fault::FailAfterApply { status: 500 });

    let response = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await
        .unwrap();

    assert_eq!(response.status(), 500);
    assert_eq!(error_code(response).await, "err_http_500");
    assert_eq!(mock.mimecast_account("CUS1").unwrap().user_count, 5);
    assert_eq!(mock.applied_count(Vendor::Mimecast, "CUS1"), 1);
    let record = mock.requests().pop().unwrap();
    assert_eq!((record.status, record.applied), (500, true));
}

#[tokio::test]
async fn status_and_retryable_faults_do_not_apply() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.push_fault(Vendor::Mimecast, Fault::Status { status: 503 });
    mock.push_fault(Vendor::Mimecast, Fault::RetryableFail);
    mock.push_fault(Vendor::Mimecast, Fault::RateLimited { reset_ms: 1234 });

    let unavailable = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await
        .unwrap();
    let retryable = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await
        .unwrap();
    let limited = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await
        .unwrap();

    assert_eq!(unavailable.status(), 503);
    assert_eq!(retryable.status(), 200);
    let body: Value = retryable.json().await.unwrap();
    assert_eq!(body["data"], json!([]));
    assert_eq!(body["fail"][0]["key"]["accountCode"], "CUS1");
    assert_eq!(
        body["fail"][0]["errors"][0]["code"],
        "err_temporary_failure"
    );
    assert_eq!(body["fail"][0]["errors"][0]["retryable"], true);
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "x-ratelimit-reset"), Some("1234"));
    assert!(mock.mimecast_account("CUS1").is_none());
    let faults: Vec<_> = mock.requests().into_iter().map(|r| r.fault).collect();
    let expected = ["status", "retryable_fail", "rate_limited"].map(|k| Some(k.to_owned()));
    assert_eq!(faults, expected);
}

#[tokio::test]
async fn throttle_of_two_per_second_answers_429_with_reset_on_the_third_call() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.set_throttle(Vendor::Mimecast, Some(2));

    let mut statuses = Vec::new();
    let mut last = None;
    for users in 1..=3 {
        let response = MimecastCall::new(one_item("CUS1", users))
            .send(&client, &mock)
            .await;
        let response = response.unwrap();
        statuses.push(response.status().as_u16());
        last = Some(response);
    }

    assert_eq!(statuses, [200, 200, 429]);
    let last = last.unwrap();
    assert_eq!(header(&last, "x-ratelimit-limit"), Some("2"));
    assert_eq!(header(&last, "x-ratelimit-remaining"), Some("0"));
    let reset: u64 = header(&last, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=1000).contains(&reset));
    assert_eq!(error_code(last).await, "err_rate_limit_exceeded");
    assert_eq!(mock.mimecast_account("CUS1").unwrap().user_count, 3);
    assert_eq!(mock.requests()[2].fault.as_deref(), Some("throttled"));
}

#[tokio::test]
async fn client_gone_before_the_answer_is_recorded_and_nothing_is_applied() {
    let mock = start_mock().await;
    // The client gives up well after its request has arrived, on a loaded
    // machine too, and long before the answer is due.
    mock.set_latency(Duration::from_secs(10));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    let outcome = MimecastCall::new(one_item("CUS1", 5))
        .send(&client, &mock)
        .await;

    assert!(outcome.is_err());
    tokio::time::timeout(Duration::from_secs(30), mock.wait_for_requests(1))
        .await
        .expect("the abandoned request is recorded");
    let record = mock.requests().pop().unwrap();
    assert_eq!((record.status, record.applied), (STATUS_CLIENT_GONE, false));
    assert!(mock.mimecast_account("CUS1").is_none());
}

#[tokio::test]
async fn wait_for_requests_resolves_once_enough_are_recorded() {
    let mock = start_mock().await;
    let waiter = tokio::spawn({
        let mock = mock.clone();
        async move { mock.wait_for_requests(2).await }
    });
    let client = reqwest::Client::new();
    for users in [1, 2] {
        MimecastCall::new(one_item("CUS1", users))
            .send(&client, &mock)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter wakes up")
        .unwrap();
}

#[tokio::test]
async fn an_item_with_only_the_account_code_reads_the_account_and_changes_nothing() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    MimecastCall::new(one_item("READ1", 5))
        .send(&client, &mock)
        .await
        .unwrap();

    let read = json!({"data": [{"accountCode": "READ1"}, {"accountCode": "READ2"}]});
    let response = MimecastCall::new(read).send(&client, &mock).await.unwrap();

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"][0]["userCount"], 5);
    assert_eq!(body["data"][1]["accountCode"], "READ2");
    assert_eq!(mock.mimecast_account("READ1").unwrap().user_count, 5);
    assert!(
        mock.mimecast_account("READ2").is_none(),
        "a read creates nothing"
    );
    assert_eq!(mock.applied_count(Vendor::Mimecast, "READ1"), 1);
    let records = mock.requests();
    assert_eq!(records.len(), 2, "the read is counted as a request");
    assert!(!records[1].applied, "but not as an applied change");
}
