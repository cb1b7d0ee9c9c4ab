//! SOCKS4, SOCKS4a and HTTP CONNECT on the SOCKS5 port.

mod common;

use common::*;
use slabsocks::Lookup;
use slabsocks::rules::Rules;
use slabsocks::users::Users;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A SOCKS4 request: CONNECT (1) or BIND (2) to `to`, with `user`.
fn socks4(cd: u8, to: SocketAddr, user: &str) -> Vec<u8> {
    let SocketAddr::V4(to) = to else { panic!("SOCKS4 is IPv4") };
    let mut r = vec![4, cd];
    r.extend_from_slice(&to.port().to_be_bytes());
    r.extend_from_slice(&to.ip().octets());
    r.extend_from_slice(user.as_bytes());
    r.push(0);
    r
}

/// A SOCKS4a CONNECT to `name:port`.
fn socks4a(name: &str, port: u16) -> Vec<u8> {
    let mut r = vec![4, 1];
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 1, 0]);
    r.extend_from_slice(name.as_bytes());
    r.push(0);
    r
}

/// Sends `req` and reads the 8-byte SOCKS4 reply.
fn socks4_reply(s: &mut TcpStream) -> [u8; 8] {
    let mut r = [0u8; 8];
    s.read_exact(&mut r).expect("SOCKS4 reply");
    assert_eq!(r[0], 0, "reply version");
    r
}

fn reply_addr(r: &[u8; 8]) -> SocketAddr {
    SocketAddr::from(([r[4], r[5], r[6], r[7]], u16::from_be_bytes([r[2], r[3]])))
}

#[test]
fn socks4_connect() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    s.write_all(&socks4(1, echo, "anyone")).unwrap();
    assert_eq!(socks4_reply(&mut s)[1], 0x5A);
    s.write_all(b"over socks4").unwrap();
    expect(&mut s, b"over socks4");
}

/// SOCKS4a: the proxy resolves the name (through the same off-loop
/// resolver as SOCKS5; scripted here).
#[test]
fn socks4a_connect_by_name_with_pipelined_payload() {
    let echo = echo_server("127.0.0.1:0");
    let proxy = Proxy::with(|c| {
        c.lookup = Lookup::new(move |host, port| match host {
            "echo.test" => Ok(vec![SocketAddr::new(echo.ip(), port)]),
            _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no")),
        })
    });
    let mut s = connect(proxy.addr);
    let mut wire = socks4a("echo.test", echo.port());
    wire.extend_from_slice(b"pipelined");
    s.write_all(&wire).unwrap();
    assert_eq!(socks4_reply(&mut s)[1], 0x5A);
    expect(&mut s, b"pipelined");
    let mut unknown = connect(proxy.addr);
    unknown.write_all(&socks4a("nowhere.test", 80)).unwrap();
    assert_eq!(socks4_reply(&mut unknown)[1], 0x5B);
}

#[test]
fn socks4_refused_destination_is_0x5b_and_a_close() {
    let proxy = Proxy::start();
    let mut s = connect(proxy.addr);
    s.write_all(&socks4(1, closed_port(), "")).unwrap();
    assert_eq!(socks4_reply(&mut s), [0, 0x5B, 0, 0, 0, 0, 0, 0]);
    assert!(closed(&mut s));
}

/// SOCKS4a through the same resolver and rules as SOCKS5: a name that
/// resolves to a denied address gets 0x5B.
#[test]
fn socks4a_names_meet_the_destination_rules() {
    let proxy = Proxy::with(|c| c.rules = Rules { deny_private_dest: true, ..Rules::default() });
    let mut s = connect(proxy.addr);
    s.write_all(&socks4a("localhost", 80)).unwrap();
    assert_eq!(socks4_reply(&mut s)[1], 0x5B);
    assert!(closed(&mut s));
}

/// A client that never sends the USERID's NUL is cut off at the bound.
#[test]
fn socks4_userid_without_nul_is_refused_at_the_bound() {
    let proxy = Proxy::start();
    let mut s = connect(proxy.addr);
    let mut wire = vec![4, 1, 0, 80, 127, 0, 0, 1];
    wire.extend_from_slice(&[b'u'; 300]);
    s.write_all(&wire).unwrap();
    assert_eq!(socks4_reply(&mut s)[1], 0x5B);
    assert!(closed(&mut s));
}

#[test]
fn socks4_bind_two_replies() {
    let proxy = Proxy::start();
    let mut s = connect(proxy.addr);
    s.write_all(&socks4(2, "127.0.0.1:0".parse().unwrap(), "")).unwrap();
    let first = socks4_reply(&mut s);
    assert_eq!(first[1], 0x5A);
    let at = reply_addr(&first);
    assert_eq!(at.ip(), proxy.addr.ip());
    let mut peer = TcpStream::connect(at).unwrap();
    let second = socks4_reply(&mut s);
    assert_eq!(second[1], 0x5A);
    assert_eq!(reply_addr(&second), peer.local_addr().unwrap());
    peer.write_all(b"called back").unwrap();
    expect(&mut s, b"called back");
}

