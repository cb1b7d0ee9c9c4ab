//! Session deadlines. Each kind of deadline has one fixed duration, so the
//! sessions waiting on a kind, in the order their deadlines were set, are
//! also in deadline order: a list per kind, threaded through a vector
//! indexed by slab key, gives O(1) set, cancel and expiry, and allocates
//! only when the slab grows past its old size.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// Greeting and request.
    Handshake = 0,
    /// Name resolution and the upstream connect.
    Connect = 1,
    /// A relaying session with no traffic.
    Idle = 2,
    /// A session that answered and is reading what the client still sends.
    Linger = 3,
    /// A BIND waiting for its peer.
    Bind = 4,
    /// A UDP association with no datagrams.
    UdpIdle = 5,
}

pub(crate) const KINDS: usize = 6;

/// How long a session lingers after its last answer (see `conn/linger.rs`).
pub(crate) const LINGER: Duration = Duration::from_secs(2);
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    /// Milliseconds since `Timers::base`.
    deadline: u64,
    /// `KINDS` when unlinked.
    kind: u8,
}

const UNLINKED: Link = Link { prev: NIL, next: NIL, deadline: 0, kind: KINDS as u8 };

pub(crate) struct Timers {
    base: Instant,
    dur: [u64; KINDS],
    head: [u32; KINDS],
    tail: [u32; KINDS],
    links: Vec<Link>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4)
}

impl Timers {
    /// `durations` in [`Kind`] order. A kind whose duration is `None` is
    /// never armed.
    pub(crate) fn new(base: Instant, durations: [Option<Duration>; KINDS]) -> Timers {
        Timers {
            base,
            dur: durations.map(|d| d.map_or(u64::MAX, millis)),
            head: [NIL; KINDS],
            tail: [NIL; KINDS],
            links: Vec::new(),
        }
    }

    fn now_ms(&self, now: Instant) -> u64 {
        millis(now.saturating_duration_since(self.base))
    }

    /// Arms `kind` for session `key`, replacing whatever it had.
    pub(crate) fn set(&mut self, key: usize, kind: Kind, now: Instant) {
        self.cancel(key);
        let k = kind as usize;
        if self.dur[k] == u64::MAX {
            return;
        }
        if self.links.len() <= key {
            self.links.resize(key + 1, UNLINKED);
        }
        let deadline = self.now_ms(now).saturating_add(self.dur[k]);
        let me = key as u32;
        self.links[key] = Link { prev: self.tail[k], next: NIL, deadline, kind: kind as u8 };
        match self.tail[k] {
            NIL => self.head[k] = me,
            t => self.links[t as usize].next = me,
        }
        self.tail[k] = me;
    }

    /// Pushes an armed deadline of `kind` (an idle kind) back to
    /// `now + its duration`. Cheap when called on every relay event or
    /// datagram: it relinks only when the deadline would move by more than
    /// 1/16 of the timeout (so it may fire that much early).
    pub(crate) fn touch(&mut self, key: usize, kind: Kind, now: Instant) {
        let k = kind as usize;
        if let Some(link) = self.links.get(key)
            && link.kind == kind as u8
            && (self.now_ms(now) + self.dur[k]).saturating_sub(link.deadline) > self.dur[k] / 16
        {
            self.set(key, kind, now);
        }
    }

    pub(crate) fn cancel(&mut self, key: usize) {
        let Some(&link) = self.links.get(key) else { return };
        let k = usize::from(link.kind);
        if k == KINDS {
            return;
        }
        match link.prev {
            NIL => self.head[k] = link.next,
            p => self.links[p as usize].next = link.next,
        }
        match link.next {
            NIL => self.tail[k] = link.prev,
            n => self.links[n as usize].prev = link.prev,
        }
        self.links[key] = UNLINKED;
    }

