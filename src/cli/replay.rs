//! `account-worker dlq replay`: moves chosen dead letters back to the jobs queue; each
//! leaves the dead-letter queue only once its re-publish is confirmed, and each
//! replay is named after the dead letter it replays, so the worker applies a dead
//! letter at most once however many copies of it are replayed.

use std::fmt;
use std::num::NonZeroUsize;

use indicatif::ProgressBar;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Acker, BasicProperties, Channel};

use crate::broker::{self, header_text, BrokerError, Publisher};
use crate::config::{QueueNames, Settings};
use crate::job::{
    OutcomeId, OUTCOME_ID_HEADER, REPLAY_ID_HEADER, REPLAY_ORIGIN_HEADER, RUN_REPLAY_ID_HEADER,
};

/// The code of a message that was not a valid job: replaying it only loops it back,
/// so it is replayed only when asked for by name.
pub const MALFORMED_CODE: &str = "err_job_malformed";

/// Which dead letters `dlq replay` moves, and whether it only says what it would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ReplayFilter {
    /// Replay only dead letters whose x-error-code is CODE [default: every code except
    /// err_job_malformed]
    ///
    /// A malformed message (err_job_malformed) fails again the same way unless its
    /// producer was fixed, so it is replayed only when this names that code.
    #[arg(long, value_name = "CODE", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub code: Option<String>,
    /// Replay at most N dead letters [default: no limit].
    #[arg(long, value_name = "N")]
    pub limit: Option<NonZeroUsize>,
    /// Print what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl ReplayFilter {
    /// Whether a dead letter carrying this `x-error-code` is chosen.
    pub fn matches(&self, code: Option<&str>) -> bool {
        match &self.code {
            Some(wanted) => code == Some(wanted.as_str()),
            None => code != Some(MALFORMED_CODE),
        }
    }
}

/// What a replay run did (or, in a dry run, would have done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// The dead-letter queue read.
    pub dead_queue: String,
    /// The jobs queue replayed to.
    pub jobs_queue: String,
    /// The filter the run used.
    pub filter: ReplayFilter,
    /// Dead letters looked at.
    pub examined: usize,
    /// Dead letters replayed (in a dry run: that would have been).
    pub replayed: usize,
    /// Dead letters looked at and left in place because the filter did not choose them.
    pub skipped: usize,
    /// Of those skipped, how many were malformed messages.
    pub skipped_malformed: usize,
    /// Whether `--limit` ended the run before every dead letter was looked at.
    pub stopped_at_limit: bool,
}

impl ReplaySummary {
    fn new(settings: &Settings, filter: ReplayFilter) -> Self {
        let queues = &settings.broker.jobs_queue;
        Self {
            dead_queue: queues.dead.clone(),
            jobs_queue: queues.jobs.clone(),
            filter,
            examined: 0,
            replayed: 0,
            skipped: 0,
            skipped_malformed: 0,
            stopped_at_limit: false,
        }
    }
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.examined == 0 {
            return write!(
                f,
                "no dead letters in {}; nothing to replay",
                self.dead_queue
            );
        }
        if self.filter.dry_run {
            write!(
                f,
                "dry run: would replay {} of {} dead letters looked at in {} to {}; nothing was changed",
                self.replayed, self.examined, self.dead_queue, self.jobs_queue
            )?;
        } else {
            write!(
                f,
                "replayed {} of {} dead letters looked at in {} to {}",
                self.replayed, self.examined, self.dead_queue, self.jobs_queue
            )?;
        }
        if self.skipped > 0 {
            match &self.filter.code {
                Some(code) => write!(f, "; {} with another code than {code}", self.skipped)?,
                None => write!(f, "; {} not chosen", self.skipped)?,
            }
            write!(f, " left in place")?;
        }
        if self.skipped_malformed > 0 {
            write!(
                f,
                " ({} malformed: replay those with --code {MALFORMED_CODE} once their producer is fixed)",
                self.skipped_malformed
            )?;
        }
        if self.stopped_at_limit {
            write!(f, "; stopped at --limit, more may match")?;
        }
        Ok(())
    }
}

