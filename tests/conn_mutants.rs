//! Tests written for mutants of the session modules (README: "Mutation
//! testing") that the rest of the suite let through: each names the
//! mutant it kills.

mod common;

use common::*;
use slabsocks::UdpMatch;
use slabsocks::users::Users;
use slabsocks::{Config, Server};
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};

/// handshake.rs `MAX_CREDENTIALS` (`255 + 1 + 255` with a `-` or a `*`):
/// HTTP Basic credentials as long as RFC 1929 allows, a 255-byte name and
/// a 255-byte password, log in.
#[test]
fn http_basic_credentials_of_255_and_255_bytes_log_in() {
    let (user, password) = ("u".repeat(255), "p".repeat(255));
    let proxy = Proxy::with(|c| c.users = Some(Users::from_pairs([(user.as_str(), password.as_str())])));
    let echo = echo_server("127.0.0.1:0");
    let (mut s, head) = http_connect(proxy.addr, &echo.to_string(), &basic(&user, &password));
    assert_eq!(status(&head), 200, "{head}");
    s.write_all(b"long login").unwrap();
    expect(&mut s, b"long login");
    let (_, head) = http_connect(proxy.addr, &echo.to_string(), &basic(&user, &password[1..]));
    assert_eq!(status(&head), 407, "one byte short is another password");
}

/// handshake.rs `greeting`, the `Method::NoAcceptable` arm deleted: after
/// `05 FF` the session went on to read a request and served it, without a
/// login. The request must get no reply, only the close.
#[test]
fn a_request_after_no_acceptable_method_is_not_served() {
    let proxy = Proxy::with(|c| c.users = Some(Users::from_pairs([("alice", "pw")])));
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 1, 0]).unwrap();
    expect(&mut s, &[5, 0xff]);
    let _ = s.write_all(&connect_request(echo));
    assert!(closed(&mut s));
    // The same with the request pipelined behind the greeting.
    let mut s = connect(proxy.addr);
    let mut wire = vec![5, 1, 0];
    wire.extend(connect_request(echo));
    s.write_all(&wire).unwrap();
    expect(&mut s, &[5, 0xff]);
    assert!(closed(&mut s));
}

/// accept.rs `Accept::listeners` returning 1: when accepting resumed, only
/// the first listener was retried, and a client already queued on the
/// second waited for an edge that never comes. Every listener is retried.
#[test]
fn a_client_queued_on_a_second_listener_is_served_when_a_slot_frees() {
    let config = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()],
        max_connections: Some(1),
        shutdown_grace: std::time::Duration::from_millis(200),
        ..Config::default()
    };
    let server = Server::bind(config).expect("bind");
    let (first, second) = (server.local_addrs()[0], server.local_addrs()[1]);
    let handle = server.handle();
    let thread = std::thread::spawn(move || server.run());
    let echo = echo_server("127.0.0.1:0");

    let a = open(first, echo);
    // Queued in the second listener's backlog while the one slot is taken.
    let mut c = connect(second);
    c.write_all(&[5, 1, 0]).unwrap();
    drop(a);
    expect(&mut c, &[5, 0]);
    c.write_all(&connect_request(echo)).unwrap();
    assert_eq!(read_reply(&mut c).unwrap().0, 0);
    c.write_all(b"second listener").unwrap();
    expect(&mut c, b"second listener");
    drop(c);
    handle.shutdown();
    thread.join().expect("server thread").expect("run");
}

/// accept.rs `Accept::stop` made a no-op: the listeners stayed open
/// through the grace period, and new clients were served. (The shutdown
/// test in socks5.rs missed it: its grace ends within its wait.) They must
/// be refused while an open session still holds the server up.
#[test]
fn shutdown_closes_the_listener_while_a_session_is_open() {
    let proxy = Proxy::with(|c| c.shutdown_grace = std::time::Duration::from_secs(60));
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(proxy.addr, echo);
    proxy.handle.shutdown();
    eventually("the listener closes", || TcpStream::connect(proxy.addr).is_err());
    s.write_all(b"still open").unwrap();
    expect(&mut s, b"still open");
    drop(s);
    proxy.wait_sessions(0);
}

