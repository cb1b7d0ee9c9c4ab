//! `--access-log`: one line per finished session, formatted at its end.

mod common;

use common::*;
use std::io::Write;

/// The access line of the session from `client` (its local address).
fn line_of(log: &Log, client: std::net::SocketAddr) -> String {
    let key = format!("access client={client} ");
    log.wait_for(&key)
}

#[test]
fn a_success_a_refusal_and_a_failed_login() {
    let users = users_file("access", "alice:secret\n");
    let (_child, addr, log) =
        spawn_logged(&["--access-log", "--users", users.to_str().unwrap(), "--auth-exempt", "127.0.0.3/32"]);
    let echo = echo_server("127.0.0.1:0");

    // A success: five bytes each way.
    let (mut s, rep) = login_and_connect(addr, "alice", "secret", echo);
    assert_eq!(rep, 0);
    s.write_all(b"12345").unwrap();
    expect(&mut s, b"12345");
    let me = s.local_addr().unwrap();
    drop(s);
    let line = line_of(&log, me);
    let want = format!("user=alice proto=socks5 cmd=connect dest={echo} connected={echo} reply=0x00 up=5 down=5 ms=");
    assert!(line.contains(&want), "{line}");
    assert!(line.ends_with("end=\"done\""), "{line}");

    // A refusal: the destination refuses the connection.
    let (mut s, rep) = login_and_connect(addr, "alice", "secret", closed_port());
    assert_eq!(rep, 5);
    let me = s.local_addr().unwrap();
    assert!(closed(&mut s));
    drop(s);
    let line = line_of(&log, me);
    assert!(
        line.contains("user=alice proto=socks5 cmd=connect") && line.contains("connected=- reply=0x05 up=0 down=0"),
        "{line}"
    );
    assert!(line.ends_with("end=\"connection refused (0x05)\""), "{line}");

    // A failed login: no user, no request.
    let mut s = connect(addr);
    assert_ne!(login(&mut s, "alice", "wrong"), 0);
    let me = s.local_addr().unwrap();
    assert!(closed(&mut s));
    drop(s);
    let line = line_of(&log, me);
    assert!(line.contains("user=- proto=- cmd=- dest=- connected=- reply=- up=0 down=0"), "{line}");
    assert!(line.ends_with("end=\"login failed\""), "{line}");

    // HTTP CONNECT by name, from an exempt address.
    let mut s = connect_from("127.0.0.3", addr);
    s.write_all(format!("CONNECT localhost:{} HTTP/1.1\r\nHost: x\r\n\r\n", echo.port()).as_bytes()).unwrap();
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut s, &mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let me = s.local_addr().unwrap();
    drop(s);
    let line = line_of(&log, me);
    assert!(line.contains(&format!("proto=http cmd=connect dest=localhost:{} connected=", echo.port())), "{line}");
    remove_users_file(&users);
}

/// Off by default: no access lines.
#[test]
fn off_by_default() {
    let (mut child, addr, log) = spawn_logged(&[]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(addr, echo);
    s.write_all(b"x").unwrap();
    expect(&mut s, b"x");
    drop(s);
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
    assert!(!log.all().contains("access client="), "{}", log.all());
}
