//! slabsocks against the direct connection and the proxies users pick
//! instead, in one run, on loopback.
//!
//! `cargo bench` (release build). Each proxy runs as its own process pinned
//! to CPU 1; the load generator and the target servers run in this process,
//! pinned to CPU 0. Every measurement is repeated (rounds rotate the order
//! of the targets) and reported as median [min–max] with the ratio of the
//! medians to the direct connection. Peers missing from the machine
//! (`apt-get install microsocks dante-server`) are skipped with a note.
//!
//! Environment: SLABSOCKS_BENCH_ROUNDS (3), SLABSOCKS_BENCH_MB (256 MiB per
//! throughput run), SLABSOCKS_BENCH_IDLE (3000 idle sessions for memory),
//! SLABSOCKS_BENCH_ONLY (comma-separated target names), SLABSOCKS_BENCH_ARGS
//! (extra slabsocks flags, e.g. "--buffer-size 64k"), SLABSOCKS_BENCH_BASELINE
//! (the path of another slabsocks binary, say one built from main before a
//! change: measured as the target `baseline`, in the same run; or several,
//! as `label=path,label=path`), SLABSOCKS_BENCH_BURST (1000 clients
//! connecting at once), SLABSOCKS_BENCH_SCENARIOS (a comma-separated subset
//! of `relay,burst,memory,syscalls,instructions,udp`; default all), SLABSOCKS_BENCH_UDP_MS
//! (1000: each closed-loop UDP run; the open-loop run lasts half as long),
//! SLABSOCKS_BENCH_QUICK (1: one round of smaller runs, about a minute),
//! SLABSOCKS_BENCH_STREAMS (1: concurrent throughput streams),
//! SLABSOCKS_BENCH_PIN (1: proxies on CPU 1, load on CPU 0; 0: unpinned),
//! SLABSOCKS_BENCH_PROXY_CPU (1: the CPU proxies are pinned to),
//! SLABSOCKS_BENCH_JSON (target/bench-relay.json: the raw results),
//! SLABSOCKS_BENCH_HISTOGRAM (1: print each latency run's histogram),
//! SLABSOCKS_BENCH_RATE_MS (1500, quick 500: each session-rate run).
//!
//! `instructions`: the proxy under callgrind (valgrind), instructions per
//! MiB relayed and per session; user-space only, and the same however
//! busy the machine is. Dante (a process per client) is left out.
//!
//! `udp`: UDP ASSOCIATE to an echo server in this process, 64 and 1400-byte
//! payloads, datagrams echoed per second and datagrams lost: a closed loop
//! (at most 64 unanswered, so the relay's rate is measured, not a socket
//! buffer overflowing) and an open loop (sent as fast as one client can:
//! does the relay keep delivering when offered more than it carries?).
//! microsocks has no UDP ASSOCIATE and is left out.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Pins the calling thread (and threads it spawns later) to one CPU. Safe
/// between fork and exec: no allocation, no lock.
fn pin(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it (cpu
    // is below CPU_SETSIZE) and sched_setaffinity reads it through a valid
    // pointer of the right size.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------- targets

struct Target {
    name: &'static str,
    /// How it was named on the target list (`label=path` for baselines).
    spec: &'static str,
    /// None: the direct connection.
    proxy: Option<SocketAddr>,
    child: Option<Child>,
    _dir: Option<String>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            // SAFETY: kill(2) on the pid of a child we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pin proxies to CPU 1 and the load to CPU 0 (the default), or let the
/// scheduler place everything (SLABSOCKS_BENCH_PIN=0: for `--workers`).
fn pinning() -> bool {
    env_num("SLABSOCKS_BENCH_PIN", 1) != 0
}

/// The CPU proxies are pinned to: 1, or SLABSOCKS_BENCH_PROXY_CPU (0 puts
/// them on the load's CPU: no cross-CPU wake-ups, for the latency
/// experiments in the README).
fn proxy_cpu() -> usize {
    env_num("SLABSOCKS_BENCH_PROXY_CPU", 1)
}

fn spawn_pinned(cmd: &mut Command) -> std::io::Result<Child> {
    if pinning() {
        // Read before the fork: between fork and exec only async-signal-safe
        // calls are allowed (no environment lock, no allocation). A CPU the
        // process may not use fails the spawn (EINVAL from the child).
        let cpu = proxy_cpu();
        // SAFETY: the closure only calls sched_setaffinity, which is
        // async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || pin(cpu));
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn()
}

fn wait_listening(addr: SocketAddr) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The tokio peer's binary: SLABSOCKS_BENCH_FAST_SOCKS5, or the one built
/// in benches/peers/fast-socks5.
fn fast_socks5_bin() -> Option<String> {
    std::env::var("SLABSOCKS_BENCH_FAST_SOCKS5").ok().or_else(|| {
        let built = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/fast-socks5/target/release/fast-socks5-peer");
        std::path::Path::new(built).exists().then(|| built.to_string())
    })
}

fn spawn_slabsocks(bin: &str, addr: SocketAddr) -> Result<Child, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", &addr.to_string(), "--log-level", "warn"]).stderr(Stdio::inherit());
    let extra = std::env::var("SLABSOCKS_BENCH_ARGS").unwrap_or_default();
    cmd.args(extra.split_whitespace());
    spawn_pinned(&mut cmd).map_err(|e| format!("{bin}: {e}"))
}

fn start_target(name: &'static str) -> Result<Target, String> {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (child, dir) = match name {
        "direct" => return Ok(Target { name, spec: name, proxy: None, child: None, _dir: None }),
        "slabsocks" => {
            let bin = env!("CARGO_BIN_EXE_slabsocks");
            (spawn_slabsocks(bin, addr)?, None)
        }
        other if other.contains('=') || other == "baseline" => {
            let bin = other.split_once('=').map_or_else(
                || std::env::var("SLABSOCKS_BENCH_BASELINE").unwrap_or_default(),
                |(_, path)| path.to_string(),
            );
            (spawn_slabsocks(&bin, addr)?, None)
        }
        "fast-socks5" => {
            let bin = fast_socks5_bin().ok_or(
                "not built (cargo build --release --manifest-path benches/peers/fast-socks5/Cargo.toml, \
                 or set SLABSOCKS_BENCH_FAST_SOCKS5)",
            )?;
            let mut cmd = Command::new(bin);
            cmd.arg(addr.to_string()).stderr(Stdio::null());
            (spawn_pinned(&mut cmd).map_err(|e| format!("fast-socks5: {e}"))?, None)
        }
        "3proxy" | "3proxy-splice" => {
            let bin = std::env::var("SLABSOCKS_BENCH_3PROXY").unwrap_or_else(|_| "3proxy".into());
            let dir = std::env::temp_dir().join(format!("slabsocks-bench-3proxy-{port}"));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let conf = dir.join("3proxy.cfg");
            let splice = if name == "3proxy-splice" { " -s" } else { "" };
            std::fs::write(&conf, format!("auth none\nsocks{splice} -p{port} -i127.0.0.1 -e127.0.0.1\n"))
                .map_err(|e| e.to_string())?;
            let mut cmd = Command::new(&bin);
            cmd.arg(&conf).stderr(Stdio::null());
            (spawn_pinned(&mut cmd).map_err(|e| format!("{bin}: {e}"))?, Some(dir.to_string_lossy().into_owned()))
        }
        "microsocks" => {
            let mut cmd = Command::new("microsocks");
            cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]).stderr(Stdio::null());
            (spawn_pinned(&mut cmd).map_err(|e| format!("microsocks: {e}"))?, None)
        }
        "dante" => {
            let dir = std::env::temp_dir().join(format!("slabsocks-bench-dante-{port}"));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let conf = dir.join("danted.conf");
            // A socks rule without `command:` passes every command: CONNECT,
            // BIND and its bindreply, UDP ASSOCIATE and its udpreply (whose
            // `from:` is the remote: on 127.0.0.0/8 here, so one rule does).
            std::fs::write(
                &conf,
                format!(
                    "logoutput: /dev/null\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
                     socksmethod: none\nclientmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
                     client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\nsocks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let mut cmd = Command::new("danted");
            cmd.args(["-f", conf.to_str().unwrap_or_default(), "-N", "1"]).stderr(Stdio::null());
            (spawn_pinned(&mut cmd).map_err(|e| format!("danted: {e}"))?, Some(dir.to_string_lossy().into_owned()))
        }
        other => return Err(format!("unknown target {other}")),
    };
    let spec = name;
    let name = name.split_once('=').map_or(name, |(label, _)| label);
    let t = Target { name, spec, proxy: Some(addr), child: Some(child), _dir: dir };
    if !wait_listening(addr) {
        return Err(format!("{name} did not start listening"));
    }
    Ok(t)
}

// ------------------------------------------------------------ the client

/// A SOCKS5 CONNECT as curl makes it: greeting, then request, two round trips.
fn dial(via: Option<SocketAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(proxy) = via else {
        let s = TcpStream::connect(target)?;
        s.set_nodelay(true)?;
        return Ok(s);
    };
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    let SocketAddr::V4(t) = target else { unreachable!("bench targets are IPv4") };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if m != [5, 0] || head[1] != 0 {
        return Err(std::io::Error::other(format!("proxy refused: {m:?} {head:?}")));
    }
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        _ => return Err(std::io::Error::other("odd BND type")),
    };
    let mut bnd = [0u8; 18];
    s.read_exact(&mut bnd[..rest])?;
    s.set_read_timeout(None)?;
    Ok(s)
}

// ------------------------------------------------------------- servers

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Reads an 8-byte length and that many bytes, then answers one byte.
/// (Not "until EOF": microsocks drops the whole connection on a half-close.)
fn sink_server() -> SocketAddr {
    let (l, a) = listener();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(len) as usize;
                let mut buf = vec![0u8; 256 * 1024];
                while left > 0 {
                    match s.read(&mut buf[..left.min(256 * 1024)]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left -= n,
                    }
                }
                let _ = s.write_all(b"k");
            });
        }
    });
    a
}

