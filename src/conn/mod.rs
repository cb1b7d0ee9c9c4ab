//! One session: its state machine, and what it may use of the loop.
//!
//! `Handshake → dial (Resolving → Connecting) → Relaying`, and `Lingering`
//! after an answer that ends the session. Each state owns only what is valid
//! in it, and a transition moves the state (and its buffers) by value into
//! the next one. A handler returns the state to keep and a [`Flow`] saying
//! what the driver should do next.
//!
//! This module never builds a token and never touches the loop's internals:
//! sockets are registered through [`Ctx::register`], time comes in as
//! `Ctx::now`.

#[cfg(feature = "bind")]
mod bind;
mod dial;
mod handshake;
mod linger;
mod relay;
#[cfg(feature = "udp")]
mod udp;

use crate::access::{Access, Record};
use crate::buf::{Buf, Pool};
use crate::limits::Limits;
#[cfg(feature = "http")]
use crate::proto::http_response;
use crate::proto::{Addr, MAX_REPLY_LEN, Reply, encode_reply, encode_socks4_reply};
use crate::resolver::Resolver;
use crate::rules::Rules;
use crate::shaping::Shaping;
use crate::stats::Stats;
use crate::timer::{Kind, Timers};
use crate::token::{self, Role};
use crate::users::Users;
use crate::warn::Warnings;
use mio::net::TcpStream;
use mio::{Interest, Registry};
use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

pub(crate) use dial::STAGGER;
pub(crate) use handshake::Dialects;
use handshake::{Handshake, Progress};
use linger::Lingering;
use relay::Relay;

/// Readiness we were told of and have not yet used up. Events set bits; an
/// operation that answers `WouldBlock` clears its bit. Edge-triggered
/// events come once, so a bit stays set while the socket may still have
/// something for us, even when we stopped for want of buffer space.
///
/// The client's socket has the `CLIENT_` bits; the session's other socket
/// (the upstream connection, and later BIND's listener or the UDP socket,
/// never two at once) has the `UP_` bits. Each read bit has a "hang-up" bit
/// four places up: the peer's FIN (or an error) is already queued, so a
/// short read has not drained the socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ready(u8);

impl Ready {
    pub const CLIENT_R: u8 = 1;
    pub const CLIENT_W: u8 = 2;
    pub const UP_R: u8 = 4;
    pub const UP_W: u8 = 8;
    const UP_HUP: u8 = Ready::UP_R << 4;
    /// UDP ASSOCIATE's socket facing remotes is readable (in the slot of
    /// the client's write hang-up bit, which nothing uses). Datagram
    /// sockets are read until `WouldBlock`: no short-read rule, no hang-up.
    pub const REMOTE_R: u8 = Ready::CLIENT_W << 4;
    /// A racing connect attempt is writable (connected or failed), in the
    /// slot of the upstream's write hang-up bit, which nothing uses.
    pub const RACER_W: u8 = Ready::UP_W << 4;

    /// The bits an event sets for a socket in `role`.
    pub fn from_event(ev: &mio::event::Event, role: Role) -> u8 {
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
        match role {
            Role::Client => bits,
            Role::Upstream | Role::BindListener | Role::Udp => bits << 2,
            Role::UdpRemote if bits & Ready::CLIENT_R != 0 => Ready::REMOTE_R,
            Role::UdpRemote => 0,
            Role::Racer if bits & Ready::CLIENT_W != 0 => Ready::RACER_W,
            Role::Racer => 0,
        }
    }

    /// A read returned less than asked: the socket is drained, unless its
    /// EOF is still queued behind the data.
    pub fn short_read(&mut self, r_bit: u8) {
        if !self.has(r_bit << 4) {
            self.clear(r_bit);
        }
    }

