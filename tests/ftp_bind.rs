//! BIND driven by a real SOCKS client: an active-mode FTP download through
//! the proxy. Dante's `socksify` (Debian `dante-client`) preloads its SOCKS
//! library into `tnftp` (Debian `tnftp`); when the client opens its data
//! port, the library sends BIND to the proxy, and `EPRT` names the proxy's
//! BND address. The server is pyftpdlib (PyPI) on 127.0.0.1:0, which
//! connects to that address. The file must arrive intact, and the proxy's
//! log must show the BIND on the very port the FTP server was told.
//!
//! Without those tools the test prints a note and passes, unless
//! `SLABSOCKS_REQUIRE_FTP_BIND` is set (as `.ci/run` sets it), when it
//! fails instead.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// Longest the FTP client may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The FTP server exits by itself after this many seconds, whatever
/// happens to the test.
const SERVER_LIFETIME_SECS: u32 = 60;

/// An anonymous, read-only FTP server on 127.0.0.1:0 serving argv[1]. Its
/// first stdout line is `port N`; then one line per data-port command.
const FTP_SERVER: &str = r#"
import os, sys, threading
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

watchdog = threading.Timer(float(sys.argv[2]), os._exit, [3])
watchdog.daemon = True
watchdog.start()

class Handler(FTPHandler):
    def pre_process_command(self, line, cmd, arg):
        if cmd in ("PORT", "EPRT", "PASV", "EPSV"):
            print("cmd", cmd, arg, flush=True)
        return super().pre_process_command(line, cmd, arg)

auth = DummyAuthorizer()
auth.add_anonymous(sys.argv[1])
Handler.authorizer = auth
server = FTPServer(("127.0.0.1", 0), Handler)
print("port", server.address[1], flush=True)
server.serve_forever()
"#;

/// A child process killed (by its PID) and reaped when dropped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of `r`, read on a thread.
fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Whatever `rx` has received, waiting at most `wait` for more.
fn drain(rx: &Receiver<String>, wait: Duration) -> Vec<String> {
    let mut v = Vec::new();
    while let Ok(line) = rx.recv_timeout(wait) {
        v.push(line);
    }
    v
}

fn runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What is missing of socksify, tnftp and pyftpdlib.
fn missing_tools() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !runs("sh", &["-c", "command -v socksify"]) {
        missing.push("socksify (apt-get install dante-client)");
    }
    if !runs("sh", &["-c", "command -v tnftp"]) {
        missing.push("tnftp (apt-get install tnftp)");
    }
    if !runs("python3", &["-c", "import pyftpdlib"]) {
        missing.push("pyftpdlib (python3 -m pip install pyftpdlib)");
    }
    missing
}

/// Dante's client configuration: every TCP destination, loopback included,
/// through the proxy with SOCKS v5, no authentication, CONNECT and BIND.
fn socks_conf(proxy: std::net::SocketAddr) -> String {
    format!(
        "route {{\n\
         \tfrom: 0.0.0.0/0 to: 0.0.0.0/0 via: {} port = {}\n\
         \tprotocol: tcp\n\
         \tproxyprotocol: socks_v5\n\
         \tmethod: none\n\
         \tcommand: bind connect\n\
         }}\n",
        proxy.ip(),
        proxy.port()
    )
}

/// The data port an FTP `PORT h1,h2,h3,h4,p1,p2` or `EPRT |1|addr|port|`
/// names.
fn data_port(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("cmd ")?;
    if let Some(arg) = rest.strip_prefix("PORT ") {
        let v: Vec<u16> = arg.trim().split(',').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        return (v.len() == 6).then(|| v[4] * 256 + v[5]);
    }
    let arg = rest.strip_prefix("EPRT ")?;
    arg.trim().split('|').nth(3)?.parse().ok()
}

/// The port in a `BIND listening on IP:PORT (advertised ...)` log line.
fn bind_port(line: &str) -> Option<u16> {
    let after = line.split("BIND listening on ").nth(1)?;
    let addr = after.split_whitespace().next()?;
    addr.rsplit(':').next()?.parse().ok()
}

fn fresh_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ftp_bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("root")).unwrap();
    dir
}

