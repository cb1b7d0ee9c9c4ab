//! BIND (RFC 1928 §4, §6): a listening socket for the session, two replies.
//!
//! The first reply names where the peer should connect: the local address
//! the client reached us on (or `--external-addr` behind NAT) and the
//! listener's port. The session then waits in [`Binding`] for one peer,
//! under its own deadline. RFC 1928 says DST.ADDR is used "in evaluating
//! the BIND request": a specific address admits only peers from it, and
//! `0.0.0.0` / `::` admits anyone. The second reply names the peer; then the
//! session relays exactly as a CONNECT does, the peer in the upstream's
//! place.

use super::{BindSettings, Carry, Client, Close, Ctx, Flow, Outcome, Ready, Recycle, State, answer, fail};
use crate::buf::{Io, Pool, read};
use crate::proto::Reply;
use crate::rules::canonical;
use crate::timer::Kind;
use crate::token::Role;
use mio::Interest;
use mio::net::{TcpListener, TcpStream};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Peers from the wrong address (or that the rules deny) a BIND turns away
/// before it fails with REP 0x02.
pub(crate) const MAX_WRONG_PEERS: u8 = 8;
/// The BIND listener's own backlog: one peer is awaited, a few wrong ones
/// may come first.
const BACKLOG: i32 = 8;

/// Waiting for the peer.
pub(crate) struct Binding {
    listener: TcpListener,
    /// Only a peer from this address is accepted (`None`: any peer).
    expect: Option<IpAddr>,
    /// What the client sends during the wait, forwarded after the second
    /// reply.
    carry: Carry,
    wrong: u8,
}

impl Recycle for Binding {
    fn recycle(self, pool: &mut Pool) {
        self.carry.recycle(pool);
    }
}

/// Opens the listener for a BIND whose DST is `dst` and sends the first
/// reply.
pub(crate) fn start(dst: SocketAddr, carry: Carry, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let dst_ip = canonical(dst.ip());
    let expect = (!dst_ip.is_unspecified()).then_some(dst_ip);
    // The rules decide whether a BIND for this DST.ADDR is allowed at all.
    if let Some(ip) = expect
        && !ctx.env.rules.dest_allowed(SocketAddr::new(ip, dst.port()))
    {
        log::debug!("#{} BIND for {dst} denied by rule", ctx.id);
        return fail(carry, Reply::NotAllowed, client, ctx);
    }
    if !ctx.env.third_fd_free() {
        log::debug!("#{} BIND refused: no descriptor left for a listener", ctx.id);
        return fail(carry, Reply::GeneralFailure, client, ctx);
    }
    let Some((local, advertised)) = addresses(dst_ip, &client.stream, &ctx.env.bind) else {
        log::debug!("#{} BIND for {dst}: no local address of that family to offer", ctx.id);
        return fail(carry, Reply::AddrTypeNotSupported, client, ctx);
    };
    let mut listener = match listen(local, &mut ctx.env.bind) {
        Ok(l) => l,
        Err(e) => {
            log::debug!("#{} BIND listener on {local}: {e}", ctx.id);
            return fail(carry, Reply::GeneralFailure, client, ctx);
        }
    };
    let port = match listener.local_addr() {
        Ok(a) => a.port(),
        Err(_) => return fail(carry, Reply::GeneralFailure, client, ctx),
    };
    if ctx.register(&mut listener, Role::BindListener, Interest::READABLE).is_err() {
        return fail(carry, Reply::GeneralFailure, client, ctx);
    }
    client.ready.reset_upstream();
    let binding = Binding { listener, expect, carry, wrong: 0 };
    // RFC 1928 §6: the first reply's BND.ADDR/BND.PORT are where the server
    // listens for the peer.
    if !answer(client, Outcome::Granted(SocketAddr::new(advertised, port))) {
        return (State::Binding(binding), Flow::Close(Close::ClientGone));
    }
    log::debug!("#{} BIND listening on {local}:{port} (advertised {advertised}) for {dst}", ctx.id);
    ctx.arm(Kind::Bind);
    (State::Binding(binding), Flow::Continue)
}

