//! The zero-copy relay: bytes through kernel pipes (`splice`), checked by
//! checksums both ways, with half-closes, backpressure, bytes pipelined
//! with the request, tiny pipes, and the fallback to buffers when pipes run
//! out. The binary is a child process here, so that its pipes can be
//! counted in /proc.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A server that, per connection, sends `down` pattern bytes (seed 2) and
/// half-closes, while reading to EOF; reports the checksum of what it read.
fn both_ways_server(down: usize) -> (SocketAddr, std::sync::mpsc::Receiver<Sum>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = serve("127.0.0.1:0", move |s| {
        let mut reader = s.try_clone().unwrap();
        let tx = tx.clone();
        let r = std::thread::spawn(move || sum_to_end(&mut reader));
        let mut w = s;
        send_pattern(&mut w, 2, down);
        let _ = tx.send(r.join().unwrap());
    });
    (addr, rx)
}

/// `n` sessions at once, each moving `up` bytes up and `down` bytes down
/// at the same time; every byte arrives, in order, both ways.
fn transfer_both_ways(proxy: SocketAddr, n: usize, up: usize, down: usize) {
    let (target, sums) = both_ways_server(down);
    std::thread::scope(|scope| {
        for _ in 0..n {
            scope.spawn(|| {
                let mut s = open(proxy, target);
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut w = s.try_clone().unwrap();
                let sender = std::thread::spawn(move || send_pattern(&mut w, 1, up));
                let got = sum_to_end(&mut s);
                let mut want = Sum::new();
                let mut buf = vec![0u8; down];
                Pattern::new(2).fill(&mut buf);
                want.add(&buf);
                assert_eq!(got, want, "downstream bytes");
                sender.join().unwrap();
            });
        }
    });
    let mut want = Sum::new();
    let mut buf = vec![0u8; up];
    Pattern::new(1).fill(&mut buf);
    want.add(&buf);
    for _ in 0..n {
        let got = sums.recv_timeout(IO_TIMEOUT).expect("upstream checksum");
        assert_eq!(got, want, "upstream bytes");
    }
}

/// Pipe ends the server holds beyond those it started with (its stderr to
/// us, the signal thread's).
struct Pipes {
    pid: u32,
    base: usize,
}

impl Pipes {
    fn of(child: &Spawned) -> Pipes {
        Pipes { pid: child.id(), base: descriptors(child.id()).1 }
    }

    fn ends(&self) -> usize {
        descriptors(self.pid).1 - self.base
    }
}

/// Bytes held in flight by a reader that does not read sit in pipes (so
/// splice is in use), and arrive intact once it reads.
#[test]
fn a_transfer_goes_through_pipes_and_arrives_intact() {
    let (child, proxy) = spawn(&[]);
    let pipes = Pipes::of(&child);
    let total = 8 << 20;
    let target = serve("127.0.0.1:0", move |mut s| {
        send_pattern(&mut s, 5, total);
    });
    let mut s = open(proxy, target);
    eventually("a pipe holds bytes in flight", || pipes.ends() >= 2);
    let mut want = Sum::new();
    let mut buf = vec![0u8; total];
    Pattern::new(5).fill(&mut buf);
    want.add(&buf);
    assert_eq!(sum_to_end(&mut s), want);
}

/// `--no-splice`: the same transfer uses no pipe.
#[test]
fn no_splice_uses_no_pipe() {
    let (child, proxy) = spawn(&["--no-splice"]);
    let pipes = Pipes::of(&child);
    let target = serve("127.0.0.1:0", move |mut s| {
        send_pattern(&mut s, 5, 8 << 20);
    });
    let mut s = open(proxy, target);
    // The reader does not read: the proxy holds what it can, in buffers.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pipes.ends(), 0);
    let mut want = Sum::new();
    let mut buf = vec![0u8; 8 << 20];
    Pattern::new(5).fill(&mut buf);
    want.add(&buf);
    assert_eq!(sum_to_end(&mut s), want);
}

/// Both directions at once, several sessions: with the default pipes, and
/// with one-page pipes, which fill on every splice (the pipe-fullness
/// rule: `EAGAIN` from a pipe holding bytes does not mean the socket is
/// drained).
#[test]
fn both_directions_at_once_with_default_and_one_page_pipes() {
    for extra in [&[][..], &["--pipe-size", "4k"][..]] {
        let (_child, proxy) = spawn(extra);
        transfer_both_ways(proxy, 4, 8 << 20, 8 << 20);
    }
}

/// With a single pipe for everyone, the other directions copy through
/// buffers, and every byte still arrives.
#[test]
fn when_pipes_run_out_directions_copy() {
    let (child, proxy) = spawn(&["--max-pipes", "1"]);
    let pipes = Pipes::of(&child);
    transfer_both_ways(proxy, 4, 4 << 20, 4 << 20);
    assert!(pipes.ends() <= 2, "{} pipe ends with --max-pipes 1", pipes.ends());
}

/// Under a descriptor limit too low for pipes (pipe2 fails with EMFILE),
/// sessions still relay, by copying.
#[test]
fn when_pipe2_fails_directions_copy() {
    let (child, proxy) =
        spawn_with_nofile(64, &["--max-connections", "20", "--max-pipes", "1000"], std::process::Stdio::null());
    eventually("the server is up", || TcpStream::connect(proxy).is_ok());
    transfer_both_ways(proxy, 20, 1 << 20, 1 << 20);
    assert!(descriptors(child.id()).1 < 64);
}

