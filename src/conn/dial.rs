//! The dial step: everything between a parsed request and the relay. The
//! command branches here, in one place; for CONNECT, an IP destination is
//! connected to at once and a name goes to the resolver first; every
//! address is checked against the destination rules before it is tried, and
//! addresses are tried one at a time, in the order they came, until one
//! connects or the connect deadline passes.

use super::{Carry, Client, Close, Ctx, Dialect, Flow, Outbound, Outcome, Ready, Recycle, State, answer, fail};
use crate::buf::Pool;
use crate::proto::{Command, Reply};
use crate::resolver::{Job, Purpose};
use crate::stats::Stat;
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
    let dialect = client.dialect;
    ctx.env.stats.inc(match command {
        Command::Connect => Stat::CommandConnect,
        Command::Bind => Stat::CommandBind,
        Command::UdpAssociate => Stat::CommandUdp,
    });
    ctx.env.stats.inc(match dialect {
        Dialect::Socks5 => Stat::ProtocolSocks5,
        Dialect::Socks4 => Stat::ProtocolSocks4,
        Dialect::Http => Stat::ProtocolHttp,
    });
    if let Some(r) = ctx.record() {
        r.protocol = match dialect {
            Dialect::Socks5 => "socks5",
            Dialect::Socks4 => "socks4",
            Dialect::Http => "http",
        };
        r.command = match command {
            Command::Connect => "connect",
            Command::Bind => "bind",
            Command::UdpAssociate => "udp",
        };
        r.requested = Some(match &target {
            Target::Ip(addr) => addr.to_string().into(),
            Target::Name(host, port) => format!("{host}:{port}").into(),
            Target::Unresolvable => "(a name that is not UTF-8)".into(),
        });
    }
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
            Ok(list) => dial(self.command, Addrs::list(list, ctx.env.prefer_ipv4), self.carry, client, ctx),
            Err(e) => {
                log::debug!("#{} look-up failed: {e}", ctx.id);
                ctx.env.stats.inc(Stat::LookupFailures);
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

    /// A name's addresses in the order RFC 8305 tries them: the families
    /// interleaved, the preferred one first (IPv6 unless `prefer_ipv4`),
    /// each family in the resolver's order.
    fn list(addrs: Vec<SocketAddr>, prefer_ipv4: bool) -> Addrs {
        let (first, second): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv4() == prefer_ipv4);
        let mut order = Vec::with_capacity(first.len() + second.len());
        let (mut a, mut b) = (first.into_iter(), second.into_iter());
        loop {
            match (a.next(), b.next()) {
                (None, None) => break,
                (x, y) => order.extend(x.into_iter().chain(y)),
            }
        }
        order.reverse();
        Addrs::List(order)
    }

    fn next(&mut self) -> Option<SocketAddr> {
        match self {
            Addrs::One(a) => a.take(),
            Addrs::List(list) => list.pop(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Addrs::One(a) => a.is_none(),
            Addrs::List(list) => list.is_empty(),
        }
    }
}

/// A connect in progress: one attempt, and a second one racing it once
/// the first has taken longer than the stagger (RFC 8305, Happy
/// Eyeballs): the first to connect wins, the other is closed.
pub(crate) struct Connecting {
    up: TcpStream,
    racer: Option<TcpStream>,
    addrs: Addrs,
    carry: Carry,
}

/// How far a connect attempt has got.
enum Attempt {
    Connected,
    Pending,
    Failed(io::Error),
}

/// mio: the connect is complete when the socket is writable and has a
/// peer; without a peer it failed (its error says why) or is still under
/// way. Asking for the peer first costs a success one syscall.
fn attempt(s: &TcpStream) -> Attempt {
    match s.peer_addr() {
        Ok(_) => Attempt::Connected,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => match s.take_error() {
            Ok(Some(e)) | Err(e) => Attempt::Failed(e),
            Ok(None) => Attempt::Pending,
        },
        Err(e) => Attempt::Failed(e),
    }
}

/// How long a connect attempt runs alone before the next address joins
/// it (RFC 8305's recommended Connection Attempt Delay).
pub(crate) const STAGGER: std::time::Duration = std::time::Duration::from_millis(250);

impl Recycle for Connecting {
    fn recycle(self, pool: &mut Pool) {
        self.carry.recycle(pool);
    }
}

