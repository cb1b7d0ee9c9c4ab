//! The wire codecs: SOCKS5 (RFC 1928, RFC 1929), SOCKS4/4a and HTTP
//! CONNECT heads, as pure functions over byte slices.
//!
//! Nothing here touches a socket, a clock or the heap. Parsers borrow their
//! input and answer [`Status::Partial`] until a whole message is present, so
//! the caller may feed them whatever the network delivered so far. Encoders
//! write into a caller's buffer and return the length written.

mod addr;
mod auth;
mod consts;
mod greeting;
#[cfg(feature = "http")]
mod http;
mod proxy;
mod reply;
mod request;
mod sniff;
mod socks4;
mod udp;

pub use addr::Addr;
pub use auth::{AUTH_VERSION, Credentials, encode_auth_reply, parse_auth};
pub use consts::{Command, Method, Reply, VERSION, atyp};
pub use greeting::{Greeting, encode_method, parse_greeting};
#[cfg(feature = "http")]
pub use http::{ConnectHead, HttpError, MAX_HTTP_HEADERS, basic_credentials, http_response, parse_connect};
pub use proxy::{BadProxyHeader, MAX_PROXY_HEADER, ProxyHeader, encode_proxy_v2, parse_proxy};
pub use reply::{MAX_REPLY_LEN, ReplyFrame, encode_reply, parse_reply};
pub use request::{Request, parse_request};
pub use sniff::{HTTP_400, Sniff, sniff};
pub use socks4::{
    MAX_SOCKS4_FIELD, SOCKS4_REPLY_LEN, SOCKS4_VERSION, Socks4Request, encode_socks4_reply, parse_socks4,
};
pub use udp::{
    MAX_UDP_HEADER_LEN, MAX_UDP_IP_HEADER_LEN, UdpHeader, encode_udp_header, parse_udp_header, udp_header_len,
};

/// The outcome of parsing a prefix of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<T> {
    /// A whole message, and how many input bytes it took.
    Complete(T, usize),
    /// Every byte so far is valid, but the message is not finished.
    Partial,
}

impl<T> Status<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Status<U> {
        match self {
            Status::Complete(t, n) => Status::Complete(f(t), n),
            Status::Partial => Status::Partial,
        }
    }
}

/// Why input is not a valid message. Each variant is final: more bytes
/// cannot make the input valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// The version byte is not 5.
    BadVersion(u8),
    /// A greeting that offers no method (NMETHODS = 0).
    NoMethods,
    /// A request command other than CONNECT, BIND or UDP ASSOCIATE.
    UnknownCommand(u8),
    /// An address type other than 1, 3 or 4.
    BadAddrType(u8),
    /// A domain name of length 0.
    EmptyDomain,
    /// A username/password message whose version byte is not 1.
    BadAuthVersion(u8),
    /// A UDP datagram too short for its header.
    Truncated,
    /// A SOCKS4 USERID or domain with no NUL within its bound.
    TooLong,
}

impl ProtoError {
    /// The reply a client gets for this error, or `None` when the
    /// connection is closed without one (RFC 1928 gives no reply frame for a
    /// message that is not SOCKS5 at all).
    pub fn reply(self) -> Option<Reply> {
        match self {
            ProtoError::BadVersion(_) | ProtoError::NoMethods | ProtoError::BadAuthVersion(_) => None,
            ProtoError::UnknownCommand(_) => Some(Reply::CommandNotSupported),
            ProtoError::BadAddrType(_) => Some(Reply::AddrTypeNotSupported),
            // A malformed request: RFC 1928 has no finer code than 0x01.
            ProtoError::EmptyDomain => Some(Reply::GeneralFailure),
            // Only datagrams are cut short; they get no reply at all.
            ProtoError::Truncated => None,
            // SOCKS4 only; its dialect answers every failure alike.
            ProtoError::TooLong => Some(Reply::GeneralFailure),
        }
    }
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::BadVersion(v) => write!(f, "version {v} is not SOCKS5"),
            ProtoError::NoMethods => f.write_str("greeting offers no method"),
            ProtoError::UnknownCommand(c) => write!(f, "unknown command {c:#04x}"),
            ProtoError::BadAddrType(a) => write!(f, "unknown address type {a:#04x}"),
            ProtoError::EmptyDomain => f.write_str("empty domain name"),
            ProtoError::BadAuthVersion(v) => write!(f, "username/password version {v} is not 1"),
            ProtoError::Truncated => f.write_str("datagram shorter than its header"),
            ProtoError::TooLong => f.write_str("a field longer than its bound"),
        }
    }
}

