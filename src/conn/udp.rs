//! UDP ASSOCIATE (RFC 1928 §7): datagrams between the client and remotes,
//! each with the SOCKS UDP header on the client's side.
//!
//! An association has two UDP sockets: `near` faces the client (bound to the
//! address the control connection arrived on, or `--udp-bind-addr`; its
//! address is the reply's BND), `far` faces the remotes. A datagram's socket
//! says which side it came from, so a client and a remote that share an IP
//! address (always so on loopback, often behind one NAT) are never
//! confused, and a remote cannot pose as the client by sending to `near`
//! from the client's address. (One socket for both would have to tell them
//! apart by source address alone.)
//!
//! The association lives while its TCP control connection is open and
//! datagrams flow; it ends when the control connection closes or after
//! `--udp-idle-timeout` without datagrams. Datagrams pass through one loop-wide
//! scratch buffer; only a datagram waiting for its destination's name holds
//! a buffer of the association's own.

use super::{Carry, Client, Close, Ctx, Flow, Outcome, Ready, Recycle, State, UdpMatch, UdpSettings, answer, fail};
use crate::buf::{Buf, Io, Pool, read};
use crate::proto::{Addr, MAX_UDP_IP_HEADER_LEN, Reply, encode_udp_header, parse_udp_header, udp_header_len};
use crate::resolver::{Job, Purpose};
use crate::rules::canonical;
use crate::stats::Stat;
use crate::timer::Kind;
use crate::token::Role;
use crate::warn::Warn;
use mio::Interest;
use mio::net::UdpSocket;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

/// Datagrams handled per turn before the session yields.
const BUDGET: u32 = 64;
/// Names an association remembers.
const CACHE: usize = 4;
/// How long a remembered name's address is used.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// The scratch buffer: the largest datagram and room to put our header in
/// front of the largest payload a remote can send.
const SCRATCH: usize = MAX_UDP_IP_HEADER_LEN + 65_536;

pub(crate) struct Associated {
    near: UdpSocket,
    far: UdpSocket,
    /// `far` is an IPv6 socket (dual-stack): IPv4 remotes go as mapped.
    far_v6: bool,
    /// The control connection's client address, canonical.
    client_ip: IpAddr,
    /// Where client datagrams come from and replies go, once known.
    pinned: Option<SocketAddr>,
    /// A datagram waiting for its destination's name: the buffer, where the
    /// data is in it, the name and the port.
    pending: Option<Pending>,
    cache: [Option<Cached>; CACHE],
}

struct Pending {
    buf: Buf,
    data: (u32, u32),
    name: Box<str>,
    port: u16,
}

struct Cached {
    name: Box<str>,
    ip: IpAddr,
    until: Instant,
}

impl Recycle for Box<Associated> {
    fn recycle(self, pool: &mut Pool) {
        if let Some(p) = self.pending {
            pool.put(p.buf);
        }
    }
}

/// Sets up an association for a client whose request carried DST.PORT
/// `dst_port`, and replies with the address it should send to.
pub(crate) fn start(dst_port: u16, carry: Carry, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    // The client, as its PROXY header names it, if it came through a
    // balancer: its datagrams come straight from there.
    let peer = ctx.client_addr(client);
    let env = &mut *ctx.env;
    if env.udp_cfg.max.is_some_and(|max| env.udp >= max) {
        env.warnings.warn(Warn::Udp, ctx.now, format_args!("UDP association limit reached: a request refused"));
        return fail(carry, Reply::GeneralFailure, client, ctx);
    }
    if !env.third_fd_free() {
        log::debug!("#{} UDP ASSOCIATE refused: no descriptor left", ctx.id);
        return fail(carry, Reply::GeneralFailure, client, ctx);
    }
    let (Ok(local), Ok(peer)) = (client.stream.local_addr(), peer) else {
        return fail(carry, Reply::GeneralFailure, client, ctx);
    };
    let local_ip = canonical(local.ip());
    let near_ip = env.udp_cfg.bind_addr.unwrap_or(local_ip);
    let sockets = open_near(near_ip, &mut env.udp_cfg).and_then(|near| Ok((near, open_far()?)));
    let ((mut near, near_addr), (mut far, far_v6)) = match sockets {
        Ok(s) => s,
        Err(e) => {
            log::debug!("#{} UDP sockets on {near_ip}: {e}", ctx.id);
            return fail(carry, Reply::GeneralFailure, client, ctx);
        }
    };
    let registered = ctx.register(&mut near, Role::Udp, Interest::READABLE).is_ok()
        && ctx.register(&mut far, Role::UdpRemote, Interest::READABLE).is_ok();
    if !registered {
        return fail(carry, Reply::GeneralFailure, client, ctx);
    }
    // Never advertise an unspecified address: clients would send there.
    let shown = match near_addr.ip() {
        ip if ip.is_unspecified() => local_ip,
        ip => ip,
    };
    let advertised = ctx.env.bind.external(shown.is_ipv6()).unwrap_or(shown);
    let client_ip = canonical(peer.ip());
    let pinned = match ctx.env.udp_cfg.client_match {
        UdpMatch::IpPort if dst_port != 0 => Some(SocketAddr::new(client_ip, dst_port)),
        _ => None,
    };
    // Whatever came after the request on the control connection means
    // nothing to UDP ASSOCIATE.
    carry.recycle(&mut ctx.env.pool);
    let assoc = Box::new(Associated { near, far, far_v6, client_ip, pinned, pending: None, cache: Default::default() });
    ctx.replied(0);
    if !answer(client, Outcome::Granted(SocketAddr::new(advertised, near_addr.port()))) {
        return (State::Associated(assoc), Flow::Close(Close::ClientGone));
    }
    log::debug!("#{} UDP association on {near_addr} (advertised {advertised}:{})", ctx.id, near_addr.port());
    client.ready.reset_upstream();
    client.ready.clear(Ready::REMOTE_R);
    ctx.arm(Kind::UdpIdle);
    (State::Associated(assoc), Flow::Continue)
}

