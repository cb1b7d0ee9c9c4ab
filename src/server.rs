//! The poll loop: listeners, sessions, the resolver's wake-ups and the
//! deadlines, on one thread.

use crate::accept::{Accept, Accepted};
use crate::access::Access;
use crate::buf::{Pool, TRIM_PERIOD};
use crate::config::Config;
use crate::conn::{BindSettings, Conn, Ctx, Dialects, Env, Outbound, Proxied, Ready, Step, UdpSettings};
use crate::limits::{Counts, Limits};
use crate::metrics::Metrics;
use crate::pipe::Pipes;
use crate::resolver::Purpose;
use crate::resolver::{Answer, Resolver};
use crate::shaping::Shaping;
use crate::stats::{Published, Stat, Stats};
use crate::sys;
use crate::timer::{Kind, LINGER, Timers};
use crate::token::{self, MAX_KEY, MAX_LISTENERS, Owner, WAKER};
use crate::users::Users;
use crate::warn::Warnings;
use log::{debug, error, info};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Shared {
    stop: AtomicBool,
    sessions: AtomicUsize,
    /// The loop's counters, as of its last turn.
    stats: Arc<Published>,
    /// A users table waiting to replace the loop's.
    new_users: Mutex<Option<Users>>,
}

/// What another thread may touch of one loop: its waker and flags.
struct LoopHandle {
    waker: Arc<Waker>,
    shared: Arc<Shared>,
}

/// Stops a running [`Server`] (every worker) from another thread, and
/// reports on it.
#[derive(Clone)]
pub struct Handle {
    loops: Arc<[LoopHandle]>,
}

impl Handle {
    /// Stops accepting; open sessions get `shutdown_grace` to finish, then
    /// `run` returns. Safe to call more than once, from any thread.
    pub fn shutdown(&self) {
        for l in self.loops.iter() {
            l.shared.stop.store(true, Ordering::SeqCst);
            if let Err(e) = l.waker.wake() {
                error!("cannot wake the loop for shutdown: {e}");
            }
        }
    }

    /// Replaces the users table; sessions already open are not touched.
    /// (The binary calls this on SIGHUP after re-reading `--users`.)
    pub fn set_users(&self, users: Users) {
        for l in self.loops.iter() {
            *l.shared.new_users.lock().unwrap_or_else(|p| p.into_inner()) = Some(users.clone());
            if let Err(e) = l.waker.wake() {
                error!("cannot wake the loop for new users: {e}");
            }
        }
    }

    /// Sessions open (any state), as of each loop's last turn, summed over
    /// the workers.
    pub fn sessions(&self) -> usize {
        self.loops.iter().map(|l| l.shared.sessions.load(Ordering::Relaxed)).sum()
    }
}

/// One worker's loop, bound and not yet running: its own poll, listeners
/// (one per listen address, `SO_REUSEPORT` when there are several
/// workers), budget, waker and flags.
struct Worker {
    index: usize,
    poll: Poll,
    listeners: Vec<TcpListener>,
    max_conns: usize,
    max_pipes: usize,
    waker: Arc<Waker>,
    shared: Arc<Shared>,
}

/// A SOCKS5 server: bound, not yet running. One loop per worker
/// ([`Config::workers`]); they share nothing but the per-client and
/// per-user counts and the stop and reload requests.
pub struct Server {
    workers: Vec<Worker>,
    /// The metrics endpoint's listener, served by the first worker.
    metrics: Option<TcpListener>,
    addrs: Vec<SocketAddr>,
    config: Config,
    /// The listen backlog in force, when we made the listeners.
    backlog: Option<u32>,
    counts: Arc<Mutex<Counts>>,
    handle: Handle,
}