    /// Forgets everything known of the other socket: a new one replaces it.
    pub fn reset_upstream(&mut self) {
        self.clear(Ready::UP_R | Ready::UP_W | Ready::UP_HUP | Ready::RACER_W);
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

/// Why a session ended: a bounded set, for the log (and later for metrics
/// labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    HandshakeTimeout,
    IdleTimeout,
    /// EOF before the request was complete.
    ClientClosedEarly,
    /// A read error before the request was complete.
    ClientError,
    HandshakeTooLong,
    /// The first bytes are neither SOCKS5 nor HTTP.
    NotSocks,
    HttpOnSocksPort,
    BadGreeting,
    NoAcceptableMethod,
    BadAuth,
    LoginFailed,
    UserAtLimit,
    /// A request that cannot be answered (wrong version): closed unanswered.
    BadRequest,
    /// An answer could not be written: the client has gone.
    ClientGone,
    /// The failure reply with this code was sent.
    Failed(Reply),
    /// The destination stopped taking data; what it sent was delivered.
    UpstreamGone,
    /// Both directions finished.
    Done,
    /// The client sent more during a BIND wait than the buffer holds.
    BindOverflow,
    /// The client closed while its BIND waited for the peer.
    ClientLeftBind,
    /// A UDP association's control connection closed.
    ControlClosed,
    /// A UDP association without datagrams for `--udp-idle-timeout`.
    UdpIdle,
    /// The connect or BIND deadline passed (and the client was told).
    TimedOut,
    /// SOCKS4 while logins are required: it cannot carry a password.
    Socks4NeedsLogin,
    /// An HTTP request answered with this status and closed.
    Http(u16),
    /// `--proxy-protocol`: the connection did not start with a valid
    /// header.
    BadProxyHeader,
    /// `--proxy-protocol`: the address in the header is not an allowed
    /// client, or has its maximum of connections.
    ProxiedClientRefused,
}

impl Close {
    /// This reason's index in the metrics' `CLOSE_LABELS`.
    pub fn label(self) -> usize {
        match self {
            Close::HandshakeTimeout => 0,
            Close::IdleTimeout => 1,
            Close::ClientClosedEarly => 2,
            Close::ClientError => 3,
            Close::HandshakeTooLong => 4,
            Close::NotSocks => 5,
            Close::HttpOnSocksPort => 6,
            Close::BadGreeting => 7,
            Close::NoAcceptableMethod => 8,
            Close::BadAuth => 9,
            Close::LoginFailed => 10,
            Close::UserAtLimit => 11,
            Close::BadRequest => 12,
            Close::ClientGone => 13,
            Close::Failed(_) => 14,
            Close::UpstreamGone => 15,
            Close::Done => 16,
            Close::BindOverflow => 17,
            Close::ClientLeftBind => 18,
            Close::ControlClosed => 19,
            Close::UdpIdle => 20,
            Close::TimedOut => 21,
            Close::Socks4NeedsLogin => 22,
            Close::Http(_) => 23,
            Close::BadProxyHeader => 24,
            Close::ProxiedClientRefused => 25,
        }
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Close::HandshakeTimeout => "handshake timeout",
            Close::IdleTimeout => "idle timeout",
            Close::ClientClosedEarly => "client closed during the handshake",
            Close::ClientError => "client error during the handshake",
            Close::HandshakeTooLong => "handshake too long",
            Close::NotSocks => "not SOCKS5",
            Close::HttpOnSocksPort => "HTTP request on the SOCKS port",
            Close::BadGreeting => "bad greeting",
            Close::NoAcceptableMethod => "no acceptable method",
            Close::BadAuth => "bad username/password message",
            Close::LoginFailed => "login failed",
            Close::UserAtLimit => "user is at its session limit",
            Close::BadRequest => "bad request",
            Close::ClientGone => "client gone",
            Close::Failed(Reply::NotAllowed) => "denied by the rules (0x02)",
            Close::Failed(Reply::ConnectionRefused) => "connection refused (0x05)",
            Close::Failed(Reply::NetworkUnreachable) => "network unreachable (0x03)",
            Close::Failed(Reply::HostUnreachable) => "host unreachable (0x04)",
            Close::Failed(Reply::CommandNotSupported) => "command not supported (0x07)",
            Close::Failed(Reply::AddrTypeNotSupported) => "address type not supported (0x08)",
            Close::Failed(_) => "request failed (0x01)",
            Close::UpstreamGone => "destination stopped taking data",
            Close::Done => "done",
            Close::BindOverflow => "client sent too much during the BIND wait",
            Close::ClientLeftBind => "client left during the BIND wait",
            Close::ControlClosed => "UDP association's control connection closed",
            Close::UdpIdle => "UDP association idle",
            Close::TimedOut => "timed out",
            Close::Socks4NeedsLogin => "SOCKS4 refused: logins are required",
            Close::Http(400) => "HTTP 400: malformed request",
            Close::Http(405) => "HTTP 405: not CONNECT",
            Close::Http(407) => "HTTP 407: no or wrong credentials",
            Close::Http(429) => "HTTP 429: user at its session limit",
            Close::Http(431) => "HTTP 431: request head too large",
            Close::Http(_) => "HTTP error",
            Close::BadProxyHeader => "no valid PROXY protocol header",
            Close::ProxiedClientRefused => "the client in the PROXY header is refused",
        };
        f.write_str(s)
    }
}

/// What a state handler tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// The state changed; run the new one at once (its bytes may already be
    /// here: greeting and request in one packet raise one event).
    Continue,
    /// Nothing more to do until the next event.
    Wait,
    /// The work budget for this turn is spent with work left: run again
    /// after the other sessions have had theirs.
    Again,
    /// The session is over; the state returned with it still owns its
    /// buffers, which the loop gives back when it removes the session.
    Close(Close),
}

/// What the loop does after driving a session.
pub(crate) enum Step {
    Wait,
    Again,
    Close(Close),
}

/// What BIND needs from the configuration.
pub(crate) struct BindSettings {
    pub enabled: bool,
    pub ports: Option<(u16, u16)>,
    pub external: Vec<IpAddr>,
    /// Where the next search of the port range starts.
    pub cursor: u32,
}

