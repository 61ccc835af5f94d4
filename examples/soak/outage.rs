//! The soak's outage mode: one vendor fully down for a long stretch while the
//! other keeps answering, and the figures that show how the held jobs came through.
//!
//! The promises of an outage run, on top of the soak's own: every held job is
//! answered once the vendor is back, no delivery reaches `MAX_DELIVERIES`
//! (`err_poison_message`), no job spends its attempts against the outage
//! (`err_retries_exhausted`), no item ends `err_outcome_unknown` unless one of
//! its calls was answered by a fault (a 5xx may have been executed: that is the
//! worker's rule, not a failure; anything else, such as a channel the consumer
//! timeout closed, is), and the other vendor's jobs are answered during the outage.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use account_worker::mock_vendor::{MockVendor, RecordedRequest, Vendor, OUTAGE_FAULT};

use crate::jobs::PlannedJob;
use crate::rabbit::PublishLog;
use crate::scrape::Counters;
use crate::tally::{Figures, Seen};

/// What the run asks for.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub vendor: Vendor,
    /// The status every call to the vendor answers meanwhile.
    pub status: u16,
    /// From the start of publishing to the start of the outage.
    pub after: Duration,
    pub length: Duration,
}

/// When the outage really started and ended, and how much had been published by its end.
#[derive(Debug, Default)]
pub struct Timeline {
    pub started: Option<Instant>,
    pub ended: Option<Instant>,
    /// Messages published (positions in the publishing order) when it ended.
    pub published_at_end: usize,
}

/// Turns the outage on after `plan.after`, off after `plan.length`, and notes the
/// times. Stopped early (the run failed or was interrupted), it ends the outage
/// at once so the mock is never left down.
pub async fn drive(
    mock: MockVendor,
    plan: Plan,
    timeline: Arc<Mutex<Timeline>>,
    published: Arc<PublishLog>,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(plan.after) => {}
    }
    mock.set_outage(plan.vendor, Some(plan.status));
    lock(&timeline).started = Some(Instant::now());
    println!(
        "  outage of {} started (every call answers {})",
        name(plan.vendor),
        plan.status
    );
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(plan.length) => {}
    }
    mock.set_outage(plan.vendor, None);
    let mut timeline = lock(&timeline);
    timeline.ended = Some(Instant::now());
    timeline.published_at_end = published.count.load(Ordering::SeqCst);
    println!("  outage of {} ended", name(plan.vendor));
}

/// Whether the outage has run its course.
pub fn ended(timeline: &Mutex<Timeline>) -> bool {
    lock(timeline).ended.is_some()
}

/// Locks the timeline; a panic elsewhere leaves its plain data usable.
pub fn lock(timeline: &Mutex<Timeline>) -> std::sync::MutexGuard<'_, Timeline> {
    timeline.lock().unwrap_or_else(PoisonError::into_inner)
}

fn name(vendor: Vendor) -> &'static str {
    match vendor {
        Vendor::Mimecast => "mimecast",
        Vendor::Pncp => "pncp",
    }
}

/// Jobs of one vendor by when their first answer was read, and their
/// publish-to-answer latencies in each phase.
#[derive(Debug, Default, Clone)]
pub struct Phases {
    pub before: usize,
    pub during: usize,
    pub after: usize,
    pub unanswered: usize,
    pub latencies: [Vec<Duration>; 3],
}

/// p50 / p99 / max of `latencies` in seconds, or `-` when there are none.
fn spread(latencies: &[Duration]) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = |q: f64| {
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).map_or(0.0, Duration::as_secs_f64)
    };
    if sorted.is_empty() {
        return "-".to_owned();
    }
    format!("{:.2} / {:.2} / {:.2}", at(0.5), at(0.99), at(1.0))
}

/// The outage run's own figures.
#[derive(Debug, Default)]
pub struct OutageFigures {
    pub phases: BTreeMap<&'static str, Phases>,
    /// Jobs of the held vendor published by the end of the outage and unanswered at it.
    pub backlog_at_end: usize,
    /// From the end of the outage to the last of that backlog answered.
    pub backlog_drained_in: Option<Duration>,
    /// From the end of the outage to every job answered.
    pub all_answered_in: Option<Duration>,
    /// `err_outcome_unknown` items one of whose calls met a fault (outage or random).
    pub unknown_explained: usize,
    /// `err_outcome_unknown` items no fault explains: every one is a broken promise.
    pub unknown_unexplained: Vec<String>,
    /// Calls the outage answered.
    pub outage_answers: usize,
    /// Per worker: the counters it showed last.
    pub counters: Vec<Option<Counters>>,
}

impl OutageFigures {
    /// What an outage run must not show, in words; empty when it passed.
    pub fn broken(&self, plan: &Plan, f: &Figures) -> Vec<String> {
        let mut broken = Vec::new();
        for code in ["err_poison_message", "err_retries_exhausted"] {
            if let Some(n) = f.dead_by_code.get(code) {
                broken.push(format!("{n} dead letters {code}"));
            }
        }
        if !self.unknown_unexplained.is_empty() {
            broken.push(format!(
                "{} err_outcome_unknown items with no faulted call (e.g. {})",
                self.unknown_unexplained.len(),
                self.unknown_unexplained[0]
            ));
        }
        let other = match plan.vendor {
            Vendor::Mimecast => "pncp",
            Vendor::Pncp => "mimecast",
        };
        if self.phases.get(other).is_none_or(|p| p.during == 0) {
            broken.push(format!("no {other} job was answered during the outage"));
        }
        if self.phases.values().any(|p| p.unanswered > 0) {
            broken.push("jobs left unanswered".to_owned());
        }
        broken
    }
}

