//! The soak's printed table, the sequences behind any broken promise, and the checks
//! that the soak itself did its chaos.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use account_worker::mock_vendor::{RecordedRequest, Vendor};

use crate::chaos::Chaos;
use crate::jobs::PlannedJob;
use crate::tally::{Figures, Seen};

/// How the run went, besides the figures.
#[derive(Debug)]
pub struct Summary {
    pub jobs: usize,
    pub producer_retries: usize,
    pub elapsed: Duration,
    pub all_answered_at: Option<Duration>,
    pub quiescent: bool,
    pub last_counts: HashMap<String, (u64, u64)>,
    pub exits: Vec<String>,
    pub requests: Vec<RecordedRequest>,
}

/// Why the run does not prove what it should, if it does not.
/// Only the chaos the run was asked for is checked: an outage run, for one,
/// closes no connection and kills no worker unless told to.
pub fn harness_problems(
    summary: &Summary,
    chaos: &Chaos,
    close_every: Option<Duration>,
    kill: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !chaos.close_errors.is_empty() {
        problems.push(format!(
            "{} connection-close rounds failed: {}",
            chaos.close_errors.len(),
            chaos.close_errors[0]
        ));
    }
    if let Some(every) = close_every.filter(|_| chaos.connections_closed == 0) {
        problems.push(format!(
            "no worker connection was closed (the run took {:.0?}, closes every {every:?}); run more jobs or a shorter --close-every",
            summary.elapsed
        ));
    }
    if kill && chaos.killed_at.is_none() {
        problems.push("no worker was SIGKILLed".to_owned());
    }
    problems
}

/// The table, then details of every broken promise (at most ten of each).
pub fn render(
    summary: &Summary,
    f: &Figures,
    chaos: &Chaos,
    seen: &Seen,
    jobs: &[PlannedJob],
) -> String {
    let mut out = String::new();
    let secs = summary
        .all_answered_at
        .unwrap_or(summary.elapsed)
        .as_secs_f64();
    let answered = summary.jobs - f.lost.len();
    let faults = fault_counts(&summary.requests);
    let faulted: usize = faults.values().sum();
    let row = |out: &mut String, name: &str, value: String| {
        let _ = writeln!(out, "  {name:<48} {value}");
    };
    let _ = writeln!(out, "\n==> soak figures");
    row(&mut out, "jobs lost", f.lost.len().to_string());
    row(
        &mut out,
        "deltas applied twice",
        f.applied_twice.len().to_string(),
    );
    row(
        &mut out,
        "jobIds with two different results",
        f.conflicting.len().to_string(),
    );
    row(
        &mut out,
        "items reported succeeded but not applied",
        f.succeeded_not_applied.len().to_string(),
    );
    row(
        &mut out,
        "unknown outcomes (items, of which applied)",
        format!("{} ({})", f.unknown, f.unknown_applied),
    );
    row(
        &mut out,
        "duplicate result messages",
        f.duplicates.to_string(),
    );
    row(
        &mut out,
        "jobs/s",
        format!(
            "{:.0} ({answered} jobs answered in {secs:.1} s)",
            answered as f64 / secs.max(0.001)
        ),
    );
    let _ = writeln!(out, "\n==> also seen");
    row(
        &mut out,
        "jobs published (+ producer retries)",
        format!("{} (+{})", summary.jobs, summary.producer_retries),
    );
    row(
        &mut out,
        "jobs by first result",
        format!("{:?}", f.by_status),
    );
    row(
        &mut out,
        "dead letters by code",
        format!("{:?}", f.dead_by_code),
    );
    row(
        &mut out,
        "items failed (not unknown) but applied",
        f.failed_but_applied.len().to_string(),
    );
    row(
        &mut out,
        "idempotent items applied more than once",
        f.idempotent_reapplied.to_string(),
    );
    row(
        &mut out,
        "result data naming no item / items without outcome",
        format!("{} / {}", f.unmatched_data, f.items_without_outcome),
    );
    row(
        &mut out,
        "stray results or dead letters",
        seen.strays.to_string(),
    );
    row(
        &mut out,
        "vendor requests (faulted)",
        format!("{} ({faulted}: {faults:?})", summary.requests.len()),
    );
    row(
        &mut out,
        "connection closes (rounds)",
        format!(
            "{} ({}, {} failed)",
            chaos.connections_closed,
            chaos.close_rounds,
            chaos.close_errors.len()
        ),
    );
    row(
        &mut out,
        "worker SIGKILLed and restarted at",
        chaos
            .killed_at
            .map_or("never".to_owned(), |t| format!("{:.1} s", t.as_secs_f64())),
    );
    row(
        &mut out,
        "workers exiting by themselves",
        format!("{:?}", chaos.unexpected_exits),
    );
    row(
        &mut out,
        "quiescent at the end",
        if summary.quiescent {
            "yes".to_owned()
        } else {
            format!("no: {:?}", summary.last_counts)
        },
    );
    row(
        &mut out,
        "worker exits at the end",
        summary.exits.join(", "),
    );
    let verdict = if f.promises_hold() {
        "PASS: every promise held"
    } else {
        "FAIL: a promise was broken"
    };
    let _ = writeln!(out, "\n{verdict}");

    let details: [(&str, &Vec<String>); 5] = [
        ("job lost", &f.lost),
        ("delta applied twice", &f.applied_twice),
        ("jobId with two different results", &f.conflicting),
        (
            "item reported succeeded but not applied",
            &f.succeeded_not_applied,
        ),
        ("item reported failed but applied", &f.failed_but_applied),
    ];
    for (what, list) in details {
        for key in list.iter().take(10) {
            let _ = writeln!(out, "\n--- {what}: {key}");
            explain(&mut out, key, summary, seen, jobs);
        }
    }
    out
}

