//! The UDP request header (RFC 1928 §7):
//! `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`.
//!
//! A datagram arrives whole or not at all, so unlike the TCP messages there
//! is no `Partial`: a header cut short is malformed.

use super::{Addr, ProtoError, Status};
use std::net::SocketAddr;

/// The longest header: a 255-byte domain name.
pub const MAX_UDP_HEADER_LEN: usize = 3 + 2 + 255 + 2;
/// The header before an IPv6 address, the longest the server writes.
pub const MAX_UDP_IP_HEADER_LEN: usize = 3 + 1 + 16 + 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpHeader<'a> {
    /// Fragment number: 0 for a whole datagram.
    pub frag: u8,
    pub addr: Addr<'a>,
    pub port: u16,
}

/// Parses the header at the start of a datagram; returns it and where the
/// data starts. RSV is not checked, as in requests.
pub fn parse_udp_header(datagram: &[u8]) -> Result<(UdpHeader<'_>, usize), ProtoError> {
    let (Some(&frag), Some(tail)) = (datagram.get(2), datagram.get(3..)) else {
        return Err(ProtoError::Truncated);
    };
    match Addr::parse(tail)? {
        Status::Complete((addr, port), n) => Ok((UdpHeader { frag, addr, port }, 3 + n)),
        Status::Partial => Err(ProtoError::Truncated),
    }
}

/// Writes the header for data from `from` (FRAG 0, ATYP 1 or 4 as its
/// family); returns the length. `out` must hold [`MAX_UDP_IP_HEADER_LEN`].
pub fn encode_udp_header(from: SocketAddr, out: &mut [u8]) -> usize {
    out[..3].copy_from_slice(&[0, 0, 0]);
    3 + Addr::from(from.ip()).encode(from.port(), &mut out[3..])
}

/// The header's length for data from `from`.
pub fn udp_header_len(from: SocketAddr) -> usize {
    3 + Addr::from(from.ip()).encoded_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn every_address_type_and_its_data() {
        let mut v4 = vec![0, 0, 0, 1, 192, 0, 2, 1, 0, 53];
        v4.extend_from_slice(b"query");
        let (h, n) = parse_udp_header(&v4).unwrap();
        assert_eq!((h.frag, h.addr, h.port, &v4[n..]), (0, Addr::V4(Ipv4Addr::new(192, 0, 2, 1)), 53, &b"query"[..]));

        let mut v6 = vec![0, 0, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[1, 187]);
        let (h, n) = parse_udp_header(&v6).unwrap();
        assert_eq!((h.addr, h.port, n), (Addr::V6(Ipv6Addr::LOCALHOST), 443, 22));

        let mut name = vec![0, 0, 0, 3, 11];
        name.extend_from_slice(b"example.com");
        name.extend_from_slice(&[0, 80, b'x']);
        let (h, n) = parse_udp_header(&name).unwrap();
        assert_eq!((h.addr, h.port, &name[n..]), (Addr::Domain(b"example.com"), 80, &b"x"[..]));

        // An IP literal sent as a name is an address, never a look-up.
        let mut literal = vec![0, 0, 0, 3, 9];
        literal.extend_from_slice(b"127.0.0.1");
        literal.extend_from_slice(&[0, 7]);
        let (h, _) = parse_udp_header(&literal).unwrap();
        assert_eq!(h.addr.ip(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));

        // Empty data is a valid datagram.
        assert_eq!(parse_udp_header(&[0, 0, 0, 1, 1, 2, 3, 4, 0, 9]).unwrap().1, 10);
    }

    #[test]
    fn frag_is_reported_not_judged() {
        let (h, _) = parse_udp_header(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 9]).unwrap();
        assert_eq!(h.frag, 1);
    }

    #[test]
    fn every_truncation_and_bad_type_is_an_error() {
        let whole = [0u8, 0, 0, 1, 127, 0, 0, 1, 0, 9];
        for cut in 0..whole.len() {
            assert_eq!(parse_udp_header(&whole[..cut]), Err(ProtoError::Truncated), "cut at {cut}");
        }
        let mut name = vec![0, 0, 0, 3, 5];
        name.extend_from_slice(b"ab");
        assert_eq!(parse_udp_header(&name), Err(ProtoError::Truncated));
        assert_eq!(parse_udp_header(&[0, 0, 0, 3, 0, 0, 9]), Err(ProtoError::EmptyDomain));
        assert_eq!(parse_udp_header(&[0, 0, 0, 9, 1, 2]), Err(ProtoError::BadAddrType(9)));
    }

    /// The bounds are the real extremes: a 255-byte name for any header,
    /// an IPv6 address for one the server writes.
    #[test]
    fn the_longest_headers_are_exactly_the_maximums() {
        let mut name = vec![0, 0, 0, 3, 255];
        name.extend_from_slice(&[b'n'; 255]);
        name.extend_from_slice(&[0, 53]);
        assert_eq!(parse_udp_header(&name).map(|(_, n)| n), Ok(MAX_UDP_HEADER_LEN));
        let v6: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        let mut out = [0u8; MAX_UDP_IP_HEADER_LEN];
        assert_eq!(encode_udp_header(v6, &mut out), MAX_UDP_IP_HEADER_LEN);
        assert_eq!(udp_header_len(v6), MAX_UDP_IP_HEADER_LEN);
    }

    #[test]
    fn encode_then_parse_is_the_identity() {
        for from in ["192.0.2.1:53", "[2001:db8::1]:443", "0.0.0.0:0", "[::ffff:10.0.0.1]:65535"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut out = [0u8; MAX_UDP_IP_HEADER_LEN];
            let n = encode_udp_header(from, &mut out);
            assert_eq!(n, udp_header_len(from));
            let (h, m) = parse_udp_header(&out[..n]).unwrap();
            assert_eq!((h.frag, h.addr.ip(), h.port, m), (0, Some(from.ip()), from.port(), n));
        }
    }
}
