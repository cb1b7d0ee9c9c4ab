//! Test fixtures: the server in-process on 127.0.0.1:0, loopback peers
//! (echo, scripted upstreams, a tiny HTTP server) and a raw SOCKS5 client.
#![allow(dead_code)]

use slabsocks::proto::{ReplyFrame, Status, parse_reply};
use slabsocks::{Config, Handle, Server};
use std::io::{self, Read, Write};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest any single read in a test may block: a hang fails the test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for a datagram: shorter than IO_TIMEOUT, so a bug
/// that loses them all fails each test in 2 s instead of hanging the suite
/// (and a mutation run's time limit).
pub const DATAGRAM_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Proxy {
    pub addr: SocketAddr,
    pub handle: Handle,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Proxy {
    pub fn start() -> Proxy {
        Proxy::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut Config)) -> Proxy {
        let mut config = Config {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            shutdown_grace: Duration::from_millis(200),
            ..Config::default()
        };
        f(&mut config);
        let server = Server::bind(config).expect("bind");
        let addr = server.local_addrs()[0];
        let handle = server.handle();
        let thread = Some(std::thread::spawn(move || server.run()));
        Proxy { addr, handle, thread }
    }

    /// Waits (bounded) until the server holds `n` sessions.
    pub fn wait_sessions(&self, n: usize) {
        let end = Instant::now() + IO_TIMEOUT;
        while self.handle.sessions() != n {
            assert!(Instant::now() < end, "server holds {} sessions, expected {n}", self.handle.sessions());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.handle.shutdown();
        // A failing test does not wait for the loop: a loop that spins
        // (the bug the test found) would hang it instead of failing it.
        if std::thread::panicking() {
            return;
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread panicked").expect("server run failed");
        }
    }
}

/// Serves each connection on its own thread with `f`.
pub fn serve(addr: &str, f: impl Fn(TcpStream) + Send + Clone + 'static) -> SocketAddr {
    let l = TcpListener::bind(addr).expect("bind upstream");
    let local = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let f = f.clone();
            std::thread::spawn(move || f(s));
        }
    });
    local
}

/// Echoes until EOF, then half-closes.
pub fn echo_server(addr: &str) -> SocketAddr {
    serve(addr, |mut s| {
        let mut buf = [0u8; 16384];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// A port with nothing listening (bound, then closed).
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Answers every request on a connection with `body`, HTTP/1.1, then closes.
pub fn http_server(body: &'static str) -> SocketAddr {
    serve("127.0.0.1:0", move |mut s| {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let _ = s.write_all(resp.as_bytes());
    })
}

pub fn connect(proxy: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(proxy).expect("connect to proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// The request bytes for CONNECT to an IP address.
pub fn connect_request(target: SocketAddr) -> Vec<u8> {
    let mut r = vec![5, 1, 0];
    match target {
        SocketAddr::V4(a) => {
            r.push(1);
            r.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            r.push(4);
            r.extend_from_slice(&a.ip().octets());
        }
    }
    r.extend_from_slice(&target.port().to_be_bytes());
    r
}

/// The request bytes for BIND expecting a peer from `peer`.
pub fn bind_request(peer: SocketAddr) -> Vec<u8> {
    let mut r = connect_request(peer);
    r[1] = 2;
    r
}

/// BND.ADDR and BND.PORT of a reply frame with an IP address.
pub fn bnd(frame: &[u8]) -> SocketAddr {
    match parse_reply(frame) {
        Ok(Status::Complete(ReplyFrame { addr, port, .. }, _)) => {
            SocketAddr::new(addr.ip().expect("BND is an IP address"), port)
        }
        other => panic!("not a reply: {other:?}"),
    }
}

/// The request bytes for CONNECT to a domain name.
pub fn connect_domain(name: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, 1, 0, 3, name.len() as u8];
    r.extend_from_slice(name.as_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r
}

/// Reads one whole reply frame; returns REP and the frame's bytes.
pub fn read_reply(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match parse_reply(&buf) {
            Ok(Status::Complete(ReplyFrame { rep, .. }, n)) => {
                assert_eq!(n, buf.len());
                return Ok((rep, buf));
            }
            Ok(Status::Partial) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {buf:?}"))),
        }
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF after {buf:?}")));
        }
        buf.push(byte[0]);
    }
}

/// Greeting (no auth), then `request`; returns the reply's REP and frame.
pub fn request(proxy: SocketAddr, request: &[u8]) -> (TcpStream, u8, Vec<u8>) {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    s.write_all(request).unwrap();
    let (rep, frame) = read_reply(&mut s).expect("reply");
    (s, rep, frame)
}

/// A CONNECT that must succeed.
pub fn open(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let (s, rep, _) = request(proxy, &connect_request(target));
    assert_eq!(rep, 0, "CONNECT {target} failed");
    s
}

/// Reads until EOF; fails on a timeout or reset.
pub fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read to EOF");
    v
}

/// True when the peer closed (EOF or reset) rather than sending more.
pub fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(n) => panic!("expected close, got {:?}", &b[..n]),
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    }
}

