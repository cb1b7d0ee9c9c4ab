//! Property tests of the codec (README: "Property tests"): generated
//! messages cut into pieces anywhere parse as the whole does; arbitrary
//! bytes never panic and never claim more than they were given; encoding
//! then parsing gives back every reply, UDP header and SOCKS4 reply.
//! A bounded number of cases keeps the file at a few seconds.

use proptest::prelude::*;
use proptest::sample::{Index, select};
use slabsocks::proto::{
    Addr, Command, Greeting, MAX_HTTP_HEADERS, Method, ProtoError, Reply, ReplyFrame, Request, SOCKS4_REPLY_LEN,
    Socks4Request, Status, UdpHeader, basic_credentials, encode_auth_reply, encode_method, encode_reply,
    encode_socks4_reply, encode_udp_header, parse_auth, parse_connect, parse_greeting, parse_reply, parse_request,
    parse_socks4, parse_udp_header, sniff, udp_header_len,
};
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Cases per property.
const CASES: u32 = 1024;

/// A parser whose message and error are reduced to their `Debug` text, so
/// that results borrowed from different buffers compare.
type Parse = fn(&[u8]) -> Result<Status<String>, String>;

fn shown<T: Debug, E: Debug>(r: Result<Status<T>, E>) -> Result<Status<String>, String> {
    r.map(|s| s.map(|t| format!("{t:?}"))).map_err(|e| format!("{e:?}"))
}

const GREETING: Parse = |b| shown(parse_greeting(b));
// Credentials' Debug hides the password: compare the bytes.
const AUTH: Parse = |b| shown(parse_auth(b).map(|s| s.map(|c| (c.user, c.password))));
const REQUEST: Parse = |b| shown(parse_request(b));
const REPLY: Parse = |b| shown(parse_reply(b));
const SOCKS4: Parse = |b| shown(parse_socks4(b));
const HTTP: Parse = |b| shown(parse_connect(b));

/// Feeds `wire` to `parsers` in order, as the handshake does: the bytes
/// arrive in pieces ending at `cuts`; after each piece the buffer is parsed
/// until a message is not complete, each complete one consumed and the next
/// parser run on what is left. Returns every message with its length, and
/// the bytes after the last one.
fn feed(wire: &[u8], cuts: &[usize], parsers: &[Parse]) -> (Vec<(String, usize)>, Vec<u8>) {
    let mut ends: Vec<usize> = cuts.iter().copied().chain([wire.len()]).collect();
    ends.sort_unstable();
    let (mut buf, mut got, mut from) = (Vec::new(), Vec::new(), 0);
    for end in ends {
        buf.extend_from_slice(&wire[from..end]);
        from = end;
        while let Some(parse) = parsers.get(got.len()) {
            match parse(&buf) {
                Ok(Status::Complete(message, n)) => {
                    assert!(n <= buf.len());
                    got.push((message, n));
                    buf.drain(..n);
                }
                Ok(Status::Partial) => break,
                Err(e) => panic!("{e} after {end} of {} bytes", wire.len()),
            }
        }
    }
    (got, buf)
}

/// Up to eight places to cut a message, whatever its length.
fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..8)
}

/// The places to cut `wire`.
fn places(cuts: &[Index], wire: &[u8]) -> Vec<usize> {
    cuts.iter().map(|i| i.index(wire.len() + 1)).collect()
}

/// An address as generated: IPv4, IPv6 or a name of 1 to 255 bytes.
#[derive(Debug, Clone)]
enum OwnedAddr {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    Domain(Vec<u8>),
}

impl OwnedAddr {
    fn addr(&self) -> Addr<'_> {
        match self {
            OwnedAddr::V4(ip) => Addr::V4(*ip),
            OwnedAddr::V6(ip) => Addr::V6(*ip),
            OwnedAddr::Domain(d) => Addr::Domain(d),
        }
    }

    fn bytes(&self, port: u16) -> Vec<u8> {
        let addr = self.addr();
        let mut out = vec![0u8; addr.encoded_len()];
        assert_eq!(addr.encode(port, &mut out), out.len());
        out
    }
}

fn v4() -> impl Strategy<Value = OwnedAddr> {
    any::<[u8; 4]>().prop_map(|b| OwnedAddr::V4(b.into()))
}

fn v6() -> impl Strategy<Value = OwnedAddr> {
    any::<[u8; 16]>().prop_map(|b| OwnedAddr::V6(b.into()))
}

fn domain() -> impl Strategy<Value = OwnedAddr> {
    prop::collection::vec(any::<u8>(), 1..=255).prop_map(OwnedAddr::Domain)
}

fn addr() -> impl Strategy<Value = OwnedAddr> {
    prop_oneof![v4(), v6(), domain()]
}

