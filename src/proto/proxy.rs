//! The HAProxy PROXY protocol header (versions 1 and 2), which a load
//! balancer sends first on each connection to say whom it came from.
//! Incremental and bounded like every codec here: a prefix of a valid
//! header is `Partial`, anything else is an error as soon as it shows.

use super::Status;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection came from `source` (to `dest`, on the balancer).
    Proxied { source: SocketAddr, dest: SocketAddr },
    /// The balancer's own connection (a health check: v2 LOCAL, v1
    /// UNKNOWN): the connection's own addresses stand.
    Local,
}

/// Not a valid PROXY header (final: more bytes cannot fix it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadProxyHeader;

impl std::fmt::Display for BadProxyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a valid PROXY protocol header")
    }
}

/// Version 2's signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's longest line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The longest version 2 header taken: addresses and a few TLVs.
pub const MAX_PROXY_HEADER: usize = 536;

/// Parses a PROXY header at the start of `data`.
pub fn parse_proxy(data: &[u8]) -> Result<Status<ProxyHeader>, BadProxyHeader> {
    let n = data.len().min(V2_SIG.len());
    if data[..n] == V2_SIG[..n] {
        return if n < V2_SIG.len() { Ok(Status::Partial) } else { v2(data) };
    }
    let n = data.len().min(6);
    if data[..n] != b"PROXY "[..n] {
        return Err(BadProxyHeader);
    }
    v1(data)
}

fn v1(data: &[u8]) -> Result<Status<ProxyHeader>, BadProxyHeader> {
    let window = &data[..data.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if data.len() >= V1_MAX || window.contains(&b'\n') { Err(BadProxyHeader) } else { Ok(Status::Partial) };
    };
    // A bare LF (or CR) inside the line: an error, as it is for a prefix
    // that ends there, whatever follows (found by fuzzing: the answer must
    // not depend on how the bytes arrive).
    if data[..end].iter().any(|&b| b == b'\n' || b == b'\r') {
        return Err(BadProxyHeader);
    }
    let line = std::str::from_utf8(&data[6..end]).map_err(|_| BadProxyHeader)?;
    let mut f = line.split(' ');
    let header = match f.next() {
        Some("UNKNOWN") => ProxyHeader::Local,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(dst), Some(sport), Some(dport), None) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                return Err(BadProxyHeader);
            };
            let ip = |s: &str| -> Result<IpAddr, BadProxyHeader> {
                let ip: IpAddr = match proto {
                    "TCP4" => s.parse::<Ipv4Addr>().map_err(|_| BadProxyHeader)?.into(),
                    _ => s.parse::<Ipv6Addr>().map_err(|_| BadProxyHeader)?.into(),
                };
                Ok(ip)
            };
            // Ports: decimal, no sign, no leading zero (the specification).
            let port = |s: &str| -> Result<u16, BadProxyHeader> {
                let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
                if ok { s.parse().map_err(|_| BadProxyHeader) } else { Err(BadProxyHeader) }
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                dest: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(BadProxyHeader),
    };
    Ok(Status::Complete(header, end + 2))
}

fn v2(data: &[u8]) -> Result<Status<ProxyHeader>, BadProxyHeader> {
    let Some(&[ver_cmd, fam, hi, lo]) = data.get(12..16) else {
        // Check what has arrived of the fixed part.
        if let Some(&ver_cmd) = data.get(12)
            && ver_cmd >> 4 != 2
        {
            return Err(BadProxyHeader);
        }
        return Ok(Status::Partial);
    };
    if ver_cmd >> 4 != 2 || ver_cmd & 0xf > 1 {
        return Err(BadProxyHeader);
    }
    let len = u16::from_be_bytes([hi, lo]) as usize;
    if 16 + len > MAX_PROXY_HEADER {
        return Err(BadProxyHeader);
    }
    let Some(body) = data.get(16..16 + len) else { return Ok(Status::Partial) };
    let total = 16 + len;
    if ver_cmd & 0xf == 0 {
        // LOCAL: the body, if any, is ignored.
        return Ok(Status::Complete(ProxyHeader::Local, total));
    }
    let header = match fam {
        // TCP over IPv4: 4 + 4 + 2 + 2 bytes.
        0x11 if len >= 12 => {
            let ip = |i: usize| IpAddr::from([body[i], body[i + 1], body[i + 2], body[i + 3]]);
            let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            ProxyHeader::Proxied { source: SocketAddr::new(ip(0), port(8)), dest: SocketAddr::new(ip(4), port(10)) }
        }
        // TCP over IPv6: 16 + 16 + 2 + 2 bytes.
        0x21 if len >= 36 => {
            let ip = |i: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[i..i + 16]);
                IpAddr::from(a)
            };
            let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            ProxyHeader::Proxied { source: SocketAddr::new(ip(0), port(32)), dest: SocketAddr::new(ip(16), port(34)) }
        }
        // UNSPEC: no address to use.
        0x00 => ProxyHeader::Local,
        // UDP, UNIX, or too short for its family.
        _ => return Err(BadProxyHeader),
    };
    Ok(Status::Complete(header, total))
}