fn open_near(ip: IpAddr, cfg: &mut UdpSettings) -> io::Result<(UdpSocket, SocketAddr)> {
    let near = super::in_range(cfg.ports, &mut cfg.cursor, |port| UdpSocket::bind(SocketAddr::new(ip, port)))?;
    let addr = near.local_addr()?;
    Ok((near, addr))
}

/// The socket facing remotes: dual-stack IPv6 where the system has IPv6,
/// else IPv4 only.
fn open_far() -> io::Result<(UdpSocket, bool)> {
    use socket2::{Domain, Socket, Type};
    let dual = Socket::new(Domain::IPV6, Type::DGRAM, None).and_then(|s| {
        s.set_only_v6(false)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok(s)
    });
    match dual {
        Ok(s) => Ok((UdpSocket::from_std(s.into()), true)),
        Err(_) => Ok((UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?, false)),
    }
}

impl Associated {
    pub(crate) fn step(mut self: Box<Self>, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        let control = match watch_control(client) {
            Ok(flow) => flow,
            Err(why) => return (State::Associated(self), Flow::Close(why)),
        };
        let mut scratch = ctx.env.udp_cfg.scratch.take().unwrap_or_else(|| vec![0; SCRATCH].into_boxed_slice());
        let mut budget = BUDGET;
        let mut moved = false;
        // The client's datagrams first, then the remotes': each costs one
        // unit of the budget, so a flood on one association yields.
        while budget > 0 {
            let got = match next_datagram(&self.near, &mut scratch, &mut client.ready, Ready::UP_R) {
                Some(got) => got.map(|(n, from)| self.client_datagram(&mut scratch[..n], from, ctx)),
                None => {
                    match next_datagram(
                        &self.far,
                        &mut scratch[MAX_UDP_IP_HEADER_LEN..],
                        &mut client.ready,
                        Ready::REMOTE_R,
                    ) {
                        Some(got) => got.map(|(n, from)| {
                            self.remote_datagram(&mut scratch[..MAX_UDP_IP_HEADER_LEN + n], from, ctx)
                        }),
                        None => break,
                    }
                }
            };
            match got {
                Ok(true) => moved = true,
                Ok(false) => ctx.env.stats.inc(Stat::UdpDropped),
                Err(e) => log::debug!("#{} UDP receive: {e}", ctx.id),
            }
            budget -= 1;
        }
        ctx.env.udp_cfg.scratch = Some(scratch);
        // Only datagrams relayed count as activity: a stranger spraying the
        // ports must not keep the association alive.
        if moved {
            ctx.env.timers.touch(ctx.key, Kind::UdpIdle, ctx.now);
        }
        let flow = if budget == 0 { Flow::Again } else { control };
        (State::Associated(self), flow)
    }

