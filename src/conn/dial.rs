//! The dial step: everything between a parsed request and the relay. The
//! command branches here, in one place; for CONNECT, an IP destination is
//! connected to at once and a name goes to the resolver first; every
//! address is checked against the destination rules before it is tried, and
//! addresses are tried one at a time, in the order they came, until one
//! connects or the connect deadline passes.

use super::{Carry, Client, Close, Ctx, Dialect, Flow, Outcome, Ready, Recycle, State, answer, fail};
use crate::buf::Pool;
use crate::proto::{Command, Reply};
use crate::resolver::{Job, Purpose};
use crate::timer::Kind;
use crate::token::Role;
use crate::warn::Warn;
use mio::Interest;
use mio::net::TcpStream;
use std::io;
use std::net::SocketAddr;

/// Where a request wants to go.
pub(crate) enum Target {
    Ip(SocketAddr),
    /// A name to resolve (never an IP literal: those are `Ip`).
    Name(String, u16),
    /// A name that cannot be looked up (not UTF-8).
    Unresolvable,
}

/// What the handshake hands on: the command, its target, and the client
/// bytes that came after the request.
pub(crate) struct Request {
    pub command: Command,
    pub target: Target,
    pub carry: Carry,
}

/// Branches on the command. The connect deadline covers resolving and
/// connecting.
pub(crate) fn start(request: Request, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let Request { command, target, carry } = request;
    match command {
        Command::Connect => {}
        #[cfg(feature = "bind")]
        Command::Bind if ctx.env.bind.enabled => {}
        // DST of UDP ASSOCIATE is the client's own address, at best (field
        // clients send 0.0.0.0:0 or their target): never resolved.
        #[cfg(feature = "udp")]
        Command::UdpAssociate if ctx.env.udp_cfg.enabled => {
            let port = match target {
                Target::Ip(addr) => addr.port(),
                Target::Name(_, port) => port,
                Target::Unresolvable => 0,
            };
            return super::udp::start(port, carry, client, ctx);
        }
        Command::Bind | Command::UdpAssociate => return fail(carry, Reply::CommandNotSupported, client, ctx),
    }
    ctx.arm(Kind::Connect);
    match target {
        Target::Ip(addr) => dial(command, Addrs::one(addr), carry, client, ctx),
        Target::Name(host, port) => resolve(command, host, port, carry, client, ctx),
        Target::Unresolvable => fail(carry, Reply::HostUnreachable, client, ctx),
    }
}

/// The command's next step once its target has addresses: CONNECT tries
/// them in turn; BIND listens for a peer from the first.
fn dial(command: Command, mut addrs: Addrs, carry: Carry, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    match command {
        // SOCKS4 can only name an IPv4 listener: a name's IPv4 address.
        #[cfg(feature = "bind")]
        Command::Bind => {
            match std::iter::from_fn(|| addrs.next()).find(|a| client.dialect != Dialect::Socks4 || a.is_ipv4()) {
                Some(dst) => super::bind::start(dst, carry, client, ctx),
                None => fail(carry, Reply::HostUnreachable, client, ctx),
            }
        }
        _ => connect(addrs, carry, Last::Nothing, client, ctx),
    }
}

/// Hands a name to the resolver; with no resolver threads no name can be
/// looked up.
fn resolve(
    command: Command,
    host: String,
    port: u16,
    carry: Carry,
    client: &mut Client,
    ctx: &mut Ctx<'_>,
) -> (State, Flow) {
    let Some(resolver) = &ctx.env.resolver else {
        return fail(carry, Reply::HostUnreachable, client, ctx);
    };
    log::debug!("#{} resolving {host:?}", ctx.id);
    match resolver.submit(Job { key: ctx.key, id: ctx.id, purpose: Purpose::Dial, host, port }) {
        Ok(()) => (State::Resolving(Resolving { command, carry }), Flow::Wait),
        Err(_) => {
            ctx.env.warnings.warn(Warn::Resolver, ctx.now, format_args!("resolver queue full: a request refused"));
            fail(carry, Reply::GeneralFailure, client, ctx)
        }
    }
}

/// Waiting for the resolver's answer.
pub(crate) struct Resolving {
    command: Command,
    carry: Carry,
}

impl Resolving {
    pub(crate) fn resolved(
        self,
        addrs: io::Result<Vec<SocketAddr>>,
        client: &mut Client,
        ctx: &mut Ctx<'_>,
    ) -> (State, Flow) {
        match addrs {
            Ok(list) => dial(self.command, Addrs::list(list), self.carry, client, ctx),
            Err(e) => {
                log::debug!("#{} look-up failed: {e}", ctx.id);
                fail(self.carry, Reply::from_io(&e), client, ctx)
            }
        }
    }
}

impl Recycle for Resolving {
    fn recycle(self, pool: &mut Pool) {
        self.carry.recycle(pool);
    }
}

/// Addresses still to try.
enum Addrs {
    /// An IP destination: no list to allocate.
    One(Option<SocketAddr>),
    /// A resolved name's addresses, in reverse (the next is last).
    List(Vec<SocketAddr>),
}

impl Addrs {
    fn one(addr: SocketAddr) -> Addrs {
        Addrs::One(Some(addr))
    }

