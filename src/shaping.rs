//! Traffic shaping (`--rate-limit`, `--user-rate-limit`): token buckets
//! inside the loop, one per session and direction, and one per user and
//! direction (per worker). A direction reads at most what its buckets
//! hold; an empty bucket stops it reading, and a wake-up timer (not
//! polling) drives it again when the buckets have refilled. Buckets are
//! plain numbers beside the slab, made at the first shaped read, so
//! shaping allocates nothing on the relay path once warm, and a server
//! without it pays nothing.

use crate::timer::{KINDS, Kind, Timers};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a throttled direction waits before it tries again: short
/// enough that the rate is smooth, long enough that a throttled session
/// costs a few wake-ups a second at most... 100 a second, each a refill.
pub(crate) const TICK: Duration = Duration::from_millis(10);

#[derive(Clone, Copy)]
struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    fn full(burst: u64, now: Instant) -> Bucket {
        Bucket { tokens: burst, last: now }
    }

    fn refill(&mut self, rate: u64, burst: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = (rate as u128 * elapsed.as_micros() / 1_000_000) as u64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(burst);
            self.last = now;
        }
    }
}

/// A rate in bytes per second and its burst: an eighth of a second's
/// worth, at least 64 KiB (so that one read of a relay buffer fits).
#[derive(Clone, Copy)]
struct Rate {
    rate: u64,
    burst: u64,
}

impl Rate {
    fn new(rate: u64) -> Rate {
        Rate { rate, burst: (rate / 8).max(64 * 1024) }
    }
}

pub(crate) struct Shaping {
    session: Option<Rate>,
    user: Option<Rate>,
    sessions: Vec<Option<[Bucket; 2]>>,
    users: HashMap<u32, [Bucket; 2]>,
    /// Wake-ups of throttled sessions (one kind, [`TICK`]).
    pub wake: Timers,
}

impl Shaping {
    /// `None` when neither limit is set.
    pub(crate) fn new(session: Option<u64>, user: Option<u64>, now: Instant) -> Option<Shaping> {
        if session.is_none() && user.is_none() {
            return None;
        }
        let mut durations = [None; KINDS];
        durations[Kind::Idle as usize] = Some(TICK);
        Some(Shaping {
            session: session.map(Rate::new),
            user: user.map(Rate::new),
            sessions: Vec::new(),
            users: HashMap::new(),
            wake: Timers::new(now, durations),
        })
    }

    /// Bytes direction `dir` (0 up, 1 down) of the session in slot `key`,
    /// logged in as `user` (0: none), may read now.
    pub(crate) fn allowance(&mut self, key: usize, user: u32, dir: usize, now: Instant) -> u64 {
        let mut allow = u64::MAX;
        if let Some(r) = self.session {
            if self.sessions.len() <= key {
                self.sessions.resize(key + 1, None);
            }
            let b = &mut self.sessions[key].get_or_insert_with(|| [Bucket::full(r.burst, now); 2])[dir];
            b.refill(r.rate, r.burst, now);
            allow = allow.min(b.tokens);
        }
        if let Some(r) = self.user
            && let Some(b) = self.users.get_mut(&user)
        {
            let b = &mut b[dir];
            b.refill(r.rate, r.burst, now);
            allow = allow.min(b.tokens);
        }
        allow
    }

    /// `user` logged in: its buckets are made now, at login, not on the
    /// relay path (and kept, full or not, for its next sessions).
    pub(crate) fn logged_in(&mut self, user: u32, now: Instant) {
        if let Some(r) = self.user
            && user != 0
        {
            self.users.entry(user).or_insert_with(|| [Bucket::full(r.burst, now); 2]);
        }
    }

    /// Direction `dir` read `n` bytes.
    pub(crate) fn spend(&mut self, key: usize, user: u32, dir: usize, n: u64) {
        if let Some(Some(b)) = self.sessions.get_mut(key) {
            b[dir].tokens = b[dir].tokens.saturating_sub(n);
        }
        if user != 0
            && let Some(b) = self.users.get_mut(&user)
        {
            b[dir].tokens = b[dir].tokens.saturating_sub(n);
        }
    }

    /// The session in slot `key` must wait for its buckets.
    pub(crate) fn throttled(&mut self, key: usize, now: Instant) {
        self.wake.set(key, Kind::Idle, now);
    }

    /// The session in slot `key` has gone: its buckets are forgotten.
    pub(crate) fn closed(&mut self, key: usize) {
        self.wake.cancel(key);
        if let Some(b) = self.sessions.get_mut(key) {
            *b = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket starts full (the burst), empties as bytes are read, and
    /// refills at the rate, never beyond the burst.
    #[test]
    fn buckets_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut s = Shaping::new(Some(1 << 20), None, t0).unwrap();
        let burst = 128 * 1024;
        assert_eq!(s.allowance(3, 0, 0, t0), burst);
        s.spend(3, 0, 0, burst);
        assert_eq!(s.allowance(3, 0, 0, t0), 0);
        assert_eq!(s.allowance(3, 0, 1, t0), burst, "directions are separate");
        assert_eq!(s.allowance(3, 0, 0, t0 + Duration::from_millis(100)), (1 << 20) / 10);
        assert_eq!(s.allowance(3, 0, 0, t0 + Duration::from_secs(10)), burst, "capped at the burst");
        s.spend(3, 0, 0, burst);
        s.closed(3);
        assert_eq!(s.allowance(3, 0, 0, t0 + Duration::from_secs(10)), burst, "a new session in the slot starts full");
        assert_eq!(s.allowance(3, 0, 1, t0), burst);
    }

    /// A slow rate polled often still refills: time that added less than a
    /// byte is kept, not lost, so 1 000 calls a second at 100 bytes a
    /// second bring 100 bytes.
    #[test]
    fn a_slow_rate_polled_often_still_refills() {
        let t0 = Instant::now();
        let mut s = Shaping::new(Some(100), None, t0).unwrap();
        let burst = s.allowance(0, 0, 0, t0);
        s.spend(0, 0, 0, burst);
        let mut allow = 0;
        for ms in 1..=1000 {
            allow = s.allowance(0, 0, 0, t0 + Duration::from_millis(ms));
        }
        assert_eq!(allow, 100);
    }

    /// A user's sessions share its buckets; the tighter limit wins.
    #[test]
    fn users_share_a_bucket() {
        let t0 = Instant::now();
        let mut s = Shaping::new(Some(10 << 20), Some(1 << 20), t0).unwrap();
        let burst = 128 * 1024;
        s.logged_in(7, t0);
        s.logged_in(8, t0);
        assert_eq!(s.allowance(0, 7, 0, t0), burst, "the user's burst is the smaller");
        s.spend(0, 7, 0, burst);
        assert_eq!(s.allowance(1, 7, 0, t0), 0, "another session of the user");
        assert_eq!(s.allowance(1, 8, 0, t0), burst, "another user");
        assert_eq!(s.allowance(1, 0, 0, t0), 10 << 20 >> 3, "no user: the session's bucket only");
        assert!(Shaping::new(None, None, t0).is_none());
    }
}
