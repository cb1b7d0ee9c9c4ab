//! SOCKS5 CONNECT end to end, on loopback, with raw bytes.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    expect(s, msg);
}

#[test]
fn connect_ipv4() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let (mut s, rep, frame) = request(proxy.addr, &connect_request(echo));
    assert_eq!(rep, 0);
    // BND is the proxy's outgoing address: IPv4 loopback, a real port.
    assert_eq!(frame[3], 1);
    assert_eq!(&frame[4..8], &[127, 0, 0, 1]);
    assert_ne!(u16::from_be_bytes([frame[8], frame[9]]), 0);
    echo_roundtrip(&mut s, b"hello through slabsocks");
}

#[test]
fn connect_ipv6() {
    let proxy = Proxy::start();
    let echo = echo_server("[::1]:0");
    let (mut s, rep, frame) = request(proxy.addr, &connect_request(echo));
    assert_eq!(rep, 0);
    assert_eq!(frame[3], 4, "BND of an IPv6 connection is IPv6");
    assert_eq!(frame.len(), 22);
    echo_roundtrip(&mut s, b"v6");
}

#[test]
fn listen_on_ipv6() {
    let proxy = Proxy::with(|c| c.listen = vec!["[::1]:0".parse().unwrap()]);
    assert!(proxy.addr.is_ipv6());
    let echo = echo_server("127.0.0.1:0");
    echo_roundtrip(&mut open(proxy.addr, echo), b"over v6 listener");
}

#[test]
fn connect_domain_localhost() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let (mut s, rep, frame) = request(proxy.addr, &connect_domain("localhost", echo.port()));
    assert_eq!(rep, 0);
    assert!(frame[3] == 1 || frame[3] == 4, "BND is never a domain name");
    echo_roundtrip(&mut s, b"by name");
}

/// `curl socks5h://127.0.0.1` sends numeric hosts as ATYP 3. They must be
/// parsed, not resolved: with no resolver threads names fail, literals work.
#[test]
fn ip_literal_domains_skip_the_resolver() {
    let proxy = Proxy::with(|c| c.resolver_threads = 0);
    let echo4 = echo_server("127.0.0.1:0");
    let echo6 = echo_server("[::1]:0");
    for (name, port) in [("127.0.0.1", echo4.port()), ("::1", echo6.port()), ("[::1]", echo6.port())] {
        let (mut s, rep, _) = request(proxy.addr, &connect_domain(name, port));
        assert_eq!(rep, 0, "{name}");
        echo_roundtrip(&mut s, name.as_bytes());
    }
    let (mut s, rep, _) = request(proxy.addr, &connect_domain("localhost", echo4.port()));
    assert_eq!(rep, 4, "names need a resolver");
    assert!(closed(&mut s));
}

#[test]
fn refused_is_0x05() {
    let proxy = Proxy::start();
    let (mut s, rep, frame) = request(proxy.addr, &connect_request(closed_port()));
    assert_eq!(rep, 5);
    assert_eq!(frame, [5, 5, 0, 1, 0, 0, 0, 0, 0, 0], "a failure is a whole IPv4 frame");
    assert!(closed(&mut s));
}

/// `.invalid` never resolves (RFC 6761). If the machine's resolver does not
/// answer within the connect timeout, the proxy answers 0x04 anyway; both
/// are the outcome under test, so the test does not depend on DNS.
#[test]
fn unresolvable_name_is_0x04() {
    let proxy = Proxy::with(|c| c.connect_timeout = Duration::from_secs(3));
    let (mut s, rep, _) = request(proxy.addr, &connect_domain("nonexistent.invalid", 80));
    assert_eq!(rep, 4);
    assert!(closed(&mut s));
}

#[test]
fn connect_timeout_is_0x04() {
    // A listener whose backlog is full never completes new connects.
    let proxy = Proxy::with(|c| c.connect_timeout = Duration::from_millis(300));
    let (target, _keep) = unresponsive_target();
    let (mut s, rep, _) = request(proxy.addr, &connect_request(target));
    assert_eq!(rep, 4);
    assert!(closed(&mut s));
}

#[test]
fn unknown_command_is_0x07() {
    let proxy = Proxy::start();
    for cmd in [0x00u8, 0x04, 0x7f, 0xff] {
        let (mut s, rep, frame) = request(proxy.addr, &[5, cmd, 0, 1, 127, 0, 0, 1, 0, 80]);
        assert_eq!((rep, frame.len()), (7, 10), "cmd {cmd:#x}");
        assert!(closed(&mut s));
    }
}

