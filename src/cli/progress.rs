//! Progress bars for long command-line runs: on stderr, and only when it is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// Runs shorter than this many messages get no bar: they end before one would help.
const LONG_RUN: u64 = 100;

/// What the bar shows: what it does, how far, how fast, and how long is left.
const TEMPLATE: &str = "{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)";

/// A bar counting `len` messages, labelled `verb`. It is hidden when the run is short
/// or stderr is not a terminal (indicatif's stderr target hides itself then, so pipes
/// and log files get no escape codes), and it clears itself when dropped, so an error
/// line printed afterwards stands alone.
pub(crate) fn bar(len: u64, verb: &'static str) -> ProgressBar {
    if len < LONG_RUN {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(TEMPLATE)
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
        .with_style(style)
        .with_message(verb)
        .with_finish(ProgressFinish::AndClear)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_get_no_bar() {
        assert!(bar(LONG_RUN - 1, "publishing").is_hidden());
    }

    #[test]
    fn the_template_is_valid() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
    }
}