/// bind.rs `addresses` (`&&` made `||`, a `!` deleted) and `route_to`
/// (returning `None`, a `!` deleted): a BIND for an IPv6 peer from a client
/// that reached us over IPv4 listens on the address the route to the peer
/// takes, not on the control connection's IPv4 one, and not failing 0x08.
#[test]
fn a_bind_for_an_ipv6_peer_over_an_ipv4_control_connection_listens_on_ipv6() {
    let proxy = Proxy::start();
    assert!(proxy.addr.is_ipv4());
    let (mut s, rep, frame) = request(proxy.addr, &bind_request("[::1]:0".parse().unwrap()));
    assert_eq!(rep, 0, "first reply");
    let at = bnd(&frame);
    assert_eq!(at.ip().to_string(), "::1", "BND is of the peer's family");
    let mut peer = TcpStream::connect(at).unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (rep, frame) = read_reply(&mut s).expect("second reply");
    assert_eq!((rep, bnd(&frame)), (0, peer.local_addr().unwrap()));
    s.write_all(b"across families").unwrap();
    expect(&mut peer, b"across families");
}

/// bind.rs `hold_client_bytes`, `c.start > 0` made `== 0` or `< 0`: bytes
/// pipelined after the BIND request were not moved to the front of the
/// buffer, so fewer than it holds ended the session. A client may send as
/// many as the handshake buffer holds (1 KiB) before the peer comes.
#[test]
fn bytes_pipelined_after_a_bind_request_may_fill_the_whole_buffer() {
    let proxy = Proxy::start();
    let payload: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    let mut s = connect(proxy.addr);
    let mut wire = vec![5, 1, 0];
    wire.extend(bind_request("0.0.0.0:0".parse().unwrap()));
    wire.extend_from_slice(&payload);
    s.write_all(&wire).unwrap();
    expect(&mut s, &[5, 0]);
    let (rep, frame) = read_reply(&mut s).expect("first reply");
    assert_eq!(rep, 0, "first reply");
    let mut peer = TcpStream::connect(bnd(&frame)).unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (rep, _) = read_reply(&mut s).expect("second reply: the session must not end");
    assert_eq!(rep, 0, "second reply");
    expect(&mut peer, &payload);
}

/// UDP ASSOCIATE: the request for `dst`; returns the control connection
/// and the relay address of the reply.
fn associate(proxy: SocketAddr, dst: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut req = connect_request(dst);
    req[1] = 3;
    let (s, rep, frame) = request(proxy, &req);
    assert_eq!(rep, 0, "UDP ASSOCIATE reply");
    (s, bnd(&frame))
}

/// A UDP echo server on 127.0.0.1.
fn udp_echo() -> SocketAddr {
    udp_echo_on(UdpSocket::bind("127.0.0.1:0").unwrap())
}

fn udp_echo_on(s: UdpSocket) -> SocketAddr {
    let local = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    local
}

/// Sends `data` for `to` through `relay` and expects it back from `to`.
fn udp_round_trip(s: &UdpSocket, relay: SocketAddr, to: SocketAddr, data: &[u8]) {
    let mut out = vec![0u8; 22];
    let n = slabsocks::proto::encode_udp_header(to, &mut out);
    out.truncate(n);
    out.extend_from_slice(data);
    s.send_to(&out, relay).unwrap();
    let mut buf = [0u8; 2048];
    let (got, from) = s.recv_from(&mut buf).expect("a datagram from the relay");
    assert_eq!(from, relay);
    assert_eq!(&buf[..got], &out[..], "the reply names the remote and carries the data");
}

fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(DATAGRAM_TIMEOUT)).unwrap();
    s
}