impl Connecting {
    pub(crate) fn step(mut self, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        if client.ready.has(Ready::UP_W) {
            match attempt(&self.up) {
                Attempt::Connected => return self.won(false, client, ctx),
                Attempt::Pending => client.ready.clear(Ready::UP_W),
                Attempt::Failed(e) => {
                    log::debug!("#{} connect failed: {e}", ctx.id);
                    match self.racer.take() {
                        // The racer carries on alone, in the first place.
                        Some(mut racer) => {
                            if ctx
                                .reregister(&mut racer, Role::Upstream, Interest::READABLE | Interest::WRITABLE)
                                .is_err()
                            {
                                return self.next(Last::Failed(e), client, ctx);
                            }
                            self.up = racer;
                            let was = client.ready.has(Ready::RACER_W);
                            client.ready.reset_upstream();
                            if was {
                                client.ready.set(Ready::UP_W);
                            }
                            return self.step(client, ctx);
                        }
                        None => return self.next(Last::Failed(e), client, ctx),
                    }
                }
            }
        }
        if client.ready.has(Ready::RACER_W)
            && let Some(racer) = &self.racer
        {
            match attempt(racer) {
                Attempt::Connected => return self.won(true, client, ctx),
                Attempt::Pending => client.ready.clear(Ready::RACER_W),
                Attempt::Failed(e) => {
                    log::debug!("#{} racing connect failed: {e}", ctx.id);
                    self.racer = None;
                    client.ready.clear(Ready::RACER_W);
                    // The next address may race at once.
                    return self.stagger(ctx);
                }
            }
        }
        (State::Connecting(self), Flow::Wait)
    }

    /// The stagger passed (or the racer failed): the next address the
    /// rules allow joins the attempt under way; the stagger is armed again
    /// while addresses are left.
    pub(crate) fn stagger(mut self, ctx: &mut Ctx<'_>) -> (State, Flow) {
        if self.racer.is_none() {
            while let Some(addr) = self.addrs.next() {
                if !ctx.env.rules.dest_allowed(addr) {
                    log::debug!("#{} {addr} denied by rule", ctx.id);
                    ctx.env.stats.inc(Stat::RuleDenials);
                    continue;
                }
                let opened = open_upstream(addr, &ctx.env.outbound).and_then(|mut s| {
                    ctx.register(&mut s, Role::Racer, Interest::WRITABLE)?;
                    Ok(s)
                });
                if let Ok(s) = opened {
                    log::debug!("#{} racing a connect to {addr}", ctx.id);
                    self.racer = Some(s);
                    break;
                }
            }
        }
        if !self.addrs.is_empty() {
            ctx.env.stagger.set(ctx.key, Kind::Idle, ctx.now);
        }
        (State::Connecting(self), Flow::Wait)
    }

    /// One attempt connected: the other is closed.
    fn won(self, racer_won: bool, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        ctx.env.stagger.cancel(ctx.key);
        let Connecting { up, racer, carry, .. } = self;
        let up = match (racer_won, racer) {
            (true, Some(mut racer)) => {
                drop(up);
                if ctx.reregister(&mut racer, Role::Upstream, Interest::READABLE | Interest::WRITABLE).is_err() {
                    return fail(carry, Reply::GeneralFailure, client, ctx);
                }
                client.ready.reset_upstream();
                client.ready.set(Ready::UP_W);
                racer
            }
            _ => up,
        };
        connected(up, carry, client, ctx)
    }

    /// The only attempt failed: on to the next address, or the answer.
    fn next(self, last: Last, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        ctx.env.stagger.cancel(ctx.key);
        let Connecting { up, addrs, carry, .. } = self;
        drop(up);
        connect(addrs, carry, last, client, ctx)
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
            ctx.env.stats.inc(Stat::RuleDenials);
            if let Last::Nothing = last {
                last = Last::Denied;
            }
            continue;
        }
        let attempt = open_upstream(addr, &ctx.env.outbound).and_then(|mut up| {
            ctx.register(&mut up, Role::Upstream, Interest::READABLE | Interest::WRITABLE)?;
            Ok(up)
        });
        match attempt {
            Ok(up) => {
                log::debug!("#{} connecting to {addr}", ctx.id);
                client.ready.reset_upstream();
                if !addrs.is_empty() {
                    ctx.env.stagger.set(ctx.key, Kind::Idle, ctx.now);
                }
                return (State::Connecting(Connecting { up, racer: None, addrs, carry }), Flow::Wait);
            }
            Err(e) => last = Last::Failed(e),
        }
    }
    fail(carry, last.reply(), client, ctx)
}

