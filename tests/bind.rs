//! BIND (RFC 1928): the listener, its two replies, and the relay after.

mod common;

use common::*;
use slabsocks::rules::Rules;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Sends a BIND for `dst` on a fresh session; returns it with the first
/// reply's REP and BND.
fn bind(proxy: SocketAddr, dst: SocketAddr) -> (TcpStream, u8, SocketAddr) {
    let (s, rep, frame) = request(proxy, &bind_request(dst));
    let at = if rep == 0 { bnd(&frame) } else { SocketAddr::from(([0, 0, 0, 0], 0)) };
    (s, rep, at)
}

/// A BIND that must get its first reply; returns where the peer connects.
fn bind_ok(proxy: SocketAddr, dst: SocketAddr) -> (TcpStream, SocketAddr) {
    let (s, rep, at) = bind(proxy, dst);
    assert_eq!(rep, 0, "first reply");
    assert!(!at.ip().is_unspecified() && at.port() != 0, "BND {at} must be where a peer can connect");
    (s, at)
}

fn peer_from(src: &str, to: SocketAddr) -> TcpStream {
    connect_from(src, to)
}

/// The second reply: REP 0 and the peer's address.
fn second_reply(s: &mut TcpStream, peer: &TcpStream) {
    let (rep, frame) = read_reply(s).expect("second reply");
    assert_eq!(rep, 0, "second reply");
    assert_eq!(bnd(&frame), peer.local_addr().unwrap(), "the second reply names the peer");
}

fn any4() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Both ways, then half-close each way, then the session ends.
fn relay_both_ways(client: &mut TcpStream, peer: &mut TcpStream, proxy: &Proxy) {
    client.write_all(b"from the client").unwrap();
    expect(peer, b"from the client");
    peer.write_all(b"from the peer").unwrap();
    expect(client, b"from the peer");
    peer.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(client), b"");
    client.write_all(b"after the peer's EOF").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(peer), b"after the peer's EOF");
    proxy.wait_sessions(0);
}

#[test]
fn bind_over_ipv4_two_replies_then_relay_with_half_close() {
    let proxy = Proxy::start();
    let (mut s, at) = bind_ok(proxy.addr, "127.0.0.1:0".parse().unwrap());
    assert_eq!(at.ip(), proxy.addr.ip(), "BND is the address the client reached us on");
    let mut peer = TcpStream::connect(at).unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    second_reply(&mut s, &peer);
    relay_both_ways(&mut s, &mut peer, &proxy);
}

#[test]
fn bind_over_ipv6() {
    let proxy = Proxy::with(|c| c.listen = vec!["[::1]:0".parse().unwrap()]);
    let (mut s, at) = bind_ok(proxy.addr, "[::1]:0".parse().unwrap());
    assert_eq!(at.ip().to_string(), "::1");
    let mut peer = TcpStream::connect(at).unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    second_reply(&mut s, &peer);
    relay_both_ways(&mut s, &mut peer, &proxy);
}

/// A server listening on every address names, in the first reply, the one
/// the client used: never 0.0.0.0.
#[test]
fn bnd_is_the_control_connections_local_address_never_unspecified() {
    let proxy = Proxy::with(|c| c.listen = vec!["0.0.0.0:0".parse().unwrap()]);
    let via: SocketAddr = format!("127.0.0.2:{}", proxy.addr.port()).parse().unwrap();
    let (mut s, at) = bind_ok(via, any4());
    assert_eq!(at.ip().to_string(), "127.0.0.2");
    let peer = TcpStream::connect(at).unwrap();
    second_reply(&mut s, &peer);
}

#[test]
fn external_addr_is_advertised_and_the_listener_still_works() {
    let proxy = Proxy::with(|c| c.external_addrs = vec!["192.0.2.7".parse().unwrap()]);
    let (mut s, at) = bind_ok(proxy.addr, any4());
    assert_eq!(at.ip().to_string(), "192.0.2.7");
    // Behind the NAT, the peer reaches the same port on our address.
    let peer = TcpStream::connect(SocketAddr::new(proxy.addr.ip(), at.port())).unwrap();
    second_reply(&mut s, &peer);
}

#[test]
fn a_peer_that_never_comes_gets_0x04_at_the_bind_timeout() {
    let proxy = Proxy::with(|c| c.bind_timeout = Duration::from_millis(300));
    let (mut s, _) = bind_ok(proxy.addr, any4());
    let (rep, frame) = read_reply(&mut s).expect("second reply");
    assert_eq!(rep, 4);
    assert_eq!(frame.len(), 10);
    assert!(closed(&mut s));
    proxy.wait_sessions(0);
}