impl BindSettings {
    pub(crate) fn external(&self, v6: bool) -> Option<IpAddr> {
        self.external.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }
}

/// Which client datagrams an association takes (`--udp-client-match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UdpMatch {
    /// From the control connection's client IP; the first valid datagram
    /// pins the port.
    #[default]
    Ip,
    /// As `Ip`, but a non-zero DST.PORT in the request pins the port at once.
    IpPort,
    /// From anywhere; the first valid datagram pins address and port.
    None,
}

/// What UDP ASSOCIATE needs from the configuration.
pub(crate) struct UdpSettings {
    pub enabled: bool,
    pub bind_addr: Option<IpAddr>,
    pub ports: Option<(u16, u16)>,
    pub client_match: UdpMatch,
    pub max: Option<usize>,
    pub cursor: u32,
    /// One datagram at a time, shared by every association: the largest
    /// UDP payload behind the longest header we write.
    pub scratch: Option<Buf>,
}

/// The source of upstream connections: an address per family and an
/// interface, each optional.
#[derive(Default)]
pub(crate) struct Outbound {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
    pub device: Option<Box<str>>,
}

impl Outbound {
    pub fn new(addrs: &[IpAddr], device: Option<&str>) -> Outbound {
        Outbound {
            v4: addrs.iter().copied().find(IpAddr::is_ipv4),
            v6: addrs.iter().copied().find(IpAddr::is_ipv6),
            device: device.map(Box::from),
        }
    }

    /// The source address for a connection to `to`, if one is set.
    pub fn source_for(&self, to: &std::net::SocketAddr) -> Option<IpAddr> {
        if to.is_ipv4() { self.v4 } else { self.v6 }
    }
}

/// The PROXY protocol's state: who may send a header, and the client
/// address each session's header gave (`None`: the connection's own).
pub(crate) struct Proxied {
    pub from: Vec<crate::rules::Cidr>,
    pub addrs: Vec<Option<SocketAddr>>,
}

impl Proxied {
    pub fn new(from: Vec<crate::rules::Cidr>) -> Proxied {
        Proxied { from, addrs: Vec::new() }
    }

    /// Whether a connection from `ip` may (and so must) send a header.
    pub fn trusted(&self, ip: IpAddr) -> bool {
        self.from.is_empty() || self.from.iter().any(|c| c.contains(ip))
    }

    pub fn set(&mut self, key: usize, addr: Option<SocketAddr>) {
        if self.addrs.len() <= key {
            self.addrs.resize(key + 1, None);
        }
        self.addrs[key] = addr;
    }

    pub fn get(&self, key: usize) -> Option<SocketAddr> {
        self.addrs.get(key).copied().flatten()
    }
}

/// What sessions share, owned by the loop and lent to one session at a time.
pub(crate) struct Env {
    pub pool: Pool,
    pub timers: Timers,
    pub resolver: Option<Resolver>,
    pub users: Option<Users>,
    pub rules: Rules,
    pub limits: Limits,
    pub warnings: Warnings,
    pub dialects: Dialects,
    pub bind: BindSettings,
    pub udp_cfg: UdpSettings,
    /// Where upstream connections leave from.
    pub outbound: Outbound,
    /// The access log's records, when it is on.
    pub access: Option<Access>,
    /// This loop's counters (for `--metrics-listen`).
    pub stats: Stats,
    /// With `--proxy-protocol`: who may send a header, and the client
    /// addresses headers gave, by slab key.
    pub proxied: Option<Proxied>,
    /// With `--rate-limit` or `--user-rate-limit`: the buckets.
    pub shaping: Option<Shaping>,
    /// Happy Eyeballs: when a connect has waited the stagger, the next
    /// address is tried beside it (its own timers, one kind).
    pub stagger: Timers,
    /// Which family a name's addresses are tried in first.
    pub prefer_ipv4: bool,
    /// Sessions open, and the limit (for BIND's descriptor budget).
    pub open: usize,
    pub max_conns: usize,
    /// Sessions holding a third descriptor: BIND waits, UDP associations.
    pub third_fd: usize,
    /// UDP associations open.
    pub udp: usize,
}

impl Env {
    /// Whether one more session may hold a third descriptor within the
    /// budget of two a session that `max_connections` stands for.
    pub fn third_fd_free(&self) -> bool {
        2 * self.open + self.third_fd < 2 * self.max_conns
    }
}

impl Ctx<'_> {
    /// This session's access-log record, when the log is on.
    pub fn record(&mut self) -> Option<&mut Record> {
        self.env.access.as_mut()?.get(self.key)
    }

    /// The client's address: what its PROXY header said, or its
    /// connection's peer.
    pub fn client_addr(&self, client: &Client) -> io::Result<SocketAddr> {
        match self.env.proxied.as_ref().and_then(|p| p.get(self.key)) {
            Some(addr) => Ok(addr),
            None => client.stream.peer_addr(),
        }
    }

    /// A reply with SOCKS5 code `code` (SOCKS4 and HTTP answers mapped)
    /// goes to the client: counted, and noted in the access log.
    pub fn replied(&mut self, code: u8) {
        self.env.stats.reply(code);
        if let Some(r) = self.record() {
            r.reply = Some(code);
        }
    }
}

