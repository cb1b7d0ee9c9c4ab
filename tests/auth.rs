//! RFC 1929 username/password authentication and the access rules, with
//! real sockets on loopback (client source addresses from 127/8).

mod common;

use common::*;
use slabsocks::rules::Rules;
use slabsocks::users::Users;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

fn auth_proxy(f: impl FnOnce(&mut slabsocks::Config)) -> Proxy {
    Proxy::with(|c| {
        c.users = Some(Users::from_pairs([("alice", "wonderland"), ("bob", "builder")]));
        f(c)
    })
}

fn echo_ok(s: &mut TcpStream) {
    s.write_all(b"ping").unwrap();
    expect(s, b"ping");
}

#[test]
fn right_password_connects() {
    let proxy = auth_proxy(|_| {});
    let echo = echo_server("127.0.0.1:0");
    let (mut s, rep) = login_and_connect(proxy.addr, "alice", "wonderland", echo);
    assert_eq!(rep, 0);
    echo_ok(&mut s);
}

#[test]
fn wrong_password_and_unknown_user_fail_and_close() {
    let proxy = auth_proxy(|_| {});
    for (user, password) in
        [("alice", "wonderlan"), ("alice", "wonderland!"), ("alice", ""), ("mallory", "x"), ("", "")]
    {
        let mut s = connect(proxy.addr);
        assert_ne!(login(&mut s, user, password), 0, "{user}:{password}");
        assert!(closed(&mut s));
    }
    proxy.wait_sessions(0);
}

#[test]
fn offering_only_no_auth_to_an_auth_server_gets_ff() {
    let proxy = auth_proxy(|_| {});
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 1, 0]).unwrap();
    expect(&mut s, &[5, 0xff]);
    assert!(closed(&mut s));
}

#[test]
fn a_client_offering_both_methods_must_log_in() {
    let proxy = auth_proxy(|_| {});
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 2, 0, 2]).unwrap();
    expect(&mut s, &[5, 2]);
}

