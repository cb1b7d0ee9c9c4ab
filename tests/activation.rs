//! Running under systemd: listeners handed over by socket activation
//! (`LISTEN_PID`/`LISTEN_FDS`, descriptors from 3), and every flag from an
//! environment variable.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// The binary as systemd starts it: `fd` as descriptor 3, `LISTEN_FDS=1`
/// and `LISTEN_PID` its own pid (a shell sets it to `$$`, then execs,
/// which keeps the pid). Returns the child and its stderr lines.
fn activated(fd: i32, extra: &[&str]) -> (Spawned, Log) {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"", BIN]);
    cmd.args(["--listen", "127.0.0.1:1"]).args(extra); // ignored when activated
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only dup2, async-signal-safe, between fork and exec; the new
    // descriptor 3 is not close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let log = Log::from_stderr(child.stderr.take().unwrap());
    (Spawned(child), log)
}

#[test]
fn serves_the_listener_systemd_hands_over() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (child, log) = activated(l.as_raw_fd(), &["--workers", "2"]);
    log.wait_for("socket activation: 1 listener");
    log.wait_for("listening on");
    drop(l);
    let echo = echo_server("127.0.0.1:0");
    for i in 0..20 {
        let mut s = open(addr, echo);
        let msg = format!("activated {i}");
        s.write_all(msg.as_bytes()).unwrap();
        expect(&mut s, msg.as_bytes());
    }
    drop(child);
}

/// A file, or a TCP socket that is connected rather than listening, as
/// descriptor 3: a one-line error and a failed exit.
#[test]
fn a_descriptor_that_is_not_a_listener_is_refused() {
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let connected = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    for fd in [file.as_raw_fd(), connected.as_raw_fd()] {
        let (mut child, log) = activated(fd, &[]);
        assert_ne!(wait_exit(&mut child), 0);
        let all = log.all();
        assert!(all.contains("not a listening TCP socket"), "{all}");
    }
}

#[test]
fn every_flag_can_come_from_the_environment() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(BIN)
        .env("SLABSOCKS_LISTEN", format!("127.0.0.1:{port}"))
        .env("SLABSOCKS_MAX_CONNECTIONS", "7")
        .env("SLABSOCKS_WORKERS", "1")
        .env("SLABSOCKS_ACCESS_LOG", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Spawned(child);
    let mut lines = BufReader::new(stderr).lines();
    let start = lines.next().unwrap().unwrap();
    assert!(start.contains(&format!("127.0.0.1:{port}")), "{start}");
    assert!(start.contains("1 worker,") && start.contains("max connections 7"), "{start}");
    let echo = echo_server("127.0.0.1:0");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    drop(open(addr, echo));
    let access = lines.map_while(Result::ok).find(|l| l.contains("access client="));
    assert!(access.is_some(), "SLABSOCKS_ACCESS_LOG=true did not turn the access log on");
    drop(child);
}
