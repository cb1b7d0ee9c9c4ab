//! Which protocol a new connection speaks, from its first bytes.

use super::{Status, VERSION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    Socks5,
    /// An HTTP request line: someone pointed a browser or an HTTP proxy
    /// client at a SOCKS port.
    Http,
    /// Anything else; the connection is closed without an answer.
    Other,
}

const HTTP_METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"PATCH ", b"TRACE "];

/// The answer to an HTTP request on the SOCKS port.
pub const HTTP_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain\r\nContent-Length: 67\r\nConnection: close\r\n\r\n\
This is a SOCKS5 proxy, not an HTTP proxy: use socks5h:// instead.\n";

/// Classifies a connection by its first bytes; consumes nothing.
pub fn sniff(buf: &[u8]) -> Status<Sniff> {
    match buf.first() {
        None => Status::Partial,
        Some(&VERSION) => Status::Complete(Sniff::Socks5, 0),
        Some(_) => {
            let mut partial = false;
            for m in HTTP_METHODS {
                if buf.starts_with(m) {
                    return Status::Complete(Sniff::Http, 0);
                }
                partial |= m.starts_with(buf);
            }
            if partial { Status::Partial } else { Status::Complete(Sniff::Other, 0) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: [(&[u8], Status<Sniff>); 9] = [
            (b"", Status::Partial),
            (&[5], Status::Complete(Sniff::Socks5, 0)),
            (&[5, 1, 0], Status::Complete(Sniff::Socks5, 0)),
            (b"G", Status::Partial),
            (b"CONNEC", Status::Partial),
            (b"GET / HTTP/1.1\r\n", Status::Complete(Sniff::Http, 0)),
            (b"CONNECT example.com:443 HTTP/1.1", Status::Complete(Sniff::Http, 0)),
            (b"GETX", Status::Complete(Sniff::Other, 0)),
            (&[4, 1, 0, 80], Status::Complete(Sniff::Other, 0)),
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