/// Why a replay run stopped. Whatever the cause, no dead letter is lost: one leaves
/// the dead-letter queue only after its copy on the jobs queue is confirmed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The broker could not be reached or set up; nothing was replayed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A broker operation failed part-way; the dead letters not replayed stay in place.
    #[error("replay stopped after {replayed} dead letters: {step} failed ({cause}); nothing was lost, the rest stay in {dead_queue}: fix the cause and run `dlq replay` again")]
    Interrupted {
        /// Dead letters replayed before the failure.
        replayed: usize,
        /// What was being done.
        step: String,
        /// The dead-letter queue.
        dead_queue: String,
        /// The cause: printed in the message, so not chained as a `source` (which
        /// `account-worker: {error:#}` would print a second time).
        cause: BrokerError,
    },
    /// A dead letter was replayed but could not be taken off the dead-letter queue.
    #[error("the dead letter of {job} was replayed to {jobs_queue} (x-replay-id {replay_id}) but could not be removed from {dead_queue} ({reason}); it stays there, and replaying it again is safe: its copy carries the same x-replay-id, so the worker finds the first replay's outcome instead of applying the change twice")]
    NotRemoved {
        /// The job, as its `x-job-id` names it.
        job: String,
        /// The jobs queue.
        jobs_queue: String,
        /// The dead-letter queue.
        dead_queue: String,
        /// The replay id the copy carries.
        replay_id: String,
        /// Why the ack failed.
        reason: String,
    },
}

/// Moves the dead letters `filter` chooses from `<JOBS_QUEUE>.dead` to `JOBS_QUEUE`,
/// printing one line per dead letter replayed (or, with `dry_run`, that would be).
///
/// Each dead letter present at the start is looked at once. A chosen one is
/// re-published (same body, persistent, `application/json`, its `x-job-id`, and an
/// `x-replay-id` so the worker attempts the change again instead of finding the
/// first outcome in its ledger) and acked only after the broker confirmed the
/// copy. Dead letters not chosen are held unacked, so they are not seen twice,
/// and are handed back in place when the run ends, also when it fails.
///
/// The replay id is the dead letter's own identity, never a random one: its
/// `x-outcome-id` (or, for a dead letter without one, an id derived from its job,
/// run and body), the same in every copy of it. Two copies of one dead letter,
/// or a copy left behind because a run was killed between the re-publish and the
/// ack, replay under the same ledger entry: the change is applied once and the
/// other copies publish its outcome again. The worker believes the id only if
/// its ledger stored that dead letter.
pub async fn dlq_replay(
    settings: &Settings,
    filter: ReplayFilter,
) -> Result<ReplaySummary, ReplayError> {
    let queues = &settings.broker.jobs_queue;
    let connection =
        broker::connect(&settings.broker.amqp_url, "account-worker dlq replay").await?;
    broker::declare(&connection, queues).await?;
    let publisher = match filter.dry_run {
        true => None,
        false => Some(Publisher::open(&connection, queues.clone()).await?),
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    // Dead letters ready now: the run looks at no more than these, so one that
    // fails again while the run goes on is left for the next run.
    let waiting = broker::queue_depth(&channel, &queues.dead).await? as usize;
    let verb = if filter.dry_run {
        "looking"
    } else {
        "replaying"
    };
    let mut run = Run {
        channel,
        publisher,
        queues,
        progress: super::progress::bar(waiting as u64, verb),
        held: Vec::new(),
        summary: ReplaySummary::new(settings, filter),
    };
    let outcome = run.replay(waiting).await;
    run.hand_back().await;
    run.progress.finish_and_clear();
    let _ = run.channel.close(200, "replay done".into()).await;
    let _ = connection.close(200, "replay done".into()).await;
    outcome.map(|()| run.summary)
}

/// One replay run's state.
struct Run<'a> {
    /// Where dead letters are taken from, without auto-ack.
    channel: Channel,
    /// The confirm channel copies go out on; `None` in a dry run.
    publisher: Option<Publisher>,
    queues: &'a QueueNames,
    progress: ProgressBar,
    /// Dead letters looked at and not replayed, to hand back at the end.
    held: Vec<Acker>,
    summary: ReplaySummary,
}

