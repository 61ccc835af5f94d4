//! Tests of the mock vendor against a real server on port 0, with shared request builders.

mod admin;
mod mimecast;
mod pncp;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::Value;

use super::{
    MockVendor, MockVendorConfig, DEFAULT_PNCP_MEDIA_TYPE, DEMO_MIMECAST_ACCESS_KEY,
    DEMO_MIMECAST_APP_ID, DEMO_MIMECAST_APP_KEY, DEMO_MIMECAST_SECRET_KEY_B64,
    DEMO_PNCP_APPLICATION_KEY, DEMO_PNCP_SHARED_SECRET,
};
use crate::vendor::signing;

async fn start_mock() -> MockVendor {
    MockVendor::start(([127, 0, 0, 1], 0).into(), MockVendorConfig::demo())
        .await
        .expect("the mock starts on port 0")
}

/// A Mimecast update-account call signed with the demo credentials; fields can be
/// spoiled one at a time to provoke each check.
struct MimecastCall {
    body: Value,
    request_id: String,
    date: String,
    secret: Vec<u8>,
    access_key: String,
    app_id: String,
    content_type: &'static str,
}

impl MimecastCall {
    fn new(body: Value) -> Self {
        Self {
            body,
            request_id: uuid::Uuid::new_v4().to_string(),
            date: signing::mimecast_date(chrono::Utc::now()),
            secret: MockVendorConfig::demo().mimecast_secret_key,
            access_key: DEMO_MIMECAST_ACCESS_KEY.to_owned(),
            app_id: DEMO_MIMECAST_APP_ID.to_owned(),
            content_type: "application/json",
        }
    }

    fn with_request_id(mut self, request_id: &str) -> Self {
        self.request_id = request_id.to_owned();
        self
    }

    async fn send(
        &self,
        client: &reqwest::Client,
        mock: &MockVendor,
    ) -> reqwest::Result<reqwest::Response> {
        let path = "/api/account/update-account";
        let signature = signing::mimecast_signature(
            &self.secret,
            &self.date,
            &self.request_id,
            path,
            DEMO_MIMECAST_APP_KEY,
        );
        client
            .post(format!("{}{path}", mock.base_url()))
            .header(
                "authorization",
                signing::mimecast_authorization(&self.access_key, &signature),
            )
            .header("x-mc-app-id", &self.app_id)
            .header("x-mc-date", &self.date)
            .header("x-mc-req-id", &self.request_id)
            .header("content-type", self.content_type)
            .header("accept", "application/json")
            .body(self.body.to_string())
            .send()
            .await
    }
}

/// The PNCP `Authorization` value for `METHOD path` signed with the demo credentials.
fn pncp_authorization(method: &str, path: &str) -> String {
    let to_sign = signing::pncp_string_to_sign(method, path, &[], DEMO_PNCP_APPLICATION_KEY);
    let signature = signing::pncp_signature(DEMO_PNCP_SHARED_SECRET.as_bytes(), &to_sign);
    signing::pncp_authorization(DEMO_PNCP_APPLICATION_KEY, &signature)
}

/// A correctly signed Modify Account call.
fn pncp_put(
    client: &reqwest::Client,
    mock: &MockVendor,
    account_id: &str,
    body: &Value,
) -> reqwest::RequestBuilder {
    let path = format!("/account/{account_id}");
    client
        .put(format!("{}{path}", mock.pncp_base_url()))
        .header("authorization", pncp_authorization("PUT", &path))
        .header("content-type", DEFAULT_PNCP_MEDIA_TYPE)
        .header("accept", DEFAULT_PNCP_MEDIA_TYPE)
        .body(body.to_string())
}

/// A correctly signed GET of a path relative to the PNCP root (e.g. `/task/abc`).
fn pncp_get(client: &reqwest::Client, mock: &MockVendor, path: &str) -> reqwest::RequestBuilder {
    client
        .get(format!("{}{path}", mock.pncp_base_url()))
        .header("authorization", pncp_authorization("GET", path))
        .header("accept", DEFAULT_PNCP_MEDIA_TYPE)
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

#[test]
fn demo_secret_constant_decodes_to_the_demo_config_key() {
    let decoded = BASE64.decode(DEMO_MIMECAST_SECRET_KEY_B64).unwrap();
    assert_eq!(decoded, MockVendorConfig::demo().mimecast_secret_key);
}

#[test]
fn config_debug_never_shows_secrets() {
    let shown = format!("{:?}", MockVendorConfig::demo());
    assert!(!shown.contains(DEMO_PNCP_SHARED_SECRET));
    assert!(!shown.contains(DEMO_MIMECAST_APP_KEY));
    assert!(!shown.contains("demo-secret-key"));
}

#[tokio::test]
async fn serve_answers_until_its_shutdown_future_resolves() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let server = tokio::spawn(super::serve(listener, MockVendorConfig::demo(), shutdown));
    let client = reqwest::Client::new();

    let response = client
        .get(format!("http://{addr}/admin/requests"))
        .send()
        .await;
    assert_eq!(response.unwrap().status(), 200);
    stop.send(()).unwrap();

    let finished = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    assert!(finished.expect("serve returns").unwrap().is_ok());
}

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    let mock = start_mock().await;
    mock.shutdown();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(mock.addr()).await.is_err() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("the mock still accepts connections after shutdown");
}
