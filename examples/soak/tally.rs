//! What the soak saw (results, dead letters, the mock's applied counts) turned into its figures.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::Value;

use account_worker::mock_vendor::Vendor;

use crate::jobs::{PlannedItem, PlannedJob};

/// Every result and dead letter read, by jobId.
#[derive(Debug, Default)]
pub struct Seen {
    /// Each result message's body, in arrival order.
    pub results: HashMap<String, Vec<Value>>,
    /// Each dead letter's `x-error-code`.
    pub dead: HashMap<String, Vec<String>>,
    /// Results or dead letters with no jobId the soak published.
    pub strays: usize,
    /// When each jobId's first result or dead letter was read, so an outage run
    /// can tell jobs answered before, during and after the outage apart.
    pub first_answer: HashMap<String, Instant>,
}

impl Seen {
    /// Whether the job has an answer: a result or a dead letter.
    pub fn answered(&self, job: &str) -> bool {
        self.results.contains_key(job) || self.dead.contains_key(job)
    }

    /// Notes that `job` was answered now, if it was not before.
    pub fn note_answer(&mut self, job: &str) {
        if !self.first_answer.contains_key(job) {
            self.first_answer.insert(job.to_owned(), Instant::now());
        }
    }
}

/// The soak's figures. The first four are the promises: each must be empty.
#[derive(Debug, Default)]
pub struct Figures {
    /// Published jobIds with neither a result nor a dead letter.
    pub lost: Vec<String>,
    /// Additive items whose account the mock changed more than once.
    pub applied_twice: Vec<String>,
    /// JobIds with two results whose content differs.
    pub conflicting: Vec<String>,
    /// Items a result lists in `data` that the mock never applied.
    pub succeeded_not_applied: Vec<String>,
    /// Items reported `err_outcome_unknown`, and how many of those the mock did apply.
    pub unknown: usize,
    /// The accounts of those items, so an outage run can tell which of them a
    /// vendor answer that may have applied (a fault) explains.
    pub unknown_accounts: Vec<(Vendor, String)>,
    pub unknown_applied: usize,
    /// Result messages beyond the first for their jobId.
    pub duplicates: usize,
    /// Idempotent items applied more than once (allowed: they are safe to resend).
    pub idempotent_reapplied: usize,
    /// Items reported failed with a code other than `err_outcome_unknown` that the
    /// mock applied anyway (an operator replaying their dead letter would apply them twice).
    pub failed_but_applied: Vec<String>,
    /// Result `data` entries naming no item of their job.
    pub unmatched_data: usize,
    /// Items of an answered job that its result lists neither in `data` nor in `fail`.
    pub items_without_outcome: usize,
    /// Jobs by the status of their first result (`dead letter only` when none).
    pub by_status: BTreeMap<String, usize>,
    /// Dead letters by code.
    pub dead_by_code: BTreeMap<String, usize>,
}

impl Figures {
    /// Whether every promise held.
    pub fn promises_hold(&self) -> bool {
        self.lost.is_empty()
            && self.applied_twice.is_empty()
            && self.conflicting.is_empty()
            && self.succeeded_not_applied.is_empty()
    }
}

/// The account a result's `data` entry is about: Mimecast's `accountCode`, PNCP's
/// `clientAssignedId` (the soak sets it to the account id) or `accountResource`.
fn data_account(vendor: Vendor, entry: &Value) -> Option<String> {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    match vendor {
        Vendor::Mimecast => entry.get("accountCode").and_then(text),
        Vendor::Pncp => entry.get("clientAssignedId").and_then(text).or_else(|| {
            entry
                .pointer("/accountResource/resourceURL")
                .and_then(Value::as_str)
                .and_then(|url| url.strip_prefix("/account/"))
                .map(str::to_owned)
        }),
    }
}

