//! Counters for `--metrics-listen`: each loop adds to plain integers (an
//! increment, never an allocation, on every path), publishes them to
//! shared atomics once per turn, and the endpoint sums every worker's.
//! Every label comes from a bounded set (reply codes, commands, protocols,
//! directions), so the set of series is fixed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// One counter or gauge, by index into [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stat {
    Accepted,
    AuthFailures,
    /// Clients refused by `--allow-client`, destinations by the rules.
    RuleDenials,
    LookupFailures,
    /// Accepting paused for a resource error (EMFILE...).
    AcceptBackoffs,
    /// Accepting paused at the connection limit.
    AcceptPauses,
    /// A listener rested after an error of its own.
    ListenerRests,
    BytesUp,
    BytesDown,
    /// UDP ASSOCIATE: datagrams relayed each way, their payload bytes, and
    /// datagrams received and not relayed (see `udp.rs`).
    UdpDatagramsUp,
    UdpDatagramsDown,
    UdpBytesUp,
    UdpBytesDown,
    UdpDropped,
    CommandConnect,
    CommandBind,
    CommandUdp,
    ProtocolSocks5,
    ProtocolSocks4,
    ProtocolHttp,
    /// Replies by code, `0x00` to `0x08`; `ReplyOther` for the rest.
    Reply0,
    ReplyOther = Stat::Reply0 as isize + 9,
    /// Gauges, set each turn.
    Active,
    MaxConnections,
    ResolverQueue,
    /// Sessions closed, by reason: `Closed0 + i` for [`CLOSE_LABELS`]`[i]`.
    Closed0,
}

/// The reasons a session ends, as metric labels (see `conn::Close`).
pub(crate) const CLOSE_LABELS: [&str; 26] = [
    "handshake_timeout",
    "idle_timeout",
    "client_closed_early",
    "client_error",
    "handshake_too_long",
    "not_socks",
    "http_on_socks_port",
    "bad_greeting",
    "no_acceptable_method",
    "bad_auth",
    "login_failed",
    "user_at_limit",
    "bad_request",
    "client_gone",
    "failed",
    "upstream_gone",
    "done",
    "bind_overflow",
    "client_left_bind",
    "control_closed",
    "udp_idle",
    "timed_out",
    "socks4_needs_login",
    "http_error",
    "bad_proxy_header",
    "proxied_client_refused",
];

pub(crate) const N: usize = Stat::Closed0 as usize + CLOSE_LABELS.len();

/// One loop's counters.
pub(crate) struct Stats(pub [u64; N]);

impl Default for Stats {
    fn default() -> Stats {
        Stats([0; N])
    }
}

impl Stats {
    pub(crate) fn add(&mut self, s: Stat, n: u64) {
        self.0[s as usize] += n;
    }

    pub(crate) fn inc(&mut self, s: Stat) {
        self.add(s, 1);
    }

    /// A session ended for the reason [`CLOSE_LABELS`]`[i]`.
    pub(crate) fn closed(&mut self, i: usize) {
        self.0[Stat::Closed0 as usize + i.min(CLOSE_LABELS.len() - 1)] += 1;
    }

    /// A reply with SOCKS5 code `code` was sent.
    pub(crate) fn reply(&mut self, code: u8) {
        let i = if code <= 8 { Stat::Reply0 as usize + code as usize } else { Stat::ReplyOther as usize };
        self.0[i] += 1;
    }

    pub(crate) fn set(&mut self, s: Stat, v: u64) {
        self.0[s as usize] = v;
    }

    /// Publishes every value (relaxed stores: the endpoint reads a
    /// consistent-enough snapshot).
    pub(crate) fn publish(&self, to: &Published) {
        for (slot, &v) in to.0.iter().zip(&self.0) {
            slot.store(v, Ordering::Relaxed);
        }
    }
}

/// One loop's published values.
pub(crate) struct Published([AtomicU64; N]);