/// A deterministic byte stream and an order-sensitive checksum over it.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// FNV-1a over 8-byte words (tail bytewise): order-sensitive and fast
/// enough in debug builds.
#[derive(Clone, Copy)]
pub struct Sum(u64, u64);

impl Sum {
    pub fn new() -> Sum {
        Sum(0xcbf29ce484222325, 0)
    }
    pub fn add(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        self.1 += data.len() as u64;
    }
}

impl PartialEq for Sum {
    fn eq(&self, o: &Sum) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}

impl std::fmt::Debug for Sum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}/{} bytes", self.0, self.1)
    }
}

/// Sends `total` pattern bytes, then half-closes; returns their checksum.
pub fn send_pattern(s: &mut TcpStream, seed: u64, total: usize) -> Sum {
    let mut p = Pattern::new(seed);
    let mut sum = Sum::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).expect("send pattern");
        sum.add(&buf[..n]);
        left -= n;
    }
    s.shutdown(Shutdown::Write).unwrap();
    sum
}

/// Reads to EOF; returns the checksum.
pub fn sum_to_end(s: &mut TcpStream) -> Sum {
    let mut sum = Sum::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return sum,
            Ok(n) => sum.add(&buf[..n]),
            Err(e) => panic!("read failed after {sum:?}: {e}"),
        }
    }
}

/// A client socket bound to source address `src` (any of 127/8 works on
/// loopback), connected to `proxy`.
pub fn connect_from(src: &str, proxy: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(src.parse().unwrap(), 0).into()).unwrap();
    sock.connect(&proxy.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// The RFC 1929 message for `user`/`password`.
pub fn auth_message(user: &str, password: &str) -> Vec<u8> {
    let mut m = vec![1, user.len() as u8];
    m.extend_from_slice(user.as_bytes());
    m.push(password.len() as u8);
    m.extend_from_slice(password.as_bytes());
    m
}

/// Greeting offering user/password, then the login; returns the STATUS
/// byte (the method reply must be 0x02).
pub fn login(s: &mut TcpStream, user: &str, password: &str) -> u8 {
    s.write_all(&[5, 1, 2]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 2], "server must choose user/password");
    s.write_all(&auth_message(user, password)).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r[0], 1, "RFC 1929 reply version");
    r[1]
}

/// Logs in and CONNECTs; returns the stream and the REP byte.
pub fn login_and_connect(proxy: SocketAddr, user: &str, password: &str, target: SocketAddr) -> (TcpStream, u8) {
    let mut s = connect(proxy);
    assert_eq!(login(&mut s, user, password), 0, "login as {user}");
    s.write_all(&connect_request(target)).unwrap();
    let rep = read_reply(&mut s).expect("reply").0;
    (s, rep)
}

/// Retries `f` (bounded by IO_TIMEOUT) until it returns true.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + IO_TIMEOUT;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads exactly `want.len()` bytes and checks they are `want`.
pub fn expect(s: &mut TcpStream, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).unwrap_or_else(|e| panic!("reading {want:?}: {e}"));
    assert_eq!(got, want);
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_slabsocks");

