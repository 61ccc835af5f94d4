//! `account-worker bench`: end-to-end throughput, vendor calls, CPU and memory of
//! the worker against a real RabbitMQ and the mock vendor, each case next to a
//! naive consumer and the broker's own ceiling measured in the same run.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Settings;
use crate::mock_vendor::{MockVendor, MockVendorConfig, ThrottleMode, Vendor};

pub mod baselines;
mod case;
mod chart;
mod learned;
mod procstat;

use case::{Case, Consumer, Measurement};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Jobs per unthrottled case (rate-limited and naive cases use fewer, so each
    /// case takes about 20 s).
    pub jobs: usize,
    /// Jobs published before the worker starts, for the memory-under-backlog case (0: skip).
    pub backlog: usize,
    /// Where the throughput-versus-concurrency chart is written.
    pub chart: PathBuf,
    /// Only the cases whose name contains this text.
    pub only: Option<String>,
}

fn worker(name: &str, jobs: usize, concurrency: usize, latency_ms: u64) -> Case {
    Case {
        name: name.to_owned(),
        consumer: Consumer::Worker,
        jobs,
        concurrency,
        latency: Duration::from_millis(latency_ms),
        rate_limit: None,
        batch_max: 1,
        vendor: Vendor::Mimecast,
        vendor_throttle: None,
        throttle_mode: ThrottleMode::Headers,
        quota_change: None,
        backlog: false,
        items_per_job: 1,
        steady_rate: None,
    }
}

/// Rates below every consumer's capacity in its case, for latency at a steady load.
const STEADY_0MS: u32 = 2_000;
const STEADY_50MS_C64: u32 = 600;

fn cases(options: &BenchOptions) -> Vec<(&'static str, Case)> {
    let n = options.jobs;
    // Each case is bounded to about 20 s of its expected rate.
    let bounded = |rate: f64| n.min((rate * 20.0) as usize).max(50);
    let mut list = vec![
        (
            "0 ms",
            Case {
                consumer: Consumer::Passthrough,
                ..worker("ceiling-0ms-c64", n, 64, 0)
            },
        ),
        (
            "0 ms",
            Case {
                consumer: Consumer::PassthroughLedger,
                ..worker("ceiling-ledger-0ms-c64", n, 64, 0)
            },
        ),
        (
            "0 ms",
            Case {
                consumer: Consumer::PassthroughCall,
                ..worker("ceiling-call-0ms-c64", n, 64, 0)
            },
        ),
        ("0 ms", worker("worker-0ms-c64", n, 64, 0)),
        (
            "0 ms",
            Case {
                consumer: Consumer::Naive,
                ..worker("naive-0ms", n.min(2000), 1, 0)
            },
        ),
        (
            "0 ms",
            Case {
                items_per_job: 10,
                ..worker("worker-0ms-c64-10items", n / 4, 64, 0)
            },
        ),
        (
            "0 ms",
            Case {
                consumer: Consumer::Passthrough,
                steady_rate: Some(STEADY_0MS),
                ..worker("ceiling-0ms-c64-steady", n / 2, 64, 0)
            },
        ),
        (
            "0 ms",
            Case {
                steady_rate: Some(STEADY_0MS),
                ..worker("worker-0ms-c64-steady", n / 2, 64, 0)
            },
        ),
        (
            "50 ms",
            worker("worker-50ms-c16", bounded(16.0 / 0.05), 16, 50),
        ),
        (
            "50 ms",
            worker("worker-50ms-c64", bounded(64.0 / 0.05), 64, 50),
        ),
        (
            "50 ms",
            worker("worker-50ms-c256", bounded(256.0 / 0.05), 256, 50),
        ),
        (
            "50 ms",
            Case {
                steady_rate: Some(STEADY_50MS_C64),
                ..worker(
                    "worker-50ms-c64-steady",
                    n.min(STEADY_50MS_C64 as usize * 10),
                    64,
                    50,
                )
            },
        ),
        (
            "50 ms",
            Case {
                consumer: Consumer::Naive,
                ..worker("naive-50ms", bounded(20.0).min(200), 1, 50)
            },
        ),
        (
            "20/s",
            Case {
                rate_limit: Some("20/s"),
                ..worker("worker-20ps-c64", bounded(20.0), 64, 0)
            },
        ),
        (
            "20/s",
            Case {
                rate_limit: Some("20/s"),
                batch_max: 10,
                ..worker("worker-20ps-batch10", bounded(200.0), 64, 0)
            },
        ),
        (
            "429 at 10/s",
            Case {
                vendor_throttle: Some(10),
                ..worker("worker-vendor-429-10ps", bounded(10.0).min(200), 64, 0)
            },
        ),
    ];
    list.extend(learned::cases(worker));
    if options.backlog > 0 {
        list.push((
            "backlog",
            Case {
                backlog: true,
                ..worker("worker-backlog-c64", options.backlog, 64, 0)
            },
        ));
    }
    list
}

