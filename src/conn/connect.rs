//! The upstream connect: one non-blocking attempt at a time, in the order
//! the addresses came, until one completes or the connect deadline passes.

use super::{Carry, Client, Ctx, Flow, Ready, State, fail, send};
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

    pub(crate) fn step(self, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        if !client.ready.has(Ready::UP_W) {
            return (State::Connecting(self), Flow::Wait);
        }
        // mio: the connect is complete when the socket is writable, holds no
        // error, and has a peer.
        let done = match self.up.take_error() {
            Ok(None) => match self.up.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    client.ready.clear(Ready::UP_W);
                    return (State::Connecting(self), Flow::Wait);
                }
                Err(e) => Err(e),
            },
            Ok(Some(e)) | Err(e) => Err(e),
        };
        let Connecting { up, addrs, carry } = self;
        match done {
            Ok(()) => connected(up, carry, &mut client.stream, ctx),
            Err(e) => {
                log::debug!("#{} connect failed: {e}", ctx.key);
                drop(up);
                start(addrs, carry, Some(e), client, ctx)
            }
        }
    }
}

/// Marks addresses the rules deny, in place of a connect error.
#[derive(Debug)]
struct Denied;

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("denied by the destination rules")
    }
}

impl std::error::Error for Denied {}

/// Starts connecting to the next address the rules allow; when none is
/// left, replies with the last connect error, or REP 0x02 when every
/// address was denied (an address a rule denies is never connected to).
pub(crate) fn start(
    mut addrs: Addrs,
    carry: Carry,
    mut last_err: Option<io::Error>,
    client: &mut Client,
    ctx: &mut Ctx<'_>,
) -> (State, Flow) {
    while let Some(addr) = addrs.next() {
        if !ctx.rules.dest_allowed(addr) {
            log::debug!("#{} {addr} denied by rule", ctx.key);
            last_err.get_or_insert_with(|| io::Error::other(Denied));
            continue;
        }
        let attempt = TcpStream::connect(addr).and_then(|mut up| {
            let tok = token(ctx.key, ctx.id, Role::Upstream);
            ctx.registry.register(&mut up, tok, Interest::READABLE | Interest::WRITABLE)?;
            Ok(up)
        });
        match attempt {
            Ok(up) => {
                log::debug!("#{} connecting to {addr}", ctx.key);
                client.ready.clear(Ready::UP_R | Ready::UP_W);
                return (State::Connecting(Connecting { up, addrs, carry }), Flow::Wait);
            }
            Err(e) => last_err = Some(e),
        }
    }
    ctx.pool.put(carry.buf);
    let rep = match last_err {
        Some(e) if e.get_ref().is_some_and(|inner| inner.is::<Denied>()) => Reply::NotAllowed,
        Some(e) => Reply::from_io(&e),
        None => Reply::HostUnreachable,
    };
    (State::Closed, Flow::Close(fail(&mut client.stream, rep)))
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