/// The binary's stderr, line by line, and every line read so far.
pub struct Log(pub std::sync::mpsc::Receiver<String>, pub std::cell::RefCell<Vec<String>>);

impl Log {
    /// The lines of a child's stderr, read on a thread of their own (which
    /// keeps draining, so the child never blocks on a full pipe).
    pub fn from_stderr(stderr: std::process::ChildStderr) -> Log {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    continue;
                }
            }
        });
        Log(rx, Default::default())
    }

    /// Finds (waiting, bounded) a line containing `text`, earlier lines
    /// included; returns it.
    pub fn wait_for(&self, text: &str) -> String {
        self.try_wait_for(text).unwrap_or_else(|lines| panic!("no log line with {text:?} in {lines:?}"))
    }

    /// As [`Log::wait_for`], but gives the lines so far instead of panicking
    /// (on the time limit, or when the child's stderr closes).
    pub fn try_wait_for(&self, text: &str) -> Result<String, Vec<String>> {
        if let Some(line) = self.1.borrow().iter().find(|l| l.contains(text)) {
            return Ok(line.clone());
        }
        let end = Instant::now() + IO_TIMEOUT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => {
                    self.1.borrow_mut().push(line.clone());
                    if line.contains(text) {
                        return Ok(line);
                    }
                }
                Err(_) => return Err(self.1.borrow().clone()),
            }
        }
    }

    /// Waits (bounded) until `n` lines contain `text`.
    pub fn wait_for_nth(&self, text: &str, n: usize) {
        let end = Instant::now() + IO_TIMEOUT;
        while self.1.borrow().iter().filter(|l| l.contains(text)).count() < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => self.1.borrow_mut().push(line),
                Err(_) => panic!("fewer than {n} log lines with {text:?} in {:?}", self.1.borrow()),
            }
        }
    }

    /// Everything logged, up to the child's exit.
    pub fn all(&self) -> String {
        while let Ok(line) = self.0.recv_timeout(Duration::from_millis(500)) {
            self.1.borrow_mut().push(line);
        }
        self.1.borrow().join("\n")
    }
}

/// A child process that is killed (by its PID) and reaped when dropped, so
/// a test that fails midway leaves no server behind. `wait_exit` reaps it
/// first when the test ends normally.
pub struct Spawned(pub Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // A no-op for a child already reaped: no stray signal to a reused PID.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a free port with its stderr read into a [`Log`];
/// returns at once.
pub fn start_logged(extra: &[&str]) -> (Spawned, String, Log) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["--listen", &listen])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    (Spawned(child), listen, Log::from_stderr(stderr))
}

/// Starts the binary on a free port and waits for its start-up line.
pub fn spawn(extra: &[&str]) -> (Spawned, std::net::SocketAddr) {
    let (child, addr, _log) = spawn_logged(extra);
    (child, addr)
}

