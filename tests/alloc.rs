//! Proves that relaying allocates nothing: a counting global allocator
//! counts the server thread's allocations while many MiB flow through
//! established sessions. Its own binary (harness = false), so nothing else
//! shares the allocator's counters. (It finishes in seconds; the pool's
//! periodic trim, which may free and so later re-allocate idle buffers,
//! first runs 30 s after start.)

mod common;

use common::*;
use slabsocks::{Config, Server};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if TRACKED.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
    }
}

// SAFETY: every method forwards to the system allocator unchanged; the
// counter is a side effect that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SESSIONS: usize = 8;

/// Fills every session until the whole path is full (client, both relay
/// buffers, echo server), so every buffer the pool will ever need is in
/// flight at once; then drains it all.
fn fill_to_the_brim(sessions: &mut [TcpStream]) {
    std::thread::scope(|scope| {
        for s in sessions.iter_mut() {
            scope.spawn(move || {
                s.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
                let chunk = [0x5au8; 16 * 1024];
                let mut written = 0;
                loop {
                    match s.write(&chunk) {
                        Ok(n) => written += n,
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                s.set_write_timeout(None).unwrap();
                let mut back = vec![0u8; written];
                s.read_exact(&mut back).unwrap();
                assert!(back.iter().all(|&b| b == 0x5a));
            });
        }
    });
}

/// Every session sends `bytes` to the echo upstream and reads them back.
fn transfer(sessions: &mut [TcpStream], bytes: usize) {
    std::thread::scope(|scope| {
        for (i, s) in sessions.iter_mut().enumerate() {
            let mut w = s.try_clone().unwrap();
            scope.spawn(move || {
                let mut p = Pattern::new(i as u64);
                let mut buf = vec![0u8; 32 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(buf.len());
                    p.fill(&mut buf[..n]);
                    w.write_all(&buf[..n]).unwrap();
                    left -= n;
                }
            });
            scope.spawn(move || {
                let mut p = Pattern::new(i as u64);
                let (mut want, mut got) = (vec![0u8; 32 * 1024], vec![0u8; 32 * 1024]);
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(got.len());
                    s.read_exact(&mut got[..n]).unwrap();
                    p.fill(&mut want[..n]);
                    assert!(got[..n] == want[..n], "session {i}: corrupt data");
                    left -= n;
                }
            });
        }
    });
}

fn main() {
    // Both relay paths: through pipes (splice) and through buffers; and
    // through the rate limiter's buckets (a limit too high to slow it).
    for (splice, rate_limit) in [(true, None), (false, None), (true, Some(1 << 40))] {
        run(splice, rate_limit);
    }
    println!("3 passed, 0 failed");
}

fn run(splice: bool, rate_limit: Option<u64>) {
    let config = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        splice,
        rate_limit,
        resolver_threads: 0,
        shutdown_grace: Duration::from_millis(100),
        ..Config::default()
    };
    let server = Server::bind(config).unwrap();
    let proxy = server.local_addrs()[0];
    let handle = server.handle();
    let loop_thread = std::thread::spawn(move || {
        TRACKED.with(|t| t.set(true));
        server.run()
    });
    let echo = echo_server("127.0.0.1:0");
    let mut sessions: Vec<_> = (0..SESSIONS).map(|_| open(proxy, echo)).collect();

    fill_to_the_brim(&mut sessions);
    let warm = ALLOCS.load(Ordering::SeqCst);
    assert!(warm > 0, "the counter must see the server's set-up allocations");

    let per_session = 32 << 20;
    transfer(&mut sessions, per_session);
    let after = ALLOCS.load(Ordering::SeqCst);
    let mib = (SESSIONS * per_session * 2) >> 20;
    println!(
        "splice {splice}, rate limit {rate_limit:?}: server thread: {warm} allocations while setting up; {} while relaying {mib} MiB",
        after - warm
    );
    assert_eq!(after, warm, "the relay path allocated");

    for s in &sessions {
        s.shutdown(Shutdown::Both).unwrap();
    }
    drop(sessions);
    handle.shutdown();
    loop_thread.join().unwrap().unwrap();
}
