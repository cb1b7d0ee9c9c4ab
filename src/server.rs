//! The poll loop: listeners, sessions, the resolver's wake-ups and the
//! deadlines, on one thread.

use crate::buf::{Pool, TRIM_PERIOD};
use crate::config::Config;
use crate::conn::{Conn, Ctx, Ready, Step};
use crate::limits::Limits;
use crate::resolver::{Answer, Resolver};
use crate::rules::Rules;
use crate::sys;
use crate::timer::Timers;
use crate::users::Users;
use log::{debug, error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// Token layout: | session id (high half) | slab key | role (1 bit) |.
// The id makes a token unique to one session, so an event, a resolver
// answer or a deferred turn for a session that has gone (its slot perhaps
// reused) is recognised and dropped. Ids never have all high bits set, so
// the reserved tokens at the top of the range cannot collide with a session.
const HALF: u32 = usize::BITS / 2;
const KEY_MASK: usize = (1 << (HALF - 1)) - 1;
const ID_MASK: u32 = ((1u64 << HALF) - 2) as u32;
const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1;
/// At most this many listeners (and so reserved tokens below the waker).
const MAX_LISTENERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client = 0,
    Upstream = 1,
}

pub(crate) fn token(key: usize, id: u32, role: Role) -> Token {
    Token(((id & ID_MASK) as usize) << HALF | key << 1 | role as usize)
}

fn listener_index(t: Token) -> Option<usize> {
    let i = LISTENER_BASE.checked_sub(t.0)?;
    (i < MAX_LISTENERS).then_some(i)
}

fn split(t: Token) -> (usize, u32, Role) {
    let role = if t.0 & 1 == 0 { Role::Client } else { Role::Upstream };
    ((t.0 >> 1) & KEY_MASK, (t.0 >> HALF) as u32, role)
}

/// Connections accepted per listener per turn.
const ACCEPT_BATCH: usize = 64;
/// Pause after accept fails for want of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Minimum interval between repeated operator warnings.
const WARN_EVERY: Duration = Duration::from_secs(5);

struct Shared {
    stop: AtomicBool,
    sessions: AtomicUsize,
    /// A users table waiting to replace the loop's.
    new_users: Mutex<Option<Users>>,
}

/// Stops a running [`Server`] from another thread, and reports on it.
#[derive(Clone)]
pub struct Handle {
    waker: Arc<Waker>,
    shared: Arc<Shared>,
}

impl Handle {
    /// Stops accepting; open sessions get `shutdown_grace` to finish, then
    /// `run` returns. Safe to call more than once, from any thread.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the loop for shutdown: {e}");
        }
    }

    /// Replaces the users table; sessions already open are not touched.
    /// (The binary calls this on SIGHUP after re-reading `--users`.)
    pub fn set_users(&self, users: Users) {
        *self.shared.new_users.lock().unwrap_or_else(|p| p.into_inner()) = Some(users);
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the loop for new users: {e}");
        }
    }

    /// Sessions open (any state), as of the loop's last turn.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.load(Ordering::Relaxed)
    }
}

/// A SOCKS5 server: bound, not yet running.
pub struct Server {
    poll: Poll,
    listeners: Vec<TcpListener>,
    addrs: Vec<SocketAddr>,
    config: Config,
    max_conns: usize,
    waker: Arc<Waker>,
    shared: Arc<Shared>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Server {
    /// Validates `config` and binds every listen address.
    pub fn bind(config: Config) -> io::Result<Server> {
        config.validate().map_err(|e| invalid(e.0))?;
        let mut listeners = Vec::with_capacity(config.listen.len());
        for &addr in &config.listen {
            let l = TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            listeners.push(l);
        }
        Server::with_listeners(listeners, config)
    }

    /// Serves on a listener bound elsewhere (`config.listen` is ignored).
    pub fn from_listener(listener: std::net::TcpListener, config: Config) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        Server::with_listeners(vec![TcpListener::from_std(listener)], config)
    }

    fn with_listeners(mut listeners: Vec<TcpListener>, config: Config) -> io::Result<Server> {
        let config = Config { listen: vec![SocketAddr::from(([0, 0, 0, 0], 0))], ..config };
        config.validate().map_err(|e| invalid(e.0))?;
        if listeners.len() > MAX_LISTENERS {
            return Err(invalid(format!("at most {MAX_LISTENERS} listen addresses")));
        }
        let poll = Poll::new()?;
        let mut addrs = Vec::with_capacity(listeners.len());
        for (i, l) in listeners.iter_mut().enumerate() {
            addrs.push(l.local_addr()?);
            poll.registry().register(l, Token(LISTENER_BASE - i), Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let max_conns = match config.max_connections {
            Some(n) => n,
            None => sys::max_connections_for(sys::nofile_limit()?),
        }
        .min(KEY_MASK);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            sessions: AtomicUsize::new(0),
            new_users: Mutex::new(None),
        });
        Ok(Server { poll, listeners, addrs, config, max_conns, waker, shared })
    }

