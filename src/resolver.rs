//! Name resolution off the loop: a bounded job queue served by a few helper
//! threads, which push answers and then wake the loop through its
//! `mio::Waker`. The loop drains every answer on each wake (wakes collapse).

use mio::Waker;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

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
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    answers: Mutex<Vec<Answer>>,
    waker: Arc<Waker>,
    lookup: Lookup,
}

pub(crate) struct Resolver {
    shared: Arc<Shared>,
    cap: usize,
}

/// A poisoned lock only means a helper panicked mid-push; the data is a
/// plain queue and stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Resolver {
    pub(crate) fn start(threads: usize, waker: Arc<Waker>, lookup: Lookup) -> io::Result<Resolver> {
        Resolver::start_with(threads, waker, lookup, |i, serve| {
            std::thread::Builder::new()
                .name(format!("slabsocks-dns-{i}"))
                // getaddrinfo and NSS modules can use 64 KiB+ of stack; this is
                // address space, only the pages touched cost memory.
                .stack_size(512 * 1024)
                .spawn(serve)
                .map(drop)
        })
    }

    /// `spawn(i, serve)` runs `serve` on helper thread `i`. When one fails,
    /// the resolver built so far is dropped, which tells the helpers
    /// already started to exit.
    fn start_with(
        threads: usize,
        waker: Arc<Waker>,
        lookup: Lookup,
        mut spawn: impl FnMut(usize, Box<dyn FnOnce() + Send>) -> io::Result<()>,
    ) -> io::Result<Resolver> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
            answers: Mutex::new(Vec::new()),
            waker,
            lookup,
        });
        let resolver = Resolver { shared, cap: threads * QUEUE_PER_THREAD };
        for i in 0..threads {
            let shared = Arc::clone(&resolver.shared);
            spawn(i, Box::new(move || serve(&shared)))?;
        }
        Ok(resolver)
    }

    /// Queues a look-up; gives the job back when the queue is full (or there
    /// are no threads).
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        let mut q = lock(&self.shared.queue);
        if q.jobs.len() >= self.cap {
            return Err(job);
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
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
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
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

    /// Regression: when the third helper failed to spawn, the first two
    /// waited for jobs forever.
    #[test]
    fn a_failed_spawn_lets_the_started_helpers_exit() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let mut started = Vec::new();
        let res = Resolver::start_with(4, waker, Lookup::system(), |i, serve| {
            if i == 2 {
                return Err(io::Error::other("no more threads"));
            }
            started.push(std::thread::spawn(serve));
            Ok(())
        });
        assert!(res.is_err());
        assert_eq!(started.len(), 2);
        let end = Instant::now() + Duration::from_secs(10);
        while !started.iter().all(|t| t.is_finished()) {
            assert!(Instant::now() < end, "helpers still waiting for jobs");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A look-up that panics fails that name, and the next name is still
    /// served (the helper thread did not die with it).
    #[test]
    fn a_panicking_lookup_fails_one_name_only() {
        let lookup = Lookup::new(|host, port| match host {
            "boom" => panic!("embedder bug"),
            _ => Ok(vec![SocketAddr::from(([192, 0, 2, 1], port))]),
        });
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let resolver = Resolver::start(1, waker, lookup).unwrap();
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
