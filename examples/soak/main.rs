//! `scripts/soak`: many jobs through real worker processes, the real RabbitMQ and (with
//! `--fleet`) a shared Redis ledger, while the mock vendor misbehaves at random, every
//! worker connection is closed on a schedule and a worker is SIGKILLed once; then it
//! checks that no job was lost, no delta applied twice, no jobId answered two ways and
//! no item reported succeeded without being applied. With `--outage`, one vendor
//! is down for a long stretch instead (see `outage.rs`), and the chaos is off
//! unless asked for.

mod args;
mod chaos;
mod consumer_timeout;
mod jobs;
mod outage;
mod rabbit;
mod report;
mod scrape;
mod tally;
mod workers;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use account_worker::config::QueueNames;
use account_worker::mock_vendor::{MockVendor, MockVendorConfig, RandomFaults, Vendor};

use args::{Args, ChaosPlan};
use chaos::{close_on_schedule, lock, Chaos};
use tally::Seen;
use workers::{worker_env, WorkerProcess};

/// Exit status when the soak itself could not do what it promises to check.
const HARNESS_FAILED: i32 = 2;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("soak: {error:#}");
            std::process::exit(HARNESS_FAILED);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        u64::from(nanos)
    });
    let run_id = format!("{:08x}", seed as u32 ^ std::process::id());
    let vhost = format!("soak-{run_id}");
    let queue = format!("soak.{run_id}");
    let names = QueueNames::new(&queue)?;
    let dir = args.out.join(&run_id);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bin = match &args.worker_bin {
        Some(bin) => bin.clone(),
        None => default_worker_bin()?,
    };
    let user = url::Url::parse(&args.amqp)
        .map(|u| u.username().to_owned())
        .context("--amqp is not a URL")?;
    let user = if user.is_empty() {
        "guest".to_owned()
    } else {
        user
    };
    let amqp_url = format!("{}/{vhost}", args.amqp.trim_end_matches('/'));
    let workers_count = if args.fleet { 2 } else { 1 };
    let chaos = ChaosPlan::of(&args);
    println!(
        "soak {run_id}: {} jobs, {} worker(s){}, faults {:.1}% (seed {seed}), closes every {:?}, kill at {:?}, vhost {vhost}, logs in {}",
        args.jobs,
        workers_count,
        if args.fleet { " sharing a Redis ledger" } else { " with a file ledger" },
        chaos.fault_rate * 100.0,
        chaos.close_every,
        chaos.kill_at,
        dir.display()
    );

    let previous_timeout = match args.consumer_timeout {
        Some(timeout) => {
            let previous = consumer_timeout::read().await?;
            consumer_timeout::set(timeout).await?;
            println!("  broker consumer_timeout {timeout:?} for the run (was {previous:?})");
            Some(previous)
        }
        None => None,
    };
    let outcome = match rabbit::create_vhost(&vhost, &user).await {
        Ok(()) => {
            let soak = soak(
                &args, chaos, seed, &run_id, &amqp_url, &vhost, &names, &dir, &bin,
            );
            // Dropping the run on a signal kills the workers (kill_on_drop) and
            // ends the outage with the mock; the broker setting is put back below.
            tokio::select! {
                outcome = soak => outcome,
                signal = stop_signal() => Err(anyhow::anyhow!("interrupted by {signal}")),
            }
        }
        Err(error) => Err(error),
    };
    if !args.keep {
        if let Err(error) = rabbit::delete_vhost(&vhost).await {
            eprintln!("soak: could not delete vhost {vhost}: {error:#}");
        }
    }
    if let Some(previous) = previous_timeout {
        match consumer_timeout::restore(previous).await {
            Ok(()) => println!("  broker consumer_timeout put back ({previous:?})"),
            Err(error) => eprintln!(
                "soak: could not put the broker's consumer_timeout back to {previous:?}: {error:#}"
            ),
        }
    }
    outcome
}

/// Resolves on SIGINT or SIGTERM, naming it, so the run can put the broker back
/// before it exits.
async fn stop_signal() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn default_worker_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the soak's own path")?;
    // target/<profile>/examples/soak -> target/<profile>/account-worker
    let profile_dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .context("the soak binary is not inside a cargo target directory; pass --worker-bin")?;
    Ok(profile_dir.join("account-worker"))
}

