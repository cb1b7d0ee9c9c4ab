//! Operator warnings, rate-limited per kind so that a flood of one kind
//! (a password-guessing run, a connection storm) can neither fill the log
//! nor hide another kind. Lines dropped inside the interval are counted and
//! reported with the next line of their kind.

use std::fmt;
use std::time::{Duration, Instant};

/// Minimum interval between two lines of one kind.
pub(crate) const EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Warn {
    /// Accepting paused at the session limit.
    Full = 0,
    /// accept failed for want of descriptors or memory.
    Accept = 1,
    /// A client address at its session limit.
    PerClient = 2,
    /// The resolver queue is full.
    Resolver = 3,
    /// A failed login, or a user at its session limit.
    Login = 4,
    /// The UDP association limit reached.
    Udp = 5,
    /// A listener failed for itself and rests.
    Listener = 6,
}

const KINDS: usize = 7;

#[derive(Default)]
pub(crate) struct Warnings {
    last: [Option<Instant>; KINDS],
    suppressed: [u64; KINDS],
}

impl Warnings {
    /// Logs `msg` at warn level unless a line of this kind was logged less
    /// than [`EVERY`] before `now`; then it is only counted.
    pub(crate) fn warn(&mut self, kind: Warn, now: Instant, msg: fmt::Arguments<'_>) {
        if let Some(line) = self.line(kind, now, msg) {
            log::warn!("{line}");
        }
    }

    /// The line to log, if any (the rate limit without the logging).
    fn line<'a>(&mut self, kind: Warn, now: Instant, msg: fmt::Arguments<'a>) -> Option<Line<'a>> {
        let k = kind as usize;
        if self.last[k].is_some_and(|t| now < t + EVERY) {
            self.suppressed[k] += 1;
            return None;
        }
        self.last[k] = Some(now);
        Some(Line { msg, suppressed: std::mem::take(&mut self.suppressed[k]) })
    }
}

struct Line<'a> {
    msg: fmt::Arguments<'a>,
    suppressed: u64,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.suppressed {
            0 => write!(f, "{}", self.msg),
            n => write!(f, "{} ({n} similar suppressed since the last)", self.msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_kind_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let mut w = Warnings::default();
        let said =
            |kind, at: Duration, w: &mut Warnings| w.line(kind, t0 + at, format_args!("x")).map(|l| l.to_string());
        assert_eq!(said(Warn::Login, Duration::ZERO, &mut w).as_deref(), Some("x"));
        for ms in 1..=9 {
            assert_eq!(said(Warn::Login, Duration::from_millis(ms * 100), &mut w), None);
        }
        // Another kind is not held back by the first.
        assert_eq!(said(Warn::Full, Duration::from_secs(1), &mut w).as_deref(), Some("x"));
        assert_eq!(said(Warn::Login, EVERY - Duration::from_millis(1), &mut w), None);
        let next = said(Warn::Login, EVERY, &mut w);
        assert_eq!(next.as_deref(), Some("x (10 similar suppressed since the last)"));
        assert_eq!(said(Warn::Login, EVERY * 2, &mut w).as_deref(), Some("x"));
    }

    /// Keeps the warn-level lines of the test below (their text is unique
    /// to it; other tests in this binary may log concurrently).
    struct Kept;

    static KEPT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    impl log::Log for Kept {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= log::Level::Warn
        }
        fn log(&self, r: &log::Record<'_>) {
            let line = r.args().to_string();
            if r.level() == log::Level::Warn && line.starts_with("warn.rs test:") {
                KEPT.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        }
        fn flush(&self) {}
    }

    /// `warn` writes to the log exactly the lines the rate limit lets
    /// through, at warn level.
    #[test]
    fn warn_logs_the_lines_the_limit_lets_through() {
        let _ = log::set_logger(&Kept);
        log::set_max_level(log::LevelFilter::Warn);
        let t0 = Instant::now();
        let mut w = Warnings::default();
        for (i, at) in [Duration::ZERO, Duration::from_secs(1), EVERY].into_iter().enumerate() {
            w.warn(Warn::Udp, t0 + at, format_args!("warn.rs test: {i}"));
        }
        let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(kept, ["warn.rs test: 0", "warn.rs test: 2 (1 similar suppressed since the last)"]);
    }
}