    /// Addresses to try in the order given.
    fn list(mut addrs: Vec<SocketAddr>) -> Addrs {
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

/// A connect in progress.
pub(crate) struct Connecting {
    up: TcpStream,
    addrs: Addrs,
    carry: Carry,
}

impl Recycle for Connecting {
    fn recycle(self, pool: &mut Pool) {
        self.carry.recycle(pool);
    }
}

impl Connecting {
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
            Ok(()) => connected(up, carry, client, ctx),
            Err(e) => {
                log::debug!("#{} connect failed: {e}", ctx.id);
                drop(up);
                connect(addrs, carry, Last::Failed(e), client, ctx)
            }
        }
    }
}

/// Why the last address tried did not connect.
enum Last {
    /// None tried yet.
    Nothing,
    /// The destination rules deny it: never connected to.
    Denied,
    Failed(io::Error),
}

impl Last {
    /// The reply once no address is left: the last connect error, REP 0x02
    /// when every address was denied, 0x04 when there was none.
    fn reply(&self) -> Reply {
        match self {
            Last::Nothing => Reply::HostUnreachable,
            Last::Denied => Reply::NotAllowed,
            Last::Failed(e) => Reply::from_io(e),
        }
    }
}

/// Starts connecting to the next address the rules allow; when none is
/// left, replies as [`Last::reply`] says.
fn connect(mut addrs: Addrs, carry: Carry, mut last: Last, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    while let Some(addr) = addrs.next() {
        if !ctx.env.rules.dest_allowed(addr) {
            log::debug!("#{} {addr} denied by rule", ctx.id);
            if let Last::Nothing = last {
                last = Last::Denied;
            }
            continue;
        }
        let attempt = TcpStream::connect(addr).and_then(|mut up| {
            ctx.register(&mut up, Role::Upstream, Interest::READABLE | Interest::WRITABLE)?;
            Ok(up)
        });
        match attempt {
            Ok(up) => {
                log::debug!("#{} connecting to {addr}", ctx.id);
                client.ready.reset_upstream();
                return (State::Connecting(Connecting { up, addrs, carry }), Flow::Wait);
            }
            Err(e) => last = Last::Failed(e),
        }
    }
    fail(carry, last.reply(), client, ctx)
}

/// RFC 1928 §6: on success BND.ADDR/BND.PORT are the address the server
/// connected from.
fn connected(up: TcpStream, carry: Carry, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let _ = up.set_nodelay(true);
    let Ok(bnd) = up.local_addr() else {
        return fail(carry, Reply::GeneralFailure, client, ctx);
    };
    let relay = super::Relay::new(up, carry);
    if !answer(client, Outcome::Granted(bnd)) {
        return (State::Relaying(relay), Flow::Close(Close::ClientGone));
    }
    log::debug!("#{} connected from {bnd}", ctx.id);
    ctx.arm(Kind::Idle);
    // The readiness bits are current: events kept setting them while we
    // waited. Relay at once: a payload may already be buffered.
    (State::Relaying(relay), Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Dialect, tests::env};
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    fn carry(pool: &mut Pool) -> Carry {
        Carry { buf: pool.handshake(), start: 0, end: 0 }
    }

    /// Mutations (`recycle` made a no-op): a session closed while resolving
    /// or connecting gives its carried bytes' buffer back to the pool.
    #[test]
    fn resolving_and_connecting_give_their_buffer_back() {
        let mut pool = Pool::new(4096);
        let resolving = Resolving { command: Command::Connect, carry: carry(&mut pool) };
        resolving.recycle(&mut pool);
        assert_eq!(pool.free(), (0, 1));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let connecting = Connecting { up, addrs: Addrs::List(Vec::new()), carry: carry(&mut pool) };
        connecting.recycle(&mut pool);
        assert_eq!(pool.free(), (0, 1), "the same buffer, taken and given back");
    }

    /// Mutation (the `NotConnected` guard made false, or `==` made `!=`): a
    /// writable event before the connect completes (mio: events are hints)
    /// failed the connect. The connect must go on waiting.
    #[test]
    fn writable_before_the_connect_completes_waits() {
        // A target whose connects stay pending: its backlog of 0 is full,
        // so the kernel drops further SYNs.
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen(2) on a valid, owned descriptor.
        unsafe { libc::listen(target.as_raw_fd(), 0) };
        let addr = target.local_addr().unwrap();
        let timeout = std::time::Duration::from_millis(100);
        let _fill: Vec<_> = (0..4).filter_map(|_| std::net::TcpStream::connect_timeout(&addr, timeout).ok()).collect();

        let poll = mio::Poll::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let mut env = env();
        let stream = TcpStream::from_std(accepted);
        let mut client = Client { stream, ready: Ready::default(), exempt: false, user: 0, dialect: Dialect::Socks5 };
        let mut ctx = Ctx { registry: poll.registry(), env: &mut env, now: Instant::now(), key: 0, id: 1 };
        let up = TcpStream::connect(addr).unwrap();
        assert!(up.take_error().unwrap().is_none());
        let carry = carry(&mut ctx.env.pool);
        let connecting = Connecting { up, addrs: Addrs::List(Vec::new()), carry };
        client.ready.set(Ready::UP_W);
        let (state, flow) = connecting.step(&mut client, &mut ctx);
        assert!(matches!(flow, Flow::Wait), "the session must not end");
        assert!(matches!(state, State::Connecting(_)), "still connecting");
        assert!(!client.ready.has(Ready::UP_W), "waiting for the next writable event");
    }
}