/// Idle sessions hold no pipe, and small messages never take one (a
/// direction splices only once a read has filled a whole buffer): after
/// one short exchange on each of 40 sessions, no pipe was ever made.
#[test]
fn idle_sessions_hold_no_pipe() {
    let (child, proxy) = spawn(&[]);
    let pipes = Pipes::of(&child);
    let echo = echo_server("127.0.0.1:0");
    let mut sessions: Vec<TcpStream> = (0..40).map(|_| open(proxy, echo)).collect();
    assert_eq!(pipes.ends(), 0, "a pipe before any byte moved");
    for s in &mut sessions {
        s.write_all(b"hello through a pipe").unwrap();
        expect(s, b"hello through a pipe");
    }
    assert_eq!(pipes.ends(), 0, "pipes for 20-byte messages");
}

/// Bytes sent in the same write as the greeting and the request go out
/// first, before the direction switches to a pipe for what follows.
#[test]
fn bytes_pipelined_with_the_request_go_first() {
    let (_child, proxy) = spawn(&[]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut first = vec![5u8, 1, 0];
    first.extend(connect_request(echo));
    first.extend(b"first ");
    s.write_all(&first).unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head, [5, 0]);
    let (rep, _) = read_reply(&mut s).unwrap();
    assert_eq!(rep, 0);
    s.write_all(b"second").unwrap();
    expect(&mut s, b"first second");
    // Then bulk, through the pipe, still in order.
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_pattern(&mut w, 9, 4 << 20));
    let got = sum_to_end(&mut s);
    assert_eq!(got, sender.join().unwrap());
}

/// A half-close passes through after every spliced byte before it, and the
/// other direction goes on: the remote answers after the client's EOF. The
/// remote has a small receive buffer and starts reading late. (The exact
/// case of an EOF read while the pipe still holds bytes is pinned by the
/// relay's unit test `no_fin_while_the_pipe_holds_bytes`.)
#[test]
fn half_close_after_spliced_bytes() {
    // A pipe larger than the socket's free space at a writable edge.
    let (_child, proxy) = spawn(&["--pipe-size", "1m"]);
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.set_recv_buffer_size(8 * 1024).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    l.listen(8).unwrap();
    let target = l.local_addr().unwrap().as_socket().unwrap();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut s: TcpStream = s.into();
        std::thread::sleep(Duration::from_millis(300));
        let mut sum = Sum::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sum.add(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        s.write_all(format!("{sum:?}").as_bytes()).unwrap();
    });
    let mut s = open(proxy, target);
    let sent = send_pattern(&mut s, 3, 256 * 1024);
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("{sent:?}"));
}

/// A client that stops reading while the remote sends without end: the
/// remote is held back (it cannot write much beyond the socket buffers and
/// one pipe), and the bytes arrive intact when the client reads again.
#[test]
fn backpressure_through_pipes() {
    let (child, proxy) = spawn(&[]);
    let pipes = Pipes::of(&child);
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let target = serve("127.0.0.1:0", move |mut s| {
        let mut p = Pattern::new(4);
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        while sent < 256 << 20 {
            p.fill(&mut buf);
            match s.write(&buf) {
                Ok(n) if n == buf.len() => sent += n,
                _ => break,
            }
        }
        let _ = sent_tx.send(sent);
    });
    let mut s = open(proxy, target);
    let sent = sent_rx.recv_timeout(IO_TIMEOUT).expect("the remote blocked");
    // Socket buffers on loopback grow to several MiB each, and a pipe's
    // slots may each hold a large fragment: tens of MiB, not 256.
    assert!(sent < 96 << 20, "the remote wrote {sent} bytes to a client that reads nothing");
    assert!(pipes.ends() <= 4);
    let mut got = vec![0u8; sent];
    s.read_exact(&mut got).unwrap();
    let mut want = vec![0u8; sent];
    Pattern::new(4).fill(&mut want);
    assert!(got == want, "bytes changed on the way");
}

/// A session that ends while its pipe still holds bytes closes that pipe:
/// with one pipe for everyone, the next session's bytes arrive alone, not
/// after the old ones. Three ways to end with bytes in the pipe: the
/// client resets (its read fails first), the client half-closed and then
/// resets (the splice out fails first), and the idle timeout.
#[test]
fn a_pipe_holding_bytes_is_never_lent_again() {
    let (child, proxy) = spawn(&["--max-pipes", "1", "--idle-timeout", "500ms"]);
    let flood = serve("127.0.0.1:0", |mut s| {
        let _ = s.write_all(&vec![0xEE; 32 << 20]);
        // Held open until the proxy closes it.
        let _ = s.read(&mut [0u8; 1]);
    });
    let echo = echo_server("127.0.0.1:0");
    let base = descriptors(child.id()).0;
    for how in ["reset", "half-close, reset", "idle timeout"] {
        eventually("the last round's sessions are closed", || descriptors(child.id()).0 == base);
        let mut s = open(proxy, flood);
        // Read a while, so that the direction has gone over to the pipe
        // (it splices once a read has filled a buffer and that buffer has
        // drained), then stop: the pipe fills.
        let mut first = vec![0u8; 1 << 20];
        s.read_exact(&mut first).unwrap();
        if how == "half-close, reset" {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        if how == "idle timeout" {
            // Nothing moves: the proxy closes the session, its pipe full.
            eventually("the idle timeout closes the session", || descriptors(child.id()).0 == base);
        } else {
            // Close with unread bytes and SO_LINGER 0: a reset.
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(s);
        // Bulk both ways, so that each direction takes the one pipe: had
        // the old one been pooled with its bytes, they would come first.
        let mut s = open(proxy, echo);
        let mut w = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || send_pattern(&mut w, 11, 1 << 20));
        let got = sum_to_end(&mut s);
        assert_eq!(got, sender.join().unwrap(), "after {how}: stale bytes or lost ones");
    }
}