/// The job a key (a jobId or an account) belongs to, its results, and every vendor
/// request that touched its accounts, in order.
fn explain(out: &mut String, key: &str, summary: &Summary, seen: &Seen, jobs: &[PlannedJob]) {
    let account = key.split(' ').next().unwrap_or(key);
    let Some(job) = jobs
        .iter()
        .find(|job| job.id == key || job.items.iter().any(|item| item.account == account))
    else {
        return;
    };
    let _ = writeln!(
        out,
        "    job {}: {}",
        job.id,
        String::from_utf8_lossy(&job.body)
    );
    for result in seen.results.get(&job.id).into_iter().flatten() {
        let _ = writeln!(out, "    result: {result}");
    }
    for code in seen.dead.get(&job.id).into_iter().flatten() {
        let _ = writeln!(out, "    dead letter: {code}");
    }
    for request in &summary.requests {
        let touches = job
            .items
            .iter()
            .any(|item| touches(request, item.vendor, &item.account));
        if touches {
            let _ = writeln!(
                out,
                "    vendor #{} at {} ms: {} {} req-id {:?} fault {:?} -> status {} applied {}",
                request.seq,
                request.at_ms,
                request.method,
                request.path,
                request.request_id,
                request.fault,
                request.status,
                request.applied
            );
        }
    }
}

/// Whether `request` is a call about `account` of `vendor`.
pub fn touches(request: &RecordedRequest, vendor: Vendor, account: &str) -> bool {
    if request.vendor != vendor {
        return false;
    }
    match vendor {
        Vendor::Pncp => request.path.ends_with(&format!("/account/{account}")),
        Vendor::Mimecast => request
            .body
            .get("data")
            .and_then(Value::as_array)
            .is_some_and(|items| {
                items
                    .iter()
                    .any(|i| i.get("accountCode").and_then(Value::as_str) == Some(account))
            }),
    }
}

fn fault_counts(requests: &[RecordedRequest]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in requests {
        if let Some(fault) = &request.fault {
            *counts.entry(fault.clone()).or_default() += 1;
        }
    }
    counts
}