    /// Whether a datagram from `from` is the client's, under the policy.
    fn is_client(&self, from: SocketAddr, policy: UdpMatch) -> bool {
        let from = SocketAddr::new(canonical(from.ip()), from.port());
        match (self.pinned, policy) {
            (Some(pinned), _) => pinned == from,
            (None, UdpMatch::None) => true,
            (None, UdpMatch::Ip | UdpMatch::IpPort) => from.ip() == self.client_ip,
        }
    }

    /// A client datagram: header off, data to its destination. True when
    /// it was the client's and went on (or waits for its name).
    fn client_datagram(&mut self, datagram: &mut [u8], from: SocketAddr, ctx: &mut Ctx<'_>) -> bool {
        if !self.is_client(from, ctx.env.udp_cfg.client_match) {
            log::trace!("#{} UDP: dropped a datagram from {from}, not the client", ctx.id);
            return false;
        }
        let Ok((header, at)) = parse_udp_header(datagram) else {
            log::trace!("#{} UDP: dropped a malformed datagram", ctx.id);
            return false;
        };
        // The first valid datagram pins the client's address.
        self.pinned.get_or_insert(SocketAddr::new(canonical(from.ip()), from.port()));
        if header.frag != 0 {
            log::trace!("#{} UDP: dropped a fragment", ctx.id);
            return false;
        }
        let port = header.port;
        let ip = match (header.addr.ip(), header.addr) {
            (Some(ip), _) => ip,
            (None, Addr::Domain(name)) => {
                let Ok(name) = std::str::from_utf8(name) else { return false };
                match self.cached(name, ctx.now) {
                    Some(ip) => ip,
                    None => return self.resolve(name, port, &datagram[at..], ctx),
                }
            }
            (None, _) => return false,
        };
        self.send_far(&datagram[at..], SocketAddr::new(ip, port), ctx)
    }

    /// Sends `data` to `to`, if the rules allow it; true when sent (and
    /// counted).
    fn send_far(&self, data: &[u8], to: SocketAddr, ctx: &mut Ctx<'_>) -> bool {
        let to = SocketAddr::new(canonical(to.ip()), to.port());
        if !ctx.env.rules.dest_allowed(to) {
            log::trace!("#{} UDP: {to} denied by rule", ctx.id);
            return false;
        }
        let to = match (to, self.far_v6) {
            (SocketAddr::V4(a), true) => SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0)),
            (SocketAddr::V6(_), false) => return false,
            (to, _) => to,
        };
        // A full send buffer drops the datagram, as the network may.
        match self.far.send_to(data, to) {
            Ok(n) => {
                counted(ctx, true, n);
                true
            }
            Err(e) => {
                log::trace!("#{} UDP to {to}: {e}", ctx.id);
                false
            }
        }
    }

    /// A remote's datagram (its data at `datagram[MAX_UDP_IP_HEADER_LEN..]`):
    /// our header goes right in front of it, and the whole to the client.
    /// True when it went to the client (and was counted).
    fn remote_datagram(&self, datagram: &mut [u8], from: SocketAddr, ctx: &mut Ctx<'_>) -> bool {
        let from = SocketAddr::new(canonical(from.ip()), from.port());
        let Some(client) = self.pinned else { return false };
        if !ctx.env.rules.dest_allowed(from) {
            log::trace!("#{} UDP: dropped a datagram from {from}, denied by rule", ctx.id);
            return false;
        }
        let start = MAX_UDP_IP_HEADER_LEN - udp_header_len(from);
        encode_udp_header(from, &mut datagram[start..MAX_UDP_IP_HEADER_LEN]);
        match self.near.send_to(&datagram[start..], client) {
            Ok(_) => {
                counted(ctx, false, datagram.len() - MAX_UDP_IP_HEADER_LEN);
                true
            }
            Err(e) => {
                log::trace!("#{} UDP to client {client}: {e}", ctx.id);
                false
            }
        }
    }

    fn cached(&self, name: &str, now: Instant) -> Option<IpAddr> {
        self.cache.iter().flatten().find(|c| &*c.name == name && now < c.until).map(|c| c.ip)
    }

    /// Holds the datagram and asks the resolver; with one already waiting
    /// (or no resolver, or a full queue) the datagram is dropped. True when
    /// held.
    fn resolve(&mut self, name: &str, port: u16, data: &[u8], ctx: &mut Ctx<'_>) -> bool {
        let Some(resolver) = &ctx.env.resolver else { return false };
        if self.pending.is_some() {
            log::trace!("#{} UDP: dropped a datagram for {name:?}: a look-up is under way", ctx.id);
            return false;
        }
        let job = Job { key: ctx.key, id: ctx.id, purpose: Purpose::Udp, host: name.to_owned(), port };
        if resolver.submit(job).is_err() {
            ctx.env.warnings.warn(Warn::Resolver, ctx.now, format_args!("resolver queue full: a request refused"));
            return false;
        }
        let mut buf = ctx.env.pool.udp();
        buf[..data.len()].copy_from_slice(data);
        self.pending = Some(Pending { buf, data: (0, data.len() as u32), name: name.into(), port });
        true
    }

    /// The resolver's answer for the waiting datagram: send it, remember the
    /// name.
    pub(crate) fn resolved(&mut self, addrs: io::Result<Vec<SocketAddr>>, ctx: &mut Ctx<'_>) {
        let Some(p) = self.pending.take() else { return };
        match addrs.ok().and_then(|a| a.first().copied()) {
            Some(addr) => {
                // An empty entry (None sorts first), else the one that
                // expires first.
                let slot = (0..CACHE).min_by_key(|&i| self.cache[i].as_ref().map(|c| c.until)).unwrap_or(0);
                self.cache[slot] = Some(Cached { name: p.name, ip: addr.ip(), until: ctx.now + CACHE_TTL });
                let data = &p.buf[p.data.0 as usize..p.data.1 as usize];
                if !self.send_far(data, SocketAddr::new(addr.ip(), p.port), ctx) {
                    ctx.env.stats.inc(Stat::UdpDropped);
                }
            }
            None => {
                log::trace!("#{} UDP: {:?} did not resolve; datagram dropped", ctx.id, p.name);
                ctx.env.stats.inc(Stat::UdpDropped);
            }
        }
        ctx.env.pool.put(p.buf);
    }
}

