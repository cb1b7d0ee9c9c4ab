//! Which protocol a new connection speaks, from its first bytes.

use super::{SOCKS4_VERSION, Status, VERSION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    Socks5,
    /// SOCKS4 or SOCKS4a.
    Socks4,
    /// An ASCII letter: an HTTP request line.
    Http,
    /// Anything else; the connection is closed without an answer.
    Other,
}

/// The answer to an HTTP request on the SOCKS port when HTTP CONNECT is
/// turned off.
pub const HTTP_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain\r\nContent-Length: 67\r\nConnection: close\r\n\r\n\
This is a SOCKS5 proxy, not an HTTP proxy: use socks5h:// instead.\n";

/// Classifies a connection by its first byte; consumes nothing.
pub fn sniff(buf: &[u8]) -> Status<Sniff> {
    match buf.first() {
        None => Status::Partial,
        Some(&VERSION) => Status::Complete(Sniff::Socks5, 0),
        Some(&SOCKS4_VERSION) => Status::Complete(Sniff::Socks4, 0),
        Some(b) if b.is_ascii_alphabetic() => Status::Complete(Sniff::Http, 0),
        Some(_) => Status::Complete(Sniff::Other, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: [(&[u8], Status<Sniff>); 8] = [
            (b"", Status::Partial),
            (&[5], Status::Complete(Sniff::Socks5, 0)),
            (&[5, 1, 0], Status::Complete(Sniff::Socks5, 0)),
            (&[4, 1, 0, 80], Status::Complete(Sniff::Socks4, 0)),
            (b"G", Status::Complete(Sniff::Http, 0)),
            (b"CONNECT example.com:443 HTTP/1.1", Status::Complete(Sniff::Http, 0)),
            (b"connect", Status::Complete(Sniff::Http, 0)),
            (b"\x16\x03\x01", Status::Complete(Sniff::Other, 0)),
        ];
        for (input, want) in cases {
            assert_eq!(sniff(input), want, "{input:?}");
        }
    }

    #[test]
    fn http_400_length_is_right() {
        let body = HTTP_400.split(|&b| b == b'\n').next_back();
        assert_eq!(body, Some(&b""[..]));
        let text = std::str::from_utf8(HTTP_400).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
