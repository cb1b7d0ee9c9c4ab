//! UDP ASSOCIATE driven by a real SOCKS5 UDP client: PySocks
//! (`pip install PySocks`), whose `socksocket(AF_INET, SOCK_DGRAM)` sends
//! UDP ASSOCIATE with DST `0.0.0.0:<its local port>`, then wraps each
//! datagram in the SOCKS UDP header and unwraps the replies.
//!
//! Without python3 and PySocks the test prints a note and passes, unless
//! `SLABSOCKS_REQUIRE_PYSOCKS` is set (as `.ci/run` sets it), when it fails.

mod common;

use common::*;
use std::net::UdpSocket;
use std::process::{Command, Stdio};

/// Sends five datagrams of growing size to the echo server through the
/// proxy and prints what comes back, and from where.
const CLIENT: &str = r#"
import socks, socket, sys
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, sys.argv[1], int(sys.argv[2]))
s.settimeout(10)
echo = (sys.argv[3], int(sys.argv[4]))
for i in range(5):
    data = bytes([65 + i]) * (1 + 300 * i)
    s.sendto(data, echo)
    got, src = s.recvfrom(65536)
    assert got == data, (len(got), len(data))
    print("reply", len(got), src[0], src[1], flush=True)
s.close()
"#;

fn have_pysocks() -> bool {
    Command::new("python3")
        .args(["-c", "import socks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn pysocks_udp_datagrams_round_trip_through_the_relay() {
    if !have_pysocks() {
        assert!(
            std::env::var_os("SLABSOCKS_REQUIRE_PYSOCKS").is_none(),
            "PySocks is required here (pip install PySocks)"
        );
        eprintln!("pysocks_udp: python3 with PySocks missing (pip install PySocks): skipping");
        return;
    }
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let (mut child, addr, log) = spawn_logged(&["--log-level", "debug"]);
    let out = Command::new("python3")
        .args(["-c", CLIENT, &addr.ip().to_string(), &addr.port().to_string()])
        .args([echo_addr.ip().to_string(), echo_addr.port().to_string()])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "PySocks client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let replies: Vec<&str> = stdout.lines().filter(|l| l.starts_with("reply ")).collect();
    assert_eq!(replies.len(), 5, "{stdout}");
    for (i, line) in replies.iter().enumerate() {
        let want = format!("reply {} {} {}", 1 + 300 * i, echo_addr.ip(), echo_addr.port());
        assert_eq!(*line, want, "the reply names the echo server as its source");
    }
    log.wait_for("UDP association on");
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child), 0);
}