#[allow(clippy::too_many_arguments)]
async fn soak(
    args: &Args,
    plan: ChaosPlan,
    seed: u64,
    run_id: &str,
    amqp_url: &str,
    vhost: &str,
    names: &QueueNames,
    dir: &std::path::Path,
    bin: &std::path::Path,
) -> anyhow::Result<bool> {
    let mock = MockVendor::start(([127, 0, 0, 1], 0).into(), MockVendorConfig::demo()).await?;
    let delay_ms = u64::try_from(args.vendor_timeout.as_millis())? + 1_000;
    mock.set_random_faults(Some(RandomFaults {
        delay_ms,
        ..RandomFaults::new(plan.fault_rate, seed)
    }));

    let (connection, channel) = rabbit::connect(amqp_url).await?;
    account_worker::broker::declare(&connection, names).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let collector = tokio::spawn(rabbit::collect(
        connection.create_channel().await?,
        names.clone(),
        Arc::clone(&seen),
    ));

    let mut fleet = Vec::new();
    let mut ports = Vec::new();
    for i in 0..if args.fleet { 2 } else { 1 } {
        let port = scrape::free_port()?;
        let env = worker_env(args, &mock, amqp_url, &names.jobs, dir, i, port);
        ports.push(port);
        fleet.push(WorkerProcess::start(
            bin,
            env,
            dir.join(format!("worker-{i}.log")),
        )?);
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let jobs: Vec<_> = (0..args.jobs)
        .map(|n| jobs::plan(run_id, n, &mut rng))
        .collect();
    let mut order = Vec::with_capacity(args.jobs + args.jobs / 50);
    for i in 0..jobs.len() {
        order.push(i);
        if i >= 300 && rng.random_bool(args.producer_retries) {
            order.push(rng.random_range(i - 300..i));
        }
    }
    let retries = order.len() - jobs.len();

    let chaos = Arc::new(Mutex::new(Chaos::default()));
    let stop_chaos = CancellationToken::new();
    let closer = plan.close_every.map(|every| {
        tokio::spawn(close_on_schedule(
            vhost.to_owned(),
            every,
            Arc::clone(&chaos),
            stop_chaos.clone(),
        ))
    });

    let published = Arc::new(rabbit::PublishLog::default());
    let outage_plan = args.outage.map(|length| outage::Plan {
        vendor: args.outage_vendor,
        status: args.outage_status,
        after: args.outage_after,
        length,
    });
    let timeline = Arc::new(Mutex::new(outage::Timeline::default()));
    let outage_task = outage_plan.map(|p| {
        tokio::spawn(outage::drive(
            mock.clone(),
            p,
            Arc::clone(&timeline),
            Arc::clone(&published),
            stop_chaos.clone(),
        ))
    });

    let started = Instant::now();
    let publisher = {
        let channel = channel.clone();
        let queue = names.jobs.clone();
        let bodies: Vec<_> = order.iter().map(|&i| jobs[i].clone()).collect();
        let (rate, published) = (args.rate, Arc::clone(&published));
        tokio::spawn(async move {
            rabbit::publish(&channel, &queue, bodies.iter(), 500, rate, &published).await
        })
    };

    let publishing = args.rate.map_or(Duration::ZERO, |r| {
        Duration::from_secs_f64(order.len() as f64 / r)
    });
    let outage_span = args
        .outage
        .map_or(Duration::ZERO, |l| args.outage_after + l);
    let timeout = args.timeout.unwrap_or(
        Duration::from_secs(120)
            + Duration::from_millis(40) * args.jobs as u32
            + publishing.max(outage_span),
    );
    let kill_after = plan
        .kill_at
        .map(|share| (share * jobs.len() as f64).ceil() as usize);
    let client = reqwest::Client::new();
    let mut counters: Vec<Option<scrape::Counters>> = vec![None; ports.len()];
    let mut all_answered_at = None;
    let mut last_progress = Instant::now();
    let mut publisher = Some(publisher);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if publisher.as_ref().is_some_and(|p| p.is_finished()) {
            if let Some(done) = publisher.take() {
                done.await.context("the publisher panicked")??;
            }
        }
        let (answered, answered_mimecast) = {
            let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            let answered = jobs.iter().filter(|job| seen.answered(&job.id));
            answered.fold((0, 0), |(all, mimecast), job| {
                let is_mimecast = job.items.first().map(|i| i.vendor) == Some(Vendor::Mimecast);
                (all + 1, mimecast + usize::from(is_mimecast))
            })
        };
        let killed = lock(&chaos).killed_at.is_some();
        if !killed && kill_after.is_some_and(|after| answered >= after) {
            fleet[0].kill_and_restart().await?;
            lock(&chaos).killed_at = Some(started.elapsed());
            println!(
                "  {:>6.1}s SIGKILLed worker 0 at {answered} jobs answered, restarted it",
                started.elapsed().as_secs_f64()
            );
        }
        for (i, worker) in fleet.iter_mut().enumerate() {
            if let Some(status) = worker.exited() {
                let note = format!(
                    "worker {i} exited by itself ({status}) at {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                println!("  {note}; restarting it");
                lock(&chaos).unexpected_exits.push(note);
                worker.kill_and_restart().await?;
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            scrape::scrape_all(&client, &ports, &mut counters).await;
            let c = lock(&chaos);
            println!(
                "  {:>6.1}s answered {answered}/{} jobs ({answered_mimecast} mimecast, {} pncp), {} published, {} connections closed in {} rounds, worker counters {}",
                started.elapsed().as_secs_f64(),
                jobs.len(),
                answered - answered_mimecast,
                published.count.load(Ordering::SeqCst),
                c.connections_closed,
                c.close_rounds,
                scrape::shown(&counters),
            );
        }
        let outage_done = outage_task.is_none() || outage::ended(&timeline);
        if answered == jobs.len() && publisher.is_none() && outage_done {
            all_answered_at = Some(started.elapsed());
            break;
        }
        if started.elapsed() >= timeout {
            println!(
                "  timed out after {timeout:?} with {answered}/{} jobs answered",
                jobs.len()
            );
            break;
        }
    }
    stop_chaos.cancel();
    if let Some(closer) = closer {
        let _ = closer.await;
    }
    if let Some(outage_task) = outage_task {
        let _ = outage_task.await;
    }

    // Quiescence: nothing ready or unacked anywhere, twice in a row, so late
    // copies (redeliveries, producer retries) are answered and read too.
    let quiet_deadline =
        Instant::now() + Duration::from_secs(120).max(timeout.saturating_sub(started.elapsed()));
    let mut quiet_polls = 0;
    let mut last_counts = HashMap::new();
    while quiet_polls < 2 && Instant::now() < quiet_deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        last_counts = rabbit::queue_counts(vhost).await?;
        let busy = [&names.jobs, &names.results, &names.dead]
            .iter()
            .any(|q| last_counts.get(q.as_str()).is_none_or(|&(r, u)| r + u > 0));
        quiet_polls = if busy { 0 } else { quiet_polls + 1 };
    }
    let quiescent = quiet_polls >= 2;
    let elapsed = started.elapsed();
    scrape::scrape_all(&client, &ports, &mut counters).await;

    let mut exits = Vec::new();
    for (i, worker) in fleet.into_iter().enumerate() {
        let status = worker.stop(Duration::from_secs(30)).await;
        exits.push(format!(
            "worker {i}: {}",
            status.map_or("killed after 30 s".to_owned(), |s| s.to_string())
        ));
    }
    let _ = connection.close(200, "soak done".into()).await;
    collector.abort();

    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    let figures = tally::figures(&jobs, &seen, |vendor, account| {
        mock.applied_count(vendor, account)
    });
    let chaos = lock(&chaos);
    let summary = report::Summary {
        jobs: jobs.len(),
        producer_retries: retries,
        elapsed,
        all_answered_at,
        quiescent,
        last_counts,
        exits,
        requests: mock.requests(),
    };
    let mut text = report::render(&summary, &figures, &chaos, &seen, &jobs);
    let mut problems =
        report::harness_problems(&summary, &chaos, plan.close_every, plan.kill_at.is_some());
    let mut outage_ok = true;
    if let Some(outage_plan) = &outage_plan {
        let timeline = outage::lock(&timeline);
        let evidence = outage::Evidence {
            jobs: &jobs,
            order: &order,
            published: &published,
            seen: &seen,
            figures: &figures,
            requests: &summary.requests,
        };
        let o = outage::figures(&evidence, outage_plan, &timeline, report::touches);
        let o = outage::OutageFigures { counters, ..o };
        let timeout_shown = args
            .consumer_timeout
            .map_or("unchanged".to_owned(), |t| format!("{t:?}"));
        outage::render(&mut text, outage_plan, &o, &timeout_shown);
        if timeline.started.is_none() || timeline.ended.is_none() {
            problems.push("the outage did not run its course".to_owned());
        } else if o.backlog_at_end == 0 {
            problems.push("no job of the held vendor waited out the outage; publish for longer (--jobs, --rate)".to_owned());
        }
        let broken = o.broken(outage_plan, &figures);
        outage_ok = broken.is_empty();
        let _ = writeln!(
            text,
            "\n{}",
            if outage_ok {
                "PASS: every held job came through the outage".to_owned()
            } else {
                format!("FAIL: {}", broken.join("; "))
            }
        );
    }
    println!("{text}");
    std::fs::write(dir.join("report.txt"), &text)?;
    if !problems.is_empty() {
        anyhow::bail!(
            "the soak did not carry out what it checks: {}",
            problems.join("; ")
        );
    }
    Ok(figures.promises_hold() && outage_ok)
}