/// What [`both_ways_server`] reports of a run: its number, and when the
/// last byte came in (None: the upload ended short).
type Arrival = (u64, Option<Instant>);

/// The server for [`both_ways`]: it reads a run number and a length, then
/// sends that many bytes while it reads as many: both directions of one
/// session at once. It reports when its last byte came in.
fn both_ways_server() -> (SocketAddr, std::sync::mpsc::Receiver<Arrival>) {
    let (l, a) = listener();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let done_tx = done_tx.clone();
            std::thread::spawn(move || {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).is_err() {
                    return;
                }
                let [run, n] = [&head[..8], &head[8..]].map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
                let n = n as usize;
                let Ok(mut w) = s.try_clone() else { return };
                let sender = std::thread::spawn(move || {
                    let chunk = vec![0x24u8; 128 * 1024];
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(chunk.len());
                        if w.write_all(&chunk[..k]).is_err() {
                            return;
                        }
                        left -= k;
                    }
                });
                let mut buf = vec![0u8; 256 * 1024];
                let mut left = n;
                while left > 0 {
                    match s.read(&mut buf[..left.min(256 * 1024)]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => left -= k,
                    }
                }
                let _ = done_tx.send((run, (left == 0).then(Instant::now)));
                let _ = sender.join();
            });
        }
    });
    (a, done)
}

/// Both directions of one session at once, `bytes` each way: the Gbit/s
/// of each, up and down, each timed from the start to its last byte's
/// arrival (up: as the server reports it; the client's last write returns
/// while megabytes are still in flight). NaN for a direction that ended
/// short or was not reported.
fn both_ways(
    via: Option<SocketAddr>,
    (server, arrived): &(SocketAddr, std::sync::mpsc::Receiver<Arrival>),
    bytes: usize,
) -> (f64, f64) {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let mut s = dial(via, *server).expect("dial both-ways server");
    let mut w = s.try_clone().expect("clone");
    let t0 = Instant::now();
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&run.to_be_bytes());
    head[8..].copy_from_slice(&(bytes as u64).to_be_bytes());
    w.write_all(&head).expect("send");
    let up = std::thread::spawn(move || {
        let chunk = vec![0x42u8; 128 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).expect("send");
            left -= n;
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        match s.read(&mut buf[..left.min(256 * 1024)]) {
            Ok(0) | Err(_) => break,
            Ok(n) => left -= n,
        }
    }
    let down = (left == 0).then(|| t0.elapsed());
    let _ = up.join();
    // Reports of earlier runs that failed late are passed over.
    let end = Instant::now() + Duration::from_secs(30);
    let up = loop {
        match arrived.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok((r, at)) if r == run => break at.and_then(|at| at.checked_duration_since(t0)),
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    let gbit = |d: Option<Duration>| d.map_or(f64::NAN, |d| bytes as f64 * 8.0 / d.as_secs_f64() / 1e9);
    (gbit(up), gbit(down))
}

/// Echoes until EOF.
fn echo_server() -> SocketAddr {
    let (l, a) = listener();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    a
}

/// `threads` acceptors: each reads 64 bytes, echoes them and closes first
/// (so TIME_WAIT lands on the server side, not on client ports).
fn echo64_server(threads: usize) -> SocketAddr {
    let (l, a) = listener();
    for _ in 0..threads {
        let l = l.try_clone().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut b = [0u8; 64];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                }
            }
        });
    }
    a
}

