//! Name resolution off the loop: a bounded job queue served by a few helper
//! threads, which push answers and then wake the loop through its
//! `mio::Waker`. The loop drains every answer on each wake (wakes collapse).

use mio::Waker;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How names are looked up: a function from `(host, port)` to the addresses
/// to try, in order, called on the resolver threads (never on the loop), so
/// it may block. The default is the system's getaddrinfo.
///
/// Errors map to replies through [`crate::proto::Reply::from_io`]: return
/// [`io::ErrorKind::NotFound`] for a name that does not exist (REP `0x04`).
/// An empty list is treated as `NotFound`.
///
/// ```
/// use std::net::SocketAddr;
/// let hosts = slabsocks::Lookup::new(|host: &str, port: u16| match host {
///     "db.internal" => Ok(vec![SocketAddr::from(([10, 0, 0, 5], port))]),
///     _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "unknown host")),
/// });
/// let config = slabsocks::Config { lookup: hosts, ..Default::default() };
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct Lookup(Arc<LookupFn>);

type LookupFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

impl Lookup {
    pub fn new(f: impl Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static) -> Lookup {
        Lookup(Arc::new(f))
    }

    /// getaddrinfo, through the standard library.
    pub fn system() -> Lookup {
        Lookup::new(getaddrinfo)
    }

    /// Looks `host` up, folding an empty answer into `NotFound`. A look-up
    /// that panics is an error for this name only: the helper thread that
    /// called it lives on.
    pub fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let call = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.0)(host, port)));
        match call {
            Ok(Ok(addrs)) if addrs.is_empty() => {
                Err(io::Error::new(io::ErrorKind::NotFound, format!("{:?}: no addresses", host)))
            }
            Ok(answer) => answer,
            Err(_) => {
                log::error!("the name look-up panicked on {host:?}");
                Err(io::Error::other("the name look-up panicked"))
            }
        }
    }
}

impl Default for Lookup {
    fn default() -> Lookup {
        Lookup::system()
    }
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lookup(..)")
    }
}

/// Pending jobs allowed per thread before submissions are refused.
const QUEUE_PER_THREAD: usize = 256;

/// A helper with nothing to do for this long exits; the next look-up
/// starts one again. An idle server holds no resolver threads.
const QUIET: Duration = Duration::from_secs(30);

/// Each helper's stack. getaddrinfo and NSS modules can use 64 KiB and more;
/// this is address space: only the pages touched cost memory.
const STACK: usize = 256 * 1024;

/// What a look-up is for, carried to its answer: a dial's answer is never
/// taken for a datagram's, nor the other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A CONNECT's or BIND's target.
    Dial,
    /// A UDP datagram's destination.
    Udp,
}

pub(crate) struct Job {
    pub key: usize,
    pub id: u32,
    pub purpose: Purpose,
    pub host: String,
    pub port: u16,
}

/// The answer to a [`Job`], tagged as the job was: the session it was for
/// may have gone, and its slot may hold another session by now.
pub(crate) struct Answer {
    pub key: usize,
    pub id: u32,
    pub purpose: Purpose,
    pub addrs: io::Result<Vec<SocketAddr>>,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Helpers alive, and how many of them wait for a job.
    running: usize,
    idle: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    answers: Mutex<Vec<Answer>>,
    waker: Arc<Waker>,
    lookup: Lookup,
    quiet: Duration,
}

/// Starts helper `i` running `serve`.
type Spawn = Box<dyn Fn(usize, Box<dyn FnOnce() + Send>) -> io::Result<()>>;

/// The helpers are started on demand, up to `max`: a job that finds no
/// idle helper starts one, and a helper quiet for [`QUIET`] exits.
pub(crate) struct Resolver {
    shared: Arc<Shared>,
    max: usize,
    cap: usize,
    spawn: Spawn,
}

