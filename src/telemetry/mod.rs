//! Log subscriber set-up: text or one JSON object per line, filtered by `RUST_LOG`,
//! and secret-safe whatever the filter lets through.
//!
//! The worker's own secrets are `SecretString`s and its `Authorization` headers
//! are marked sensitive, but third-party crates log what they hold. Two guards
//! stand between them and the log: the AMQP crates, whose trace output dumps
//! every frame (the SASL PLAIN response, that is the broker password, among
//! them), are capped at `debug` however verbose `RUST_LOG` is; and every line
//! passes through a [`Redactor`] that replaces each configured secret in each of
//! its encodings and the userinfo of any URL.

use std::io::Write;
use std::sync::Arc;

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

pub mod redact;

pub use redact::Redactor;

/// Crates that log raw AMQP frames, connection negotiation included, at trace.
const FRAME_DUMPING_TARGETS: &[&str] = &[
    "lapin",
    "amq_protocol",
    "amq_protocol_types",
    "amq_protocol_tcp",
    "amq_protocol_uri",
];

/// Installs the global subscriber. `RUST_LOG` wins over the configured filter,
/// except that [`FRAME_DUMPING_TARGETS`] never log below `debug`; every line is
/// written through `redactor`.
pub fn init(settings: &LogSettings, redactor: Redactor) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let caps = FRAME_DUMPING_TARGETS
        .iter()
        .fold(Targets::new().with_default(Level::TRACE), |caps, target| {
            caps.with_target(*target, Level::DEBUG)
        });
    let writer = RedactingStderr {
        redactor: Arc::new(redactor),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(FmtSpan::NONE);
    let registry = tracing_subscriber::registry().with(filter).with(caps);
    // A second init (tests) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_current_span(true))
            .try_init(),
        LogFormat::Text => registry.with(layer).try_init(),
    };
}

/// Standard error, with every line passed through a [`Redactor`] first.
#[derive(Debug, Clone)]
struct RedactingStderr {
    redactor: Arc<Redactor>,
}

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter {
            redactor: &self.redactor,
        }
    }
}

/// One event's output. The formatter hands each event over in a single
/// `write_all` of the whole line, so a secret is never split across writes.
#[derive(Debug)]
struct RedactingWriter<'a> {
    redactor: &'a Redactor,
}

impl Write for RedactingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let clean = self.redactor.redact(&text);
        std::io::stderr().lock().write_all(clean.as_bytes())?;
        // All of `buf` is accounted for, so the caller never splits it.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
