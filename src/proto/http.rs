//! HTTP CONNECT (RFC 9110 §9.3.6): the request head and the answers.
//!
//! The head is parsed by `httparse`, incrementally and without allocating;
//! this module adds what a proxy needs: the target (`host:port`,
//! `[v6]:port`), the `Proxy-Authorization: Basic` credentials (decoded into
//! the caller's buffer), bounds on the head, and the fixed responses.

use super::Status;

/// Headers a request head may carry before it is refused with 431.
pub const MAX_HTTP_HEADERS: usize = 32;

/// A CONNECT request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectHead<'a> {
    /// The host, without brackets for IPv6.
    pub host: &'a str,
    pub port: u16,
    /// The `Proxy-Authorization` value, if any.
    pub authorization: Option<&'a [u8]>,
}

/// Why a head cannot be served; each is answered with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Not HTTP, or a CONNECT target that is not `host:port`: 400.
    Malformed,
    /// A method other than CONNECT: 405.
    NotConnect,
    /// More headers than [`MAX_HTTP_HEADERS`]: 431. (A head longer than the
    /// caller's buffer is the caller's to answer with 431.)
    TooManyHeaders,
}

impl HttpError {
    pub fn status(self) -> u16 {
        match self {
            HttpError::Malformed => 400,
            HttpError::NotConnect => 405,
            HttpError::TooManyHeaders => 431,
        }
    }
}

/// Parses a request head; `Partial` until the blank line has arrived.
pub fn parse_connect(buf: &[u8]) -> Result<Status<ConnectHead<'_>>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HTTP_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // A method that is surely not CONNECT needs no more bytes.
            return match req.method {
                Some(m) if m != "CONNECT" => Err(HttpError::NotConnect),
                _ => Ok(Status::Partial),
            };
        }
        // A method other than CONNECT was refused as soon as it was known
        // (above); the same head is refused the same way whatever comes
        // after it, so that the answer never depends on how it arrived.
        Err(_) if req.method.is_some_and(|m| m != "CONNECT") => return Err(HttpError::NotConnect),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(_) => return Err(HttpError::Malformed),
    };
    if req.method != Some("CONNECT") {
        return Err(HttpError::NotConnect);
    }
    let (host, port) = req.path.and_then(authority).ok_or(HttpError::Malformed)?;
    let authorization =
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("proxy-authorization")).map(|h| h.value);
    Ok(Status::Complete(ConnectHead { host, port, authorization }, n))
}

/// `host:port` or `[v6]:port`, as CONNECT's request target (RFC 9110
/// §7.1, authority-form).
fn authority(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty() && host.len() <= 255).then_some((host, port))
}

/// Decodes `Basic <base64(user:password)>` into `out`; returns the user
/// and the password. `None` for any other scheme or a bad encoding.
pub fn basic_credentials<'o>(value: &[u8], out: &'o mut [u8]) -> Option<(&'o [u8], &'o [u8])> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let n = base64_decode(rest.trim_ascii(), out)?;
    let decoded = &out[..n];
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((&decoded[..colon], &decoded[colon + 1..]))
}

/// Standard base64 with padding; `None` on a bad character, a bad length,
/// or more output than `out` holds.
fn base64_decode(input: &[u8], out: &mut [u8]) -> Option<usize> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    if input.len() % 4 != 0 {
        return None;
    }
    let mut n = 0;
    for (i, quad) in input.chunks(4).enumerate() {
        let last = (i + 1) * 4 == input.len();
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut acc = 0u32;
        for &c in &quad[..4 - pad] {
            acc = acc << 6 | value(c)?;
        }
        acc <<= 6 * pad as u32;
        let bytes = acc.to_be_bytes();
        let take = 3 - pad;
        out.get_mut(n..n + take)?.copy_from_slice(&bytes[1..1 + take]);
        n += take;
    }
    Some(n)
}

/// The response for `status`: a complete HTTP/1.1 response that closes the
/// connection (200 leaves it open for the tunnel).
pub fn http_response(status: u16) -> &'static [u8] {
    match status {
        200 => b"HTTP/1.1 200 Connection established\r\n\r\n",
        400 => b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        403 => HTTP_403,
        405 => HTTP_405,
        407 => b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"slabsocks\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        429 => b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        431 => b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        504 => b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        _ => b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    }
}

const HTTP_403: &[u8] = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 41\r\n\
Connection: close\r\n\r\nDestination denied by the proxy's rules.\n";