/// A non-blocking listener on `addr` with `SO_REUSEADDR` (a restart need not
/// wait out TIME_WAIT), `SO_REUSEPORT` when `shared` (one per worker, the
/// kernel spreading connections between them) and the given backlog (mio's
/// own bind fixes it at 128).
fn listen(addr: SocketAddr, backlog: u32, shared: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    // socket2 sets close-on-exec itself.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    // Inherited by every accepted socket on Linux (see accept.rs).
    socket.set_tcp_nodelay(true)?;
    #[cfg(unix)]
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(TcpListener::from_std(socket.into()))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Server {
    /// Validates `config` and binds every listen address, once per worker.
    pub fn bind(config: Config) -> io::Result<Server> {
        config.validate().map_err(|e| invalid(e.0))?;
        // The kernel cuts a larger backlog to somaxconn: report what holds.
        let cap = sys::somaxconn();
        let backlog = config.backlog.map_or(cap, |b| b.min(cap));
        let workers = config.workers;
        let mut sets: Vec<Vec<TcpListener>> = Vec::with_capacity(workers);
        let mut bound: Vec<SocketAddr> = Vec::with_capacity(config.listen.len());
        for w in 0..workers {
            let mut set = Vec::with_capacity(config.listen.len());
            for (j, &addr) in config.listen.iter().enumerate() {
                // Port 0 is picked by the first worker; the others join it.
                let at = if w == 0 { addr } else { bound[j] };
                let l = listen(at, backlog, workers > 1)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {at}: {e}")))?;
                if w == 0 {
                    bound.push(l.local_addr()?);
                }
                set.push(l);
            }
            sets.push(set);
        }
        let mut server = Server::with_listeners(sets, config)?;
        server.backlog = Some(backlog);
        Ok(server)
    }

    /// The metrics endpoint's address, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves on a listener bound elsewhere (`config.listen` and
    /// `config.backlog` are ignored: the listener keeps its own backlog).
    pub fn from_listener(listener: std::net::TcpListener, config: Config) -> io::Result<Server> {
        Server::from_listeners(vec![listener], config)
    }

    /// Serves on listeners bound elsewhere (socket activation hands them
    /// over so). With several workers, each gets a duplicate of every
    /// listener: they share its one queue (no `SO_REUSEPORT` spreading; a
    /// new connection wakes every worker and one of them takes it).
    pub fn from_listeners(listeners: Vec<std::net::TcpListener>, config: Config) -> io::Result<Server> {
        for l in &listeners {
            l.set_nonblocking(true)?;
            socket2::SockRef::from(l).set_tcp_nodelay(true)?;
        }
        let mut sets = Vec::with_capacity(config.workers);
        for _ in 1..config.workers {
            let set = listeners.iter().map(|l| l.try_clone().map(TcpListener::from_std)).collect::<io::Result<_>>()?;
            sets.push(set);
        }
        sets.insert(0, listeners.into_iter().map(TcpListener::from_std).collect());
        Server::with_listeners(sets, config)
    }

    /// `sets`: one set of listeners per worker, in the same address order.
    fn with_listeners(sets: Vec<Vec<TcpListener>>, config: Config) -> io::Result<Server> {
        let config = Config { listen: vec![SocketAddr::from(([0, 0, 0, 0], 0))], ..config };
        config.validate().map_err(|e| invalid(e.0))?;
        let max_pipes = if config.splice { config.max_pipes } else { Some(0) };
        let (max_conns, max_pipes) = match (config.max_connections, max_pipes) {
            (Some(conns), Some(pipes)) => (conns, pipes),
            (conns, pipes) => sys::budgets(sys::nofile_limit()?, conns, pipes),
        };
        // Each worker gets an equal share, at least one session: fewer
        // workers than sessions allowed.
        let n = sets.len().min(max_conns).max(1);
        let mut workers = Vec::with_capacity(n);
        let mut addrs = Vec::new();
        for (index, mut listeners) in sets.into_iter().take(n).enumerate() {
            if listeners.len() > MAX_LISTENERS {
                return Err(invalid(format!("at most {MAX_LISTENERS} listen addresses")));
            }
            let poll = Poll::new()?;
            for (i, l) in listeners.iter_mut().enumerate() {
                if index == 0 {
                    addrs.push(l.local_addr()?);
                }
                poll.registry().register(l, token::listener(i), Interest::READABLE)?;
            }
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let shared = Arc::new(Shared {
                stop: AtomicBool::new(false),
                sessions: AtomicUsize::new(0),
                stats: Arc::default(),
                new_users: Mutex::new(None),
            });
            let share = |total: usize| total / n + usize::from(index < total % n);
            let max_conns = share(max_conns).clamp(1, MAX_KEY);
            workers.push(Worker { index, poll, listeners, max_conns, max_pipes: share(max_pipes), waker, shared });
        }
        let loops: Vec<LoopHandle> =
            workers.iter().map(|w| LoopHandle { waker: Arc::clone(&w.waker), shared: Arc::clone(&w.shared) }).collect();
        // A user rate limit needs users told apart: without a per-user
        // session limit they are counted with none.
        let per_user = config.max_connections_per_user.or(config.user_rate_limit.map(|_| u32::MAX));
        let counts = Counts::new(config.max_connections_per_client, per_user);
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                listen(addr, 128, false)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} for metrics: {e}")))?,
            ),
            None => None,
        };
        Ok(Server { workers, metrics, addrs, config, backlog: None, counts, handle: Handle { loops: loops.into() } })
    }

    /// The bound addresses, in `config.listen` order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The session limit in force, summed over the workers.
    pub fn max_connections(&self) -> usize {
        self.workers.iter().map(|w| w.max_conns).sum()
    }

    /// Loops that will run.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves until [`Handle::shutdown`]; then lets open sessions finish for
    /// the grace period and returns. Worker 0 runs on this thread, the
    /// others on threads of their own; a worker that fails stops them all.
    pub fn run(self) -> io::Result<()> {
        let Server { workers, metrics, addrs, config, backlog, counts, handle } = self;
        log_start(&config, &addrs, backlog, &workers);
        let n = workers.len();
        let published: Arc<[Arc<Published>]> = workers.iter().map(|w| Arc::clone(&w.shared.stats)).collect();
        if let Some(l) = &metrics
            && let Ok(a) = l.local_addr()
        {
            info!("metrics on http://{a}/metrics");
        }
        let mut rest = Vec::with_capacity(workers.len().saturating_sub(1));
        let mut workers = workers.into_iter();
        let Some(first) = workers.next() else { return Ok(()) };
        for w in workers {
            let (config, counts, all) = (config.clone(), Arc::clone(&counts), handle.clone());
            let index = w.index;
            let spawned = std::thread::Builder::new().name(format!("slabsocks-w{index}")).spawn(move || {
                let r = w.run(config, counts, n, backlog, None);
                if r.is_err() {
                    all.shutdown();
                }
                r
            });
            match spawned {
                Ok(t) => rest.push(t),
                Err(e) => {
                    handle.shutdown();
                    for t in rest {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        let metrics = match metrics.map(|l| Metrics::new(l, published, first.poll.registry())).transpose() {
            Ok(m) => m,
            Err(e) => {
                handle.shutdown();
                for t in rest {
                    let _ = t.join();
                }
                return Err(e);
            }
        };
        let mut result = first.run(config, counts, n, backlog, metrics);
        if result.is_err() {
            handle.shutdown();
        }
        for t in rest {
            let r = t.join().unwrap_or_else(|_| Err(io::Error::other("a worker panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// The start-up line: what is in force.
fn log_start(c: &Config, addrs: &[SocketAddr], backlog: Option<u32>, workers: &[Worker]) {
    let r = &c.rules;
    let max_conns: usize = workers.iter().map(|w| w.max_conns).sum();
    let max_pipes: usize = workers.iter().map(|w| w.max_pipes).sum();
    info!(
        "listening on {:?}; {} worker{}, backlog {}, max connections {}, buffer {} B, splice {}, handshake timeout {:?}, \
         connect timeout {:?}, idle timeout {}, resolver threads up to {}{}; login {}; rules: {} client, {} exempt, \
         {} allow-dest, {} deny-dest{}{}",
        addrs,
        workers.len(),
        if workers.len() == 1 { "" } else { "s" },
        backlog.map_or("as made".to_string(), |b| b.to_string()),
        max_conns,
        c.buffer_size,
        match (max_pipes, c.pipe_size) {
            (0, _) => "off".to_string(),
            (n, 0) => format!("up to {n} pipes"),
            (n, size) => format!("up to {n} pipes of {size} B"),
        },
        c.handshake_timeout,
        c.connect_timeout,
        c.idle_timeout.map_or("off".to_string(), |d| format!("{d:?}")),
        c.resolver_threads,
        if workers.len() > 1 { " per worker" } else { "" },
        c.users.as_ref().map_or("not required".to_string(), |u| format!("required ({} users)", u.len())),
        r.allow_client.len(),
        r.auth_exempt.len(),
        r.allow_dest.len(),
        r.deny_dest.len(),
        if r.deny_private_dest { ", private destinations denied" } else { "" },
        c.busy_poll.map_or(String::new(), |d| format!("; busy polling {d:?}")),
    );
}

impl Worker {
    /// Runs this loop, one of `workers`; `backlog` is the listeners' (for
    /// the log), when we made them.
    fn run(
        self,
        config: Config,
        counts: Arc<Mutex<Counts>>,
        workers: usize,
        backlog: Option<u32>,
        metrics: Option<Metrics>,
    ) -> io::Result<()> {
        let c = &config;
        let resolver = match c.resolver_threads {
            0 => None,
            n => Some(Resolver::start(n, Arc::clone(&self.waker), c.lookup.clone())),
        };
        let now = Instant::now();
        let durations = [
            Some(c.handshake_timeout),
            Some(c.connect_timeout),
            c.idle_timeout,
            Some(LINGER),
            Some(c.bind_timeout),
            Some(c.udp_idle_timeout),
        ];
        let env = Env {
            timers: Timers::new(now, durations),
            pool: Pool::with_pipes(c.buffer_size, Pipes::new(self.max_pipes, c.pipe_size)),
            resolver,
            users: c.users.clone(),
            rules: c.rules.clone(),
            limits: Limits::over(counts),
            warnings: Warnings::default(),
            dialects: Dialects { socks4: c.socks4, http: c.http },
            bind: BindSettings { enabled: c.bind, ports: c.bind_ports, external: c.external_addrs.clone(), cursor: 0 },
            udp_cfg: UdpSettings {
                enabled: c.udp,
                bind_addr: c.udp_bind_addr,
                ports: c.udp_ports,
                client_match: c.udp_client_match,
                max: c.max_udp_associations,
                cursor: 0,
                scratch: None,
            },
            outbound: Outbound::new(&c.outbound_addrs, c.outbound_interface.as_deref()),
            access: c.access_log.then(Access::default),
            stats: Stats::default(),
            proxied: c.proxy_protocol.then(|| Proxied::new(c.proxy_protocol_from.clone())),
            shaping: Shaping::new(c.rate_limit, c.user_rate_limit, now),
            stagger: {
                let mut d = [None; crate::timer::KINDS];
                d[Kind::Idle as usize] = Some(crate::conn::STAGGER);
                Timers::new(now, d)
            },
            prefer_ipv4: c.prefer_ipv4,
            open: 0,
            max_conns: self.max_conns,
            third_fd: 0,
            udp: 0,
        };
        let Worker { index, poll, listeners, max_conns, shared, .. } = self;
        let mut lp = Loop {
            metrics,
            poll,
            accept: Accept::new(listeners, max_conns, backlog).worker(index, workers),
            config,
            shared,
            env,
            conns: Slab::new(),
            answers: Vec::new(),
            again: Vec::with_capacity(64),
            turn: Vec::with_capacity(64),
            listeners_deferred: 0,
            stop_deadline: None,
            next_trim: now + TRIM_PERIOD,
            spin_until: now,
            now,
        };
        lp.run()
    }
}

/// Work deferred to the end of the turn.
#[derive(Debug, Clone, Copy)]
enum Turn {
    Listener(usize),
    Session { key: usize, id: u32 },
}

struct Loop {
    /// The metrics endpoint (the first worker's loop only).
    metrics: Option<Metrics>,
    poll: Poll,
    accept: Accept,
    config: Config,
    shared: Arc<Shared>,
    conns: Slab<Conn>,
    env: Env,
    answers: Vec<Answer>,
    /// Work deferred to the end of this turn: sessions and listeners that
    /// used up their budget. `turn` is its double buffer; both keep their
    /// capacity, so deferring allocates nothing once warm.
    again: Vec<Turn>,
    turn: Vec<Turn>,
    /// Bit i: listener i is in `again`.
    listeners_deferred: u64,
    stop_deadline: Option<Instant>,
    next_trim: Instant,
    /// Busy polling: until then, poll without sleeping.
    spin_until: Instant,
    now: Instant,
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let due = self.next_deadline();
            let timeout = if !self.again.is_empty() || self.now < self.spin_until {
                Some(Duration::ZERO)
            } else {
                // Round up: a timeout that ends a hair early just spins once more.
                due.map(|at| at.saturating_duration_since(Instant::now()) + Duration::from_millis(1))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            self.now = Instant::now();
            if events.is_empty() && self.again.is_empty() && due.is_none_or(|at| self.now < at) {
                // Nothing happened and nothing is due: a busy-polling turn
                // that found nothing (or an interrupted poll).
                continue;
            }
            for ev in events.iter() {
                match token::owner(ev.token()) {
                    Some(Owner::Waker) => self.on_wake(),
                    Some(Owner::Listener(i)) => self.accept(i),
                    Some(Owner::MetricsListener) => {
                        if let Some(m) = &mut self.metrics {
                            m.accept(self.poll.registry(), self.now);
                        }
                    }
                    Some(Owner::Metrics(i)) => {
                        if let Some(m) = &mut self.metrics {
                            m.drive(i);
                        }
                    }
                    Some(Owner::Session { key, id, role }) => self.session_event(key, id, Ready::from_event(ev, role)),
                    None => {}
                }
            }
            self.run_deferred();
            self.expire();
            self.maintain();
            // The window counts from the end of the turn: a turn longer
            // than the window still spins after it.
            if let Some(window) = self.config.busy_poll
                && !events.is_empty()
            {
                self.spin_until = Instant::now() + window;
            }
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

    /// The earliest deadline of anything the loop must do without an
    /// event.
    fn next_deadline(&self) -> Option<Instant> {
        let metrics = self.metrics.as_ref().and_then(Metrics::deadline);
        let throttle = self.env.shaping.as_ref().and_then(|s| s.wake.next_deadline());
        let stagger = self.env.stagger.next_deadline();
        [
            self.env.timers.next_deadline(),
            self.accept.deadline(),
            self.stop_deadline,
            Some(self.next_trim),
            metrics,
            throttle,
            stagger,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A socket event (or a deferred turn, with no `bits`): adds `bits` to
    /// the readiness of the session in slot `key` and drives it, if it is
    /// still session `id` (compared as far as a token carries ids).
    fn session_event(&mut self, key: usize, id: u32, bits: u8) {
        let Some(conn) = current(&mut self.conns, key, Id::FromToken(id)) else { return };
        conn.client.ready.set(bits);
        let id = conn.id;
        let third_fd = self.env.third_fd;
        let mut ctx = Ctx { registry: self.poll.registry(), env: &mut self.env, now: self.now, key, id };
        let step = conn.drive(&mut ctx);
        self.after(key, id, step, third_fd);
    }

    /// What the loop does once a session has been driven. `third_fd` is
    /// `Env::third_fd` from before: a session that left BIND's wait gave a
    /// descriptor back, which may reopen a paused accept.
    fn after(&mut self, key: usize, id: u32, step: Step, third_fd: usize) {
        if self.env.third_fd < third_fd && !matches!(step, Step::Close(_)) {
            self.load_dropped();
        }
        match step {
            Step::Wait => {}
            // One deferred turn at most per session: `again` stays no longer
            // than the slab, and so stops growing once the slab has.
            Step::Again => {
                if let Some(conn) = self.conns.get_mut(key)
                    && !std::mem::replace(&mut conn.deferred, true)
                {
                    self.again.push(Turn::Session { key, id });
                }
            }
            Step::Close(why) => self.close(key, why),
        }
    }

    fn close(&mut self, key: usize, why: crate::conn::Close) {
        self.env.timers.cancel(key);
        let conn = self.conns.remove(key);
        debug!("#{} closed: {why}", conn.id);
        self.env.stats.closed(why.label());
        if let Some(access) = &mut self.env.access {
            access.close(key, why, self.now);
        }
        if let Some(p) = &mut self.env.proxied {
            p.set(key, None);
        }
        if let Some(s) = &mut self.env.shaping {
            s.closed(key);
        }
        self.env.stagger.cancel(key);
        self.env.limits.release(key, conn.client.user);
        // Dropping the sockets closes them, which removes them from the poll
        // set; a stale event already fetched is caught by the session id.
        conn.recycle(&mut self.env);
        self.env.open = self.conns.len();
        self.load_dropped();
    }

    /// A session closed, or gave back a descriptor: accepting may resume.
    fn load_dropped(&mut self) {
        if self.accept.session_closed(crate::accept::load(self.conns.len(), self.env.third_fd)) {
            self.retry_listeners();
        }
    }

    fn on_wake(&mut self) {
        if self.shared.stop.load(Ordering::SeqCst) && self.stop_deadline.is_none() {
            self.begin_shutdown();
        }
        if let Some(users) = self.shared.new_users.lock().unwrap_or_else(|p| p.into_inner()).take() {
            info!("users replaced: {} entries", users.len());
            self.env.users = Some(users);
        }
        let Some(resolver) = &self.env.resolver else { return };
        let mut answers = std::mem::take(&mut self.answers);
        resolver.drain(&mut answers);
        for Answer { key, id, purpose, addrs } in answers.drain(..) {
            // An answer for a session that has gone is dropped without
            // touching the slot's new session.
            let Some(conn) = current(&mut self.conns, key, Id::Whole(id)) else { continue };
            let third_fd = self.env.third_fd;
            let mut ctx = Ctx { registry: self.poll.registry(), env: &mut self.env, now: self.now, key, id };
            let step = match purpose {
                Purpose::Dial => conn.resolved(addrs, &mut ctx),
                Purpose::Udp => conn.udp_resolved(addrs, &mut ctx),
            };
            self.after(key, id, step, third_fd);
        }
        self.answers = answers;
    }

    fn begin_shutdown(&mut self) {
        self.accept.stop(self.poll.registry());
        self.stop_deadline = Some(self.now + self.config.shutdown_grace);
        info!(
            "shutting down: {} sessions open, waiting up to {:?} for them",
            self.conns.len(),
            self.config.shutdown_grace
        );
    }

    fn accept(&mut self, i: usize) {
        let registry = self.poll.registry();
        if self.accept.accept(i, &mut self.conns, &mut self.env, registry, self.now) == Accepted::More {
            self.defer_listener(i);
        }
    }

    fn defer_listener(&mut self, i: usize) {
        if self.listeners_deferred & (1 << i) == 0 {
            self.listeners_deferred |= 1 << i;
            self.again.push(Turn::Listener(i));
        }
    }

    /// A paused listener gets no new edge for connections already queued:
    /// look at each one.
    fn retry_listeners(&mut self) {
        for i in 0..self.accept.listeners() {
            self.defer_listener(i);
        }
    }

    fn run_deferred(&mut self) {
        if self.again.is_empty() {
            return;
        }
        std::mem::swap(&mut self.again, &mut self.turn);
        let mut turn = std::mem::take(&mut self.turn);
        for &t in &turn {
            match t {
                Turn::Listener(i) => {
                    self.listeners_deferred &= !(1 << i);
                    self.accept(i);
                }
                Turn::Session { key, id } => {
                    let Some(conn) = current(&mut self.conns, key, Id::Whole(id)) else { continue };
                    conn.deferred = false;
                    self.session_event(key, id, 0);
                }
            }
        }
        turn.clear();
        self.turn = turn;
    }

    fn expire(&mut self) {
        // Throttled sessions whose buckets have refilled: drive them again.
        while let Some((key, _)) = self.env.shaping.as_mut().and_then(|s| s.wake.pop_expired(self.now)) {
            let Some(conn) = self.conns.get(key) else { continue };
            self.session_event(key, conn.id, 0);
        }
        // Connects that waited the stagger: the next address races them.
        while let Some((key, _)) = self.env.stagger.pop_expired(self.now) {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            let id = conn.id;
            let third_fd = self.env.third_fd;
            let mut ctx = Ctx { registry: self.poll.registry(), env: &mut self.env, now: self.now, key, id };
            let step = conn.staggered(&mut ctx);
            self.after(key, id, step, third_fd);
        }
        while let Some((key, kind)) = self.env.timers.pop_expired(self.now) {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            let id = conn.id;
            let third_fd = self.env.third_fd;
            let mut ctx = Ctx { registry: self.poll.registry(), env: &mut self.env, now: self.now, key, id };
            let step = conn.expired(kind, &mut ctx);
            self.after(key, id, step, third_fd);
        }
    }

    /// Periodic chores: resuming a backed-off listener, trimming the buffer
    /// pool, the session gauge.
    fn maintain(&mut self) {
        if self.now >= self.next_trim {
            self.next_trim = self.now + TRIM_PERIOD;
            let freed = self.env.pool.trim();
            if freed > 0 {
                debug!("freed {freed} buffers unused for {TRIM_PERIOD:?}");
            }
        }
        if self.accept.tick(self.now) {
            self.retry_listeners();
        }
        self.shared.sessions.store(self.conns.len(), Ordering::Relaxed);
        if let Some(m) = &mut self.metrics {
            m.expire(self.now);
        }
        // The counters are only read by the metrics endpoint: without one,
        // no gauge to read (the resolver's queue is behind a lock) and no
        // stores to make, every turn.
        if self.config.metrics_listen.is_none() {
            return;
        }
        let stats = &mut self.env.stats;
        stats.set(Stat::Active, self.conns.len() as u64);
        stats.set(Stat::MaxConnections, self.accept.max_conns() as u64);
        stats.set(Stat::ResolverQueue, self.env.resolver.as_ref().map_or(0, |r| r.queued()) as u64);
        stats.publish(&self.shared.stats);
    }
}

/// A session id as something that refers to a session carries it.
#[derive(Debug, Clone, Copy)]
enum Id {
    /// From a token: as many bits as the token has room for.
    FromToken(u32),
    /// From a resolver answer or a deferred turn: the whole id.
    Whole(u32),
}

/// The session in slot `key`, if it is still the session `id` names: an
/// event, answer or turn for a session that has gone (its slot perhaps
/// reused) finds nothing, and so touches nothing. (A stale socket event
/// could do no harm beyond a wasted syscall, since readiness is a hint the
/// states check; a stale answer could, which the id prevents.)
fn current(conns: &mut Slab<Conn>, key: usize, id: Id) -> Option<&mut Conn> {
    conns.get_mut(key).filter(|c| match id {
        Id::FromToken(bits) => token::same_id(bits, c.id),
        Id::Whole(id) => c.id == id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (mutations: the id checks on events, answers and turns
    /// removed): only the session that holds the slot now is found.
    #[test]
    fn only_the_current_session_of_a_slot_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (stream, _) = l.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut pool = Pool::new(4096);
        let mut conns = Slab::new();
        let key = conns.insert(Conn::new(41, mio::net::TcpStream::from_std(stream), false, false, &mut pool));
        for id in [Id::FromToken(41), Id::Whole(41)] {
            assert!(current(&mut conns, key, id).is_some(), "{id:?}");
        }
        for id in [Id::FromToken(40), Id::Whole(40), Id::Whole(41 + (1 << 31)), Id::FromToken(0)] {
            assert!(current(&mut conns, key, id).is_none(), "{id:?}");
        }
        assert!(current(&mut conns, key + 1, Id::Whole(41)).is_none(), "an empty slot");
    }
}
