//! The worker process: broker sessions with reconnection, the consume loop, and
//! graceful shutdown. Each delivery runs the pipeline in its own task.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::batcher::Batcher;
use crate::broker::{self, BrokerError, PublishFailures, Publisher};
use crate::circuit::Circuits;
use crate::config::Settings;
use crate::health::Health;
use crate::job::{Job, Malformed, ReplayClaim};
use crate::ledger::{Ledger, LedgerError};
use crate::limiter::{LimiterError, Limiters};
use crate::metrics::Metrics;
use crate::ordering::{AccountOrder, Place};
use crate::pipeline::{Batchers, DeliveryHold, LedgerPolicy, Outcome, Pipeline};
use crate::retry::Backoff;
use crate::vendor::Vendors;

mod settle;

/// Header `account-worker dlq replay` sets on a replayed message: the outcome id
/// of the dead letter it replays, which gives the replay its own ledger entry
/// (one per dead letter), so the change is attempted again, once. The worker
/// believes it only when the ledger stored that dead letter.
pub const REPLAY_HEADER: &str = crate::job::REPLAY_ID_HEADER;

/// Why the worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The HTTP client for the vendors could not be built.
    #[error("cannot build the vendor HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// The idempotency ledger could not be opened.
    #[error("cannot open the idempotency ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// The rate limiters could not be built (fleet scope without Redis).
    #[error(transparent)]
    Limiter(#[from] LimiterError),
    /// The metrics endpoint could not be served.
    #[error("cannot serve METRICS_ADDR {addr}: {cause}; choose a free address")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        cause: std::io::Error,
    },
}

/// How a broker session ended.
enum SessionEnd {
    /// Shutdown was requested and in-flight jobs were settled.
    Shutdown,
    /// The connection or channel failed; reconnect.
    Lost(BrokerError),
}

/// A running worker's shared parts.
#[derive(Debug, Clone)]
pub struct Worker {
    settings: Arc<Settings>,
    order: Arc<AccountOrder>,
    circuits: Arc<Circuits>,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
    /// Finished jobs whose outcome the broker refused, so one it keeps refusing
    /// is dead-lettered with the reason instead of looping through redeliveries.
    publish_failures: Arc<PublishFailures>,
}

impl Worker {
    /// Builds the vendor clients, limiters, ledger and pipeline from the settings.
    pub async fn new(settings: Settings) -> Result<Self, WorkerError> {
        let vendors = Vendors::from_settings(&settings)?;
        let circuits = Arc::new(Circuits::default());
        let metrics = Arc::new(Metrics::new());
        let ledger = Ledger::open(&settings.ledger).await?;
        // In the fleet scope the limiters share their state through the ledger's Redis.
        let redis = match &ledger {
            Ledger::Redis(redis) => Some(redis.connection()),
            _ => None,
        };
        let limiters = Arc::new(Limiters::from_settings(&settings, redis)?);
        let batchers = Batchers {
            mimecast: match (&settings.mimecast, &vendors.mimecast) {
                (Some(mimecast), Some(client)) if mimecast.batch_max.get() > 1 => {
                    Some(Batcher::start(
                        client.clone(),
                        limiters.clone(),
                        metrics.clone(),
                        mimecast.batch_max.get(),
                        mimecast.batch_linger,
                    ))
                }
                _ => None,
            },
        };
        let pipeline = Arc::new(Pipeline::new(
            vendors,
            limiters,
            circuits.clone(),
            Backoff::new(settings.retry),
            ledger,
            metrics.clone(),
            LedgerPolicy {
                lease: settings.ledger.lease,
                max_deliveries: settings.broker.max_deliveries.get(),
            },
            batchers,
            settings.broker.concurrency.get(),
        ));
        let parked_stale_after = settings.broker.held_delivery_max.saturating_mul(3);
        Ok(Self {
            settings: Arc::new(settings),
            // A job put back in the queue comes back within a few of its
            // holds unless another worker took it (see `ordering`).
            order: Arc::new(AccountOrder::new(parked_stale_after)),
            circuits: circuits.clone(),
            pipeline,
            health: Arc::new(Health::new(circuits, metrics)),
            publish_failures: Arc::new(PublishFailures::default()),
        })
    }

