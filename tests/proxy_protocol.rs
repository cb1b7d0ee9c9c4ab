//! `--proxy-protocol`: behind a load balancer, the PROXY header names the
//! client, and the client rules, per-client limits and the access log use
//! that address. Test clients write the headers themselves; the last test
//! puts a real HAProxy in front of two slabsocks processes.

mod common;

use common::*;
use slabsocks::proto::encode_proxy_v2;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

fn v1(source: &str) -> Vec<u8> {
    let s: SocketAddr = source.parse().unwrap();
    format!("PROXY TCP4 {} 127.0.0.1 {} 1080\r\n", s.ip(), s.port()).into_bytes()
}

fn v2(source: &str) -> Vec<u8> {
    let mut out = [0u8; 52];
    let n = encode_proxy_v2(source.parse().unwrap(), "127.0.0.1:1080".parse().unwrap(), &mut out);
    out[..n].to_vec()
}

/// Sends `header`, then a SOCKS5 greeting and CONNECT to `target`, all in
/// one write; returns the stream and the reply code, or None if closed.
fn through(proxy: SocketAddr, header: &[u8], target: SocketAddr) -> (TcpStream, Option<u8>) {
    let mut s = connect(proxy);
    let mut all = header.to_vec();
    all.extend([5, 1, 0]);
    all.extend(connect_request(target));
    let _ = s.write_all(&all);
    let mut method = [0u8; 2];
    if s.read_exact(&mut method).is_err() {
        return (s, None);
    }
    let rep = read_reply(&mut s).ok().map(|r| r.0);
    (s, rep)
}

/// The client rules see the header's address, not the balancer's (the TCP
/// peer, 127.0.0.1, is not an allowed client here); the access log too.
#[test]
fn client_rules_and_the_access_log_use_the_header() {
    let (_child, addr, log) =
        spawn_logged(&["--proxy-protocol", "--allow-client", "192.0.2.0/24", "--access-log", "--workers", "1"]);
    let echo = echo_server("127.0.0.1:0");
    for header in [v1("192.0.2.7:5555"), v2("192.0.2.8:6666")] {
        let (mut s, rep) = through(addr, &header, echo);
        assert_eq!(rep, Some(0));
        s.write_all(b"behind a balancer").unwrap();
        expect(&mut s, b"behind a balancer");
    }
    log.wait_for("access client=192.0.2.7:5555 ");
    log.wait_for("access client=192.0.2.8:6666 ");
    // A client outside the rule, named by the header: closed.
    let (_s, rep) = through(addr, &v1("198.51.100.1:7777"), echo);
    assert_eq!(rep, None);
}

/// No header, a malformed one, or a SOCKS greeting where the header
/// belongs: closed without an answer.
#[test]
fn a_connection_without_a_valid_header_is_closed() {
    let (_child, addr) = spawn(&["--proxy-protocol"]);
    let echo = echo_server("127.0.0.1:0");
    for header in [&b""[..], b"PROXY TCP4 nonsense\r\n", b"PROXY TCP9 1 2 3 4\r\n", b"\r\n\r\n\0\r\nQUIT\n\x99"] {
        let (mut s, rep) = through(addr, header, echo);
        assert_eq!(rep, None, "{:?}", String::from_utf8_lossy(header));
        assert!(closed(&mut s));
    }
    // And a valid one works on the same server.
    assert_eq!(through(addr, &v2("192.0.2.1:1"), echo).1, Some(0));
}

/// The per-client limit counts the header's address: two sessions from
/// 192.0.2.9 through the same balancer connection source, the second
/// refused; 192.0.2.10 still gets in.
#[test]
fn the_per_client_limit_counts_the_header_address() {
    let (_child, addr) = spawn(&["--proxy-protocol", "--max-connections-per-client", "1", "--workers", "1"]);
    let echo = echo_server("127.0.0.1:0");
    let (_first, rep) = through(addr, &v2("192.0.2.9:1000"), echo);
    assert_eq!(rep, Some(0));
    assert_eq!(through(addr, &v2("192.0.2.9:1001"), echo).1, None, "a second session for 192.0.2.9");
    assert_eq!(through(addr, &v1("192.0.2.10:1000"), echo).1, Some(0));
}

/// `--proxy-protocol-from`: only those peers may send a header; others
/// are closed at accept, valid header or not.
#[test]
fn only_trusted_peers_may_send_a_header() {
    let (_child, addr) = spawn(&["--proxy-protocol", "--proxy-protocol-from", "127.0.0.2/32"]);
    let echo = echo_server("127.0.0.1:0");
    let (mut s, rep) = through(addr, &v2("192.0.2.1:1"), echo);
    assert_eq!(rep, None, "127.0.0.1 may not send a header");
    assert!(closed(&mut s));
    let mut s = connect_from("127.0.0.2", addr);
    let mut all = v2("192.0.2.1:1");
    all.extend([5, 1, 0]);
    all.extend(connect_request(echo));
    s.write_all(&all).unwrap();
    let mut method = [0u8; 2];
    s.read_exact(&mut method).unwrap();
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
}