/// The loop's resources, lent to the session being driven.
pub(crate) struct Ctx<'a> {
    pub registry: &'a Registry,
    pub env: &'a mut Env,
    pub now: Instant,
    pub key: usize,
    pub id: u32,
}

impl Ctx<'_> {
    /// Registers one of this session's sockets under its token for `role`.
    pub fn register(&self, source: &mut impl mio::event::Source, role: Role, interest: Interest) -> io::Result<()> {
        self.registry.register(source, token::session(self.key, self.id, role), interest)
    }

    /// Moves a socket to another of this session's roles.
    pub fn reregister(&self, source: &mut impl mio::event::Source, role: Role, interest: Interest) -> io::Result<()> {
        self.registry.reregister(source, token::session(self.key, self.id, role), interest)
    }

    /// Arms this session's deadline of `kind`, replacing any other.
    pub fn arm(&mut self, kind: Kind) {
        self.env.timers.set(self.key, kind, self.now);
    }
}

/// The client side of a session: its socket and what we know of it.
pub(crate) struct Client {
    pub stream: TcpStream,
    pub ready: Ready,
    /// May use NO AUTHENTICATION although users are configured.
    pub exempt: bool,
    /// The logged-in user, for per-user limits (0: none).
    pub user: u32,
    pub dialect: Dialect,
}

/// Formats a socket's peer address when (and only when) a log line that
/// names it is written.
pub(crate) struct Peer<'a>(pub &'a TcpStream);

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.peer_addr() {
            Ok(a) => write!(f, "{a}"),
            Err(_) => f.write_str("?"),
        }
    }
}

/// Client bytes that arrived after the request, waiting to go upstream.
pub(crate) struct Carry {
    pub buf: Buf,
    pub start: u32,
    pub end: u32,
}

/// Whatever owns pooled buffers gives them back through this, and only
/// through this: when the session closes ([`Conn::recycle`]) and when a
/// failing state turns into [`Lingering`].
pub(crate) trait Recycle {
    fn recycle(self, pool: &mut Pool);
}

impl Recycle for Carry {
    fn recycle(self, pool: &mut Pool) {
        pool.put(self.buf);
    }
}

pub(crate) enum State {
    Handshake(Handshake),
    /// Waiting for the resolver's answer.
    Resolving(dial::Resolving),
    Connecting(dial::Connecting),
    /// BIND, waiting for its peer.
    #[cfg(feature = "bind")]
    Binding(bind::Binding),
    /// A UDP association (boxed: it is larger than the other states, and
    /// rarer).
    #[cfg(feature = "udp")]
    Associated(Box<udp::Associated>),
    Relaying(Relay),
    /// Answered and finished: reading what the client still sends, so that
    /// closing does not reset the answer away.
    Lingering(Lingering),
    /// Only while a handler holds the real state; owns nothing.
    Taken,
}

impl Recycle for State {
    fn recycle(self, pool: &mut Pool) {
        match self {
            State::Handshake(h) => h.recycle(pool),
            State::Resolving(r) => r.recycle(pool),
            State::Connecting(c) => c.recycle(pool),
            #[cfg(feature = "bind")]
            State::Binding(b) => b.recycle(pool),
            #[cfg(feature = "udp")]
            State::Associated(a) => a.recycle(pool),
            State::Relaying(r) => r.recycle(pool),
            State::Lingering(_) | State::Taken => {}
        }
    }
}

pub(crate) struct Conn {
    pub id: u32,
    /// Has a turn queued in the loop's deferred list.
    pub deferred: bool,
    /// What the session is counted as in `Env::third_fd` and `Env::udp`.
    extra: Extra,
    pub client: Client,
    state: State,
}

impl Conn {
    /// `proxied`: the connection starts with a PROXY protocol header.
    pub(crate) fn new(id: u32, stream: TcpStream, exempt: bool, proxied: bool, pool: &mut Pool) -> Conn {
        let state = State::Handshake(Handshake::new(pool.handshake(), proxied));
        let client = Client { stream, ready: Ready::default(), exempt, user: 0, dialect: Dialect::Socks5 };
        Conn { id, deferred: false, extra: Extra::None, client, state }
    }

