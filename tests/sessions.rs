//! Sessions that follow one another in a slab slot: a resolver answer for a
//! session that has gone must never reach the session that took its slot,
//! whatever state that session is in.
//!
//! The look-up is scripted: each scripted name answers only when the test
//! opens its gate. Session A asks for `a.test`, is closed at its connect
//! deadline with its answer still held back, and session B is accepted into
//! the slot A freed (the slab reuses the most recently freed key). Then A's
//! answer is let go, and B must carry on as if it had never been sent.
//!
//! Two fixes stand behind these tests: unique session ids (a stale answer
//! is dropped before it touches the slot) and `Conn::resolved` leaving a
//! session that is not resolving as it was. The first test fails when the
//! ids are all 0 (B is resolving, so only the id can tell the answers
//! apart); the other three fail only when both fixes are reverted, and so
//! guard the pair; the second fix alone has a unit test in `conn`.

mod common;

use common::*;
use slabsocks::Lookup;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Answers at once, "not found". The loop handles answers in the order the
/// resolver threads pushed them, so when a session asking for this name gets
/// its reply, every answer pushed before this look-up began has been handled
/// (with one thread: every answer to a job submitted before it).
const SYNC: &str = "sync.test";

/// Connect deadline when B needs it only for a loopback connect or look-up
/// that is answered at once.
const DEADLINE: Duration = Duration::from_secs(1);

/// Scripted look-ups: a scripted host resolves to its address once its gate
/// is open; any other name answers "not found" at once.
#[derive(Clone, Default)]
struct Script(Arc<(Mutex<HashMap<&'static str, Host>>, Condvar)>);

struct Host {
    addr: SocketAddr,
    open: bool,
    /// A resolver thread has started to look it up.
    asked: bool,
}

impl Script {
    /// `host` will resolve to `addr`, once opened.
    fn host(&self, host: &'static str, addr: SocketAddr) {
        self.0.0.lock().unwrap().insert(host, Host { addr, open: false, asked: false });
    }

    fn open(&self, host: &str) {
        self.update(host, |h| h.open = true);
    }

    fn update(&self, host: &str, f: impl FnOnce(&mut Host)) {
        let (hosts, changed) = &*self.0;
        f(hosts.lock().unwrap().get_mut(host).expect("a scripted host"));
        changed.notify_all();
    }

    /// Waits (bounded) until a resolver thread is looking `host` up.
    fn wait_asked(&self, host: &str) {
        self.wait(host, |h| h.asked).unwrap_or_else(|| panic!("{host} never looked up"));
    }

    /// Waits until `host` passes `ready`; `None` after `IO_TIMEOUT`.
    fn wait(&self, host: &str, ready: impl Fn(&Host) -> bool) -> Option<SocketAddr> {
        let (hosts, changed) = &*self.0;
        let end = Instant::now() + IO_TIMEOUT;
        let mut hosts = hosts.lock().unwrap();
        loop {
            let h = &hosts[host];
            if ready(h) {
                return Some(h.addr);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            hosts = changed.wait_timeout(hosts, left).unwrap().0;
        }
    }

    fn lookup(&self) -> Lookup {
        let script = self.clone();
        Lookup::new(move |host: &str, _port: u16| script.answer(host))
    }

    /// Holds the resolver thread until `host` is opened (bounded: a test that
    /// failed before opening it must not hold the thread for ever).
    fn answer(&self, host: &str) -> io::Result<Vec<SocketAddr>> {
        if !self.0.0.lock().unwrap().contains_key(host) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "not scripted"));
        }
        self.update(host, |h| h.asked = true);
        match self.wait(host, |h| h.open) {
            Some(addr) => Ok(vec![addr]),
            None => Err(io::Error::new(io::ErrorKind::TimedOut, format!("{host}: gate never opened"))),
        }
    }
}

/// Keeps the server's "accepted" lines, which name each session's client
/// address and slab slot: the tests check that B really took A's slot.
struct Accepted;

static ACCEPTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl log::Log for Accepted {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Debug
    }
    fn log(&self, r: &log::Record<'_>) {
        let line = r.args().to_string();
        if line.contains(" accepted from ") {
            ACCEPTED.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    }
    fn flush(&self) {}
}

