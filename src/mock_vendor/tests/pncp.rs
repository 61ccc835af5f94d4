//! Behaviour of the mock PNCP endpoints: signed Modify Account, its refusals and tasks.

use serde_json::{json, Value};

use super::{header, pncp_get, pncp_put, start_mock};
use crate::mock_vendor::{Fault, Vendor, DEFAULT_PNCP_MEDIA_TYPE};

fn account_body() -> Value {
    json!({"name": "Reseller", "email": "ops@reseller.test", "clientAssignedId": "345"})
}

#[tokio::test]
async fn signed_put_stores_and_answers_the_account() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();

    let response = pncp_put(&client, &mock, "99", &account_body())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        Some(DEFAULT_PNCP_MEDIA_TYPE)
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["name"], "Reseller");
    assert_eq!(body["accountResource"]["resourceURL"], "/account/99");
    assert!(body["signUpDate"].is_string());
    assert_eq!(mock.pncp_account("99"), Some(body));
    assert_eq!(mock.applied_count(Vendor::Pncp, "99"), 1);
    let record = mock.requests().pop().unwrap();
    assert_eq!(record.path, "/pncp-external-api-rest/account/99");
    assert_eq!((record.method.as_str(), record.status), ("PUT", 200));
}

#[tokio::test]
async fn ids_starting_with_404_answer_404_with_error_headers() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();

    let response = pncp_put(&client, &mock, "404-1", &account_body())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 404);
    let description = header(&response, "x-application-error-description");
    assert_eq!(description, Some("Account 404-1 not found"));
    assert!(header(&response, "x-application-error-reference").is_some());
    assert!(mock.pncp_account("404-1").is_none());
}

#[tokio::test]
async fn missing_name_is_400_with_a_description_header() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let body = json!({"email": "ops@reseller.test"});

    let response = pncp_put(&client, &mock, "99", &body).send().await.unwrap();

    assert_eq!(response.status(), 400);
    let description = header(&response, "x-application-error-description").unwrap();
    assert!(description.contains("name"), "{description}");
    assert!(mock.pncp_account("99").is_none());
}

#[tokio::test]
async fn bad_signature_and_wrong_media_types_are_refused() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let url = format!("{}/account/99", mock.pncp_base_url());
    let sdk_media_type = "application/vnd.pncp.v.1.0+json";

    let unsigned = client
        .put(&url)
        .header(
            "authorization",
            super::pncp_authorization("PUT", "/account/98"),
        )
        .header("content-type", DEFAULT_PNCP_MEDIA_TYPE)
        .header("accept", DEFAULT_PNCP_MEDIA_TYPE)
        .body(account_body().to_string());
    let with_media_types = |content_type: &str, accept: &str| {
        client
            .put(&url)
            .header(
                "authorization",
                super::pncp_authorization("PUT", "/account/99"),
            )
            .header("content-type", content_type)
            .header("accept", accept)
            .body(account_body().to_string())
    };
    let wrong_content_type = with_media_types(sdk_media_type, DEFAULT_PNCP_MEDIA_TYPE);
    let wrong_accept = with_media_types(DEFAULT_PNCP_MEDIA_TYPE, sdk_media_type);

    let unsigned = unsigned.send().await.unwrap();
    assert_eq!(unsigned.status(), 401);
    let description = header(&unsigned, "x-application-error-description");
    assert_eq!(description, Some("Invalid signature"));
    assert!(header(&unsigned, "x-application-error-reference").is_some());
    assert_eq!(wrong_content_type.send().await.unwrap().status(), 415);
    assert_eq!(wrong_accept.send().await.unwrap().status(), 406);
    assert!(mock.pncp_account("99").is_none());
}