    /// The bound addresses, in `config.listen` order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The session limit in force.
    pub fn max_connections(&self) -> usize {
        self.max_conns
    }

    pub fn handle(&self) -> Handle {
        Handle { waker: Arc::clone(&self.waker), shared: Arc::clone(&self.shared) }
    }

    /// Serves until [`Handle::shutdown`]; then lets open sessions finish for
    /// the grace period and returns.
    pub fn run(self) -> io::Result<()> {
        let resolver = match self.config.resolver_threads {
            0 => None,
            n => Some(Resolver::start(n, Arc::clone(&self.waker), self.config.lookup.clone())?),
        };
        let c = &self.config;
        let r = &c.rules;
        info!(
            "listening on {:?}; max connections {}, buffer {} B, handshake timeout {:?}, connect timeout {:?}, \
             idle timeout {}, resolver threads {}; login {}; rules: {} client, {} exempt, {} allow-dest, {} deny-dest{}",
            self.addrs,
            self.max_conns,
            c.buffer_size,
            c.handshake_timeout,
            c.connect_timeout,
            c.idle_timeout.map_or("off".to_string(), |d| format!("{d:?}")),
            c.resolver_threads,
            c.users.as_ref().map_or("not required".to_string(), |u| format!("required ({} users)", u.len())),
            r.allow_client.len(),
            r.auth_exempt.len(),
            r.allow_dest.len(),
            r.deny_dest.len(),
            if r.deny_private_dest { ", private destinations denied" } else { "" },
        );
        let now = Instant::now();
        let mut lp = Loop {
            env: Env {
                timers: Timers::new(now, [Some(c.handshake_timeout), Some(c.connect_timeout), c.idle_timeout]),
                pool: Pool::new(c.buffer_size),
                resolver,
                resolver_full: 0,
                users: c.users.clone(),
                rules: c.rules.clone(),
                limits: Limits::new(c.max_connections_per_client, c.max_connections_per_user),
            },
            conns: Slab::new(),
            answers: Vec::new(),
            again: Vec::with_capacity(64),
            turn: Vec::with_capacity(64),
            listeners_deferred: 0,
            next_id: 0,
            accept: AcceptState::Open,
            resume_at: self.max_conns - self.max_conns / 10 - 1,
            last_warn: [None; Warn::COUNT],
            stop_deadline: None,
            next_trim: now + TRIM_PERIOD,
            now,
            server: self,
        };
        lp.run()
    }
}

/// Operator warnings, each rate-limited on its own so that a flood of one
/// kind cannot hide another.
#[derive(Clone, Copy)]
enum Warn {
    Full = 0,
    Accept = 1,
    PerClient = 2,
    Resolver = 3,
}

