//! Command line → [`Config`].

use clap::Parser;
use slabsocks::Config;
use slabsocks::rules::{Cidr, DestRule, Rules};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A SOCKS5 proxy server: one poll loop, fixed relay buffers.
#[derive(Parser, Debug)]
#[command(name = "slabsocks", version, about)]
pub struct Cli {
    /// Address to listen on; repeat for several (IPv6 as [::1]:1080).
    #[arg(
        long = "listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:1080",
        env = "SLABSOCKS_LISTEN",
        value_delimiter = ','
    )]
    pub listen: Vec<SocketAddr>,
    /// Time allowed from connect until the request is complete.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration, env = "SLABSOCKS_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Duration,
    /// Time allowed to resolve and connect to the destination.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration, env = "SLABSOCKS_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,
    /// Close relaying sessions idle this long ("off" or 0: never).
    #[arg(long, value_name = "DURATION", default_value = "off", value_parser = duration, env = "SLABSOCKS_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,
    /// Listen backlog: connections queued in the kernel until accepted [default: net.core.somaxconn].
    #[arg(long, value_name = "N", env = "SLABSOCKS_BACKLOG")]
    pub backlog: Option<u32>,
    /// Independent loops, each with its own SO_REUSEPORT listener [default: one per CPU the process may use].
    #[arg(long, value_name = "N", env = "SLABSOCKS_WORKERS")]
    pub workers: Option<usize>,
    /// Sessions held at once [default: from the open-file limit, 2 per session, after the pipes' share].
    #[arg(long, value_name = "N", env = "SLABSOCKS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Relay by copying through buffers only, never splice(2) through pipes.
    #[arg(long, env = "SLABSOCKS_NO_SPLICE")]
    pub no_splice: bool,
    /// Pipes open at once for splicing [default: an eighth of the open-file limit, 2 per pipe].
    #[arg(long, value_name = "N", env = "SLABSOCKS_MAX_PIPES")]
    pub max_pipes: Option<usize>,
    /// Capacity asked of each pipe (suffixes k, m; 0: the kernel's 64k).
    #[arg(long, value_name = "BYTES", default_value = "256k", value_parser = size, env = "SLABSOCKS_PIPE_SIZE")]
    pub pipe_size: usize,
    /// Bytes per relay buffer (suffixes k, m: 16k).
    #[arg(long, value_name = "BYTES", default_value = "16k", value_parser = size, env = "SLABSOCKS_BUFFER_SIZE")]
    pub buffer_size: usize,
    /// Most threads resolving domain names, started on demand (0: refuse
    /// requests by name).
    #[arg(long, value_name = "N", default_value_t = 4, env = "SLABSOCKS_RESOLVER_THREADS")]
    pub resolver_threads: usize,
    /// On SIGINT/SIGTERM, time open sessions get to finish.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration, env = "SLABSOCKS_SHUTDOWN_GRACE")]
    pub shutdown_grace: Duration,
    /// off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", env = "SLABSOCKS_LOG_LEVEL")]
    pub log_level: log::LevelFilter,
    /// Require username/password login; one name:password per line (SIGHUP reloads).
    #[arg(long, value_name = "FILE", env = "SLABSOCKS_USERS")]
    pub users: Option<PathBuf>,
    /// Clients in this range may skip login (repeatable; needs --users).
    #[arg(long, value_name = "CIDR", env = "SLABSOCKS_AUTH_EXEMPT", value_delimiter = ',')]
    pub auth_exempt: Vec<Cidr>,
    /// Serve only clients in these ranges (repeatable).
    #[arg(long, value_name = "CIDR", env = "SLABSOCKS_ALLOW_CLIENT", value_delimiter = ',')]
    pub allow_client: Vec<Cidr>,
    /// Allow only destinations matching a rule like 10.0.0.0/8:443 (repeatable).
    #[arg(long, value_name = "CIDR[:PORTS]", env = "SLABSOCKS_ALLOW_DEST", value_delimiter = ',')]
    pub allow_dest: Vec<DestRule>,
    /// Deny destinations matching a rule like 192.0.2.0/24:8000-8999 (repeatable; wins over allow).
    #[arg(long, value_name = "CIDR[:PORTS]", env = "SLABSOCKS_DENY_DEST", value_delimiter = ',')]
    pub deny_dest: Vec<DestRule>,
    /// Deny loopback, private, CGNAT, link-local, unique-local, multicast and unspecified destinations.
    #[arg(long, env = "SLABSOCKS_DENY_PRIVATE_DEST")]
    pub deny_private_dest: bool,
    /// Sessions allowed at once from one client address.
    #[arg(long, value_name = "N", env = "SLABSOCKS_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<u32>,
    /// Sessions allowed at once for one user.
    #[arg(long, value_name = "N", env = "SLABSOCKS_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<u32>,
    /// Answer BIND with 0x07 (command not supported).
    #[arg(long, env = "SLABSOCKS_DISABLE_BIND")]
    pub disable_bind: bool,
    /// Time a BIND waits for its peer before replying 0x04.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration, env = "SLABSOCKS_BIND_TIMEOUT")]
    pub bind_timeout: Duration,
    /// Ports BIND listeners may use, like 40000-40999 (for a firewall).
    #[arg(long, value_name = "LO-HI", value_parser = port_range, env = "SLABSOCKS_BIND_PORT_RANGE")]
    pub bind_port_range: Option<(u16, u16)>,
    /// Address to advertise in BIND and UDP replies when behind NAT (repeatable: one IPv4, one IPv6).
    #[arg(long = "external-addr", value_name = "ADDR", env = "SLABSOCKS_EXTERNAL_ADDR", value_delimiter = ',')]
    pub external_addrs: Vec<std::net::IpAddr>,
    /// Source address of upstream connections (repeatable: one IPv4, one IPv6).
    #[arg(long = "outbound-addr", value_name = "ADDR", env = "SLABSOCKS_OUTBOUND_ADDR", value_delimiter = ',')]
    pub outbound_addrs: Vec<std::net::IpAddr>,
    /// Network interface upstream connections leave by (SO_BINDTODEVICE; needs CAP_NET_RAW).
    #[arg(long, value_name = "IFACE", env = "SLABSOCKS_OUTBOUND_INTERFACE")]
    pub outbound_interface: Option<String>,
    /// Expect a PROXY protocol header (v1 or v2) first on every connection, from a load balancer.
    #[arg(long, env = "SLABSOCKS_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
    /// Only these may send a PROXY header; others are closed at accept (repeatable).
    #[arg(long, value_name = "CIDR", env = "SLABSOCKS_PROXY_PROTOCOL_FROM", value_delimiter = ',')]
    pub proxy_protocol_from: Vec<Cidr>,
    /// Bytes per second each direction of a session may move (suffixes k, m: 16m).
    #[arg(long, value_name = "RATE", env = "SLABSOCKS_RATE_LIMIT", value_parser = size)]
    pub rate_limit: Option<usize>,
    /// Bytes per second each direction of all of a user's sessions may move together, per worker (needs --users).
    #[arg(long, value_name = "RATE", env = "SLABSOCKS_USER_RATE_LIMIT", value_parser = size)]
    pub user_rate_limit: Option<usize>,
    /// Try a name's IPv4 addresses first (Happy Eyeballs still races the families).
    #[arg(long, env = "SLABSOCKS_PREFER_IPV4", conflicts_with = "prefer_ipv6")]
    pub prefer_ipv4: bool,
    /// Try a name's IPv6 addresses first (the default, as RFC 8305 says).
    #[arg(long, env = "SLABSOCKS_PREFER_IPV6")]
    pub prefer_ipv6: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", env = "SLABSOCKS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log one line per finished session (at info level).
    #[arg(long, env = "SLABSOCKS_ACCESS_LOG")]
    pub access_log: bool,
    /// Do not serve SOCKS4/4a (a first byte of 0x04 gets a close).
    #[arg(long, env = "SLABSOCKS_DISABLE_SOCKS4")]
    pub disable_socks4: bool,
    /// Do not serve HTTP CONNECT (an HTTP request gets a 400 hint).
    #[arg(long, env = "SLABSOCKS_DISABLE_HTTP")]
    pub disable_http: bool,
    /// Answer UDP ASSOCIATE with 0x07 (command not supported).
    #[arg(long, env = "SLABSOCKS_DISABLE_UDP")]
    pub disable_udp: bool,
    /// Address for the client-facing UDP relay sockets [default: the one the client connected to].
    #[arg(long, value_name = "ADDR", env = "SLABSOCKS_UDP_BIND_ADDR")]
    pub udp_bind_addr: Option<std::net::IpAddr>,
    /// Ports client-facing UDP relay sockets may use, like 41000-41999.
    #[arg(long, value_name = "LO-HI", value_parser = port_range, env = "SLABSOCKS_UDP_PORT_RANGE")]
    pub udp_port_range: Option<(u16, u16)>,
    /// Which client datagrams are taken: ip, ip+port or none.
    #[arg(long, value_name = "POLICY", default_value = "ip", value_parser = udp_match, env = "SLABSOCKS_UDP_CLIENT_MATCH")]
    pub udp_client_match: slabsocks::UdpMatch,
    /// End a UDP association after this long without datagrams.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = duration, env = "SLABSOCKS_UDP_IDLE_TIMEOUT")]
    pub udp_idle_timeout: Duration,
    /// UDP associations held at once.
    #[arg(long, value_name = "N", env = "SLABSOCKS_MAX_UDP_ASSOCIATIONS")]
    pub max_udp_associations: Option<usize>,
    /// After handling events, poll this long without sleeping (e.g. 200us;
    /// off: always sleep). Cuts round-trip latency in VMs, where waking an
    /// idle CPU is slow, for a core per worker that spins while traffic flows.
    #[arg(long, value_name = "DURATION", default_value = "off", value_parser = fine_duration, env = "SLABSOCKS_BUSY_POLL")]
    pub busy_poll: Duration,
}

