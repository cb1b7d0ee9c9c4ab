//! The binary: argument errors, bind errors, signals, descriptor hygiene.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_slabsocks");

fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_values_give_one_line_and_a_nonzero_exit() {
    let cases: [&[&str]; 7] = [
        &["--listen", "nonsense"],
        &["--handshake-timeout", "ten"],
        &["--buffer-size", "12"],
        &["--buffer-size", "lots"],
        &["--max-connections", "0"],
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

/// Starts the binary on a free port and waits for its start-up line.
fn spawn(extra: &[&str]) -> (Child, std::net::SocketAddr) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["--listen", &listen])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening on") && line.contains(&listen), "{line}");
    (child, listen.parse().unwrap())
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_exit(child: &mut Child) -> i32 {
    let end = Instant::now() + IO_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("server did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
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

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
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
