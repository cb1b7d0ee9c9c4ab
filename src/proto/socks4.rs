//! SOCKS4 and SOCKS4a requests and replies.
//!
//! Request: `VN(4) CD DSTPORT(2) DSTIP(4) USERID... NUL`; SOCKS4a sets DSTIP
//! to `0.0.0.x` (x != 0) and follows the USERID with `DOMAIN... NUL`.
//! Reply: `VN(0) CD DSTPORT(2) DSTIP(4)`, CD 0x5A granted, 0x5B rejected or
//! failed.

use super::{Command, ProtoError, Status};
use std::net::{Ipv4Addr, SocketAddr};

/// The version byte of a SOCKS4 request.
pub const SOCKS4_VERSION: u8 = 4;
/// Longest USERID and longest SOCKS4a domain accepted, NUL excluded. A
/// client that sends no NUL within the bound is refused, not buffered.
pub const MAX_SOCKS4_FIELD: usize = 255;
/// A reply's length.
pub const SOCKS4_REPLY_LEN: usize = 8;
const GRANTED: u8 = 0x5A;
const REJECTED: u8 = 0x5B;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socks4Request<'a> {
    pub command: Command,
    pub port: u16,
    /// DSTIP as sent; for SOCKS4a the `0.0.0.x` marker.
    pub ip: Ipv4Addr,
    pub user: &'a [u8],
    /// SOCKS4a: the name to resolve.
    pub domain: Option<&'a [u8]>,
}

/// Parses a SOCKS4 or SOCKS4a request. A bad version or command is reported
/// as soon as its byte arrives; a field without its NUL within
/// [`MAX_SOCKS4_FIELD`] bytes as soon as the bound is passed.
pub fn parse_socks4(buf: &[u8]) -> Result<Status<Socks4Request<'_>>, ProtoError> {
    let Some(&v) = buf.first() else { return Ok(Status::Partial) };
    if v != SOCKS4_VERSION {
        return Err(ProtoError::BadVersion(v));
    }
    let Some(&cd) = buf.get(1) else { return Ok(Status::Partial) };
    let command = match cd {
        1 => Command::Connect,
        2 => Command::Bind,
        other => return Err(ProtoError::UnknownCommand(other)),
    };
    if buf.len() < 8 {
        return Ok(Status::Partial);
    }
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
    let Some((user, after)) = field(buf, 8)? else { return Ok(Status::Partial) };
    let [0, 0, 0, x] = ip.octets() else {
        return Ok(Status::Complete(Socks4Request { command, port, ip, user, domain: None }, after));
    };
    if x == 0 {
        // 0.0.0.0 is no SOCKS4a marker: a request for that address.
        return Ok(Status::Complete(Socks4Request { command, port, ip, user, domain: None }, after));
    }
    let Some((domain, end)) = field(buf, after)? else { return Ok(Status::Partial) };
    if domain.is_empty() {
        return Err(ProtoError::EmptyDomain);
    }
    Ok(Status::Complete(Socks4Request { command, port, ip, user, domain: Some(domain) }, end))
}

/// The NUL-terminated field at `buf[at..]` and where the next one starts.
fn field(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let rest = &buf[at.min(buf.len())..];
    let window = &rest[..rest.len().min(MAX_SOCKS4_FIELD + 1)];
    match window.iter().position(|&b| b == 0) {
        Some(n) => Ok(Some((&rest[..n], at + n + 1))),
        None if window.len() > MAX_SOCKS4_FIELD => Err(ProtoError::TooLong),
        None => Ok(None),
    }
}