impl Cli {
    pub fn config(&self) -> Config {
        Config {
            listen: self.listen.clone(),
            handshake_timeout: self.handshake_timeout,
            connect_timeout: self.connect_timeout,
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            backlog: self.backlog,
            workers: self.workers.unwrap_or_else(|| slabsocks::sys::cpus().min(slabsocks::MAX_WORKERS)),
            max_connections: self.max_connections,
            splice: !self.no_splice,
            max_pipes: self.max_pipes,
            pipe_size: self.pipe_size,
            buffer_size: self.buffer_size,
            resolver_threads: self.resolver_threads,
            lookup: slabsocks::Lookup::system(),
            shutdown_grace: self.shutdown_grace,
            users: None, // loaded by main, which can report the file's errors
            rules: Rules {
                allow_client: self.allow_client.clone(),
                auth_exempt: self.auth_exempt.clone(),
                allow_dest: self.allow_dest.clone(),
                deny_dest: self.deny_dest.clone(),
                deny_private_dest: self.deny_private_dest,
            },
            max_connections_per_client: self.max_connections_per_client,
            max_connections_per_user: self.max_connections_per_user,
            bind: !self.disable_bind,
            bind_timeout: self.bind_timeout,
            bind_ports: self.bind_port_range,
            external_addrs: self.external_addrs.clone(),
            outbound_addrs: self.outbound_addrs.clone(),
            outbound_interface: self.outbound_interface.clone(),
            access_log: self.access_log,
            metrics_listen: self.metrics_listen,
            prefer_ipv4: self.prefer_ipv4,
            rate_limit: self.rate_limit.map(|r| r as u64),
            user_rate_limit: self.user_rate_limit.map(|r| r as u64),
            proxy_protocol: self.proxy_protocol,
            proxy_protocol_from: self.proxy_protocol_from.clone(),
            socks4: !self.disable_socks4,
            http: !self.disable_http,
            udp: !self.disable_udp,
            udp_bind_addr: self.udp_bind_addr,
            udp_ports: self.udp_port_range,
            udp_client_match: self.udp_client_match,
            udp_idle_timeout: self.udp_idle_timeout,
            max_udp_associations: self.max_udp_associations,
            busy_poll: (!self.busy_poll.is_zero()).then_some(self.busy_poll),
        }
    }
}

