//! Runs one benchmark case: a consumer child process against the real broker and
//! the in-process mock vendor, timed from the first publish to the last result.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

use super::procstat;
use crate::broker::{self, Publisher};
use crate::config::{QueueNames, Settings};
use crate::mock_vendor::{self, MockVendor, ThrottleMode, Vendor};

/// Who consumes the jobs in a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Consumer {
    /// `account-worker run`.
    Worker,
    /// One job at a time, prefetch 1, new connection per call.
    Naive,
    /// Ack and publish a result without any vendor call.
    Passthrough,
    /// The pass-through plus the worker's two durable ledger writes per job.
    PassthroughLedger,
    /// The pass-through plus the worker's vendor call per job.
    PassthroughCall,
}

/// One row of the benchmark.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) consumer: Consumer,
    pub(crate) jobs: usize,
    pub(crate) concurrency: usize,
    pub(crate) latency: Duration,
    pub(crate) rate_limit: Option<&'static str>,
    pub(crate) batch_max: usize,
    /// The vendor the jobs are for.
    pub(crate) vendor: Vendor,
    /// The mock vendor answers 429 beyond this many calls per second.
    pub(crate) vendor_throttle: Option<u32>,
    /// How the mock's throttle counts and what it tells the worker.
    pub(crate) throttle_mode: ThrottleMode,
    /// The mock's cap changes to this many calls per second this long into the case.
    pub(crate) quota_change: Option<(Duration, u32)>,
    /// Publish every job before the consumer starts (memory under a backlog).
    pub(crate) backlog: bool,
    /// Items in each job (one account each).
    pub(crate) items_per_job: usize,
    /// Publish at this many jobs a second instead of all at once, so the
    /// latencies are those of a job arriving at a worker that keeps up, not of
    /// one queued behind the whole run.
    pub(crate) steady_rate: Option<u32>,
}

/// What a case measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measurement {
    pub(crate) jobs: usize,
    pub(crate) elapsed: Duration,
    pub(crate) vendor_calls: usize,
    pub(crate) items: usize,
    pub(crate) throttled: usize,
    pub(crate) peak_calls_per_second: usize,
    pub(crate) cpu_seconds: f64,
    pub(crate) peak_rss_mb: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    /// Every call that reached the case's vendor: arrival (mock ms) and status.
    pub(crate) calls: Vec<(u64, u16)>,
    /// When (mock ms) the case's quota change took effect.
    pub(crate) quota_changed_at_ms: Option<u64>,
}