impl Run<'_> {
    /// Looks at up to `waiting` dead letters, replaying those the filter chooses.
    async fn replay(&mut self, waiting: usize) -> Result<(), ReplayError> {
        let limit = self
            .summary
            .filter
            .limit
            .map_or(usize::MAX, NonZeroUsize::get);
        while self.summary.examined < waiting {
            if self.summary.replayed >= limit {
                self.summary.stopped_at_limit = true;
                break;
            }
            let got = self
                .channel
                .basic_get(self.queues.dead.as_str().into(), BasicGetOptions::default())
                .await;
            let message = match got {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    let step = format!("taking the next dead letter from {}", self.queues.dead);
                    return Err(self.interrupted(step, e.into()));
                }
            };
            self.summary.examined += 1;
            self.progress.inc(1);
            self.one(message).await?;
        }
        Ok(())
    }

    /// Replays one dead letter if it is chosen; otherwise holds it.
    async fn one(&mut self, message: BasicGetMessage) -> Result<(), ReplayError> {
        let letter = Letter::read(&message);
        if !self.summary.filter.matches(letter.code.as_deref()) {
            self.summary.skipped += 1;
            if letter.code.as_deref() == Some(MALFORMED_CODE) {
                self.summary.skipped_malformed += 1;
            }
            self.held.push(message.delivery.acker);
            return Ok(());
        }
        let Some(publisher) = &self.publisher else {
            let (replay_id, _) = letter.replay_id(&message.delivery.data);
            self.progress
                .suspend(|| println!("would replay {letter} replay-id={replay_id}"));
            self.summary.replayed += 1;
            self.held.push(message.delivery.acker);
            return Ok(());
        };
        let (replay_id, origin) = letter.replay_id(&message.delivery.data);
        let copy = publisher
            .publish(
                &self.queues.jobs,
                &message.delivery.data,
                replay_properties(&message, &replay_id, origin.as_ref()),
            )
            .await;
        if let Err(cause) = copy {
            self.held.push(message.delivery.acker);
            let step = format!("re-publishing the dead letter of {}", letter.job_label());
            return Err(self.interrupted(step, cause));
        }
        let not_removed = |reason: String| ReplayError::NotRemoved {
            job: letter.job_label(),
            jobs_queue: self.queues.jobs.clone(),
            dead_queue: self.queues.dead.clone(),
            replay_id: replay_id.to_string(),
            reason,
        };
        match message.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) => return Err(not_removed("the channel had closed".to_owned())),
            Err(e) => return Err(not_removed(e.to_string())),
        }
        self.progress
            .suspend(|| println!("replayed {letter} replay-id={replay_id}"));
        self.summary.replayed += 1;
        Ok(())
    }

    fn interrupted(&self, step: String, cause: BrokerError) -> ReplayError {
        ReplayError::Interrupted {
            replayed: self.summary.replayed,
            step,
            dead_queue: self.queues.dead.clone(),
            cause,
        }
    }

    /// Hands every held dead letter back in place. A `basic.nack` with requeue is
    /// used rather than closing the channel: RabbitMQ 4.3+ quorum queues then leave
    /// the message's delivery count alone, so looking does not spend its delivery
    /// limit. (Should a nack fail, closing the channel still returns the message.)
    async fn hand_back(&mut self) {
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        for acker in self.held.drain(..) {
            let _ = acker.nack(requeue).await;
        }
    }
}

/// The copy's properties: persistent JSON, the original `x-job-id`, the replay id
/// and, for a dead letter of a replayed run, that run (`x-replay-origin`), where
/// the worker finds the stored dead letter to check the replay against.
fn replay_properties(
    message: &BasicGetMessage,
    replay_id: &OutcomeId,
    origin: Option<&OutcomeId>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    let text = |id: &OutcomeId| AMQPValue::LongString(LongString::from(id.as_str()));
    headers.insert(REPLAY_ID_HEADER.into(), text(replay_id));
    if let Some(origin) = origin {
        headers.insert(REPLAY_ORIGIN_HEADER.into(), text(origin));
    }
    let original = message.delivery.properties.headers().as_ref();
    if let Some(job_id) = original.and_then(|h| h.inner().get("x-job-id")) {
        headers.insert("x-job-id".into(), job_id.clone());
    }
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(correlation_id) = message.delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    properties
}