/// Starts a non-blocking connect to `addr`, from the configured source
/// address and interface when there are. The source is bound with
/// `IP_BIND_ADDRESS_NO_PORT`: the kernel picks the port at connect time,
/// per destination, so sessions to many destinations do not exhaust the
/// ephemeral range the way a bind to port 0 would.
fn open_upstream(addr: SocketAddr, out: &Outbound) -> io::Result<TcpStream> {
    let source = out.source_for(&addr);
    if source.is_none() && out.device.is_none() {
        return TcpStream::connect(addr);
    }
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(device) = &out.device {
        socket.bind_device(Some(device.as_bytes()))?;
    }
    if let Some(ip) = source {
        #[cfg(target_os = "linux")]
        crate::sys::bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// RFC 1928 §6: on success BND.ADDR/BND.PORT are the address the server
/// connected from.
fn connected(up: TcpStream, carry: Carry, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let _ = up.set_nodelay(true);
    let Ok(bnd) = up.local_addr() else {
        return fail(carry, Reply::GeneralFailure, client, ctx);
    };
    ctx.replied(0);
    if let Some(r) = ctx.record() {
        r.connected = up.peer_addr().ok();
    }
    let relay = super::Relay::new(up, carry);
    if !answer(client, Outcome::Granted(bnd)) {
        relay.abort();
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
        let connecting = Connecting { up, racer: None, addrs: Addrs::List(Vec::new()), carry: carry(&mut pool) };
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
        let connecting = Connecting { up, racer: None, addrs: Addrs::List(Vec::new()), carry };
        client.ready.set(Ready::UP_W);
        let (state, flow) = connecting.step(&mut client, &mut ctx);
        assert!(matches!(flow, Flow::Wait), "the session must not end");
        assert!(matches!(state, State::Connecting(_)), "still connecting");
        assert!(!client.ready.has(Ready::UP_W), "waiting for the next writable event");
    }

    /// A client gone by the time its success reply is written: the session
    /// ends, and the upstream, connected but sent nothing, gets a reset
    /// rather than a FIN that would read as an empty request.
    #[test]
    fn a_client_gone_at_the_reply_resets_the_upstream() {
        let mut env = env();
        let poll = mio::Poll::new().unwrap();
        let (mut client, theirs) = crate::conn::tests::client();
        socket2::SockRef::from(&theirs).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(theirs);
        crate::conn::tests::arrived(&client.stream, 0);
        let (up, mut up_peer) = crate::conn::tests::pair();
        let mut ctx = crate::conn::tests::ctx(&poll, &mut env);
        let carry = carry(&mut ctx.env.pool);
        let (state, flow) = connected(up, carry, &mut client, &mut ctx);
        assert_eq!(flow, Flow::Close(Close::ClientGone));
        state.recycle(&mut ctx.env.pool);
        up_peer.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let got = std::io::Read::read(&mut up_peer, &mut [0u8; 8]).map_err(|e| e.kind());
        assert_eq!(got, Err(std::io::ErrorKind::ConnectionReset));
    }

    /// The stagger is armed again only while addresses are left to race:
    /// with the list used up, no timer wakes the session for nothing.
    #[test]
    fn the_stagger_is_armed_only_while_addresses_are_left() {
        let mut env = env();
        let mut durations = [None; crate::timer::KINDS];
        durations[Kind::Idle as usize] = Some(STAGGER);
        env.stagger = crate::timer::Timers::new(Instant::now(), durations);
        let poll = mio::Poll::new().unwrap();
        // A listener that accepts nothing: the racing connect is only opened.
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = target.local_addr().unwrap();
        for (left, armed) in [(vec![], false), (vec![to], false), (vec![to, to], true)] {
            let (up, _peer) = crate::conn::tests::pair();
            let mut ctx = crate::conn::tests::ctx(&poll, &mut env);
            let connecting =
                Connecting { up, racer: None, addrs: Addrs::List(left.clone()), carry: carry(&mut ctx.env.pool) };
            let (state, _) = connecting.stagger(&mut ctx);
            assert_eq!(ctx.env.stagger.next_deadline().is_some(), armed, "{} addresses left before", left.len());
            ctx.env.stagger.cancel(0);
            state.recycle(&mut ctx.env.pool);
        }
        assert!(Addrs::One(None).is_empty() && !Addrs::One(Some(to)).is_empty());
    }
}
