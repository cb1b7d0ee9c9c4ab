//! Rude peers and failures mid-session: each test is named after the
//! defect it guards against.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

/// Sends `total` bytes in a thread, ignoring errors (the proxy may stop
/// taking them), then half-closes.
fn upload_in_background(mut s: TcpStream, total: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let chunk = [b'x'; 16 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            if s.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// Regression: a write error upstream closed the whole session, so an
/// upstream that answers and hangs up while the client is still uploading
/// (an HTTP 413) had its answer destroyed by a reset. The answer must reach
/// the client, followed by a clean EOF.
#[test]
fn an_upstream_that_answers_and_hangs_up_mid_upload_gets_its_answer_through() {
    const ANSWER: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let proxy = Proxy::start();
    let upstream = serve("127.0.0.1:0", |mut s| {
        // Read the start of the upload, answer, and close with the rest of
        // it unread: the kernel sends RST, as a real server's would.
        let mut head = [0u8; 4096];
        let _ = s.read_exact(&mut head);
        s.write_all(ANSWER).unwrap();
        drop(s);
    });
    for round in 0..5 {
        let mut s = open(proxy.addr, upstream);
        let uploader = upload_in_background(s.try_clone().unwrap(), 512 * 1024);
        let mut got = Vec::new();
        let res = s.read_to_end(&mut got);
        assert!(got.starts_with(ANSWER), "round {round}: got {:?} ({res:?})", String::from_utf8_lossy(&got));
        assert!(res.is_ok(), "round {round}: the answer must end in EOF, not {res:?}");
        uploader.join().unwrap();
    }
    proxy.wait_sessions(0);
}

/// Regression: after a failure reply the proxy read at most 8 KiB of what
/// the client had pipelined, then closed with the rest unread; the kernel
/// then resets the connection, and a client still writing its payload
/// never gets to read the reply. It must get the reply and a clean EOF.
#[test]
fn a_refused_client_that_pipelined_a_large_payload_still_gets_its_reply() {
    let proxy = Proxy::start();
    for round in 0..3 {
        let mut s = connect(proxy.addr);
        let mut wire = vec![5, 1, 0];
        wire.extend(connect_request(closed_port()));
        wire.extend(vec![b'p'; 512 * 1024]);
        s.write_all(&wire).unwrap_or_else(|e| panic!("round {round}: the pipelined write failed: {e}"));
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let res = s.read_to_end(&mut got);
        assert_eq!(got, [5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0], "round {round}: {res:?}");
        assert!(res.is_ok(), "round {round}: {res:?}");
    }
    proxy.wait_sessions(0);
}

/// A session whose CONNECT was refused, with its reply read.
fn refused(proxy: &Proxy) -> TcpStream {
    let mut s = connect(proxy.addr);
    let mut wire = vec![5, 1, 0];
    wire.extend(connect_request(closed_port()));
    s.write_all(&wire).unwrap();
    expect(&mut s, &[5, 0]);
    assert_eq!(read_reply(&mut s).unwrap().0, 5);
    s
}

/// A client that never stops sending after its failure reply is cut off at
/// the linger bound (1 MiB or 2 s), not served forever.
#[test]
fn lingering_is_bounded() {
    let proxy = Proxy::start();
    let mut s = refused(&proxy);
    let sender = std::thread::spawn(move || {
        let chunk = [0u8; 64 * 1024];
        let mut sent = 0usize;
        while s.write_all(&chunk).is_ok() {
            sent += chunk.len();
            assert!(sent < 64 << 20, "64 MiB taken after a failure reply");
        }
    });
    sender.join().unwrap();
    proxy.wait_sessions(0);
}

/// A silent client after its failure reply holds its slot only for the
/// linger time.
#[test]
fn a_silent_client_is_closed_after_the_linger_time() {
    let proxy = Proxy::start();
    let mut s = refused(&proxy);
    assert!(closed(&mut s), "FIN right after the reply");
    proxy.wait_sessions(0);
}
