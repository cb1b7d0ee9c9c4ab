//! The reply (RFC 1928 §6): `VER REP RSV ATYP BND.ADDR BND.PORT`.

use super::addr::parse_frame;
use super::{Addr, ProtoError, Reply, Status, VERSION};

/// The longest reply the server sends: an IPv6 BND.
pub const MAX_REPLY_LEN: usize = 4 + 16 + 2;

/// A parsed reply, as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyFrame<'a> {
    pub rep: u8,
    pub addr: Addr<'a>,
    pub port: u16,
}

/// Writes a reply; returns its length. `out` must hold
/// `3 + addr.encoded_len()` bytes ([`MAX_REPLY_LEN`] for IP addresses).
pub fn encode_reply(rep: Reply, addr: &Addr<'_>, port: u16, out: &mut [u8]) -> usize {
    out[..3].copy_from_slice(&[VERSION, rep as u8, 0]);
    3 + addr.encode(port, &mut out[3..])
}

/// Parses a reply (the client side; used by tests and clients).
pub fn parse_reply(buf: &[u8]) -> Result<Status<ReplyFrame<'_>>, ProtoError> {
    Ok(parse_frame(buf)?.map(|(rep, addr, port)| ReplyFrame { rep, addr, port }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_all_address_types() {
        let name = [b'h'; 255];
        let addrs = [
            Addr::V4("192.0.2.7".parse().unwrap()),
            Addr::V6("2001:db8::1".parse().unwrap()),
            Addr::Domain(b"example.com"),
            Addr::Domain(&name),
        ];
        let mut out = [0u8; 3 + 2 + 255 + 2];
        for addr in addrs {
            for rep in [Reply::Succeeded, Reply::HostUnreachable, Reply::AddrTypeNotSupported] {
                let n = encode_reply(rep, &addr, 4242, &mut out);
                assert_eq!(n, 3 + addr.encoded_len());
                for end in 0..n {
                    assert_eq!(parse_reply(&out[..end]), Ok(Status::Partial));
                }
                let want = ReplyFrame { rep: rep as u8, addr, port: 4242 };
                assert_eq!(parse_reply(&out[..n]), Ok(Status::Complete(want, n)));
            }
        }
    }

    #[test]
    fn ip_replies_fit_the_maximum() {
        let mut out = [0u8; MAX_REPLY_LEN];
        let v6 = Addr::V6("::1".parse().unwrap());
        assert_eq!(encode_reply(Reply::Succeeded, &v6, 1, &mut out), MAX_REPLY_LEN);
    }
}