/// What the run published, read and recorded: the outage figures' inputs.
#[derive(Debug)]
pub struct Evidence<'a> {
    pub jobs: &'a [PlannedJob],
    /// Indexes into `jobs` in publishing order (producer retries included).
    pub order: &'a [usize],
    pub published: &'a PublishLog,
    pub seen: &'a Seen,
    pub figures: &'a Figures,
    pub requests: &'a [RecordedRequest],
}

/// Works out the outage figures from what was published, read and recorded.
pub fn figures(
    evidence: &Evidence<'_>,
    plan: &Plan,
    timeline: &Timeline,
    touches: impl Fn(&RecordedRequest, Vendor, &str) -> bool,
) -> OutageFigures {
    let Evidence {
        jobs,
        order,
        published,
        seen,
        figures: f,
        requests,
    } = *evidence;
    let mut out = OutageFigures::default();
    let (start, end) = (timeline.started, timeline.ended);
    let sent = published
        .first_at
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for job in jobs {
        let vendor = job.items.first().map_or(Vendor::Mimecast, |i| i.vendor);
        let phases = out.phases.entry(name(vendor)).or_default();
        let Some(&at) = seen.first_answer.get(&job.id) else {
            phases.unanswered += 1;
            continue;
        };
        let phase = if start.is_none_or(|s| at < s) {
            phases.before += 1;
            0
        } else if end.is_none_or(|e| at < e) {
            phases.during += 1;
            1
        } else {
            phases.after += 1;
            2
        };
        if let Some(&sent) = sent.get(&job.id) {
            phases.latencies[phase].push(at.saturating_duration_since(sent));
        }
    }
    drop(sent);
    if let Some(end) = end {
        let published: HashSet<usize> = order[..timeline.published_at_end.min(order.len())]
            .iter()
            .copied()
            .collect();
        let mut last = None;
        for &i in &published {
            let job = &jobs[i];
            if job.items.first().map(|item| item.vendor) != Some(plan.vendor) {
                continue;
            }
            match seen.first_answer.get(&job.id) {
                Some(&at) if at < end => {}
                Some(&at) => {
                    out.backlog_at_end += 1;
                    last = last.max(Some(at));
                }
                None => out.backlog_at_end += 1,
            }
        }
        out.backlog_drained_in = last.map(|at| at.duration_since(end));
        let all_answered = jobs
            .iter()
            .all(|job| seen.first_answer.contains_key(&job.id));
        if all_answered {
            out.all_answered_in = seen
                .first_answer
                .values()
                .max()
                .map(|at| at.saturating_duration_since(end));
        }
    }
    for (vendor, account) in &f.unknown_accounts {
        let faulted = requests
            .iter()
            .any(|r| r.fault.is_some() && touches(r, *vendor, account));
        if faulted {
            out.unknown_explained += 1;
        } else {
            out.unknown_unexplained.push(account.clone());
        }
    }
    out.outage_answers = requests
        .iter()
        .filter(|r| r.fault.as_deref() == Some(OUTAGE_FAULT))
        .count();
    out
}

/// The outage section of the report.
pub fn render(out: &mut String, plan: &Plan, o: &OutageFigures, consumer_timeout: &str) {
    let row = |out: &mut String, name: &str, value: String| {
        let _ = writeln!(out, "  {name:<48} {value}");
    };
    let _ = writeln!(
        out,
        "\n==> outage of {} ({} for {:?}, from {:?} after publishing began; consumer_timeout {consumer_timeout})",
        name(plan.vendor),
        plan.status,
        plan.length,
        plan.after
    );
    for (vendor, p) in &o.phases {
        row(
            out,
            &format!("{vendor} jobs answered before / during / after"),
            format!(
                "{} / {} / {} ({} unanswered)",
                p.before, p.during, p.after, p.unanswered
            ),
        );
        for (phase, latencies) in ["before", "during", "after"].iter().zip(&p.latencies) {
            row(
                out,
                &format!("  publish to answer, {phase} (p50 / p99 / max s)"),
                spread(latencies),
            );
        }
    }
    row(
        out,
        "held backlog at the outage end (published, unanswered)",
        o.backlog_at_end.to_string(),
    );
    let secs =
        |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
    row(
        out,
        "from the outage end to that backlog answered",
        secs(o.backlog_drained_in),
    );
    row(
        out,
        "from the outage end to every job answered",
        secs(o.all_answered_in),
    );
    row(
        out,
        "calls answered by the outage",
        o.outage_answers.to_string(),
    );
    row(
        out,
        "unknown items explained by a fault / not",
        format!("{} / {}", o.unknown_explained, o.unknown_unexplained.len()),
    );
    let counter = |pick: fn(&Counters) -> u64| {
        o.counters
            .iter()
            .map(|c| {
                c.as_ref()
                    .map_or("no answer".to_owned(), |c| pick(c).to_string())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    row(
        out,
        "held deliveries requeued (per worker)",
        counter(|c| c.held_requeued),
    );
    row(
        out,
        "broker reconnects (per worker)",
        counter(|c| c.broker_reconnects),
    );
}
