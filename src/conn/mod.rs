//! One session's state machine:
//! `Handshake → (Resolving →) Connecting → Relaying`.
//!
//! Each state owns only what is valid in it, and a transition moves the
//! state (and its buffers) by value into the next one. A handler returns the
//! state to keep and a [`Flow`] saying what the loop should do next.

mod connect;
mod handshake;

use crate::buf::{Buf, Pool};
use crate::limits::Limits;
use crate::proto::{Addr, Reply, encode_reply};
use crate::relay::Relay;
use crate::resolver::Resolver;
use crate::rules::Rules;
use crate::timer::{Kind, Timers};
use crate::users::Users;
use mio::Registry;
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

pub(crate) use connect::Addrs;
use handshake::Handshake;

/// Readiness we were told of and have not yet used up. Events set bits; an
/// operation that answers `WouldBlock` clears its bit. Edge-triggered
/// events come once, so a bit stays set while the socket may still have
/// something for us, even when we stopped for want of buffer space.
///
/// Each read bit has a "hang-up" bit four places up: the peer's FIN (or an
/// error) is already queued, so a short read has not drained the socket.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ready(u8);

impl Ready {
    pub const CLIENT_R: u8 = 1;
    pub const CLIENT_W: u8 = 2;
    pub const UP_R: u8 = 4;
    pub const UP_W: u8 = 8;

    /// The bits an event sets, for the client socket or the upstream one.
    pub fn from_event(ev: &mio::event::Event, upstream: bool) -> u8 {
        let hup = ev.is_read_closed() || ev.is_error();
        let mut bits = 0;
        if ev.is_readable() || hup {
            bits |= Ready::CLIENT_R;
        }
        if hup {
            bits |= Ready::CLIENT_R << 4;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            bits |= Ready::CLIENT_W;
        }
        if upstream { bits << 2 } else { bits }
    }

    /// A read returned less than asked: the socket is drained, unless its
    /// EOF is still queued behind the data.
    pub fn short_read(&mut self, r_bit: u8) {
        if !self.has(r_bit << 4) {
            self.clear(r_bit);
        }
    }

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
    pub fn set(&mut self, bits: u8) {
        self.0 |= bits;
    }
    pub fn clear(&mut self, bits: u8) {
        self.0 &= !bits;
    }
}

/// What a state handler tells the driver.
pub(crate) enum Flow {
    /// The state changed; run the new one at once (its bytes may already be
    /// here: greeting and request in one packet raise one event).
    Continue,
    /// Nothing more to do until the next event.
    Wait,
    /// The work budget for this turn is spent with work left: run again
    /// after the other sessions have had theirs.
    Again,
    /// The session is over.
    Close(&'static str),
}

/// What the loop does after driving a session.
pub(crate) enum Step {
    Wait,
    Again,
    Close(&'static str),
}

/// The loop's resources a session may use while it is driven.
pub(crate) struct Ctx<'a> {
    pub registry: &'a Registry,
    pub pool: &'a mut Pool,
    pub timers: &'a mut Timers,
    pub resolver: Option<&'a Resolver>,
    pub now: Instant,
    pub key: usize,
    pub id: u32,
    /// Requests refused because the resolver queue was full (the loop warns).
    pub resolver_full: &'a mut u64,
    pub users: Option<&'a Users>,
    pub rules: &'a Rules,
    pub limits: &'a mut Limits,
}

/// The client side of a session: its socket and what we know of it.
pub(crate) struct Client {
    pub stream: TcpStream,
    pub ready: Ready,
    /// May use NO AUTHENTICATION although users are configured.
    pub exempt: bool,
    /// The logged-in user, for per-user limits (0: none).
    pub user: u32,
}

/// Client bytes that arrived after the request, waiting to go upstream.
pub(crate) struct Carry {
    pub buf: Buf,
    pub start: u32,
    pub end: u32,
}

pub(crate) enum State {
    Handshake(Handshake),
    /// Waiting for the resolver's answer.
    Resolving {
        carry: Carry,
    },
    Connecting(connect::Connecting),
    Relaying(Relay),
    Closed,
}

pub(crate) struct Conn {
    pub id: u32,
    /// Has a turn queued in the loop's deferred list.
    pub deferred: bool,
    pub client: Client,
    state: State,
}

impl Conn {
    pub(crate) fn new(id: u32, stream: TcpStream, exempt: bool, pool: &mut Pool) -> Conn {
        let state = State::Handshake(Handshake::new(pool.handshake()));
        let client = Client { stream, ready: Ready::default(), exempt, user: 0 };
        Conn { id, deferred: false, client, state }
    }