#[test]
fn bad_address_type_is_0x08() {
    let proxy = Proxy::start();
    for atyp in [0u8, 2, 5, 0xff] {
        let (mut s, rep, _) = request(proxy.addr, &[5, 1, 0, atyp, 127, 0, 0, 1, 0, 80]);
        assert_eq!(rep, 8, "atyp {atyp}");
        assert!(closed(&mut s));
    }
}

#[test]
fn empty_domain_is_a_general_failure() {
    let proxy = Proxy::start();
    let (mut s, rep, _) = request(proxy.addr, &[5, 1, 0, 3, 0, 0, 80]);
    assert_eq!(rep, 1);
    assert!(closed(&mut s));
}

#[test]
fn no_acceptable_method_gets_ff_then_close() {
    let proxy = Proxy::start();
    for methods in [&[1u8][..], &[2], &[1, 2, 3, 0x80]] {
        let mut s = connect(proxy.addr);
        let mut g = vec![5, methods.len() as u8];
        g.extend_from_slice(methods);
        s.write_all(&g).unwrap();
        expect(&mut s, &[5, 0xff]);
        assert!(closed(&mut s));
    }
}

/// Firefox offers GSSAPI as well: we pick the method we support.
#[test]
fn several_methods_get_the_supported_one() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 3, 1, 2, 0]).unwrap();
    expect(&mut s, &[5, 0]);
    s.write_all(&connect_request(echo)).unwrap();
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
}

#[test]
fn wrong_request_version_closes_without_reply() {
    let proxy = Proxy::start();
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    s.write_all(&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80]).unwrap();
    assert!(closed(&mut s));
}

/// With HTTP CONNECT turned off, an HTTP request gets a hint.
#[test]
fn http_on_the_socks_port_gets_400_when_http_is_off() {
    let proxy = Proxy::with(|c| c.http = false);
    for req in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"] {
        let mut s = connect(proxy.addr);
        s.write_all(req).unwrap();
        let resp = String::from_utf8(read_to_end(&mut s)).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
        assert!(resp.contains("SOCKS5"));
    }
    // Other bytes: a plain close, no answer.
    let mut s = connect(proxy.addr);
    s.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    assert!(read_to_end(&mut s).is_empty());
}

#[test]
fn pipelined_greeting_request_and_payload() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    let mut wire = vec![5, 1, 0];
    wire.extend(connect_request(echo));
    // More payload than the handshake buffer holds: the rest is read once
    // relaying starts.
    let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    wire.extend_from_slice(&payload);
    s.write_all(&wire).unwrap();
    expect(&mut s, &[5, 0]);
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
    // Nothing more is sent until the payload is back: no later event may
    // be needed to forward it.
    expect(&mut s, &payload);
}

/// Server-speaks-first protocols (SMTP, SSH): the banner may arrive with
/// the connect completion and must be relayed without a client event.
#[test]
fn upstream_speaks_first() {
    let proxy = Proxy::start();
    let upstream = serve("127.0.0.1:0", |mut s| {
        s.write_all(b"220 ready\r\n").unwrap();
        let _ = read_to_end(&mut s);
    });
    for _ in 0..20 {
        let mut s = open(proxy.addr, upstream);
        expect(&mut s, b"220 ready\r\n");
    }
}

#[test]
fn one_byte_per_write_handshake() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    let mut wire = vec![5, 2, 1, 0];
    wire.extend(connect_domain("localhost", echo.port()));
    for (i, b) in wire.iter().enumerate() {
        s.write_all(&[*b]).unwrap();
        // Separate segments, so the server sees each byte on its own.
        std::thread::sleep(Duration::from_millis(2));
        if i == 3 {
            expect(&mut s, &[5, 0]);
        }
    }
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
    echo_roundtrip(&mut s, b"x");
}

#[test]
fn sixty_four_mib_both_ways_with_checksums() {
    const TOTAL: usize = 64 << 20;
    let proxy = Proxy::start();
    let (tx, rx) = mpsc::channel();
    let upstream = serve("127.0.0.1:0", move |mut s| {
        let mut w = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || send_pattern(&mut w, 2, TOTAL));
        let got = sum_to_end(&mut s);
        let sent = sender.join().unwrap();
        tx.send((got, sent)).unwrap();
    });
    let mut s = open(proxy.addr, upstream);
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_pattern(&mut w, 1, TOTAL));
    let got = sum_to_end(&mut s);
    let sent = sender.join().unwrap();
    let (up_got, up_sent) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(up_got, sent, "client → upstream");
    assert_eq!(got, up_sent, "upstream → client");
    drop(s);
    proxy.wait_sessions(0);
}