/// Writes a reply: granted or not, with DSTPORT/DSTIP from `addr` (an IPv6
/// address, which SOCKS4 cannot carry, is written as 0.0.0.0: "use the
/// server's address"). Returns [`SOCKS4_REPLY_LEN`].
pub fn encode_socks4_reply(granted: bool, addr: Option<SocketAddr>, out: &mut [u8]) -> usize {
    let (ip, port) = match addr {
        Some(SocketAddr::V4(a)) => (*a.ip(), a.port()),
        Some(SocketAddr::V6(a)) => (a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED), a.port()),
        None => (Ipv4Addr::UNSPECIFIED, 0),
    };
    out[0] = 0;
    out[1] = if granted { GRANTED } else { REJECTED };
    out[2..4].copy_from_slice(&port.to_be_bytes());
    out[4..8].copy_from_slice(&ip.octets());
    SOCKS4_REPLY_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(user: &[u8]) -> Vec<u8> {
        let mut r = vec![4, 1, 0, 80, 192, 0, 2, 1];
        r.extend_from_slice(user);
        r.push(0);
        r
    }

    fn v4a(user: &[u8], name: &[u8]) -> Vec<u8> {
        let mut r = vec![4, 1, 1, 187, 0, 0, 0, 1];
        r.extend_from_slice(user);
        r.push(0);
        r.extend_from_slice(name);
        r.push(0);
        r
    }

    #[test]
    fn socks4_and_4a_and_every_prefix() {
        let plain = v4(b"alice");
        let want = Socks4Request {
            command: Command::Connect,
            port: 80,
            ip: Ipv4Addr::new(192, 0, 2, 1),
            user: b"alice",
            domain: None,
        };
        assert_eq!(parse_socks4(&plain), Ok(Status::Complete(want, plain.len())));
        let a = v4a(b"", b"example.com");
        let got = parse_socks4(&a).unwrap();
        let Status::Complete(r, n) = got else { panic!("{got:?}") };
        assert_eq!((r.port, r.user, r.domain, n), (443, &b""[..], Some(&b"example.com"[..]), a.len()));
        for whole in [plain, a, v4(b""), v4a(b"u", b"x")] {
            for k in 0..whole.len() {
                assert_eq!(parse_socks4(&whole[..k]), Ok(Status::Partial), "prefix {k} of {whole:?}");
            }
        }
    }

    #[test]
    fn bind_and_the_zero_address_are_plain_socks4() {
        let mut bind = v4(b"");
        bind[1] = 2;
        let Ok(Status::Complete(r, _)) = parse_socks4(&bind) else { panic!() };
        assert_eq!(r.command, Command::Bind);
        let zero = [4, 2, 0, 0, 0, 0, 0, 0, 0];
        let Ok(Status::Complete(r, n)) = parse_socks4(&zero) else { panic!() };
        assert_eq!((r.ip, r.domain, n), (Ipv4Addr::UNSPECIFIED, None, 9));
    }

    #[test]
    fn bad_inputs() {
        let long = vec![b'u'; MAX_SOCKS4_FIELD + 1];
        let mut no_nul = vec![4, 1, 0, 80, 1, 2, 3, 4];
        no_nul.extend_from_slice(&long);
        let mut name_no_nul = v4a(b"", b"");
        name_no_nul.pop();
        name_no_nul.pop();
        name_no_nul.extend_from_slice(&long);
        let table: [(&[u8], ProtoError); 6] = [
            (&[5], ProtoError::BadVersion(5)),
            (&[4, 3], ProtoError::UnknownCommand(3)),
            (&[4, 0], ProtoError::UnknownCommand(0)),
            (&no_nul, ProtoError::TooLong),
            (&name_no_nul, ProtoError::TooLong),
            (&v4a(b"", b""), ProtoError::EmptyDomain),
        ];
        for (input, want) in table {
            assert_eq!(parse_socks4(input), Err(want), "{input:?}");
        }
        // The longest fields allowed are fine, and every prefix of them is
        // only Partial: a field at its bound still waits for its NUL.
        let max = v4a(&[b'u'; MAX_SOCKS4_FIELD], &[b'd'; MAX_SOCKS4_FIELD]);
        assert!(matches!(parse_socks4(&max), Ok(Status::Complete(_, n)) if n == max.len()));
        for k in 0..max.len() {
            assert_eq!(parse_socks4(&max[..k]), Ok(Status::Partial), "prefix {k}");
        }
    }

    #[test]
    fn replies() {
        let mut out = [0u8; SOCKS4_REPLY_LEN];
        encode_socks4_reply(true, Some("192.0.2.1:1080".parse().unwrap()), &mut out);
        assert_eq!(out, [0, 0x5A, 4, 56, 192, 0, 2, 1]);
        encode_socks4_reply(false, None, &mut out);
        assert_eq!(out, [0, 0x5B, 0, 0, 0, 0, 0, 0]);
        encode_socks4_reply(true, Some("[::1]:9".parse().unwrap()), &mut out);
        assert_eq!(out, [0, 0x5A, 0, 9, 0, 0, 0, 0]);
    }
}