    /// The per-vendor circuits, for tests and reports.
    pub fn circuits(&self) -> &Arc<Circuits> {
        &self.circuits
    }

    /// Health and readiness, for the HTTP endpoints and tests.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Consumes jobs until `shutdown` is cancelled, reconnecting whenever the
    /// broker connection is lost. Returns once in-flight jobs are settled.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut reconnect = reconnect_backoff();
        while !shutdown.is_cancelled() {
            let started_before = self.health.sessions_started();
            let began = tokio::time::Instant::now();
            let end = self.session(&shutdown).await;
            // A session that consumed for a while ends a run of failures: its
            // loss starts again from the shortest wait. One lost right after it
            // began (a consumer the broker cancels at once) does not, or such a
            // broker would be retried every few hundred milliseconds.
            if self.health.sessions_started() > started_before && began.elapsed() >= STABLE_SESSION
            {
                reconnect = reconnect_backoff();
            }
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(cause) => {
                    self.health.set_consuming(false);
                    self.health.metrics().broker_reconnect();
                    let wait = reconnect.next().unwrap_or(Duration::from_secs(30));
                    error!(error = %cause, retry_in_ms = wait.as_millis() as u64, "broker session lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        self.health.set_consuming(false);
        info!("worker stopped");
    }

    async fn session(&self, shutdown: &CancellationToken) -> SessionEnd {
        let broker = &self.settings.broker;
        let connection = match broker::connect(&broker.amqp_url, "account-worker").await {
            Ok(connection) => connection,
            Err(e) => return SessionEnd::Lost(e),
        };
        if let Err(e) = broker::declare(&connection, &broker.jobs_queue).await {
            return SessionEnd::Lost(e);
        }
        let publisher = match Publisher::open(&connection, broker.jobs_queue.clone()).await {
            Ok(p) => p,
            Err(e) => return SessionEnd::Lost(e),
        };
        let consumer = async {
            let channel = connection.create_channel().await?;
            let prefetch = prefetch(broker.concurrency.get());
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let mut consumers = Vec::with_capacity(broker.consume_queues.len());
            for queue in &broker.consume_queues {
                if queue != &broker.jobs_queue.jobs {
                    broker::declare_consumed(&connection, queue).await?;
                }
                consumers.push(
                    channel
                        .basic_consume(
                            queue.as_str().into(),
                            "".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await?,
                );
            }
            Ok::<_, BrokerError>((channel, consumers))
        };
        let (channel, consumers) = match consumer.await {
            Ok(pair) => pair,
            Err(e) => return SessionEnd::Lost(e),
        };
        let tags: Vec<_> = consumers.iter().map(|c| c.tag()).collect();
        // Each queue's stream ends with a `None` of its own: `select_all` alone
        // would drop a cancelled consumer (its queue deleted) and go on with the
        // others, and that queue would never be consumed again.
        // Each delivery carries the queue it came from, where a requeued one goes back.
        let mut consumer = futures_util::stream::select_all(
            consumers
                .into_iter()
                .zip(broker.consume_queues.iter().cloned())
                .map(|(c, queue)| {
                    let queue: Arc<str> = queue.into();
                    c.map(move |delivery| Some((queue.clone(), delivery)))
                        .chain(futures_util::stream::once(async { None }))
                        .boxed()
                }),
        );
        info!(queues = ?broker.consume_queues, concurrency = broker.concurrency.get(), "consuming jobs");
        self.health.set_consuming(true);
        self.health.session_started();

        let stopping = CancellationToken::new();
        // Cancelled by a job whose publish was not confirmed: the session is then
        // reopened, which re-declares the queues and redelivers unacked jobs.
        let broken = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let end = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                _ = broken.cancelled() => break Some(BrokerError::NotConfirmed {
                    queue: broker.jobs_queue.results.clone(),
                    reason: "a result or dead letter was not confirmed; reopening the session".to_owned(),
                }),
                delivery = consumer.next() => match delivery {
                    Some(Some((queue, Ok(delivery)))) => {
                        let hold_until = tokio::time::Instant::now() + broker.held_delivery_max;
                        // Parsed here, in delivery order, so that each job takes its
                        // place behind earlier jobs of the same accounts.
                        let parsed = crate::job::parse(&delivery.data);
                        let place = match &parsed {
                            Ok(job) => self.order.enter(
                                job.items.iter().map(|item| format!("{}:{}", job.vendor, item.account)).collect(),
                                Some(job.id.as_str()),
                            ),
                            Err(_) => self.order.enter(Vec::new(), None),
                        };
                        let worker = self.clone();
                        let publisher = publisher.clone();
                        let stopping = stopping.clone();
                        let broken = broken.clone();
                        tasks.spawn(async move {
                            let from = Received { queue, hold_until };
                            worker
                                .handle(delivery, from, parsed, place, &publisher, &stopping, &broken)
                                .await
                        });
                    }
                    Some(Some((_, Err(e)))) => break Some(BrokerError::Channel(e)),
                    Some(None) | None => break Some(BrokerError::NotConfirmed {
                        queue: broker.jobs_queue.jobs.clone(),
                        reason: "the broker cancelled the consumer (queue deleted?)".to_owned(),
                    }),
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined {
                        error!(error = %e, "a job task failed");
                    }
                }
            }
        };
        if let Some(cause) = end {
            // Let in-flight jobs finish their vendor calls: their acks will fail and
            // the broker redelivers them, but what they did is not cut in half.
            // Jobs that have not reached the vendor stop, as on shutdown: their
            // deliveries are already back in the queue.
            stopping.cancel();
            tasks.detach_all();
            return SessionEnd::Lost(cause);
        }

        info!(
            in_flight = tasks.len(),
            timeout_s = self.settings.shutdown_timeout.as_secs_f64(),
            "stopping: no new jobs; waiting for in-flight ones"
        );
        self.health.set_consuming(false);
        for tag in tags {
            let _ = channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await;
        }
        stopping.cancel();
        let drained = tokio::time::timeout(self.settings.shutdown_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                unfinished = tasks.len(),
                "shutdown timeout passed: handing unfinished jobs back to the broker"
            );
            tasks.abort_all();
        }
        // Closing the connection returns every unacked delivery to the queue.
        let _ = connection.close(200, "worker stopping".into()).await;
        SessionEnd::Shutdown
    }