/// A dead letter's headers: what the lines printed name it by, and its identity.
#[derive(Debug)]
struct Letter {
    job_id: Option<String>,
    code: Option<String>,
    attempts: Option<String>,
    /// `x-outcome-id`, when valid.
    outcome_id: Option<OutcomeId>,
    /// `x-run-replay-id`, when valid.
    run_replay_id: Option<OutcomeId>,
}

impl Letter {
    fn read(message: &BasicGetMessage) -> Self {
        let headers = message.delivery.properties.headers().as_ref();
        let header = |name: &str| headers.and_then(|h| header_text(h, name));
        let id = |name: &str| header(name).and_then(|v| OutcomeId::parse(&v).ok());
        Self {
            job_id: header("x-job-id"),
            code: header("x-error-code"),
            attempts: header("x-attempts"),
            outcome_id: id(OUTCOME_ID_HEADER),
            run_replay_id: id(RUN_REPLAY_ID_HEADER),
        }
    }

    /// The id of this dead letter's replay, the same for every copy of it, and
    /// the replayed run it came from, if any. A dead letter without an outcome id
    /// (stored before outcome ids existed, or a malformed message) is named by its
    /// content, as the worker names the stored dead letter it checks it against.
    fn replay_id(&self, body: &[u8]) -> (OutcomeId, Option<OutcomeId>) {
        let id = self.outcome_id.clone().unwrap_or_else(|| {
            OutcomeId::of_content(self.job_id.as_deref(), self.run_replay_id.as_ref(), body)
        });
        (id, self.run_replay_id.clone())
    }

    fn job_label(&self) -> String {
        match &self.job_id {
            Some(id) => format!("job {id}"),
            None => "a message with no jobId".to_owned(),
        }
    }
}

impl fmt::Display for Letter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<24} {:<28} attempts={}",
            self.job_id.as_deref().unwrap_or("(no jobId)"),
            self.code.as_deref().unwrap_or("(no x-error-code)"),
            self.attempts.as_deref().unwrap_or("?"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(code: Option<&str>) -> ReplayFilter {
        ReplayFilter {
            code: code.map(str::to_owned),
            ..ReplayFilter::default()
        }
    }

    #[test]
    fn without_a_code_every_dead_letter_but_malformed_ones_is_chosen() {
        let all = filter(None);
        assert!(all.matches(Some("err_retries_exhausted")));
        assert!(all.matches(None));
        assert!(!all.matches(Some(MALFORMED_CODE)));
    }

    #[test]
    fn a_code_chooses_only_dead_letters_with_that_code() {
        let one = filter(Some("err_vendor_not_configured"));
        assert!(one.matches(Some("err_vendor_not_configured")));
        assert!(!one.matches(Some("err_retries_exhausted")));
        assert!(!one.matches(None));
    }

    #[test]
    fn malformed_dead_letters_are_chosen_when_named() {
        assert!(filter(Some(MALFORMED_CODE)).matches(Some(MALFORMED_CODE)));
    }

    #[test]
    fn the_summary_says_what_stayed_and_why() {
        let summary = ReplaySummary {
            dead_queue: "q.dead".to_owned(),
            jobs_queue: "q".to_owned(),
            filter: filter(None),
            examined: 4,
            replayed: 2,
            skipped: 2,
            skipped_malformed: 1,
            stopped_at_limit: false,
        };
        assert_eq!(
            summary.to_string(),
            "replayed 2 of 4 dead letters looked at in q.dead to q; 2 not chosen left in place \
             (1 malformed: replay those with --code err_job_malformed once their producer is fixed)"
        );
    }

    #[test]
    fn a_dry_run_summary_says_nothing_changed() {
        let summary = ReplaySummary {
            dead_queue: "q.dead".to_owned(),
            jobs_queue: "q".to_owned(),
            filter: ReplayFilter {
                dry_run: true,
                ..filter(Some("err_x"))
            },
            examined: 3,
            replayed: 1,
            skipped: 2,
            skipped_malformed: 0,
            stopped_at_limit: false,
        };
        assert_eq!(
            summary.to_string(),
            "dry run: would replay 1 of 3 dead letters looked at in q.dead to q; nothing was \
             changed; 2 with another code than err_x left in place"
        );
    }
}
