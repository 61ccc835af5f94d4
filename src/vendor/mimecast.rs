//! Mimecast API 1.0 update-account: request signing, the call, and per-item results.

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::Url;

use super::{http, signing, CallReport, ItemOutcome, VendorError};
use crate::config::MimecastSettings;
use crate::job::{Item, ItemError};

/// The path signed and called; fixed by the API.
pub const UPDATE_ACCOUNT_PATH: &str = "/api/account/update-account";

/// A signed client for update-account.
#[derive(Clone)]
pub struct MimecastClient {
    http: reqwest::Client,
    url: Url,
    access_key: SecretString,
    secret_key: SecretSlice<u8>,
    app_id: String,
    app_key: SecretString,
}

impl std::fmt::Debug for MimecastClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MimecastClient")
            .field("url", &self.url.as_str())
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Request<'a> {
    data: Vec<&'a Map<String, Value>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Response {
    data: Vec<Value>,
    fail: Vec<FailEntry>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FailEntry {
    key: Value,
    errors: Vec<ItemError>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    fail: Vec<FailEntry>,
}

impl MimecastClient {
    /// A client for the configured account and keys.
    pub fn new(http: reqwest::Client, settings: &MimecastSettings) -> Self {
        let mut url = settings.base_url.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}{UPDATE_ACCOUNT_PATH}"));
        Self {
            http,
            url,
            access_key: settings.access_key.clone(),
            secret_key: settings.secret_key.clone(),
            app_id: settings.app_id.clone(),
            app_key: settings.app_key.clone(),
        }
    }

    /// Sends the items as one update-account call.
    pub async fn send(&self, items: &[&Item]) -> Result<CallReport, VendorError> {
        let date = signing::mimecast_date(chrono::Utc::now());
        // A new id per HTTP attempt: Mimecast refuses a reused one.
        let request_id = uuid::Uuid::new_v4().to_string();
        let signature = signing::mimecast_signature(
            self.secret_key.expose_secret(),
            &date,
            &request_id,
            UPDATE_ACCOUNT_PATH,
            self.app_key.expose_secret(),
        );
        let mut authorization = HeaderValue::from_str(&signing::mimecast_authorization(
            self.access_key.expose_secret(),
            &signature,
        ))
        .map_err(|_| VendorError::Credentials {
            status: 0,
            code: "err_invalid_access_key".to_owned(),
            message: "MIMECAST_ACCESS_KEY contains characters not allowed in a header".to_owned(),
        })?;
        authorization.set_sensitive(true);
        let body = Request {
            data: items.iter().map(|item| &item.body).collect(),
        };
        let response = self
            .http
            .post(self.url.clone())
            .header(AUTHORIZATION, authorization)
            .header("x-mc-date", date)
            .header("x-mc-req-id", request_id)
            .header("x-mc-app-id", &self.app_id)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .json(&body)
            .send()
            .await
            .map_err(http::send_error)?;

        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = http::body_bytes(response).await?;
        match status {
            200 => {
                let parsed: Response =
                    serde_json::from_slice(&bytes).map_err(|e| VendorError::BadResponse {
                        status,
                        detail: e.to_string(),
                    })?;
                Ok(CallReport {
                    http_status: status,
                    outcomes: match_outcomes(items, parsed),
                    quota: http::quota(&headers),
                })
            }
            429 => Err(http::throttled(&headers)),
            _ => {
                let (code, message) = first_error(&bytes, status);
                if matches!(status, 401 | 403) {
                    Err(VendorError::Credentials {
                        status,
                        code,
                        message,
                    })
                } else {
                    Err(VendorError::Http {
                        status,
                        code,
                        message,
                    })
                }
            }
        }
    }
}

/// The vendor's own code and message from an error body, or `err_http_<status>`.
fn first_error(bytes: &[u8], status: u16) -> (String, String) {
    serde_json::from_slice::<ErrorBody>(bytes)
        .ok()
        .and_then(|body| body.fail.into_iter().next())
        .and_then(|entry| entry.errors.into_iter().next())
        .map(|error| (error.code, error.message))
        .unwrap_or_else(|| {
            (
                format!("err_http_{status}"),
                format!("the vendor answered HTTP {status}"),
            )
        })
}

fn account_code(value: &Value) -> Option<&str> {
    value.get("accountCode").and_then(Value::as_str)
}

