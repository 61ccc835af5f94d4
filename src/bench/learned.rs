//! The benchmark's cases against vendors that publish no quota and only say
//! 429 past it, and what they print: calls/s, 429s, the share of wasted calls,
//! and how fast the learned rate follows a quota raised mid-run.

use std::time::Duration;

use super::case::{Case, Measurement};
use crate::mock_vendor::{ThrottleMode, Vendor};

/// The concurrency for these cases.
const CONCURRENCY: usize = 16;
/// What the first seconds cost is not counted in the "after 2 s" figures: the
/// worker knows nothing of the quota until the first 429s.
const WARM_UP_MS: u64 = 2000;

/// The cases, built from the benchmark's default worker case.
pub(super) fn cases(worker: fn(&str, usize, usize, u64) -> Case) -> Vec<(&'static str, Case)> {
    let learning = |name: &str, vendor: Vendor, mode: ThrottleMode, rate: u32, seconds: u32| Case {
        vendor,
        vendor_throttle: Some(rate),
        throttle_mode: mode,
        ..worker(name, (rate * seconds) as usize, CONCURRENCY, 0)
    };
    vec![
        (
            "429 only, 10/s",
            learning(
                "learn-429only-10ps",
                Vendor::Mimecast,
                ThrottleMode::QuotaOn429,
                10,
                30,
            ),
        ),
        (
            "429 only, 2/s",
            learning(
                "learn-429only-2ps",
                Vendor::Mimecast,
                ThrottleMode::QuotaOn429,
                2,
                50,
            ),
        ),
        (
            "429 only, 50/s",
            learning(
                "learn-429only-50ps",
                Vendor::Mimecast,
                ThrottleMode::QuotaOn429,
                50,
                30,
            ),
        ),
        (
            "PNCP Retry-After, 10/s",
            learning(
                "learn-pncp-retry-after-10ps",
                Vendor::Pncp,
                ThrottleMode::RetryAfterOnly,
                10,
                30,
            ),
        ),
        (
            "PNCP Retry-After, 2/s",
            learning(
                "learn-pncp-retry-after-2ps",
                Vendor::Pncp,
                ThrottleMode::RetryAfterOnly,
                2,
                50,
            ),
        ),
        (
            "PNCP Retry-After, 50/s",
            learning(
                "learn-pncp-retry-after-50ps",
                Vendor::Pncp,
                ThrottleMode::RetryAfterOnly,
                50,
                30,
            ),
        ),
        (
            "429 only, 10/s then 20/s",
            Case {
                jobs: 10 * 15 + 20 * 35,
                quota_change: Some((Duration::from_secs(15), 20)),
                ..learning(
                    "learn-429only-raise-10-20",
                    Vendor::Mimecast,
                    ThrottleMode::QuotaOn429,
                    10,
                    0,
                )
            },
        ),
    ]
}

/// What one learning case shows.
#[derive(Debug, Clone, PartialEq)]
struct Waste {
    calls: usize,
    refused: usize,
    calls_after_warm_up: usize,
    refused_after_warm_up: usize,
    /// Accepted calls per second from the end of the warm-up to the quota
    /// change (or the last call).
    sustained: f64,
    /// After the quota change: how long until a 1-s window held 90% of the new
    /// limit, and the accepted calls per second from then on.
    recovery: Option<(Duration, f64)>,
}

