//! The request (RFC 1928 §4): `VER CMD RSV ATYP DST.ADDR DST.PORT`.

use super::addr::parse_frame;
use super::{Addr, Command, ProtoError, Status, VERSION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub command: Command,
    pub addr: Addr<'a>,
    pub port: u16,
}

/// Parses a request. A bad version or command is reported as soon as its
/// byte arrives, so the client gets its answer without sending the rest.
/// RSV is not checked: RFC 1928 only reserves it, and clients in the wild
/// send garbage there.
pub fn parse_request(buf: &[u8]) -> Result<Status<Request<'_>>, ProtoError> {
    if let Some(&v) = buf.first()
        && v != VERSION
    {
        return Err(ProtoError::BadVersion(v));
    }
    let Some(&cmd) = buf.get(1) else {
        return Ok(Status::Partial);
    };
    let command = Command::from_u8(cmd).ok_or(ProtoError::UnknownCommand(cmd))?;
    Ok(parse_frame(buf)?.map(|(_, addr, port)| Request { command, addr, port }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn valid() -> Vec<Vec<u8>> {
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[1, 187]);
        let mut long = vec![5, 1, 0, 3, 255];
        long.extend(std::iter::repeat_n(b'x', 255));
        long.extend_from_slice(&[0, 1]);
        vec![
            vec![5, 1, 0, 1, 127, 0, 0, 1, 0, 80],
            vec![5, 2, 0, 1, 10, 1, 2, 3, 0xff, 0xff],
            vec![5, 3, 0, 1, 0, 0, 0, 0, 0, 0],
            v6,
            vec![5, 1, 0, 3, 1, b'a', 0, 22],
            long,
        ]
    }

    #[test]
    fn every_prefix_is_partial_and_whole_is_complete() {
        for msg in valid() {
            for end in 0..msg.len() {
                assert_eq!(parse_request(&msg[..end]), Ok(Status::Partial), "{:?}", &msg[..end]);
            }
            let Ok(Status::Complete(_, n)) = parse_request(&msg) else {
                panic!("{msg:?} must parse");
            };
            assert_eq!(n, msg.len());
            // Bytes after the request (pipelined payload) are not consumed.
            let mut more = msg.clone();
            more.extend_from_slice(b"GET /");
            assert_eq!(parse_request(&more).map(|s| matches!(s, Status::Complete(_, k) if k == n)), Ok(true));
        }
    }

    #[test]
    fn fields() {
        let Ok(Status::Complete(r, _)) = parse_request(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 80]) else { panic!() };
        assert_eq!(r, Request { command: Command::Connect, addr: Addr::V4(Ipv4Addr::LOCALHOST), port: 80 });
    }

    #[test]
    fn invalid_table() {
        let table: [(&[u8], ProtoError); 8] = [
            (&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80], ProtoError::BadVersion(4)),
            (&[0], ProtoError::BadVersion(0)),
            (&[5, 0], ProtoError::UnknownCommand(0)),
            (&[5, 4, 0, 1], ProtoError::UnknownCommand(4)),
            (&[5, 0xff], ProtoError::UnknownCommand(0xff)),
            (&[5, 1, 0, 2, 1, 2, 3, 4, 0, 80], ProtoError::BadAddrType(2)),
            (&[5, 1, 0, 0], ProtoError::BadAddrType(0)),
            (&[5, 1, 0, 3, 0, 0, 80], ProtoError::EmptyDomain),
        ];
        for (input, want) in table {
            assert_eq!(parse_request(input), Err(want), "{input:?}");
        }
    }
}
