//! Field-by-field validation of jobs and their items, for both vendors.

use email_address::EmailAddress;
use serde_json::{Map, Value};

use super::{
    bounded_echo, fingerprint, FailEntry, Item, ItemError, Job, JobId, Malformed, VendorKind,
    MAX_BODY_BYTES, MAX_ITEMS,
};

/// The fields a Mimecast item may have (update-account's `data` element).
pub const MIMECAST_FIELDS: &[&str] = &[
    "accountCode",
    "accountName",
    "contactName",
    "telephone",
    "contactEmail",
    "numberOfUsers",
    "products",
];

/// The fields a PNCP item may have (`accountId` and Modify Account's body).
pub const PNCP_FIELDS: &[&str] = &[
    "accountId",
    "name",
    "email",
    "description",
    "adminUrl",
    "reportBugEmail",
    "clientAssignedId",
    "permissions",
];

/// Longest free-text field accepted in an item (names, descriptions, telephone).
const MAX_TEXT_CHARS: usize = 1024;

pub(super) fn parse_job(body: &[u8]) -> Result<Job, Malformed> {
    let malformed = |reason: String| Malformed {
        job_id: None,
        vendor: None,
        reason,
    };
    if body.len() > MAX_BODY_BYTES {
        return Err(malformed(format!(
            "message is {} bytes; the limit is {MAX_BODY_BYTES}",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| malformed(format!("message is not valid UTF-8 ({e})")))?;
    // serde_json refuses nesting deeper than 128 levels, so hostile input cannot
    // exhaust the stack.
    let value: Value =
        serde_json::from_str(text).map_err(|e| malformed(format!("message is not JSON ({e})")))?;
    let Value::Object(object) = value else {
        return Err(malformed(format!(
            "a job must be a JSON object, got {}",
            kind_of(&value)
        )));
    };

    let job_id = match object.get("jobId") {
        Some(Value::String(id)) => JobId::parse(id).map_err(malformed)?,
        Some(other) => {
            return Err(malformed(format!(
                "jobId must be a string, got {}",
                kind_of(other)
            )))
        }
        None => return Err(malformed("jobId is missing".to_owned())),
    };
    let vendor_text = object
        .get("vendor")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let with_id = |reason: String| Malformed {
        job_id: Some(job_id.clone()),
        vendor: vendor_text.clone(),
        reason,
    };

    let vendor = match object.get("vendor").and_then(Value::as_str) {
        Some("mimecast") => VendorKind::Mimecast,
        Some("pncp") => VendorKind::Pncp,
        Some(other) => {
            return Err(with_id(format!(
                "unknown vendor {other:?}; expected \"mimecast\" or \"pncp\""
            )))
        }
        None => {
            return Err(with_id(
                "vendor must be \"mimecast\" or \"pncp\"".to_owned(),
            ))
        }
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "jobId" | "vendor" | "data"))
    {
        return Err(with_id(format!(
            "unknown field {unknown:?}; a job has only jobId, vendor and data"
        )));
    }
    let data = match object.get("data") {
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(with_id("data is empty".to_owned()))
        }
        Some(Value::Array(items)) if items.len() > MAX_ITEMS => {
            return Err(with_id(format!(
                "data has {} items; the limit is {MAX_ITEMS}",
                items.len()
            )))
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(with_id(format!(
                "data must be an array, got {}",
                kind_of(other)
            )))
        }
        None => return Err(with_id("data is missing".to_owned())),
    };

    let mut items = Vec::with_capacity(data.len());
    let mut rejected = Vec::new();
    for (index, raw) in data.iter().enumerate() {
        let checked = match vendor {
            VendorKind::Mimecast => validate_mimecast_item(raw),
            VendorKind::Pncp => validate_pncp_item(raw),
        };
        match checked {
            Ok((account, body)) => items.push(Item {
                index,
                account,
                body,
            }),
            Err(error) => rejected.push((
                index,
                FailEntry {
                    key: bounded_echo(raw.clone()),
                    errors: vec![error],
                },
            )),
        }
    }
    Ok(Job {
        fingerprint: fingerprint(vendor.as_str(), data),
        ledger_key: job_id.clone(),
        replay: None,
        id: job_id,
        vendor,
        items,
        rejected,
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Longest field name kept in an `err_validation_<field>` code.
const MAX_CODE_FIELD_CHARS: usize = 64;

/// The error of one field. The field name may be the producer's own (an unknown
/// key of any length and content), and the code reaches headers and logs, so its
/// name is cut to [`MAX_CODE_FIELD_CHARS`] letters, digits and `_` (any other
/// character becomes `_`); the message keeps the name exactly as sent.
fn field_error(field: &str, message: String) -> ItemError {
    let name: String = field
        .chars()
        .take(MAX_CODE_FIELD_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    ItemError::permanent(format!("err_validation_{name}"), message)
}

fn as_object(raw: &Value) -> Result<&Map<String, Value>, ItemError> {
    raw.as_object().ok_or_else(|| {
        field_error(
            "item",
            format!("an item must be a JSON object, got {}", kind_of(raw)),
        )
    })
}

fn refuse_unknown_fields(item: &Map<String, Value>, allowed: &[&str]) -> Result<(), ItemError> {
    match item.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(field_error(
            unknown,
            format!(
                "unknown field {unknown:?}; allowed fields are {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn required_string<'a>(
    item: &'a Map<String, Value>,
    field: &str,
    max_chars: usize,
) -> Result<&'a str, ItemError> {
    match item.get(field) {
        Some(Value::String(text)) => {
            let chars = text.chars().count();
            if chars == 0 || chars > max_chars {
                Err(field_error(
                    field,
                    format!("{field} must be 1 to {max_chars} characters, got {chars}"),
                ))
            } else {
                Ok(text)
            }
        }
        Some(other) => Err(field_error(
            field,
            format!("{field} must be a string, got {}", kind_of(other)),
        )),
        None => Err(field_error(field, format!("{field} is required"))),
    }
}

fn optional_string(
    item: &Map<String, Value>,
    field: &str,
    max_chars: usize,
) -> Result<(), ItemError> {
    if item.contains_key(field) {
        required_string(item, field, max_chars)?;
    }
    Ok(())
}

fn email(item: &Map<String, Value>, field: &str, required: bool) -> Result<(), ItemError> {
    if !required && !item.contains_key(field) {
        return Ok(());
    }
    let text = required_string(item, field, 254)?;
    if EmailAddress::is_valid(text) {
        Ok(())
    } else {
        Err(field_error(
            field,
            format!("{field} {text:?} is not an email address"),
        ))
    }
}

fn validate_mimecast_item(raw: &Value) -> Result<(String, Map<String, Value>), ItemError> {
    let item = as_object(raw)?;
    refuse_unknown_fields(item, MIMECAST_FIELDS)?;
    let account = required_string(item, "accountCode", 128)?.to_owned();
    for field in ["accountName", "contactName", "telephone"] {
        optional_string(item, field, MAX_TEXT_CHARS)?;
    }
    email(item, "contactEmail", false)?;
    if let Some(users) = item.get("numberOfUsers") {
        if users.as_i64().is_none() {
            return Err(field_error(
                "numberOfUsers",
                format!("numberOfUsers must be a whole number (negative to reduce), got {users}"),
            ));
        }
    }
    if let Some(products) = item.get("products") {
        let all_integers = products
            .as_array()
            .is_some_and(|ids| ids.iter().all(|id| id.as_i64().is_some()));
        if !all_integers {
            return Err(field_error(
                "products",
                "products must be an array of whole-number product ids".to_owned(),
            ));
        }
    }
    Ok((account, item.clone()))
}

fn validate_pncp_item(raw: &Value) -> Result<(String, Map<String, Value>), ItemError> {
    let item = as_object(raw)?;
    refuse_unknown_fields(item, PNCP_FIELDS)?;
    let account = required_string(item, "accountId", 64)?;
    // "." and ".." are path steps, not ids: `/account/..` would address another resource.
    if account.contains('/') || account.trim() != account || matches!(account, "." | "..") {
        return Err(field_error(
            "accountId",
            format!(
                "accountId {account:?} must not contain '/' or surrounding spaces, nor be '.' or '..'"
            ),
        ));
    }
    required_string(item, "name", MAX_TEXT_CHARS)?;
    email(item, "email", true)?;
    email(item, "reportBugEmail", false)?;
    for field in ["description", "adminUrl", "clientAssignedId"] {
        optional_string(item, field, MAX_TEXT_CHARS)?;
    }
    if let Some(permissions) = item.get("permissions") {
        let valid = permissions.as_object().is_some_and(|flags| {
            flags.iter().all(|(k, v)| {
                matches!(k.as_str(), "reseller" | "virtual" | "bareMetal") && v.is_boolean()
            })
        });
        if !valid {
            return Err(field_error(
                "permissions",
                "permissions must be an object of booleans reseller, virtual, bareMetal".to_owned(),
            ));
        }
    }
    Ok((account.to_owned(), item.clone()))
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use serde_json::json;

    fn job(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

    fn rejected_code(item: Value) -> String {
        let parsed = parse(&job(
            json!({"jobId": "j", "vendor": "mimecast", "data": [item]}),
        ))
        .unwrap();
        assert!(parsed.items.is_empty(), "item should have been refused");
        parsed.rejected[0].1.errors[0].code.clone()
    }

    #[test]
    fn a_good_mimecast_job_parses_with_all_items() {
        let parsed = parse(&job(
            json!({"jobId": "crm-1", "vendor": "mimecast", "data": [
                {"accountCode": "CUS1", "numberOfUsers": 50, "products": [9702]},
                {"accountCode": "CUS2", "contactEmail": "ops@example.com", "accountName": "Two"}
            ]}),
        ))
        .unwrap();
        assert_eq!(parsed.id.as_str(), "crm-1");
        assert_eq!(parsed.items.len(), 2);
        assert!(parsed.items[0].is_additive());
        assert!(!parsed.items[1].is_additive());
        assert!(parsed.rejected.is_empty());
    }

    #[test]
    fn malformed_messages_are_refused_whole() {
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (b"not json".to_vec(), false),
            (vec![0xff, 0xfe, b'{'], false),
            (b"{}".to_vec(), false),
            (b"[1,2]".to_vec(), false),
            ("[".repeat(100_000).into_bytes(), false),
            (
                job(json!({"jobId": "j", "vendor": "acme", "data": [{}]})),
                true,
            ),
            (
                job(json!({"jobId": "j", "vendor": "mimecast", "data": {}})),
                true,
            ),
            (
                job(json!({"jobId": "j", "vendor": "mimecast", "data": []})),
                true,
            ),
            (
                job(
                    json!({"jobId": "j", "vendor": "mimecast", "data": vec![json!({"accountCode": "A"}); 101]}),
                ),
                true,
            ),
            (
                job(json!({"jobId": "", "vendor": "mimecast", "data": [{"accountCode": "A"}]})),
                false,
            ),
            (
                job(json!({"jobId": 7, "vendor": "mimecast", "data": [{"accountCode": "A"}]})),
                false,
            ),
            (
                job(
                    json!({"jobId": "j", "vendor": "mimecast", "data": [{"accountCode": "A"}], "extra": 1}),
                ),
                true,
            ),
        ];
        for (body, has_id) in cases {
            let error = parse(&body).expect_err("should be malformed");
            assert_eq!(error.job_id.is_some(), has_id, "{}", error.reason);
        }
    }

    #[test]
    fn invalid_mimecast_items_get_field_codes() {
        assert_eq!(
            rejected_code(json!({"numberOfUsers": 1})),
            "err_validation_accountCode"
        );
        assert_eq!(
            rejected_code(json!({"accountCode": "A".repeat(5000)})),
            "err_validation_accountCode"
        );
        assert_eq!(
            rejected_code(json!({"accountCode": "A", "numberOfUsers": "5"})),
            "err_validation_numberOfUsers"
        );
        assert_eq!(
            rejected_code(json!({"accountCode": "A", "numberOfUsers": 5.5})),
            "err_validation_numberOfUsers"
        );
        assert_eq!(
            rejected_code(json!({"accountCode": "A", "contactEmail": "nobody"})),
            "err_validation_contactEmail"
        );
        assert_eq!(
            rejected_code(json!({"accountCode": "A", "products": [1, "x"]})),
            "err_validation_products"
        );
        assert_eq!(
            rejected_code(json!({"accountCode": "A", "color": "red"})),
            "err_validation_color"
        );
        assert_eq!(rejected_code(json!("A")), "err_validation_item");
    }

    #[test]
    fn a_huge_vendor_string_stays_whole_in_the_reason_and_is_cut_in_the_log() {
        let vendor = format!("\u{e9}{}", "v".repeat(200_000));
        let malformed = parse(&job(
            json!({"jobId": "j", "vendor": vendor.clone(), "data": [{"accountCode": "A"}]}),
        ))
        .unwrap_err();
        assert!(malformed.reason.contains(&vendor));
        let logged = malformed.logged_reason();
        assert!(
            logged.len() <= 1024 + "...[truncated]".len(),
            "{}",
            logged.len()
        );
        assert!(logged.ends_with("...[truncated]"));
    }

    #[test]
    fn a_huge_unknown_field_gets_a_bounded_code_and_keeps_its_name_in_the_message() {
        let key = format!("x\r\n{}", "k".repeat(200_000));
        let parsed = parse(&job(
            json!({"jobId": "j", "vendor": "mimecast", "data": [{"accountCode": "A", key.clone(): 1}]}),
        ))
        .unwrap();
        let error = &parsed.rejected[0].1.errors[0];
        assert_eq!(
            error.code,
            format!("err_validation_x__{}", "k".repeat(MAX_CODE_FIELD_CHARS - 3))
        );
        assert!(
            error.message.contains(&format!("{key:?}")),
            "the body keeps the full name"
        );
    }

    #[test]
    fn a_job_keeps_its_valid_items_beside_invalid_ones() {
        let parsed = parse(&job(json!({"jobId": "j", "vendor": "mimecast", "data": [
            {"accountCode": "A"}, {"accountCode": 5}, {"accountCode": "C"}
        ]})))
        .unwrap();
        assert_eq!(
            parsed.items.iter().map(|i| i.index).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(parsed.rejected[0].0, 1);
    }

    #[test]
    fn pncp_items_are_validated_before_any_call() {
        let check = |item: Value| {
            let parsed = parse(&job(
                json!({"jobId": "j", "vendor": "pncp", "data": [item]}),
            ))
            .unwrap();
            parsed.rejected.first().map(|r| r.1.errors[0].code.clone())
        };
        assert_eq!(
            check(json!({"accountId": "99", "name": "N", "email": "a@example.com"})),
            None
        );
        assert_eq!(
            check(json!({"accountId": "9/9", "name": "N", "email": "a@example.com"})).unwrap(),
            "err_validation_accountId"
        );
        for dots in [".", ".."] {
            assert_eq!(
                check(json!({"accountId": dots, "name": "N", "email": "a@example.com"})).unwrap(),
                "err_validation_accountId"
            );
        }
        assert_eq!(
            check(json!({"accountId": "99", "email": "a@example.com"})).unwrap(),
            "err_validation_name"
        );
        assert_eq!(
            check(json!({"accountId": "99", "name": "N", "email": "x"})).unwrap(),
            "err_validation_email"
        );
        assert_eq!(
            check(
                json!({"accountId": "99", "name": "N", "email": "a@example.com",
                         "permissions": {"reseller": "yes"}})
            )
            .unwrap(),
            "err_validation_permissions"
        );
    }
}