fn waste(calls: &[(u64, u16)], changed_at_ms: Option<u64>, new_limit: Option<u32>) -> Waste {
    let first = calls.iter().map(|(at, _)| *at).min().unwrap_or(0);
    let warm = first + WARM_UP_MS;
    let refused = calls.iter().filter(|(_, status)| *status == 429).count();
    let after: Vec<_> = calls.iter().filter(|(at, _)| *at >= warm).collect();
    let mut accepted: Vec<u64> = calls
        .iter()
        .filter(|(_, status)| *status != 429)
        .map(|(at, _)| *at)
        .collect();
    accepted.sort_unstable();
    let until = changed_at_ms.unwrap_or_else(|| accepted.last().copied().unwrap_or(warm));
    let recovery = changed_at_ms.zip(new_limit).and_then(|(changed, limit)| {
        let target = (f64::from(limit) * 0.9).ceil() as usize;
        let since: Vec<u64> = accepted
            .iter()
            .copied()
            .filter(|at| *at >= changed)
            .collect();
        let reached = (0..since.len()).find_map(|end| {
            let window = since[..=end]
                .iter()
                .rev()
                .take_while(|at| **at + 1000 > since[end])
                .count();
            (window >= target).then_some(since[end])
        })?;
        let last = *since.last()?;
        let rate = rate_between(&since, reached, last);
        Some((Duration::from_millis(reached - changed), rate))
    });
    Waste {
        calls: calls.len(),
        refused,
        calls_after_warm_up: after.len(),
        refused_after_warm_up: after.iter().filter(|(_, status)| *status == 429).count(),
        sustained: rate_between(&accepted, warm, until),
        recovery,
    }
}

/// Calls per second among `times` (sorted, ms) in `[from, to]`.
fn rate_between(times: &[u64], from: u64, to: u64) -> f64 {
    let n = times.iter().filter(|at| (from..=to).contains(*at)).count();
    let span = to.saturating_sub(from).max(1) as f64 / 1000.0;
    n.saturating_sub(1) as f64 / span
}

/// Prints the learning cases' table and the figures.
pub(super) fn print(rows: &[(&str, Case, Measurement)]) {
    let learning: Vec<_> = rows
        .iter()
        .filter(|(_, case, _)| case.throttle_mode != ThrottleMode::Headers)
        .collect();
    if learning.is_empty() {
        return;
    }
    println!("\nvendors that publish no quota (learned rate, concurrency {CONCURRENCY}):\n");
    println!("| vendor says | limit | jobs | calls | 429s | wasted | 429s after 2 s | sustained calls/s after 2 s | after the raise |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (group, case, m) in learning {
        let limit = case.vendor_throttle.unwrap_or(0);
        let new_limit = case.quota_change.map(|(_, rate)| rate);
        let w = waste(&m.calls, m.quota_changed_at_ms, new_limit);
        let limit_text = match case.quota_change {
            Some((after, rate)) => format!("{limit}/s, {rate}/s after {}s", after.as_secs()),
            None => format!("{limit}/s"),
        };
        let raise = match (w.recovery, new_limit) {
            (Some((took, rate)), Some(new)) => format!(
                "90% of {new}/s after {:.1} s, then {rate:.1} calls/s ({:.0}%)",
                took.as_secs_f64(),
                rate / f64::from(new) * 100.0
            ),
            (None, Some(new)) => format!("never reached 90% of {new}/s"),
            _ => "-".to_owned(),
        };
        println!(
            "| {group} | {limit_text} | {} | {} | {} | {:.1}% | {} of {} ({:.1}%) | {:.2} ({:.0}% of {limit}/s) | {raise} |",
            m.jobs,
            w.calls,
            w.refused,
            w.refused as f64 / w.calls.max(1) as f64 * 100.0,
            w.refused_after_warm_up,
            w.calls_after_warm_up,
            w.refused_after_warm_up as f64 / w.calls_after_warm_up.max(1) as f64 * 100.0,
            w.sustained,
            w.sustained / f64::from(limit.max(1)) * 100.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waste_counts_429s_after_the_warm_up_and_the_time_to_follow_a_raise() {
        // 0–3 s at 10/s with one 429 at 2.5 s; from 3 s, 20/s.
        let mut calls: Vec<(u64, u16)> = (0..30).map(|i| (i * 100, 200)).collect();
        calls.push((2550, 429));
        calls.extend((0..40).map(|i| (3000 + i * 50, 200)));
        let w = waste(&calls, Some(3000), Some(20));
        assert_eq!((w.calls, w.refused), (71, 1));
        assert_eq!((w.calls_after_warm_up, w.refused_after_warm_up), (51, 1));
        assert!((w.sustained - 10.0).abs() < 0.5, "{}", w.sustained);
        let (took, rate) = w.recovery.unwrap();
        assert_eq!(took, Duration::from_millis(850));
        assert!((rate - 20.0).abs() < 1.0, "{rate}");
    }
}
