//! RFC 1928 wire values.

use std::io;

/// The SOCKS protocol version this codec speaks.
pub const VERSION: u8 = 5;

/// Authentication methods (RFC 1928 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Method {
    NoAuth = 0x00,
    Gssapi = 0x01,
    UserPass = 0x02,
    NoAcceptable = 0xFF,
}

/// Request commands (RFC 1928 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Command {
    Connect = 0x01,
    Bind = 0x02,
    UdpAssociate = 0x03,
}

impl Command {
    pub fn from_u8(b: u8) -> Option<Command> {
        match b {
            0x01 => Some(Command::Connect),
            0x02 => Some(Command::Bind),
            0x03 => Some(Command::UdpAssociate),
            _ => None,
        }
    }
}

/// Address types (RFC 1928 §5).
pub mod atyp {
    pub const V4: u8 = 0x01;
    pub const DOMAIN: u8 = 0x03;
    pub const V6: u8 = 0x04;
}

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    NetworkUnreachable = 0x03,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    TtlExpired = 0x06,
    CommandNotSupported = 0x07,
    AddrTypeNotSupported = 0x08,
}

impl Reply {
    /// The one mapping from a failed connect (or name look-up) to a reply.
    pub fn from_io(err: &io::Error) -> Reply {
        use io::ErrorKind as K;
        match err.kind() {
            K::ConnectionRefused => Reply::ConnectionRefused,
            K::NetworkUnreachable | K::NetworkDown => Reply::NetworkUnreachable,
            // A name that does not resolve and a connect that never completes
            // both leave the host unreachable as far as the client can tell;
            // 0x06 (TTL expired) is about IP hop counts, not timers.
            K::HostUnreachable | K::TimedOut | K::NotFound => Reply::HostUnreachable,
            _ => Reply::GeneralFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_io_table() {
        let table = [
            (libc::ECONNREFUSED, Reply::ConnectionRefused),
            (libc::ENETUNREACH, Reply::NetworkUnreachable),
            (libc::ENETDOWN, Reply::NetworkUnreachable),
            (libc::EHOSTUNREACH, Reply::HostUnreachable),
            (libc::ETIMEDOUT, Reply::HostUnreachable),
            (libc::EACCES, Reply::GeneralFailure),
            (libc::EADDRNOTAVAIL, Reply::GeneralFailure),
            (libc::ECONNRESET, Reply::GeneralFailure),
        ];
        for (errno, want) in table {
            let err = io::Error::from_raw_os_error(errno);
            assert_eq!(Reply::from_io(&err), want, "{err}");
        }
        let not_found = io::Error::new(io::ErrorKind::NotFound, "no such name");
        assert_eq!(Reply::from_io(&not_found), Reply::HostUnreachable);
    }
}