    /// Runs one delivery through the pipeline, publishes what it produced, and
    /// acks only once every publish is confirmed.
    ///
    /// The job waits for its account's turn before the pipeline gives it one of
    /// the `WORKER_CONCURRENCY` slots, in that order: a job holding a slot can
    /// always go on, so jobs waiting for their turn cannot deadlock the slots.
    #[allow(clippy::too_many_arguments)]
    async fn handle(
        &self,
        delivery: Delivery,
        from: Received,
        parsed: Result<Job, Malformed>,
        mut place: Place,
        publisher: &Publisher,
        stopping: &CancellationToken,
        broken: &CancellationToken,
    ) {
        let metrics = self.health.metrics();
        metrics.in_flight(1);
        // Stopping first: a later job of an account must not start while an
        // earlier one is being handed back.
        // No deadline here: a job going back to the queue while an earlier job
        // of its account still runs would overtake it. The earlier job bounds
        // the wait: it runs, or goes back itself and this one follows it.
        let mut turn = tokio::select! {
            biased;
            _ = stopping.cancelled() => Turn::Stopping,
            _ = place.wait_turn() => match place.may_go() {
                true => Turn::Go,
                false => Turn::BehindParked,
            },
        };
        if matches!(turn, Turn::BehindParked) {
            // In a fleet on one queue another worker may have taken and settled
            // the parked job's copy: this worker would never see it come back.
            // A bounded number of reads: each settled blocker may reveal another.
            'settled: for _ in 0..16 {
                let blockers = place.blocked_by();
                if blockers.is_empty() {
                    break;
                }
                for blocker in blockers {
                    if !self.pipeline.finished_in_ledger(&blocker).await {
                        break 'settled;
                    }
                    self.order.forget_parked(&blocker);
                }
            }
            if place.may_go() {
                turn = Turn::Go;
            }
        }
        let replay = delivery.properties.headers().as_ref().and_then(|headers| {
            let header = |name| crate::broker::header_text(headers, name);
            Some(ReplayClaim {
                id: header(REPLAY_HEADER)?,
                origin: header(crate::job::REPLAY_ORIGIN_HEADER),
            })
        });
        let delivery_hold = DeliveryHold {
            until: from.hold_until,
            followed: place.followed(),
        };
        let processing = std::panic::AssertUnwindSafe(self.pipeline.process(
            &delivery.data,
            parsed,
            replay.as_ref(),
            &delivery_hold,
            stopping,
        ));
        // A bug must not leave the delivery unacked forever: hand it back, and the
        // ledger's delivery count turns a job that keeps crashing into a dead letter.
        let outcome = match turn {
            Turn::Stopping => Outcome::HandBack,
            Turn::BehindParked => {
                self.pipeline.pace_requeue().await;
                Outcome::Requeue
            }
            Turn::Go => futures_util::FutureExt::catch_unwind(processing)
                .await
                .unwrap_or_else(|_| {
                    error!("job processing panicked; handing the job back to the broker");
                    Outcome::HandBack
                }),
        };
        match outcome {
            Outcome::Requeue => place.park(),
            Outcome::Finished { .. } => place.unpark(),
            Outcome::HandBack => {}
        }
        let settled = match outcome {
            Outcome::Requeue => self.requeue(&delivery, &from.queue, publisher).await,
            Outcome::HandBack => delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .map(|_| ()),
            Outcome::Finished {
                result,
                dead_letter,
            } => {
                self.settle_finished(&delivery, result, dead_letter, publisher, broken)
                    .await
            }
        };
        if let Err(e) = settled {
            warn!(error = %e, "could not settle a delivery; the broker will redeliver it");
        }
        metrics.in_flight(-1);
    }
}

