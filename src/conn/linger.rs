//! After an answer that ends the session (a failure reply, `05 FF`, a failed
//! login, HTTP 400): the FIN is sent at once, then what the client still
//! sends is read and dropped until its EOF, for at most [`LINGER_BYTES`] or
//! [`crate::timer::LINGER`]. Closing a socket with unread input makes the
//! kernel send RST, which can destroy the answer before the client reads it;
//! and a client that pipelined its payload behind the request would see its
//! write fail before it ever reads the answer.

use super::{Client, Close, Ctx, Flow, Ready, State};
use crate::buf::{Io, read};
use crate::timer::Kind;
use std::net::Shutdown;

/// Bytes a lingering session reads and drops before it closes anyway.
pub(crate) const LINGER_BYTES: u32 = 1 << 20;
/// Reads per turn before yielding to other sessions.
const BUDGET: u32 = 16;

pub(crate) struct Lingering {
    why: Close,
    left: u32,
}

/// Sends the FIN after the answer already written, and starts lingering.
pub(super) fn start(why: Close, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    // A client that is already gone makes this fail; the reads below see it.
    let _ = client.stream.shutdown(Shutdown::Write);
    client.ready.reset_upstream();
    ctx.arm(Kind::Linger);
    (State::Lingering(Lingering { why, left: LINGER_BYTES }), Flow::Continue)
}

impl Lingering {
    pub(super) fn why(&self) -> Close {
        self.why
    }

    pub(super) fn step(mut self, client: &mut Client) -> (State, Flow) {
        let mut sink = [0u8; 4096];
        for _ in 0..BUDGET {
            if !client.ready.has(Ready::CLIENT_R) {
                return (State::Lingering(self), Flow::Wait);
            }
            // Read until `WouldBlock`: no short-read shortcut on this path
            // (a client that still sends after its answer is rare).
            let want = sink.len().min(self.left as usize);
            match read(&mut client.stream, &mut sink[..want]) {
                Io::Done(n) => {
                    self.left -= n as u32;
                    if self.left == 0 {
                        let why = self.why;
                        return (State::Lingering(self), Flow::Close(why));
                    }
                }
                Io::WouldBlock => client.ready.clear(Ready::CLIENT_R),
                Io::Eof | Io::Err(_) => {
                    let why = self.why;
                    return (State::Lingering(self), Flow::Close(why));
                }
            }
        }
        (State::Lingering(self), Flow::Again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lingering(left: u32) -> (Client, std::net::TcpStream, Lingering) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let stream = mio::net::TcpStream::from_std(ours);
        let client = Client { stream, ready: Ready::default(), exempt: false, user: 0, dialect: Default::default() };
        (client, peer, Lingering { why: Close::Done, left })
    }

    /// Reads what the client sends (draining it), and waits for more.
    #[test]
    fn reads_everything_there_and_waits() {
        let (mut client, mut peer, l) = lingering(LINGER_BYTES);
        peer.write_all(&[1u8; 10_000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        client.ready.set(Ready::CLIENT_R);
        let (state, flow) = l.step(&mut client);
        assert!(matches!(flow, Flow::Wait));
        let State::Lingering(l) = state else { panic!("still lingering") };
        assert_eq!(l.left, LINGER_BYTES - 10_000, "every byte there was read");
        assert!(!client.ready.has(Ready::CLIENT_R), "the socket was drained");
        // Not readable: nothing is read.
        peer.write_all(&[1u8; 100]).unwrap();
        let (state, flow) = l.step(&mut client);
        assert!(matches!(flow, Flow::Wait));
        let State::Lingering(l) = state else { panic!() };
        assert_eq!(l.left, LINGER_BYTES - 10_000);
    }

    /// At the byte bound the session ends, with the reason it lingered for.
    #[test]
    fn ends_at_the_bound_and_at_eof() {
        let (mut client, mut peer, l) = lingering(100);
        peer.write_all(&[1u8; 1000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        client.ready.set(Ready::CLIENT_R);
        let (state, flow) = l.step(&mut client);
        assert!(matches!(flow, Flow::Close(Close::Done)));
        let State::Lingering(l) = state else { panic!() };
        assert_eq!(l.left, 0, "read up to the bound, no further");

        let (mut client, peer, l) = lingering(LINGER_BYTES);
        drop(peer);
        std::thread::sleep(std::time::Duration::from_millis(50));
        client.ready.set(Ready::CLIENT_R);
        let (_, flow) = l.step(&mut client);
        assert!(matches!(flow, Flow::Close(Close::Done)), "the client's EOF ends it");
    }
}