impl Warn {
    const COUNT: usize = 4;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptState {
    Open,
    /// At the session limit: resumes when sessions drop to `resume_at`.
    Full,
    /// accept failed for want of resources: resumes at the instant, or
    /// sooner when a session closes.
    Backoff(Instant),
    Stopped,
}

/// What sessions borrow while they are driven.
struct Env {
    pool: Pool,
    timers: Timers,
    resolver: Option<Resolver>,
    resolver_full: u64,
    users: Option<Users>,
    rules: Rules,
    limits: Limits,
}

impl Env {
    fn ctx<'a>(&'a mut self, registry: &'a mio::Registry, now: Instant, key: usize, id: u32) -> Ctx<'a> {
        Ctx {
            registry,
            pool: &mut self.pool,
            timers: &mut self.timers,
            resolver: self.resolver.as_ref(),
            now,
            key,
            id,
            resolver_full: &mut self.resolver_full,
            users: self.users.as_ref(),
            rules: &self.rules,
            limits: &mut self.limits,
        }
    }
}

struct Loop {
    server: Server,
    conns: Slab<Conn>,
    env: Env,
    answers: Vec<Answer>,
    /// Work deferred to the end of this turn: sessions and listeners that
    /// used up their budget. `turn` is its double buffer; both keep their
    /// capacity, so deferring allocates nothing once warm.
    again: Vec<Token>,
    turn: Vec<Token>,
    /// Bit i: listener i is in `again`.
    listeners_deferred: u64,
    next_id: u32,
    accept: AcceptState,
    resume_at: usize,
    /// When each kind of warning was last logged.
    last_warn: [Option<Instant>; Warn::COUNT],
    stop_deadline: Option<Instant>,
    next_trim: Instant,
    now: Instant,
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.server.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            self.now = Instant::now();
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    self.on_wake();
                } else if let Some(i) = listener_index(t) {
                    self.accept(i);
                } else {
                    self.session_event(t, Ready::from_event(ev, split(t).2 == Role::Upstream), false);
                }
            }
            self.run_deferred();
            self.expire();
            self.maintain();
            if let Some(deadline) = self.stop_deadline
                && (self.conns.is_empty() || self.now >= deadline)
            {
                match self.conns.len() {
                    0 => info!("stopped"),
                    n => info!("stopped; {n} sessions cut at the end of the grace period"),
                }
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let backoff = match self.accept {
            AcceptState::Backoff(at) => Some(at),
            _ => None,
        };
        [self.env.timers.next_deadline(), backoff, self.stop_deadline, Some(self.next_trim)]
            .into_iter()
            .flatten()
            .min()
            // Round up: a timeout that ends a hair early just spins once more.
            .map(|at| at.saturating_duration_since(Instant::now()) + Duration::from_millis(1))
    }

    /// Drives the session behind `t` (if it still exists) after adding
    /// `bits` to its readiness.
    /// `deferred`: this is the session's deferred turn.
    fn session_event(&mut self, t: Token, bits: u8, deferred: bool) {
        let (key, id, _) = split(t);
        let Some(conn) = self.conns.get_mut(key) else { return };
        if conn.id & ID_MASK != id {
            return;
        }
        conn.client.ready.set(bits);
        if deferred {
            conn.deferred = false;
        }
        let mut ctx = self.env.ctx(self.server.poll.registry(), self.now, key, conn.id);
        let step = conn.drive(&mut ctx);
        self.after(key, conn_token(key, id), step);
    }

    fn after(&mut self, key: usize, t: Token, step: Step) {
        match step {
            Step::Wait => {}
            // One deferred turn at most per session: `again` stays no longer
            // than the slab, and so stops growing once the slab has.
            Step::Again => {
                if let Some(conn) = self.conns.get_mut(key)
                    && !std::mem::replace(&mut conn.deferred, true)
                {
                    self.again.push(t);
                }
            }
            Step::Close(why) => self.close(key, why),
        }
    }

    fn close(&mut self, key: usize, why: &'static str) {
        self.env.timers.cancel(key);
        let conn = self.conns.remove(key);
        debug!("#{key} closed: {why}");
        self.env.limits.release(key, conn.client.user);
        // Dropping the sockets closes them, which removes them from the poll
        // set; a stale event already fetched is caught by the session id.
        conn.recycle(&mut self.env.pool);
        self.maybe_resume_accept();
    }

    fn on_wake(&mut self) {
        if self.server.shared.stop.load(Ordering::SeqCst) && self.stop_deadline.is_none() {
            self.begin_shutdown();
        }
        if let Some(users) = self.server.shared.new_users.lock().unwrap_or_else(|p| p.into_inner()).take() {
            info!("users replaced: {} entries", users.len());
            self.env.users = Some(users);
        }
        let Some(resolver) = &self.env.resolver else { return };
        let mut answers = std::mem::take(&mut self.answers);
        resolver.drain(&mut answers);
        for Answer { key, id, addrs } in answers.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            if conn.id != id {
                continue;
            }
            let mut ctx = self.env.ctx(self.server.poll.registry(), self.now, key, id);
            let step = conn.resolved(addrs, &mut ctx);
            self.after(key, conn_token(key, id), step);
        }
        self.answers = answers;
    }

    fn begin_shutdown(&mut self) {
        for mut l in self.server.listeners.drain(..) {
            let _ = self.server.poll.registry().deregister(&mut l);
        }
        self.accept = AcceptState::Stopped;
        self.stop_deadline = Some(self.now + self.server.config.shutdown_grace);
        info!(
            "shutting down: {} sessions open, waiting up to {:?} for them",
            self.conns.len(),
            self.server.config.shutdown_grace
        );
    }

    fn accept(&mut self, i: usize) {
        if self.accept != AcceptState::Open {
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            if self.conns.len() >= self.server.max_conns {
                self.accept = AcceptState::Full;
                let max = self.server.max_conns;
                self.warn(Warn::Full, format_args!("at max connections ({max}): accepting paused"));
                return;
            }
            let Some(listener) = self.server.listeners.get(i) else { return };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_resource_error(&e) => {
                    self.accept = AcceptState::Backoff(self.now + ACCEPT_BACKOFF);
                    self.warn(Warn::Accept, format_args!("accept: {e}; pausing for {ACCEPT_BACKOFF:?}"));
                    return;
                }
                // Aborted handshakes and the like concern one client only.
                Err(e) => debug!("accept: {e}"),
            }
        }
        self.defer_listener(i);
    }

    fn defer_listener(&mut self, i: usize) {
        if self.listeners_deferred & (1 << i) == 0 {
            self.listeners_deferred |= 1 << i;
            self.again.push(Token(LISTENER_BASE - i));
        }
    }

    /// Rules and limits on the client address apply before any byte is
    /// read or written: a refused client is closed straight away.
    fn admit(&mut self, mut stream: mio::net::TcpStream, peer: SocketAddr) {
        if !self.env.rules.client_allowed(peer.ip()) {
            debug!("{peer} refused: not an allowed client");
            return;
        }
        let key = self.conns.vacant_key();
        if !self.env.limits.admit_client(key, peer.ip()) {
            self.warn(Warn::PerClient, format_args!("{peer} refused: its address has its maximum of connections"));
            return;
        }
        let _ = stream.set_nodelay(true);
        let id = self.next_id;
        self.next_id = (self.next_id + 1) & ID_MASK;
        let t = token(key, id, Role::Client);
        if let Err(e) = self.server.poll.registry().register(&mut stream, t, Interest::READABLE | Interest::WRITABLE) {
            warn!("cannot register a new connection: {e}");
            self.env.limits.release(key, 0);
            return;
        }
        debug!("#{key} accepted from {peer}");
        let exempt = self.env.rules.auth_exempt(peer.ip());
        self.conns.insert(Conn::new(id, stream, exempt, &mut self.env.pool));
        self.env.timers.set(key, crate::timer::Kind::Handshake, self.now);
    }

    fn maybe_resume_accept(&mut self) {
        let resume = match self.accept {
            AcceptState::Full => self.conns.len() <= self.resume_at,
            AcceptState::Backoff(at) => self.now >= at || self.conns.len() < self.server.max_conns,
            _ => false,
        };
        if resume {
            self.accept = AcceptState::Open;
            // A paused listener gets no new edge for connections already
            // queued: look at each one.
            for i in 0..self.server.listeners.len() {
                self.defer_listener(i);
            }
        }
    }

    fn run_deferred(&mut self) {
        if self.again.is_empty() {
            return;
        }
        std::mem::swap(&mut self.again, &mut self.turn);
        let mut turn = std::mem::take(&mut self.turn);
        for &t in &turn {
            match listener_index(t) {
                Some(i) => {
                    self.listeners_deferred &= !(1 << i);
                    self.accept(i);
                }
                None => self.session_event(t, 0, true),
            }
        }
        turn.clear();
        self.turn = turn;
    }

    fn expire(&mut self) {
        while let Some((key, kind)) = self.env.timers.pop_expired(self.now) {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            let id = conn.id;
            let step = conn.expired(kind);
            self.after(key, conn_token(key, id), step);
        }
    }

    /// Periodic chores: resuming a backed-off listener, operator warnings,
    /// trimming the buffer pool, the session gauge.
    fn maintain(&mut self) {
        if self.now >= self.next_trim {
            self.next_trim = self.now + TRIM_PERIOD;
            let freed = self.env.pool.trim();
            if freed > 0 {
                debug!("freed {freed} buffers unused for {TRIM_PERIOD:?}");
            }
        }
        if let AcceptState::Backoff(at) = self.accept
            && self.now >= at
        {
            self.maybe_resume_accept();
        }
        if self.env.resolver_full > 0 {
            let n = self.env.resolver_full;
            if self.warn(Warn::Resolver, format_args!("resolver queue full: {n} requests refused")) {
                self.env.resolver_full = 0;
            }
        }
        self.server.shared.sessions.store(self.conns.len(), Ordering::Relaxed);
    }

    /// Logs a warning unless one was logged within `WARN_EVERY`.
    fn warn(&mut self, kind: Warn, msg: std::fmt::Arguments<'_>) -> bool {
        let last = &mut self.last_warn[kind as usize];
        if last.is_some_and(|t| self.now < t + WARN_EVERY) {
            return false;
        }
        *last = Some(self.now);
        warn!("{msg}");
        true
    }
}

fn conn_token(key: usize, id: u32) -> Token {
    token(key, id, Role::Client)
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_miss_reserved() {
        for (key, id) in [(0, 0), (1, 7), (KEY_MASK, ID_MASK), (12345, u32::MAX)] {
            for role in [Role::Client, Role::Upstream] {
                let t = token(key, id, role);
                assert_eq!(split(t), (key, id & ID_MASK, role));
                assert_ne!(t, WAKER);
                assert_eq!(listener_index(t), None);
            }
        }
        assert_eq!(listener_index(Token(LISTENER_BASE)), Some(0));
        assert_eq!(listener_index(Token(LISTENER_BASE - 63)), Some(63));
        assert_eq!(listener_index(WAKER), None);
    }
}