/// DST.ADDR names the peer: another one is turned away (closed) and the
/// wait goes on; the right one is then accepted.
#[test]
fn an_unexpected_peer_is_refused_and_the_expected_one_then_succeeds() {
    let proxy = Proxy::start();
    let (mut s, at) = bind_ok(proxy.addr, "127.0.0.2:0".parse().unwrap());
    let mut stranger = peer_from("127.0.0.3", at);
    assert!(closed(&mut stranger), "a peer from elsewhere is closed");
    let mut peer = peer_from("127.0.0.2", at);
    second_reply(&mut s, &peer);
    peer.write_all(b"hello").unwrap();
    expect(&mut s, b"hello");
}

/// Turning peers away is bounded: the eighth wrong one fails the BIND.
#[test]
fn too_many_wrong_peers_fail_the_bind_with_0x02() {
    let proxy = Proxy::start();
    let (mut s, at) = bind_ok(proxy.addr, "127.0.0.2:0".parse().unwrap());
    for _ in 0..8 {
        let mut stranger = peer_from("127.0.0.3", at);
        assert!(closed(&mut stranger));
    }
    assert_eq!(read_reply(&mut s).expect("second reply").0, 2);
    assert!(closed(&mut s));
}

/// Bytes the peer sends the moment it connects all arrive, after the
/// second reply.
#[test]
fn a_peer_that_speaks_first_loses_nothing() {
    let proxy = Proxy::start();
    let (mut s, at) = bind_ok(proxy.addr, any4());
    let mut peer = TcpStream::connect(at).unwrap();
    let banner: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    peer.write_all(&banner).unwrap();
    second_reply(&mut s, &peer);
    expect(&mut s, &banner);
}

/// What the client sends while waiting is held and forwarded after the
/// second reply; more than the handshake buffer holds ends the session.
#[test]
fn client_bytes_during_the_wait_are_forwarded_and_bounded() {
    let proxy = Proxy::start();
    let (mut s, at) = bind_ok(proxy.addr, any4());
    s.write_all(b"early words").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut peer = TcpStream::connect(at).unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    second_reply(&mut s, &peer);
    expect(&mut peer, b"early words");
    drop((s, peer));
    proxy.wait_sessions(0);

    let (mut s, _) = bind_ok(proxy.addr, any4());
    let _ = s.write_all(&[b'x'; 4096]);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no second reply after an overflow: {rest:?}");
    proxy.wait_sessions(0);
}

/// A client that leaves during the wait frees its slot and the port at once.
#[test]
fn a_client_leaving_during_the_wait_frees_the_port() {
    let proxy = Proxy::start();
    let (s, at) = bind_ok(proxy.addr, any4());
    drop(s);
    proxy.wait_sessions(0);
    TcpListener::bind(at).expect("the BIND port is free again");
}

#[test]
fn disable_bind_answers_0x07() {
    let proxy = Proxy::with(|c| c.bind = false);
    let (mut s, rep, _) = bind(proxy.addr, any4());
    assert_eq!(rep, 7);
    assert!(closed(&mut s));
}

/// Listeners take ports from the range, one each, and a BIND finding none
/// free gets 0x01.
#[test]
fn bind_port_range_confines_the_listeners() {
    let base = free_port_run(3);
    let proxy = Proxy::with(|c| c.bind_ports = Some((base, base + 2)));
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..3 {
        let (s, at) = bind_ok(proxy.addr, any4());
        assert!((base..=base + 2).contains(&at.port()), "{} outside {base}-{}", at.port(), base + 2);
        ports.push(at.port());
        held.push(s);
    }
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "one port each");
    let (mut s, rep, _) = bind(proxy.addr, any4());
    assert_eq!(rep, 1, "no port left in the range");
    assert!(closed(&mut s));
}

/// `n` consecutive ports that are free now (bound and released), below
/// the kernel's ephemeral range, so that no test beside this one is given
/// one of them by a bind to port 0 or a connect before the BIND takes it.
fn free_port_run(n: u16) -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(20000).max(n + 1);
    let start = 20000 + (std::process::id() as u16 % span);
    for k in 0..1000u16 {
        let base = 20000 + (start - 20000 + k * 7) % span;
        if base.checked_add(n).is_none_or(|end| end > low) {
            continue;
        }
        let held: Vec<_> = (0..n).filter_map(|i| TcpListener::bind(("127.0.0.1", base + i)).ok()).collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no run of {n} free ports below {low}");
}

#[test]
fn a_bind_the_rules_deny_gets_0x02() {
    let rules = Rules { deny_dest: vec!["127.0.0.2".parse().unwrap()], ..Rules::default() };
    let proxy = Proxy::with(|c| c.rules = rules);
    let (mut s, rep, _) = bind(proxy.addr, "127.0.0.2:0".parse().unwrap());
    assert_eq!(rep, 2);
    assert!(closed(&mut s));
    // A peer the rules deny is turned away like a wrong one.
    let (mut s, at) = bind_ok(proxy.addr, any4());
    let mut denied = peer_from("127.0.0.2", at);
    assert!(closed(&mut denied));
    let peer = peer_from("127.0.0.3", at);
    second_reply(&mut s, &peer);
}

