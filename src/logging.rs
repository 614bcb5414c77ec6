//! One line per event on stderr. Under systemd (`JOURNAL_STREAM` set) each line starts
//! with the syslog priority (`<3>` error .. `<7>` debug) and has no timestamp, so
//! `journalctl -p warning` filters by level; elsewhere lines carry an RFC 3339 time
//! and the level word. Other crates' records are shown from `warn` up only.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    journald: bool,
    /// Our own crate's level, changeable at run time (SIGHUP).
    level: AtomicUsize,
}

static LOGGER: Logger = Logger {
    journald: false,
    level: AtomicUsize::new(LevelFilter::Info as usize),
};
static LOGGER_JOURNALD: Logger = Logger {
    journald: true,
    level: AtomicUsize::new(LevelFilter::Info as usize),
};

fn active() -> &'static Logger {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        &LOGGER_JOURNALD
    } else {
        &LOGGER
    }
}

/// Installs the logger. Safe to call more than once (later calls change the level).
pub fn init(level: LevelFilter) {
    let logger = active();
    let _ = log::set_logger(logger);
    set_level(level);
}

/// Changes our level (SIGHUP re-reads `log_level`).
pub fn set_level(level: LevelFilter) {
    active().level.store(level as usize, Ordering::Relaxed);
    log::set_max_level(level.max(LevelFilter::Warn));
}

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The text of one log line (without the newline).
fn format_line(journald: bool, level: Level, now_ms: u64, msg: &str) -> String {
    // One event, one line: a newline inside a message would forge a second entry.
    let msg = msg.replace(['\n', '\r'], " ");
    if journald {
        format!("<{}>{msg}", priority(level))
    } else {
        format!(
            "{} {:<5} {msg}",
            crate::util::rfc3339(now_ms),
            level.as_str()
        )
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        let ours = m.target().starts_with("krill");
        let limit = if ours {
            self.level.load(Ordering::Relaxed)
        } else {
            LevelFilter::Warn as usize
        };
        (m.level() as usize) <= limit
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut line = format_line(
            self.journald,
            r.level(),
            crate::util::now_ms(),
            &r.args().to_string(),
        );
        if !r.target().starts_with("krill") {
            line.push_str(&format!(" ({})", r.target()));
        }
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_lines_have_priority_and_no_time() {
        assert_eq!(format_line(true, Level::Error, 0, "boom"), "<3>boom");
        assert_eq!(format_line(true, Level::Warn, 0, "w"), "<4>w");
        assert_eq!(format_line(true, Level::Info, 0, "i"), "<6>i");
        assert_eq!(format_line(true, Level::Debug, 0, "d"), "<7>d");
    }

    #[test]
    fn plain_lines_have_time_and_level() {
        assert_eq!(
            format_line(false, Level::Warn, 1_764_000_000_123, "x"),
            "2025-11-24T16:00:00.123Z WARN  x"
        );
    }

    #[test]
    fn newlines_cannot_forge_entries() {
        assert_eq!(format_line(true, Level::Info, 0, "a\n<3>b"), "<6>a <3>b");
    }
}