#[tokio::test]
async fn accepted_task_reads_open_then_closes_and_applies_once() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let fault = Fault::AcceptedTask {
        succeed: true,
        polls: 2,
    };
    mock.push_fault(Vendor::Pncp, fault);

    let accepted = pncp_put(&client, &mock, "99", &account_body())
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let body: Value = accepted.json().await.unwrap();
    let task_url = body["resourceURL"].as_str().unwrap().to_owned();
    assert!(task_url.starts_with("/task/"));
    assert!(mock.pncp_account("99").is_none());

    let mut states = Vec::new();
    for _ in 0..4 {
        let poll = pncp_get(&client, &mock, &task_url).send().await.unwrap();
        assert_eq!(poll.status(), 200);
        let poll: Value = poll.json().await.unwrap();
        states.push(poll["state"].as_str().unwrap().to_owned());
        if poll["state"] == "CLOSED" {
            assert_eq!(poll["result"], "SUCCESSFUL");
            assert_eq!(poll["accountResource"]["resourceURL"], "/account/99");
        }
    }

    assert_eq!(states, ["OPEN", "OPEN", "CLOSED", "CLOSED"]);
    assert_eq!(mock.pncp_account("99").unwrap()["name"], "Reseller");
    assert_eq!(mock.applied_count(Vendor::Pncp, "99"), 1);
    let applied: Vec<bool> = mock.requests().iter().map(|r| r.applied).collect();
    assert_eq!(applied, [false, false, false, true, false]);
}

#[tokio::test]
async fn failed_task_closes_without_applying() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    let fault = Fault::AcceptedTask {
        succeed: false,
        polls: 0,
    };
    mock.push_fault(Vendor::Pncp, fault);

    let accepted = pncp_put(&client, &mock, "99", &account_body())
        .send()
        .await
        .unwrap();
    let body: Value = accepted.json().await.unwrap();
    let task_url = body["resourceURL"].as_str().unwrap();
    let poll = pncp_get(&client, &mock, task_url).send().await.unwrap();
    let poll: Value = poll.json().await.unwrap();

    assert_eq!(
        (poll["state"].as_str(), poll["result"].as_str()),
        (Some("CLOSED"), Some("FAILED"))
    );
    assert!(poll["errorDescription"].is_string());
    assert!(mock.pncp_account("99").is_none());
    let unknown = pncp_get(&client, &mock, "/task/nope").send().await.unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn rate_limited_fault_sets_retry_after_in_whole_seconds() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.push_fault(Vendor::Pncp, Fault::RateLimited { reset_ms: 1500 });
    mock.push_fault(Vendor::Pncp, Fault::RetryableFail);

    let limited = pncp_put(&client, &mock, "99", &account_body())
        .send()
        .await
        .unwrap();
    let unavailable = pncp_put(&client, &mock, "99", &account_body())
        .send()
        .await
        .unwrap();

    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "retry-after"), Some("2"));
    assert_eq!(unavailable.status(), 503);
    assert!(mock.pncp_account("99").is_none());
}

#[tokio::test]
async fn drop_after_apply_stores_the_account_but_the_client_sees_an_error() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.push_fault(Vendor::Pncp, Fault::DropAfterApply);

    let outcome = pncp_put(&client, &mock, "99", &account_body()).send().await;

    assert!(outcome.is_err());
    assert_eq!(mock.applied_count(Vendor::Pncp, "99"), 1);
}

#[tokio::test]
async fn an_outage_refuses_modify_and_task_polls_until_it_ends() {
    let mock = start_mock().await;
    let client = reqwest::Client::new();
    mock.push_fault(
        Vendor::Pncp,
        Fault::AcceptedTask {
            succeed: true,
            polls: 0,
        },
    );
    let accepted = pncp_put(&client, &mock, "99", &account_body())
        .send()
        .await
        .unwrap();
    let body: Value = accepted.json().await.unwrap();
    let task_url = body["resourceURL"].as_str().unwrap().to_owned();

    mock.set_outage(Vendor::Pncp, Some(401));
    let refused = pncp_put(&client, &mock, "98", &account_body())
        .send()
        .await
        .unwrap();
    let poll = pncp_get(&client, &mock, &task_url).send().await.unwrap();

    assert_eq!(
        (refused.status().as_u16(), poll.status().as_u16()),
        (401, 401)
    );
    assert!(header(&poll, "x-application-error-description").is_some());
    assert!(mock.pncp_account("98").is_none());
    assert!(mock.pncp_account("99").is_none(), "the task did not close");
    let faults: Vec<_> = mock.requests().into_iter().map(|r| r.fault).collect();
    assert_eq!(
        faults,
        [
            Some("accepted_task".into()),
            Some("outage".into()),
            Some("outage".into())
        ]
    );

    mock.set_outage(Vendor::Pncp, None);
    let poll: Value = pncp_get(&client, &mock, &task_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(poll["state"], "CLOSED");
    assert_eq!(mock.applied_count(Vendor::Pncp, "99"), 1);
}