/// What a delivery does once its account's earlier jobs are settled.
enum Turn {
    /// Run the job.
    Go,
    /// Back to the tail of the queue: an earlier job of its account went there
    /// and has not come back yet.
    BehindParked,
    /// The worker is stopping: hand it back.
    Stopping,
}

/// Where a delivery came from and how long it may wait unacked.
struct Received {
    /// The consumed queue, where a requeued delivery is published again.
    queue: Arc<str>,
    /// Arrival plus `HELD_DELIVERY_MAX`.
    hold_until: tokio::time::Instant,
}

/// Deliveries the broker may push ahead of the jobs running: three times the
/// concurrency. A concurrency's worth run, as many wait ready behind them so a
/// freed slot starts its next job at once instead of waiting a broker round
/// trip for it (and finished jobs publish and ack while the next ones run), and
/// a concurrency's worth may wait for a held vendor or another copy's outcome
/// without taking that room from the other vendor's jobs (see
/// `pipeline::hold`). Memory stays bounded by the prefetch, not the backlog.
/// Measured in `account-worker bench` (README, Performance).
pub fn prefetch(concurrency: usize) -> u16 {
    u16::try_from(concurrency.saturating_mul(3)).unwrap_or(u16::MAX)
}

/// How long a session must have consumed for its loss to count as a new
/// outage rather than the same one going on. Long enough that a broker which
/// cancels the consumer at once is retried with a growing wait, short enough
/// that a broker closing working sessions every few seconds (a rolling
/// restart, a load balancer's idle cut) is rejoined at once each time instead
/// of after up to 30 s (the soak closes every connection every 5 s).
const STABLE_SESSION: Duration = Duration::from_secs(3);

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}