/// Encodes a version 2 PROXY header for a TCP connection from `source` to
/// `dest` (both of one family); returns its length. For tests and tools.
pub fn encode_proxy_v2(source: SocketAddr, dest: SocketAddr, out: &mut [u8; 52]) -> usize {
    out[..12].copy_from_slice(V2_SIG);
    out[12] = 0x21;
    let len = match (source, dest) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out[13] = 0x11;
            out[16..20].copy_from_slice(&s.ip().octets());
            out[20..24].copy_from_slice(&d.ip().octets());
            out[24..26].copy_from_slice(&s.port().to_be_bytes());
            out[26..28].copy_from_slice(&d.port().to_be_bytes());
            12
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V6(ip) => ip,
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            };
            out[13] = 0x21;
            out[16..32].copy_from_slice(&v6(s).octets());
            out[32..48].copy_from_slice(&v6(d).octets());
            out[48..50].copy_from_slice(&s.port().to_be_bytes());
            out[50..52].copy_from_slice(&d.port().to_be_bytes());
            36
        }
    };
    out[14..16].copy_from_slice(&(len as u16).to_be_bytes());
    16 + len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nrest";
        let want = ProxyHeader::Proxied { source: sa("192.0.2.1:56324"), dest: sa("198.51.100.2:443") };
        assert_eq!(parse_proxy(line), Ok(Status::Complete(want, line.len() - 4)));
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        let want6 = ProxyHeader::Proxied { source: sa("[2001:db8::1]:1"), dest: sa("[2001:db8::2]:2") };
        assert_eq!(parse_proxy(v6), Ok(Status::Complete(want6, v6.len())));
        assert_eq!(parse_proxy(b"PROXY UNKNOWN\r\n"), Ok(Status::Complete(ProxyHeader::Local, 15)));
        // Every prefix of a valid line is Partial.
        for n in 0..line.len() - 4 {
            assert_eq!(parse_proxy(&line[..n]), Ok(Status::Partial), "{n}");
        }
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
            // Regression (fuzzing): a bare LF within an UNKNOWN line, whose
            // rest is otherwise ignored, was taken once the CRLF came.
            b"PROXY UNKNOWN T0 \n8 \r\n",
            b"PROXY UNKNOWN \r8\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\x05\x01\x00",
            b"proxy ",
        ] {
            assert_eq!(parse_proxy(bad), Err(BadProxyHeader), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(vec![b'1'; V1_MAX]);
        assert_eq!(parse_proxy(&long), Err(BadProxyHeader), "no CRLF within 107 bytes");
    }

    #[test]
    fn v2_headers() {
        let mut out = [0u8; 52];
        for (s, d) in [("192.0.2.1:56324", "198.51.100.2:443"), ("[2001:db8::1]:1", "[2001:db8::2]:2")] {
            let n = encode_proxy_v2(sa(s), sa(d), &mut out);
            let want = ProxyHeader::Proxied { source: sa(s), dest: sa(d) };
            assert_eq!(parse_proxy(&out[..n]), Ok(Status::Complete(want, n)));
            for cut in 0..n {
                assert_eq!(parse_proxy(&out[..cut]), Ok(Status::Partial), "{s}: {cut}");
            }
        }
        // LOCAL, with a body to skip.
        let mut local = V2_SIG.to_vec();
        local.extend([0x20, 0x00, 0x00, 0x03, 1, 2, 3]);
        assert_eq!(parse_proxy(&local), Ok(Status::Complete(ProxyHeader::Local, 19)));
        // TLVs after the addresses are skipped.
        let n = encode_proxy_v2(sa("192.0.2.1:1"), sa("192.0.2.2:2"), &mut out);
        let mut tlv = out[..n].to_vec();
        tlv[15] += 5;
        tlv.extend([0x04, 0x00, 0x02, 0xab, 0xcd, 0xff]);
        assert_eq!(
            parse_proxy(&tlv),
            Ok(Status::Complete(ProxyHeader::Proxied { source: sa("192.0.2.1:1"), dest: sa("192.0.2.2:2") }, n + 5))
        );
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut h = out[..n].to_vec();
            f(&mut h);
            parse_proxy(&h)
        };
        assert_eq!(bad(&|h| h[12] = 0x11), Err(BadProxyHeader), "version 1 in a v2 header");
        assert_eq!(bad(&|h| h[12] = 0x22), Err(BadProxyHeader), "command 2");
        assert_eq!(bad(&|h| h[13] = 0x12), Err(BadProxyHeader), "UDP");
        assert_eq!(bad(&|h| h[13] = 0x31), Err(BadProxyHeader), "UNIX");
        assert_eq!(bad(&|h| h[15] = 4), Err(BadProxyHeader), "too short for IPv4");
        assert_eq!(bad(&|h| h[14..16].copy_from_slice(&600u16.to_be_bytes())), Err(BadProxyHeader), "too long");
    }
}