/// One datagram of `n` payload bytes relayed, `up` (client to remote) or
/// down: the metrics' counters and the access log's bytes.
fn counted(ctx: &mut Ctx<'_>, up: bool, n: usize) {
    let (datagrams, bytes) =
        if up { (Stat::UdpDatagramsUp, Stat::UdpBytesUp) } else { (Stat::UdpDatagramsDown, Stat::UdpBytesDown) };
    ctx.env.stats.inc(datagrams);
    ctx.env.stats.add(bytes, n as u64);
    if let Some(r) = ctx.record() {
        *if up { &mut r.up } else { &mut r.down } += n as u64;
    }
}

/// The control connection carries nothing after the reply; what comes is
/// read and dropped (at most a budget of reads per turn), and its end ends
/// the association.
fn watch_control(client: &mut Client) -> Result<Flow, Close> {
    let mut sink = [0u8; 512];
    for _ in 0..BUDGET {
        if !client.ready.has(Ready::CLIENT_R) {
            return Ok(Flow::Wait);
        }
        match read(&mut client.stream, &mut sink) {
            // No short-read shortcut: saving an `EAGAIN` read on a
            // connection that should carry nothing is not worth its code.
            Io::Done(_) => {}
            Io::WouldBlock => client.ready.clear(Ready::CLIENT_R),
            Io::Eof | Io::Err(_) => return Err(Close::ControlClosed),
        }
    }
    Ok(Flow::Again)
}

