//! Plain server configuration, independent of how it was obtained.

pub use crate::conn::UdpMatch;
use crate::resolver::Lookup;
use crate::rules::Rules;
use crate::users::Users;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Everything a [`crate::Server`] needs to know. `Config::default()` listens
/// on `127.0.0.1:1080`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on (port 0 picks a free port; see
    /// [`crate::Server::local_addrs`]).
    pub listen: Vec<SocketAddr>,
    /// From accept until the request is complete.
    pub handshake_timeout: Duration,
    /// From the request until the upstream connection is made, name
    /// resolution included.
    pub connect_timeout: Duration,
    /// A relaying session with no traffic in either direction for this long
    /// is closed. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// The listen backlog: connections the kernel completes and queues
    /// while the loop has not accepted them yet (in a burst, or while
    /// accepting is paused at `max_connections`). `None`: the system's cap,
    /// `net.core.somaxconn`. Listeners handed in through
    /// [`crate::Server::from_listener`] keep the backlog they were made with.
    pub backlog: Option<u32>,
    /// Independent loops, each on its own thread with its own listener
    /// (`SO_REUSEPORT`: the kernel spreads new connections between them),
    /// slab, timers and pools; `max_connections` and `max_pipes` are split
    /// between them, the per-client and per-user limits hold across them.
    /// The binary's default is one per CPU the process may use.
    pub workers: usize,
    /// Sessions held at once. `None`: derived from RLIMIT_NOFILE (two
    /// descriptors a session, less headroom and the pipes' share).
    pub max_connections: Option<usize>,
    /// Relay through kernel pipes with `splice(2)` (Linux; elsewhere this
    /// does nothing). A direction holds a pipe only while it has bytes in
    /// flight, and copies through a buffer when no pipe can be had.
    pub splice: bool,
    /// Pipes open at once, lent and free. `None`: an eighth of
    /// RLIMIT_NOFILE's descriptors (two a pipe).
    pub max_pipes: Option<usize>,
    /// Capacity asked of each pipe (`F_SETPIPE_SZ`, rounded up to pages);
    /// 0 keeps the kernel's default (64 KiB). The default, 256 KiB, was
    /// chosen by measurement (README: "Performance"); the kernel keeps its
    /// own size when it refuses this one (an unprivileged user beyond
    /// `fs.pipe-user-pages-soft`).
    pub pipe_size: usize,
    /// Bytes in each relay buffer. A direction holds one only while it has
    /// bytes in flight.
    pub buffer_size: usize,
    /// The most threads resolving domain names at once. They are started on
    /// demand (an idle server has none) and exit after 30 s without work.
    /// 0 disables name resolution: requests by name get REP 0x04 (IP
    /// literals still work).
    pub resolver_threads: usize,
    /// How the resolver threads look names up (default: getaddrinfo).
    pub lookup: Lookup,
    /// After shutdown is requested, open sessions get this long to finish.
    pub shutdown_grace: Duration,
    /// When set, clients must log in (RFC 1929) unless `rules.auth_exempt`
    /// covers them. Replace at run time with [`crate::Handle::set_users`].
    pub users: Option<Users>,
    /// Client and destination rules.
    pub rules: Rules,
    /// Sessions allowed at once from one client address.
    pub max_connections_per_client: Option<u32>,
    /// Answer BIND requests (RFC 1928 §4); `false`: REP 0x07.
    pub bind: bool,
    /// How long a BIND waits for its peer before REP 0x04.
    pub bind_timeout: Duration,
    /// Ports BIND listeners may use (inclusive); `None`: any the system
    /// picks.
    pub bind_ports: Option<(u16, u16)>,
    /// Addresses to advertise in BIND (and UDP ASSOCIATE) replies instead
    /// of the local one, when the server sits behind NAT: at most one per
    /// family.
    pub external_addrs: Vec<IpAddr>,
    /// Source addresses for upstream connections, at most one per family
    /// (a destination of the other family connects from the system's
    /// choice). Bound with `IP_BIND_ADDRESS_NO_PORT`, so the port is picked
    /// at connect time per destination and the ephemeral range is not used
    /// up by binds.
    pub outbound_addrs: Vec<IpAddr>,
    /// The network interface upstream connections leave by
    /// (`SO_BINDTODEVICE`, Linux; needs `CAP_NET_RAW`).
    pub outbound_interface: Option<String>,
    /// Every connection starts with a PROXY protocol header (v1 or v2)
    /// from a load balancer, whose source address then stands for the
    /// client: in the client rules, per-client limits, the access log and
    /// the UDP client check. A connection without a valid header is closed.
    pub proxy_protocol: bool,
    /// Who may send a PROXY header: connections from elsewhere are closed
    /// at accept. Empty: anyone (keep the port away from clients then).
    pub proxy_protocol_from: Vec<crate::rules::Cidr>,
    /// Bytes per second each direction of a session may read (a token
    /// bucket with a burst of an eighth of a second, at least 64 KiB).
    pub rate_limit: Option<u64>,
    /// Bytes per second each direction of all of a user's sessions may
    /// read together (per worker).
    pub user_rate_limit: Option<u64>,
    /// Try a name's IPv4 addresses before its IPv6 ones (RFC 8305 tries
    /// IPv6 first). The families are interleaved either way, and an
    /// attempt that takes longer than 250 ms is raced by the next.
    pub prefer_ipv4: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, from the
    /// first worker's loop.
    pub metrics_listen: Option<SocketAddr>,
    /// Log one line per finished session at info level (client, user,
    /// protocol and command, requested destination, the address connected,
    /// reply, bytes each way, duration, why it ended).
    pub access_log: bool,
    /// Sessions allowed at once for one user (needs `users`).
    pub max_connections_per_user: Option<u32>,
    /// Serve SOCKS4 and SOCKS4a on the same port (first byte 0x04);
    /// `false`: such clients are closed unanswered.
    pub socks4: bool,
    /// Serve HTTP CONNECT on the same port (first byte a letter); `false`:
    /// an HTTP request gets a 400 with a hint.
    pub http: bool,
    /// Answer UDP ASSOCIATE (RFC 1928 §7); `false`: REP 0x07.
    pub udp: bool,
    /// The address UDP relay sockets facing the client bind to. `None`:
    /// the address the client's control connection arrived on.
    pub udp_bind_addr: Option<IpAddr>,
    /// Ports the client-facing UDP sockets may use (inclusive).
    pub udp_ports: Option<(u16, u16)>,
    /// Which client datagrams an association takes.
    pub udp_client_match: UdpMatch,
    /// An association with no datagrams either way for this long ends.
    pub udp_idle_timeout: Duration,
    /// UDP associations held at once. `None`: no limit but the session
    /// limit.
    pub max_udp_associations: Option<usize>,
    /// After a turn that handled events, keep polling without sleeping for
    /// this long before the loop may sleep again (HAProxy's `busy-polling`,
    /// bounded): an idle CPU in a VM is slow to wake. Each spinning worker
    /// uses a whole core. None: always sleep. Positive and at most
    /// [`MAX_BUSY_POLL`].
    pub busy_poll: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1080))],
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: None,
            backlog: None,
            workers: 1,
            max_connections: None,
            splice: true,
            max_pipes: None,
            pipe_size: 256 * 1024,
            buffer_size: 16 * 1024,
            resolver_threads: 4,
            lookup: Lookup::system(),
            shutdown_grace: Duration::from_secs(5),
            users: None,
            rules: Rules::default(),
            max_connections_per_client: None,
            max_connections_per_user: None,
            bind: true,
            bind_timeout: Duration::from_secs(60),
            bind_ports: None,
            external_addrs: Vec::new(),
            outbound_addrs: Vec::new(),
            outbound_interface: None,
            access_log: false,
            metrics_listen: None,
            prefer_ipv4: false,
            rate_limit: None,
            user_rate_limit: None,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            socks4: true,
            http: true,
            udp: true,
            udp_bind_addr: None,
            udp_ports: None,
            udp_client_match: UdpMatch::Ip,
            udp_idle_timeout: Duration::from_secs(120),
            max_udp_associations: None,
            busy_poll: None,
        }
    }
}

