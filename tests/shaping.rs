//! `--rate-limit` and `--user-rate-limit`: token buckets in the loop. The
//! transfer times are asserted loosely: they are the feature.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

/// A sink that reads to EOF, then says how much it read.
fn counting_sink() -> std::net::SocketAddr {
    serve("127.0.0.1:0", |mut s| {
        let n = std::io::copy(&mut s, &mut std::io::sink()).unwrap_or(0);
        let _ = s.write_all(&n.to_be_bytes());
    })
}

fn send(s: &mut std::net::TcpStream, total: usize) -> u64 {
    // A stalled relay fails the test instead of hanging it.
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let chunk = vec![7u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut n = [0u8; 8];
    std::io::Read::read_exact(s, &mut n).unwrap();
    u64::from_be_bytes(n)
}

/// 64 MiB under a 16 MiB/s limit take about 4 s (asserted as 3 to 8 s);
/// the throttled session is woken by its timer, not by spinning: the
/// proxy uses far less than a core meanwhile.
#[test]
fn a_session_limit_sets_the_pace() {
    session_limit(&[]);
}

/// The same through buffers (`--no-splice`).
#[test]
fn a_session_limit_sets_the_pace_when_copying() {
    session_limit(&["--no-splice"]);
}

fn session_limit(extra: &[&str]) {
    let mut args = vec!["--rate-limit", "16m", "--workers", "1"];
    args.extend(extra);
    let (child, addr) = spawn(&args);
    let sink = counting_sink();
    let mut s = open(addr, sink);
    let (ticks, t0) = (cpu_ticks(child.id()), Instant::now());
    assert_eq!(send(&mut s, 64 << 20), 64 << 20);
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(3) && took <= Duration::from_secs(8), "64 MiB at 16 MiB/s took {took:?}");
    let cpu = (cpu_ticks(child.id()) - ticks) as f64 / 100.0;
    assert!(cpu < 0.5 * took.as_secs_f64(), "{cpu} s of CPU in {took:?}: throttling spins");
}

/// Two sessions of one user share the user's 8 MiB/s: 2 × 16 MiB take
/// about 4 s; a session of nobody in particular is not held back.
#[test]
fn a_user_limit_is_shared_by_the_users_sessions() {
    let users = users_file("shaping", "carol:pw\n");
    let (_child, addr) = spawn(&[
        "--users",
        users.to_str().unwrap(),
        "--user-rate-limit",
        "8m",
        "--workers",
        "1",
        "--auth-exempt",
        "127.0.0.3/32",
    ]);
    let sink = counting_sink();
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let (mut s, rep) = login_and_connect(addr, "carol", "pw", sink);
                assert_eq!(rep, 0);
                assert_eq!(send(&mut s, 16 << 20), 16 << 20);
            });
        }
    });
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(3) && took <= Duration::from_secs(8), "2 × 16 MiB at 8 MiB/s took {took:?}");
    // No user (an exempt client): no limit.
    let mut s = connect_from("127.0.0.3", addr);
    s.write_all(&[5, 1, 0]).unwrap();
    expect(&mut s, &[5, 0]);
    s.write_all(&connect_request(sink)).unwrap();
    assert_eq!(read_reply(&mut s).unwrap().0, 0);
    let t0 = Instant::now();
    assert_eq!(send(&mut s, 32 << 20), 32 << 20);
    assert!(t0.elapsed() < Duration::from_millis(3500), "an unlimited session took {:?}", t0.elapsed());
    remove_users_file(&users);
}