/// The address to listen on and the one to advertise, for a peer of
/// `dst`'s family: the interface the client reached us on when it is of
/// that family, else the one the routing table would use towards `dst`;
/// `--external-addr` of that family replaces the advertised one.
fn addresses(dst: IpAddr, control: &TcpStream, cfg: &BindSettings) -> Option<(IpAddr, IpAddr)> {
    let v6 = dst.is_ipv6();
    let unspecified = if v6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    let local = control
        .local_addr()
        .ok()
        .map(|a| canonical(a.ip()))
        .filter(|ip| ip.is_ipv6() == v6 && !ip.is_unspecified())
        .or_else(|| (!dst.is_unspecified()).then(|| route_to(dst)).flatten());
    match (cfg.external(v6), local) {
        (Some(ext), local) => Some((local.unwrap_or(unspecified), ext)),
        (None, Some(local)) => Some((local, local)),
        (None, None) => None,
    }
}

/// The local address the system would send from towards `dst` (a UDP
/// `connect` sends nothing; it only picks the route).
fn route_to(dst: IpAddr) -> Option<IpAddr> {
    let any = if dst.is_ipv6() { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    let s = std::net::UdpSocket::bind(SocketAddr::new(any, 0)).ok()?;
    s.connect(SocketAddr::new(dst, 9)).ok()?;
    s.local_addr().ok().map(|a| a.ip()).filter(|ip| !ip.is_unspecified())
}

/// A non-blocking listener on `ip`, on a port of the configured range
/// (searched from a rotating start) or one the system picks.
fn listen(ip: IpAddr, cfg: &mut BindSettings) -> io::Result<TcpListener> {
    super::in_range(cfg.ports, &mut cfg.cursor, |port| listen_on(SocketAddr::new(ip, port)))
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

impl Binding {
    pub(crate) fn step(mut self, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        if let Some(why) = self.hold_client_bytes(client) {
            return (State::Binding(self), Flow::Close(why));
        }
        while client.ready.has(Ready::UP_R) {
            match self.listener.accept() {
                Ok((peer, addr)) => {
                    if self.admits(addr, ctx) {
                        return self.accepted(peer, addr, client, ctx);
                    }
                    log::debug!("#{} BIND: turned away {addr}", ctx.id);
                    drop(peer);
                    self.wrong += 1;
                    if self.wrong >= MAX_WRONG_PEERS {
                        return fail(self, Reply::NotAllowed, client, ctx);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.ready.clear(Ready::UP_R),
                // An aborted connection concerns that peer only.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    log::debug!("#{} BIND accept: {e}", ctx.id);
                    return fail(self, Reply::GeneralFailure, client, ctx);
                }
            }
        }
        (State::Binding(self), Flow::Wait)
    }

    /// Reads what the client sends during the wait into the carry buffer,
    /// to be forwarded after the second reply. A client that closes leaves;
    /// one that sends more than the buffer holds is cut off.
    fn hold_client_bytes(&mut self, client: &mut Client) -> Option<Close> {
        let c = &mut self.carry;
        // Held bytes (pipelined after the request) go to the front, so the
        // room left is all at the end.
        c.buf.copy_within(c.start as usize..c.end as usize, 0);
        (c.start, c.end) = (0, c.end - c.start);
        while client.ready.has(Ready::CLIENT_R) {
            let full = c.end as usize == c.buf.len();
            let mut probe = [0u8; 1];
            let room: &mut [u8] = if full { &mut probe } else { &mut c.buf[c.end as usize..] };
            // Read until `WouldBlock`: no short-read shortcut on this rare
            // path (a client that sends while it waits for its peer).
            match read(&mut client.stream, room) {
                Io::Done(_) if full => return Some(Close::BindOverflow),
                Io::Done(n) => c.end += n as u32,
                Io::WouldBlock => client.ready.clear(Ready::CLIENT_R),
                Io::Eof => return Some(Close::ClientLeftBind),
                Io::Err(_) => return Some(Close::ClientError),
            }
        }
        None
    }

    /// The peer is from the address DST.ADDR named (any, for an unspecified
    /// one) and the destination rules allow it, as they would a CONNECT.
    fn admits(&self, peer: SocketAddr, ctx: &Ctx<'_>) -> bool {
        let from = canonical(peer.ip());
        self.expect.is_none_or(|ip| ip == from) && ctx.env.rules.dest_allowed(SocketAddr::new(from, peer.port()))
    }

    /// Closes the listener, sends the second reply and relays.
    fn accepted(self, mut peer: TcpStream, addr: SocketAddr, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        let Binding { listener, carry, .. } = self;
        drop(listener);
        let _ = peer.set_nodelay(true);
        if ctx.register(&mut peer, Role::Upstream, Interest::READABLE | Interest::WRITABLE).is_err() {
            return fail(carry, Reply::GeneralFailure, client, ctx);
        }
        // RFC 1928 §6: the second reply's BND.ADDR/BND.PORT are the peer's.
        ctx.replied(0);
        if let Some(r) = ctx.record() {
            r.connected = Some(addr);
        }
        let relay = super::Relay::new(peer, carry);
        if !answer(client, Outcome::Granted(SocketAddr::new(canonical(addr.ip()), addr.port()))) {
            relay.abort();
            return (State::Relaying(relay), Flow::Close(Close::ClientGone));
        }
        log::debug!("#{} BIND: peer {addr} connected", ctx.id);
        // The peer may have written already: look before any event says so.
        client.ready.reset_upstream();
        client.ready.set(Ready::UP_R | Ready::UP_W);
        ctx.arm(Kind::Idle);
        (State::Relaying(relay), Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::arrived;
    use super::*;

    /// Mutation (`recycle` made a no-op): a session closed while waiting for
    /// its peer gives the buffer of the bytes it holds back to the pool.
    #[test]
    fn a_closed_binding_gives_its_buffer_back() {
        let mut pool = Pool::new(4096);
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let carry = Carry { buf: pool.handshake(), start: 0, end: 0 };
        let binding = Binding { listener, expect: None, carry, wrong: 0 };
        binding.recycle(&mut pool);
        assert_eq!(pool.free(), (0, 1));
    }

    fn binding(expect: Option<IpAddr>, pool: &mut Pool) -> Binding {
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Binding { listener, expect, carry: Carry { buf: pool.handshake(), start: 0, end: 0 }, wrong: 0 }
    }

    /// A named DST.ADDR admits only peers from it; an unspecified one any
    /// peer; the destination rules apply to either.
    #[test]
    fn admits_the_named_peer_within_the_rules() {
        let mut env = super::super::tests::env();
        let poll = mio::Poll::new().unwrap();
        let peer = |ip: [u8; 4]| SocketAddr::from((ip, 4000));
        let named = binding(Some(IpAddr::from([127, 0, 0, 2])), &mut env.pool);
        let any = binding(None, &mut env.pool);
        {
            let ctx = super::super::tests::ctx(&poll, &mut env);
            assert!(named.admits(peer([127, 0, 0, 2]), &ctx));
            assert!(!named.admits(peer([127, 0, 0, 3]), &ctx));
            assert!(any.admits(peer([127, 0, 0, 3]), &ctx));
        }
        env.rules.deny_dest = vec!["127.0.0.2".parse().unwrap()];
        let ctx = super::super::tests::ctx(&poll, &mut env);
        assert!(!named.admits(peer([127, 0, 0, 2]), &ctx), "a denied peer is turned away even when named");
        assert!(!any.admits(peer([127, 0, 0, 2]), &ctx));
        assert!(any.admits(peer([127, 0, 0, 3]), &ctx));
    }

    /// The first reply's listener expects the peer DST.ADDR names, or any
    /// peer for an unspecified one.
    #[test]
    fn start_expects_the_named_peer_only() {
        let mut env = super::super::tests::env();
        for (dst, expect) in [("127.0.0.2:0", Some(IpAddr::from([127, 0, 0, 2]))), ("0.0.0.0:0", None)] {
            let mut poll = mio::Poll::new().unwrap();
            let (mut client, mut theirs) = super::super::tests::client();
            let mut ctx = super::super::tests::ctx(&poll, &mut env);
            let carry = Carry { buf: ctx.env.pool.handshake(), start: 0, end: 0 };
            let (state, flow) = start(dst.parse().unwrap(), carry, &mut client, &mut ctx);
            assert_eq!(flow, Flow::Continue);
            let State::Binding(b) = state else { panic!("{dst}: not binding") };
            assert_eq!(b.expect, expect, "{dst}");
            let mut reply = [0u8; 10];
            std::io::Read::read_exact(&mut theirs, &mut reply).unwrap();
            assert_eq!(reply[..4], [5, 0, 0, 1], "{dst}: the first reply grants");
            // The listener is registered as this session's: a peer
            // connecting raises its event.
            let port = u16::from_be_bytes([reply[8], reply[9]]);
            let _peer = std::net::TcpStream::connect((b.listener.local_addr().unwrap().ip(), port)).unwrap();
            let mut events = mio::Events::with_capacity(4);
            poll.poll(&mut events, Some(std::time::Duration::from_secs(5))).unwrap();
            let want = crate::token::session(0, 0, Role::BindListener);
            assert!(events.iter().any(|e| e.token() == want), "{dst}: no event for the listener");
            b.recycle(&mut env.pool);
        }
    }

    /// What the client sends while it waits is held behind what it
    /// pipelined; more than the buffer holds ends the session, and so does
    /// its EOF.
    #[test]
    fn client_bytes_are_held_until_the_buffer_overflows() {
        super::super::tests::within_5s(client_bytes_are_held_until_the_buffer_overflows_body);
    }

    fn client_bytes_are_held_until_the_buffer_overflows_body() {
        use std::io::Write;
        let mut pool = Pool::new(4096);
        let mut b = binding(None, &mut pool);
        let (mut client, mut theirs) = super::super::tests::client();
        // Two bytes pipelined after a three-byte request.
        b.carry.buf[..5].copy_from_slice(b"reqAB");
        (b.carry.start, b.carry.end) = (3, 5);
        theirs.write_all(b"CD").unwrap();
        arrived(&client.stream, 2);
        client.ready.set(Ready::CLIENT_R);
        assert_eq!(b.hold_client_bytes(&mut client), None);
        assert_eq!((b.carry.start, b.carry.end), (0, 4));
        assert_eq!(&b.carry.buf[..4], b"ABCD");
        assert!(!client.ready.has(Ready::CLIENT_R), "drained");
        // Exactly filling the buffer is allowed; one byte more is not.
        let room = b.carry.buf.len() - 4;
        theirs.write_all(&vec![7u8; room]).unwrap();
        arrived(&client.stream, room);
        client.ready.set(Ready::CLIENT_R);
        assert_eq!(b.hold_client_bytes(&mut client), None, "a full buffer is not an overflow");
        assert_eq!(b.carry.end as usize, b.carry.buf.len());
        theirs.write_all(b"!").unwrap();
        arrived(&client.stream, 1);
        client.ready.set(Ready::CLIENT_R);
        assert_eq!(b.hold_client_bytes(&mut client), Some(Close::BindOverflow));
        // A client that leaves while waiting.
        let mut b = binding(None, &mut pool);
        let (mut client, theirs) = super::super::tests::client();
        drop(theirs);
        arrived(&client.stream, 0);
        client.ready.set(Ready::CLIENT_R);
        assert_eq!(b.hold_client_bytes(&mut client), Some(Close::ClientLeftBind));
        b.recycle(&mut pool);
    }

    /// The peer's connection: the second reply names it, the session
    /// relays, and both of the peer's directions are tried at once (it may
    /// have written already).
    #[test]
    fn an_admitted_peer_gets_the_second_reply_and_the_relay() {
        super::super::tests::within_5s(an_admitted_peer_gets_the_second_reply_and_the_relay_body);
    }

    fn an_admitted_peer_gets_the_second_reply_and_the_relay_body() {
        use std::io::Read;
        let mut env = super::super::tests::env();
        let poll = mio::Poll::new().unwrap();
        let b = binding(None, &mut env.pool);
        let (mut client, mut theirs) = super::super::tests::client();
        let peer = std::net::TcpStream::connect(b.listener.local_addr().unwrap()).unwrap();
        let mut ctx = super::super::tests::ctx(&poll, &mut env);
        client.ready.set(Ready::UP_R);
        let (state, flow) = b.step(&mut client, &mut ctx);
        assert_eq!(flow, Flow::Continue);
        assert!(matches!(state, State::Relaying(_)), "the session relays");
        assert!(client.ready.has(Ready::UP_R) && client.ready.has(Ready::UP_W), "the peer's socket is tried at once");
        let mut reply = [0u8; 10];
        theirs.read_exact(&mut reply).unwrap();
        let port = peer.local_addr().unwrap().port().to_be_bytes();
        assert_eq!(reply, [5, 0, 0, 1, 127, 0, 0, 1, port[0], port[1]], "the second reply names the peer");
        state.recycle(&mut ctx.env.pool);
    }

    /// A listener that fails (`EINVAL`: shut down for reading) ends the
    /// BIND with a general failure; it is not taken for one peer's aborted
    /// connection, nor for an empty queue. (`EINVAL` so on Linux.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_failing_listener_fails_the_bind() {
        super::super::tests::within_5s(a_failing_listener_fails_the_bind_body);
    }

    fn a_failing_listener_fails_the_bind_body() {
        use std::io::Read;
        let mut env = super::super::tests::env();
        let poll = mio::Poll::new().unwrap();
        let b = binding(None, &mut env.pool);
        socket2::SockRef::from(&b.listener).shutdown(std::net::Shutdown::Read).unwrap();
        let (mut client, mut theirs) = super::super::tests::client();
        let mut ctx = super::super::tests::ctx(&poll, &mut env);
        client.ready.set(Ready::UP_R);
        let (state, _) = b.step(&mut client, &mut ctx);
        assert!(matches!(state, State::Lingering(_)), "the session ends");
        let mut reply = [0u8; 10];
        theirs.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..2], [5, 1], "general failure");
        state.recycle(&mut ctx.env.pool);
    }

    /// The listener's address: the control connection's own when the
    /// families match (DST.ADDR unspecified included), else the route's
    /// towards DST.ADDR; none for an unspecified DST.ADDR of the other
    /// family. `--external-addr` replaces the advertised one.
    #[test]
    fn addresses_follow_the_control_connection_or_the_route() {
        let none = BindSettings { enabled: true, ports: None, external: Vec::new(), cursor: 0 };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (v4, _t4) = super::super::tests::pair_via("127.0.0.2");
        assert_eq!(addresses(ip("127.0.0.9"), &v4, &none), Some((ip("127.0.0.2"), ip("127.0.0.2"))));
        assert_eq!(addresses(ip("0.0.0.0"), &v4, &none), Some((ip("127.0.0.2"), ip("127.0.0.2"))));
        assert_eq!(addresses(ip("::1"), &v4, &none), Some((ip("::1"), ip("::1"))), "IPv6 peer, IPv4 control");
        assert_eq!(addresses(ip("::"), &v4, &none), None, "no IPv6 address to offer");
        let ext = BindSettings { external: vec![ip("192.0.2.7")], ..none };
        assert_eq!(addresses(ip("127.0.0.9"), &v4, &ext), Some((ip("127.0.0.2"), ip("192.0.2.7"))));
    }
}