    /// Runs the state machine until it waits for an event.
    pub(crate) fn drive(&mut self, ctx: &mut Ctx<'_>) -> Step {
        loop {
            let client = &mut self.client;
            let (state, flow) = match std::mem::replace(&mut self.state, State::Taken) {
                State::Handshake(h) => match h.step(client, ctx) {
                    Progress::Stay(state, flow) => (state, flow),
                    Progress::Request(request) => dial::start(request, client, ctx),
                },
                s @ State::Resolving(_) => (s, Flow::Wait),
                State::Connecting(c) => c.step(client, ctx),
                #[cfg(feature = "bind")]
                State::Binding(b) => b.step(client, ctx),
                #[cfg(feature = "udp")]
                State::Associated(a) => a.step(client, ctx),
                State::Relaying(r) => r.step(client, ctx),
                State::Lingering(l) => l.step(client),
                State::Taken => {
                    debug_assert!(false, "a handler left no state behind");
                    (State::Taken, Flow::Close(Close::Done))
                }
            };
            self.state = state;
            self.count_extra(ctx.env);
            match flow {
                Flow::Continue => continue,
                Flow::Wait => return Step::Wait,
                Flow::Again => return Step::Again,
                Flow::Close(why) => return Step::Close(why),
            }
        }
    }

    /// The resolver's answer to this session's look-up. A session that is
    /// not waiting for one is left exactly as it was.
    pub(crate) fn resolved(&mut self, addrs: io::Result<Vec<SocketAddr>>, ctx: &mut Ctx<'_>) -> Step {
        let r = match std::mem::replace(&mut self.state, State::Taken) {
            State::Resolving(r) => r,
            other => {
                self.state = other;
                return Step::Wait;
            }
        };
        let (state, flow) = r.resolved(addrs, &mut self.client, ctx);
        self.state = state;
        self.count_extra(ctx.env);
        self.after(flow, ctx)
    }

    /// The resolver's answer to a UDP datagram's look-up; anything but an
    /// association is left as it was.
    pub(crate) fn udp_resolved(&mut self, addrs: io::Result<Vec<SocketAddr>>, ctx: &mut Ctx<'_>) -> Step {
        #[cfg(feature = "udp")]
        if let State::Associated(a) = &mut self.state {
            a.resolved(addrs, ctx);
        }
        #[cfg(not(feature = "udp"))]
        let _ = (addrs, ctx);
        Step::Wait
    }

    /// A deadline armed for this session has passed.
    /// The stagger passed while connecting: race the next address.
    pub(crate) fn staggered(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let c = match std::mem::replace(&mut self.state, State::Taken) {
            State::Connecting(c) => c,
            other => {
                self.state = other;
                return Step::Wait;
            }
        };
        let (state, flow) = c.stagger(ctx);
        self.state = state;
        self.after(flow, ctx)
    }

    pub(crate) fn expired(&mut self, kind: Kind, ctx: &mut Ctx<'_>) -> Step {
        match (kind, &self.state) {
            (Kind::Connect, State::Resolving(_) | State::Connecting(_)) => self.time_out(ctx),
            // A BIND whose peer never came: the host was unreachable as far
            // as the client can tell.
            #[cfg(feature = "bind")]
            (Kind::Bind, State::Binding(_)) => self.time_out(ctx),
            (Kind::Handshake, _) => Step::Close(Close::HandshakeTimeout),
            (Kind::Idle, _) => Step::Close(Close::IdleTimeout),
            (Kind::Linger, State::Lingering(l)) => Step::Close(l.why()),
            #[cfg(feature = "udp")]
            (Kind::UdpIdle, State::Associated(_)) => Step::Close(Close::UdpIdle),
            _ => Step::Wait,
        }
    }

    /// The connect or BIND deadline passed: answer it and linger.
    fn time_out(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let state = std::mem::replace(&mut self.state, State::Taken);
        let (state, flow) = refuse(state, Outcome::TimedOut, &mut self.client, ctx);
        self.state = state;
        self.count_extra(ctx.env);
        self.after(flow, ctx)
    }

    fn after(&mut self, flow: Flow, ctx: &mut Ctx<'_>) -> Step {
        match flow {
            Flow::Close(why) => Step::Close(why),
            Flow::Again => Step::Again,
            Flow::Wait | Flow::Continue => self.drive(ctx),
        }
    }

    /// Keeps `Env::third_fd` and `Env::udp` in step with the state.
    fn count_extra(&mut self, env: &mut Env) {
        let now = match self.state {
            #[cfg(feature = "bind")]
            State::Binding(_) => Extra::Bind,
            #[cfg(feature = "udp")]
            State::Associated(_) => Extra::Udp,
            _ => Extra::None,
        };
        if now != self.extra {
            self.extra.count(env, false);
            now.count(env, true);
            self.extra = now;
        }
    }

    /// Gives the session's buffers back to the pool (and its third
    /// descriptor back to the budget).
    pub(crate) fn recycle(self, env: &mut Env) {
        self.extra.count(env, false);
        self.state.recycle(&mut env.pool);
    }
}

/// A session's share of the budgets beyond its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    None,
    /// Waiting in BIND: a listener.
    Bind,
    /// A UDP association: its sockets.
    Udp,
}