/// The slab slot the server gave the client at `client` (its local address).
fn slot_of(client: SocketAddr) -> String {
    let key = format!(" accepted from {client} (worker ");
    let lines = ACCEPTED.lock().unwrap_or_else(|p| p.into_inner());
    let line = lines.iter().find(|l| l.contains(&key)).unwrap_or_else(|| panic!("no accept logged for {client}"));
    line.rsplit(", slot ").next().unwrap_or_default().trim_end_matches(')').to_string()
}

/// A proxy whose look-ups `script` answers, on `threads` resolver threads.
fn proxy(script: &Script, threads: usize, connect_timeout: Duration) -> Proxy {
    let _ = log::set_logger(&Accepted);
    log::set_max_level(log::LevelFilter::Debug);
    Proxy::with(|config| {
        config.resolver_threads = threads;
        config.lookup = script.lookup();
        config.connect_timeout = connect_timeout;
    })
}

/// Session A asks for `a.test`, which the script holds back, gets REP 0x04
/// at its connect deadline and is closed. Its answer is still due. Returns
/// A's slab slot.
fn a_times_out(proxy: &Proxy) -> String {
    let (mut a, rep, _) = request(proxy.addr, &connect_domain("a.test", 80));
    assert_eq!(rep, 4, "A must time out while resolving");
    let slot = slot_of(a.local_addr().unwrap());
    assert!(closed(&mut a));
    proxy.wait_sessions(0);
    slot
}

/// Checks that `b` took A's slot (the slab reuses the slot freed last):
/// otherwise these tests would test nothing.
fn in_slot(b: &TcpStream, slot: &str) {
    assert_eq!(slot_of(b.local_addr().unwrap()), slot, "B must take A's slot");
}

/// B: a client that has sent its greeting and had it answered, so that it
/// holds A's old slot in the handshake, waiting for a request.
fn b_greeted(proxy: &Proxy) -> TcpStream {
    let mut b = connect(proxy.addr);
    b.write_all(&[5, 1, 0]).unwrap();
    expect(&mut b, &[5, 0]);
    b
}

/// Lets A's answer go, and waits until the loop has handled it: the thread
/// that held it must be the one that answers the sync look-up.
fn release_a(proxy: &Proxy, script: &Script) {
    script.open("a.test");
    let (mut s, rep, _) = request(proxy.addr, &connect_domain(SYNC, 80));
    assert_eq!(rep, 4, "{SYNC} answers 'not found'");
    assert!(closed(&mut s));
}

/// Sends `tag` on each connection, then holds it until the peer closes.
fn tagged_server(tag: &'static [u8]) -> SocketAddr {
    serve("127.0.0.1:0", move |mut s| {
        let _ = s.write_all(tag);
        let _ = s.read(&mut [0u8; 64]);
    })
}

/// `total` pattern bytes out through `s` while reading the echo back, then a
/// half-close: the same bytes, then EOF, must come back.
fn echo_to_end(s: &mut TcpStream, seed: u64, total: usize) {
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_pattern(&mut w, seed, total));
    let got = sum_to_end(s);
    assert_eq!(got, sender.join().expect("sender"));
}

/// A loopback listener whose connects stay pending until the test makes
/// room (as `unresponsive_target` in socks5.rs, but the listener is kept):
/// backlog 0 and a queue we fill ourselves, so the kernel drops further
/// SYNs; once the queue has room, a pending connect gets in on its SYN
/// retransmit (about a second after its first SYN). Returns the listener and
/// the connections that fill its queue.
fn pending_target() -> (TcpListener, Vec<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // SAFETY: listen(2) on a valid, owned descriptor.
    unsafe { libc::listen(l.as_raw_fd(), 0) };
    let fill = (0..8).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()).collect();
    (l, fill)
}

/// The states of this host's IPv4 sockets whose peer is `peer` (Linux
/// /proc/net/tcp: the remote address is the IP as the kernel's in-memory
/// word and the port, in hex; state 01 is ESTABLISHED, 02 SYN_SENT).
fn sockets_to(peer: SocketAddr) -> Vec<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let parse = |line: &str| -> Option<(SocketAddr, u8)> {
        let mut fields = line.split_whitespace().skip(2);
        let (ip, port) = fields.next()?.split_once(':')?;
        let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
        let port = u16::from_str_radix(port, 16).ok()?;
        Some((SocketAddr::from((ip, port)), u8::from_str_radix(fields.next()?, 16).ok()?))
    };
    table.lines().skip(1).filter_map(parse).filter(|&(remote, _)| remote == peer).map(|(_, st)| st).collect()
}

