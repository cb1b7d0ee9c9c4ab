//! UDP ASSOCIATE (RFC 1928 §7) with real datagrams on loopback.

mod common;

use common::*;
use slabsocks::proto::{Addr, encode_udp_header, parse_udp_header};
use slabsocks::rules::Rules;
use slabsocks::{Lookup, UdpMatch};
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A UDP echo server counting the datagrams it gets.
fn udp_echo(addr: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    udp_echo_on(UdpSocket::bind(addr).unwrap())
}

/// The echo server on a socket bound already.
fn udp_echo_on(s: UdpSocket) -> (SocketAddr, Arc<AtomicUsize>) {
    let local = s.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = s.send_to(&buf[..n], from);
        }
    });
    (local, count)
}

/// UDP ASSOCIATE with DST `dst`; returns the control connection and the
/// relay address from the reply.
fn associate(proxy: SocketAddr, dst: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut req = connect_request(dst);
    req[1] = 3;
    let (s, rep, frame) = request(proxy, &req);
    assert_eq!(rep, 0, "UDP ASSOCIATE reply");
    let relay = bnd(&frame);
    assert!(!relay.ip().is_unspecified() && relay.port() != 0, "BND {relay} must be where to send");
    (s, relay)
}

fn client_socket(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap();
    s.set_read_timeout(Some(DATAGRAM_TIMEOUT)).unwrap();
    s
}

/// `data` behind a header for `to`.
fn wrap(to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 22];
    let n = encode_udp_header(to, &mut out);
    out.truncate(n);
    out.extend_from_slice(data);
    out
}

/// `data` behind a header naming `host`.
fn wrap_name(host: &str, port: u16, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 3, host.len() as u8];
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Receives one datagram from the relay: the header's address and the data.
fn recv(s: &UdpSocket, relay: SocketAddr) -> (SocketAddr, Vec<u8>) {
    let mut buf = [0u8; 65536];
    let (n, from) = s.recv_from(&mut buf).expect("a datagram from the relay");
    assert_eq!(from, relay, "replies come from the address the client sends to");
    let (h, at) = parse_udp_header(&buf[..n]).expect("a reply header");
    assert_eq!(h.frag, 0);
    let addr = match h.addr {
        Addr::V4(_) | Addr::V6(_) => SocketAddr::new(h.addr.ip().unwrap(), h.port),
        Addr::Domain(_) => panic!("a reply names the remote by address"),
    };
    (addr, buf[at..n].to_vec())
}

/// Sends `data` to `to` through the relay and expects it echoed by `to`.
fn round_trip(s: &UdpSocket, relay: SocketAddr, to: SocketAddr, data: &[u8]) {
    s.send_to(&wrap(to, data), relay).unwrap();
    assert_eq!(recv(s, relay), (to, data.to_vec()));
}

fn any4() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

#[test]
fn datagrams_to_an_ipv4_echo_and_back_with_the_remotes_address() {
    let proxy = Proxy::start();
    let (echo, _) = udp_echo("127.0.0.1:0");
    let (_control, relay) = associate(proxy.addr, any4());
    assert_eq!(relay.ip(), proxy.addr.ip());
    let s = client_socket("127.0.0.1:0");
    round_trip(&s, relay, echo, b"ping");
    round_trip(&s, relay, echo, &[7u8; 1400]);
    round_trip(&s, relay, echo, b"");
    // The largest datagram loopback carries.
    round_trip(&s, relay, echo, &vec![9u8; 65_000]);
}

#[test]
fn datagrams_over_ipv6() {
    let proxy = Proxy::with(|c| c.listen = vec!["[::1]:0".parse().unwrap()]);
    let (echo, _) = udp_echo("[::1]:0");
    let (_control, relay) = associate(proxy.addr, "[::]:0".parse().unwrap());
    assert_eq!(relay.ip().to_string(), "::1");
    let s = client_socket("[::1]:0");
    round_trip(&s, relay, echo, b"ping6");
    // An IPv4 remote from an IPv6 client: the reply's header is ATYP 1.
    let (echo4, _) = udp_echo("127.0.0.1:0");
    round_trip(&s, relay, echo4, b"to v4");
}

