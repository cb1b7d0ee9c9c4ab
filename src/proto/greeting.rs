//! The version/method-selection message (RFC 1928 §3).

use super::{Method, ProtoError, Status, VERSION};

/// `VER NMETHODS METHODS...`, borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting<'a> {
    pub methods: &'a [u8],
}

impl Greeting<'_> {
    /// The first of `preferred` (in the server's order) that the client
    /// offers, or [`Method::NoAcceptable`].
    pub fn choose(&self, preferred: &[Method]) -> Method {
        preferred.iter().copied().find(|m| self.methods.contains(&(*m as u8))).unwrap_or(Method::NoAcceptable)
    }
}

pub fn parse_greeting(buf: &[u8]) -> Result<Status<Greeting<'_>>, ProtoError> {
    match buf {
        [] => Ok(Status::Partial),
        [v, ..] if *v != VERSION => Err(ProtoError::BadVersion(*v)),
        [_] => Ok(Status::Partial),
        [_, 0, ..] => Err(ProtoError::NoMethods),
        [_, n, rest @ ..] => {
            let n = usize::from(*n);
            match rest.get(..n) {
                Some(methods) => Ok(Status::Complete(Greeting { methods }, 2 + n)),
                None => Ok(Status::Partial),
            }
        }
    }
}

/// Writes the method-selection reply `VER METHOD`.
pub fn encode_method(method: Method, out: &mut [u8]) -> usize {
    out[..2].copy_from_slice(&[VERSION, method as u8]);
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prefix_is_partial() {
        let msgs: [&[u8]; 3] = [&[5, 1, 0], &[5, 3, 1, 2, 0], &[5, 255]];
        for msg in msgs {
            let mut msg = msg.to_vec();
            if msg[1] == 255 {
                msg.extend(0..=254u8);
            }
            for end in 0..msg.len() {
                assert_eq!(parse_greeting(&msg[..end]), Ok(Status::Partial), "{:?}", &msg[..end]);
            }
            let Ok(Status::Complete(g, n)) = parse_greeting(&msg) else { panic!() };
            assert_eq!((g.methods.len(), n), (msg.len() - 2, msg.len()));
        }
    }

    #[test]
    fn invalid_table() {
        let table: [(&[u8], ProtoError); 4] = [
            (&[4, 1, 0], ProtoError::BadVersion(4)),
            (&[0], ProtoError::BadVersion(0)),
            (b"GET / HTTP/1.1", ProtoError::BadVersion(b'G')),
            (&[5, 0], ProtoError::NoMethods),
        ];
        for (input, want) in table {
            assert_eq!(parse_greeting(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn choose_prefers_server_order() {
        let g = Greeting { methods: &[1, 2, 0] };
        assert_eq!(g.choose(&[Method::NoAuth]), Method::NoAuth);
        assert_eq!(g.choose(&[Method::UserPass, Method::NoAuth]), Method::UserPass);
        let gssapi_only = Greeting { methods: &[1] };
        assert_eq!(gssapi_only.choose(&[Method::NoAuth]), Method::NoAcceptable);
        let mut out = [0; 2];
        assert_eq!(encode_method(Method::NoAcceptable, &mut out), 2);
        assert_eq!(out, [5, 0xff]);
    }
}