/// Accepts and holds every connection (one thread, for thousands).
fn hold_server() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let (l, a) = listener();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&held);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    (a, held)
}

/// Echoes every datagram to its sender.
fn udp_echo_server() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let a = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    a
}

// --------------------------------------------------------- measurements

/// Gbit/s moved to the sink through `via`: `bytes` in all, split over
/// SLABSOCKS_BENCH_STREAMS concurrent streams (1 by default).
fn throughput(via: Option<SocketAddr>, sink: SocketAddr, bytes: usize) -> f64 {
    let streams = env_num("SLABSOCKS_BENCH_STREAMS", 1).max(1);
    let each = bytes / streams;
    let conns: Vec<TcpStream> = (0..streams).map(|_| dial(via, sink).expect("dial sink")).collect();
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for mut s in conns {
            scope.spawn(move || {
                let chunk = vec![0x42u8; 128 * 1024];
                s.write_all(&(each as u64).to_be_bytes()).expect("send");
                let mut left = each;
                while left > 0 {
                    let n = left.min(chunk.len());
                    s.write_all(&chunk[..n]).expect("send");
                    left -= n;
                }
                let mut k = [0u8; 1];
                s.read_exact(&mut k).expect("sink ack");
            });
        }
    });
    (each * streams) as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9
}

const RATE_CLIENTS: usize = 8;

/// What a session-rate run measured.
struct Rate {
    per_s: f64,
    errors: u64,
    /// Each session's time, from the connect to the echo's last byte: p50
    /// and p99 in microseconds.
    p50_us: f64,
    p99_us: f64,
}