impl Measurement {
    pub(crate) fn jobs_per_second(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn calls_per_second(&self) -> f64 {
        self.vendor_calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn items_per_second(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn cpu_per_thousand(&self) -> f64 {
        self.cpu_seconds / self.jobs.max(1) as f64 * 1000.0
    }
}

/// A failure that stops the benchmark; the message says what to check.
pub(crate) type BenchError = String;

pub(crate) async fn run(
    settings: &Settings,
    mock: &MockVendor,
    case: &Case,
    work: &Path,
) -> Result<Measurement, BenchError> {
    mock.reset();
    mock.set_latency(case.latency);
    for vendor in [Vendor::Mimecast, Vendor::Pncp] {
        let ours = vendor == case.vendor;
        let mode = if ours {
            case.throttle_mode
        } else {
            ThrottleMode::Headers
        };
        mock.set_throttle_mode(vendor, mode);
        mock.set_throttle(vendor, case.vendor_throttle.filter(|_| ours));
    }
    let queue = format!(
        "bench.{}.{}",
        case.name.replace(' ', "-"),
        uuid::Uuid::new_v4().simple()
    );
    let names = QueueNames::new(&queue).map_err(|e| e.to_string())?;
    let connection = broker::connect(&settings.broker.amqp_url, "account-worker bench")
        .await
        .map_err(|e| e.to_string())?;
    broker::declare(&connection, &names)
        .await
        .map_err(|e| e.to_string())?;
    let publisher = Publisher::open(&connection, names.clone())
        .await
        .map_err(|e| e.to_string())?;

    let results_channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    results_channel
        .basic_qos(2000, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut results = results_channel
        .basic_consume(
            names.results.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;

    let mut child = None;
    if !case.backlog {
        child = Some(spawn_consumer(case, mock, &queue, work)?);
        wait_for_consumer(&results_channel, &names.jobs).await?;
    }
    let started = Instant::now();
    let quota_change = case.quota_change.map(|(after, per_second)| {
        let (mock, vendor) = (mock.clone(), case.vendor);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let at_ms = mock.requests().last().map_or(0, |r| r.at_ms);
            mock.set_throttle(vendor, Some(per_second));
            at_ms
        })
    });
    // Results are read while jobs are still being published: a result's time is
    // when it arrived, not when the publisher got round to reading it.
    let (published_at, arrived_at) = if case.backlog {
        let published_at = publish_jobs(&publisher, &names.jobs, case).await?;
        child = Some(spawn_consumer(case, mock, &queue, work)?);
        (published_at, collect_results(&mut results, case).await?)
    } else {
        tokio::try_join!(
            publish_jobs(&publisher, &names.jobs, case),
            collect_results(&mut results, case)
        )?
    };
    let mut child = child.ok_or("no consumer was started")?;
    let pid = child
        .id()
        .ok_or("the consumer exited at once; run it by hand to see why")?;
    let last = arrived_at.values().max().copied().unwrap_or(started);
    let mut latencies: Vec<Duration> = arrived_at
        .iter()
        .filter_map(|(job_id, arrived)| {
            published_at
                .get(job_id)
                .map(|published| arrived.saturating_duration_since(*published))
        })
        .collect();
    let elapsed = last.duration_since(started);
    let cpu_seconds = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let peak_rss_mb = procstat::peak_rss_mb(pid).unwrap_or(0.0);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;

    let quota_changed_at_ms = match quota_change {
        Some(change) => change.await.ok(),
        None => None,
    };
    let requests = mock.requests();
    let calls: Vec<_> = requests
        .iter()
        .filter(|r| r.vendor == case.vendor)
        .collect();
    let throttled = calls.iter().filter(|r| r.status == 429).count();
    let items = calls
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| match case.vendor {
            Vendor::Mimecast => r.body["data"].as_array().map_or(0, Vec::len),
            Vendor::Pncp => 1,
        })
        .sum();
    let times: Vec<u64> = calls
        .iter()
        .filter(|r| r.status != 429)
        .map(|r| r.at_ms)
        .collect();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };

    for name in [&names.jobs, &names.results, &names.dead] {
        let _ = results_channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "bench case done".into()).await;
    Ok(Measurement {
        jobs: case.jobs,
        elapsed,
        vendor_calls: calls.len() - throttled,
        items,
        throttled,
        peak_calls_per_second: peak_in_any_second(&times),
        cpu_seconds,
        peak_rss_mb,
        p50: percentile(0.50),
        p99: percentile(0.99),
        calls: calls.iter().map(|r| (r.at_ms, r.status)).collect(),
        quota_changed_at_ms,
    })
}

/// Reads results until every job has one; returns when each job's first
/// result arrived.
async fn collect_results(
    results: &mut lapin::Consumer,
    case: &Case,
) -> Result<HashMap<String, Instant>, BenchError> {
    let mut arrived_at = HashMap::with_capacity(case.jobs);
    let deadline = Duration::from_secs(600);
    while arrived_at.len() < case.jobs {
        let delivery = tokio::time::timeout(deadline, results.next())
            .await
            .map_err(|_| {
                format!(
                    "{}: only {} of {} results after {deadline:?}",
                    case.name,
                    arrived_at.len(),
                    case.jobs
                )
            })?
            .ok_or("the results consumer ended")?
            .map_err(|e| e.to_string())?;
        let job_id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        // Only the case's own jobs count towards its total.
        if job_id.starts_with("bench-") {
            arrived_at.entry(job_id).or_insert_with(Instant::now);
        }
    }
    Ok(arrived_at)
}

/// The most calls in any one-second window, sliding over the call times (ms).
pub(crate) fn peak_in_any_second(times_ms: &[u64]) -> usize {
    let mut sorted = times_ms.to_vec();
    sorted.sort_unstable();
    let mut peak = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= 1000 {
            start += 1;
        }
        peak = peak.max(end - start + 1);
    }
    peak
}

