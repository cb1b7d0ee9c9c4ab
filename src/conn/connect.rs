//! The upstream connect: one non-blocking attempt at a time, in the order
//! the addresses came, until one completes or the connect deadline passes.

use super::{Carry, Ctx, Flow, Ready, State, fail, send};
use crate::proto::{Addr, MAX_REPLY_LEN, Reply, encode_reply};
use crate::relay::Relay;
use crate::server::{Role, token};
use crate::timer::Kind;
use mio::Interest;
use mio::net::TcpStream;
use std::io;
use std::net::SocketAddr;

/// Addresses still to try.
pub(crate) enum Addrs {
    /// An IP destination: no list to allocate.
    One(Option<SocketAddr>),
    /// A resolved name's addresses, in reverse (the next is last).
    List(Vec<SocketAddr>),
}

impl Addrs {
    pub(crate) fn one(addr: SocketAddr) -> Addrs {
        Addrs::One(Some(addr))
    }

    /// Addresses to try in the order given.
    pub(crate) fn list(mut addrs: Vec<SocketAddr>) -> Addrs {
        addrs.reverse();
        Addrs::List(addrs)
    }

    fn next(&mut self) -> Option<SocketAddr> {
        match self {
            Addrs::One(a) => a.take(),
            Addrs::List(list) => list.pop(),
        }
    }
}

pub(crate) struct Connecting {
    up: TcpStream,
    addrs: Addrs,
    carry: Carry,
}

impl Connecting {
    pub(crate) fn into_carry(self) -> Carry {
        self.carry
    }

    pub(crate) fn step(self, client: &mut TcpStream, ready: &mut Ready, ctx: &mut Ctx<'_>) -> (State, Flow) {
        if !ready.has(Ready::UP_W) {
            return (State::Connecting(self), Flow::Wait);
        }
        // mio: the connect is complete when the socket is writable, holds no
        // error, and has a peer.
        let done = match self.up.take_error() {
            Ok(None) => match self.up.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    ready.clear(Ready::UP_W);
                    return (State::Connecting(self), Flow::Wait);
                }
                Err(e) => Err(e),
            },
            Ok(Some(e)) | Err(e) => Err(e),
        };
        let Connecting { up, addrs, carry } = self;
        match done {
            Ok(()) => connected(up, carry, client, ctx),
            Err(e) => {
                log::debug!("#{} connect failed: {e}", ctx.key);
                drop(up);
                start(addrs, carry, Some(e), client, ready, ctx)
            }
        }
    }
}

/// Starts connecting to the next address; replies with the last error when
/// none is left.
pub(crate) fn start(
    mut addrs: Addrs,
    carry: Carry,
    mut last_err: Option<io::Error>,
    client: &mut TcpStream,
    ready: &mut Ready,
    ctx: &mut Ctx<'_>,
) -> (State, Flow) {
    while let Some(addr) = addrs.next() {
        let attempt = TcpStream::connect(addr).and_then(|mut up| {
            let tok = token(ctx.key, ctx.id, Role::Upstream);
            ctx.registry.register(&mut up, tok, Interest::READABLE | Interest::WRITABLE)?;
            Ok(up)
        });
        match attempt {
            Ok(up) => {
                log::debug!("#{} connecting to {addr}", ctx.key);
                ready.clear(Ready::UP_R | Ready::UP_W);
                return (State::Connecting(Connecting { up, addrs, carry }), Flow::Wait);
            }
            Err(e) => last_err = Some(e),
        }
    }
    ctx.pool.put(carry.buf);
    let err = last_err.unwrap_or_else(|| io::ErrorKind::NotFound.into());
    (State::Closed, Flow::Close(fail(client, Reply::from_io(&err))))
}

/// RFC 1928 §6: on success BND.ADDR/BND.PORT are the address the server
/// connected from.
fn connected(up: TcpStream, carry: Carry, client: &mut TcpStream, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let _ = up.set_nodelay(true);
    let Ok(bnd) = up.local_addr() else {
        ctx.pool.put(carry.buf);
        return (State::Closed, Flow::Close(fail(client, Reply::GeneralFailure)));
    };
    let mut frame = [0u8; MAX_REPLY_LEN];
    let n = encode_reply(Reply::Succeeded, &Addr::from(bnd.ip()), bnd.port(), &mut frame);
    if !send(client, &frame[..n]) {
        ctx.pool.put(carry.buf);
        return (State::Closed, Flow::Close("client gone before reply"));
    }
    log::debug!("#{} connected from {bnd}", ctx.key);
    ctx.timers.set(ctx.key, Kind::Idle, ctx.now);
    // The readiness bits are current: events kept setting them while we
    // waited. Relay at once: a payload may already be buffered.
    (State::Relaying(Relay::new(up, carry)), Flow::Continue)
}