#[test]
fn bind_by_name_resolves_first() {
    let proxy = Proxy::start();
    let (mut s, rep, frame) = request(proxy.addr, &{
        let mut r = connect_domain("localhost", 0);
        r[1] = 2;
        r
    });
    assert_eq!(rep, 0);
    let at = bnd(&frame);
    assert!(at.ip().is_loopback(), "{at}");
    let peer = TcpStream::connect(at).unwrap();
    second_reply(&mut s, &peer);
}

/// A binding session holds a third descriptor: at `--max-connections 1`
/// there is none for the listener.
#[test]
fn the_descriptor_budget_counts_the_listener() {
    let proxy = Proxy::with(|c| c.max_connections = Some(1));
    let (mut s, rep, _) = bind(proxy.addr, any4());
    assert_eq!(rep, 1);
    assert!(closed(&mut s));
}

/// Two descriptors a session, three while binding: at `--max-connections
/// 2`, one session waiting in BIND leaves no room for a second session
/// (its client waits in the backlog), until the BIND ends.
#[test]
fn a_binding_session_counts_one_and_a_half_against_the_limit() {
    let proxy = Proxy::with(|c| c.max_connections = Some(2));
    let (a, _) = bind_ok(proxy.addr, any4());
    let mut b = connect(proxy.addr);
    b.write_all(&[5, 1, 0]).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut m = [0u8; 2];
    let waited = b.read(&mut m).expect_err("no answer while the BIND holds its third descriptor");
    assert!(matches!(waited.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{waited}");
    assert_eq!(proxy.handle.sessions(), 1);
    drop(a);
    b.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    b.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
}

/// Regression: accepting paused at the limit reopened only when a session
/// closed, not when a BIND's wait ended in a relay (its listener's
/// descriptor given back).
#[test]
fn accepting_resumes_when_a_bind_turns_into_a_relay() {
    let proxy = Proxy::with(|c| c.max_connections = Some(2));
    let (mut a, at) = bind_ok(proxy.addr, any4());
    let mut b = connect(proxy.addr);
    b.write_all(&[5, 1, 0]).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut m = [0u8; 2];
    assert!(b.read(&mut m).is_err(), "paused while A binds");
    let peer = TcpStream::connect(at).unwrap();
    second_reply(&mut a, &peer);
    b.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    b.read_exact(&mut m).expect("B is served once the BIND became a relay");
    assert_eq!(m, [5, 0]);
}

/// Every way out of BIND's wait gives its third descriptor back: after
/// each, a new BIND still fits the budget of `--max-connections 2`.
#[test]
fn every_way_out_of_the_wait_gives_the_descriptor_back() {
    let proxy = Proxy::with(|c| {
        c.max_connections = Some(2);
        // Long enough that the last step's BIND outlives its probe.
        c.bind_timeout = Duration::from_secs(1);
    });
    // The timeout.
    let (mut s, _) = bind_ok(proxy.addr, any4());
    assert_eq!(read_reply(&mut s).unwrap().0, 4);
    drop(s);
    proxy.wait_sessions(0);
    // The client leaving.
    let (s, _) = bind_ok(proxy.addr, any4());
    drop(s);
    proxy.wait_sessions(0);
    // Too many wrong peers.
    let (mut s, at) = bind_ok(proxy.addr, "127.0.0.2:0".parse().unwrap());
    for _ in 0..8 {
        let mut stranger = connect_from("127.0.0.3", at);
        assert!(closed(&mut stranger));
    }
    assert_eq!(read_reply(&mut s).unwrap().0, 2);
    drop(s);
    proxy.wait_sessions(0);
    // Too many bytes from the client.
    let (mut s, _) = bind_ok(proxy.addr, any4());
    let _ = s.write_all(&[0u8; 4096]);
    let _ = read_to_end_lossy(&mut s);
    proxy.wait_sessions(0);
    // A peer, then the end of the relay.
    let (mut s, at) = bind_ok(proxy.addr, any4());
    let peer = TcpStream::connect(at).unwrap();
    second_reply(&mut s, &peer);
    drop((s, peer));
    proxy.wait_sessions(0);
    // Nothing was left counted: a BIND waits, and a second client waits for
    // accepting to resume (one and a half sessions held of two).
    let (a, _) = bind_ok(proxy.addr, any4());
    let mut b = connect(proxy.addr);
    b.write_all(&[5, 1, 0]).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(b.read(&mut [0u8; 2]).is_err(), "paused while A binds: its third descriptor is counted");
    drop(a);
    b.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    expect(&mut b, &[5, 0]);
}

fn read_to_end_lossy(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}