impl Extra {
    fn count(self, env: &mut Env, add: bool) {
        let step = |n: &mut usize| if add { *n += 1 } else { *n -= 1 };
        match self {
            Extra::None => {}
            Extra::Bind => step(&mut env.third_fd),
            Extra::Udp => {
                step(&mut env.third_fd);
                step(&mut env.udp);
            }
        }
    }
}

/// Writes a whole answer to the client. An answer is at most a few hundred
/// bytes and precedes any relayed data, so a short write means the client
/// is gone (its send buffer cannot be full of ours).
pub(crate) fn send(client: &mut TcpStream, frame: &[u8]) -> bool {
    matches!(client.write(frame), Ok(n) if n == frame.len())
}

/// The protocol a session's client speaks, picked by its first byte.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    #[default]
    Socks5,
    /// SOCKS4 or SOCKS4a.
    Socks4,
    /// HTTP CONNECT.
    Http,
}

/// A request's outcome, as every dialect answers it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// Granted, with this address as BND: where we connected from, where
    /// BIND listens, the BIND peer, the UDP relay.
    Granted(SocketAddr),
    Failed(Reply),
    /// The connect or BIND deadline passed.
    TimedOut,
}

/// Writes `outcome` in the client's dialect: the one place a request is
/// answered. SOCKS5 gets its reply code (a timeout is `0x04`); SOCKS4 gets
/// 0x5A or, for every failure, 0x5B; HTTP gets 200, 403 for a rule's
/// denial, 504 for a timeout and 502 for the rest.
pub(crate) fn answer(client: &mut Client, outcome: Outcome) -> bool {
    let mut out = [0u8; MAX_REPLY_LEN];
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let frame: &[u8] = match (client.dialect, outcome) {
        (Dialect::Socks5, outcome) => {
            let (rep, bnd) = match outcome {
                Outcome::Granted(bnd) => (Reply::Succeeded, bnd),
                Outcome::Failed(rep) => (rep, unspecified),
                // RFC 1928 has no timeout code: to the client the host was
                // unreachable (0x06 "TTL expired" is about hop counts).
                Outcome::TimedOut => (Reply::HostUnreachable, unspecified),
            };
            let n = encode_reply(rep, &Addr::from(bnd.ip()), bnd.port(), &mut out);
            &out[..n]
        }
        (Dialect::Socks4, outcome) => {
            let bnd = match outcome {
                Outcome::Granted(bnd) => Some(bnd),
                _ => None,
            };
            let n = encode_socks4_reply(bnd.is_some(), bnd, &mut out);
            &out[..n]
        }
        #[cfg(feature = "http")]
        (Dialect::Http, Outcome::Granted(_)) => http_response(200),
        #[cfg(feature = "http")]
        (Dialect::Http, Outcome::Failed(Reply::NotAllowed)) => http_response(403),
        #[cfg(feature = "http")]
        (Dialect::Http, Outcome::TimedOut) => http_response(504),
        #[cfg(feature = "http")]
        (Dialect::Http, Outcome::Failed(_)) => http_response(502),
        #[cfg(not(feature = "http"))]
        (Dialect::Http, _) => &[],
    };
    send(&mut client.stream, frame)
}

/// Answers failure `rep` and lingers. RFC 1928 §6: "the SOCKS server MUST
/// terminate the TCP connection shortly after sending the reply".
pub(crate) fn fail(from: impl Recycle, rep: Reply, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    refuse(from, Outcome::Failed(rep), client, ctx)
}

/// Answers a failed `outcome` and lingers.
pub(crate) fn refuse(from: impl Recycle, outcome: Outcome, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let why = match outcome {
        Outcome::Failed(rep) => Close::Failed(rep),
        Outcome::TimedOut | Outcome::Granted(_) => Close::TimedOut,
    };
    ctx.replied(match outcome {
        Outcome::Failed(rep) => rep as u8,
        Outcome::TimedOut => Reply::HostUnreachable as u8,
        Outcome::Granted(_) => 0,
    });
    // A client that is gone makes the send fail, and the linger's first
    // read end the session.
    let why = if answer(client, outcome) { why } else { Close::ClientGone };
    linger(from, why, client, ctx)
}

/// After an answer that ends the session (a failure reply, a method
/// refusal, a failed login): gives back `from`'s buffers and lingers; `why`
/// is logged at the close.
pub(crate) fn linger(from: impl Recycle, why: Close, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    from.recycle(&mut ctx.env.pool);
    linger::start(why, client, ctx)
}

/// Ports tried in a port range before a listener or relay socket fails.
const MAX_PORT_TRIES: u32 = 256;

