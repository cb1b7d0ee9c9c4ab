//! What the fuzz targets check, one function per target; each target in
//! `fuzz_targets/` only hands libFuzzer's bytes to its function here.
//!
//! The contract of a stream parser (every SOCKS message on TCP and the HTTP
//! head), after httparse: it never panics; over growing prefixes of the
//! input it answers `Partial` until the first prefix that decides, and from
//! there on the same answer; a `Complete` is first given at exactly the
//! length it claims (so it never claims more than it was given, and every
//! shorter prefix of a message is `Partial`); an error is final. Beyond
//! that, each message is rebuilt from what the parser returned and must be
//! the bytes it took: nothing is dropped or invented.

use slabsocks::proto::{
    Addr, Command, ConnectHead, Credentials, Greeting, HttpError, MAX_UDP_HEADER_LEN, Method, ProtoError, Reply,
    ReplyFrame, Request, SOCKS4_REPLY_LEN, Sniff, Socks4Request, Status, UdpHeader, basic_credentials, encode_reply,
    encode_socks4_reply, encode_udp_header, parse_auth, parse_connect, parse_greeting, parse_reply, parse_request,
    parse_socks4, parse_udp_header, sniff, udp_header_len,
};
use slabsocks::proto::{MAX_PROXY_HEADER, ProxyHeader, encode_proxy_v2, parse_proxy};
use std::fmt::Debug;
use std::net::{SocketAddr, SocketAddrV4};