impl Default for Published {
    fn default() -> Published {
        Published(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Published {
    fn get(&self, s: usize) -> u64 {
        self.0[s].load(Ordering::Relaxed)
    }
}

/// The Prometheus text exposition (format 0.0.4) of the sums over `loops`.
pub(crate) fn render<'a>(loops: impl Iterator<Item = &'a Published> + Clone, workers: usize) -> String {
    let sum = |s: usize| loops.clone().map(|l| l.get(s)).sum::<u64>();
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, series: &[(&str, usize)]| {
        let _ = writeln!(out, "# HELP slabsocks_{name} {help}\n# TYPE slabsocks_{name} {kind}");
        for (labels, s) in series {
            let _ = writeln!(out, "slabsocks_{name}{labels} {}", sum(*s));
        }
    };
    use Stat::*;
    metric("sessions_accepted_total", "counter", "Connections accepted.", &[("", Accepted as usize)]);
    metric("sessions_active", "gauge", "Sessions open.", &[("", Active as usize)]);
    metric(
        "requests_total",
        "counter",
        "Requests, by command.",
        &[
            ("{command=\"connect\"}", CommandConnect as usize),
            ("{command=\"bind\"}", CommandBind as usize),
            ("{command=\"udp_associate\"}", CommandUdp as usize),
        ],
    );
    metric(
        "requests_by_protocol_total",
        "counter",
        "Requests, by protocol.",
        &[
            ("{protocol=\"socks5\"}", ProtocolSocks5 as usize),
            ("{protocol=\"socks4\"}", ProtocolSocks4 as usize),
            ("{protocol=\"http\"}", ProtocolHttp as usize),
        ],
    );
    let codes: Vec<(String, usize)> = (0..9)
        .map(|c| (format!("{{code=\"0x{c:02x}\"}}"), Reply0 as usize + c))
        .chain([("{code=\"other\"}".to_string(), ReplyOther as usize)])
        .collect();
    let codes: Vec<(&str, usize)> = codes.iter().map(|(l, s)| (l.as_str(), *s)).collect();
    metric("replies_total", "counter", "Replies sent, by SOCKS5 code (SOCKS4 and HTTP mapped).", &codes);
    let closes: Vec<(String, usize)> =
        CLOSE_LABELS.iter().enumerate().map(|(i, l)| (format!("{{reason=\"{l}\"}}"), Closed0 as usize + i)).collect();
    let closes: Vec<(&str, usize)> = closes.iter().map(|(l, s)| (l.as_str(), *s)).collect();
    metric("sessions_closed_total", "counter", "Sessions ended, by reason.", &closes);
    metric("auth_failures_total", "counter", "Failed logins.", &[("", AuthFailures as usize)]);
    metric(
        "rule_denials_total",
        "counter",
        "Clients and destinations denied by the rules.",
        &[("", RuleDenials as usize)],
    );
    metric(
        "bytes_total",
        "counter",
        "Bytes relayed over TCP, by direction.",
        &[("{direction=\"up\"}", BytesUp as usize), ("{direction=\"down\"}", BytesDown as usize)],
    );
    metric(
        "udp_datagrams_total",
        "counter",
        "UDP datagrams relayed, by direction.",
        &[("{direction=\"up\"}", UdpDatagramsUp as usize), ("{direction=\"down\"}", UdpDatagramsDown as usize)],
    );
    metric(
        "udp_bytes_total",
        "counter",
        "Payload bytes of the UDP datagrams relayed, by direction.",
        &[("{direction=\"up\"}", UdpBytesUp as usize), ("{direction=\"down\"}", UdpBytesDown as usize)],
    );
    metric(
        "udp_dropped_total",
        "counter",
        "UDP datagrams received and not relayed (not the client's, malformed, fragments, denied, unresolved, ...).",
        &[("", UdpDropped as usize)],
    );
    metric(
        "resolver_queue_depth",
        "gauge",
        "Name look-ups waiting for a resolver thread.",
        &[("", ResolverQueue as usize)],
    );
    metric("lookup_failures_total", "counter", "Name look-ups that failed.", &[("", LookupFailures as usize)]);
    metric(
        "accept_backoffs_total",
        "counter",
        "Accept pauses for a resource error (EMFILE, ENFILE, ...).",
        &[("", AcceptBackoffs as usize)],
    );
    metric("accept_pauses_total", "counter", "Accept pauses at the connection limit.", &[("", AcceptPauses as usize)]);
    metric(
        "listener_rests_total",
        "counter",
        "Rests of a listener that failed for itself (EINVAL, or a whole batch of failed accepts).",
        &[("", ListenerRests as usize)],
    );
    metric(
        "max_connections",
        "gauge",
        "The connection limit, summed over the workers.",
        &[("", MaxConnections as usize)],
    );
    let _ = writeln!(out, "# HELP slabsocks_workers Loops running.\n# TYPE slabsocks_workers gauge");
    let _ = writeln!(out, "slabsocks_workers {workers}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_loops_and_names_every_series() {
        let (a, b) = (Published::default(), Published::default());
        let mut s = Stats::default();
        s.inc(Stat::Accepted);
        s.reply(0);
        s.reply(5);
        s.reply(0x5a);
        s.reply(8);
        s.reply(9);
        s.add(Stat::BytesUp, 10);
        s.publish(&a);
        s.add(Stat::BytesUp, 5);
        s.publish(&b);
        let text = render([&a, &b].into_iter(), 2);
        for line in [
            "slabsocks_sessions_accepted_total 2",
            "slabsocks_replies_total{code=\"0x00\"} 2",
            "slabsocks_replies_total{code=\"0x05\"} 2",
            "slabsocks_replies_total{code=\"other\"} 4",
            "slabsocks_replies_total{code=\"0x08\"} 2",
            "slabsocks_replies_total{code=\"0x01\"} 0",
            "slabsocks_bytes_total{direction=\"up\"} 25",
            "slabsocks_workers 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.lines().all(|l| l.starts_with('#') || l.starts_with("slabsocks_")));
    }
}