/// `open(port)` on a port of `range`, searched from `*cursor` (which moves
/// on, so successive searches spread over the range), at most
/// [`MAX_PORT_TRIES`] ports; port 0 (the system's pick) without a range.
pub(crate) fn in_range<T>(
    range: Option<(u16, u16)>,
    cursor: &mut u32,
    mut open: impl FnMut(u16) -> io::Result<T>,
) -> io::Result<T> {
    let Some((lo, hi)) = range else {
        return open(0);
    };
    let size = u32::from(hi - lo) + 1;
    let mut last = io::Error::from(io::ErrorKind::AddrInUse);
    for _ in 0..size.min(MAX_PORT_TRIES) {
        let port = lo + (*cursor % size) as u16;
        *cursor = cursor.wrapping_add(1);
        match open(port) {
            Ok(t) => return Ok(t),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn env() -> Env {
        let now = Instant::now();
        Env {
            pool: Pool::new(4096),
            timers: Timers::new(now, [None; crate::timer::KINDS]),
            resolver: None,
            users: None,
            rules: Rules::default(),
            limits: Limits::new(None, None),
            warnings: Warnings::default(),
            dialects: Dialects { socks4: true, http: true },
            bind: BindSettings { enabled: true, ports: None, external: Vec::new(), cursor: 0 },
            udp_cfg: UdpSettings {
                enabled: true,
                bind_addr: None,
                ports: None,
                client_match: UdpMatch::Ip,
                max: None,
                cursor: 0,
                scratch: None,
            },
            outbound: Outbound::default(),
            access: None,
            stats: Stats::default(),
            proxied: None,
            shaping: None,
            stagger: crate::timer::Timers::new(Instant::now(), [None; crate::timer::KINDS]),
            prefer_ipv4: false,
            open: 0,
            max_conns: 10,
            third_fd: 0,
            udp: 0,
        }
    }

    /// Runs `f` on a thread and fails if it has not returned within 5 s:
    /// a test of code that could loop for ever fails instead of hanging.
    pub(crate) fn within_5s(f: impl FnOnce() + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        match finished.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(()) => t.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(t.join().expect_err("the thread ended without finishing"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("still running after 5 s: a loop that never ends?")
            }
        }
    }

    /// A connection on loopback to a listener on `ip`: ours (non-blocking
    /// mio, as the loop holds it) and theirs (blocking, 10 s read timeout).
    pub(crate) fn pair_via(ip: &str) -> (TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        let theirs = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        theirs.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (TcpStream::from_std(ours), theirs)
    }

    pub(crate) fn pair() -> (TcpStream, std::net::TcpStream) {
        pair_via("127.0.0.1")
    }

    /// A session's client connection: ours and the client's end.
    pub(crate) fn client() -> (Client, std::net::TcpStream) {
        let (stream, theirs) = pair();
        (Client { stream, ready: Ready::default(), exempt: false, user: 0, dialect: Dialect::Socks5 }, theirs)
    }

    /// The context for driving session 0 (id 0) now.
    pub(crate) fn ctx<'a>(poll: &'a mio::Poll, env: &'a mut Env) -> Ctx<'a> {
        Ctx { registry: poll.registry(), env, now: Instant::now(), key: 0, id: 0 }
    }

    /// Waits (bounded: 5 s) until `ours` has `n` bytes queued to read, or
    /// (`n` 0) its EOF or a reset: what a peer sent has arrived. Nothing is
    /// taken, not even a reset's error (reported once, to the first read).
    pub(crate) fn arrived(ours: &TcpStream, n: usize) {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd { fd: ours.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one valid pollfd, for a descriptor we hold.
        assert_eq!(unsafe { libc::poll(&mut fd, 1, 5000) }, 1, "nothing arrived in 5 s");
        let end = Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = vec![0u8; n];
        while n > 0 && !matches!(ours.peek(&mut buf), Ok(k) if k >= n) {
            assert!(Instant::now() < end, "{n} bytes never arrived");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Mutation (a state's `recycle` made a no-op): a closed session gives
    /// its buffers back to the pool, in the handshake and when relaying.
    #[test]
    fn a_closed_session_gives_its_buffers_back() {
        let mut env = env();
        let (ours, _theirs) = pair();
        let conn = Conn::new(1, ours, false, false, &mut env.pool);
        assert_eq!(env.pool.free(), (0, 0));
        conn.recycle(&mut env);
        assert_eq!(env.pool.free(), (0, 1), "the handshake buffer");
        let (up, _peer) = pair();
        let carry = Carry { buf: env.pool.relay(), start: 0, end: 1 };
        State::Relaying(Relay::new(up, carry)).recycle(&mut env.pool);
        assert_eq!(env.pool.free().0, 1, "the relay buffer");
    }

    /// A port range is searched past ports in use, from a cursor that moves
    /// on; any other error ends the search at once.
    #[test]
    fn in_range_skips_ports_in_use_only() {
        let mut cursor = 0;
        let taken = |port: u16| if port < 1002 { Err(io::Error::from(io::ErrorKind::AddrInUse)) } else { Ok(port) };
        assert_eq!(in_range(Some((1000, 1003)), &mut cursor, taken).unwrap(), 1002);
        assert_eq!(cursor, 3, "the next search starts after the port found");
        let mut tries = 0;
        let denied = |_| -> io::Result<u16> {
            tries += 1;
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        };
        let e = in_range(Some((1000, 1003)), &mut cursor, denied).unwrap_err();
        assert_eq!((e.kind(), tries), (io::ErrorKind::PermissionDenied, 1));
        let all_taken = |_| -> io::Result<u16> { Err(io::Error::from(io::ErrorKind::AddrInUse)) };
        assert_eq!(in_range(Some((1000, 1003)), &mut cursor, all_taken).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        assert_eq!(in_range(None, &mut cursor, Ok).unwrap(), 0, "no range: the system's pick");
    }

    /// A third descriptor (BIND's listener, UDP's sockets) fits while the
    /// sessions' descriptors, two each plus the thirds, stay under two per
    /// session `max_connections` allows.
    #[test]
    fn a_third_descriptor_fits_within_two_per_allowed_session() {
        let mut env = env();
        for (open, third, max, free) in
            [(1, 0, 2, true), (1, 1, 2, true), (2, 0, 2, false), (2, 1, 2, false), (3, 0, 3, false)]
        {
            (env.open, env.third_fd, env.max_conns) = (open, third, max);
            assert_eq!(env.third_fd_free(), free, "{open} open, {third} with a third, max {max}");
        }
    }

    /// Regression: an answer that found its session in any state but
    /// Resolving replaced that state with nothing, destroying a live
    /// session. It must leave the session exactly as it was.
    #[test]
    fn an_answer_for_a_session_not_resolving_leaves_it_as_it_was() {
        let poll = mio::Poll::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let mut env = env();
        let mut conn = Conn::new(7, TcpStream::from_std(accepted), false, false, &mut env.pool);
        let mut ctx = Ctx { registry: poll.registry(), env: &mut env, now: Instant::now(), key: 0, id: 7 };
        let answer = Ok(vec![SocketAddr::from(([127, 0, 0, 1], 9))]);
        assert!(matches!(conn.resolved(answer, &mut ctx), Step::Wait));
        assert!(matches!(conn.state, State::Handshake(_)), "the handshake must go on");
        // And it does: a greeting still gets its answer.
        use std::io::Read;
        (&client).write_all(&[5, 1, 0]).unwrap();
        conn.client.ready.set(Ready::CLIENT_R | Ready::CLIENT_W);
        assert!(matches!(conn.drive(&mut ctx), Step::Wait));
        let mut m = [0u8; 2];
        (&client).read_exact(&mut m).unwrap();
        assert_eq!(m, [5, 0]);
    }

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

    /// Regression: moving to the next address kept the old socket's hang-up
    /// bit, so every later relay pass paid an extra `EAGAIN` read.
    #[test]
    fn reset_upstream_forgets_the_hang_up_bit_too() {
        let mut r = Ready::default();
        r.set(Ready::CLIENT_R | Ready::CLIENT_W | (Ready::CLIENT_R << 4));
        let client = r;
        r.set(Ready::UP_R | Ready::UP_W | (Ready::UP_R << 4));
        r.reset_upstream();
        assert_eq!(r, client, "only the client's bits are left");
        r.set(Ready::UP_R);
        r.short_read(Ready::UP_R);
        assert!(!r.has(Ready::UP_R), "a new socket's short read clears its bit");
    }

    /// Every close reason has its own metric label, named after it.
    #[test]
    fn close_reasons_have_distinct_labels() {
        use crate::stats::CLOSE_LABELS;
        let all = [
            (Close::HandshakeTimeout, "handshake_timeout"),
            (Close::IdleTimeout, "idle_timeout"),
            (Close::ClientClosedEarly, "client_closed_early"),
            (Close::ClientError, "client_error"),
            (Close::HandshakeTooLong, "handshake_too_long"),
            (Close::NotSocks, "not_socks"),
            (Close::HttpOnSocksPort, "http_on_socks_port"),
            (Close::BadGreeting, "bad_greeting"),
            (Close::NoAcceptableMethod, "no_acceptable_method"),
            (Close::BadAuth, "bad_auth"),
            (Close::LoginFailed, "login_failed"),
            (Close::UserAtLimit, "user_at_limit"),
            (Close::BadRequest, "bad_request"),
            (Close::ClientGone, "client_gone"),
            (Close::Failed(Reply::ConnectionRefused), "failed"),
            (Close::UpstreamGone, "upstream_gone"),
            (Close::Done, "done"),
            (Close::BindOverflow, "bind_overflow"),
            (Close::ClientLeftBind, "client_left_bind"),
            (Close::ControlClosed, "control_closed"),
            (Close::UdpIdle, "udp_idle"),
            (Close::TimedOut, "timed_out"),
            (Close::Socks4NeedsLogin, "socks4_needs_login"),
            (Close::Http(431), "http_error"),
            (Close::BadProxyHeader, "bad_proxy_header"),
            (Close::ProxiedClientRefused, "proxied_client_refused"),
        ];
        assert_eq!(all.len(), CLOSE_LABELS.len());
        for (why, label) in all {
            assert_eq!(CLOSE_LABELS[why.label()], label, "{why:?}");
        }
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
