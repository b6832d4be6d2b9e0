//! The daemon's log: `tracing` to stderr, as text or as JSON lines.
//!
//! The operator's filter (`log`, or `RUST_LOG`) is extended with quieter
//! levels for dependencies that log expected events loudly: matrix-sdk logs
//! every failed HTTP request at ERROR, including the 404s it expects while
//! reading account data and room state, and wraps each line in its sync
//! span; its crypto layer warns of what a bot without key backup expects
//! (no backup key, its own new device, a key query still pending). Kennel's
//! own code reports the failures that matter (a sync that
//! fails, a login refused) at WARN. A target the operator names in the
//! filter keeps the operator's level.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event, with its spans' fields.
    #[default]
    Text,
    /// One JSON object per line (for log shippers): `timestamp`, `level`,
    /// `target`, `fields`, the current `span` and every enclosing one in
    /// `spans` (with their fields: project, user, session, ...).
    Json,
}

/// Dependencies' targets and the level each logs at unless the operator's
/// filter names it.
const QUIET: &[(&str, &str)] = &[
    ("matrix_sdk::http_client", "off"),
    ("matrix_sdk", "warn"),
    ("matrix_sdk_base", "warn"),
    ("matrix_sdk_crypto", "error"),
    ("matrix_sdk_common", "warn"),
    ("matrix_sdk_sqlite", "warn"),
    ("serenity", "warn"),
    ("russh", "warn"),
    ("hyper", "warn"),
    ("hyper_util", "warn"),
    ("rustls", "warn"),
    ("h2", "warn"),
    ("reqwest", "warn"),
];

/// The operator's filter with [`QUIET`]'s levels for the targets it does
/// not name. A filter that names a parent (`matrix_sdk=debug`) keeps its
/// children too.
pub fn filter_with_quiet_deps(user: &str) -> String {
    let named: Vec<&str> = user
        .split(',')
        .filter_map(|d| d.split('=').next())
        .map(|t| t.split('[').next().unwrap_or(t).trim())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = String::new();
    for (target, level) in QUIET {
        let covered = named
            .iter()
            .any(|n| target == n || target.starts_with(&format!("{n}::")));
        if !covered {
            out.push_str(&format!("{target}={level},"));
        }
    }
    out.push_str(user);
    out
}

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// A line for a person watching the daemon's stderr (where it listens,
/// that it stopped). With JSON logs it is left out: every such line has a
/// log event beside it, and stderr stays one JSON object per line.
pub fn tell(line: std::fmt::Arguments<'_>) {
    if FORMAT.get().copied().unwrap_or_default() == LogFormat::Text {
        eprintln!("{line}");
    }
}

/// Starts logging to stderr. `RUST_LOG`, when set, replaces `filter`.
pub fn init(filter: &str, format: LogFormat) {
    let _ = FORMAT.set(format);
    let user = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let filter = EnvFilter::try_new(filter_with_quiet_deps(&user))
        .unwrap_or_else(|_| EnvFilter::new(filter_with_quiet_deps("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_levels_come_first_and_yield_to_what_the_operator_names() {
        let f = filter_with_quiet_deps("info");
        assert!(f.starts_with("matrix_sdk::http_client=off,matrix_sdk=warn,"));
        assert!(f.ends_with(",info"));
        let f = filter_with_quiet_deps("info,matrix_sdk=debug");
        assert!(!f.contains("matrix_sdk=warn"), "{f}");
        assert!(!f.contains("matrix_sdk::http_client"), "{f}");
        assert!(f.contains("matrix_sdk_base=warn"), "{f}");
        let f = filter_with_quiet_deps("russh[session]=trace");
        assert!(!f.contains("russh=warn"), "{f}");
        for f in [filter_with_quiet_deps("info"), filter_with_quiet_deps("")] {
            assert!(EnvFilter::try_new(&f).is_ok(), "{f}");
        }
    }
}