/// A destination by name is resolved off the loop, once: the next datagram
/// uses the association's cache.
#[test]
fn datagrams_to_a_name_resolve_once() {
    let (echo, _) = udp_echo("127.0.0.1:0");
    let lookups = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&lookups);
    let proxy = Proxy::with(move |c| {
        c.lookup = Lookup::new(move |host, port| {
            counted.fetch_add(1, Ordering::SeqCst);
            match host {
                "echo.test" => Ok(vec![SocketAddr::new(echo.ip(), port)]),
                _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no")),
            }
        })
    });
    let (_control, relay) = associate(proxy.addr, any4());
    let s = client_socket("127.0.0.1:0");
    for i in 0..3u8 {
        s.send_to(&wrap_name("echo.test", echo.port(), &[i]), relay).unwrap();
        assert_eq!(recv(&s, relay), (echo, vec![i]), "the reply names the address, not the name");
    }
    assert_eq!(lookups.load(Ordering::SeqCst), 1);
    // An IP literal sent as a name is never looked up.
    s.send_to(&wrap_name("127.0.0.1", echo.port(), b"lit"), relay).unwrap();
    assert_eq!(recv(&s, relay), (echo, b"lit".to_vec()));
    assert_eq!(lookups.load(Ordering::SeqCst), 1);
}

/// Field clients send 0.0.0.0:0 (tun2socks) or the eventual target
/// (redsocks) as DST: both work by default.
#[test]
fn request_dst_unspecified_or_the_target_both_work() {
    let proxy = Proxy::start();
    let (echo, _) = udp_echo("127.0.0.1:0");
    for dst in [any4(), echo] {
        let (_control, relay) = associate(proxy.addr, dst);
        let s = client_socket("127.0.0.1:0");
        round_trip(&s, relay, echo, b"either");
    }
}

/// Datagrams from anyone but the client are dropped; the client's still
/// pass. (The relay handles datagrams in arrival order, so once the
/// client's reply is back, the stranger's was handled.)
#[test]
fn a_datagram_from_a_foreign_source_is_dropped() {
    let proxy = Proxy::start();
    let (echo, count) = udp_echo("127.0.0.1:0");
    let (_control, relay) = associate(proxy.addr, any4());
    let stranger = client_socket("127.0.0.2:0");
    stranger.send_to(&wrap(echo, b"not yours"), relay).unwrap();
    let s = client_socket("127.0.0.1:0");
    round_trip(&s, relay, echo, b"mine");
    assert_eq!(count.load(Ordering::SeqCst), 1, "only the client's datagram reached the echo");
}