#[test]
fn active_ftp_through_socksify_uses_bind() {
    let missing = missing_tools();
    if !missing.is_empty() {
        let note = format!("ftp_bind: missing {}", missing.join(", "));
        if std::env::var_os("SLABSOCKS_REQUIRE_FTP_BIND").is_some() {
            panic!("{note}, and SLABSOCKS_REQUIRE_FTP_BIND is set");
        }
        eprintln!("{note}: skipping the active-FTP BIND test");
        return;
    }
    let started = Instant::now();
    let dir = fresh_dir();

    // A file with an odd length, so a truncated or padded copy shows.
    let mut data = vec![0u8; 3 * 1024 * 1024 + 12345];
    Pattern::new(0xf7b).fill(&mut data);
    std::fs::write(dir.join("root/data.bin"), &data).unwrap();

    let (mut proxy, addr, log) = spawn_logged(&["--log-level", "debug"]);

    let mut server = Reap(
        Command::new("python3")
            .args(["-u", "-c", FTP_SERVER, dir.join("root").to_str().unwrap(), &SERVER_LIFETIME_SECS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pyftpdlib"),
    );
    let server_out = lines(server.0.stdout.take().unwrap());
    let server_err = lines(server.0.stderr.take().unwrap());
    let ftp_port: u16 = match server_out.recv_timeout(IO_TIMEOUT) {
        Ok(line) => line.strip_prefix("port ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{line}")),
        Err(_) => panic!("FTP server did not start: {:?}", drain(&server_err, Duration::from_millis(200))),
    };

    let conf = dir.join("socks.conf");
    std::fs::write(&conf, socks_conf(addr)).unwrap();
    let dante_log = dir.join("dante.log");
    let mut client = Reap(
        Command::new("socksify")
            .args(["tnftp", "-n", "-v", "-A", "127.0.0.1", &ftp_port.to_string()])
            .current_dir(&dir)
            // Any of these would make the library ignore SOCKS_CONF.
            .env_remove("SOCKS_SERVER")
            .env_remove("SOCKS4_SERVER")
            .env_remove("SOCKS5_SERVER")
            .env_remove("HTTP_CONNECT_PROXY")
            .env_remove("UPNP_IGD")
            .env("SOCKS_CONF", &conf)
            // Loopback must go through the proxy, and a refused BIND must
            // not fall back to a direct listener.
            .env("SOCKS_AUTOADD_LANROUTES", "no")
            .env("SOCKS_DIRECTROUTE_FALLBACK", "no")
            .env("SOCKS_DEBUG", "1")
            .env("SOCKS_LOGOUTPUT", &dante_log)
            .env("HOME", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start socksify tnftp"),
    );
    let client_out = lines(client.0.stdout.take().unwrap());
    let client_err = lines(client.0.stderr.take().unwrap());
    {
        let mut stdin = client.0.stdin.take().unwrap();
        stdin.write_all(b"user anonymous slabsocks@\nbinary\nget data.bin out.bin\nquit\n").unwrap();
        // Dropped here: EOF ends the client even if a command hung up.
    }
    let end = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = client.0.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let transcript = || {
        format!(
            "tnftp stdout: {:#?}\ntnftp stderr: {:#?}\nFTP server: {:#?} {:#?}\nDante: {}",
            drain(&client_out, Duration::from_millis(200)),
            drain(&client_err, Duration::from_millis(200)),
            drain(&server_out, Duration::from_millis(200)),
            drain(&server_err, Duration::from_millis(200)),
            std::fs::read_to_string(&dante_log).unwrap_or_default(),
        )
    };
    let Some(status) = status else {
        panic!("tnftp still running after {CLIENT_TIMEOUT:?}\n{}", transcript());
    };

    // tnftp exits 0 even when a transfer failed: the file is what counts.
    let got = std::fs::read(dir.join("out.bin")).unwrap_or_default();
    if got != data {
        panic!(
            "the file did not arrive through BIND ({} of {} bytes, tnftp {status})\nproxy log: {}\n{}",
            got.len(),
            data.len(),
            log.all(),
            transcript()
        );
    }

    // The proxy listened for the peer, and that is the port the client
    // announced to the FTP server.
    let listening = log.wait_for("BIND listening on");
    let port = bind_port(&listening).unwrap_or_else(|| panic!("{listening}"));
    let announced: Vec<String> = drain(&server_out, Duration::from_millis(200));
    let named: Vec<u16> = announced.iter().filter_map(|l| data_port(l)).collect();
    assert_eq!(named, [port], "the client must announce the BIND port; server saw {announced:?}, proxy: {listening}");
    log.wait_for("BIND: peer 127.0.0.1:");

    signal(&proxy, libc::SIGTERM);
    assert_eq!(wait_exit(&mut proxy), 0);
    drop(client);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("ftp_bind: {} bytes by active FTP through BIND in {:?}", data.len(), started.elapsed());
}