/// A field of a SOCKS4 request: no NUL, at most 255 bytes.
fn socks4_field(min: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, min..=255)
}

/// Standard base64 with padding, for Basic credentials.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            let c = ALPHABET[(n >> (18 - 6 * i) & 63) as usize];
            out.push(if i <= chunk.len() { char::from(c) } else { '=' });
        }
    }
    out
}

/// A CONNECT target's host as sent: a name, an IPv4 literal or a
/// bracketed IPv6 literal; and the host the parser must give back.
fn host() -> impl Strategy<Value = (String, String)> {
    let name = prop::collection::vec(select(&b"abcdefghijklmnopqrstuvwxyz0123456789.-_"[..]), 1..=80)
        .prop_map(|b| String::from_utf8(b).unwrap());
    prop_oneof![
        name.prop_map(|h| (h.clone(), h)),
        any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()).prop_map(|h| (h.clone(), h)),
        any::<[u8; 16]>().prop_map(|b| Ipv6Addr::from(b).to_string()).prop_map(|h| (format!("[{h}]"), h)),
    ]
}

/// Headers other than Proxy-Authorization: `X-` names, visible values.
fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let token =
        prop::collection::vec(select(&b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"[..]), 1..16);
    let value = prop::collection::vec(0x21u8..=0x7e, 0..40);
    prop::collection::vec(
        (token, value)
            .prop_map(|(n, v)| (format!("X-{}", String::from_utf8(n).unwrap()), String::from_utf8(v).unwrap())),
        0..8,
    )
}

/// The nine reply codes of RFC 1928 §6.
const REPLIES: [Reply; 9] = [
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

/// Arbitrary bytes; two thirds of them start like one of the dialects: a
/// SOCKS version and a small second byte, or an HTTP method.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let any_bytes = prop::collection::vec(any::<u8>(), 0..600);
    let socks = (select(&[1u8, 4, 5][..]), select(&[0u8, 1, 2, 3, 4][..]), any_bytes.clone())
        .prop_map(|(a, b, rest)| [&[a, b][..], &rest].concat());
    let words: &[&[u8]] = &[b"GET ", b"CONNECT ", b"CONNECT a:1 HTTP/1.1\r\n", b"CONNECT [::1]:443 HTTP/1.0\n"];
    let http = (select(words), any_bytes.clone()).prop_map(|(w, rest)| [w, &rest].concat());
    prop_oneof![any_bytes, socks, http]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Greeting and request in one write, with a pipelined payload after
    /// them, cut anywhere: the same two messages, the payload untouched.
    #[test]
    fn greeting_and_request_pipelined_any_split(
        methods in prop::collection::vec(any::<u8>(), 1..=255),
        command in 1u8..=3,
        rsv in any::<u8>(),
        addr in addr(),
        port in any::<u16>(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
        wire_cuts in cuts(),
    ) {
        let greeting = [&[5, methods.len() as u8][..], &methods].concat();
        let request = [&[5, command, rsv][..], &addr.bytes(port)].concat();
        let wire = [&greeting[..], &request, &payload].concat();
        let wire_cuts = places(&wire_cuts, &wire);
        let whole = feed(&wire, &[], &[GREETING, REQUEST]);
        prop_assert_eq!(&feed(&wire, &wire_cuts, &[GREETING, REQUEST]), &whole);
        let want_greeting = format!("{:?}", Greeting { methods: &methods });
        let command = Command::from_u8(command).unwrap();
        let want_request = format!("{:?}", Request { command, addr: addr.addr(), port });
        prop_assert_eq!(whole.0, vec![(want_greeting, greeting.len()), (want_request, request.len())]);
        prop_assert_eq!(whole.1, payload);
    }

    /// RFC 1929 with ULEN and PLEN from 0 to 255, then a request, cut
    /// anywhere.
    #[test]
    fn auth_any_split(
        user in prop::collection::vec(any::<u8>(), 0..=255),
        password in prop::collection::vec(any::<u8>(), 0..=255),
        wire_cuts in cuts(),
    ) {
        let auth = [&[1, user.len() as u8][..], &user, &[password.len() as u8], &password].concat();
        let wire = [&auth[..], &[5, 1, 0, 1, 127, 0, 0, 1, 0, 80]].concat();
        let wire_cuts = places(&wire_cuts, &wire);
        let got = feed(&wire, &wire_cuts, &[AUTH, REQUEST]);
        prop_assert_eq!(&got, &feed(&wire, &[], &[AUTH, REQUEST]));
        let want = format!("{:?}", (&user[..], &password[..]));
        prop_assert_eq!(&got.0[0], &(want, auth.len()));
        prop_assert_eq!(got.0.len(), 2);
    }

    /// SOCKS4 and SOCKS4a (USERID and name up to the 255-byte bound), with
    /// a payload, cut anywhere.
    #[test]
    fn socks4_and_4a_any_split(
        command in 1u8..=2,
        port in any::<u16>(),
        ip in any::<[u8; 4]>(),
        marker in 1u8..=255,
        socks4a in any::<bool>(),
        user in socks4_field(0),
        name in socks4_field(1),
        payload in prop::collection::vec(any::<u8>(), 0..32),
        wire_cuts in cuts(),
    ) {
        // A plain SOCKS4 address that happens to be 0.0.0.x (x != 0) is
        // a SOCKS4a marker; keep those for the SOCKS4a half.
        let ip = if socks4a { [0, 0, 0, marker] } else if ip[..3] == [0, 0, 0] { [ip[3], 0, 0, 1] } else { ip };
        let mut request = vec![4, command];
        request.extend_from_slice(&port.to_be_bytes());
        request.extend_from_slice(&ip);
        request.extend_from_slice(&user);
        request.push(0);
        if socks4a {
            request.extend_from_slice(&name);
            request.push(0);
        }
        let wire = [&request[..], &payload].concat();
        let wire_cuts = places(&wire_cuts, &wire);
        let got = feed(&wire, &wire_cuts, &[SOCKS4]);
        prop_assert_eq!(&got, &feed(&wire, &[], &[SOCKS4]));
        let want = Socks4Request {
            command: Command::from_u8(command).unwrap(),
            port,
            ip: ip.into(),
            user: &user,
            domain: socks4a.then_some(&name[..]),
        };
        prop_assert_eq!(got, (vec![(format!("{want:?}"), request.len())], payload));
    }

    /// An HTTP CONNECT head (name, IPv4 or IPv6 target; other headers;
    /// Basic credentials or none) with a pipelined payload, cut anywhere;
    /// the credentials decode to what was encoded.
    #[test]
    fn http_connect_head_any_split(
        (target, want_host) in host(),
        port in 1u16..,
        headers in headers(),
        credentials in prop::option::of((
            prop::collection::vec(any::<u8>().prop_filter("no colon", |&b| b != b':'), 0..64),
            prop::collection::vec(any::<u8>(), 0..64),
        )),
        lf_only in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..32),
        wire_cuts in cuts(),
    ) {
        let eol = if lf_only { "\n" } else { "\r\n" };
        let mut head = format!("CONNECT {target}:{port} HTTP/1.1{eol}Host: {target}:{port}{eol}");
        let mut lines = headers.clone();
        if let Some((user, password)) = &credentials {
            let value = format!("Basic {}", base64(&[&user[..], b":", password].concat()));
            lines.insert(headers.len() / 2, ("Proxy-Authorization".into(), value));
        }
        for (name, value) in &lines {
            head.push_str(&format!("{name}: {value}{eol}"));
        }
        head.push_str(eol);
        prop_assume!(lines.len() < MAX_HTTP_HEADERS);
        let wire = [head.as_bytes(), &payload].concat();
        let wire_cuts = places(&wire_cuts, &wire);
        let got = feed(&wire, &wire_cuts, &[HTTP]);
        prop_assert_eq!(&got, &feed(&wire, &[], &[HTTP]));
        prop_assert_eq!(&got.1, &payload);
        let Ok(Status::Complete(parsed, n)) = parse_connect(&wire) else { panic!("{head}") };
        prop_assert_eq!((parsed.host, parsed.port, n), (&want_host[..], port, head.len()));
        let mut out = [0u8; 255 + 1 + 255];
        let decoded = parsed.authorization.and_then(|v| basic_credentials(v, &mut out));
        prop_assert_eq!(decoded, credentials.as_ref().map(|(u, p)| (&u[..], &p[..])));
    }

    /// Arbitrary bytes: no parser panics or claims more than it was given;
    /// over growing prefixes the answer is `Partial` until the first that
    /// decides, and the same from there on, so every prefix of a complete
    /// message is `Partial` and an error is final (HTTP's too, since the
    /// fix for the finding in tests/fuzz_regressions.rs).
    #[test]
    fn arbitrary_bytes_keep_the_contract(buf in noise(), more in prop::collection::vec(any::<u8>(), 1..8)) {
        let _ = sniff(&buf);
        let mut out = [0u8; 511];
        let _ = basic_credentials(&buf, &mut out);
        let longer = [&buf[..], &more].concat();
        for (name, parse, errors_final) in [
            ("greeting", GREETING, true),
            ("auth", AUTH, true),
            ("request", REQUEST, true),
            ("reply", REPLY, true),
            ("socks4", SOCKS4, true),
            ("http", HTTP, true),
        ] {
            let whole = parse(&longer);
            let decided = (0..=longer.len()).map(|k| (k, parse(&longer[..k]))).find(|(_, r)| r != &Ok(Status::Partial));
            match decided {
                None => {}
                Some((k, Ok(Status::Complete(message, n)))) => {
                    prop_assert_eq!(n, k, "{}: first complete at {} bytes claims {}", name, k, n);
                    prop_assert_eq!(parse(&buf), if n <= buf.len() { Ok(Status::Complete(message.clone(), n)) } else { Ok(Status::Partial) });
                    prop_assert_eq!(whole, Ok(Status::Complete(message, n)), "{}", name);
                }
                Some((k, Err(e))) if errors_final => prop_assert_eq!(whole, Err(e), "{}: error at {} not final", name, k),
                Some(_) => prop_assert!(whole.is_err(), "{}: an error, then no error", name),
            }
        }
        match parse_udp_header(&buf) {
            Ok((_, n)) => prop_assert!(n <= buf.len()),
            Err(ProtoError::Truncated | ProtoError::BadAddrType(_) | ProtoError::EmptyDomain) => {}
            Err(e) => prop_assert!(false, "{:?} for a datagram", e),
        }
    }

    /// Every reply code with every address type and any port: encoded,
    /// every prefix is `Partial` and the whole parses back to it.
    #[test]
    fn every_reply_round_trips(v4 in v4(), v6 in v6(), name in domain(), port in any::<u16>()) {
        let mut out = [0u8; 3 + 2 + 255 + 2];
        for addr in [&v4, &v6, &name] {
            let addr = addr.addr();
            for rep in REPLIES {
                let n = encode_reply(rep, &addr, port, &mut out);
                prop_assert_eq!(n, 3 + addr.encoded_len());
                for k in 0..n {
                    prop_assert_eq!(parse_reply(&out[..k]), Ok(Status::Partial));
                }
                let want = ReplyFrame { rep: rep as u8, addr, port };
                prop_assert_eq!(parse_reply(&out[..n]), Ok(Status::Complete(want, n)));
            }
        }
    }

    /// Every UDP header the server writes (an IPv4 or IPv6 source, any
    /// port) parses back to its source, with the data after it untouched.
    #[test]
    fn every_udp_header_round_trips(ip in prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ], port in any::<u16>(), data in prop::collection::vec(any::<u8>(), 0..32)) {
        let from = SocketAddr::new(ip, port);
        let mut out = vec![0u8; 3 + 1 + 16 + 2];
        let n = encode_udp_header(from, &mut out);
        prop_assert_eq!(n, udp_header_len(from));
        out.truncate(n);
        out.extend_from_slice(&data);
        let (header, at) = parse_udp_header(&out).unwrap();
        prop_assert_eq!((header, at), (UdpHeader { frag: 0, addr: Addr::from(ip), port }, n));
        prop_assert_eq!(&out[at..], &data[..]);
    }

    /// Every SOCKS4 reply. The codec has no parser for them (only clients
    /// read them), so the eight bytes are read by their layout: VN 0, CD
    /// 0x5A or 0x5B, DSTPORT, DSTIP; an IPv6 address is its IPv4 mapping or
    /// 0.0.0.0, and none is all zeros.
    #[test]
    fn every_socks4_reply_round_trips(granted in any::<bool>(), addr in prop::option::of(prop_oneof![
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        any::<([u8; 16], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).to_ipv6_mapped().into(), port)),
    ])) {
        let mut out = [0xAAu8; SOCKS4_REPLY_LEN];
        prop_assert_eq!(encode_socks4_reply(granted, addr, &mut out), SOCKS4_REPLY_LEN);
        let (vn, cd) = (out[0], out[1]);
        let port = u16::from_be_bytes([out[2], out[3]]);
        let ip = Ipv4Addr::new(out[4], out[5], out[6], out[7]);
        let want = match addr {
            None => (Ipv4Addr::UNSPECIFIED, 0),
            Some(SocketAddr::V4(a)) => (*a.ip(), a.port()),
            Some(SocketAddr::V6(a)) => (a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED), a.port()),
        };
        prop_assert_eq!((vn, cd, (ip, port)), (0, if granted { 0x5A } else { 0x5B }, want));
    }
}

/// The two-byte answers: every method and both auth results.
#[test]
fn method_and_auth_replies() {
    let mut out = [0u8; 2];
    for method in [Method::NoAuth, Method::Gssapi, Method::UserPass, Method::NoAcceptable] {
        assert_eq!(encode_method(method, &mut out), 2);
        assert_eq!(out, [5, method as u8]);
        let offer = [5, 1, out[1]];
        let Ok(Status::Complete(g, 3)) = parse_greeting(&offer) else { panic!() };
        assert_eq!(g.choose(&[method]), method);
    }
    for (ok, status) in [(true, 0), (false, 1)] {
        assert_eq!(encode_auth_reply(ok, &mut out), 2);
        assert_eq!(out, [1, status]);
    }
}