/// The longest busy-polling window: past it, a loop that spins is a loop
/// that never sleeps.
pub const MAX_BUSY_POLL: Duration = Duration::from_secs(1);

/// Most workers: far beyond any core count that one process serves well.
pub const MAX_WORKERS: usize = 256;

/// Smallest relay buffer: below this, syscalls per byte cost more than the
/// memory saved.
pub const MIN_BUFFER_SIZE: usize = 1024;
/// Largest relay buffer: offsets are kept as `u32`.
pub const MAX_BUFFER_SIZE: usize = 16 * 1024 * 1024;

/// Longest accepted duration for any timeout or grace period. Deadlines are
/// instants computed by addition; bounding the durations keeps every sum
/// far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |s: &str| Err(ConfigError(s.to_string()));
        if self.listen.is_empty() {
            return err("no listen address");
        }
        if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&self.buffer_size) {
            return Err(ConfigError(format!(
                "buffer size {} is outside {MIN_BUFFER_SIZE}..={MAX_BUFFER_SIZE}",
                self.buffer_size
            )));
        }
        if self.pipe_size > MAX_BUFFER_SIZE {
            return Err(ConfigError(format!("pipe size {} is above {MAX_BUFFER_SIZE}", self.pipe_size)));
        }
        if self.backlog.is_some_and(|b| b == 0 || b > i32::MAX as u32) {
            return err("the backlog must be between 1 and 2147483647");
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(ConfigError(format!("workers must be between 1 and {MAX_WORKERS}")));
        }
        if self.max_connections == Some(0) {
            return err("max connections must be at least 1");
        }
        if self.handshake_timeout.is_zero() || self.connect_timeout.is_zero() {
            return err("handshake and connect timeouts must be positive");
        }
        let durations = [
            ("handshake timeout", Some(self.handshake_timeout)),
            ("connect timeout", Some(self.connect_timeout)),
            ("idle timeout", self.idle_timeout),
            ("shutdown grace", Some(self.shutdown_grace)),
            ("bind timeout", Some(self.bind_timeout)),
            ("UDP idle timeout", Some(self.udp_idle_timeout)),
        ];
        for (name, d) in durations {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(ConfigError(format!("{name} is longer than the limit of 8760h (one year)")));
            }
            // The timers count whole milliseconds (less would expire at
            // once); the grace is held to the same rule.
            if d.is_some_and(|d| !d.is_zero() && d < Duration::from_millis(1)) {
                return Err(ConfigError(format!("{name} is shorter than 1ms")));
            }
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return err("an idle timeout must be positive (None turns it off)");
        }
        if self.bind_timeout.is_zero() {
            return err("the bind timeout must be positive");
        }
        if self.bind_ports.is_some_and(|(lo, hi)| lo == 0 || lo > hi) {
            return err("a bind port range is LO-HI with 1 <= LO <= HI");
        }
        if self.udp_ports.is_some_and(|(lo, hi)| lo == 0 || lo > hi) {
            return err("a UDP port range is LO-HI with 1 <= LO <= HI");
        }
        if self.udp_idle_timeout.is_zero() {
            return err("the UDP idle timeout must be positive");
        }
        if self.busy_poll.is_some_and(|d| d.is_zero() || d > MAX_BUSY_POLL) {
            return Err(ConfigError(format!(
                "busy polling is positive (None turns it off) and at most {MAX_BUSY_POLL:?}"
            )));
        }
        if self.max_udp_associations == Some(0) {
            return err("max UDP associations must be at least 1 (use udp: false to turn UDP off)");
        }
        if self.udp_bind_addr.is_some_and(|ip| ip.is_multicast()) {
            return err("the UDP bind address cannot be multicast");
        }
        let (v4, v6) = self.external_addrs.iter().fold((0, 0), |(a, b), ip| match ip {
            IpAddr::V4(_) => (a + 1, b),
            IpAddr::V6(_) => (a, b + 1),
        });
        if v4 > 1 || v6 > 1 || self.external_addrs.iter().any(|ip| ip.is_unspecified() || ip.is_multicast()) {
            return err("external addresses: at most one IPv4 and one IPv6, neither unspecified nor multicast");
        }
        let (v4, v6) = self.outbound_addrs.iter().fold((0, 0), |(a, b), ip| match ip {
            IpAddr::V4(_) => (a + 1, b),
            IpAddr::V6(_) => (a, b + 1),
        });
        if v4 > 1 || v6 > 1 || self.outbound_addrs.iter().any(|ip| ip.is_multicast()) {
            return err("outbound addresses: at most one IPv4 and one IPv6, not multicast");
        }
        if self.outbound_interface.as_ref().is_some_and(|i| i.is_empty() || i.len() >= 16 || i.contains('\0')) {
            return err("an interface name is 1 to 15 bytes");
        }
        if self.rate_limit == Some(0) || self.user_rate_limit == Some(0) {
            return err("a rate limit must be at least 1 byte per second");
        }
        if self.user_rate_limit.is_some() && self.users.is_none() {
            return err("--user-rate-limit needs --users");
        }
        if !self.proxy_protocol && !self.proxy_protocol_from.is_empty() {
            return err("--proxy-protocol-from needs --proxy-protocol");
        }
        if self.resolver_threads > 64 {
            return err("at most 64 resolver threads");
        }
        if !cfg!(feature = "auth") && self.users.is_some() {
            return err("users need the auth feature, which this build leaves out");
        }
        if self.users.is_none() && !self.rules.auth_exempt.is_empty() {
            return err("auth-exempt ranges need users: without them nobody authenticates");
        }
        if self.users.is_none() && self.max_connections_per_user.is_some() {
            return err("a per-user connection limit needs users");
        }
        if self.max_connections_per_client == Some(0) || self.max_connections_per_user == Some(0) {
            return err("per-client and per-user limits must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_values_are_named() {
        assert_eq!(Config::default().validate(), Ok(()));
        let longest = Config {
            idle_timeout: Some(MAX_DURATION),
            shutdown_grace: MAX_DURATION,
            busy_poll: Some(MAX_BUSY_POLL),
            ..Config::default()
        };
        assert_eq!(longest.validate(), Ok(()));
        let ms = Duration::from_millis(1);
        let shortest = Config {
            handshake_timeout: ms,
            connect_timeout: ms,
            idle_timeout: Some(ms),
            bind_timeout: ms,
            udp_idle_timeout: ms,
            shutdown_grace: ms,
            busy_poll: Some(Duration::from_micros(1)),
            ..Config::default()
        };
        assert_eq!(shortest.validate(), Ok(()), "a millisecond is the shortest timeout");
        let bad = [
            Config { listen: vec![], ..Config::default() },
            Config { buffer_size: 100, ..Config::default() },
            Config { pipe_size: MAX_BUFFER_SIZE + 1, ..Config::default() },
            Config { workers: 0, ..Config::default() },
            Config { workers: MAX_WORKERS + 1, ..Config::default() },
            Config { max_connections: Some(0), ..Config::default() },
            Config { backlog: Some(0), ..Config::default() },
            Config { bind_timeout: Duration::ZERO, ..Config::default() },
            Config { bind_ports: Some((2000, 1000)), ..Config::default() },
            Config { bind_ports: Some((0, 1000)), ..Config::default() },
            Config { udp_ports: Some((5, 4)), ..Config::default() },
            Config { udp_idle_timeout: Duration::ZERO, ..Config::default() },
            Config { max_udp_associations: Some(0), ..Config::default() },
            Config { busy_poll: Some(MAX_BUSY_POLL + Duration::from_micros(1)), ..Config::default() },
            Config { busy_poll: Some(Duration::ZERO), ..Config::default() },
            Config { handshake_timeout: Duration::from_micros(999), ..Config::default() },
            Config { idle_timeout: Some(Duration::from_micros(500)), ..Config::default() },
            Config {
                external_addrs: vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()],
                ..Config::default()
            },
            Config { external_addrs: vec!["0.0.0.0".parse().unwrap()], ..Config::default() },
            Config {
                outbound_addrs: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
                ..Config::default()
            },
            Config { outbound_interface: Some("a-name-far-too-long".into()), ..Config::default() },
            Config { backlog: Some(u32::MAX), ..Config::default() },
            Config { connect_timeout: Duration::ZERO, ..Config::default() },
            Config { resolver_threads: 1000, ..Config::default() },
            Config { idle_timeout: Some(Duration::ZERO), ..Config::default() },
            Config { idle_timeout: Some(Duration::MAX), ..Config::default() },
            Config { shutdown_grace: MAX_DURATION + Duration::from_millis(1), ..Config::default() },
            Config { handshake_timeout: Duration::from_secs(u64::MAX), ..Config::default() },
            Config { max_connections_per_user: Some(2), ..Config::default() },
            Config { max_connections_per_client: Some(0), ..Config::default() },
            Config {
                rules: Rules { auth_exempt: vec!["127.0.0.1".parse().unwrap()], ..Rules::default() },
                ..Config::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
