//! Username/password sub-negotiation (RFC 1929).

use super::{ProtoError, Status};

/// RFC 1929 §2: the sub-negotiation's own version number.
pub const AUTH_VERSION: u8 = 0x01;

/// `VER ULEN UNAME PLEN PASSWD`, borrowed from the input. RFC 1929 gives
/// both lengths as 1 to 255; a length of 0 is parsed (some clients send an
/// empty password) and left to the credential check to refuse.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub user: &'a [u8],
    pub password: &'a [u8],
}

/// Never prints the password.
impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, password: <{} bytes> }}",
            self.user.escape_ascii().to_string(),
            self.password.len()
        )
    }
}

pub fn parse_auth(buf: &[u8]) -> Result<Status<Credentials<'_>>, ProtoError> {
    match buf.first() {
        None => return Ok(Status::Partial),
        Some(&v) if v != AUTH_VERSION => return Err(ProtoError::BadAuthVersion(v)),
        Some(_) => {}
    }
    let Some(&ulen) = buf.get(1) else { return Ok(Status::Partial) };
    let ulen = usize::from(ulen);
    let Some(&plen) = buf.get(2 + ulen) else { return Ok(Status::Partial) };
    let plen = usize::from(plen);
    let total = 3 + ulen + plen;
    if buf.len() < total {
        return Ok(Status::Partial);
    }
    let creds = Credentials { user: &buf[2..2 + ulen], password: &buf[3 + ulen..total] };
    Ok(Status::Complete(creds, total))
}

/// Writes the reply `VER STATUS` (0 = success).
pub fn encode_auth_reply(success: bool, out: &mut [u8]) -> usize {
    out[..2].copy_from_slice(&[AUTH_VERSION, if success { 0 } else { 1 }]);
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(user: &[u8], password: &[u8]) -> Vec<u8> {
        let mut m = vec![1, user.len() as u8];
        m.extend_from_slice(user);
        m.push(password.len() as u8);
        m.extend_from_slice(password);
        m
    }

    #[test]
    fn every_prefix_is_partial() {
        let long = [b'u'; 255];
        let cases: [(&[u8], &[u8]); 5] =
            [(b"alice", b"secret"), (b"", b""), (b"a", b""), (&long, &long), (b"bob", b"p:a ss")];
        for (user, password) in cases {
            let m = msg(user, password);
            for end in 0..m.len() {
                assert_eq!(parse_auth(&m[..end]), Ok(Status::Partial), "{:?}", &m[..end]);
            }
            let want = Credentials { user, password };
            assert_eq!(parse_auth(&m), Ok(Status::Complete(want, m.len())));
            // A pipelined request after it is not consumed.
            let mut more = m.clone();
            more.extend_from_slice(&[5, 1, 0, 1]);
            assert_eq!(parse_auth(&more), Ok(Status::Complete(want, m.len())));
        }
    }

    #[test]
    fn invalid_table() {
        let table: [(&[u8], ProtoError); 3] = [
            (&[5, 1, b'a', 1, b'b'], ProtoError::BadAuthVersion(5)),
            (&[0], ProtoError::BadAuthVersion(0)),
            (&[2, 0, 0], ProtoError::BadAuthVersion(2)),
        ];
        for (input, want) in table {
            assert_eq!(parse_auth(input), Err(want));
        }
    }

    #[test]
    fn reply_and_debug() {
        let mut out = [0u8; 2];
        assert_eq!(encode_auth_reply(true, &mut out), 2);
        assert_eq!(out, [1, 0]);
        encode_auth_reply(false, &mut out);
        assert_eq!(out, [1, 1]);
        let shown = format!("{:?}", Credentials { user: b"al", password: b"hunter2" });
        assert_eq!(shown, r#"Credentials { user: "al", password: <7 bytes> }"#, "never the password");
    }
}
