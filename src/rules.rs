//! Access rules: which clients may connect, which may skip authentication,
//! and which destinations may be reached. One module, consulted by CONNECT
//! now and by BIND and UDP ASSOCIATE later.
//!
//! Addresses are compared in canonical form: an IPv4-mapped IPv6 address
//! (`::ffff:10.0.0.1`) is the IPv4 address it maps, so an IPv4 rule covers
//! both spellings.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// `::ffff:a.b.c.d` → `a.b.c.d`; everything else as it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn mask4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// `net/prefix`, host bits cleared; an IPv4-mapped range becomes the
    /// IPv4 range.
    pub fn new(net: IpAddr, prefix: u8) -> Result<Cidr, String> {
        match net {
            IpAddr::V4(v4) if prefix <= 32 => {
                Ok(Cidr { net: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask4(prefix))), prefix })
            }
            IpAddr::V6(v6) if prefix <= 128 => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => Cidr::new(IpAddr::V4(v4), prefix - 96),
                _ => Ok(Cidr { net: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask6(prefix))), prefix }),
            },
            _ => Err(format!("prefix /{prefix} is too long for {net}")),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n) ^ u32::from(a)) & mask4(self.prefix) == 0,
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n) ^ u128::from(a)) & mask6(self.prefix) == 0,
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("'{s}' is not an address range like 10.0.0.0/8 or 2001:db8::/32");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let full = if net.is_ipv4() { 32 } else { 128 };
        Cidr::new(net, prefix.unwrap_or(full))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// A destination rule: a range and the ports it covers (all by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestRule {
    pub net: Cidr,
    pub ports: (u16, u16),
}

impl DestRule {
    pub fn matches(&self, addr: SocketAddr) -> bool {
        (self.ports.0..=self.ports.1).contains(&addr.port()) && self.net.contains(addr.ip())
    }
}

impl FromStr for DestRule {
    type Err = String;
    /// `CIDR[:PORTS]`, PORTS `443` or `8000-8999`. An IPv6 range with ports
    /// is bracketed: `[2001:db8::/32]:443`; without ports it may be bare.
    fn from_str(s: &str) -> Result<DestRule, String> {
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(|| format!("'{s}': missing ']'"))?;
            match after {
                "" => (net, None),
                _ => (net, Some(after.strip_prefix(':').ok_or_else(|| format!("'{s}': expected ':' after ']'"))?)),
            }
        } else if s.matches(':').count() >= 2 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((net, ports)) => (net, Some(ports)),
                None => (s, None),
            }
        };
        let ports = match ports {
            None => (0, u16::MAX),
            Some(p) => {
                let bad = || format!("'{p}' is not a port or port range like 443 or 8000-8999");
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                let (lo, hi) = (lo.parse::<u16>().map_err(|_| bad())?, hi.parse::<u16>().map_err(|_| bad())?);
                if lo > hi {
                    return Err(bad());
                }
                (lo, hi)
            }
        };
        Ok(DestRule { net: net.parse()?, ports })
    }
}

/// Ranges `--deny-private-dest` covers: this network, loopback, RFC 1918,
/// CGNAT, link-local, multicast, reserved and broadcast; IPv6 unspecified,
/// loopback, unique-local, link-local and multicast.
const PRIVATE_V4: [(u32, u8); 11] = [
    (0x0000_0000, 8),  // 0.0.0.0/8: "this network"; 0.0.0.0 reaches the host itself
    (0x0a00_0000, 8),  // 10.0.0.0/8
    (0x6440_0000, 10), // 100.64.0.0/10 (CGNAT)
    (0x7f00_0000, 8),  // 127.0.0.0/8
    (0xa9fe_0000, 16), // 169.254.0.0/16
    (0xac10_0000, 12), // 172.16.0.0/12
    (0xc000_0000, 24), // 192.0.0.0/24 (IETF protocol assignments)
    (0xc0a8_0000, 16), // 192.168.0.0/16
    (0xc612_0000, 15), // 198.18.0.0/15 (benchmarking)
    (0xe000_0000, 4),  // 224.0.0.0/4 (multicast)
    (0xf000_0000, 4),  // 240.0.0.0/4 (reserved, broadcast)
];
const PRIVATE_V6: [(u128, u8); 5] = [
    (0, 128),            // ::
    (1, 128),            // ::1
    (0xfc00 << 112, 7),  // fc00::/7 (unique local)
    (0xfe80 << 112, 10), // fe80::/10 (link local)
    (0xff00 << 112, 8),  // ff00::/8 (multicast)
];
/// 64:ff9b::/96, the NAT64 prefix: its low 32 bits are an IPv4 address.
const NAT64: u128 = 0x0064_ff9b << 96;
/// 64:ff9b:1::/48, the local-use NAT64 prefix (RFC 8215): it translates to
/// networks of the operator's own, so it is private whatever it embeds.
const NAT64_LOCAL: u128 = 0x0064_ff9b_0001 << 80;

