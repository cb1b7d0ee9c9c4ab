//! `--metrics-listen`: the counters after a known mix of sessions, exactly,
//! summed over two workers; and the endpoint's answers to everything else.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;

#[test]
fn counters_after_a_known_mix_of_sessions() {
    let users = users_file("metrics", "alice:secret\n");
    let (_child, addr, log) = spawn_logged(&[
        "--workers",
        "2",
        "--max-connections",
        "1000",
        "--metrics-listen",
        "127.0.0.1:0",
        "--users",
        users.to_str().unwrap(),
        "--auth-exempt",
        "127.0.0.3/32",
    ]);
    let metrics = metrics_addr(&log);
    let echo = echo_server("127.0.0.1:0");
    // Three SOCKS5 CONNECTs with a login, five bytes each way.
    for _ in 0..3 {
        let (mut s, rep) = login_and_connect(addr, "alice", "secret", echo);
        assert_eq!(rep, 0);
        s.write_all(b"12345").unwrap();
        expect(&mut s, b"12345");
    }
    // One refused by the destination.
    let (refused, rep) = login_and_connect(addr, "alice", "secret", closed_port());
    assert_eq!(rep, 5);
    drop(refused);
    // One failed login.
    assert_ne!(login(&mut connect(addr), "alice", "wrong"), 0);
    // One SOCKS4 CONNECT and one HTTP CONNECT, from the exempt address.
    let mut s4 = connect_from("127.0.0.3", addr);
    let mut req = vec![4u8, 1];
    req.extend(echo.port().to_be_bytes());
    req.extend([127, 0, 0, 1]);
    req.extend(b"u\0");
    s4.write_all(&req).unwrap();
    let mut reply = [0u8; 8];
    s4.read_exact(&mut reply).unwrap();
    assert_eq!(reply[1], 0x5a);
    s4.write_all(b"abc").unwrap();
    expect(&mut s4, b"abc");
    let mut h = connect_from("127.0.0.3", addr);
    h.write_all(format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: x\r\n\r\n", echo.port()).as_bytes()).unwrap();
    let mut head = [0u8; 12];
    h.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let want = [
        ("slabsocks_sessions_accepted_total", 7),
        ("slabsocks_requests_total{command=\"connect\"}", 6),
        ("slabsocks_requests_total{command=\"bind\"}", 0),
        ("slabsocks_requests_by_protocol_total{protocol=\"socks5\"}", 4),
        ("slabsocks_requests_by_protocol_total{protocol=\"socks4\"}", 1),
        ("slabsocks_requests_by_protocol_total{protocol=\"http\"}", 1),
        ("slabsocks_replies_total{code=\"0x00\"}", 5),
        ("slabsocks_replies_total{code=\"0x05\"}", 1),
        ("slabsocks_replies_total{code=\"0x01\"}", 0),
        ("slabsocks_auth_failures_total", 1),
        ("slabsocks_rule_denials_total", 0),
        ("slabsocks_bytes_total{direction=\"up\"}", 18),
        ("slabsocks_bytes_total{direction=\"down\"}", 18),
        ("slabsocks_max_connections", 1000),
        ("slabsocks_sessions_closed_total{reason=\"done\"}", 3),
        ("slabsocks_sessions_closed_total{reason=\"failed\"}", 1),
        ("slabsocks_sessions_closed_total{reason=\"login_failed\"}", 1),
        ("slabsocks_workers", 2),
    ];
    // Each worker publishes at the end of its turn: wait until all have.
    let end = std::time::Instant::now() + IO_TIMEOUT;
    let wrong = loop {
        let text = scrape(metrics);
        let wrong: Vec<_> = want
            .iter()
            .filter(|(series, n)| metric(&text, series) != *n)
            .map(|(s, n)| (*s, *n, metric(&text, s)))
            .collect();
        if wrong.is_empty() || std::time::Instant::now() > end {
            break wrong;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(wrong.is_empty(), "(series, expected, got): {wrong:?}");
    // The two sessions still open (SOCKS4, HTTP), then none.
    eventually("two sessions are active", || metric(&scrape(metrics), "slabsocks_sessions_active") == 2);
    drop((s4, h));
    eventually("no session is active", || metric(&scrape(metrics), "slabsocks_sessions_active") == 0);
    remove_users_file(&users);
}

/// Everything but `GET /metrics`: a defined answer, then a close.
#[test]
fn other_requests_get_their_status() {
    let (_child, _addr, log) = spawn_logged(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&log);
    let cases: [(&[u8], &str); 6] = [
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 "),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 "),
        (b"\x05\x01\x00 nonsense \r\n\r\n", "HTTP/1.1 400 "),
        (b"HEAD /metrics HTTP/1.0\r\n\r\n", "HTTP/1.1 200 "),
    ];
    for (request, want) in cases {
        let answer = ask(metrics, request);
        assert!(answer.starts_with(want), "{:?}: {answer}", String::from_utf8_lossy(request));
    }
    assert!(!ask(metrics, b"HEAD /metrics HTTP/1.1\r\n\r\n").contains("slabsocks_"), "HEAD has no body");
    // A head beyond 1 KiB: 431.
    let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    long.extend(vec![b'a'; 2048]);
    let mut s = TcpStream::connect(metrics).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = s.write_all(&long);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

/// At most four metrics connections at once: a fifth is closed at accept,
/// and the four still get their answers.
#[test]
fn the_endpoint_has_its_own_connection_limit() {
    let (_child, _addr, log) = spawn_logged(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&log);
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let s = TcpStream::connect(metrics).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut fifth = TcpStream::connect(metrics).unwrap();
    fifth.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert!(closed(&mut fifth), "a fifth metrics connection was kept");
    for s in &mut held {
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }
}

/// A client that connects and says nothing holds one of the endpoint's
/// four connections for at most 5 s; then it is closed and scraping works
/// again.
#[test]
fn silent_connections_are_closed_after_their_time() {
    let (_child, _addr, log) = spawn_logged(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&log);
    let t0 = std::time::Instant::now();
    let mut silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(metrics).unwrap()).collect();
    for s in &mut silent {
        // The endpoint's 5 s, and room for a loaded machine.
        s.set_read_timeout(Some(std::time::Duration::from_secs(5 + 4))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0)), "a silent connection is closed, not kept");
    }
    // Not at once either: a client gets its 5 s to send its request.
    assert!(t0.elapsed() >= std::time::Duration::from_millis(4500), "closed after {:?}", t0.elapsed());
    assert!(scrape(metrics).contains("slabsocks_workers"));
}
