//! The binary: argument errors, bind errors, signals, descriptor hygiene.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_values_give_one_line_and_a_nonzero_exit() {
    let cases: [&[&str]; 12] = [
        &["--listen", "nonsense"],
        // Regression: these overflowed a deadline (a panic) or wrapped to "off".
        &["--shutdown-grace", "9999999999h"],
        &["--idle-timeout", "5124095576030432h"],
        &["--connect-timeout", "8761h"],
        &["--handshake-timeout", "99999999999999999999"],
        &["--handshake-timeout", "ten"],
        &["--buffer-size", "12"],
        &["--buffer-size", "lots"],
        &["--max-connections", "0"],
        &["--busy-poll", "2s"],
        &["--log-level", "loud"],
        &["--no-such-flag"],
    ];
    for args in cases {
        let (code, stderr) = run_to_end(args);
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("slabsocks: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("slabsocks-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("users");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_users_file_and_rule_values_are_one_line_errors() {
    let path = temp_file("bad", "alice:ok\n\nthis line has no colon\n");
    let (code, stderr) = run_to_end(&["--users", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("users:3:"), "names the file and line: {stderr}");
    let cases: [&[&str]; 5] = [
        &["--users", "/nonexistent/users"],
        &["--auth-exempt", "127.0.0.1"],
        &["--allow-dest", "10.0.0.0/8:99999"],
        &["--deny-dest", "nonsense"],
        &["--allow-client", "10.0.0.0/40"],
    ];
    for args in cases {
        let (code, stderr) = run_to_end(args);
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn sighup_reloads_users_and_keeps_sessions() {
    let path = temp_file("hup", "alice:one\n");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Two workers: each swaps its table at its next wake.
    let (mut child, addr, log) = spawn_logged(&["--users", path.to_str().unwrap(), "--workers", "2"]);
    let echo = echo_server("127.0.0.1:0");
    let (mut open, rep) = login_and_connect(addr, "alice", "one", echo);
    assert_eq!(rep, 0);

    std::fs::write(&path, "bob:two\n").unwrap();
    signal(&child, libc::SIGHUP);
    log.wait_for_nth("users replaced", 2);
    for _ in 0..20 {
        assert_eq!(login(&mut connect(addr), "bob", "two"), 0, "bob can log in on every worker");
    }
    assert_ne!(login(&mut connect(addr), "alice", "one"), 0, "alice was removed");
    // The session alice opened before the reload goes on.
    open.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    std::io::Read::read_exact(&mut open, &mut back).unwrap();
    assert_eq!(&back, b"still here");

    // A file that fails to load keeps the users in force.
    std::fs::write(&path, "broken line\n").unwrap();
    signal(&child, libc::SIGHUP);
    let line = log.wait_for("keeping the old users");
    assert!(line.contains("users:1:"), "says why: {line}");
    assert_eq!(login(&mut connect(addr), "bob", "two"), 0);

    signal(&child, libc::SIGTERM);
    drop(open);
    assert_eq!(wait_exit(&mut child), 0);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Operators hear about loose file modes and failed logins (who, from
/// where), and never see a password, even at trace level.
#[test]
fn auth_logging_warns_and_never_leaks_passwords() {
    let path = temp_file("log", "alice:Sup3rSecret\n");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (mut child, addr, log) = spawn_logged(&["--users", path.to_str().unwrap(), "--log-level", "trace"]);
    let echo = echo_server("127.0.0.1:0");
    let (s, rep) = login_and_connect(addr, "alice", "Sup3rSecret", echo);
    assert_eq!(rep, 0);
    drop(s);
    assert_ne!(login(&mut connect(addr), "alice", "WrongGuess1"), 0);
    let line = log.wait_for("login failed");
    assert!(line.contains("alice") && line.contains("127.0.0.1"), "{line}");
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
    let text = log.all();
    assert!(!text.contains("Sup3rSecret") && !text.contains("WrongGuess1"), "{text}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn a_users_file_others_can_read_is_warned_about() {
    let path = temp_file("mode", "alice:x\n");
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        let (mut child, _addr, log) = spawn_logged(&["--users", path.to_str().unwrap()]);
        signal(&child, libc::SIGTERM);
        assert_eq!(wait_exit(&mut child), 0);
        assert_eq!(log.all().contains("readable by group or others"), warned, "mode {mode:o}");
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Out of descriptors, `accept` fails with EMFILE while the kernel still
/// has connections queued. The loop must back off, not spin on the
/// listener, and serve again once descriptors free up.
#[test]
fn emfile_backs_off_without_spinning_and_recovers() {
    let (mut child, addr) =
        spawn_with_nofile(40, &["--max-connections", "1000", "--resolver-threads", "0"], Stdio::piped());
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let log = Log(rx, Default::default());
    log.wait_for("listening on");
    // More clients than descriptors: each waits in its handshake.
    let clients: Vec<TcpStream> = (0..60).map(|_| connect(addr)).collect();
    log.wait_for("pausing");
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(child.id()) - before;
    assert!(used < 30, "{used} ticks of CPU in one second: the loop spins");
    drop(clients);
    let echo = echo_server("127.0.0.1:0");
    eventually("service resumes", || {
        let mut s = connect(addr);
        s.write_all(&[5, 1, 0]).is_ok() && std::io::Read::read_exact(&mut s, &mut [0u8; 2]).is_ok()
    });
    let mut s = open(addr, echo);
    s.write_all(b"back").unwrap();
    signal(&child, libc::SIGTERM);
    drop(s);
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn an_address_in_use_is_named() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_end(&["--listen", &addr]);
    assert_ne!(code, 0);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("slabsocks "));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--handshake-timeout",
        "--connect-timeout",
        "--idle-timeout",
        "--max-connections",
        "--buffer-size",
        "--resolver-threads",
        "--log-level",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn sigterm_and_sigint_exit_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mut child, addr) = spawn(&["--shutdown-grace", "5s"]);
        let echo = echo_server("127.0.0.1:0");
        let mut s = open(addr, echo);
        signal(&child, sig);
        // The open session still works during the grace period...
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        // ...and the server exits, cleanly, once it closes.
        drop(s);
        assert_eq!(wait_exit(&mut child), 0);
    }
}

/// Open descriptors, pooled pipes left out (see `descriptors`).
fn fd_count(pid: u32) -> usize {
    descriptors(pid).0
}

#[test]
fn no_descriptor_leaks_after_bad_and_failed_sessions() {
    let (mut child, addr) = spawn(&["--handshake-timeout", "300ms"]);
    let echo = echo_server("127.0.0.1:0");
    drop(open(addr, echo)); // warm: resolver threads, pools
    std::thread::sleep(Duration::from_millis(100));
    let before = fd_count(child.id());
    let refused = connect_request(closed_port());
    for i in 0..100 {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = match i % 4 {
            0 => s.write_all(b"\x05"),
            1 => s.write_all(b"garbage"),
            2 => s.write_all(&[&[5u8, 1, 0][..], &refused].concat()),
            _ => s.write_all(&[&[5u8, 1, 0][..], &connect_request(echo), b"data"].concat()),
        };
    }
    let end = Instant::now() + IO_TIMEOUT;
    while fd_count(child.id()) != before {
        assert!(Instant::now() < end, "fds: {} before, {} after", before, fd_count(child.id()));
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
}

/// Regression: the signal handlers were installed after the listeners were
/// bound, so a SIGHUP during start-up killed the process (default action).
/// The users file here is a FIFO, so start-up waits in it for as long as
/// the test likes: a SIGHUP then must be held and handled once running.
#[test]
fn a_sighup_during_start_up_is_held_not_fatal() {
    let (dir, fifo) = fifo("fifo");
    let (mut child, listen, log) = start_logged(&["--users", fifo.to_str().unwrap()]);
    // Opening for writing returns once the server has opened the FIFO to
    // read its users: it is in start-up, past where handlers go in.
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(100));
    w.write_all(b"alice:one\n").unwrap();
    drop(w);
    log.wait_for("listening on");
    // The held SIGHUP reloads the file: the FIFO again.
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    w.write_all(b"alice:two\n").unwrap();
    drop(w);
    log.wait_for("users replaced");
    let echo = echo_server("127.0.0.1:0");
    let addr = listen.parse().unwrap();
    assert_eq!(login_and_connect(addr, "alice", "two", echo).1, 0);
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A FIFO in a fresh temporary folder: a users file whose reader waits
/// until the test writes.
fn fifo(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("slabsocks-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("users");
    let _ = std::fs::remove_file(&fifo);
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    (dir, fifo)
}

/// A stop request during start-up (here: the users file is a FIFO nobody
/// writes) ends the process at once instead of waiting for the server.
#[test]
fn a_sigterm_during_start_up_exits() {
    let (dir, fifo) = fifo("fifo-term");
    let (mut child, _listen, log) = start_logged(&["--users", fifo.to_str().unwrap()]);
    // The server has the FIFO open once this open returns: it is in start-up.
    let w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
    drop(w);
    assert!(log.all().contains("during start-up: exiting"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression: every failed login was logged, so a password-guessing flood
/// flooded the log. One line per 5 s; the next one says how many were held.
#[test]
fn failed_logins_are_rate_limited_in_the_log() {
    let path = temp_file("flood", "alice:right\n");
    let (mut child, addr, log) = spawn_logged(&["--users", path.to_str().unwrap()]);
    for _ in 0..20 {
        assert_eq!(login(&mut connect(addr), "alice", "wrong"), 1);
    }
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
    let text = log.all();
    let lines = text.lines().filter(|l| l.contains("login failed")).count();
    assert!((1..=2).contains(&lines), "{lines} lines for 20 failed logins:\n{text}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Regression: every session was id 0, and the log named sessions by slab
/// key, so two sessions in a row looked like one. Lines carry the session
/// id, and ids differ from one session to the next.
#[test]
fn log_lines_name_sessions_by_distinct_ids() {
    let (mut child, addr, log) = spawn_logged(&["--log-level", "debug"]);
    let echo = echo_server("127.0.0.1:0");
    for i in 0..3 {
        let mut s = open(addr, echo);
        s.write_all(b"x").unwrap();
        expect(&mut s, b"x");
        drop(s);
        // This session's close comes before the next is admitted, so the
        // next one takes the same slab slot.
        log.wait_for_nth("closed: ", i + 1);
    }
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
    let text = log.all();
    let ids: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" accepted from "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('#')))
        .collect();
    assert_eq!(ids.len(), 3, "{text}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "{ids:?}");
    for id in &ids {
        assert!(text.lines().any(|l| l.contains(&format!("{id} closed: "))), "{id} never closed:\n{text}");
    }
}

fn dns_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("slabsocks-dns"))
        .count()
}

/// An idle server holds no resolver thread (issue 11: the appliance's idle
/// memory); the first request by name starts one, which serves it; CONNECTs
/// by address never need one.
#[test]
fn resolver_threads_start_on_the_first_name() {
    let (child, addr) = spawn(&["--resolver-threads", "4"]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(addr, echo);
    s.write_all(b"ping").unwrap();
    expect(&mut s, b"ping");
    assert_eq!(dns_threads(child.id()), 0, "a resolver thread before any name");
    let (mut s, rep, _) = request(addr, &connect_domain("localhost", echo.port()));
    assert_eq!(rep, 0);
    s.write_all(b"pong").unwrap();
    expect(&mut s, b"pong");
    assert_eq!(dns_threads(child.id()), 1);
}

/// Every connected TCP socket of the server (the client's, inherited from
/// the listener on Linux, and the upstream's) has TCP_NODELAY: checked on
/// duplicates of its descriptors taken with pidfd_getfd (Linux 5.6; as
/// root or a ptrace-capable user, else skipped with a note).
#[test]
fn sessions_have_nodelay_both_ways() {
    let (child, addr) = spawn(&["--workers", "1"]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(addr, echo);
    s.write_all(b"x").unwrap();
    expect(&mut s, b"x");
    let Some(sockets) = sockets_of(child.id()) else { return };
    let mut connected = 0;
    for sock in sockets {
        let tcp = sock.r#type().ok() == Some(socket2::Type::STREAM);
        if tcp && sock.peer_addr().is_ok_and(|a| a.as_socket().is_some()) {
            connected += 1;
            assert!(sock.tcp_nodelay().unwrap(), "a connected socket without TCP_NODELAY");
        }
    }
    assert_eq!(connected, 2, "the client's socket and the upstream's");
}

/// `--busy-poll`: after handling an event the loop keeps polling without
/// sleeping (it uses CPU) for its window, and then sleeps again (it stops).
#[test]
fn busy_polling_spins_for_its_window_then_sleeps() {
    let (mut child, addr) = spawn(&["--busy-poll", "1s"]);
    let pid = child.id();
    let ticks_over = |ms: u64| {
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_millis(ms));
        cpu_ticks(pid) - before
    };
    let before_any = ticks_over(300);
    assert!(before_any < 10, "{before_any} ticks with no event yet: it spins from the start");
    let mut s = connect(addr);
    s.write_all(&[5, 1, 0]).unwrap();
    std::io::Read::read_exact(&mut s, &mut [0u8; 2]).unwrap();
    let t0 = Instant::now();
    // At most 100 ticks a second; a loaded test machine may give the loop
    // a share of a CPU only, hence the low bar.
    let spinning = ticks_over(500);
    assert!(spinning >= 10, "{spinning} ticks in the first half second of the window: it sleeps");
    // The window counts from the end of the turn that sent the reply,
    // which ends a moment after the reply reached us: by t0 + 1 s and a
    // little, well before t0 + 1.1 s.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(t0.elapsed()));
    let after = ticks_over(500);
    assert!(after < 10, "{after} ticks after the window: it never stops spinning");
    signal(&child, libc::SIGTERM);
    drop(s);
    assert_eq!(wait_exit(&mut child), 0);
}

/// Deadlines hold while the loop spins: a client that connects and says
/// nothing is closed at its 300 ms handshake timeout, not when the 1 s of
/// spinning its connection started has passed.
#[test]
fn busy_polling_keeps_deadlines() {
    let (mut child, addr) = spawn(&["--busy-poll", "1s", "--handshake-timeout", "300ms"]);
    let t0 = Instant::now();
    let mut silent = connect(addr);
    assert!(closed(&mut silent), "the silent client was not closed");
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(800), "closed after {took:?}: the deadline waited for the spinning");
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
}