/// Whether `--deny-private-dest` denies `ip`.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let a = u32::from(v4);
            PRIVATE_V4.iter().any(|&(net, p)| (a ^ net) & mask4(p) == 0)
        }
        IpAddr::V6(v6) => {
            let a = u128::from(v6);
            if (a ^ NAT64_LOCAL) & mask6(48) == 0 {
                return true;
            }
            if (a ^ NAT64) & mask6(96) == 0 {
                return is_private(IpAddr::V4(Ipv4Addr::from(a as u32)));
            }
            PRIVATE_V6.iter().any(|&(net, p)| (a ^ net) & mask6(p) == 0)
        }
    }
}

/// The rule set. Empty (the default) allows everything.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// When non-empty, only clients from these ranges are served.
    pub allow_client: Vec<Cidr>,
    /// Clients from these ranges may use NO AUTHENTICATION when users are
    /// configured.
    pub auth_exempt: Vec<Cidr>,
    /// When non-empty, only destinations some rule matches are allowed.
    pub allow_dest: Vec<DestRule>,
    /// Destinations denied whatever the allow rules say.
    pub deny_dest: Vec<DestRule>,
    /// Deny the ranges [`is_private`] covers.
    pub deny_private_dest: bool,
}

impl Rules {
    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        self.allow_client.is_empty() || self.allow_client.iter().any(|c| c.contains(ip))
    }

    pub fn auth_exempt(&self, ip: IpAddr) -> bool {
        self.auth_exempt.iter().any(|c| c.contains(ip))
    }

    /// Whether a connection to `addr` (a resolved address, never a name) is
    /// allowed. Deny wins over allow.
    pub fn dest_allowed(&self, addr: SocketAddr) -> bool {
        if self.deny_private_dest && is_private(addr.ip()) {
            return false;
        }
        if self.deny_dest.iter().any(|r| r.matches(addr)) {
            return false;
        }
        self.allow_dest.is_empty() || self.allow_dest.iter().any(|r| r.matches(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_edges() {
        let table = [
            ("10.0.0.0/8", "10.0.0.0", true),
            ("10.0.0.0/8", "10.255.255.255", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.0.0.0/8", "9.255.255.255", false),
            ("172.16.0.0/12", "172.31.255.255", true),
            ("172.16.0.0/12", "172.32.0.0", false),
            ("192.0.2.7", "192.0.2.7", true),
            ("192.0.2.7", "192.0.2.8", false),
            ("192.0.2.7/32", "192.0.2.7", true),
            ("0.0.0.0/0", "255.255.255.255", true),
            ("0.0.0.0/0", "::1", false),
            ("10.1.2.3/8", "10.9.9.9", true), // host bits are cleared
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::", false),
            ("::/0", "fe80::1", true),
            ("::1", "::1", true),
            ("::1/128", "::2", false),
            // IPv4-mapped IPv6, either side
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "11.1.2.3", false),
            ("127.0.0.1", "::ffff:127.0.0.1", true),
        ];
        for (net, addr, want) in table {
            let c: Cidr = net.parse().unwrap();
            assert_eq!(c.contains(ip(addr)), want, "{net} ∋ {addr}");
        }
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "host", "10.0.0.0/", "10.0.0.0/-1", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn dest_rule_syntax_and_ports() {
        let table = [
            ("127.0.0.1", "127.0.0.1:1", true),
            ("127.0.0.1:443", "127.0.0.1:443", true),
            ("127.0.0.1:443", "127.0.0.1:444", false),
            ("10.0.0.0/8:8000-8999", "10.2.3.4:8000", true),
            ("10.0.0.0/8:8000-8999", "10.2.3.4:8999", true),
            ("10.0.0.0/8:8000-8999", "10.2.3.4:7999", false),
            ("10.0.0.0/8:8000-8999", "10.2.3.4:9000", false),
            ("10.0.0.0/8:8000-8999", "[::ffff:10.2.3.4]:8500", true),
            ("::1", "[::1]:22", true),
            ("2001:db8::/32", "[2001:db8::5]:80", true),
            ("[2001:db8::/32]:443", "[2001:db8::5]:443", true),
            ("[2001:db8::/32]:443", "[2001:db8::5]:80", false),
            ("[::1]", "[::1]:80", true),
            ("0.0.0.0/0:25", "192.0.2.1:25", true),
            ("0.0.0.0/0:0-65535", "192.0.2.1:1", true),
        ];
        for (rule, addr, want) in table {
            let r: DestRule = rule.parse().unwrap();
            assert_eq!(r.matches(sa(addr)), want, "{rule} ∋ {addr}");
        }
        for bad in ["10.0.0.0/8:", "10.0.0.0/8:99999", "10.0.0.0/8:9-1", "[::1", "[::1]443", "10.0.0.0/8:a-b", "x:1"] {
            assert!(bad.parse::<DestRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn private_ranges() {
        for a in [
            "0.0.0.0",
            "10.1.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.8.9.10",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.0.1",
            "192.168.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.0.1",
            "64:ff9b::10.0.0.1",
            // Regression: these three ranges were missing.
            "192.0.0.1",
            "192.0.0.255",
            "198.18.0.1",
            "198.19.255.255",
            "64:ff9b:1::8.8.8.8",
            "64:ff9b:1:ffff::1",
        ] {
            assert!(is_private(ip(a)), "{a} is private");
        }
        for a in [
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "192.0.1.255",
            "192.0.2.1",
            "198.17.255.255",
            "198.20.0.0",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "64:ff9b:2::1",
        ] {
            assert!(!is_private(ip(a)), "{a} is public");
        }
    }

    #[test]
    fn deny_wins_and_allow_lists_close_the_rest() {
        let rules = Rules {
            allow_dest: vec!["127.0.0.0/8".parse().unwrap()],
            deny_dest: vec!["127.0.0.1:22".parse().unwrap()],
            ..Rules::default()
        };
        assert!(rules.dest_allowed(sa("127.0.0.1:80")));
        assert!(!rules.dest_allowed(sa("127.0.0.1:22")));
        assert!(!rules.dest_allowed(sa("192.0.2.1:80")), "not on the allow list");
        let private = Rules { deny_private_dest: true, ..Rules::default() };
        assert!(!private.dest_allowed(sa("[::ffff:127.0.0.1]:80")));
        assert!(private.dest_allowed(sa("192.0.2.1:80")));
        assert!(Rules::default().dest_allowed(sa("127.0.0.1:22")));
    }

    #[test]
    fn clients() {
        let rules = Rules {
            allow_client: vec!["127.0.0.1".parse().unwrap()],
            auth_exempt: vec!["127.0.0.0/30".parse().unwrap()],
            ..Rules::default()
        };
        assert!(rules.client_allowed(ip("127.0.0.1")));
        assert!(rules.client_allowed(ip("::ffff:127.0.0.1")));
        assert!(!rules.client_allowed(ip("127.0.0.2")));
        assert!(rules.auth_exempt(ip("127.0.0.3")));
        assert!(!rules.auth_exempt(ip("127.0.0.4")));
        assert!(Rules::default().client_allowed(ip("192.0.2.1")));
        assert!(!Rules::default().auth_exempt(ip("127.0.0.1")));
    }
}