/// The account a result's `fail` entry is about, and its first error code.
fn fail_account(entry: &Value) -> (Option<String>, String) {
    let key = entry.get("key");
    let account = key
        .and_then(|k| k.get("accountCode").or_else(|| k.get("accountId")))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let code = entry
        .pointer("/errors/0/code")
        .and_then(Value::as_str)
        .unwrap_or("(no code)")
        .to_owned();
    (account, code)
}

/// Works out the figures from the published jobs, what was read back, and the
/// mock's count of applications per account.
pub fn figures(
    jobs: &[PlannedJob],
    seen: &Seen,
    applied: impl Fn(Vendor, &str) -> usize,
) -> Figures {
    let mut f = Figures::default();
    for codes in seen.dead.values() {
        for code in codes {
            *f.dead_by_code.entry(code.clone()).or_default() += 1;
        }
    }
    for job in jobs {
        for item in &job.items {
            let count = applied(item.vendor, &item.account);
            if count > 1 && item.additive {
                f.applied_twice.push(item.account.clone());
            } else if count > 1 {
                f.idempotent_reapplied += 1;
            }
        }
        let Some(results) = seen.results.get(&job.id) else {
            if seen.dead.contains_key(&job.id) {
                *f.by_status.entry("dead letter only".into()).or_default() += 1;
            } else {
                f.lost.push(job.id.clone());
            }
            continue;
        };
        f.duplicates += results.len() - 1;
        let first = &results[0];
        if results.iter().any(|other| other != first) {
            f.conflicting.push(job.id.clone());
        }
        let status = first.get("status").and_then(Value::as_str).unwrap_or("?");
        *f.by_status.entry(status.to_owned()).or_default() += 1;
        let mut distinct: Vec<&Value> = Vec::new();
        for result in results {
            if !distinct.contains(&result) {
                distinct.push(result);
            }
        }
        for result in distinct {
            check_result(job, result, &applied, &mut f, std::ptr::eq(result, first));
        }
    }
    f
}

