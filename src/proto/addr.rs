//! The address part shared by requests and replies: ATYP, address, port.

use super::{ProtoError, Status, VERSION, atyp};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A destination or bound address as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr<'a> {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// 1 to 255 bytes, as sent; not necessarily UTF-8.
    Domain(&'a [u8]),
}

impl<'a> Addr<'a> {
    /// Parses ATYP, the address and the port from the start of `buf`.
    pub fn parse(buf: &'a [u8]) -> Result<Status<(Addr<'a>, u16)>, ProtoError> {
        let Some(&kind) = buf.first() else {
            return Ok(Status::Partial);
        };
        let (addr_len, skip) = match kind {
            atyp::V4 => (4, 1),
            atyp::V6 => (16, 1),
            atyp::DOMAIN => match buf.get(1) {
                None => return Ok(Status::Partial),
                Some(0) => return Err(ProtoError::EmptyDomain),
                Some(&n) => (usize::from(n), 2),
            },
            other => return Err(ProtoError::BadAddrType(other)),
        };
        let total = skip + addr_len + 2;
        if buf.len() < total {
            return Ok(Status::Partial);
        }
        let raw = &buf[skip..skip + addr_len];
        let addr = match kind {
            atyp::V4 => Addr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(raw).unwrap_or([0; 4]))),
            atyp::V6 => Addr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(raw).unwrap_or([0; 16]))),
            _ => Addr::Domain(raw),
        };
        let port = u16::from_be_bytes([buf[total - 2], buf[total - 1]]);
        Ok(Status::Complete((addr, port), total))
    }

    /// Bytes [`Addr::encode`] writes, port included.
    pub fn encoded_len(&self) -> usize {
        match self {
            Addr::V4(_) => 1 + 4 + 2,
            Addr::V6(_) => 1 + 16 + 2,
            Addr::Domain(d) => 2 + d.len() + 2,
        }
    }

    /// Writes ATYP, address and port; returns the length. `out` must hold
    /// [`Addr::encoded_len`] bytes, and a domain at most 255.
    pub fn encode(&self, port: u16, out: &mut [u8]) -> usize {
        let n = match self {
            Addr::V4(ip) => {
                out[0] = atyp::V4;
                out[1..5].copy_from_slice(&ip.octets());
                5
            }
            Addr::V6(ip) => {
                out[0] = atyp::V6;
                out[1..17].copy_from_slice(&ip.octets());
                17
            }
            Addr::Domain(d) => {
                let len = d.len().min(255);
                out[0] = atyp::DOMAIN;
                out[1] = len as u8;
                out[2..2 + len].copy_from_slice(&d[..len]);
                2 + len
            }
        };
        out[n..n + 2].copy_from_slice(&port.to_be_bytes());
        n + 2
    }

    /// The IP address this is, when it is one: IPv4/IPv6 types, and domain
    /// names that are numeric literals (`curl socks5h://127.0.0.1` sends its
    /// host as ATYP 3 "127.0.0.1"; `[::1]` is accepted bracketed too).
    pub fn ip(&self) -> Option<IpAddr> {
        match *self {
            Addr::V4(ip) => Some(IpAddr::V4(ip)),
            Addr::V6(ip) => Some(IpAddr::V6(ip)),
            Addr::Domain(d) => {
                let d = d.strip_prefix(b"[").and_then(|d| d.strip_suffix(b"]")).unwrap_or(d);
                std::str::from_utf8(d).ok()?.parse().ok()
            }
        }
    }
}

/// The layout requests and replies share: `VER CODE RSV ATYP ADDR PORT`.
/// Returns CODE (the command or reply), the address and the port.
pub(super) fn parse_frame(buf: &[u8]) -> Result<Status<(u8, Addr<'_>, u16)>, ProtoError> {
    if let Some(&v) = buf.first()
        && v != VERSION
    {
        return Err(ProtoError::BadVersion(v));
    }
    let (Some(&code), Some(tail)) = (buf.get(1), buf.get(3..)) else {
        return Ok(Status::Partial);
    };
    Ok(Addr::parse(tail)?.map(|(addr, port)| (code, addr, port)).shift(3))
}

impl<T> Status<T> {
    /// The same status, counting `n` bytes that came before the message.
    fn shift(self, n: usize) -> Status<T> {
        match self {
            Status::Complete(t, len) => Status::Complete(t, len + n),
            Status::Partial => Status::Partial,
        }
    }
}

impl From<IpAddr> for Addr<'_> {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Addr::V4(v4),
            IpAddr::V6(v6) => Addr::V6(v6),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        let cases: [(&[u8], Option<IpAddr>); 7] = [
            (b"127.0.0.1", Some("127.0.0.1".parse().unwrap())),
            (b"::1", Some("::1".parse().unwrap())),
            (b"[::1]", Some("::1".parse().unwrap())),
            (b"localhost", None),
            (b"1.2.3", None),
            (b"[127.0.0.1", None),
            (b"\xff\xfe", None),
        ];
        for (name, want) in cases {
            assert_eq!(Addr::Domain(name).ip(), want, "{name:?}");
        }
    }

    #[test]
    fn domain_lengths() {
        let mut buf = vec![atyp::DOMAIN, 255];
        buf.extend(std::iter::repeat_n(b'a', 255));
        buf.extend_from_slice(&[0, 80]);
        let Ok(Status::Complete((Addr::Domain(d), 80), n)) = Addr::parse(&buf) else {
            panic!("255-byte domain must parse");
        };
        assert_eq!((d.len(), n), (255, buf.len()));
        assert_eq!(Addr::parse(&[atyp::DOMAIN, 0, 0, 80]), Err(ProtoError::EmptyDomain));
        assert_eq!(Addr::parse(&[2, 0, 0]), Err(ProtoError::BadAddrType(2)));
    }
}