/// Checks the stream contract on `buf` and returns the answer for all of it.
pub fn stream<'a, T, E>(buf: &'a [u8], parse: impl Fn(&'a [u8]) -> Result<Status<T>, E>) -> Result<Status<T>, E>
where
    T: PartialEq + Debug,
    E: PartialEq + Debug,
{
    let whole = parse(buf);
    let decided = (0..=buf.len()).map(|k| (k, parse(&buf[..k]))).find(|(_, r)| !matches!(r, Ok(Status::Partial)));
    match decided {
        // Every prefix, and so the whole input, is Partial.
        None => {}
        Some((k, Ok(Status::Complete(t, n)))) => {
            assert!(n > 0, "a message of no bytes");
            assert_eq!(n, k, "first Complete at {k} bytes claims {n}");
            assert_eq!(whole, Ok(Status::Complete(t, n)), "more bytes changed the message taken at {k}");
        }
        Some((k, Err(e))) => assert_eq!(whole, Err(e), "the error at {k} bytes is not final"),
        Some((_, Ok(Status::Partial))) => unreachable!(),
    }
    whole
}

/// ATYP, address and port as [`Addr::encode`] writes them.
fn addr_bytes(addr: &Addr<'_>, port: u16) -> Vec<u8> {
    let mut out = vec![0u8; addr.encoded_len()];
    let n = addr.encode(port, &mut out);
    assert_eq!(n, out.len());
    out
}

/// The PROXY protocol header (v1 and v2): the stream contract; a header is
/// never longer than its bound; a v2 header for TCP re-encodes to the
/// bytes taken (when it carries no TLVs), and a v1 line is text ending in
/// CRLF.
pub fn proxy(buf: &[u8]) {
    if let Ok(Status::Complete(header, n)) = stream(buf, parse_proxy) {
        assert!(n <= MAX_PROXY_HEADER);
        if buf.starts_with(b"PROXY ") {
            assert!(n <= 107 && buf[..n].ends_with(b"\r\n"));
        } else if let ProxyHeader::Proxied { source, dest } = header
            && buf[12] == 0x21
            && n == if buf[13] == 0x11 { 28 } else { 52 }
            && source.is_ipv4() == dest.is_ipv4()
            && (buf[13] == 0x11) == source.is_ipv4()
        {
            let mut out = [0u8; 52];
            let m = encode_proxy_v2(source, dest, &mut out);
            assert_eq!(out[..m], buf[..n]);
        }
    }
}

pub fn greeting(buf: &[u8]) {
    if let Ok(Status::Complete(Greeting { methods }, n)) = stream(buf, parse_greeting) {
        assert_eq!([&[5, methods.len() as u8], methods].concat(), buf[..n]);
    }
}

pub fn auth(buf: &[u8]) {
    if let Ok(Status::Complete(Credentials { user, password }, n)) = stream(buf, parse_auth) {
        let rebuilt = [&[1, user.len() as u8], user, &[password.len() as u8], password].concat();
        assert_eq!(rebuilt, buf[..n]);
    }
}

pub fn request(buf: &[u8]) {
    if let Ok(Status::Complete(Request { command, addr, port }, n)) = stream(buf, parse_request) {
        // RSV is not checked (clients send garbage there): take it as sent.
        let rebuilt = [&[5, command as u8, buf[2]][..], &addr_bytes(&addr, port)].concat();
        assert_eq!(rebuilt, buf[..n]);
        assert!(!matches!(addr, Addr::Domain(d) if d.is_empty()));
    }
}

/// The reply codes of RFC 1928 §6, in wire order.
pub const REPLIES: [Reply; 9] = [
    Reply::Succeeded,
    Reply::GeneralFailure,
    Reply::NotAllowed,
    Reply::NetworkUnreachable,
    Reply::HostUnreachable,
    Reply::ConnectionRefused,
    Reply::TtlExpired,
    Reply::CommandNotSupported,
    Reply::AddrTypeNotSupported,
];

pub fn reply(buf: &[u8]) {
    if let Ok(Status::Complete(ReplyFrame { rep, addr, port }, n)) = stream(buf, parse_reply) {
        let rebuilt = [&[5, rep, buf[2]][..], &addr_bytes(&addr, port)].concat();
        assert_eq!(rebuilt, buf[..n]);
        // The server's encoder writes the same frame, RSV 0.
        if let Some(&code) = REPLIES.get(usize::from(rep)) {
            let mut out = vec![0u8; n];
            assert_eq!(encode_reply(code, &addr, port, &mut out), n);
            assert_eq!((&out[..3], &out[3..]), (&[5, rep, 0][..], &buf[3..n]));
        }
    }
}

/// A datagram is whole, so there is no `Partial`: a header cut short is
/// `Truncated`, data after it is not looked at, and the other errors are
/// decided by the ATYP byte and the domain length alone.
pub fn udp_header(d: &[u8]) {
    match parse_udp_header(d) {
        Ok((UdpHeader { frag, addr, port }, n)) => {
            assert!(n <= d.len(), "took {n} of {}", d.len());
            assert_eq!(parse_udp_header(&d[..n]), Ok((UdpHeader { frag, addr, port }, n)));
            for k in 0..n {
                assert_eq!(parse_udp_header(&d[..k]), Err(ProtoError::Truncated), "cut at {k}");
            }
            let mut rebuilt = vec![d[0], d[1], frag];
            rebuilt.extend_from_slice(&addr_bytes(&addr, port));
            assert_eq!(rebuilt, d[..n]);
            assert!(n <= MAX_UDP_HEADER_LEN);
            // What the server writes for an IP source parses back to it.
            if let (Addr::V4(_) | Addr::V6(_), Some(ip)) = (addr, addr.ip()) {
                let from = SocketAddr::new(ip, port);
                let mut out = [0u8; MAX_UDP_HEADER_LEN];
                let m = encode_udp_header(from, &mut out);
                assert_eq!((m, &out[..3], &out[3..m]), (udp_header_len(from), &[0u8, 0, 0][..], &d[3..n]));
            }
        }
        Err(ProtoError::Truncated) => {}
        Err(ProtoError::BadAddrType(t)) => assert!(d[3] == t && ![1, 3, 4].contains(&t), "{d:?}"),
        Err(ProtoError::EmptyDomain) => assert_eq!(&d[3..5], [3, 0]),
        Err(e) => panic!("{e:?} for a datagram"),
    }
}

pub fn socks4(buf: &[u8]) {
    let Ok(Status::Complete(Socks4Request { command, port, ip, user, domain }, n)) = stream(buf, parse_socks4) else {
        return;
    };
    assert!(matches!(command, Command::Connect | Command::Bind));
    let marker = matches!(ip.octets(), [0, 0, 0, x] if x != 0);
    assert_eq!(domain.is_some(), marker, "SOCKS4a exactly when DSTIP is 0.0.0.x, x != 0");
    let mut rebuilt = vec![4, command as u8];
    rebuilt.extend_from_slice(&port.to_be_bytes());
    rebuilt.extend_from_slice(&ip.octets());
    for field in [Some(user), domain].into_iter().flatten() {
        assert!(field.len() <= 255 && !field.contains(&0));
        rebuilt.extend_from_slice(field);
        rebuilt.push(0);
    }
    assert_eq!(rebuilt, buf[..n]);
    assert!(domain != Some(b""));
    // The reply for that address carries it back.
    let mut out = [0u8; SOCKS4_REPLY_LEN];
    encode_socks4_reply(true, Some(SocketAddr::V4(SocketAddrV4::new(ip, port))), &mut out);
    assert_eq!((out[0], out[1], &out[2..4], &out[4..]), (0, 0x5A, &buf[2..4], &buf[4..8]));
}

/// `parse_connect`, its errors folded into one with the feature
/// `known-http-error-split` (fuzz/Cargo.toml): a method other than CONNECT
/// is refused (405) as soon as it is known, but the whole head, parsed at
/// once, can fail first for a bad byte after it (400), so the answer
/// depends on how the bytes arrived. The strict check stays the default.
fn parse_http(buf: &[u8]) -> Result<Status<ConnectHead<'_>>, Option<HttpError>> {
    parse_connect(buf).map_err(|e| (!cfg!(feature = "known-http-error-split")).then_some(e))
}

