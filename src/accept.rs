//! Admission: the listeners, who is given a session, and when accepting
//! pauses and resumes.
//!
//! Accepting stops at `max_connections` and resumes when sessions drop to
//! 90% of it (hysteresis: no flapping at the limit). When `accept` fails for
//! want of descriptors or memory, it pauses for [`BACKOFF`], or until a
//! session closes. An error of one client (an aborted handshake) is passed
//! over. Any other error is the listener's own (`EINVAL` from a listener
//! shut down under us): that listener alone rests for [`BACKOFF`], so it
//! neither spins the loop nor holds up the others. A paused listener gets
//! no new edge for connections already queued, so on resuming the loop
//! retries every listener.

use crate::conn::{Conn, Env};
use crate::stats::Stat;
use crate::timer::Kind;
use crate::token::{self, ID_MAX, Role};
use crate::warn::Warn;
use log::debug;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use slab::Slab;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Connections accepted per listener per turn; the rest wait for the end
/// of the turn, after the sessions.
const BATCH: usize = 64;
/// Pause after accept fails for want of descriptors or memory, and a
/// listener's rest after an error of its own.
pub(crate) const BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    /// At the session limit: resumes when sessions drop to `resume_at`.
    Full,
    /// accept failed for want of resources: resumes at the instant, or
    /// sooner when a session closes.
    Backoff(Instant),
    Stopped,
}

pub(crate) struct Accept {
    listeners: Vec<TcpListener>,
    /// By listener: resting until then after an error of its own.
    resting: Vec<Option<Instant>>,
    gate: Gate,
    max_conns: usize,
    resume_at: usize,
    /// The listen backlog, when known (for the pause warning).
    backlog: Option<u32>,
    next_id: u32,
    /// Workers running, and this one's index: worker `w` of `n` hands out
    /// the ids `w, w + n, w + 2n, ...`, so ids are unique across workers
    /// (in the log above all).
    id_step: u32,
    worker: u32,
}

/// What one call to [`Accept::accept`] leaves.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// The queue is empty, or accepting is paused.
    Done,
    /// The batch is used up with connections left: call again later.
    More,
}

impl Accept {
    pub(crate) fn new(listeners: Vec<TcpListener>, max_conns: usize, backlog: Option<u32>) -> Accept {
        let resume_at = max_conns - max_conns / 10 - 1;
        let resting = vec![None; listeners.len()];
        Accept {
            listeners,
            resting,
            gate: Gate::Open,
            max_conns,
            resume_at,
            backlog,
            next_id: 0,
            id_step: 1,
            worker: 0,
        }
    }

    /// This is worker `worker` of `workers`.
    pub(crate) fn worker(mut self, worker: usize, workers: usize) -> Accept {
        self.id_step = u32::try_from(workers).unwrap_or(1).max(1);
        self.worker = u32::try_from(worker).unwrap_or(0);
        self.next_id = self.worker & ID_MAX;
        self
    }

    pub(crate) fn max_conns(&self) -> usize {
        self.max_conns
    }

    pub(crate) fn listeners(&self) -> usize {
        self.listeners.len()
    }