/// `500ms`, `10s`, `2m`, `1h`; a bare number is seconds; `off` is zero. At
/// most [`slabsocks::MAX_DURATION`]. The timers count milliseconds, so
/// there is no finer unit.
fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s, false)
}

/// As [`duration`], and microseconds too (`200us`): for `--busy-poll`.
fn fine_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s, true)
}

fn parse_duration(s: &str, micros: bool) -> Result<Duration, String> {
    if s == "off" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration like 500ms, 10s or 2m"))?;
    let per = match unit {
        "us" if micros => 1,
        "ms" => 1000,
        "" | "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        _ => {
            let units = if micros { "us, ms, s, m or h" } else { "ms, s, m or h" };
            return Err(format!("'{s}' has an unknown unit (use {units})"));
        }
    };
    n.checked_mul(per)
        .map(Duration::from_micros)
        .filter(|d| *d <= slabsocks::MAX_DURATION)
        .ok_or_else(|| format!("'{s}' is longer than the limit of 8760h (one year)"))
}

/// `ip`, `ip+port` or `none`.
fn udp_match(s: &str) -> Result<slabsocks::UdpMatch, String> {
    match s {
        "ip" => Ok(slabsocks::UdpMatch::Ip),
        "ip+port" => Ok(slabsocks::UdpMatch::IpPort),
        "none" => Ok(slabsocks::UdpMatch::None),
        _ => Err(format!("'{s}' is not one of ip, ip+port, none")),
    }
}