/// Checks one distinct result of `job` against the mock; counts unknown outcomes
/// and missing items for the job's first result only.
fn check_result(
    job: &PlannedJob,
    result: &Value,
    applied: &impl Fn(Vendor, &str) -> usize,
    f: &mut Figures,
    first: bool,
) {
    let entries = |name: &str| {
        result
            .get(name)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let item_of = |account: &str| -> Option<&PlannedItem> {
        job.items.iter().find(|item| item.account == account)
    };
    let mut reported = 0;
    for entry in entries("data") {
        let vendor = job.items[0].vendor;
        match data_account(vendor, &entry).as_deref().and_then(item_of) {
            Some(item) => {
                reported += 1;
                if applied(item.vendor, &item.account) == 0 {
                    f.succeeded_not_applied.push(item.account.clone());
                }
            }
            None => f.unmatched_data += 1,
        }
    }
    for entry in entries("fail") {
        let (account, code) = fail_account(&entry);
        let Some(item) = account.as_deref().and_then(item_of) else {
            continue;
        };
        reported += 1;
        let count = applied(item.vendor, &item.account);
        if code == "err_outcome_unknown" {
            if first {
                f.unknown += 1;
                f.unknown_accounts.push((item.vendor, item.account.clone()));
                f.unknown_applied += usize::from(count > 0);
            }
        } else if count > 0 && first {
            f.failed_but_applied
                .push(format!("{} ({code})", item.account));
        }
    }
    if first {
        f.items_without_outcome += job.items.len().saturating_sub(reported);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(id: &str, items: &[(&str, bool)]) -> PlannedJob {
        PlannedJob {
            id: id.to_owned(),
            body: Vec::new(),
            items: items
                .iter()
                .map(|(account, additive)| PlannedItem {
                    vendor: Vendor::Mimecast,
                    account: (*account).to_owned(),
                    additive: *additive,
                })
                .collect(),
        }
    }

    fn succeeded(id: &str, accounts: &[&str]) -> Value {
        let data: Vec<Value> = accounts.iter().map(|a| json!({"accountCode": a})).collect();
        json!({"jobId": id, "status": "succeeded", "data": data, "fail": [], "attempts": 1})
    }

    fn counts(pairs: &[(&str, usize)]) -> impl Fn(Vendor, &str) -> usize {
        let map: HashMap<String, usize> = pairs.iter().map(|(a, n)| ((*a).into(), *n)).collect();
        move |_, account| map.get(account).copied().unwrap_or(0)
    }

    #[test]
    fn a_clean_run_keeps_every_promise_and_counts_identical_copies_as_duplicates() {
        let jobs = [job("j1", &[("A", true)]), job("j2", &[("B", false)])];
        let mut seen = Seen::default();
        seen.results.insert(
            "j1".into(),
            vec![succeeded("j1", &["A"]), succeeded("j1", &["A"])],
        );
        seen.results
            .insert("j2".into(), vec![succeeded("j2", &["B"])]);
        let f = figures(&jobs, &seen, counts(&[("A", 1), ("B", 2)]));
        assert!(f.promises_hold(), "{f:?}");
        assert_eq!((f.duplicates, f.idempotent_reapplied), (1, 1));
        assert_eq!(f.by_status["succeeded"], 2);
    }

    #[test]
    fn each_broken_promise_is_named() {
        let jobs = [
            job("lost", &[("L", true)]),
            job("twice", &[("T", true)]),
            job("conflict", &[("C", true)]),
            job("phantom", &[("P", false)]),
        ];
        let mut seen = Seen::default();
        seen.results
            .insert("twice".into(), vec![succeeded("twice", &["T"])]);
        let unknown = json!({"jobId": "conflict", "status": "failed", "data": [],
            "fail": [{"key": {"accountCode": "C"}, "errors": [{"code": "err_outcome_unknown"}]}]});
        seen.results.insert(
            "conflict".into(),
            vec![succeeded("conflict", &["C"]), unknown],
        );
        seen.results
            .insert("phantom".into(), vec![succeeded("phantom", &["P"])]);
        let f = figures(&jobs, &seen, counts(&[("T", 2), ("C", 1)]));
        assert_eq!(f.lost, ["lost"]);
        assert_eq!(f.applied_twice, ["T"]);
        assert_eq!(f.conflicting, ["conflict"]);
        assert_eq!(f.succeeded_not_applied, ["P"]);
        assert!(!f.promises_hold());
    }

    #[test]
    fn unknown_outcomes_and_dead_letter_only_jobs_are_counted_not_failed() {
        let jobs = [
            job("u", &[("U", true), ("V", true)]),
            job("d", &[("D", true)]),
        ];
        let mut seen = Seen::default();
        let result = json!({"jobId": "u", "status": "failed", "data": [], "fail": [
            {"key": {"accountCode": "U"}, "errors": [{"code": "err_outcome_unknown"}]},
            {"key": {"accountCode": "V"}, "errors": [{"code": "err_outcome_unknown"}]},
        ]});
        seen.results.insert("u".into(), vec![result]);
        seen.dead
            .insert("d".into(), vec!["err_poison_message".into()]);
        let f = figures(&jobs, &seen, counts(&[("U", 1)]));
        assert!(f.promises_hold(), "{f:?}");
        assert_eq!((f.unknown, f.unknown_applied), (2, 1));
        assert_eq!(f.by_status["dead letter only"], 1);
        assert_eq!(f.dead_by_code["err_poison_message"], 1);
    }

    #[test]
    fn a_pncp_result_names_its_account_by_client_id_or_resource() {
        let by_id = json!({"clientAssignedId": "P1"});
        let by_url = json!({"accountResource": {"resourceURL": "/account/P2"}});
        assert_eq!(data_account(Vendor::Pncp, &by_id).as_deref(), Some("P1"));
        assert_eq!(data_account(Vendor::Pncp, &by_url).as_deref(), Some("P2"));
    }
}
