//! Mimecast update-account items: validation, applying them to accounts, and their `data`/`fail` entries.

use serde_json::{json, Map, Value};

use super::model::{MimecastAccount, Vendor};
use super::state::Inner;

/// Account codes with this prefix do not exist, so tests can provoke `err_account_not_found`.
const MISSING_PREFIX: &str = "MISSING";

/// The `data` array of an update-account body; `None` when the body has none.
pub(super) fn data_items(body: &Value) -> Option<&[Value]> {
    body.get("data")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
}

/// Per-item results of one call, in item order.
#[derive(Debug, Default)]
pub(super) struct ItemsOutcome {
    pub(super) data: Vec<Value>,
    pub(super) fail: Vec<Value>,
    pub(super) applied: bool,
}

/// Applies each valid item to its account, as if each were sent alone.
pub(super) fn apply_items(inner: &mut Inner, items: &[Value]) -> ItemsOutcome {
    let mut outcome = ItemsOutcome::default();
    for item in items {
        let update = match Update::parse(item) {
            Ok(update) => update,
            Err((code, message)) => {
                outcome.fail.push(fail_entry(item, code, &message, false));
                continue;
            }
        };
        if update.code.starts_with(MISSING_PREFIX) {
            let message = format!("Account {} was not found", update.code);
            let entry = fail_entry(item, "err_account_not_found", &message, false);
            outcome.fail.push(entry);
            continue;
        }
        if update.changes_nothing() {
            // Only the account code: a read, as the vendor answers it (the
            // worker's probe of a held vendor). Counted as a request, not a change.
            let account = inner.mimecast_accounts.get(update.code).cloned();
            let account = account.unwrap_or_else(|| MimecastAccount::new(update.code));
            outcome.data.push(data_entry(&account));
            continue;
        }
        let account = inner
            .mimecast_accounts
            .entry(update.code.to_owned())
            .or_insert_with(|| MimecastAccount::new(update.code));
        update.apply_to(account);
        outcome.data.push(data_entry(account));
        inner.count_applied(Vendor::Mimecast, update.code);
        outcome.applied = true;
    }
    outcome
}

/// Every item in `fail` with a retryable temporary failure (the `RetryableFail` fault).
pub(super) fn retryable_failures(items: &[Value]) -> Vec<Value> {
    items
        .iter()
        .map(|item| {
            let message = "Temporary failure, please retry";
            fail_entry(item, "err_temporary_failure", message, true)
        })
        .collect()
}

fn fail_entry(item: &Value, code: &str, message: &str, retryable: bool) -> Value {
    json!({
        "key": item,
        "errors": [{"code": code, "message": message, "retryable": retryable}],
    })
}

/// The vendor's `data` element for an updated account.
fn data_entry(account: &MimecastAccount) -> Value {
    let domain = format!("{}.mimecast-mock.test", account.account_code.to_lowercase());
    let admin_email = account
        .contact_email
        .clone()
        .unwrap_or_else(|| format!("admin@{domain}"));
    let packages: Vec<String> = account.products.iter().map(i64::to_string).collect();
    json!({
        "accountCode": account.account_code,
        "accountName": account.account_name.clone().unwrap_or_default(),
        "domain": domain,
        "primaryDomain": domain,
        "mimecastId": format!("mc-{}", account.account_code),
        "adminEmail": admin_email,
        "userCount": account.user_count,
        "umbrellaAccounts": [],
        "packages": packages,
    })
}

/// One item's requested change, validated before anything is touched.
#[derive(Debug)]
struct Update<'a> {
    code: &'a str,
    account_name: Option<&'a str>,
    contact_name: Option<&'a str>,
    contact_email: Option<&'a str>,
    telephone: Option<&'a str>,
    number_of_users: Option<i64>,
    products: Option<Vec<i64>>,
}

type ItemError = (&'static str, String);

impl<'a> Update<'a> {
    fn parse(item: &'a Value) -> Result<Self, ItemError> {
        let Some(fields) = item.as_object() else {
            return Err(("err_validation_null", "accountCode is required".into()));
        };
        let code = match fields.get("accountCode") {
            Some(Value::String(code)) if code.is_empty() => {
                return Err((
                    "err_validation_blank",
                    "accountCode must not be blank".into(),
                ));
            }
            Some(Value::String(code)) => code.as_str(),
            _ => return Err(("err_validation_null", "accountCode is required".into())),
        };
        let number_of_users = match present(fields, "numberOfUsers") {
            None => None,
            Some(value) => Some(value.as_i64().ok_or_else(|| type_error("numberOfUsers"))?),
        };
        let products = match present(fields, "products") {
            None => None,
            Some(value) => Some(
                value
                    .as_array()
                    .and_then(|ids| ids.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| type_error("products"))?,
            ),
        };
        Ok(Self {
            code,
            account_name: text(fields, "accountName")?,
            contact_name: text(fields, "contactName")?,
            contact_email: text(fields, "contactEmail")?,
            telephone: text(fields, "telephone")?,
            number_of_users,
            products,
        })
    }

    /// Whether the item names only its account: applying it would change nothing.
    fn changes_nothing(&self) -> bool {
        self.account_name.is_none()
            && self.contact_name.is_none()
            && self.contact_email.is_none()
            && self.telephone.is_none()
            && self.number_of_users.is_none()
            && self.products.is_none()
    }

    fn apply_to(&self, account: &mut MimecastAccount) {
        let set = |slot: &mut Option<String>, value: Option<&str>| {
            if let Some(value) = value {
                *slot = Some(value.to_owned());
            }
        };
        set(&mut account.account_name, self.account_name);
        set(&mut account.contact_name, self.contact_name);
        set(&mut account.contact_email, self.contact_email);
        set(&mut account.telephone, self.telephone);
        if let Some(added) = self.number_of_users {
            account.user_count = account.user_count.saturating_add(added);
        }
        if let Some(products) = &self.products {
            account.products.clone_from(products);
        }
    }
}

/// A field's value unless absent or `null`.
fn present<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|value| !value.is_null())
}

fn text<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ItemError> {
    match present(fields, name) {
        None => Ok(None),
        Some(value) => value.as_str().map(Some).ok_or_else(|| type_error(name)),
    }
}

fn type_error(field: &str) -> ItemError {
    (
        "err_validation_invalid_type",
        format!("{field} has the wrong type"),
    )
}