/// SOCKS4 carries no password: with users, it is refused, except for
/// `--auth-exempt` clients.
#[test]
fn socks4_is_refused_when_logins_are_required_except_for_exempt_clients() {
    let echo = echo_server("127.0.0.1:0");
    let proxy = Proxy::with(|c| {
        c.users = Some(Users::from_pairs([("alice", "pw")]));
        c.rules = Rules { auth_exempt: vec!["127.0.0.2".parse().unwrap()], ..Rules::default() };
    });
    let mut s = connect_from("127.0.0.1", proxy.addr);
    s.write_all(&socks4(1, echo, "alice")).unwrap();
    assert_eq!(socks4_reply(&mut s)[1], 0x5B);
    assert!(closed(&mut s));
    let mut exempt = connect_from("127.0.0.2", proxy.addr);
    exempt.write_all(&socks4(1, echo, "")).unwrap();
    assert_eq!(socks4_reply(&mut exempt)[1], 0x5A);
}

#[test]
fn disable_socks4_closes_without_an_answer() {
    let proxy = Proxy::with(|c| c.socks4 = false);
    let mut s = connect(proxy.addr);
    s.write_all(&socks4(1, echo_server("127.0.0.1:0"), "")).unwrap();
    assert!(read_to_end(&mut s).is_empty());
}

// ------------------------------------------------------------ HTTP CONNECT

#[test]
fn http_connect_tunnels_and_forwards_pipelined_bytes() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    let mut wire = format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").into_bytes();
    wire.extend_from_slice(b"sent with the head");
    s.write_all(&wire).unwrap();
    let head = read_head(&mut s);
    assert_eq!(status(&head), 200, "{head}");
    expect(&mut s, b"sent with the head");
    s.write_all(b"and after").unwrap();
    expect(&mut s, b"and after");
}

#[test]
fn http_connect_to_an_ipv6_literal() {
    let proxy = Proxy::start();
    let echo = echo_server("[::1]:0");
    let (mut s, head) = http_connect(proxy.addr, &format!("[::1]:{}", echo.port()), "");
    assert_eq!(status(&head), 200, "{head}");
    s.write_all(b"v6").unwrap();
    expect(&mut s, b"v6");
}

#[test]
fn http_credentials_407_without_or_wrong_200_right() {
    let echo = echo_server("127.0.0.1:0");
    let proxy = Proxy::with(|c| c.users = Some(Users::from_pairs([("alice", "s3cret")])));
    let target = echo.to_string();
    let (mut s, head) = http_connect(proxy.addr, &target, "");
    assert_eq!(status(&head), 407, "{head}");
    assert!(head.contains("Proxy-Authenticate: Basic"), "{head}");
    assert!(closed(&mut s));
    let (mut s, head) = http_connect(proxy.addr, &target, &basic("alice", "wrong"));
    assert_eq!(status(&head), 407, "{head}");
    assert!(closed(&mut s));
    let (mut s, head) = http_connect(proxy.addr, &target, &basic("alice", "s3cret"));
    assert_eq!(status(&head), 200, "{head}");
    s.write_all(b"logged in").unwrap();
    expect(&mut s, b"logged in");
}

#[test]
fn http_errors_403_502_504_405_400_431() {
    let deny = Rules { deny_dest: vec!["127.0.0.2".parse().unwrap()], ..Rules::default() };
    let proxy = Proxy::with(|c| {
        c.rules = deny;
        c.connect_timeout = Duration::from_millis(300);
    });
    let (mut s, head) = http_connect(proxy.addr, "127.0.0.2:80", "");
    assert_eq!(status(&head), 403, "{head}");
    assert!(String::from_utf8(read_to_end(&mut s)).unwrap().contains("denied"));
    let (mut s, head) = http_connect(proxy.addr, &closed_port().to_string(), "");
    assert_eq!(status(&head), 502, "{head}");
    assert!(closed(&mut s));
    let (target, _fill) = unresponsive_target();
    let (mut s, head) = http_connect(proxy.addr, &target.to_string(), "");
    assert_eq!(status(&head), 504, "{head}");
    assert!(closed(&mut s));

    let mut s = connect(proxy.addr);
    s.write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n").unwrap();
    let head = read_head(&mut s);
    assert_eq!(status(&head), 405, "{head}");
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("CONNECT only"), "{body}");

    let (mut s, head) = http_connect(proxy.addr, "no-port-here", "");
    assert_eq!(status(&head), 400, "{head}");
    assert!(closed(&mut s));

    // A head larger than 8 KiB.
    let huge = format!("X-Filler: {}\r\n", "f".repeat(9000));
    let (mut s, head) = http_connect(proxy.addr, "127.0.0.1:80", &huge);
    assert_eq!(status(&head), 431, "{head}");
    assert!(closed(&mut s));
}

/// A real browser's head is a few KiB: more than the first 1 KiB buffer.
#[test]
fn http_heads_of_a_few_kib_are_fine() {
    let proxy = Proxy::start();
    let echo = echo_server("127.0.0.1:0");
    let cookies = format!("Cookie: {}\r\nUser-Agent: {}\r\n", "c".repeat(3000), "u".repeat(1000));
    let (mut s, head) = http_connect(proxy.addr, &echo.to_string(), &cookies);
    assert_eq!(status(&head), 200, "{head}");
    s.write_all(b"ok").unwrap();
    expect(&mut s, b"ok");
}

#[test]
fn disable_http_keeps_the_400_hint() {
    let proxy = Proxy::with(|c| c.http = false);
    let (_, head) = http_connect(proxy.addr, "127.0.0.1:80", "");
    assert_eq!(status(&head), 400, "{head}");
}