/// A poisoned lock only means a helper panicked mid-push; the data is a
/// plain queue and stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Resolver {
    /// A resolver of at most `threads` helpers; none is started yet.
    pub(crate) fn start(threads: usize, waker: Arc<Waker>, lookup: Lookup) -> Resolver {
        let spawn = |i: usize, serve: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(format!("slabsocks-dns-{i}")).stack_size(STACK).spawn(serve).map(drop)
        };
        Resolver::start_with(threads, waker, lookup, QUIET, Box::new(spawn))
    }

    fn start_with(threads: usize, waker: Arc<Waker>, lookup: Lookup, quiet: Duration, spawn: Spawn) -> Resolver {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false, running: 0, idle: 0 }),
            ready: Condvar::new(),
            answers: Mutex::new(Vec::new()),
            waker,
            lookup,
            quiet,
        });
        Resolver { shared, max: threads, cap: threads * QUEUE_PER_THREAD, spawn }
    }

    /// Queues a look-up, starting a helper when every one alive is busy.
    /// Gives the job back when the queue is full, or when no helper is
    /// alive and none can be started.
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        let mut q = lock(&self.shared.queue);
        if q.jobs.len() >= self.cap {
            return Err(job);
        }
        q.jobs.push_back(job);
        if q.jobs.len() > q.idle && q.running < self.max {
            let i = q.running;
            q.running += 1;
            let shared = Arc::clone(&self.shared);
            if let Err(e) = (self.spawn)(i, Box::new(move || serve(&shared))) {
                q.running -= 1;
                log::warn!("cannot start a resolver thread: {e}");
                if q.running == 0 {
                    return q.jobs.pop_back().map_or(Ok(()), Err);
                }
            }
        }
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Helpers alive now.
    #[cfg(test)]
    fn running(&self) -> usize {
        lock(&self.shared.queue).running
    }

    /// Look-ups waiting for a helper.
    pub(crate) fn queued(&self) -> usize {
        lock(&self.shared.queue).jobs.len()
    }

    /// Moves every answer so far into `out`.
    pub(crate) fn drain(&self, out: &mut Vec<Answer>) {
        out.append(&mut lock(&self.shared.answers));
    }
}

impl Drop for Resolver {
    /// Tells the helpers to stop. They are not joined: one may be inside
    /// getaddrinfo, which cannot be interrupted; it exits when that returns.
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
    }
}

fn serve(shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if q.closed {
                    q.running -= 1;
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                q.idle += 1;
                let (back, wait) = shared.ready.wait_timeout(q, shared.quiet).unwrap_or_else(|p| p.into_inner());
                q = back;
                q.idle -= 1;
                if wait.timed_out() && q.jobs.is_empty() {
                    q.running -= 1;
                    return;
                }
            }
        };
        let addrs = shared.lookup.resolve(&job.host, job.port);
        lock(&shared.answers).push(Answer { key: job.key, id: job.id, purpose: job.purpose, addrs });
        if let Err(e) = shared.waker.wake() {
            log::error!("resolver cannot wake the loop: {e}");
        }
    }
}

