//! `--workers N`: independent loops behind `SO_REUSEPORT` listeners. The
//! kernel spreads connections between them; the limits that must hold for
//! the whole server (per client, per user, the connection total) do; stop
//! and reload reach every worker; names resolve on every worker.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;

/// Which worker accepted each session, from the debug log's accept lines.
fn workers_seen(log: &Log, sessions: usize) -> [usize; 2] {
    log.wait_for_nth(" accepted from ", sessions);
    let mut seen = [0; 2];
    for line in log.all().lines().filter(|l| l.contains(" accepted from ")) {
        if line.contains("(worker 0,") {
            seen[0] += 1;
        } else if line.contains("(worker 1,") {
            seen[1] += 1;
        }
    }
    seen
}

/// Sessions land on both workers, every one relays, ids stay distinct, and
/// the start-up line says how the limit was split.
#[test]
fn two_workers_share_the_port_and_both_serve() {
    let (mut child, addr, log) = spawn_logged(&["--workers", "2", "--max-connections", "100", "--log-level", "debug"]);
    let start = log.wait_for("listening on");
    assert!(start.contains("2 workers") && start.contains("max connections 100"), "{start}");
    let echo = echo_server("127.0.0.1:0");
    let mut sessions: Vec<TcpStream> = (0..40).map(|_| open(addr, echo)).collect();
    for (i, s) in sessions.iter_mut().enumerate() {
        let msg = format!("session {i}");
        s.write_all(msg.as_bytes()).unwrap();
        expect(s, msg.as_bytes());
    }
    let seen = workers_seen(&log, 40);
    assert!(seen[0] > 0 && seen[1] > 0, "the kernel spread 40 connections as {seen:?}");
    let all = log.all();
    let mut ids: Vec<&str> = all
        .lines()
        .filter(|l| l.contains(" accepted from "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('#')))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 40, "ids are unique across workers");
    drop(sessions);
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0, "SIGTERM stops every worker");
}

/// `--max-connections-per-client 12` across two workers: twelve sessions
/// from one address, spread over both, and the thirteenth is refused
/// wherever it lands; closing one lets the next in.
#[test]
fn the_per_client_limit_holds_across_workers() {
    let (_child, addr, log) =
        spawn_logged(&["--workers", "2", "--max-connections-per-client", "12", "--log-level", "debug"]);
    let echo = echo_server("127.0.0.1:0");
    let mut held: Vec<TcpStream> = (0..12).map(|_| open(addr, echo)).collect();
    let seen = workers_seen(&log, 12);
    // Both workers hold some (all twelve on one: a chance of 1 in 2 048).
    assert!(seen[0] > 0 && seen[1] > 0, "twelve connections went {seen:?}");
    for _ in 0..10 {
        let mut s = connect(addr);
        // Admitted, it would answer the greeting.
        let _ = s.write_all(&[5, 1, 0]);
        assert!(closed(&mut s), "a thirteenth session from the same address was let in");
    }
    held.pop();
    eventually("a place frees up", || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_millis(500))).unwrap();
        s.write_all(&[5, 1, 0]).is_ok() && matches!(read_exact_n(&mut s, 2), Some(v) if v == [5, 0])
    });
}

fn read_exact_n(s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; n];
    std::io::Read::read_exact(s, &mut v).ok().map(|_| v)
}

/// `--max-connections-per-user 3` across two workers: three logins of one
/// user, and the fourth is refused; names resolve on every worker.
#[test]
fn the_per_user_limit_holds_across_workers() {
    let path = users_file("workers", "carol:pw\n");
    let (_child, addr, log) = spawn_logged(&[
        "--workers",
        "2",
        "--users",
        path.to_str().unwrap(),
        "--max-connections-per-user",
        "3",
        "--log-level",
        "debug",
    ]);
    let echo = echo_server("127.0.0.1:0");
    let held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let (s, rep) = login_and_connect(addr, "carol", "pw", echo);
            assert_eq!(rep, 0);
            s
        })
        .collect();
    for _ in 0..10 {
        assert_ne!(login(&mut connect(addr), "carol", "pw"), 0, "a fourth login of carol was let in");
    }
    drop(held);
    // Names: each worker has its own resolver; every answer reaches the
    // session that asked, on its own loop.
    eventually("carol's sessions are released", || login(&mut connect(addr), "carol", "pw") == 0);
    let _ = workers_seen(&log, 3);
    remove_users_file(&path);
}

/// Requests by name on both workers: each worker's resolver answers its
/// own sessions.
#[test]
fn names_resolve_on_every_worker() {
    let (_child, addr, log) = spawn_logged(&["--workers", "2", "--log-level", "debug"]);
    let echo = echo_server("127.0.0.1:0");
    for i in 0..20 {
        let (mut s, rep, _) = request(addr, &connect_domain("localhost", echo.port()));
        assert_eq!(rep, 0, "session {i}");
        s.write_all(b"by name").unwrap();
        expect(&mut s, b"by name");
    }
    let seen = workers_seen(&log, 20);
    assert!(seen[0] > 0 && seen[1] > 0, "20 connections went {seen:?}");
}
