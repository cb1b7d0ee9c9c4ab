//! Tests written for mutants of the session modules (README: "Mutation
//! testing") that the rest of the suite let through: each names the
//! mutant it kills.

mod common;

use common::*;
use slabsocks::users::Users;
use slabsocks::{Config, Server};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// Sends an HTTP CONNECT head for `target` with `extra` header lines;
/// returns the stream and the response's status code.
fn http_connect(proxy: SocketAddr, target: SocketAddr, extra: &str) -> (TcpStream, u16) {
    let mut s = connect(proxy);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).expect("response head") == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok());
    (s, status.unwrap_or_else(|| panic!("no status in {head:?}")))
}

/// `Proxy-Authorization` for `user:password`.
fn basic(user: &str, password: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in raw.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |a, (i, &b)| a | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    format!("Proxy-Authorization: Basic {out}\r\n")
}

/// handshake.rs `MAX_CREDENTIALS` (`255 + 1 + 255` with a `-` or a `*`):
/// HTTP Basic credentials as long as RFC 1929 allows, a 255-byte name and
/// a 255-byte password, log in.
#[test]
fn http_basic_credentials_of_255_and_255_bytes_log_in() {
    let (user, password) = ("u".repeat(255), "p".repeat(255));
    let proxy = Proxy::with(|c| c.users = Some(Users::from_pairs([(user.as_str(), password.as_str())])));
    let echo = echo_server("127.0.0.1:0");
    let (mut s, status) = http_connect(proxy.addr, echo, &basic(&user, &password));
    assert_eq!(status, 200);
    s.write_all(b"long login").unwrap();
    expect(&mut s, b"long login");
    let (_, status) = http_connect(proxy.addr, echo, &basic(&user, &password[1..]));
    assert_eq!(status, 407, "one byte short is another password");
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