/// True while a socket on this host is connecting (SYN_SENT) to `target`.
fn connecting_to(target: SocketAddr) -> bool {
    sockets_to(target).contains(&2)
}

/// Echoes on every connection `l` accepts, each on its own thread.
fn serve_echo_on(l: TcpListener) {
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

#[test]
fn a_late_answer_for_a_timed_out_session_never_reaches_the_next_session_in_its_slot() {
    let script = Script::default();
    let backend_a = tagged_server(b"A");
    script.host("a.test", backend_a);
    script.host("b.test", tagged_server(b"B"));
    // Two threads: one holds A's look-up, the other takes B's, which shows
    // that B is resolving; then the first is the only one free, so the sync
    // look-up is answered after A's.
    let proxy = proxy(&script, 2, DEADLINE);
    let slot = a_times_out(&proxy);

    let mut b = b_greeted(&proxy);
    in_slot(&b, &slot);
    b.write_all(&connect_domain("b.test", 80)).unwrap();
    script.wait_asked("b.test");
    release_a(&proxy, &script);
    // Closing states (TIME_WAIT and the like) are leftovers of earlier
    // tests whose servers had this port: only a connection being made or
    // made (SYN_SENT 02, ESTABLISHED 01) would be B's.
    let live: Vec<u8> = sockets_to(backend_a).into_iter().filter(|&st| st == 1 || st == 2).collect();
    assert_eq!(live, [], "A's answer was taken as B's: the proxy connected to backend A");
    script.open("b.test");
    let (rep, _) = read_reply(&mut b).expect("B's reply");
    match rep {
        0 => expect(&mut b, b"B"),
        // On a slow machine B's own deadline may pass first: its own 0x04
        // is right too; A's destination never is (checked above).
        4 => {}
        other => panic!("B's reply {other:#04x}"),
    }
}

#[test]
fn a_late_answer_does_not_destroy_the_next_session_in_its_slot_while_in_handshake() {
    let script = Script::default();
    script.host("a.test", closed_port());
    let proxy = proxy(&script, 1, DEADLINE);
    let slot = a_times_out(&proxy);

    let mut b = b_greeted(&proxy);
    in_slot(&b, &slot);
    release_a(&proxy, &script);
    let echo = echo_server("127.0.0.1:0");
    b.write_all(&connect_request(echo)).unwrap();
    let (rep, _) = read_reply(&mut b).expect("B's reply");
    assert_eq!(rep, 0);
    echo_to_end(&mut b, 2, 64 * 1024);
}

#[test]
fn a_late_answer_does_not_destroy_the_next_session_in_its_slot_while_relaying() {
    let script = Script::default();
    script.host("a.test", closed_port());
    let proxy = proxy(&script, 1, DEADLINE);
    let slot = a_times_out(&proxy);

    let echo = echo_server("127.0.0.1:0");
    let mut b = open(proxy.addr, echo);
    in_slot(&b, &slot);
    b.write_all(b"relaying").unwrap();
    expect(&mut b, b"relaying");
    release_a(&proxy, &script);
    echo_to_end(&mut b, 3, 64 * 1024);
}

#[test]
fn a_late_answer_does_not_destroy_the_next_session_in_its_slot_while_connecting() {
    let script = Script::default();
    script.host("a.test", closed_port());
    // A's deadline passes before B starts; B's connect needs about a second
    // (its SYN retransmit) of the same deadline.
    let proxy = proxy(&script, 1, Duration::from_secs(3));
    let filling = std::thread::spawn(pending_target);
    let slot = a_times_out(&proxy);
    let (listener, _fill) = filling.join().unwrap();
    let addr = listener.local_addr().unwrap();

    let mut b = b_greeted(&proxy);
    in_slot(&b, &slot);
    b.write_all(&connect_request(addr)).unwrap();
    eventually("B's connect pending", || connecting_to(addr));
    release_a(&proxy, &script);
    assert!(connecting_to(addr), "B's connect was abandoned");
    // Room in the queue: B's retransmitted SYN gets in.
    serve_echo_on(listener);
    let (rep, _) = read_reply(&mut b).expect("B's reply");
    assert_eq!(rep, 0);
    echo_to_end(&mut b, 4, 64 * 1024);
}
