//! Name resolution off the loop: a bounded job queue served by a few helper
//! threads, which push answers and then wake the loop through its
//! `mio::Waker`. The loop drains every answer on each wake (wakes collapse).

use mio::Waker;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Pending jobs allowed per thread before submissions are refused.
const QUEUE_PER_THREAD: usize = 256;

pub(crate) struct Job {
    pub key: usize,
    pub id: u32,
    pub host: String,
    pub port: u16,
}

/// The answer to a [`Job`], tagged as the job was: the session it was for
/// may have gone, and its slot may hold another session by now.
pub(crate) struct Answer {
    pub key: usize,
    pub id: u32,
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
    pub(crate) fn start(threads: usize, waker: Arc<Waker>) -> io::Result<Resolver> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
            answers: Mutex::new(Vec::new()),
            waker,
        });
        for i in 0..threads {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("slabsocks-dns-{i}"))
                // getaddrinfo and NSS modules can use 64 KiB+ of stack; this is
                // address space, only the pages touched cost memory.
                .stack_size(512 * 1024)
                .spawn(move || serve(&shared))?;
        }
        Ok(Resolver { shared, cap: threads * QUEUE_PER_THREAD })
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
        let addrs = resolve(&job.host, job.port);
        lock(&shared.answers).push(Answer { key: job.key, id: job.id, addrs });
        if let Err(e) = shared.waker.wake() {
            log::error!("resolver cannot wake the loop: {e}");
        }
    }
}

/// getaddrinfo, with its failures folded into `NotFound` so that
/// [`crate::proto::Reply::from_io`] answers "host unreachable".
fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let not_found = |why: String| io::Error::new(io::ErrorKind::NotFound, why);
    match (host, port).to_socket_addrs() {
        Ok(it) => {
            let addrs: Vec<SocketAddr> = it.collect();
            if addrs.is_empty() { Err(not_found(format!("{host}: no addresses"))) } else { Ok(addrs) }
        }
        Err(e) => Err(not_found(format!("{host}: {e}"))),
    }
}