    /// The id for the next session: ids count up through 31 bits, so a slot
    /// sees an id again only after 2^31 sessions (of all workers).
    fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = id.wrapping_add(self.id_step) & ID_MAX;
        id
    }

    /// Accepts up to a batch from listener `i` and admits each connection.
    pub(crate) fn accept(
        &mut self,
        i: usize,
        conns: &mut Slab<Conn>,
        env: &mut Env,
        registry: &Registry,
        now: Instant,
    ) -> Accepted {
        // Errors of one client in a row: a whole batch of them, with no
        // connection between, is the listener's own trouble however the
        // errno reads (a seccomp filter's EPERM, say).
        let mut client_errors = 0;
        for _ in 0..BATCH {
            if self.gate != Gate::Open {
                return Accepted::Done;
            }
            if load(conns.len(), env.third_fd) >= self.max_conns {
                self.gate = Gate::Full;
                env.stats.inc(Stat::AcceptPauses);
                let (max, resume) = (self.max_conns, self.resume_at);
                let queue = self.backlog.map_or("the listen backlog".to_string(), |b| format!("a backlog of {b}"));
                env.warnings.warn(
                    Warn::Full,
                    now,
                    format_args!(
                        "at max connections ({max}): accepting paused until {resume} are left; new clients wait \
                         in {queue} per listener, beyond it their SYNs are dropped and retried"
                    ),
                );
                return Accepted::Done;
            }
            let Some(listener) = self.listeners.get(i) else { return Accepted::Done };
            if self.resting.get(i).is_some_and(Option::is_some) {
                return Accepted::Done;
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    client_errors = 0;
                    self.admit(stream, peer, conns, env, registry, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Done,
                Err(e) if is_resource_error(&e) => {
                    self.gate = Gate::Backoff(now + BACKOFF);
                    env.stats.inc(Stat::AcceptBackoffs);
                    env.warnings.warn(Warn::Accept, now, format_args!("accept: {e}; pausing for {BACKOFF:?}"));
                    return Accepted::Done;
                }
                // Aborted handshakes and the like concern one client only.
                Err(e) if !listeners_own(&e, &mut client_errors) => debug!("accept: {e}"),
                Err(e) => {
                    if let Some(rest) = self.resting.get_mut(i) {
                        *rest = Some(now + BACKOFF);
                    }
                    env.stats.inc(Stat::ListenerRests);
                    env.warnings.warn(
                        Warn::Listener,
                        now,
                        format_args!("accept on listener {i}: {e}; retrying it in {BACKOFF:?}"),
                    );
                    return Accepted::Done;
                }
            }
        }
        Accepted::More
    }

    /// Rules and limits on the client address apply before any byte is
    /// read or written: a refused client is closed straight away.
    fn admit(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        conns: &mut Slab<Conn>,
        env: &mut Env,
        registry: &Registry,
        now: Instant,
    ) {
        env.stats.inc(Stat::Accepted);
        let key = conns.vacant_key();
        // Behind a load balancer the client rules and limits wait for the
        // PROXY header, which names the client; only trusted peers may
        // send one.
        let proxied = env.proxied.as_ref().map(|p| p.trusted(peer.ip()));
        if proxied == Some(false) {
            debug!("{peer} refused: not allowed to send a PROXY header");
            env.stats.inc(Stat::RuleDenials);
            return;
        }
        if proxied.is_none() && !env.rules.client_allowed(peer.ip()) {
            debug!("{peer} refused: not an allowed client");
            env.stats.inc(Stat::RuleDenials);
            return;
        }
        if proxied.is_none() && !env.limits.admit_client(key, peer.ip()) {
            env.warnings.warn(
                Warn::PerClient,
                now,
                format_args!("{peer} refused: its address has its maximum of connections"),
            );
            return;
        }
        // On Linux the accepted socket inherits TCP_NODELAY from the
        // listener (set when it was made): one syscall a session saved.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let id = self.next_id();
        let t = token::session(key, id, Role::Client);
        if let Err(e) = registry.register(&mut stream, t, Interest::READABLE | Interest::WRITABLE) {
            log::warn!("cannot register a new connection: {e}");
            env.limits.release(key, 0);
            return;
        }
        debug!("#{id} accepted from {peer} (worker {}, slot {key})", self.worker);
        let exempt = proxied.is_none() && env.rules.auth_exempt(peer.ip());
        conns.insert(Conn::new(id, stream, exempt, proxied.is_some(), &mut env.pool));
        if let Some(access) = &mut env.access {
            access.open(key, Some(peer), now);
        }
        env.open = conns.len();
        env.timers.set(key, Kind::Handshake, now);
    }

    /// A session has closed and `open` are left; true when accepting has
    /// just resumed, and so every listener must be retried. A closed session
    /// freed a descriptor, so it also ends a back-off.
    pub(crate) fn session_closed(&mut self, open: usize) -> bool {
        let resume = match self.gate {
            Gate::Full => open <= self.resume_at,
            Gate::Backoff(_) => true,
            Gate::Open | Gate::Stopped => false,
        };
        self.open_if(resume)
    }

    /// The loop's clock: true when a back-off (or a listener's rest) has
    /// just ended.
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        let mut rested = false;
        for rest in &mut self.resting {
            if rest.is_some_and(|at| now >= at) {
                *rest = None;
                rested = true;
            }
        }
        self.open_if(matches!(self.gate, Gate::Backoff(at) if now >= at)) || rested
    }

    fn open_if(&mut self, resume: bool) -> bool {
        if resume {
            self.gate = Gate::Open;
        }
        resume
    }

    /// When a back-off or a listener's rest ends, for the poll timeout.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let gate = match self.gate {
            Gate::Backoff(at) => Some(at),
            _ => None,
        };
        self.resting.iter().flatten().copied().chain(gate).min()
    }

    /// Closes the listeners for good.
    pub(crate) fn stop(&mut self, registry: &Registry) {
        for mut l in self.listeners.drain(..) {
            let _ = registry.deregister(&mut l);
        }
        self.resting.clear();
        self.gate = Gate::Stopped;
    }
}