/// Pairs the response's `data` and `fail` entries with the items sent, by account
/// code and in order, so that two items for one account are told apart.
fn match_outcomes(items: &[&Item], response: Response) -> Vec<ItemOutcome> {
    let mut data: Vec<Option<Value>> = response.data.into_iter().map(Some).collect();
    let mut fail: Vec<Option<FailEntry>> = response.fail.into_iter().map(Some).collect();
    let mut outcomes: Vec<Option<ItemOutcome>> = vec![None; items.len()];
    // A fail entry's key is the item as sent: an exact match is certain.
    for (item, outcome) in items.iter().zip(outcomes.iter_mut()) {
        let sent = item.to_value();
        if let Some(slot) = fail
            .iter_mut()
            .find(|f| f.as_ref().is_some_and(|f| f.key == sent))
        {
            *outcome = slot.take().map(|entry| ItemOutcome::Failed(entry.errors));
        }
    }
    for (index, item) in items.iter().enumerate() {
        if outcomes[index].is_some() {
            continue;
        }
        let code = item.account.as_str();
        // Two items for one account in one call cannot be told apart by account
        // code: report them unaccounted (an additive one becomes an unknown
        // outcome, an idempotent one is resent) rather than guess.
        let shared = items.iter().filter(|other| other.account == code).count() > 1;
        if shared {
            outcomes[index] = Some(ItemOutcome::Unaccounted);
            continue;
        }
        let failed = fail
            .iter_mut()
            .find(|f| {
                f.as_ref()
                    .is_some_and(|f| account_code(&f.key) == Some(code))
            })
            .and_then(Option::take)
            .map(|entry| ItemOutcome::Failed(entry.errors));
        let applied = || {
            data.iter_mut()
                .find(|d| d.as_ref().is_some_and(|d| account_code(d) == Some(code)))
                .and_then(Option::take)
                .map(ItemOutcome::Applied)
        };
        outcomes[index] = Some(failed.or_else(applied).unwrap_or(ItemOutcome::Unaccounted));
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or(ItemOutcome::Unaccounted))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(index: usize, code: &str) -> Item {
        let body = json!({"accountCode": code});
        Item {
            index,
            account: code.to_owned(),
            body: body.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn outcomes_follow_the_items_not_the_response_order() {
        let (a, b, c) = (item(0, "A"), item(1, "B"), item(2, "C"));
        let response = Response {
            data: vec![
                json!({"accountCode": "C", "userCount": 3}),
                json!({"accountCode": "A"}),
            ],
            fail: vec![FailEntry {
                key: json!({"accountCode": "B"}),
                errors: vec![ItemError::permanent("err_account_not_found", "no")],
            }],
        };
        let outcomes = match_outcomes(&[&a, &b, &c], response);
        assert_eq!(
            outcomes[0],
            ItemOutcome::Applied(json!({"accountCode": "A"}))
        );
        assert!(
            matches!(&outcomes[1], ItemOutcome::Failed(e) if e[0].code == "err_account_not_found")
        );
        assert_eq!(
            outcomes[2],
            ItemOutcome::Applied(json!({"accountCode": "C", "userCount": 3}))
        );
    }

    #[test]
    fn two_items_for_one_account_are_matched_by_the_whole_item_or_not_at_all() {
        let mut add = item(0, "A");
        add.body.insert("numberOfUsers".into(), json!(5));
        let mut other = item(1, "A");
        other.body.insert("numberOfUsers".into(), json!(-3));
        let response = Response {
            data: vec![json!({"accountCode": "A"})],
            fail: vec![FailEntry {
                key: other.to_value(),
                errors: vec![ItemError {
                    code: "err_temporary".into(),
                    message: "later".into(),
                    retryable: true,
                }],
            }],
        };
        let outcomes = match_outcomes(&[&add, &other], response);
        assert_eq!(
            outcomes[0],
            ItemOutcome::Unaccounted,
            "never guessed as applied twice"
        );
        assert!(matches!(&outcomes[1], ItemOutcome::Failed(e) if e[0].retryable));
    }

    #[test]
    fn an_item_missing_from_the_response_is_unaccounted() {
        let a = item(0, "A");
        let outcomes = match_outcomes(&[&a], Response::default());
        assert_eq!(outcomes, vec![ItemOutcome::Unaccounted]);
    }

    #[test]
    fn error_bodies_pass_the_vendor_code_through() {
        let body = br#"{"meta":{"status":401},"fail":[{"errors":[{"code":"err_xdk_invalid_signature","message":"bad","retryable":false}]}]}"#;
        assert_eq!(
            first_error(body, 401),
            ("err_xdk_invalid_signature".to_owned(), "bad".to_owned())
        );
        assert_eq!(first_error(b"<html>", 502).0, "err_http_502");
    }
}