const HTTP_405: &[u8] = b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Type: text/plain\r\n\
Content-Length: 64\r\nConnection: close\r\n\r\n\
slabsocks tunnels CONNECT only; it does not forward plain HTTP.\n";

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\
Proxy-Authorization: Basic YWxpY2U6czNjcjN0\r\nUser-Agent: test\r\n\r\n";

    #[test]
    fn a_head_split_at_every_byte_is_partial_then_complete() {
        for k in 0..HEAD.len() {
            assert_eq!(parse_connect(&HEAD[..k]), Ok(Status::Partial), "split at {k}");
        }
        let mut piped = HEAD.to_vec();
        piped.extend_from_slice(b"\x16\x03\x01 tls");
        let Ok(Status::Complete(h, n)) = parse_connect(&piped) else { panic!() };
        assert_eq!((h.host, h.port, n), ("example.com", 443, HEAD.len()));
        let mut out = [0u8; 64];
        let (user, password) = basic_credentials(h.authorization.unwrap(), &mut out).unwrap();
        assert_eq!((user, password), (&b"alice"[..], &b"s3cr3t"[..]));
    }

    #[test]
    fn targets() {
        let table: [(&str, Option<(&str, u16)>); 10] = [
            ("example.com:443", Some(("example.com", 443))),
            ("127.0.0.1:80", Some(("127.0.0.1", 80))),
            ("[::1]:8443", Some(("::1", 8443))),
            ("[2001:db8::1]:1", Some(("2001:db8::1", 1))),
            ("example.com", None),
            ("example.com:0", None),
            ("example.com:99999", None),
            ("::1:443", None),
            ("[nonsense]:443", None),
            (":443", None),
        ];
        for (target, want) in table {
            assert_eq!(authority(target), want, "{target}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(parse_connect(b"GET / HTTP/1.1\r\n\r\n"), Err(HttpError::NotConnect));
        assert_eq!(parse_connect(b"GET / HT"), Err(HttpError::NotConnect), "known early");
        // Regression (found by fuzzing): the answer to a head must not depend
        // on how it arrives; a non-CONNECT method decides it.
        assert_eq!(parse_connect(b"GET \x01"), Err(HttpError::NotConnect));
        assert_eq!(parse_connect(b"GET / HTTP/1.1\r\nbad header\r\n\r\n"), Err(HttpError::NotConnect));
        assert_eq!(parse_connect(b"CONNECT nohost HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed));
        assert_eq!(parse_connect(b"CONNECT a:1 HTTP/1.1\r\nbad header\r\n\r\n"), Err(HttpError::Malformed));
        let mut many = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HTTP_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_connect(&many), Err(HttpError::TooManyHeaders));
        assert_eq!((HttpError::Malformed.status(), HttpError::NotConnect.status()), (400, 405));
    }

    #[test]
    fn basic_credentials_table() {
        let mut out = [0u8; 16];
        assert_eq!(basic_credentials(b"Basic YTpi", &mut out), Some((&b"a"[..], &b"b"[..])));
        assert_eq!(basic_credentials(b"basic  YTo= ", &mut out), Some((&b"a"[..], &b""[..])));
        assert_eq!(basic_credentials(b"Basic YTpiOmM=", &mut out), Some((&b"a"[..], &b"b:c"[..])));
        // Two padding characters; the alphabet's last two characters.
        assert_eq!(basic_credentials(b"Basic YWI6Yw==", &mut out), Some((&b"ab"[..], &b"c"[..])));
        assert_eq!(basic_credentials(b"Basic YTo+Pj4=", &mut out), Some((&b"a"[..], &b">>>"[..])));
        assert_eq!(basic_credentials(b"Basic dTo/Pz4=", &mut out), Some((&b"u"[..], &b"??>"[..])));
        let bad_inputs = [
            &b"Bearer YTpi"[..],
            b"Basic",
            b"Basic YTpi=",
            b"Basic Y*pi",
            b"Basic YWJj",
            b"Basic ====",
            b"Basic YTo===",
            b"Basic YQ==YTpi", // padding before the last quad
            b"",
        ];
        for bad in bad_inputs {
            assert_eq!(basic_credentials(bad, &mut out), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let mut tiny = [0u8; 2];
        assert_eq!(basic_credentials(b"Basic YWJjOmQ=", &mut tiny), None, "more than the buffer holds");
    }

    #[test]
    fn responses_are_whole_and_their_lengths_right() {
        for status in [200, 400, 403, 405, 407, 429, 431, 502, 504] {
            let text = std::str::from_utf8(http_response(status)).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            if status != 200 {
                assert!(head.contains(&format!("Content-Length: {}", body.len())), "{status}: {text}");
                assert!(head.contains("Connection: close"));
            }
        }
    }
}