/// Runs every case, prints the table, writes the chart. The settings give the broker.
pub async fn run(settings: &Settings, options: BenchOptions) -> Result<(), String> {
    let mock = MockVendor::start(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        MockVendorConfig::demo(),
    )
    .await
    .map_err(|e| format!("cannot start the mock vendor: {e}"))?;
    let work = std::env::temp_dir().join(format!("account-worker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;

    let mut rows: Vec<(&str, Case, Measurement)> = Vec::new();
    let selected = cases(&options).into_iter().filter(|(_, case)| {
        options
            .only
            .as_ref()
            .is_none_or(|only| case.name.contains(only.as_str()))
    });
    for (group, case) in selected {
        eprintln!("bench: {} ({} jobs)…", case.name, case.jobs);
        let measured = case::run(settings, &mock, &case, &work).await?;
        eprintln!("bench:   {:.0} jobs/s", measured.jobs_per_second());
        rows.push((group, case, measured));
    }
    let _ = std::fs::remove_dir_all(&work);
    print_table(&rows);
    print_ratios(&rows);
    learned::print(&rows);
    let svg = throughput_chart(&rows);
    std::fs::write(&options.chart, svg)
        .map_err(|e| format!("cannot write {}: {e}", options.chart.display()))?;
    println!("\nchart written to {}", options.chart.display());
    Ok(())
}

fn consumer_name(case: &Case) -> &'static str {
    match case.consumer {
        Consumer::Worker => "worker",
        Consumer::Naive => "naive baseline",
        Consumer::Passthrough => "broker ceiling",
        Consumer::PassthroughLedger => "ceiling + ledger writes",
        Consumer::PassthroughCall => "ceiling + vendor call",
    }
}

fn print_table(rows: &[(&str, Case, Measurement)]) {
    println!("\n| vendor | consumer | conc. | limit / batch | jobs | jobs/s | vendor calls/s (peak 1 s) | items/s | 429s | CPU s / 1k jobs | peak RSS MB | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (group, case, m) in rows {
        let limit = match (case.rate_limit, case.batch_max, case.steady_rate) {
            (Some(rate), 1, _) => rate.to_owned(),
            (Some(rate), batch, _) => format!("{rate}, batch {batch}"),
            (None, _, Some(steady)) => format!("steady {steady}/s"),
            (None, _, None) if case.backlog => format!("backlog {}", case.jobs),
            _ => "-".to_owned(),
        };
        let group = match case.items_per_job {
            1 => group.to_string(),
            items => format!("{group}, {items} items/job"),
        };
        println!(
            "| {group} | {} | {} | {limit} | {} | {:.0} | {:.1} ({}) | {:.1} | {} | {:.3} | {:.1} | {:.0} | {:.0} |",
            consumer_name(case),
            if case.consumer == Consumer::Naive { 1 } else { case.concurrency },
            m.jobs,
            m.jobs_per_second(),
            m.calls_per_second(),
            m.peak_calls_per_second,
            m.items_per_second(),
            m.throttled,
            m.cpu_per_thousand(),
            m.peak_rss_mb,
            m.p50.as_secs_f64() * 1000.0,
            m.p99.as_secs_f64() * 1000.0,
        );
    }
}

fn find<'a>(rows: &'a [(&str, Case, Measurement)], name: &str) -> Option<&'a Measurement> {
    rows.iter()
        .find(|(_, c, _)| c.name == name)
        .map(|(_, _, m)| m)
}

