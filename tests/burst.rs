//! Bursts of new clients and the listen backlog. Its own test binary: the
//! kernel's `ListenOverflows` counter is global, and other tests in a
//! binary (filling a backlog on purpose) would move it.

mod common;

use common::*;
use socket2::{Domain, Socket, Type};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;

/// The tests here run one at a time: one fills a backlog on purpose, which
/// the other would count as its own overflows.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `TcpExt: ... ListenOverflows ...` from /proc/net/netstat: SYNs dropped
/// because an accept queue was full. `None` where the file is missing.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// A non-blocking socket, ready to connect.
fn new_socket() -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

/// Starts a non-blocking connect to `addr`; the kernel completes it (or
/// drops the SYN) without waiting for the server to accept.
fn start_connect(s: &Socket, addr: SocketAddr) {
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => panic!("connect: {e}"),
    }
}

/// Waits up to `ms` for the connect to complete; true when it has.
fn connected_within(s: &Socket, ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: poll(2) on one valid pollfd that lives across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && s.take_error().ok().flatten().is_none() && s.peer_addr().is_ok()
}

/// 1,000 clients at once against the default backlog: every one completes
/// its SOCKS greeting, and the kernel dropped none of their SYNs (a dropped
/// SYN is retried only a second later). With mio's fixed backlog of 128,
/// hundreds were dropped.
#[test]
fn a_burst_of_a_thousand_clients_is_queued_not_dropped() {
    const N: usize = 1000;
    let _serial = serial();
    slabsocks::sys::raise_nofile_limit().unwrap();
    let (mut child, addr, _log) = spawn_logged(&[]);
    // Sockets made first, so that the connects go out back to back.
    let socks: Vec<Socket> = (0..N).map(|_| new_socket()).collect();
    let before = listen_overflows();
    for s in &socks {
        start_connect(s, addr);
    }
    let after = listen_overflows();
    let mut streams = Vec::with_capacity(N);
    for s in socks {
        assert!(connected_within(&s, IO_TIMEOUT.as_millis() as i32), "a connect never completed");
        s.set_nonblocking(false).unwrap();
        let mut t: TcpStream = s.into();
        t.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        t.write_all(&[5, 1, 0]).unwrap();
        streams.push(t);
    }
    for t in &mut streams {
        let mut m = [0u8; 2];
        t.read_exact(&mut m).unwrap();
        assert_eq!(m, [5, 0]);
    }
    if let (Some(b), Some(a)) = (before, after) {
        assert_eq!(a, b, "{} SYNs dropped by a full accept queue during the burst", a - b);
    }
    signal(&child, libc::SIGTERM);
    drop(streams);
    assert_eq!(wait_exit(&mut child), 0);
}

/// `--backlog 8` reaches the socket: with the loop paused at
/// `--max-connections 1`, the kernel completes and queues 8 connects (Linux
/// takes one more than the backlog) and leaves the rest waiting for a SYN
/// retry. The pause is logged with the backlog size.
#[test]
fn the_backlog_flag_sets_the_queue_that_waits_at_the_limit() {
    let _serial = serial();
    let (mut child, addr, log) =
        spawn_logged(&["--backlog", "8", "--max-connections", "1", "--shutdown-grace", "100ms"]);
    let echo = echo_server("127.0.0.1:0");
    let mut first = open(addr, echo);
    let socks: Vec<Socket> = (0..20).map(|_| new_socket()).collect();
    socks.iter().for_each(|s| start_connect(s, addr));
    let line = log.wait_for("accepting paused");
    assert!(line.contains("a backlog of 8"), "{line}");
    let done = socks.iter().filter(|s| connected_within(s, 200)).count();
    assert!((8..=9).contains(&done), "{done} of 20 connects completed with a backlog of 8");
    // The queued clients are served once the first session ends.
    first.write_all(b"x").unwrap();
    expect(&mut first, b"x");
    drop(first);
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
}

/// Without `--backlog`, the backlog is the system's cap, read at start-up.
#[test]
fn the_default_backlog_is_somaxconn() {
    let (mut child, _addr, log) = spawn_logged(&[]);
    let line = log.wait_for("listening on");
    let want = format!("backlog {},", slabsocks::sys::somaxconn());
    assert!(line.contains(&want), "{line}");
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
}