pub fn http_connect(buf: &[u8]) {
    basic(buf);
    let Ok(Status::Complete(head, n)) = stream(buf, parse_http) else { return };
    let taken = &buf[..n];
    // RFC 9112 §2.2: empty lines before the request line are ignored.
    let request_line = &taken[taken.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(n)..];
    assert!(request_line.starts_with(b"CONNECT ") && taken.ends_with(b"\n"), "{taken:?}");
    assert!(!head.host.is_empty() && head.host.len() <= 255 && head.port != 0);
    let host = head.host.as_bytes();
    assert!(taken.windows(host.len()).any(|w| w == host));
    if let Some(value) = head.authorization {
        basic(value);
    }
}

/// `basic_credentials` against a reference: the scheme up to the first
/// space, then padded standard base64 decoded by the `base64` crate (bits
/// after the last byte ignored, as the codec does), split at the first colon.
pub fn basic(value: &[u8]) {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const B64: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
    );
    let mut out = [0u8; 511];
    let got = basic_credentials(value, &mut out).map(|(u, p)| (u.to_vec(), p.to_vec()));
    let trimmed = value.trim_ascii();
    let want = trimmed
        .iter()
        .position(|&b| b == b' ')
        .map(|at| trimmed.split_at(at))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"basic"))
        .and_then(|(_, rest)| B64.decode(rest.trim_ascii()).ok())
        .filter(|decoded| decoded.len() <= out.len())
        .and_then(|decoded| {
            let colon = decoded.iter().position(|&b| b == b':')?;
            Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
        });
    assert_eq!(got, want, "{:?}", value.escape_ascii().to_string());
}

/// The phases of the server's handshake (src/conn/handshake.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Sniff,
    Greeting,
    Auth,
    Request,
    Socks4,
    Http,
}

/// How a handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The bytes ran out in this phase.
    Waiting(Phase),
    /// The message of this phase was refused (closed, or answered and
    /// closed).
    Refused(Phase, String),
    /// The buffer filled up in this phase without a whole message.
    TooLong(Phase),
    /// A whole request: on to the dial step.
    Request,
}

/// The messages each phase took (and their lengths), in order, and how it
/// all ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub messages: Vec<(Phase, String, usize)>,
    pub end: End,
    /// Bytes the messages took; the rest is the pipelined payload.
    pub consumed: usize,
}

/// What a phase made of the buffer.
enum Step {
    Read,
    /// A message of `n` bytes, and the phase for what follows.
    Next(Phase, String, usize),
    /// The request, of `n` bytes.
    Done(String, usize),
    End(End),
}

/// The handshake buffer's size, and the most an HTTP head may grow it to
/// (`HANDSHAKE_BUF` and `HTTP_BUF` in src/buf.rs).
pub const HANDSHAKE_BUF: usize = 1024;
pub const HTTP_BUF: usize = 8 * 1024;