impl std::error::Error for ProtoError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_table() {
        let table = [
            (ProtoError::BadVersion(4), None),
            (ProtoError::NoMethods, None),
            (ProtoError::UnknownCommand(9), Some(Reply::CommandNotSupported)),
            (ProtoError::BadAddrType(2), Some(Reply::AddrTypeNotSupported)),
            (ProtoError::EmptyDomain, Some(Reply::GeneralFailure)),
            (ProtoError::BadAuthVersion(5), None),
            (ProtoError::Truncated, None),
            (ProtoError::TooLong, Some(Reply::GeneralFailure)),
        ];
        for (err, want) in table {
            assert_eq!(err.reply(), want, "{err}");
        }
    }

    /// Greeting and request sent in one write, split at every point, parse
    /// to the same messages.
    #[test]
    fn pipelined_greeting_and_request_every_split() {
        let mut wire = vec![5, 2, 0, 2];
        wire.extend_from_slice(&[5, 1, 0, 3, 9]);
        wire.extend_from_slice(b"localhost");
        wire.extend_from_slice(&[0x1f, 0x90]);
        for split in 0..=wire.len() {
            // Feed the first `split` bytes, then the rest, as a reader would.
            let mut have = wire[..split].to_vec();
            let mut fed = split;
            let (g_len, methods) = loop {
                match parse_greeting(&have).unwrap() {
                    Status::Complete(g, n) => break (n, g.methods.to_vec()),
                    Status::Partial => {
                        have.push(wire[fed]);
                        fed += 1;
                    }
                }
            };
            assert_eq!(methods, [0, 2]);
            let mut rest = have[g_len..].to_vec();
            loop {
                match parse_request(&rest).unwrap() {
                    Status::Complete(r, n) => {
                        assert_eq!(r.command, Command::Connect);
                        assert_eq!(r.addr, Addr::Domain(b"localhost"));
                        assert_eq!(r.port, 8080);
                        assert_eq!(g_len + n, wire.len());
                        break;
                    }
                    Status::Partial => {
                        rest.push(wire[fed]);
                        fed += 1;
                    }
                }
            }
        }
    }

    /// Random inputs, biased towards plausible headers: parsers never panic,
    /// never claim more bytes than given, every prefix of a complete
    /// message is `Partial`, and an error stays an error whatever follows
    /// (errors are final).
    #[test]
    fn random_inputs_keep_the_parser_contract() {
        type Parse = fn(&[u8]) -> Result<Status<usize>, ProtoError>;
        #[allow(unused_mut)]
        let mut parsers: Vec<(&str, Parse)> = vec![
            ("greeting", |b| parse_greeting(b).map(|s| s.map(|_| 0))),
            ("request", |b| parse_request(b).map(|s| s.map(|_| 0))),
            ("reply", |b| parse_reply(b).map(|s| s.map(|_| 0))),
            ("auth", |b| parse_auth(b).map(|s| s.map(|_| 0))),
            ("socks4", |b| parse_socks4(b).map(|s| s.map(|_| 0))),
        ];
        // HTTP errors have their own type; fold them into one for the
        // contract (final, never a panic).
        #[cfg(feature = "http")]
        parsers.push(("http", |b| parse_connect(b).map(|s| s.map(|_| 0)).map_err(|_| ProtoError::Truncated)));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Plausible first bytes: versions 5 and 1, small commands,
            // real address types, short lengths.
            let plausible =
                [[5u8, 1, 4][(next() % 3) as usize], 1, 0, [1, 3, 4][(next() % 3) as usize], (next() % 8) as u8];
            if next() % 8 == 0 {
                // Now and then an HTTP head, cut anywhere.
                let head = b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Basic YTpi\r\n\r\n";
                buf = head[..(next() as usize % (head.len() + 1))].to_vec();
            }
            for (i, b) in plausible.iter().enumerate() {
                if i < buf.len() && next() % 4 != 0 {
                    buf[i] = *b;
                }
            }
            if buf.len() > 1 && buf[0] == 1 {
                buf[1] %= 8; // a short user name, so the password length is in reach
            }
            let _ = sniff(&buf);
            // The UDP header: a datagram is whole, so there is no Partial;
            // it never panics, never claims more than given, and what it
            // accepts encodes back the same (for IP addresses).
            let mut datagram = buf.clone();
            if datagram.len() > 3 {
                datagram[3] = [1, 3, 4, 9][(next() % 4) as usize];
            }
            if let Ok((h, n)) = parse_udp_header(&datagram) {
                assert!(n <= datagram.len());
                if let (Addr::V4(_) | Addr::V6(_), Some(ip)) = (h.addr, h.addr.ip()) {
                    let mut out = [0u8; MAX_UDP_IP_HEADER_LEN];
                    let m = encode_udp_header(std::net::SocketAddr::new(ip, h.port), &mut out);
                    assert_eq!((&out[3..m], m), (&datagram[3..n], n));
                }
            }
            for &(name, parse) in &parsers {
                match parse(&buf) {
                    Ok(Status::Complete(_, n)) => {
                        assert!(n <= buf.len(), "{name}: took {n} of {}", buf.len());
                        for k in 0..n {
                            assert_eq!(parse(&buf[..k]), Ok(Status::Partial), "{name}: prefix {k} of {buf:?}");
                        }
                    }
                    Ok(Status::Partial) => {}
                    Err(e) => {
                        let mut more = buf.clone();
                        more.extend_from_slice(&[next() as u8, 0, 3, 1, 255]);
                        assert_eq!(parse(&more), Err(e), "{name}: error must be final for {buf:?}");
                    }
                }
            }
        }
    }
}