/// `40000-40999`, or one port.
fn port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{s}' is not a port range like 40000-40999");
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let (lo, hi) = (lo.parse::<u16>().map_err(|_| bad())?, hi.parse::<u16>().map_err(|_| bad())?);
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// `16384`, `16k`, `1m`.
fn size(s: &str) -> Result<usize, String> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => match lower.strip_suffix('m') {
            Some(n) => (n, 1024 * 1024),
            None => (lower.as_str(), 1),
        },
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size like 16384, 16k or 1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(duration("200us").is_err(), "the timers count milliseconds");
        assert_eq!(fine_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(fine_duration("0us"), Ok(Duration::ZERO));
        assert_eq!(fine_duration("8760h"), Ok(slabsocks::MAX_DURATION));
        assert!(fine_duration("8761h").is_err());
        assert!(fine_duration("18446744073709551615us").is_err());
        assert_eq!(duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("off"), Ok(Duration::ZERO));
        assert!(duration("10x").is_err());
        assert!(duration("").is_err());
        assert!(duration("-1s").is_err());
        assert_eq!(duration("8760h"), Ok(slabsocks::MAX_DURATION));
        assert!(duration("8761h").is_err());
        assert!(duration("5124095576030432h").is_err(), "would overflow u64 milliseconds");
    }

    #[test]
    fn port_ranges() {
        assert_eq!(port_range("40000-40999"), Ok((40000, 40999)));
        assert_eq!(port_range("5000"), Ok((5000, 5000)));
        for bad in ["0-10", "10-5", "a-b", "1-70000", "", "-"] {
            assert!(port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size("16k"), Ok(16384));
        assert_eq!(size("1M"), Ok(1 << 20));
        assert_eq!(size("4096"), Ok(4096));
        assert!(size("k").is_err());
        assert!(size("99999999999999999999k").is_err());
    }

    #[test]
    fn defaults_match_the_library() {
        let cli = Cli::try_parse_from(["slabsocks"]).unwrap();
        let (got, want) = (cli.config(), Config::default());
        assert_eq!(got.listen, want.listen);
        assert_eq!(got.handshake_timeout, want.handshake_timeout);
        assert_eq!(got.idle_timeout, None);
        assert_eq!(got.buffer_size, want.buffer_size);
        assert_eq!(got.resolver_threads, want.resolver_threads);
    }
}