/// `ip` (default): the first valid datagram pins the client's port; later
/// ones from another port are dropped.
#[test]
fn policy_ip_pins_the_first_port() {
    let proxy = Proxy::start();
    let (echo, count) = udp_echo("127.0.0.1:0");
    let (_control, relay) = associate(proxy.addr, any4());
    let first = client_socket("127.0.0.1:0");
    round_trip(&first, relay, echo, b"pinned");
    let other = client_socket("127.0.0.1:0");
    other.send_to(&wrap(echo, b"other port"), relay).unwrap();
    round_trip(&first, relay, echo, b"still pinned");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

/// `ip+port`: a non-zero DST.PORT names the client's port from the start.
#[test]
fn policy_ip_port_honours_dst_port() {
    let proxy = Proxy::with(|c| c.udp_client_match = UdpMatch::IpPort);
    let (echo, count) = udp_echo("127.0.0.1:0");
    let s = client_socket("127.0.0.1:0");
    let (_control, relay) = associate(proxy.addr, s.local_addr().unwrap());
    let other = client_socket("127.0.0.1:0");
    other.send_to(&wrap(echo, b"wrong port"), relay).unwrap();
    round_trip(&s, relay, echo, b"right port");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

/// `none`: a client whose UDP comes from another address than its TCP.
#[test]
fn policy_none_takes_the_first_sender_anywhere() {
    let proxy = Proxy::with(|c| c.udp_client_match = UdpMatch::None);
    let (echo, count) = udp_echo("127.0.0.1:0");
    let (_control, relay) = associate(proxy.addr, any4());
    let elsewhere = client_socket("127.0.0.3:0");
    round_trip(&elsewhere, relay, echo, b"from another address");
    let late = client_socket("127.0.0.1:0");
    late.send_to(&wrap(echo, b"too late"), relay).unwrap();
    round_trip(&elsewhere, relay, echo, b"pinned");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[test]
fn fragments_and_malformed_datagrams_are_dropped() {
    let proxy = Proxy::start();
    let (echo, count) = udp_echo("127.0.0.1:0");
    let (_control, relay) = associate(proxy.addr, any4());
    let s = client_socket("127.0.0.1:0");
    let mut frag = wrap(echo, b"fragment");
    frag[2] = 1;
    s.send_to(&frag, relay).unwrap();
    for junk in [&[][..], &[0], &[0, 0, 0, 1, 127], &[0, 0, 0, 9, 1, 2, 3], &[0, 0, 0, 3, 0, 0, 1]] {
        s.send_to(junk, relay).unwrap();
    }
    round_trip(&s, relay, echo, b"whole");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn bnd_is_the_control_connections_local_address() {
    let proxy = Proxy::with(|c| c.listen = vec!["0.0.0.0:0".parse().unwrap()]);
    let via: SocketAddr = format!("127.0.0.2:{}", proxy.addr.port()).parse().unwrap();
    let (_control, relay) = associate(via, any4());
    assert_eq!(relay.ip().to_string(), "127.0.0.2");
    let (echo, _) = udp_echo("127.0.0.1:0");
    round_trip(&client_socket("127.0.0.1:0"), relay, echo, b"via 127.0.0.2");
}

#[test]
fn closing_the_control_connection_ends_the_association() {
    let proxy = Proxy::start();
    let (echo, count) = udp_echo("127.0.0.1:0");
    let (control, relay) = associate(proxy.addr, any4());
    let s = client_socket("127.0.0.1:0");
    round_trip(&s, relay, echo, b"alive");
    drop(control);
    proxy.wait_sessions(0);
    s.send_to(&wrap(echo, b"after"), relay).unwrap();
    UdpSocket::bind(relay).expect("the relay port is released");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn an_idle_association_ends_and_closes_its_control_connection() {
    let proxy = Proxy::with(|c| c.udp_idle_timeout = Duration::from_millis(300));
    let (mut control, relay) = associate(proxy.addr, any4());
    assert!(closed(&mut control));
    proxy.wait_sessions(0);
    UdpSocket::bind(relay).expect("the relay port is released");
}

#[test]
fn the_association_cap_refuses_with_0x01() {
    let proxy = Proxy::with(|c| c.max_udp_associations = Some(1));
    let (first, _) = associate(proxy.addr, any4());
    let (mut s, rep, _) = request(proxy.addr, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rep, 1);
    assert!(closed(&mut s));
    // A closed association gives its place back.
    drop(first);
    proxy.wait_sessions(0);
    let (_again, _) = associate(proxy.addr, any4());
}

#[test]
fn udp_port_range_confines_the_relay_port() {
    let base = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port().min(u16::MAX - 4)
    };
    let proxy = Proxy::with(|c| c.udp_ports = Some((base, base + 3)));
    let (_control, relay) = associate(proxy.addr, any4());
    assert!((base..=base + 3).contains(&relay.port()), "{} outside {base}-{}", relay.port(), base + 3);
}

#[test]
fn rules_apply_to_each_datagrams_destination() {
    let (denied, denied_count) = udp_echo("127.0.0.2:0");
    let (allowed, _) = udp_echo("127.0.0.1:0");
    let rules = Rules { deny_dest: vec!["127.0.0.2".parse().unwrap()], ..Rules::default() };
    let proxy = Proxy::with(|c| c.rules = rules);
    let (_control, relay) = associate(proxy.addr, any4());
    let s = client_socket("127.0.0.1:0");
    s.send_to(&wrap(denied, b"no"), relay).unwrap();
    round_trip(&s, relay, allowed, b"yes");
    assert_eq!(denied_count.load(Ordering::SeqCst), 0);
}

#[test]
fn disable_udp_answers_0x07() {
    let proxy = Proxy::with(|c| c.udp = false);
    let (mut s, rep, _) = request(proxy.addr, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rep, 7);
    assert!(closed(&mut s));
}

/// 2 000 datagrams, at most 64 in flight: all come back, in order. (UDP may
/// drop under overload; with the relay keeping up, loopback does not.)
#[test]
fn a_burst_of_datagrams_arrives_in_order_without_loss() {
    const N: u32 = 2000;
    const WINDOW: u32 = 64;
    let proxy = Proxy::start();
    let (echo, _) = udp_echo("127.0.0.1:0");
    let (_control, relay) = associate(proxy.addr, any4());
    let s = client_socket("127.0.0.1:0");
    let (mut sent, mut got) = (0u32, 0u32);
    while got < N {
        while sent < N && sent - got < WINDOW {
            s.send_to(&wrap(echo, &sent.to_be_bytes()), relay).unwrap();
            sent += 1;
        }
        let (_, data) = recv(&s, relay);
        assert_eq!(data, got.to_be_bytes(), "in order, none lost");
        got += 1;
    }
}

/// The control connection carries nothing after the reply; bytes there are
/// read and ignored, the association goes on.
#[test]
fn bytes_on_the_control_connection_are_ignored() {
    let proxy = Proxy::start();
    let (echo, _) = udp_echo("127.0.0.1:0");
    let (mut control, relay) = associate(proxy.addr, any4());
    control.write_all(b"chatter").unwrap();
    round_trip(&client_socket("127.0.0.1:0"), relay, echo, b"still here");
}

/// Regression: every datagram received reset the idle timer, even dropped
/// ones, so a stranger spraying the relay port kept an association alive.
#[test]
fn foreign_datagrams_do_not_keep_an_association_alive() {
    let proxy = Proxy::with(|c| c.udp_idle_timeout = Duration::from_millis(400));
    let (echo, count) = udp_echo("127.0.0.1:0");
    let (mut control, relay) = associate(proxy.addr, any4());
    let stranger = client_socket("127.0.0.2:0");
    let sprayer = std::thread::spawn(move || {
        for _ in 0..40 {
            let _ = stranger.send_to(&wrap(echo, b"x"), relay);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // The stranger sprays for 2 s; the association must end long before.
    control.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    assert!(closed(&mut control), "the idle timeout ends the association despite the stranger");
    sprayer.join().unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[test]
fn external_addr_is_advertised_for_udp() {
    let proxy = Proxy::with(|c| c.external_addrs = vec!["192.0.2.9".parse().unwrap()]);
    let (_control, relay) = associate(proxy.addr, any4());
    assert_eq!(relay.ip().to_string(), "192.0.2.9");
    // Behind the NAT, datagrams reach the same port on our address.
    let (echo, _) = udp_echo("127.0.0.1:0");
    let s = client_socket("127.0.0.1:0");
    let real = SocketAddr::new(proxy.addr.ip(), relay.port());
    s.send_to(&wrap(echo, b"nat"), real).unwrap();
    assert_eq!(recv(&s, real), (echo, b"nat".to_vec()));
}

/// An association holds three descriptors: at `--max-connections 1` there
/// is no budget for its sockets.
#[test]
fn an_association_counts_its_descriptors() {
    let proxy = Proxy::with(|c| c.max_connections = Some(1));
    let (mut s, rep, _) = request(proxy.addr, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rep, 1);
    assert!(closed(&mut s));
}

/// While one datagram waits for its destination's name, another that needs
/// a look-up is dropped, not queued; the first goes out once answered.
#[test]
fn one_datagram_at_a_time_waits_for_a_name() {
    let (echo, count) = udp_echo("127.0.0.1:0");
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let asked = Arc::new(AtomicUsize::new(0));
    let (g, a) = (Arc::clone(&gate), Arc::clone(&asked));
    let proxy = Proxy::with(move |c| {
        c.lookup = Lookup::new(move |_host, port| {
            a.fetch_add(1, Ordering::SeqCst);
            let (open, cv) = &*g;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            Ok(vec![SocketAddr::new(echo.ip(), port)])
        })
    });
    let (_control, relay) = associate(proxy.addr, any4());
    let s = client_socket("127.0.0.1:0");
    s.send_to(&wrap_name("slow.test", echo.port(), b"first"), relay).unwrap();
    eventually("the look-up starts", || asked.load(Ordering::SeqCst) == 1);
    s.send_to(&wrap_name("other.test", echo.port(), b"second"), relay).unwrap();
    // An IP destination is not held up by the look-up.
    round_trip(&s, relay, echo, b"by address");
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    assert_eq!(recv(&s, relay), (echo, b"first".to_vec()));
    round_trip(&s, relay, echo, b"sync");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "the second name was never looked up");
    assert_eq!(count.load(Ordering::SeqCst), 3, "first, by address, sync: the second was dropped");
}

/// Datagrams relayed are counted each way, with their payload bytes, in
/// the metrics and the association's access line; dropped ones too.
#[test]
fn datagrams_are_counted_in_the_metrics_and_the_access_log() {
    let (_child, addr, log) = spawn_logged(&["--metrics-listen", "127.0.0.1:0", "--access-log"]);
    let metrics = metrics_addr(&log);
    // "localhost" resolves to either family, first (the relay takes the
    // first answer, as this look-up does): the echo listens on both where
    // the system has IPv6, and the datagram by name is left out where its
    // first answer could not reach the echo.
    let dual = {
        use socket2::{Domain, Socket, Type};
        Socket::new(Domain::IPV6, Type::DGRAM, None).ok().filter(|s| {
            s.set_only_v6(false).is_ok()
                && s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into()).is_ok()
        })
    };
    let first = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 1)).ok().and_then(|mut a| a.next());
    let by_name = first.is_some_and(|a| a.is_ipv4() || dual.is_some());
    let (echo, _) = match dual {
        Some(s) => udp_echo_on(s.into()),
        None => udp_echo("127.0.0.1:0"),
    };
    let echo = SocketAddr::from(([127, 0, 0, 1], echo.port()));
    let (control, relay) = associate(addr, any4());
    let client = control.local_addr().unwrap();
    let s = client_socket("127.0.0.1:0");
    for data in [&b"one"[..], b"three", b"seventeen bytes!!"] {
        round_trip(&s, relay, echo, data);
    }
    let mut frag = wrap(echo, b"fragment");
    frag[2] = 1;
    s.send_to(&frag, relay).unwrap();
    // A datagram behind the fragment shows it has been handled.
    round_trip(&s, relay, echo, b"");
    // One by name: sent (and counted) once the resolver answers.
    let named = if by_name {
        s.send_to(&wrap_name("localhost", echo.port(), b"named"), relay).unwrap();
        assert_eq!(recv(&s, relay).1, b"named");
        1
    } else {
        eprintln!("localhost first resolves to {first:?}, which the echo cannot take: no datagram by name");
        0
    };
    let bytes = 25 + 5 * named;
    let want = [
        ("slabsocks_udp_datagrams_total{direction=\"up\"}", 4 + named),
        ("slabsocks_udp_datagrams_total{direction=\"down\"}", 4 + named),
        ("slabsocks_udp_bytes_total{direction=\"up\"}", bytes),
        ("slabsocks_udp_bytes_total{direction=\"down\"}", bytes),
        ("slabsocks_udp_dropped_total", 1),
        ("slabsocks_bytes_total{direction=\"up\"}", 0),
    ];
    eventually("the UDP counters are published", || {
        let text = scrape(metrics);
        want.iter().all(|(series, n)| metric(&text, series) == *n)
    });
    drop(control);
    let line = log.wait_for(&format!("access client={client} "));
    assert!(line.contains(" cmd=udp ") && line.contains(&format!(" up={bytes} down={bytes} ")), "{line}");
}