/// HAProxy in TCP mode with `send-proxy-v2` in front of two slabsocks
/// processes (the README's snippet). Clients connect from 127.0.0.9; the
/// slabsocks processes allow only that client (HAProxy itself connects
/// from 127.0.0.1), log it, and count the sessions in their metrics.
#[test]
fn behind_haproxy() {
    if Command::new("haproxy").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        assert!(std::env::var_os("SLABSOCKS_REQUIRE_HAPROXY").is_none(), "haproxy is required but not installed");
        eprintln!("skipped: haproxy is not installed (apt-get install haproxy)");
        return;
    }
    let backend = |_| {
        spawn_logged(&[
            "--proxy-protocol",
            "--proxy-protocol-from",
            "127.0.0.1/32",
            "--allow-client",
            "127.0.0.8/30",
            "--max-connections-per-client",
            "2",
            "--access-log",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
    };
    let (a, b) = (backend(0), backend(1));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let single = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("slabsocks-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    let mut text = haproxy_config(port, a.1, b.1);
    // A second frontend to backend a alone, for the per-client limit.
    text.push_str(&format!(
        "\nfrontend one\n    bind 127.0.0.1:{single}\n    default_backend a\n\nbackend a\n    server a {} send-proxy-v2\n",
        a.1
    ));
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let haproxy_log = Log::from_stderr(child.stderr.take().unwrap());
    let _haproxy = Spawned(child);
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Probe from the client's address too: HAProxy passes the probe on.
    eventually("haproxy listens", || {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 9], 0)).into()).unwrap();
        sock.connect(&front.into()).is_ok()
    });
    let echo = echo_server("127.0.0.1:0");
    for i in 0..6 {
        let mut s = connect_from("127.0.0.9", front);
        s.write_all(&[5, 1, 0]).unwrap();
        let mut method = [0u8; 2];
        s.read_exact(&mut method).unwrap_or_else(|e| panic!("session {i}: {e}; haproxy: {}", haproxy_log.all()));
        s.write_all(&connect_request(echo)).unwrap();
        assert_eq!(read_reply(&mut s).unwrap().0, 0);
        s.write_all(b"via haproxy").unwrap();
        expect(&mut s, b"via haproxy");
    }
    // Round robin: both backends served sessions, all from the real client.
    for (_, _, log) in [&a, &b] {
        log.wait_for_nth("access client=127.0.0.9:", 2);
        assert!(!log.all().contains("access client=127.0.0.1:"), "a backend saw the balancer as the client");
    }
    let series = |log: &Log, name: &str| metric(&scrape(metrics_addr(log)), name);
    let connects = "slabsocks_requests_total{command=\"connect\"}";
    assert_eq!(series(&a.2, connects) + series(&b.2, connects), 6);
    eventually("backend a has closed every session", || series(&a.2, "slabsocks_sessions_active") == 0);
    // The per-client limit (2) counts 127.0.0.9 itself: a third session
    // from it while two are open is refused, and 127.0.0.10, through the
    // same HAProxy, is served.
    let one: SocketAddr = format!("127.0.0.1:{single}").parse().unwrap();
    let greet = |from: &str| {
        let mut s = connect_from(from, one);
        s.write_all(&[5, 1, 0]).unwrap();
        let mut method = [0u8; 2];
        let ok = s.read_exact(&mut method).is_ok();
        (s, ok)
    };
    let (_first, ok) = greet("127.0.0.9");
    assert!(ok);
    let (_second, ok) = greet("127.0.0.9");
    assert!(ok);
    let (mut third, ok) = greet("127.0.0.9");
    assert!(!ok && closed(&mut third), "a third session for 127.0.0.9");
    let (_other, ok) = greet("127.0.0.10");
    assert!(ok, "another client through the same balancer");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The configuration the README shows (ports filled in).
fn haproxy_config(port: u16, a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "global
    maxconn 1000

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend socks
    bind 127.0.0.1:{port}
    default_backend slabsocks

backend slabsocks
    balance roundrobin
    server a {a} send-proxy-v2
    server b {b} send-proxy-v2
"
    )
}

/// UDP ASSOCIATE through a balancer: the client check takes the header's
/// address (127.0.0.5), not the balancer's (127.0.0.1): datagrams from
/// 127.0.0.1 are dropped, the client's own are relayed.
#[test]
fn the_udp_client_check_uses_the_header() {
    use slabsocks::proto::encode_udp_header;
    use std::net::UdpSocket;
    let proxy = Proxy::with(|c| c.proxy_protocol = true);
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let mut req = connect_request("0.0.0.0:0".parse().unwrap());
    req[1] = 3;
    let mut all = v2("127.0.0.5:4000");
    all.extend([5, 1, 0]);
    all.extend(req);
    let mut control = connect(proxy.addr);
    control.write_all(&all).unwrap();
    let mut method = [0u8; 2];
    control.read_exact(&mut method).unwrap();
    let (rep, frame) = read_reply(&mut control).unwrap();
    assert_eq!(rep, 0);
    let relay = bnd(&frame);
    let wrap = |data: &[u8]| {
        let mut out = vec![0u8; 22];
        let n = encode_udp_header(echo_addr, &mut out);
        out.truncate(n);
        out.extend_from_slice(data);
        out
    };
    let balancer = UdpSocket::bind("127.0.0.1:0").unwrap();
    balancer.send_to(&wrap(b"from the balancer's address"), relay).unwrap();
    let client = UdpSocket::bind("127.0.0.5:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.send_to(&wrap(b"from the client"), relay).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, relay);
    assert!(buf[..n].ends_with(b"from the client"));
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1, "only the client's datagram reached the echo");
    drop(control);
}