/// Starts the binary on a free port and waits for its start-up line. The
/// port is picked by binding and releasing it, so a test running beside
/// this one may take it first: a server that exits at start-up is started
/// again on another port (three tries).
pub fn spawn_logged(extra: &[&str]) -> (Spawned, std::net::SocketAddr, Log) {
    for _ in 0..3 {
        let (mut child, listen, log) = start_logged(extra);
        match log.try_wait_for("listening on") {
            Ok(line) => {
                assert!(line.contains(&listen), "{line}");
                return (child, listen.parse().unwrap(), log);
            }
            Err(lines) => {
                let status = child.try_wait().ok().flatten();
                eprintln!("start-up failed ({status:?}), trying another port: {lines:?}");
            }
        }
    }
    panic!("the server did not start in three tries");
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

pub fn wait_exit(child: &mut Child) -> i32 {
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

/// CPU time (user + system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The binary listening on a free port of 127.0.0.1, started with at most
/// `nofile` descriptors (RLIMIT_NOFILE, hard and soft); stdout discarded,
/// stderr as `stderr` says.
pub fn spawn_with_nofile(nofile: u64, extra: &[&str], stderr: Stdio) -> (Spawned, SocketAddr) {
    use std::os::unix::process::CommandExt;
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", &addr.to_string()]).args(extra);
    cmd.stdout(Stdio::null()).stderr(stderr);
    // SAFETY: only setrlimit, async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: nofile as libc::rlim_t, rlim_max: nofile as libc::rlim_t };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    (Spawned(cmd.spawn().unwrap()), addr)
}

/// A loopback address whose connects stay pending: a listener with backlog
/// 0 whose queue we fill ourselves, so the kernel drops further SYNs. Keep
/// the returned connections for as long as the target must stay full.
pub fn unresponsive_target() -> (SocketAddr, Vec<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // SAFETY: listen(2) on a valid, owned descriptor.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 0) };
    let fill = (0..8).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()).collect();
    std::mem::forget(l);
    (addr, fill)
}

/// The process's open descriptors other than pipes, and its pipe ends.
/// Pipes for splicing are pooled, like relay buffers, until a trim period
/// (30 s) passes them unused: a leak shows in the first count.
pub fn descriptors(pid: u32) -> (usize, usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return (0, 0) };
    let (mut other, mut pipes) = (0, 0);
    for entry in dir.flatten() {
        match std::fs::read_link(entry.path()) {
            Ok(target) if target.to_string_lossy().starts_with("pipe:") => pipes += 1,
            _ => other += 1,
        }
    }
    (other, pipes)
}

/// `Proxy-Authorization` for `user:password` (HTTP Basic, base64 written
/// out here so that the tests do not share the server's decoder).
pub fn basic(user: &str, password: &str) -> String {
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

/// A users file with `text`, mode 0600, in a directory of its own named
/// after `tag` and this process (remove it with `remove_users_file`).
pub fn users_file(tag: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("slabsocks-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("users");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

pub fn remove_users_file(path: &std::path::Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Duplicates of every socket the process `pid` holds, taken with
/// pidfd_getfd (Linux 5.6; as root or a ptrace-capable user); `None`,
/// with a note, where that is not allowed.
pub fn sockets_of(pid: u32) -> Option<Vec<socket2::Socket>> {
    // SAFETY: pidfd_open on a pid we name; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if pidfd < 0 {
        eprintln!("note: pidfd_open unavailable: {}", io::Error::last_os_error());
        return None;
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        // SAFETY: pidfd_getfd duplicates the child's descriptor into ours.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
        if dup < 0 {
            eprintln!("note: pidfd_getfd refused: {}", io::Error::last_os_error());
            // SAFETY: closing the pidfd we opened.
            unsafe { libc::close(pidfd) };
            return None;
        }
        // SAFETY: `dup` is a descriptor we now own.
        out.push(unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(dup) });
    }
    // SAFETY: closing the pidfd we opened.
    unsafe { libc::close(pidfd) };
    Some(out)
}

/// HTTP CONNECT: sends a head for `target` with `extra` header lines;
/// returns the stream and the response head (up to its blank line).
pub fn http_connect(proxy: SocketAddr, target: &str, extra: &str) -> (TcpStream, String) {
    let mut s = connect(proxy);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n").as_bytes()).unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// Reads an HTTP response head, up to its blank line (or the EOF).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).expect("response head") == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// The status code of a response head.
pub fn status(head: &str) -> u16 {
    head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// The metrics endpoint's address, from the start-up log.
pub fn metrics_addr(log: &Log) -> SocketAddr {
    let line = log.wait_for("metrics on http://");
    let at = line.split("http://").nth(1).unwrap();
    at.trim_end_matches("/metrics").parse().unwrap()
}

/// Sends `request` raw; returns the whole answer (the server closes).
pub fn ask(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The body of `GET /metrics`.
pub fn scrape(addr: SocketAddr) -> String {
    let answer = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("Content-Type: text/plain; version=0.0.4"), "{answer}");
    answer.split("\r\n\r\n").nth(1).unwrap().to_string()
}

/// The value of `series` (name and labels) in a scrape.
pub fn metric(text: &str, series: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
    let line = line.unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}