    /// The earliest armed deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let ms = self.head.iter().filter(|&&h| h != NIL).map(|&h| self.links[h as usize].deadline).min()?;
        Some(self.base + Duration::from_millis(ms))
    }

    /// Disarms and returns one session whose deadline has passed.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(usize, Kind)> {
        let now = self.now_ms(now);
        for (k, kind) in [Kind::Handshake, Kind::Connect, Kind::Idle, Kind::Linger, Kind::Bind, Kind::UdpIdle]
            .into_iter()
            .enumerate()
        {
            let h = self.head[k];
            if h != NIL && self.links[h as usize].deadline <= now {
                self.cancel(h as usize);
                return Some((h as usize, kind));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timers(t0: Instant) -> Timers {
        let s = |n| Some(Duration::from_secs(n));
        Timers::new(t0, [s(10), s(5), s(60), s(2), s(60), s(120)])
    }

    /// Every session expired at `now`, in the order popped. Bounded, so a
    /// broken unlink fails the test instead of hanging it.
    fn expired(t: &mut Timers, now: Instant) -> Vec<(usize, Kind)> {
        std::iter::from_fn(|| t.pop_expired(now)).take(64).collect()
    }

    #[test]
    fn expire_in_deadline_order_across_kinds() {
        let t0 = Instant::now();
        let mut t = timers(t0);
        t.set(3, Kind::Handshake, t0); // 10 s
        t.set(1, Kind::Connect, t0 + Duration::from_secs(1)); // 6 s
        t.set(7, Kind::Handshake, t0 + Duration::from_secs(2)); // 12 s
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(6)));
        assert_eq!(t.pop_expired(t0 + Duration::from_secs(5)), None);
        let mut got = expired(&mut t, t0 + Duration::from_secs(20));
        got.sort();
        assert_eq!(got, [(1, Kind::Connect), (3, Kind::Handshake), (7, Kind::Handshake)]);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn cancel_and_rearm_unlink_cleanly() {
        let t0 = Instant::now();
        let mut t = timers(t0);
        for key in 0..5 {
            t.set(key, Kind::Handshake, t0);
        }
        t.cancel(0); // head
        t.cancel(2); // middle
        t.cancel(4); // tail
        t.cancel(4); // twice is harmless
        t.set(1, Kind::Connect, t0); // moves to another list
        assert_eq!(expired(&mut t, t0 + Duration::from_secs(100)), [(3, Kind::Handshake), (1, Kind::Connect)]);
    }

    /// A timeout too long to count in milliseconds (`--idle-timeout` of
    /// u64::MAX seconds) is as good as never, not a few milliseconds.
    #[test]
    fn a_timeout_beyond_the_millisecond_range_never_fires() {
        let t0 = Instant::now();
        let forever = Some(Duration::from_secs(u64::MAX));
        let mut t = Timers::new(t0, [forever; KINDS]);
        t.set(0, Kind::Idle, t0);
        let a_century = t0 + Duration::from_secs(100 * 365 * 24 * 3600);
        assert_eq!(t.pop_expired(a_century), None);
    }

    /// `touch` relinks only when the deadline would move by more than 1/16
    /// of the timeout: exactly 1/16 leaves it where it was.
    #[test]
    fn touch_by_exactly_a_sixteenth_keeps_the_deadline() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, [None, None, Some(Duration::from_secs(16)), None, None, None]);
        t.set(0, Kind::Idle, t0);
        t.touch(0, Kind::Idle, t0 + Duration::from_secs(1));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(16)));
        t.touch(0, Kind::Idle, t0 + Duration::from_millis(1001));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(17_001)));
    }

    #[test]
    fn touch_moves_idle_deadline_and_disabled_kinds_never_fire() {
        let t0 = Instant::now();
        let mut t =
            Timers::new(t0, [Some(Duration::from_secs(1)), None, Some(Duration::from_secs(16)), None, None, None]);
        t.set(0, Kind::Connect, t0);
        assert_eq!(t.next_deadline(), None);
        t.set(0, Kind::Idle, t0);
        t.touch(0, Kind::Idle, t0 + Duration::from_millis(500)); // under 1/16: stays
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(16)));
        t.touch(0, Kind::Idle, t0 + Duration::from_secs(10));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(26)));
        assert_eq!(t.pop_expired(t0 + Duration::from_secs(20)), None);
        assert_eq!(t.pop_expired(t0 + Duration::from_secs(26)), Some((0, Kind::Idle)));
    }
}