/// Sessions counted against `max_connections`, which budgets two
/// descriptors a session: a session waiting in BIND or holding a UDP
/// association has a third, so two of them count as three sessions.
pub(crate) fn load(open: usize, third_fd: usize) -> usize {
    open + third_fd.div_ceil(2)
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Whether an accept error is the listener's own: not one client's, or a
/// client's that completes a whole batch of them in a row (`run` counts
/// the row; a connection accepted resets it).
fn listeners_own(e: &io::Error, run: &mut usize) -> bool {
    if is_client_error(e) && *run + 1 < BATCH {
        *run += 1;
        return false;
    }
    true
}

/// An error that concerns the connection being accepted, not the listener:
/// an aborted handshake, a firewall's refusal, an interrupted call, or a
/// network error already pending on the new socket (Linux passes those on
/// from `accept`; see accept(2)).
fn is_client_error(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    if e.raw_os_error() == Some(libc::ENONET) {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
                | libc::ETIMEDOUT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP
        )
    ) || e.kind() == io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: ids were masked with the wrong constant and every session
    /// got id 0, so nothing told a session from the one before it in its slot.
    #[test]
    fn ids_differ_back_to_back_and_wrap_after_2_pow_31() {
        let mut a = Accept::new(Vec::new(), 10, None);
        let ids: Vec<u32> = (0..1000).map(|_| a.next_id()).collect();
        for w in ids.windows(2) {
            assert_eq!(w[1], w[0] + 1);
        }
        a.next_id = ID_MAX - 1;
        assert_eq!((a.next_id(), a.next_id(), a.next_id()), (ID_MAX - 1, ID_MAX, 0));
    }

    /// Workers hand out disjoint ids: worker w of n counts w, w + n, ...
    #[test]
    fn workers_hand_out_disjoint_ids() {
        let mut seen = std::collections::HashSet::new();
        for w in 0..3 {
            let mut a = Accept::new(Vec::new(), 10, None).worker(w, 3);
            for _ in 0..100 {
                assert!(seen.insert(a.next_id()), "an id given twice");
            }
        }
        assert_eq!(seen.len(), 300);
        let mut a = Accept::new(Vec::new(), 10, None).worker(1, 2);
        assert_eq!((a.next_id(), a.next_id()), (1, 3));
    }

    #[test]
    fn hysteresis_and_backoff() {
        let now = Instant::now();
        let mut a = Accept::new(Vec::new(), 100, None);
        a.gate = Gate::Full;
        assert!(!a.session_closed(99), "one below the limit is not enough");
        assert!(!a.session_closed(90));
        assert!(a.session_closed(89), "resumes at 90% less one");
        assert!(!a.session_closed(0), "already open");
        a.gate = Gate::Backoff(now + BACKOFF);
        assert_eq!(a.deadline(), Some(now + BACKOFF));
        assert!(!a.tick(now), "still backing off");
        assert!(!a.tick(now + BACKOFF / 2));
        assert!(a.tick(now + BACKOFF), "the pause is over");
        a.gate = Gate::Backoff(now + BACKOFF);
        assert!(a.session_closed(99), "a closed session ends the back-off");
        assert!(!a.tick(now + BACKOFF), "nothing to resume");
    }

    /// A listener on loopback with `n` connections queued.
    fn queued(n: usize) -> (TcpListener, Vec<std::net::TcpStream>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let clients = (0..n).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        (TcpListener::from_std(l), clients)
    }

    /// Accepts from listener 0 once; the sessions admitted so far.
    fn accept_once(a: &mut Accept, conns: &mut Slab<Conn>, env: &mut Env, poll: &mio::Poll) -> Accepted {
        a.accept(0, conns, env, poll.registry(), Instant::now())
    }

    /// The queue is taken whole, then `Done`; more than a batch is taken a
    /// batch a call, with `More` until the queue is empty.
    #[test]
    fn accept_takes_the_queue_a_batch_at_a_time() {
        let (l, _clients) = queued(BATCH + 3);
        let (mut conns, mut env, poll) = (Slab::new(), crate::conn::tests::env(), mio::Poll::new().unwrap());
        let mut a = Accept::new(vec![l], 1000, None);
        assert_eq!(accept_once(&mut a, &mut conns, &mut env, &poll), Accepted::More);
        assert_eq!(conns.len(), BATCH);
        assert_eq!(accept_once(&mut a, &mut conns, &mut env, &poll), Accepted::Done);
        assert_eq!(conns.len(), BATCH + 3);
        assert_eq!(a.gate, Gate::Open);
        for (key, _) in conns.drain().enumerate() {
            env.limits.release(key, 0);
        }
    }

    /// At `max_connections` accepting pauses, with the rest still queued.
    #[test]
    fn accept_pauses_at_the_limit() {
        let (l, _clients) = queued(3);
        let (mut conns, mut env, poll) = (Slab::new(), crate::conn::tests::env(), mio::Poll::new().unwrap());
        let mut a = Accept::new(vec![l], 2, None);
        assert_eq!(accept_once(&mut a, &mut conns, &mut env, &poll), Accepted::Done);
        assert_eq!((conns.len(), a.gate), (2, Gate::Full));
    }

    /// A listener that fails for itself (`EINVAL`: shut down for reading,
    /// on Linux) rests alone for the back-off: one call, `Done` (not a
    /// batch of failures and `More`, which would spin the loop), accepting
    /// stays open for the others, and the rest ends on the clock.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_broken_listener_rests_alone() {
        let (l, _clients) = queued(0);
        socket2::SockRef::from(&l).shutdown(std::net::Shutdown::Read).unwrap();
        let (good, _queued) = queued(2);
        let (mut conns, mut env, poll) = (Slab::new(), crate::conn::tests::env(), mio::Poll::new().unwrap());
        let mut a = Accept::new(vec![l, good], 10, None);
        let now = Instant::now();
        assert_eq!(a.accept(0, &mut conns, &mut env, poll.registry(), now), Accepted::Done);
        assert_eq!(a.gate, Gate::Open, "no back-off for the others");
        assert_eq!(a.deadline(), Some(now + BACKOFF));
        // Asked again while it rests: not tried, so the rest stays as it was.
        let later = now + BACKOFF / 2;
        assert_eq!(a.accept(0, &mut conns, &mut env, poll.registry(), later), Accepted::Done);
        assert_eq!(a.deadline(), Some(now + BACKOFF), "a resting listener is not tried");
        assert_eq!(a.accept(1, &mut conns, &mut env, poll.registry(), now), Accepted::Done);
        assert_eq!(conns.len(), 2, "the other listener is served");
        let published = crate::stats::Published::default();
        env.stats.publish(&published);
        let text = crate::stats::render(std::iter::once(&published), 1);
        assert!(text.contains("\nslabsocks_listener_rests_total 1\n"), "one rest counted:\n{text}");
        assert!(!a.tick(now + BACKOFF / 2), "still resting");
        assert!(a.tick(now + BACKOFF), "the rest is over");
        assert_eq!(a.deadline(), None);
        for (key, _) in conns.drain().enumerate() {
            env.limits.release(key, 0);
        }
    }

    /// A row of client errors a whole batch long is the listener's own.
    #[test]
    fn a_batch_of_client_errors_is_the_listeners_own() {
        let (aborted, invalid) =
            (io::Error::from_raw_os_error(libc::ECONNABORTED), io::Error::from_raw_os_error(libc::EINVAL));
        let mut run = 0;
        for n in 1..BATCH {
            assert!(!listeners_own(&aborted, &mut run), "client error {n} of a row");
        }
        assert_eq!(run, BATCH - 1);
        assert!(listeners_own(&aborted, &mut run), "the batch-th in a row");
        assert!(listeners_own(&invalid, &mut 0), "EINVAL at once");
    }

    #[test]
    fn client_errors_are_the_connections_not_the_listeners() {
        for e in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM, libc::EINTR, libc::ENETUNREACH] {
            assert!(is_client_error(&io::Error::from_raw_os_error(e)), "{e}");
        }
        for e in [libc::EINVAL, libc::EBADF, libc::ENOTSOCK, libc::EMFILE] {
            assert!(!is_client_error(&io::Error::from_raw_os_error(e)), "{e}");
        }
    }

    #[test]
    fn resource_errors_are_the_want_of_descriptors_or_memory() {
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_error(&io::Error::from_raw_os_error(e)), "{e}");
        }
        for e in [libc::ECONNABORTED, libc::EINVAL, libc::EPERM] {
            assert!(!is_resource_error(&io::Error::from_raw_os_error(e)), "{e}");
        }
    }
}