/// getaddrinfo, with its failures folded into `NotFound` so that
/// [`crate::proto::Reply::from_io`] answers "host unreachable".
fn getaddrinfo(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    match (host, port).to_socket_addrs() {
        Ok(it) => Ok(it.collect()),
        Err(e) => Err(io::Error::new(io::ErrorKind::NotFound, format!("{host:?}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn waker() -> (mio::Poll, Arc<Waker>) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        (poll, waker)
    }

    fn job(key: usize, host: &str) -> Job {
        Job { key, id: 0, purpose: Purpose::Dial, host: host.to_string(), port: 80 }
    }

    fn real_spawn() -> Spawn {
        Box::new(|_, serve| std::thread::Builder::new().spawn(serve).map(drop))
    }

    fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A look-up that blocks until the test lets it go.
    fn gated() -> (Lookup, Arc<(Mutex<bool>, Condvar)>) {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = Arc::clone(&gate);
        let lookup = Lookup::new(move |_, port| {
            let mut open = g.0.lock().unwrap();
            while !*open {
                open = g.1.wait(open).unwrap();
            }
            Ok(vec![SocketAddr::from(([192, 0, 2, 1], port))])
        });
        (lookup, gate)
    }

    fn open(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    /// No helper before the first name; one per concurrent look-up, up to
    /// the maximum; each exits after the quiet period; the next name starts
    /// one again.
    #[test]
    fn helpers_start_on_demand_and_exit_when_quiet() {
        let (_poll, waker) = waker();
        let (lookup, gate) = gated();
        let resolver = Resolver::start_with(2, waker, lookup, Duration::from_millis(100), real_spawn());
        assert_eq!(resolver.running(), 0);
        for key in 0..3 {
            assert!(resolver.submit(job(key, "a")).is_ok());
        }
        assert_eq!(resolver.running(), 2, "three blocked look-ups, two helpers at most");
        open(&gate);
        let mut answers = Vec::new();
        until("three answers", || {
            resolver.drain(&mut answers);
            answers.len() == 3
        });
        until("the helpers exit", || resolver.running() == 0);
        assert!(resolver.submit(job(3, "a")).is_ok());
        assert_eq!(resolver.running(), 1);
        until("the fourth answer", || {
            resolver.drain(&mut answers);
            answers.len() == 4
        });
    }

    /// An idle helper takes the next job: no second thread for look-ups
    /// that do not overlap.
    #[test]
    fn an_idle_helper_is_reused() {
        let (_poll, waker) = waker();
        let resolver = Resolver::start_with(
            4,
            waker,
            Lookup::new(|_, p| Ok(vec![SocketAddr::from(([192, 0, 2, 1], p))])),
            QUIET,
            real_spawn(),
        );
        let mut answers = Vec::new();
        for key in 0..5 {
            assert!(resolver.submit(job(key, "a")).is_ok());
            until("the answer", || {
                resolver.drain(&mut answers);
                answers.len() == key + 1
            });
            until("the helper waits again", || lock(&resolver.shared.queue).idle == 1);
        }
        assert_eq!(resolver.running(), 1);
    }

    /// When no helper can be started the job comes back (the session is
    /// answered at once); with one alive it waits its turn.
    #[test]
    fn a_failed_spawn_gives_the_job_back_only_when_no_helper_is_alive() {
        let (_poll, waker) = waker();
        let none: Spawn = Box::new(|_, _| Err(io::Error::other("no more threads")));
        let resolver = Resolver::start_with(4, Arc::clone(&waker), Lookup::system(), QUIET, none);
        assert!(resolver.submit(job(0, "a")).is_err());
        assert_eq!(resolver.running(), 0);
        assert!(lock(&resolver.shared.queue).jobs.is_empty());

        let (lookup, gate) = gated();
        let first_only: Spawn = Box::new(|i, serve| match i {
            0 => std::thread::Builder::new().spawn(serve).map(drop),
            _ => Err(io::Error::other("no more threads")),
        });
        let resolver = Resolver::start_with(4, waker, lookup, QUIET, first_only);
        assert!(resolver.submit(job(0, "a")).is_ok());
        until("the helper is busy", || lock(&resolver.shared.queue).jobs.is_empty());
        assert!(resolver.submit(job(1, "a")).is_ok(), "queued behind the live helper");
        assert_eq!(resolver.running(), 1);
        open(&gate);
        let mut answers = Vec::new();
        until("both answers", || {
            resolver.drain(&mut answers);
            answers.len() == 2
        });
    }

    /// Dropping the resolver lets every helper exit.
    #[test]
    fn dropping_the_resolver_stops_the_helpers() {
        let (_poll, waker) = waker();
        let resolver = Resolver::start_with(3, waker, Lookup::system(), QUIET, real_spawn());
        let shared = Arc::clone(&resolver.shared);
        for key in 0..3 {
            assert!(resolver.submit(job(key, "localhost")).is_ok());
        }
        until("the jobs are done", || lock(&shared.answers).len() == 3);
        assert!(lock(&shared.queue).running > 0);
        drop(resolver);
        until("the helpers exit", || lock(&shared.queue).running == 0);
    }

    /// A look-up that panics fails that name, and the next name is still
    /// served (the helper thread did not die with it).
    #[test]
    fn a_panicking_lookup_fails_one_name_only() {
        let lookup = Lookup::new(|host, port| match host {
            "boom" => panic!("embedder bug"),
            _ => Ok(vec![SocketAddr::from(([192, 0, 2, 1], port))]),
        });
        let (_poll, waker) = waker();
        let resolver = Resolver::start(1, waker, lookup);
        for (key, host) in [(0, "boom"), (1, "fine")] {
            let job = Job { key, id: 0, purpose: Purpose::Dial, host: host.to_string(), port: 80 };
            assert!(resolver.submit(job).is_ok());
        }
        let mut answers = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while answers.len() < 2 {
            assert!(Instant::now() < end, "{} answers", answers.len());
            resolver.drain(&mut answers);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(answers[0].addrs.is_err());
        assert_eq!(answers[1].addrs.as_ref().unwrap(), &[SocketAddr::from(([192, 0, 2, 1], 80))]);
    }

    #[test]
    fn lookup_folds_an_empty_answer_into_not_found() {
        let empty = Lookup::new(|_, _| Ok(Vec::new()));
        assert_eq!(empty.resolve("x", 1).unwrap_err().kind(), io::ErrorKind::NotFound);
        let one = Lookup::new(|_, port| Ok(vec![SocketAddr::from(([192, 0, 2, 1], port))]));
        assert_eq!(one.resolve("x", 7).unwrap(), [SocketAddr::from(([192, 0, 2, 1], 7))]);
    }
}
