//! How the binary talks to the person running it: log lines on standard error (format, level,
//! colour) and, when a command fails, one error naming what to fix.
//!
//! **Colour** only when standard error is a terminal and `NO_COLOR` is unset
//! (<https://no-color.org>): log files and `kubectl logs` used to be full of escape codes.
//!
//! **Level** from `--log-level` (a `tracing` filter: `debug`, `warn`, `info,tether::proxy=debug`),
//! else `RUST_LOG`, else `info` with russh's chatter at `warn`.
//!
//! **Errors** print their chain once: most of our error types name their cause in their own
//! message (so a log line carries it) and also keep it as `source` (so callers can inspect it);
//! printing both said every cause twice. A cause already contained in what was printed is skipped.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Context as _;

use tracing_subscriber::EnvFilter;

/// The filter when neither `--log-level` nor `RUST_LOG` says otherwise.
const DEFAULT_FILTER: &str = "info,russh=warn";

/// Why a `--log-level` was not accepted.
#[derive(Debug, thiserror::Error)]
#[error("--log-level {value:?}: {source}")]
pub struct LogLevelError {
    /// What was given.
    value: String,
    /// Why `tracing` refused it.
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

/// The log filter: `--log-level` if given, else `RUST_LOG` if set and valid, else the default.
pub fn log_filter(level: Option<&str>) -> Result<EnvFilter, LogLevelError> {
    match level {
        Some(value) => EnvFilter::try_new(value).map_err(|source| LogLevelError {
            value: value.to_owned(),
            source,
        }),
        None => Ok(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        ),
    }
}

/// Whether log lines may carry colour: a terminal, and no `NO_COLOR` (any non-empty value).
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the process's log subscriber (text or JSON lines) on standard error; with
/// `audit_log`, audit records ([`tether::proxy::audit::TARGET`]) go to that file instead, as
/// JSON lines, whatever the log level.
pub fn init_logging(
    format: LogFormat,
    level: Option<&str>,
    audit_log: Option<&Path>,
) -> anyhow::Result<()> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::{FilterExt as _, filter_fn};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = log_filter(level)?;
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let audit_apart = audit_log.is_some();
    let not_audit = filter_fn(move |m| !(audit_apart && m.target() == AUDIT));
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let stderr = match format {
        LogFormat::Json => stderr.json().with_filter(filter.and(not_audit)).boxed(),
        LogFormat::Text => stderr.with_filter(filter.and(not_audit)).boxed(),
    };
    let audit = match audit_log {
        Some(path) => {
            let file = open_audit_log(path)?;
            let only_audit = filter_fn(|m| m.target() == AUDIT);
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .with_filter(only_audit);
            Some(layer)
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(audit)
        .init();
    Ok(())
}

/// The target of audit records.
const AUDIT: &str = tether::proxy::audit::TARGET;

/// Opens (appending, created readable by its owner only) the `--audit-log` file.
fn open_audit_log(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "--audit-log {}: cannot open it for appending",
                path.display()
            )
        })
}

/// The lines to print for a failed command: the error, then each cause not already said.
pub fn error_lines(error: &anyhow::Error) -> Vec<String> {
    let mut said = String::new();
    let mut lines = Vec::new();
    for (i, cause) in error.chain().enumerate() {
        let text = cause.to_string();
        if i > 0 && said.contains(&text) {
            continue;
        }
        lines.push(if i == 0 {
            format!("error: {text}")
        } else {
            format!("  caused by: {text}")
        });
        said.push_str(&text);
        said.push('\n');
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read key: {source}")]
    struct Quoting {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let error = anyhow::Error::new(Quoting { source: io }).context("--identity key");
        assert_eq!(
            error_lines(&error),
            [
                "error: --identity key",
                "  caused by: cannot read key: No such file"
            ]
        );
    }

    #[test]
    fn a_cause_not_yet_said_is_printed() {
        let error = anyhow::anyhow!("Address already in use").context("--listen 127.0.0.1:1");
        assert_eq!(
            error_lines(&error),
            [
                "error: --listen 127.0.0.1:1",
                "  caused by: Address already in use"
            ]
        );
    }

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None));
        assert!(!use_colour(true, Some("1".as_ref())));
        assert!(use_colour(true, Some("".as_ref())));
    }

    #[test]
    fn a_bad_log_level_names_the_flag() {
        let e = log_filter(Some("info,=[")).expect_err("not a filter");
        assert!(
            e.to_string().starts_with("--log-level \"info,=[\": "),
            "{e}"
        );
        assert!(log_filter(Some("debug")).is_ok());
    }
}