/// Sessions per second: RATE_CLIENTS clients each connect, handshake, echo
/// 64 bytes and close, for `secs`; and how long each session took.
fn session_rate(via: Option<SocketAddr>, echo64: SocketAddr, secs: f64) -> Rate {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..RATE_CLIENTS)
        .map(|_| {
            let (stop, errors) = (Arc::clone(&stop), Arc::clone(&errors));
            std::thread::spawn(move || {
                let msg = [7u8; 64];
                let mut took = Vec::with_capacity(32 * 1024);
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let ok = dial(via, echo64).and_then(|mut s| {
                        s.write_all(&msg)?;
                        let mut b = [0u8; 64];
                        s.read_exact(&mut b)
                    });
                    match ok {
                        Ok(()) => took.push(start.elapsed().as_secs_f64() * 1e6),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                took
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut took: Vec<f64> = threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
    let elapsed = t0.elapsed().as_secs_f64();
    took.sort_by(f64::total_cmp);
    Rate {
        per_s: took.len() as f64 / elapsed,
        errors: errors.load(Ordering::Relaxed),
        p50_us: percentile(&took, 0.5),
        p99_us: percentile(&took, 0.99),
    }
}

/// The nearest-rank `q` quantile of sorted samples; NaN when there are none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// 1-byte round trips: (p50, p99) in microseconds.
fn latency(via: Option<SocketAddr>, echo: SocketAddr, n: usize) -> (f64, f64) {
    let mut s = dial(via, echo).expect("dial echo");
    let mut rtts = Vec::with_capacity(n);
    let mut b = [1u8; 1];
    for _ in 0..n {
        let t0 = Instant::now();
        s.write_all(&b).unwrap();
        s.read_exact(&mut b).unwrap();
        rtts.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    if env_num("SLABSOCKS_BENCH_HISTOGRAM", 0) != 0 {
        print_histogram(via, &rtts);
    }
    (percentile(&rtts, 0.5), percentile(&rtts, 0.99))
}

/// SLABSOCKS_BENCH_HISTOGRAM=1: the round trips of one latency run by
/// power-of-two buckets, with p90, p99, p99.9 and the worst.
fn print_histogram(via: Option<SocketAddr>, sorted: &[f64]) {
    let n = sorted.len();
    let at = |q: f64| percentile(sorted, q);
    println!(
        "  RTT histogram via {}: p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} µs",
        via.map_or("direct".into(), |a| a.to_string()),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        sorted[n - 1]
    );
    let mut lo = 1.0;
    while lo <= sorted[n - 1] {
        let count = sorted.iter().filter(|&&x| x >= lo && x < lo * 2.0).count();
        if count > 0 {
            println!("    {:>7.0}–{:<7.0} µs {:>6} {}", lo, lo * 2.0, count, "#".repeat((count * 60).div_ceil(n)));
        }
        lo *= 2.0;
    }
}

// ---------------------------------------------------------------- UDP

/// A UDP association (RFC 1928 §7): the control connection, which must stay
/// open for as long as the association is to live, and the relay's address.
struct Association {
    _control: TcpStream,
    relay: SocketAddr,
}

/// UDP ASSOCIATE with DST 0.0.0.0:0 (the client does not say where it will
/// send from), in raw bytes.
fn udp_associate(proxy: SocketAddr) -> std::io::Result<Association> {
    let other = std::io::Error::other;
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    if m != [5, 0] {
        return Err(other(format!("greeting refused: {m:?}")));
    }
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[1] != 0 {
        return Err(other(format!("UDP ASSOCIATE refused with REP {:#04x}", head[1])));
    }
    let len = match head[3] {
        1 => 4,
        4 => 16,
        t => return Err(other(format!("odd BND type {t}"))),
    };
    let mut bnd = [0u8; 18];
    s.read_exact(&mut bnd[..len + 2])?;
    let ip: std::net::IpAddr = match <[u8; 4]>::try_from(&bnd[..len]) {
        Ok(v4) => v4.into(),
        Err(_) => <[u8; 16]>::try_from(&bnd[..len]).unwrap().into(),
    };
    let port = u16::from_be_bytes([bnd[len], bnd[len + 1]]);
    // An unspecified BND means "the address you reached me on".
    let ip = if ip.is_unspecified() { proxy.ip() } else { ip };
    Ok(Association { _control: s, relay: SocketAddr::new(ip, port) })
}

/// Unanswered datagrams a closed-loop client allows itself.
const UDP_WINDOW: usize = 64;
/// A closed-loop client that has heard nothing for this long presumes its
/// unanswered datagrams lost and fills the window again.
const UDP_STALL: Duration = Duration::from_millis(50);
/// After the last send: how long to wait for a straggler before giving up.
const UDP_DRAIN: Duration = Duration::from_millis(100);
/// Open loop: datagrams sent between two reads of the replies.
const UDP_BATCH: usize = 32;

#[derive(Default)]
struct UdpRun {
    sent: u64,
    /// Replies that came back before sending stopped.
    in_time: u64,
    /// ... and after the drain.
    echoed: u64,
    secs: f64,
}

/// Datagrams of `size` bytes to the UDP echo server for `secs`, over a new
/// association through `via` (with the SOCKS UDP header) or directly (bare).
/// `window`: at most that many unanswered at a time (closed loop); `None`:
/// as fast as one client sends (open loop).
fn udp_flood(
    via: Option<SocketAddr>,
    echo: SocketAddr,
    size: usize,
    window: Option<usize>,
    secs: f64,
) -> std::io::Result<UdpRun> {
    use std::io::ErrorKind::{TimedOut, WouldBlock};
    let assoc = via.map(udp_associate).transpose()?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let SocketAddr::V4(e) = echo else { unreachable!("bench targets are IPv4") };
    // RFC 1928 §7: RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA. The relay's
    // reply carries the same header, naming the remote that answered.
    let mut frame = Vec::with_capacity(10 + size);
    let dest = match &assoc {
        Some(a) => {
            frame.extend_from_slice(&[0, 0, 0, 1]);
            frame.extend_from_slice(&e.ip().octets());
            frame.extend_from_slice(&e.port().to_be_bytes());
            a.relay
        }
        None => echo,
    };
    let head = frame.len();
    frame.resize(head + size, 0x5a);
    let ours = |reply: &[u8]| reply.len() == frame.len() && reply[..head] == frame[..head];
    let mut buf = vec![0u8; 65_536];
    let mut run = UdpRun::default();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    match window {
        Some(window) => {
            sock.set_read_timeout(Some(UDP_STALL))?;
            let mut unanswered = 0;
            while Instant::now() < end {
                while unanswered < window && sock.send_to(&frame, dest).is_ok() {
                    run.sent += 1;
                    unanswered += 1;
                }
                match sock.recv(&mut buf) {
                    Ok(n) if ours(&buf[..n]) => {
                        run.echoed += 1;
                        unanswered = unanswered.saturating_sub(1);
                    }
                    Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => unanswered = 0,
                    _ => {}
                }
            }
        }
        None => {
            sock.set_nonblocking(true)?;
            while Instant::now() < end {
                for _ in 0..UDP_BATCH {
                    if sock.send_to(&frame, dest).is_err() {
                        break;
                    }
                    run.sent += 1;
                }
                while let Ok(n) = sock.recv(&mut buf) {
                    run.echoed += u64::from(ours(&buf[..n]));
                }
            }
            sock.set_nonblocking(false)?;
        }
    }
    run.secs = t0.elapsed().as_secs_f64();
    run.in_time = run.echoed;
    sock.set_read_timeout(Some(UDP_DRAIN))?;
    let give_up = Instant::now() + Duration::from_secs(2);
    while run.echoed < run.sent && Instant::now() < give_up {
        match sock.recv(&mut buf) {
            Ok(n) => run.echoed += u64::from(ours(&buf[..n])),
            Err(_) => break,
        }
    }
    Ok(run)
}

/// SYNs the kernel dropped because an accept queue was full (`TcpExt:
/// ListenOverflows` in /proc/net/netstat; 0 where it is missing).
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    let i = names.split_whitespace().position(|n| n == "ListenOverflows");
    i.and_then(|i| values.split_whitespace().nth(i)?.parse().ok()).unwrap_or(0)
}

/// `n` clients connect back to back (their sockets made beforehand) and send
/// the SOCKS greeting, while a session already relaying does one-byte round
/// trips. Returns milliseconds from the first connect to the last method
/// reply, the SYNs dropped meanwhile (each costs its client a 1 s retry),
/// and the relaying session's worst round trip in µs.
fn burst(proxy: SocketAddr, echo: SocketAddr, n: usize) -> (f64, u64, f64) {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::AsRawFd;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let stop = Arc::clone(&stop);
        let mut s = dial(Some(proxy), echo).expect("dial echo");
        std::thread::spawn(move || {
            let (mut worst, mut b) = (0f64, [1u8; 1]);
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                s.write_all(&b).unwrap();
                s.read_exact(&mut b).unwrap();
                worst = worst.max(t0.elapsed().as_secs_f64() * 1e6);
            }
            worst
        })
    };
    let socks: Vec<Socket> = (0..n)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let dropped = listen_overflows();
    let t0 = Instant::now();
    for s in &socks {
        let _ = s.connect(&proxy.into());
    }
    let mut streams = Vec::with_capacity(n);
    for s in socks {
        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: poll(2) on one valid pollfd that lives across the call.
        unsafe { libc::poll(&mut pfd, 1, 10_000) };
        s.set_nonblocking(false).unwrap();
        let mut t: TcpStream = s.into();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if t.write_all(&[5, 1, 0]).is_ok() {
            streams.push(t);
        }
    }
    for t in &mut streams {
        let _ = t.read_exact(&mut [0u8; 2]);
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let dropped = listen_overflows() - dropped;
    stop.store(true, Ordering::Relaxed);
    let worst = probe.join().unwrap_or(0.0);
    drop(streams);
    std::thread::sleep(Duration::from_millis(300));
    (ms, dropped, worst)
}

/// Proportional set size of a process and its descendants, in KiB.
fn tree_pss_kib(root: u32) -> u64 {
    tree(root)
        .iter()
        .map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            text.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Bytes of proxy memory per idle relaying session, at `n` sessions.
fn memory_per_session(t: &Target, n: usize) -> Option<f64> {
    let (proxy, pid) = (t.proxy?, t.child.as_ref()?.id());
    let (hold, held) = hold_server();
    // Warm: the first sessions pay for one-off set-up (pools, threads).
    let warm: Vec<_> = (0..16).filter_map(|_| dial(Some(proxy), hold).ok()).collect();
    drop(warm);
    std::thread::sleep(Duration::from_millis(300));
    let before = tree_pss_kib(pid);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        match dial(Some(proxy), hold) {
            Ok(mut s) => {
                let _ = s.write_all(b"x");
                clients.push(s);
            }
            Err(e) => {
                eprintln!("  {}: session {} failed: {e}", t.name, clients.len());
                break;
            }
        }
    }
    // Let every byte cross, so each session has relayed and is idle again.
    let end = Instant::now() + Duration::from_secs(10);
    while held.lock().unwrap().len() < clients.len() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    for s in held.lock().unwrap().iter_mut() {
        let _ = s.write_all(b"y");
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = tree_pss_kib(pid);
    let opened = clients.len();
    drop(clients);
    held.lock().unwrap().clear();
    std::thread::sleep(Duration::from_millis(500));
    (opened > 0).then(|| (after.saturating_sub(before) as f64 * 1024.0) / opened as f64)
}

/// Pids of a process and its children.
fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
            if ppid == Some(root) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// CPU time (user + system, seconds) used so far by the proxy's process
/// tree: every thread of the proxy, its live children (Dante forks), and
/// the children it has reaped; `None` for the direct connection.
fn cpu_secs(t: &Target) -> Option<f64> {
    let pid = t.child.as_ref()?.id();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = tree(pid)
        .iter()
        .filter_map(|&p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok().map(|s| (p, s)))
        .map(|(p, stat)| {
            let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            let field = |i: usize| f.get(i).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0);
            // utime, stime; and for the root, cutime and cstime (reaped children).
            field(11) + field(12) + if p == pid { field(13) + field(14) } else { 0 }
        })
        .sum();
    Some(ticks as f64 / hz)
}

/// Runs `f`; returns its result and the proxy's CPU cores used meanwhile
/// (CPU seconds over wall seconds; NaN for the direct connection).
fn with_cpu<R>(t: &Target, f: impl FnOnce() -> R) -> (R, f64) {
    let (c0, t0) = (cpu_secs(t), Instant::now());
    let r = f();
    let cores = match (c0, cpu_secs(t)) {
        (Some(a), Some(b)) => (b - a) / t0.elapsed().as_secs_f64(),
        _ => f64::NAN,
    };
    (r, cores)
}

/// System calls the proxy's process tree makes while `work` runs, counted
/// by `strace -c -f`, divided by the units `work` says it did. A count, not
/// a time: it does not depend on how busy the machine is.
fn syscalls_per(t: &Target, work: impl FnOnce(SocketAddr) -> usize) -> Option<f64> {
    let (proxy, pid) = (t.proxy?, t.child.as_ref()?.id());
    let out = std::env::temp_dir().join(format!("slabsocks-bench-strace-{pid}"));
    let mut cmd = Command::new("strace");
    cmd.args(["-c", "-f", "-o"]).arg(&out);
    for p in tree(pid) {
        cmd.args(["-p", &p.to_string()]);
    }
    let mut strace = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let units = work(proxy);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the pid of a child we started.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
    let text = std::fs::read_to_string(&out).ok()?;
    let _ = std::fs::remove_file(&out);
    let total: f64 = text.lines().find(|l| l.contains(" total"))?.split_whitespace().nth(3)?.parse().ok()?;
    (units > 0).then(|| total / units as f64)
}

/// System calls per MiB relayed, over one transfer of `mib` MiB.
fn syscalls_per_mib(t: &Target, sink: SocketAddr, mib: usize) -> Option<f64> {
    syscalls_per(t, |proxy| {
        throughput(Some(proxy), sink, mib << 20);
        mib
    })
}

/// System calls per session (connect, handshake, 64-byte echo, close),
/// over `n` sequential sessions.
fn syscalls_per_session(t: &Target, echo64: SocketAddr, n: usize) -> Option<f64> {
    syscalls_per(t, |proxy| {
        (0..n)
            .filter(|_| {
                dial(Some(proxy), echo64)
                    .and_then(|mut s| {
                        s.write_all(&[7u8; 64])?;
                        s.read_exact(&mut [0u8; 64])
                    })
                    .is_ok()
            })
            .count()
    })
}

/// The command that starts target `t` listening on `addr` (not pinned),
/// for the instruction counts; `None` for the direct connection and Dante
/// (which forks a process per client).
fn command_for(t: &Target, addr: SocketAddr) -> Option<Vec<String>> {
    let extra = std::env::var("SLABSOCKS_BENCH_ARGS").unwrap_or_default();
    let slabsocks = |bin: String| {
        let mut v = vec![bin, "--listen".into(), addr.to_string(), "--log-level".into(), "warn".into()];
        v.extend(extra.split_whitespace().map(String::from));
        v
    };
    match t.spec {
        "slabsocks" => Some(slabsocks(env!("CARGO_BIN_EXE_slabsocks").into())),
        "baseline" => Some(slabsocks(std::env::var("SLABSOCKS_BENCH_BASELINE").ok()?)),
        spec if spec.contains('=') => Some(slabsocks(spec.split_once('=')?.1.into())),
        "microsocks" => {
            Some(vec!["microsocks".into(), "-i".into(), "127.0.0.1".into(), "-p".into(), addr.port().to_string()])
        }
        _ => None,
    }
}

/// Instructions the proxy executes per MiB relayed (one 64 MiB transfer)
/// and per session (200 sequential sessions: connect, handshake, 64-byte
/// echo, close), counted by callgrind between a zeroing and a dump: counts,
/// not times, the same however busy the machine is.
fn instructions(t: &Target, sink: SocketAddr, echo64: SocketAddr) -> Option<(f64, f64)> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().ok()?;
    let argv = command_for(t, addr)?;
    let dir = std::env::temp_dir().join(format!("slabsocks-bench-cg-{}", addr.port()));
    std::fs::create_dir_all(&dir).ok()?;
    let out = dir.join("cg.out.%p");
    let mut child = Command::new("valgrind")
        .args(["--tool=callgrind", "--trace-children=yes"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id();
    let control = |cmd: &str| {
        Command::new("callgrind_control")
            .args([cmd, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    // The newest dump's total.
    let last_dump = || -> Option<f64> {
        let newest = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n: u32 = name.rsplit('.').next()?.parse().ok()?;
                name.contains(&format!(".{pid}.")).then_some((n, e.path()))
            })
            .max()?;
        let text = std::fs::read_to_string(newest.1).ok()?;
        text.lines().find_map(|l| l.strip_prefix("summary: ")).and_then(|v| v.trim().parse().ok())
    };
    let end = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > end {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Warm: the first sessions grow the slab and pools.
    for _ in 0..20 {
        let _ = dial(Some(addr), echo64).and_then(|mut s| {
            s.write_all(&[7u8; 64])?;
            s.read_exact(&mut [0u8; 64])
        });
    }
    control("-z");
    let mib = 64;
    throughput(Some(addr), sink, mib << 20);
    std::thread::sleep(Duration::from_millis(200));
    control("-d");
    let per_mib = last_dump()? / mib as f64;
    control("-z");
    let sessions = 200;
    let mut ok = 0;
    for _ in 0..sessions {
        let r = dial(Some(addr), echo64).and_then(|mut s| {
            s.write_all(&[7u8; 64])?;
            s.read_exact(&mut [0u8; 64])
        });
        ok += usize::from(r.is_ok());
    }
    std::thread::sleep(Duration::from_millis(300));
    control("-d");
    let per_session = last_dump()? / ok.max(1) as f64;
    // SAFETY: kill(2) on the pid of a child we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && !matches!(child.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Some((per_mib, per_session))
}

// ------------------------------------------------------------- report

#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
    }
    fn show(&self, prec: usize) -> String {
        if self.0.iter().all(|x| !x.is_finite()) {
            return "-".into();
        }
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.p$} [{:.p$}–{:.p$}]", self.median(), min, max, p = prec)
    }
}

impl Samples {
    /// `{"median": .., "min": .., "max": .., "samples": [..]}`, NaN as null.
    fn json(&self) -> String {
        let num = |x: f64| if x.is_finite() { format!("{x:.3}") } else { "null".into() };
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let all: Vec<String> = self.0.iter().map(|&x| num(x)).collect();
        format!(
            "{{\"median\": {}, \"min\": {}, \"max\": {}, \"samples\": [{}]}}",
            num(self.median()),
            num(min),
            num(max),
            all.join(", ")
        )
    }
}

fn opt_json(x: Option<f64>) -> String {
    x.filter(|x| x.is_finite()).map_or("null".into(), |x| format!("{x:.3}"))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // How an idle CPU waits decides what a wake-up costs in a VM: with the
    // guest's halt polling off, every wake-up of an idle CPU is a VM exit.
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let idle = match read("/sys/devices/system/cpu/cpuidle/current_driver") {
        Some(d) => match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
            Some(ns) => format!(", cpuidle {d} (guest_halt_poll_ns {ns})"),
            None => format!(", cpuidle {d}"),
        },
        None => String::new(),
    };
    format!("{cores} cores, {cpu}, kernel {}{idle}", kernel.trim())
}

const UDP_SIZES: [usize; 2] = [64, 1400];

/// What the `udp` scenario gathers for one target, per payload size.
#[derive(Default)]
struct UdpResults {
    /// Closed loop: echoed per second.
    rate: [Samples; 2],
    /// Closed loop: (lost, sent), summed over rounds.
    lost: [(u64, u64); 2],
    /// Open loop: sent and echoed per second.
    offered: [Samples; 2],
    delivered: [Samples; 2],
    open_lost: [(u64, u64); 2],
    /// Why the target was left out (no UDP ASSOCIATE, or it failed).
    skipped: Option<String>,
}

/// The `udp` scenario: for each payload size, a closed-loop run (the rate
/// the relay sustains) and a shorter open-loop run (what it delivers and
/// drops when offered more than it can carry), each over a new
/// association, for every target in a rotated order each round.
fn udp_scenario(targets: &[Target], echo: SocketAddr, rounds: usize, secs: f64) -> Vec<UdpResults> {
    let open_secs = secs / 2.0;
    let n = targets.len();
    let mut res: Vec<UdpResults> = (0..n).map(|_| UdpResults::default()).collect();
    for (r, t) in res.iter_mut().zip(targets) {
        if t.name == "microsocks" {
            r.skipped = Some("no UDP ASSOCIATE".into());
        }
    }
    for round in 0..rounds {
        for k in 0..n {
            let i = (k + round) % n;
            if res[i].skipped.is_some() {
                continue;
            }
            eprintln!("  {} udp", targets[i].name);
            // A warm-up, not counted: without it, the first run of a
            // target's turn came out slower, whichever size went first.
            let _ = udp_flood(targets[i].proxy, echo, UDP_SIZES[0], Some(UDP_WINDOW), 0.2);
            for (z, &size) in UDP_SIZES.iter().enumerate() {
                let via = targets[i].proxy;
                let runs = udp_flood(via, echo, size, Some(UDP_WINDOW), secs)
                    .and_then(|closed| Ok((closed, udp_flood(via, echo, size, None, open_secs)?)));
                let r = &mut res[i];
                match runs {
                    Ok((c, o)) => {
                        r.rate[z].0.push(c.in_time as f64 / c.secs);
                        r.lost[z].0 += c.sent - c.echoed.min(c.sent);
                        r.lost[z].1 += c.sent;
                        r.offered[z].0.push(o.sent as f64 / o.secs);
                        r.delivered[z].0.push(o.in_time as f64 / o.secs);
                        r.open_lost[z].0 += o.sent - o.echoed.min(o.sent);
                        r.open_lost[z].1 += o.sent;
                    }
                    Err(e) => {
                        r.skipped = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        eprintln!("udp round {} of {rounds} done", round + 1);
    }
    res
}

/// The `udp` tables: `secs` is the length of a closed-loop run.
fn print_udp(targets: &[Target], res: &[UdpResults], secs: f64) {
    let open_secs = secs / 2.0;
    let direct = targets.iter().position(|t| t.proxy.is_none());
    let ratio = |r: &UdpResults, z: usize| match direct {
        Some(d) if !r.rate[z].0.is_empty() => format!("{:.2}", r.rate[z].median() / res[d].rate[z].median()),
        _ => "-".into(),
    };
    let share = |(lost, sent): (u64, u64)| match sent {
        0 => "-".to_string(),
        _ => format!("{lost} ({:.2}%)", lost as f64 * 100.0 / sent as f64),
    };
    println!();
    println!(
        "udp: datagrams echoed per second, closed loop: at most {UDP_WINDOW} unanswered, {secs:.1} s per run; \
         lost = sent − echoed after a {} ms drain, over all rounds",
        UDP_DRAIN.as_millis()
    );
    println!(
        "{:<11} {:>24} {:>8} {:>16} {:>24} {:>8} {:>16}",
        "", "64 B datagrams/s", "×direct", "lost", "1400 B datagrams/s", "×direct", "lost"
    );
    for (r, t) in res.iter().zip(targets) {
        if r.rate[0].0.is_empty() {
            println!("{:<11} skipped: {}", t.name, r.skipped.as_deref().unwrap_or("no result"));
            continue;
        }
        println!(
            "{:<11} {:>24} {:>8} {:>16} {:>24} {:>8} {:>16}{}",
            t.name,
            r.rate[0].show(0),
            ratio(r, 0),
            share(r.lost[0]),
            r.rate[1].show(0),
            ratio(r, 1),
            share(r.lost[1]),
            r.skipped.as_deref().map_or(String::new(), |why| format!("  (then {why})")),
        );
    }
    println!();
    println!(
        "udp open loop: one client sends as fast as it can for {open_secs:.1} s; per second sent and echoed, and lost"
    );
    println!(
        "{:<11} {:>24} {:>24} {:>8} {:>24} {:>24} {:>8}",
        "", "64 B sent/s", "echoed/s", "lost", "1400 B sent/s", "echoed/s", "lost"
    );
    let pct = |(lost, sent): (u64, u64)| match sent {
        0 => "-".to_string(),
        _ => format!("{:.1}%", lost as f64 * 100.0 / sent as f64),
    };
    for (r, t) in res.iter().zip(targets) {
        if r.offered[0].0.is_empty() {
            continue;
        }
        println!(
            "{:<11} {:>24} {:>24} {:>8} {:>24} {:>24} {:>8}",
            t.name,
            r.offered[0].show(0),
            r.delivered[0].show(0),
            pct(r.open_lost[0]),
            r.offered[1].show(0),
            r.delivered[1].show(0),
            pct(r.open_lost[1]),
        );
    }
}

fn main() {
    // `cargo test --all-targets` runs this binary without --bench: do nothing.
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay bench: run with `cargo bench`");
        return;
    }
    // SLABSOCKS_BENCH_QUICK=1: one round, smaller runs, no burst and a
    // shorter UDP run: about a minute with the two peers installed.
    let quick = env_num("SLABSOCKS_BENCH_QUICK", 0) != 0;
    let rounds = env_num("SLABSOCKS_BENCH_ROUNDS", if quick { 1 } else { 3 });
    let mib = env_num("SLABSOCKS_BENCH_MB", if quick { 64 } else { 256 });
    let idle = env_num("SLABSOCKS_BENCH_IDLE", if quick { 1000 } else { 3000 });
    let rate_secs = env_num("SLABSOCKS_BENCH_RATE_MS", if quick { 500 } else { 1500 }) as f64 / 1e3;
    let only = std::env::var("SLABSOCKS_BENCH_ONLY").ok();
    let scenarios = std::env::var("SLABSOCKS_BENCH_SCENARIOS")
        .unwrap_or_else(|_| "relay,burst,memory,syscalls,instructions,udp".into());
    let run = |scenario: &str| scenarios.split(',').any(|s| s == scenario);
    // Read before pinning: a pinned process sees one CPU.
    let machine_line = machine();
    println!("machine: {machine_line}");
    if pinning() {
        if let Err(e) = pin(0) {
            println!("cannot pin the load to CPU 0: {e}");
        }
        println!(
            "load generator and servers on CPU 0, each proxy on CPU {}; {rounds} rounds, order rotated",
            proxy_cpu()
        );
    } else {
        println!("nothing pinned; {rounds} rounds, order rotated");
    }
    let streams = env_num("SLABSOCKS_BENCH_STREAMS", 1);
    if streams > 1 {
        println!("throughput over {streams} concurrent streams");
    }

    let mut targets = Vec::new();
    // Baselines: one path (named `baseline`), or `label=path,...` (named by
    // their labels).
    let baselines: Vec<&'static str> = match std::env::var("SLABSOCKS_BENCH_BASELINE") {
        Ok(v) if v.contains('=') => v.split(',').map(|b| &*Box::leak(b.to_string().into_boxed_str())).collect(),
        Ok(_) => vec!["baseline"],
        Err(_) => vec![],
    };
    let names = ["direct", "slabsocks"].into_iter().chain(baselines).chain([
        "microsocks",
        "dante",
        "fast-socks5",
        "3proxy",
        "3proxy-splice",
    ]);
    for name in names {
        let label = name.split_once('=').map_or(name, |(l, _)| l);
        if only.as_deref().is_some_and(|o| !o.split(',').any(|n| n == label)) {
            continue;
        }
        match start_target(name) {
            Ok(t) => targets.push(t),
            Err(e) => println!("skipping {name}: {e}"),
        }
    }
    let (sink, echo, echo64) = (sink_server(), echo_server(), echo64_server(RATE_CLIENTS * 2));
    let both = both_ways_server();
    let udp_echo = udp_echo_server();
    let n = targets.len();
    let mut bw_up: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut bw_down: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut tput: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut rate: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut sess_p50: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut sess_p99: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut p50: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut p99: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut tput_cpu: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut rate_cpu: Vec<Samples> = (0..n).map(|_| Samples::default()).collect();
    let mut errs = vec![0u64; n];
    for round in 0..if run("relay") { rounds } else { 0 } {
        for k in 0..n {
            let i = (k + round) % n;
            let via = targets[i].proxy;
            eprintln!("  {}", targets[i].name);
            let (g, cores) = with_cpu(&targets[i], || throughput(via, sink, mib << 20));
            tput[i].0.push(g);
            let (u, d) = both_ways(via, &both, (mib << 20) / 2);
            // A direction that ended short has no rate: left out, and said.
            for (x, into, way) in [(u, &mut bw_up[i], "up"), (d, &mut bw_down[i], "down")] {
                if x.is_finite() {
                    into.0.push(x);
                } else {
                    eprintln!("  both ways via {}: the {way} direction ended short", targets[i].name);
                }
            }
            tput_cpu[i].0.push(cores);
            let (r, cores) = with_cpu(&targets[i], || session_rate(via, echo64, rate_secs));
            rate[i].0.push(r.per_s);
            sess_p50[i].0.push(r.p50_us);
            sess_p99[i].0.push(r.p99_us);
            rate_cpu[i].0.push(cores);
            errs[i] += r.errors;
            let (a, b) = latency(via, echo, 5000);
            p50[i].0.push(a);
            p99[i].0.push(b);
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let burst_n = env_num("SLABSOCKS_BENCH_BURST", if quick { 0 } else { 1000 });
    if run("burst") && burst_n > 0 {
        println!();
        println!("burst: {burst_n} clients connect at once and greet; a relaying session's worst RTT meanwhile");
        for round in 0..rounds {
            for k in 0..n {
                let i = (k + round) % n;
                if let Some(proxy) = targets[i].proxy {
                    let (ms, dropped, worst) = burst(proxy, echo, burst_n);
                    println!(
                        "  round {} {:<11} all greeted in {ms:8.1} ms, {dropped:4} SYNs dropped, worst RTT {worst:8.0} µs",
                        round + 1,
                        targets[i].name
                    );
                }
            }
        }
    }
    let mem: Vec<Option<f64>> =
        targets.iter().map(|t| if run("memory") { memory_per_session(t, idle) } else { None }).collect();
    let has_strace = Command::new("strace").arg("-V").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    let sys: Vec<Option<f64>> = targets
        .iter()
        .map(|t| if has_strace && run("syscalls") { syscalls_per_session(t, echo64, 500) } else { None })
        .collect();
    let sys_mib: Vec<Option<f64>> = targets
        .iter()
        .map(|t| if has_strace && run("syscalls") { syscalls_per_mib(t, sink, 64) } else { None })
        .collect();
    if !has_strace {
        println!("strace not installed: no system call counts");
    }

    let has_valgrind =
        Command::new("valgrind").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    let instr: Vec<Option<(f64, f64)>> = targets
        .iter()
        .map(|t| if has_valgrind && run("instructions") { instructions(t, sink, echo64) } else { None })
        .collect();
    if run("instructions") {
        if !has_valgrind {
            println!("valgrind not installed: no instruction counts");
        } else {
            println!();
            println!("instructions executed by the proxy (callgrind: counts, not times)");
            for (t, i) in targets.iter().zip(&instr) {
                if let Some((mib, sess)) = i {
                    println!("  {:<11} {:>14.0} per MiB relayed {:>12.0} per session", t.name, mib, sess);
                }
            }
        }
    }

    let udp_secs = env_num("SLABSOCKS_BENCH_UDP_MS", if quick { 300 } else { 1000 }) as f64 / 1e3;
    let udp = run("udp").then(|| udp_scenario(&targets, udp_echo, rounds, udp_secs));

    if run("relay") || run("memory") || run("syscalls") {
        println!();
        println!(
            "{:<11} {:>22} {:>22} {:>20} {:>22} {:>12} {:>14}",
            "", "throughput Gbit/s", "sessions/s", "RTT p50 µs", "RTT p99 µs", "B/idle sess", "syscalls/sess"
        );
        for (i, t) in targets.iter().enumerate() {
            println!(
                "{:<11} {:>22} {:>22} {:>20} {:>22} {:>12} {:>14}",
                t.name,
                tput[i].show(2),
                rate[i].show(0),
                p50[i].show(1),
                p99[i].show(1),
                mem[i].map_or("-".into(), |m| format!("{m:.0}")),
                sys[i].map_or("-".into(), |m| format!("{m:.1}")),
            );
        }
        println!();
        println!(
            "{:<11} {:>22} {:>16} {:>22} {:>18} {:>14} {:>22} {:>22}",
            "",
            "proxy CPU, tput",
            "Gbit/s per core",
            "proxy CPU, sessions",
            "sessions/s/core",
            "syscalls/MiB",
            "both ways: up Gbit/s",
            "down Gbit/s"
        );
        for (i, t) in targets.iter().enumerate() {
            let per_core = |x: &Samples, c: &Samples| x.median() / c.median();
            println!(
                "{:<11} {:>22} {:>16.2} {:>22} {:>18.0} {:>14} {:>22} {:>22}",
                t.name,
                tput_cpu[i].show(2),
                per_core(&tput[i], &tput_cpu[i]),
                rate_cpu[i].show(2),
                per_core(&rate[i], &rate_cpu[i]),
                sys_mib[i].map_or("-".into(), |m| format!("{m:.1}")),
                bw_up[i].show(2),
                bw_down[i].show(2),
            );
        }
        println!();
        println!("{:<11} {:>22} {:>22}", "", "session p50 µs", "session p99 µs");
        for (i, t) in targets.iter().enumerate() {
            println!("{:<11} {:>22} {:>22}", t.name, sess_p50[i].show(0), sess_p99[i].show(0));
        }
        println!();
        println!("ratios of medians to direct (throughput and rate: higher is better; latency: lower is better)");
        for (i, t) in targets.iter().enumerate() {
            println!(
                "{:<11} throughput {:.2}  sessions/s {:.2}  p50 {:.2}  p99 {:.2}{}",
                t.name,
                tput[i].median() / tput[0].median(),
                rate[i].median() / rate[0].median(),
                p50[i].median() / p50[0].median(),
                p99[i].median() / p99[0].median(),
                if errs[i] > 0 { format!("  ({} failed sessions)", errs[i]) } else { String::new() },
            );
        }
    }
    if let Some(res) = udp {
        print_udp(&targets, &res, udp_secs);
    }
    if run("relay") || run("memory") || run("syscalls") || run("instructions") {
        let path = std::env::var("SLABSOCKS_BENCH_JSON").unwrap_or_else(|_| "target/bench-relay.json".into());
        let rows: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                format!(
                    "    {{\"name\": \"{}\", \"throughput_gbit\": {}, \"throughput_cores\": {}, \"both_ways_up_gbit\": {}, \"both_ways_down_gbit\": {}, \"sessions_per_s\": {}, \
                     \"sessions_cores\": {}, \"session_p50_us\": {}, \"session_p99_us\": {}, \"rtt_p50_us\": {}, \"rtt_p99_us\": {}, \"idle_bytes_per_session\": {}, \
                     \"syscalls_per_session\": {}, \"syscalls_per_mib\": {}, \"instructions_per_mib\": {}, \
                     \"instructions_per_session\": {}, \"failed_sessions\": {}}}",
                    t.name,
                    tput[i].json(),
                    tput_cpu[i].json(),
                    bw_up[i].json(),
                    bw_down[i].json(),
                    rate[i].json(),
                    rate_cpu[i].json(),
                    sess_p50[i].json(),
                    sess_p99[i].json(),
                    p50[i].json(),
                    p99[i].json(),
                    opt_json(mem[i]),
                    opt_json(sys[i]),
                    opt_json(sys_mib[i]),
                    opt_json(instr[i].map(|x| x.0)),
                    opt_json(instr[i].map(|x| x.1)),
                    errs[i],
                )
            })
            .collect();
        let json = format!(
            "{{\n  \"machine\": \"{}\",\n  \"rounds\": {rounds},\n  \"throughput_mib\": {mib},\n  \"targets\": [\n{}\n  ]\n}}\n",
            machine_line.replace('"', "'"),
            rows.join(",\n")
        );
        match std::fs::write(&path, json) {
            Ok(()) => println!("\nraw results: {path}"),
            Err(e) => println!("\ncannot write {path}: {e}"),
        }
    }
}
