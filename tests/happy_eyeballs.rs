//! Happy Eyeballs (RFC 8305): a name's IPv6 and IPv4 addresses are tried
//! interleaved, and an attempt that has not connected after the stagger
//! (250 ms) is raced by the next; the first to connect wins. The names are
//! scripted through `Config::lookup`; "does not answer" is a listener whose
//! accept queue we keep full, so the kernel drops new SYNs.

mod common;

use common::*;
use slabsocks::Lookup;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A listener on ::1 that never answers a SYN (its queue full), or None
/// without IPv6.
fn unresponsive_v6() -> Option<(SocketAddr, Vec<TcpStream>)> {
    let l = TcpListener::bind("[::1]:0").ok()?;
    let addr = l.local_addr().unwrap();
    // SAFETY: listen(2) on a valid, owned descriptor.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 0) };
    let fill = (0..8).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()).collect();
    std::mem::forget(l);
    Some((addr, fill))
}

fn named(addrs: Vec<SocketAddr>) -> Lookup {
    Lookup::new(move |host, _| match host {
        "dual.test" => Ok(addrs.clone()),
        _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "unknown")),
    })
}

/// IPv6 first (the default), but it does not answer: the IPv4 address,
/// raced after the stagger, connects long before the connect timeout
/// (without racing, the session would wait on the silent IPv6 attempt
/// until the timeout and get 0x04).
#[test]
fn a_silent_ipv6_address_loses_the_race() {
    let Some((silent, _fill)) = unresponsive_v6() else {
        eprintln!("skipped: no IPv6 loopback");
        return;
    };
    let echo = echo_server("127.0.0.1:0");
    // The scripted name carries each address's own port.
    let lookup = named(vec![silent, echo]);
    let proxy = Proxy::with(|c| {
        c.lookup = lookup;
        c.connect_timeout = Duration::from_secs(5);
    });
    let (mut s, rep, frame) = request(proxy.addr, &connect_domain("dual.test", echo.port()));
    assert_eq!(rep, 0, "the IPv4 address should win the race");
    assert!(bnd(&frame).is_ipv4(), "connected over IPv4");
    s.write_all(b"raced").unwrap();
    expect(&mut s, b"raced");
}

/// `prefer_ipv4`: the families swap places; with both answering, the
/// preferred one wins, and a silent preferred one loses to the other.
#[test]
fn the_preferred_family_goes_first() {
    let Ok(l6) = TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: no IPv6 loopback");
        return;
    };
    drop(l6);
    let echo4 = echo_server("127.0.0.1:0");
    let echo6 = echo_server("[::1]:0");
    let both = named(vec![echo4, echo6]);
    for (prefer_ipv4, want_v4) in [(false, false), (true, true)] {
        let lookup = both.clone();
        let proxy = Proxy::with(|c| {
            c.lookup = lookup;
            c.prefer_ipv4 = prefer_ipv4;
        });
        let (_s, rep, frame) = request(proxy.addr, &connect_domain("dual.test", 1));
        assert_eq!(rep, 0);
        assert_eq!(bnd(&frame).is_ipv4(), want_v4, "prefer_ipv4 {prefer_ipv4}");
    }
    // IPv4 preferred but silent: IPv6 wins after the stagger.
    let (silent4, _fill) = unresponsive_target();
    let lookup = named(vec![silent4, echo6]);
    let proxy = Proxy::with(|c| {
        c.lookup = lookup;
        c.prefer_ipv4 = true;
        c.connect_timeout = Duration::from_secs(5);
    });
    let (mut s, rep, frame) = request(proxy.addr, &connect_domain("dual.test", 1));
    assert_eq!(rep, 0);
    assert!(bnd(&frame).is_ipv6());
    s.write_all(b"v6").unwrap();
    expect(&mut s, b"v6");
}

/// A racer that fails (a refused port) makes way for the next address:
/// IPv6 silent, then a refused IPv4 address races it and fails, then the
/// answering IPv4 address races and wins.
#[test]
fn a_failed_racer_makes_way_for_the_next_address() {
    let Some((silent, _fill)) = unresponsive_v6() else {
        eprintln!("skipped: no IPv6 loopback");
        return;
    };
    let echo = echo_server("127.0.0.1:0");
    let proxy = Proxy::with(|c| {
        c.lookup = named(vec![silent, closed_port(), echo]);
        c.connect_timeout = Duration::from_secs(5);
    });
    let (mut s, rep, _) = request(proxy.addr, &connect_domain("dual.test", 1));
    assert_eq!(rep, 0, "the third address should win");
    s.write_all(b"third").unwrap();
    expect(&mut s, b"third");
}

/// The first attempt fails while its racer is still under way: the racer
/// carries on alone as the session's upstream, and its connect completes
/// the request. Both addresses start silent (their queues full); once the
/// racer is under way the first address's listener closes (its SYN's
/// retransmission, 1 s after the first, is refused) and the second's queue
/// is drained (its racer's retransmission, 250 ms later, is answered).
#[test]
fn a_racer_carries_on_when_the_first_attempt_fails() {
    let silent = || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen(2) on a valid, owned descriptor.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 0) };
        let addr = l.local_addr().unwrap();
        let fill: Vec<TcpStream> =
            (0..8).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()).collect();
        assert!(fill.len() < 8, "the queue must be full: new SYNs go unanswered");
        (l, addr, fill)
    };
    let (first, first_addr, first_fill) = silent();
    let (second, second_addr, second_fill) = silent();
    let proxy = Proxy::with(|c| {
        c.lookup = named(vec![first_addr, second_addr]);
        c.connect_timeout = Duration::from_secs(5);
    });
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 1, 0]).unwrap();
    expect(&mut s, &[5, 0]);
    s.write_all(&connect_domain("dual.test", 1)).unwrap();
    // Past the stagger: the racer to the second address is under way.
    std::thread::sleep(Duration::from_millis(500));
    drop((first, first_fill));
    std::thread::spawn(move || {
        for c in second.incoming().flatten() {
            std::thread::spawn(move || {
                let (mut r, mut w) = (c.try_clone().unwrap(), c);
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    drop(second_fill);
    let (rep, _) = read_reply(&mut s).unwrap();
    assert_eq!(rep, 0, "the racer should connect as the upstream");
    s.write_all(b"carried").unwrap();
    expect(&mut s, b"carried");
}