/// The next datagram on `socket` while its readiness `bit` is set: `None`
/// once it is drained (the bit cleared). An error (an ICMP error of an
/// earlier send, where the socket reports them) concerns one call only; it
/// is returned and costs the caller one unit of its budget.
fn next_datagram(
    socket: &UdpSocket,
    buf: &mut [u8],
    ready: &mut Ready,
    bit: u8,
) -> Option<io::Result<(usize, SocketAddr)>> {
    if !ready.has(bit) {
        return None;
    }
    match socket.recv_from(buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            ready.clear(bit);
            None
        }
        got => Some(got),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::UDP_BUF;

    /// Mutation (`recycle` made a no-op): an association closed while a
    /// datagram waits for its name gives that datagram's buffer back.
    #[test]
    fn a_closed_association_gives_a_waiting_datagrams_buffer_back() {
        // Relay buffers of UDP_BUF bytes share the UDP list, which `free`
        // reports as the relay's.
        let mut pool = Pool::new(UDP_BUF);
        let socket = || UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let pending = Pending { buf: pool.udp(), data: (0, 0), name: "a.test".into(), port: 9 };
        let assoc = Box::new(Associated {
            near: socket(),
            far: socket(),
            far_v6: false,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            pinned: None,
            pending: Some(pending),
            cache: Default::default(),
        });
        assert_eq!(pool.free(), (0, 0));
        assoc.recycle(&mut pool);
        assert_eq!(pool.free(), (1, 0));
    }

    /// An association on loopback, and the client's UDP socket, connected
    /// to the association's near side.
    fn association() -> (Box<Associated>, std::net::UdpSocket) {
        let near = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (far, far_v6) = open_far().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(near.local_addr().unwrap()).unwrap();
        let assoc = Box::new(Associated {
            near,
            far,
            far_v6,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            pinned: None,
            pending: None,
            cache: Default::default(),
        });
        (assoc, client)
    }

    /// Receives exactly `n` datagrams on `s` (waiting up to 2 s for each),
    /// then finds no more.
    fn receive_exactly(s: &std::net::UdpSocket, n: usize) {
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for i in 0..n {
            assert!(s.recv_from(&mut buf).is_ok(), "datagram {i} of {n} never came");
        }
        s.set_nonblocking(true).unwrap();
        assert!(s.recv_from(&mut buf).is_err(), "more than {n} datagrams");
        s.set_nonblocking(false).unwrap();
    }

    /// Mutation (the budget never spent, or spent past zero): a flood of
    /// client datagrams is relayed `BUDGET` a turn, and the session yields
    /// (`Again`) with the rest still queued; the next turn takes them and
    /// waits. Relayed datagrams push the idle deadline back.
    #[test]
    fn a_flood_of_datagrams_yields_after_its_budget() {
        let (assoc, client_udp) = association();
        let (mut client, _control) = super::super::tests::client();
        let dest = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = dest.local_addr().unwrap();
        let mut datagram = [0u8; 16];
        let at = encode_udp_header(to, &mut datagram);
        let flood = BUDGET as usize + 36;
        // Loopback queues a datagram at its receiver within the send.
        for _ in 0..flood {
            client_udp.send(&datagram[..at + 4]).unwrap();
        }
        let mut env = super::super::tests::env();
        let t0 = Instant::now();
        let idle = Duration::from_secs(10);
        env.timers = crate::timer::Timers::new(t0, [None, None, None, None, None, Some(idle)]);
        env.timers.set(0, Kind::UdpIdle, t0);
        let poll = mio::Poll::new().unwrap();
        let later = t0 + Duration::from_secs(5);
        let mut ctx = Ctx { registry: poll.registry(), env: &mut env, now: later, key: 0, id: 0 };
        client.ready.set(Ready::UP_R);
        let (state, flow) = assoc.step(&mut client, &mut ctx);
        assert_eq!(flow, Flow::Again, "a full budget yields");
        receive_exactly(&dest, BUDGET as usize);
        assert!(client.ready.has(Ready::UP_R), "the rest is still queued");
        let deadline = ctx.env.timers.next_deadline().unwrap();
        assert!(deadline >= later + idle - Duration::from_millis(1), "relaying pushed the idle deadline back");
        let State::Associated(assoc) = state else { panic!("the association goes on") };
        let (_, flow) = assoc.step(&mut client, &mut ctx);
        assert_eq!(flow, Flow::Wait, "drained: the session waits");
        receive_exactly(&dest, flood - BUDGET as usize);
        assert!(!client.ready.has(Ready::UP_R), "a drained socket's readiness is cleared");
    }

    /// A turn with nothing queued on either socket clears both readiness
    /// bits and waits (it must neither spin nor yield).
    #[test]
    fn nothing_queued_clears_readiness_and_waits() {
        let (assoc, _client_udp) = association();
        let (mut client, _control) = super::super::tests::client();
        let mut env = super::super::tests::env();
        let poll = mio::Poll::new().unwrap();
        let mut ctx = super::super::tests::ctx(&poll, &mut env);
        client.ready.set(Ready::UP_R | Ready::REMOTE_R);
        let (_, flow) = assoc.step(&mut client, &mut ctx);
        assert_eq!(flow, Flow::Wait);
        assert!(!client.ready.has(Ready::UP_R) && !client.ready.has(Ready::REMOTE_R));
    }

    /// A remembered name is used until, not at, its expiry.
    #[test]
    fn a_cached_name_expires_at_its_deadline() {
        let (mut assoc, _) = association();
        let until = Instant::now() + CACHE_TTL;
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        assoc.cache[0] = Some(Cached { name: "a.test".into(), ip, until });
        assert_eq!(assoc.cached("a.test", until - Duration::from_millis(1)), Some(ip));
        assert_eq!(assoc.cached("a.test", until), None);
        assert_eq!(assoc.cached("b.test", until - Duration::from_secs(1)), None);
    }
}