/// The client finishes sending first: its EOF reaches the upstream, and the
/// upstream's answer still comes back.
#[test]
fn half_close_from_client() {
    let proxy = Proxy::start();
    let upstream = serve("127.0.0.1:0", |mut s| {
        let got = read_to_end(&mut s);
        s.write_all(format!("got {} bytes", got.len()).as_bytes()).unwrap();
    });
    let mut s = open(proxy.addr, upstream);
    s.write_all(&[7u8; 100_000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut s), b"got 100000 bytes");
    proxy.wait_sessions(0);
}

/// The upstream finishes sending first: its EOF reaches the client, and the
/// client's later bytes still reach the upstream.
#[test]
fn half_close_from_upstream() {
    let proxy = Proxy::start();
    let (tx, rx) = mpsc::channel();
    let upstream = serve("127.0.0.1:0", move |mut s| {
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        tx.send(read_to_end(&mut s)).unwrap();
    });
    let mut s = open(proxy.addr, upstream);
    assert_eq!(read_to_end(&mut s), b"banner");
    s.write_all(b"after your EOF").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(IO_TIMEOUT).unwrap(), b"after your EOF");
    proxy.wait_sessions(0);
}

/// A client that stops reading: the proxy stops reading the upstream
/// (bounded buffering) and resumes when the client drains, losing nothing.
#[test]
fn backpressure_from_a_slow_reader() {
    // More than the socket buffers on the path can hold: each of the two
    // loopback connections may buffer up to tcp_rmem's maximum (32 MiB on
    // some machines) plus tcp_wmem's (4 MiB). 16 MiB was seen to fit.
    const TOTAL: usize = 128 << 20;
    let proxy = Proxy::start();
    let (tx, rx) = mpsc::channel();
    let upstream = serve("127.0.0.1:0", move |mut s| {
        tx.send(send_pattern(&mut s, 9, TOTAL)).unwrap();
    });
    let mut s = open(proxy.addr, upstream);
    // The upstream cannot finish while nobody reads.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "128 MiB cannot all be in flight");
    let got = sum_to_end(&mut s);
    assert_eq!(got, rx.recv_timeout(IO_TIMEOUT).unwrap());
}

#[test]
fn five_hundred_concurrent_sessions() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let mut clients: Vec<TcpStream> = (0..500).map(|_| open(proxy.addr, echo)).collect();
    proxy.wait_sessions(500);
    for (i, s) in clients.iter_mut().enumerate() {
        s.write_all(&[i as u8; 64]).unwrap();
    }
    for (i, s) in clients.iter_mut().enumerate() {
        expect(s, &[i as u8; 64]);
    }
    drop(clients);
    proxy.wait_sessions(0);
}

#[test]
fn stalled_half_greeting_is_closed_by_the_handshake_timeout() {
    let proxy = Proxy::with(|c| c.handshake_timeout = Duration::from_millis(200));
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 2, 0]).unwrap(); // one method byte short
    assert!(closed(&mut s));
    proxy.wait_sessions(0);
}

#[test]
fn idle_relay_is_closed_by_the_idle_timeout() {
    let proxy = Proxy::with(|c| c.idle_timeout = Some(Duration::from_millis(300)));
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(proxy.addr, echo);
    echo_roundtrip(&mut s, b"alive");
    assert!(closed(&mut s));
    proxy.wait_sessions(0);
}

#[test]
fn garbage_and_truncated_handshakes_leave_the_server_serving() {
    let proxy = Proxy::with(|c| c.handshake_timeout = Duration::from_millis(500));
    let echo = echo_server("127.0.0.1:0");
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![5],
        vec![5, 3, 0],
        vec![5, 0],
        vec![4, 1, 0, 80, 127, 0, 0, 1, 0],
        vec![0xff; 600],
        vec![5, 1, 0, 5, 1, 0],
        vec![5, 1, 0, 5, 1, 0, 3],
        vec![5, 1, 0, 5, 1, 0, 3, 200, b'a'],
        vec![5, 1, 0, 5, 9, 0, 1],
        vec![5, 1, 0, 6, 1, 0, 1, 127, 0, 0, 1, 0, 80],
        b"GET".to_vec(),
        b"POST / HTTP/1.0\r\n\r\n".to_vec(),
    ];
    let mut p = Pattern::new(42);
    for len in [1, 7, 64, 2000] {
        let mut v = vec![0u8; len];
        p.fill(&mut v);
        inputs.push(v);
    }
    for i in 0..200 {
        let input = &inputs[i % inputs.len()];
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        let _ = s.write_all(input);
        if i % 2 == 0 {
            drop(s); // hang up at once
        } else {
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let _ = s.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            // Every input ends in a close from the server, never a hang.
            let _ = s.read_to_end(&mut sink);
        }
    }
    echo_roundtrip(&mut open(proxy.addr, echo), b"still serving");
    proxy.wait_sessions(0);
}