/// udp.rs `start`, the `ip.is_unspecified()` guard made true or false: the
/// reply advertises `--udp-bind-addr` when it is an address, and the
/// control connection's local address when it is unspecified.
#[test]
fn udp_bind_addr_is_advertised_unless_unspecified() {
    let echo = udp_echo();
    for (bind, shown) in [("127.0.0.3", "127.0.0.3"), ("0.0.0.0", "127.0.0.1")] {
        let proxy = Proxy::with(|c| c.udp_bind_addr = Some(bind.parse().unwrap()));
        let (_control, relay) = associate(proxy.addr, "0.0.0.0:0".parse().unwrap());
        assert_eq!(relay.ip().to_string(), shown, "--udp-bind-addr {bind}");
        udp_round_trip(&udp_client(), relay, echo, b"advertised");
    }
}

/// udp.rs `start`, the `dst_port != 0` guard made true: under `ip+port`, a
/// request with DST.PORT 0 names no port (RFC 1928 §7: the client does not
/// know it yet), so the first datagram pins it, as under `ip`.
#[test]
fn policy_ip_port_with_dst_port_0_pins_the_first_datagram() {
    let proxy = Proxy::with(|c| c.udp_client_match = UdpMatch::IpPort);
    let echo = udp_echo();
    let (_control, relay) = associate(proxy.addr, "0.0.0.0:0".parse().unwrap());
    udp_round_trip(&udp_client(), relay, echo, b"port unknown at request time");
}

/// udp.rs `step`, `budget == 0` made `!=`: an association asked to run
/// again at every turn, and the loop spun while it was open. An idle
/// association uses no CPU.
#[test]
fn an_idle_udp_association_does_not_spin() {
    let (mut child, addr) = spawn(&[]);
    let echo = udp_echo();
    let (_control, relay) = associate(addr, "0.0.0.0:0".parse().unwrap());
    udp_round_trip(&udp_client(), relay, echo, b"then idle");
    let before = cpu_ticks(child.id());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = cpu_ticks(child.id()) - before;
    assert!(used < 30, "{used} ticks of CPU in one second with an idle association: the loop spins");
    assert!(child.try_wait().unwrap().is_none(), "the server is still running");
}

/// udp.rs `cached`, `&&` made `||`: any name still in the cache matched,
/// so a datagram for a second name went to the first name's address. Each
/// name goes to its own address.
#[test]
fn a_cached_name_does_not_answer_for_another() {
    // Two echo servers on one port, on 127.0.0.1 and 127.0.0.2.
    let (a, b) = (0..20)
        .find_map(|_| {
            let a = UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = a.local_addr().unwrap().port();
            UdpSocket::bind(("127.0.0.2", port)).ok().map(|b| (a, b))
        })
        .expect("a port free on both addresses");
    let (a, b) = (udp_echo_on(a), udp_echo_on(b));
    let proxy = Proxy::with(move |c| {
        c.lookup = slabsocks::Lookup::new(move |host, port| match host {
            "a.test" => Ok(vec![SocketAddr::new(a.ip(), port)]),
            "b.test" => Ok(vec![SocketAddr::new(b.ip(), port)]),
            _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no")),
        })
    });
    let (_control, relay) = associate(proxy.addr, "0.0.0.0:0".parse().unwrap());
    let s = udp_client();
    for (name, to) in [("a.test", a), ("b.test", b), ("a.test", a)] {
        let mut out = vec![0, 0, 0, 3, name.len() as u8];
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&to.port().to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        s.send_to(&out, relay).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = s.recv_from(&mut buf).expect("a datagram from the relay");
        let (header, at) = slabsocks::proto::parse_udp_header(&buf[..n]).expect("a reply header");
        let from = SocketAddr::new(header.addr.ip().expect("an address"), header.port);
        assert_eq!((from, &buf[at..n]), (to, name.as_bytes()), "{name} goes to its own address");
    }
}