    /// Runs the state machine until it waits for an event.
    pub(crate) fn drive(&mut self, ctx: &mut Ctx<'_>) -> Step {
        loop {
            let (state, flow) = match std::mem::replace(&mut self.state, State::Closed) {
                State::Handshake(h) => h.step(&mut self.client, ctx),
                s @ State::Resolving { .. } => (s, Flow::Wait),
                State::Connecting(c) => c.step(&mut self.client, ctx),
                State::Relaying(mut r) => {
                    let flow = r.pump(&mut self.client.stream, &mut self.client.ready, ctx);
                    (State::Relaying(r), flow)
                }
                State::Closed => (State::Closed, Flow::Close("closed")),
            };
            self.state = state;
            match flow {
                Flow::Continue => continue,
                Flow::Wait => return Step::Wait,
                Flow::Again => return Step::Again,
                Flow::Close(why) => return Step::Close(why),
            }
        }
    }

    /// The resolver's answer for this session.
    pub(crate) fn resolved(&mut self, addrs: io::Result<Vec<SocketAddr>>, ctx: &mut Ctx<'_>) -> Step {
        let State::Resolving { carry } = std::mem::replace(&mut self.state, State::Closed) else {
            return Step::Wait;
        };
        let (state, flow) = match addrs {
            Ok(list) => connect::start(Addrs::list(list), carry, None, &mut self.client, ctx),
            Err(e) => (State::Resolving { carry }, Flow::Close(fail(&mut self.client.stream, Reply::from_io(&e)))),
        };
        self.state = state;
        match flow {
            Flow::Close(why) => Step::Close(why),
            _ => self.drive(ctx),
        }
    }

    /// A deadline armed for this session has passed.
    pub(crate) fn expired(&mut self, kind: Kind) -> Step {
        match (kind, &self.state) {
            (Kind::Connect, State::Resolving { .. } | State::Connecting(_)) => {
                let timed_out = io::Error::from(io::ErrorKind::TimedOut);
                Step::Close(fail(&mut self.client.stream, Reply::from_io(&timed_out)))
            }
            (Kind::Handshake, _) => Step::Close("handshake timeout"),
            (Kind::Idle, _) => Step::Close("idle timeout"),
            _ => Step::Wait,
        }
    }

    /// Gives the session's buffers back to the pool.
    pub(crate) fn recycle(self, pool: &mut Pool) {
        match self.state {
            State::Handshake(h) => pool.put(h.into_buf()),
            State::Resolving { carry, .. } => pool.put(carry.buf),
            State::Connecting(c) => pool.put(c.into_carry().buf),
            State::Relaying(r) => r.recycle(pool),
            State::Closed => {}
        }
    }
}

/// Writes a whole reply frame to the client. A reply is at most 22 bytes
/// and precedes any relayed data, so a short write means the client is
/// gone (its send buffer cannot be full of ours).
pub(crate) fn send(client: &mut TcpStream, frame: &[u8]) -> bool {
    matches!(client.write(frame), Ok(n) if n == frame.len())
}

/// Sends failure reply `rep` (BND 0.0.0.0:0) and closes. RFC 1928 §6: "the
/// SOCKS server MUST terminate the TCP connection shortly after sending the
/// reply". Returns why, for the close log.
pub(crate) fn fail(client: &mut TcpStream, rep: Reply) -> &'static str {
    let mut frame = [0u8; crate::proto::MAX_REPLY_LEN];
    let n = encode_reply(rep, &Addr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0, &mut frame);
    send(client, &frame[..n]);
    reject(client);
    match rep {
        Reply::ConnectionRefused => "connection refused",
        Reply::NetworkUnreachable => "network unreachable",
        Reply::HostUnreachable => "host unreachable",
        Reply::CommandNotSupported => "command not supported",
        Reply::AddrTypeNotSupported => "address type not supported",
        _ => "request failed",
    }
}

/// Prepares a refused client's socket for close: sends FIN, then discards
/// what the client already sent, because closing with unread input makes
/// the kernel send RST, which can destroy the answer before it is read.
pub(crate) fn reject(client: &mut TcpStream) {
    let _ = client.shutdown(Shutdown::Write);
    let mut sink = [0u8; 512];
    for _ in 0..16 {
        match client.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ready;

    #[test]
    fn short_read_clears_readiness_unless_eof_is_queued() {
        let mut r = Ready::default();
        r.set(Ready::CLIENT_R | Ready::UP_R);
        r.short_read(Ready::CLIENT_R);
        assert!(!r.has(Ready::CLIENT_R) && r.has(Ready::UP_R));
        r.set(Ready::UP_R << 4);
        r.short_read(Ready::UP_R);
        assert!(r.has(Ready::UP_R), "a queued FIN still needs a read");
    }
    /// Memory per connection is a design goal: the edge proxy holds tens of
    /// thousands of idle sessions, and this is most of what each costs us.
    #[test]
    fn session_stays_small() {
        // Debug builds of mio add a selector id to each of the two sockets.
        let socket_extra = std::mem::size_of::<mio::net::TcpStream>() - 4;
        let size = std::mem::size_of::<super::Conn>() - 2 * socket_extra;
        assert!(size <= 96, "Conn is {size} bytes in a release build");
    }
}