#[test]
fn at_max_connections_new_clients_wait_then_get_served() {
    let proxy = Proxy::with(|c| c.max_connections = Some(2));
    let echo = echo_server("127.0.0.1:0");
    let a = open(proxy.addr, echo);
    let mut b = open(proxy.addr, echo);
    // The third connects at the TCP level (the kernel's backlog) but gets no
    // answer while two sessions are open.
    let mut c = connect(proxy.addr);
    c.write_all(&[5, 1, 0]).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut m = [0u8; 2];
    assert!(c.read(&mut m).is_err(), "third client must wait");
    drop(a);
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    c.write_all(&connect_request(echo)).unwrap();
    assert_eq!(read_reply(&mut c).unwrap().0, 0);
    echo_roundtrip(&mut c, b"served after a slot freed");
    echo_roundtrip(&mut b, b"b unaffected");
}

#[test]
fn shutdown_lets_open_sessions_finish_and_refuses_new_ones() {
    let proxy = Proxy::with(|c| c.shutdown_grace = Duration::from_secs(5));
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(proxy.addr, echo);
    proxy.handle.shutdown();
    // The open session keeps working during the grace period...
    echo_roundtrip(&mut s, b"grace");
    // ...while new clients are no longer accepted: refused well within the
    // grace (not only once the server is gone at its end).
    let end = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match TcpStream::connect(proxy.addr) {
            Err(_) => break,
            Ok(_) if std::time::Instant::now() > end => panic!("still accepting after shutdown"),
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    echo_roundtrip(&mut s, b"still in the grace period");
    drop(s);
    drop(proxy); // run() returns once the last session ends
}

/// Regression (mutation: the relay's work budget removed, so a session
/// never yields): one session flooding the proxy must not starve another.
/// With 1 KiB buffers the proxy, not the client, is the bottleneck, so the
/// flooding session always has bytes waiting; without the budget the loop
/// would never leave it. The bound is loose: a second per round trip.
#[test]
fn a_flooding_session_does_not_starve_another() {
    let proxy = Proxy::with(|c| c.buffer_size = 1024);
    let sink = serve("127.0.0.1:0", |mut s| {
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    });
    let mut flood = open(proxy.addr, sink);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let chunk = [0u8; 64 * 1024];
            let end = std::time::Instant::now() + Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < end {
                if flood.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    // Let the flood fill every buffer on its path first.
    std::thread::sleep(Duration::from_millis(200));
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(proxy.addr, echo);
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    for i in 0..50u8 {
        s.write_all(&[i]).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap_or_else(|e| panic!("round trip {i} starved: {e}"));
        assert_eq!(b, [i]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooding.join().unwrap();
}

/// Regression (mutation: the idle deadline never pushed back on traffic):
/// a session with traffic every 100 ms outlives an idle timeout of 300 ms.
#[test]
fn traffic_keeps_a_session_past_its_idle_timeout() {
    let proxy = Proxy::with(|c| c.idle_timeout = Some(Duration::from_millis(300)));
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(proxy.addr, echo);
    for i in 0..12u8 {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(&[i]).unwrap();
        expect(&mut s, &[i]);
    }
    // And with the traffic stopped, the timeout still comes.
    assert!(closed(&mut s));
}

/// The half-close waits for the bytes before it. The proxy's buffer (16
/// MiB) takes the upstream's whole 8 MiB and its EOF, while the client (a
/// small receive buffer, not reading yet) and the proxy's send buffer to it
/// (at most tcp_wmem's 4 MiB) hold only part: the FIN must wait for the
/// rest. The client then reads slowly and gets every byte, then the EOF.
#[test]
fn half_close_waits_for_a_slow_reader() {
    const TOTAL: usize = 8 << 20;
    let proxy = Proxy::with(|c| c.buffer_size = 16 << 20);
    let upstream = serve("127.0.0.1:0", |mut s| {
        let _ = send_pattern(&mut s, 5, TOTAL);
    });
    let mut s = {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&proxy.addr.into()).unwrap();
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(&[5, 1, 0]).unwrap();
        expect(&mut s, &[5, 0]);
        s.write_all(&connect_request(upstream)).unwrap();
        assert_eq!(read_reply(&mut s).unwrap().0, 0);
        s
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut sum = Sum::new();
    let mut buf = vec![0u8; 4096];
    let mut since_nap = 0;
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        sum.add(&buf[..n]);
        since_nap += n;
        if since_nap >= 1 << 20 {
            since_nap = 0;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut want = vec![0u8; TOTAL];
    Pattern::new(5).fill(&mut want);
    let mut expected = Sum::new();
    expected.add(&want);
    assert_eq!(sum, expected, "every byte before the EOF");
}