/// One phase's step over `data`, as in src/conn/handshake.rs. The server's
/// configuration is the widest: every dialect on, users configured, an
/// exempt client (so both methods are acceptable, a password preferred);
/// every login succeeds.
fn step(phase: Phase, data: &[u8]) -> Step {
    let refused = |e: &dyn Debug| Step::End(End::Refused(phase, format!("{e:?}")));
    match phase {
        Phase::Sniff => match sniff(data) {
            Status::Partial => Step::Read,
            Status::Complete(dialect, n) => {
                assert_eq!(n, 0, "sniffing consumes nothing");
                let to = match dialect {
                    Sniff::Socks5 => Phase::Greeting,
                    Sniff::Socks4 => Phase::Socks4,
                    Sniff::Http => Phase::Http,
                    Sniff::Other => return refused(&dialect),
                };
                Step::Next(to, format!("{dialect:?}"), 0)
            }
        },
        Phase::Greeting => match parse_greeting(data) {
            Ok(Status::Partial) => Step::Read,
            Err(e) => refused(&e),
            Ok(Status::Complete(g, n)) => match g.choose(&[Method::UserPass, Method::NoAuth]) {
                Method::UserPass => Step::Next(Phase::Auth, format!("{g:?}"), n),
                Method::NoAuth => Step::Next(Phase::Request, format!("{g:?}"), n),
                other => refused(&other),
            },
        },
        Phase::Auth => match parse_auth(data) {
            Ok(Status::Partial) => Step::Read,
            Err(e) => refused(&e),
            Ok(Status::Complete(c, n)) => Step::Next(Phase::Request, format!("{:?}", (c.user, c.password)), n),
        },
        Phase::Request => match parse_request(data) {
            Ok(Status::Partial) => Step::Read,
            Err(e) => refused(&(e, e.reply())),
            Ok(Status::Complete(r, n)) => Step::Done(format!("{r:?}"), n),
        },
        Phase::Socks4 => match parse_socks4(data) {
            Ok(Status::Partial) => Step::Read,
            Err(e) => refused(&e),
            Ok(Status::Complete(r, n)) => Step::Done(format!("{r:?}"), n),
        },
        Phase::Http => match parse_http(data) {
            Ok(Status::Partial) => Step::Read,
            Err(e) => refused(&(e, e.map(HttpError::status))),
            Ok(Status::Complete(head, n)) => {
                let mut decoded = [0u8; 255 + 1 + 255];
                let login = head.authorization.and_then(|v| basic_credentials(v, &mut decoded));
                Step::Done(format!("{head:?} {login:?}"), n)
            }
        },
    }
}

/// Runs the handshake's parsers over `input` the way the server's
/// `Handshake::step` does: a buffer that reads what has arrived (as much as
/// it has room for), each phase parsing from the buffer's start, a whole
/// message consumed and the next phase run at once on what is left. The
/// bytes arrive in pieces of the sizes `arrivals` gives (then all at once).
pub fn run_chain(input: &[u8], mut arrivals: impl Iterator<Item = usize>) -> Chain {
    let (mut buf, mut arrived, mut read) = (Vec::new(), 0usize, 0usize);
    let (mut messages, mut consumed, mut phase) = (Vec::new(), 0, Phase::Sniff);
    let end = loop {
        match step(phase, &buf) {
            Step::End(end) => break end,
            Step::Done(message, n) => {
                assert!(n <= buf.len(), "{phase:?} took {n} of {}", buf.len());
                messages.push((phase, message, n));
                consumed += n;
                break End::Request;
            }
            Step::Next(to, message, n) => {
                assert!(n <= buf.len(), "{phase:?} took {n} of {}", buf.len());
                messages.push((phase, message, n));
                buf.drain(..n);
                consumed += n;
                phase = to;
                continue;
            }
            Step::Read => {}
        }
        // Only an HTTP head may grow the buffer.
        let room = if phase == Phase::Http { HTTP_BUF } else { HANDSHAKE_BUF };
        if buf.len() == room {
            break End::TooLong(phase);
        }
        if read == arrived {
            if arrived == input.len() {
                break End::Waiting(phase);
            }
            arrived = input.len().min(arrived.saturating_add(arrivals.next().unwrap_or(usize::MAX)));
        }
        let take = (arrived - read).min(room - buf.len());
        buf.extend_from_slice(&input[read..read + take]);
        read += take;
    };
    assert!(consumed <= input.len());
    Chain { messages, end, consumed }
}

/// However the client's bytes are cut into pieces, the server makes the
/// same of them; no SOCKS message outgrows the handshake buffer.
pub fn handshake_chain(input: &[u8]) {
    let whole = run_chain(input, std::iter::empty());
    let bytewise = run_chain(input, std::iter::repeat(1));
    assert_eq!(whole, bytewise, "all at once vs one byte at a time");
    // Pieces of 1 to 64 bytes, their sizes taken from the input itself.
    let pieces = run_chain(input, input.iter().map(|&b| usize::from(b % 64) + 1).cycle());
    assert_eq!(whole, pieces, "all at once vs in pieces");
    if let End::TooLong(phase) = whole.end {
        assert_eq!(phase, Phase::Http, "a SOCKS message is decided within {HANDSHAKE_BUF} bytes");
    }
}
