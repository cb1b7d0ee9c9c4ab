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
            let want = sink.len().min(self.left as usize);
            match read(&mut client.stream, &mut sink[..want]) {
                Io::Done(n) => {
                    if n < want {
                        client.ready.short_read(Ready::CLIENT_R);
                    }
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