fn print_ratios(rows: &[(&str, Case, Measurement)]) {
    println!("\nratios (the figures that matter; absolute times vary across machines):");
    let ceiling = find(rows, "ceiling-0ms-c64").map(Measurement::jobs_per_second);
    if let (Some(worker), Some(ceiling)) = (find(rows, "worker-0ms-c64"), ceiling) {
        println!(
            "- worker / broker ceiling at 0 ms, c=64: {:.0}%",
            worker.jobs_per_second() / ceiling * 100.0
        );
    }
    if let Some(ceiling) = ceiling {
        for (name, part) in [
            ("ceiling-ledger-0ms-c64", "its two durable ledger writes"),
            ("ceiling-call-0ms-c64", "its vendor call"),
        ] {
            if let Some(m) = find(rows, name) {
                println!(
                    "- broker ceiling plus only {part} per job: {:.0}% of the ceiling",
                    m.jobs_per_second() / ceiling * 100.0
                );
            }
        }
    }
    if let (Some(worker), Some(naive)) = (find(rows, "worker-0ms-c64"), find(rows, "naive-0ms")) {
        println!(
            "- worker / naive at 0 ms: {:.1}x",
            worker.jobs_per_second() / naive.jobs_per_second()
        );
    }
    for c in [16.0, 64.0, 256.0] {
        if let Some(m) = find(rows, &format!("worker-50ms-c{c}")) {
            let target = (c / 0.05_f64).min(ceiling.unwrap_or(f64::INFINITY));
            println!("- worker at 50 ms, c={c}: {:.0}% of min(concurrency / latency, broker ceiling) = {target:.0} jobs/s", m.jobs_per_second() / target * 100.0);
        }
    }
    if let (Some(worker), Some(naive)) = (find(rows, "worker-50ms-c64"), find(rows, "naive-50ms")) {
        println!(
            "- worker c=64 / naive at 50 ms: {:.1}x",
            worker.jobs_per_second() / naive.jobs_per_second()
        );
    }
    for (name, what) in [
        ("ceiling-0ms-c64-steady", "broker ceiling, 0 ms"),
        ("worker-0ms-c64-steady", "worker, 0 ms"),
        ("worker-50ms-c64-steady", "worker, 50 ms, c=64"),
    ] {
        if let Some((case, m)) = rows
            .iter()
            .find(|(_, c, _)| c.name == name)
            .map(|(_, c, m)| (c, m))
        {
            println!(
                "- latency at a steady {} jobs/s ({what}): p50 {:.1} ms, p99 {:.1} ms from publish to result",
                case.steady_rate.unwrap_or_default(),
                m.p50.as_secs_f64() * 1000.0,
                m.p99.as_secs_f64() * 1000.0
            );
        }
    }
    if let Some(m) = find(rows, "worker-20ps-c64") {
        println!("- 20/s limit: {:.1} calls/s sustained ({:.0}% of the limit), peak {} calls in any 1 s window", m.calls_per_second(), m.calls_per_second() / 20.0 * 100.0, m.peak_calls_per_second);
    }
    if let Some(m) = find(rows, "worker-20ps-batch10") {
        println!("- 20/s limit with batches of 10: {:.0} items/s ({:.0}% of 200), peak {} calls in any 1 s window", m.items_per_second(), m.items_per_second() / 200.0 * 100.0, m.peak_calls_per_second);
    }
    if let Some(m) = find(rows, "worker-vendor-429-10ps") {
        println!(
            "- vendor throttling at 10/s: {} 429s for {} jobs, all jobs succeeded",
            m.throttled, m.jobs
        );
    }
    if let Some(m) = find(rows, "worker-backlog-c64") {
        println!(
            "- backlog of {} jobs at c=64: peak RSS {:.1} MB",
            m.jobs, m.peak_rss_mb
        );
    }
}

fn throughput_chart(rows: &[(&str, Case, Measurement)]) -> String {
    let worker: Vec<(f64, f64)> = [16, 64, 256]
        .iter()
        .filter_map(|c| {
            find(rows, &format!("worker-50ms-c{c}")).map(|m| (*c as f64, m.jobs_per_second()))
        })
        .collect();
    let ceiling = find(rows, "ceiling-0ms-c64")
        .map(Measurement::jobs_per_second)
        .unwrap_or(0.0);
    let target: Vec<(f64, f64)> = worker
        .iter()
        .map(|(c, _)| (*c, (c / 0.05).min(ceiling)))
        .collect();
    let naive = find(rows, "naive-50ms")
        .map(Measurement::jobs_per_second)
        .unwrap_or(0.0);
    chart::svg(
        "account-worker: jobs/s vs concurrency, vendor latency 50 ms",
        &[
            chart::Series {
                label: "worker",
                colour: "#1f77b4",
                dashed: false,
                points: worker.clone(),
            },
            chart::Series {
                label: "min(c / latency, ceiling)",
                colour: "#2ca02c",
                dashed: true,
                points: target,
            },
            chart::Series {
                label: "broker ceiling (0 ms)",
                colour: "#d62728",
                dashed: true,
                points: worker.iter().map(|(c, _)| (*c, ceiling)).collect(),
            },
            chart::Series {
                label: "naive baseline",
                colour: "#7f7f7f",
                dashed: true,
                points: worker.iter().map(|(c, _)| (*c, naive)).collect(),
            },
        ],
    )
}
