//! Logging: warnings and errors to stderr by default, more with `--log-level`, and the trace
//! points named by qemu-storage-daemon's `--trace` option.
//!
//! Our trace points are `tracing` targets (below); `--trace` patterns (`*` and `?` wildcards)
//! choose which of them log at every level. QEMU's own trace event names mean nothing here: a
//! pattern that matches none of ours is refused with the list, so a script that relied on a
//! QEMU event learns at start-up instead of logging nothing.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// The trace points (targets) and what they show.
pub const TRACE_POINTS: &[(&str, &str)] = &[
    (
        "qmp_command",
        "each QMP command (span), and its error when it fails",
    ),
    ("nbd_connection", "each NBD client connection (span)"),
    ("job", "each job while it runs (span: id, type)"),
    ("job_state_transition", "every job status change"),
    ("graph_edit", "nodes replaced, filters inserted and removed"),
    (
        "perm",
        "permission refreshes refused (conflicts, read-only nodes, image locks)",
    ),
    ("blockjobd", "the daemon's own warnings and errors"),
];

/// What `--trace` and `--log-level` asked for.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// Trace point patterns enabled at every level.
    pub patterns: Vec<String>,
    /// Where the log goes (default: stderr).
    pub file: Option<PathBuf>,
    /// Everything at this level or more severe is logged.
    pub level: Level,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            patterns: Vec::new(),
            file: None,
            level: Level::WARN,
        }
    }
}

/// `*` matches any run of characters, `?` any one.
pub fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Checks that every pattern names at least one of our trace points.
pub fn check_patterns(patterns: &[String]) -> Result<(), String> {
    for p in patterns {
        let p = p.strip_prefix('-').unwrap_or(p);
        if !TRACE_POINTS.iter().any(|(name, _)| glob(p, name)) {
            let names: Vec<&str> = TRACE_POINTS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "trace pattern '{p}' matches none of blockjobd's trace points ({}); QEMU's trace events do not exist here",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// The `--trace help` text.
pub fn help() -> String {
    TRACE_POINTS
        .iter()
        .map(|(n, what)| format!("{n}\t{what}\n"))
        .collect()
}

/// A log level name.
pub fn parse_level(s: &str) -> Result<Level, String> {
    match s {
        "error" => Ok(Level::ERROR),
        "warn" | "warning" => Ok(Level::WARN),
        "info" => Ok(Level::INFO),
        "debug" => Ok(Level::DEBUG),
        "trace" => Ok(Level::TRACE),
        other => Err(format!(
            "log level '{other}' is not one of error, warn, info, debug, trace"
        )),
    }
}

/// A writer shared by every thread: the log file, or stderr.
#[derive(Clone)]
struct Sink(Option<Arc<Mutex<File>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(f) => f.lock().unwrap_or_else(|p| p.into_inner()).write(buf),
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &self.0 {
            Some(f) => f.lock().unwrap_or_else(|p| p.into_inner()).flush(),
            None => std::io::stderr().flush(),
        }
    }
}

/// Installs the logger for the whole process.
pub fn init(cfg: &TraceConfig) -> Result<(), String> {
    let sink = match &cfg.file {
        Some(path) => {
            Some(Arc::new(Mutex::new(File::create(path).map_err(|e| {
                format!("--trace: cannot open '{}': {e}", path.display())
            })?)))
        }
        None => None,
    };
    let patterns = cfg.patterns.clone();
    let level = cfg.level;
    let enabled = move |target: &str| {
        // Later patterns win; a leading '-' disables (QEMU's syntax).
        let mut on = false;
        for p in &patterns {
            match p.strip_prefix('-') {
                Some(off) if glob(off, target) => on = false,
                None if glob(p, target) => on = true,
                _ => {}
            }
        }
        on
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(move || Sink(sink.clone()))
        .with_ansi(false)
        .with_target(true)
        .with_filter(filter_fn(move |meta| {
            *meta.level() <= level || enabled(meta.target())
        }));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| format!("cannot install the logger: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_our_trace_points_only() {
        assert!(glob("job*", "job_state_transition"));
        assert!(glob("*", "perm"));
        assert!(glob("nbd_?onnection", "nbd_connection"));
        assert!(!glob("job", "job_state_transition"));
        assert!(check_patterns(&["job*".into(), "-job".into()]).is_ok());
        let e = check_patterns(&["bdrv_co_preadv".into()]).expect_err("QEMU's");
        assert!(
            e.contains("matches none of blockjobd's trace points"),
            "{e}"
        );
        assert_eq!(parse_level("debug"), Ok(Level::DEBUG));
        assert!(parse_level("loud").is_err());
    }
}
