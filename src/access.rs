//! The access log (`--access-log`): one line per finished session, at info
//! level, formatted once when the session ends.
//!
//! Records live beside the slab, by slab key, and only when the log is on:
//! a server without it pays nothing per session, and one with it pays a
//! small allocation at accept (never on the relay path, which only adds to
//! two counters).

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

/// What the access log says of one session.
pub(crate) struct Record {
    started: Instant,
    pub client: Option<SocketAddr>,
    pub user: Option<Box<str>>,
    pub protocol: &'static str,
    pub command: &'static str,
    /// The destination as the client asked for it (a name or an address).
    pub requested: Option<Box<str>>,
    /// The address actually connected to (or bound, for BIND).
    pub connected: Option<SocketAddr>,
    /// The reply sent: the SOCKS5 code (SOCKS4 and HTTP answers are mapped
    /// to it), if any was sent.
    pub reply: Option<u8>,
    /// Bytes delivered client → remote and remote → client.
    pub up: u64,
    pub down: u64,
}

/// The records of one loop's open sessions.
#[derive(Default)]
pub(crate) struct Access {
    records: Vec<Option<Box<Record>>>,
}

impl Access {
    /// A session accepted from `client` in slot `key`.
    pub(crate) fn open(&mut self, key: usize, client: Option<SocketAddr>, now: Instant) {
        if self.records.len() <= key {
            self.records.resize_with(key + 1, || None);
        }
        self.records[key] = Some(Box::new(Record {
            started: now,
            client,
            user: None,
            protocol: "-",
            command: "-",
            requested: None,
            connected: None,
            reply: None,
            up: 0,
            down: 0,
        }));
    }

    pub(crate) fn get(&mut self, key: usize) -> Option<&mut Record> {
        self.records.get_mut(key)?.as_deref_mut()
    }

    /// The session in slot `key` has ended, for `why`: its line.
    pub(crate) fn close(&mut self, key: usize, why: impl fmt::Display, now: Instant) {
        if let Some(r) = self.records.get_mut(key).and_then(Option::take) {
            log::info!("{}", Line(&r, why, now));
        }
    }
}

/// The line: `key=value` pairs, `-` for what does not apply, names escaped
/// (a user or host name cannot forge a line), and why the session ended,
/// quoted, last.
struct Line<'a, W>(&'a Record, W, Instant);

impl<W: fmt::Display> fmt::Display for Line<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Line(r, why, now) = self;
        let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        write!(
            f,
            "access client={} user={} proto={} cmd={} dest={} connected={} reply={} up={} down={} ms={} end=\"{}\"",
            dash(r.client.map(|a| a.to_string())),
            dash(r.user.as_ref().map(|u| u.escape_debug().to_string())),
            r.protocol,
            r.command,
            dash(r.requested.as_ref().map(|d| d.escape_debug().to_string())),
            dash(r.connected.map(|a| a.to_string())),
            dash(r.reply.map(|c| format!("{c:#04x}"))),
            r.up,
            r.down,
            now.saturating_duration_since(r.started).as_millis(),
            why,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_everything_and_dashes_what_is_missing() {
        let mut a = Access::default();
        let t0 = Instant::now();
        a.open(3, Some("127.0.0.1:5000".parse().unwrap()), t0);
        let r = a.get(3).unwrap();
        r.user = Some("al\nice".into());
        r.protocol = "socks5";
        r.command = "connect";
        r.requested = Some("example.com:80".into());
        r.reply = Some(0);
        r.up = 10;
        r.down = 20;
        let line = Line(r, "done", t0 + std::time::Duration::from_millis(1500)).to_string();
        assert_eq!(
            line,
            "access client=127.0.0.1:5000 user=al\\nice proto=socks5 cmd=connect dest=example.com:80 \
             connected=- reply=0x00 up=10 down=20 ms=1500 end=\"done\""
        );
        assert!(a.get(2).is_none());
    }
}