#[test]
fn bad_auth_version_closes() {
    let proxy = auth_proxy(|_| {});
    let mut s = connect(proxy.addr);
    s.write_all(&[5, 1, 2]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    s.write_all(&[5, 5, b'a', b'l', b'i', b'c', b'e', 1, b'x']).unwrap();
    assert!(closed(&mut s));
}

#[test]
fn password_with_colon_and_space_from_a_file() {
    let dir = std::env::temp_dir().join(format!("slabsocks-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("users");
    std::fs::write(&path, "# test users\ncarol:p:ss w0rd\r\n").unwrap();
    let users = Users::load(&path).unwrap();
    let proxy = Proxy::with(|c| c.users = Some(users));
    let echo = echo_server("127.0.0.1:0");
    let (mut s, rep) = login_and_connect(proxy.addr, "carol", "p:ss w0rd", echo);
    assert_eq!(rep, 0);
    echo_ok(&mut s);
    let mut s = connect(proxy.addr);
    assert_ne!(login(&mut s, "carol", "p"), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn greeting_auth_request_and_payload_in_one_write() {
    let proxy = auth_proxy(|_| {});
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    let mut wire = vec![5, 1, 2];
    wire.extend(auth_message("bob", "builder"));
    wire.extend(connect_request(echo));
    wire.extend_from_slice(b"early bytes");
    s.write_all(&wire).unwrap();
    expect(&mut s, &[5, 2, 1, 0]);
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
    expect(&mut s, b"early bytes");
}

#[test]
fn auth_one_byte_per_write() {
    let proxy = auth_proxy(|_| {});
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect(proxy.addr);
    let mut wire = vec![5, 1, 2];
    wire.extend(auth_message("bob", "builder"));
    wire.extend(connect_domain("localhost", echo.port()));
    for b in wire {
        s.write_all(&[b]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    expect(&mut s, &[5, 2, 1, 0]);
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
    echo_ok(&mut s);
}

#[test]
fn auth_exempt_clients_skip_login_and_others_do_not() {
    let proxy = auth_proxy(|c| c.rules.auth_exempt = vec!["127.0.0.1/32".parse().unwrap()]);
    let echo = echo_server("127.0.0.1:0");
    // From 127.0.0.1: NO AUTHENTICATION is accepted.
    let mut s = connect_from("127.0.0.1", proxy.addr);
    s.write_all(&[5, 1, 0]).unwrap();
    expect(&mut s, &[5, 0]);
    s.write_all(&connect_request(echo)).unwrap();
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
    echo_ok(&mut s);
    // From 127.0.0.2: a password is required.
    let mut s = connect_from("127.0.0.2", proxy.addr);
    s.write_all(&[5, 1, 0]).unwrap();
    expect(&mut s, &[5, 0xff]);
    assert!(closed(&mut s));
}

#[test]
fn client_allow_list_closes_others_before_any_byte() {
    let proxy = Proxy::with(|c| c.rules.allow_client = vec!["127.0.0.1/32".parse().unwrap()]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = connect_from("127.0.0.2", proxy.addr);
    // The server closed right after accept: a greeting gets no answer.
    let _ = s.write_all(&[5, 1, 0]);
    assert!(closed(&mut s));
    let mut s = connect_from("127.0.0.1", proxy.addr);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    s.write_all(&connect_request(echo)).unwrap();
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
    proxy.wait_sessions(1);
}

fn rules_proxy(rules: Rules) -> Proxy {
    Proxy::with(|c| c.rules = rules)
}

#[test]
fn deny_dest_by_address_port_range_and_name() {
    let echo = echo_server("127.0.0.1:0");
    let other = echo_server("127.0.0.1:0");
    let port = echo.port();
    let deny = |rule: String| rules_proxy(Rules { deny_dest: vec![rule.parse().unwrap()], ..Rules::default() });

    let by_addr = deny("127.0.0.1".into());
    assert_eq!(request(by_addr.addr, &connect_request(echo)).1, 2);

    let by_port = deny(format!("127.0.0.0/8:{}-{}", port, port));
    let (mut s, rep, _) = request(by_port.addr, &connect_request(echo));
    assert_eq!(rep, 2);
    assert!(closed(&mut s));
    assert_eq!(request(by_port.addr, &connect_request(other)).1, 0, "other ports are allowed");

    // The name resolves to a denied address: denied, never connected to.
    assert_eq!(request(by_addr.addr, &connect_domain("localhost", port)).1, 2);
    // An IP literal sent as a name is checked the same way.
    assert_eq!(request(by_addr.addr, &connect_domain("127.0.0.1", port)).1, 2);
}

#[test]
fn allow_dest_denies_what_it_does_not_list() {
    let echo = echo_server("127.0.0.1:0");
    let other = echo_server("127.0.0.1:0");
    let rule = format!("127.0.0.1:{}", echo.port());
    let proxy = rules_proxy(Rules { allow_dest: vec![rule.parse().unwrap()], ..Rules::default() });
    assert_eq!(request(proxy.addr, &connect_request(echo)).1, 0);
    assert_eq!(request(proxy.addr, &connect_request(other)).1, 2);
}

#[test]
fn deny_private_dest_covers_loopback_by_address_and_name() {
    let echo = echo_server("127.0.0.1:0");
    let echo6 = echo_server("[::1]:0");
    let proxy = rules_proxy(Rules { deny_private_dest: true, ..Rules::default() });
    for req in [
        connect_request(echo),
        connect_request(echo6),
        connect_domain("localhost", echo.port()),
        connect_domain("::ffff:127.0.0.1", echo.port()),
        connect_request("[::ffff:127.0.0.1]:80".parse().unwrap()),
        connect_request("0.0.0.0:80".parse().unwrap()),
    ] {
        let (mut s, rep, _) = request(proxy.addr, &req);
        assert_eq!(rep, 2, "{req:?}");
        assert!(closed(&mut s));
    }
}

#[test]
fn per_client_limit() {
    let proxy = Proxy::with(|c| c.max_connections_per_client = Some(2));
    let echo = echo_server("127.0.0.1:0");
    let open_from = |src: &str| {
        let mut s = connect_from(src, proxy.addr);
        s.write_all(&[5, 1, 0]).unwrap();
        s
    };
    let mut a = open_from("127.0.0.2");
    let mut b = open_from("127.0.0.2");
    let mut m = [0u8; 2];
    a.read_exact(&mut m).unwrap();
    b.read_exact(&mut m).unwrap();
    let mut c = open_from("127.0.0.2");
    assert!(closed(&mut c), "a third session from 127.0.0.2 is refused");
    let mut d = open_from("127.0.0.3");
    d.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0], "another address is not affected");
    drop(a);
    eventually("a slot for 127.0.0.2 frees", || {
        let mut e = open_from("127.0.0.2");
        e.read(&mut m).is_ok_and(|n| n == 2)
    });
    let _ = (b, echo);
}

#[test]
fn per_user_limit() {
    let proxy = auth_proxy(|c| c.max_connections_per_user = Some(1));
    let echo = echo_server("127.0.0.1:0");
    let (mut first, rep) = login_and_connect(proxy.addr, "alice", "wonderland", echo);
    assert_eq!(rep, 0);
    let mut second = connect(proxy.addr);
    assert_ne!(login(&mut second, "alice", "wonderland"), 0, "alice is at her limit");
    assert!(closed(&mut second));
    let (_bob, rep) = login_and_connect(proxy.addr, "bob", "builder", echo);
    assert_eq!(rep, 0, "bob is not");
    echo_ok(&mut first);
    first.shutdown(Shutdown::Both).unwrap();
    drop(first);
    eventually("alice's slot frees", || {
        let mut s = connect(proxy.addr);
        login(&mut s, "alice", "wonderland") == 0
    });
}

/// Regression (mutation: exempt clients given NO AUTHENTICATION even when
/// they offer a password): an exempt client offering both methods logs in,
/// so its user's session limit holds.
#[test]
fn an_exempt_client_offering_both_methods_logs_in_and_meets_the_user_limit() {
    let proxy = auth_proxy(|c| {
        c.rules.auth_exempt = vec!["127.0.0.1/32".parse().unwrap()];
        c.max_connections_per_user = Some(1);
    });
    let echo = echo_server("127.0.0.1:0");
    let both = |s: &mut TcpStream| -> u8 {
        s.write_all(&[5, 2, 0, 2]).unwrap();
        expect(s, &[5, 2]);
        s.write_all(&auth_message("alice", "wonderland")).unwrap();
        let mut r = [0u8; 2];
        s.read_exact(&mut r).unwrap();
        r[1]
    };
    let mut first = connect_from("127.0.0.1", proxy.addr);
    assert_eq!(both(&mut first), 0);
    first.write_all(&connect_request(echo)).unwrap();
    assert_eq!(read_reply(&mut first).unwrap().0, 0);
    let mut second = connect_from("127.0.0.1", proxy.addr);
    assert_ne!(both(&mut second), 0, "alice is at her limit, exempt or not");
    assert!(closed(&mut second));
    echo_ok(&mut first);
}

/// An allow rule and a deny rule that both match an address: deny wins.
#[test]
fn deny_wins_over_an_allow_rule_for_the_same_address() {
    let echo = echo_server("127.0.0.1:0");
    let other = echo_server("127.0.0.1:0");
    let proxy = rules_proxy(Rules {
        allow_dest: vec!["127.0.0.0/8".parse().unwrap()],
        deny_dest: vec![format!("127.0.0.1:{}", echo.port()).parse().unwrap()],
        ..Rules::default()
    });
    let (mut s, rep, _) = request(proxy.addr, &connect_request(echo));
    assert_eq!(rep, 2, "allowed by 127/8, denied by its port: denied");
    assert!(closed(&mut s));
    assert_eq!(request(proxy.addr, &connect_request(other)).1, 0, "allowed, not denied");
}