/// Publishes the case's jobs; returns when each was published.
async fn publish_jobs(
    publisher: &Publisher,
    queue: &str,
    case: &Case,
) -> Result<HashMap<String, Instant>, BenchError> {
    let mut published_at = HashMap::with_capacity(case.jobs);
    let ids: Vec<usize> = (0..case.jobs).collect();
    // At a steady rate a small group goes out on every tick, and confirms are
    // awaited between ticks: a slow confirm must not hold the next group back
    // and then release a burst. Otherwise windows of 500 unconfirmed publishes
    // go as fast as the broker confirms them.
    let (group, mut pace) = match case.steady_rate {
        Some(rate) => {
            let group = (rate as usize / 100).max(1);
            let period = Duration::from_secs_f64(group as f64 / f64::from(rate.max(1)));
            let mut pace = tokio::time::interval(period);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (group, Some(pace))
        }
        None => (500, None),
    };
    let mut unconfirmed = FuturesUnordered::new();
    for window in ids.chunks(group) {
        if let Some(pace) = pace.as_mut() {
            loop {
                tokio::select! {
                    _ = pace.tick() => break,
                    Some(sent) = unconfirmed.next() => sent?,
                }
            }
        }
        for &i in window {
            let job_id = format!("bench-{i}");
            let items: Vec<String> = (0..case.items_per_job)
                .map(|n| {
                    format!(r#"{{"accountCode":"ACC{i}-{n}","numberOfUsers":1,"products":[9702]}}"#)
                })
                .collect();
            let body = match case.vendor {
                Vendor::Mimecast => format!(
                    r#"{{"jobId":"{job_id}","vendor":"mimecast","data":[{}]}}"#,
                    items.join(",")
                ),
                Vendor::Pncp => format!(
                    r#"{{"jobId":"{job_id}","vendor":"pncp","data":[{{"accountId":"{i}","name":"Bench","email":"ops@example.com"}}]}}"#
                ),
            };
            published_at.insert(job_id, Instant::now());
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            unconfirmed.push(async move {
                publisher
                    .publish(queue, body.as_bytes(), properties)
                    .await
                    .map_err(|e| e.to_string())
            });
        }
        if pace.is_none() {
            while let Some(sent) = unconfirmed.next().await {
                sent?;
            }
        }
    }
    while let Some(sent) = unconfirmed.next().await {
        sent?;
    }
    Ok(published_at)
}

/// Waits until the consumer process consumes from `queue`, so its start-up is
/// not counted in the first jobs' latency or in the case's time.
async fn wait_for_consumer(channel: &lapin::Channel, queue: &str) -> Result<(), BenchError> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let declared = broker::inspect_queue(channel, queue)
            .await
            .map_err(|e| e.to_string())?;
        if declared.consumer_count() > 0 {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err(format!(
                "the consumer did not start consuming {queue} within 60 s; run it by hand to see why"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_consumer(
    case: &Case,
    mock: &MockVendor,
    queue: &str,
    work: &Path,
) -> Result<tokio::process::Child, BenchError> {
    let binary = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut command = tokio::process::Command::new(binary);
    match case.consumer {
        Consumer::Worker => command.arg("run"),
        Consumer::Naive => command.args(["bench-consumer", "naive"]),
        Consumer::Passthrough => command.args(["bench-consumer", "passthrough"]),
        Consumer::PassthroughLedger => command.args(["bench-consumer", "passthrough-ledger"]),
        Consumer::PassthroughCall => command.args(["bench-consumer", "passthrough-call"]),
    };
    let ledger = work.join(format!("ledger-{}", uuid::Uuid::new_v4().simple()));
    command
        .env("JOBS_QUEUE", queue)
        .env("WORKER_CONCURRENCY", case.concurrency.to_string())
        .env("MIMECAST_BASE_URL", mock.base_url())
        .env("MIMECAST_ACCESS_KEY", mock_vendor::DEMO_MIMECAST_ACCESS_KEY)
        .env(
            "MIMECAST_SECRET_KEY",
            mock_vendor::DEMO_MIMECAST_SECRET_KEY_B64,
        )
        .env("MIMECAST_APP_ID", mock_vendor::DEMO_MIMECAST_APP_ID)
        .env("MIMECAST_APP_KEY", mock_vendor::DEMO_MIMECAST_APP_KEY)
        .env("PNCP_BASE_URL", mock.pncp_base_url())
        .env(
            "PNCP_APPLICATION_KEY",
            mock_vendor::DEMO_PNCP_APPLICATION_KEY,
        )
        .env("PNCP_SHARED_SECRET", mock_vendor::DEMO_PNCP_SHARED_SECRET)
        .env("MIMECAST_RATE_LIMIT", case.rate_limit.unwrap_or(""))
        .env("MIMECAST_BATCH_MAX", case.batch_max.to_string())
        .env("MIMECAST_BATCH_LINGER", "20ms")
        .env("RETRY_INITIAL_DELAY", "50ms")
        .env("RETRY_MAX_DELAY", "2s")
        .env("RETRY_MAX_ATTEMPTS", "20")
        .env("LEDGER_URL", format!("file:{}", ledger.display()))
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
        .spawn()
        .map_err(|e| format!("cannot start the consumer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_window_counts_calls_less_than_a_second_apart() {
        assert_eq!(peak_in_any_second(&[]), 0);
        assert_eq!(peak_in_any_second(&[0, 50, 999, 1000, 1001]), 4);
        assert_eq!(peak_in_any_second(&[0, 1000, 2000]), 1);
    }
}
