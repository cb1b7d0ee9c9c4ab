//! The handshake, in whichever dialect the client speaks: read into the
//! session's handshake buffer until the codec has a whole message, answer
//! it, and hand the rest on. The first byte picks the dialect (0x05 SOCKS5,
//! 0x04 SOCKS4/4a, an ASCII letter HTTP CONNECT); each dialect's codec ends
//! in the same [`Request`] (command, target, pipelined bytes) for the dial
//! step. Each phase runs as soon as its bytes are there, so a client may
//! send everything in one write, or one byte at a time.

use super::dial::{Request, Target};
use super::{
    Carry, Client, Close, Ctx, Dialect, Flow, Outcome, Peer, Ready, Recycle, State, answer, fail, linger, send,
};
use crate::buf::{Buf, HANDSHAKE_BUF, Io, Pool, read};
use crate::proto::{
    Addr, Command, Credentials, HTTP_400, Method, ProxyHeader, Reply, Sniff, Status, encode_auth_reply, encode_method,
    parse_auth, parse_greeting, parse_proxy, parse_request, parse_socks4, sniff,
};
#[cfg(feature = "http")]
use crate::proto::{basic_credentials, http_response, parse_connect};
use crate::warn::Warn;
use std::net::{IpAddr, SocketAddr};

enum Phase {
    /// `--proxy-protocol`: the PROXY header, which names the client.
    Proxy,
    /// The first byte picks the dialect.
    Sniff,
    /// SOCKS5 method negotiation.
    Greeting,
    /// RFC 1929 sub-negotiation.
    Auth,
    /// The SOCKS5 request.
    Request,
    /// The SOCKS4/4a request.
    Socks4,
    /// The HTTP CONNECT request head.
    #[cfg(feature = "http")]
    Http,
}

/// The longest `user:password` Basic credentials decode to: RFC 1929's
/// bounds, which the users file keeps.
#[cfg(feature = "http")]
const MAX_CREDENTIALS: usize = 255 + 1 + 255;

/// Which dialects besides SOCKS5 are served.
pub(crate) struct Dialects {
    pub socks4: bool,
    pub http: bool,
}

pub(crate) struct Handshake {
    buf: Buf,
    len: usize,
    phase: Phase,
}

impl Recycle for Handshake {
    fn recycle(self, pool: &mut Pool) {
        pool.put(self.buf);
    }
}

/// Where a step of the handshake left the session.
pub(crate) enum Progress {
    /// Still here, or failed: the state and what to do next.
    Stay(State, Flow),
    /// The request is complete.
    Request(Request),
}

/// What one message did to the handshake.
enum Next {
    /// The message is incomplete: read more.
    Read,
    /// Consumed; go on to the next phase.
    Phase(Phase, usize),
    /// The request is complete: it took this many bytes.
    Done(Command, Target, usize),
    /// Close without an answer.
    Close(Close),
    /// Answer failure `Reply` in the session's dialect, then close.
    Fail(Reply),
    /// Answer `Outcome` in the session's dialect, then close for `Close`.
    Refused(Outcome, Close),
    /// An answer that ends the session was sent: linger, then close.
    Answered(Close),
}

impl Handshake {
    /// `proxied`: a PROXY header comes first.
    pub(crate) fn new(buf: Buf, proxied: bool) -> Handshake {
        Handshake { buf, len: 0, phase: if proxied { Phase::Proxy } else { Phase::Sniff } }
    }

    pub(crate) fn step(mut self, client: &mut Client, ctx: &mut Ctx<'_>) -> Progress {
        loop {
            let data = &self.buf[..self.len];
            let next = match self.phase {
                Phase::Proxy => proxy_header(data, client, ctx),
                Phase::Sniff => dialect(data, client, ctx),
                Phase::Greeting => greeting(data, client, ctx),
                Phase::Auth => auth(data, client, ctx),
                Phase::Request => request(data, ctx),
                Phase::Socks4 => socks4(data, client, ctx),
                #[cfg(feature = "http")]
                Phase::Http => http(data, client, ctx),
            };
            match next {
                Next::Read => {}
                Next::Phase(phase, n) => {
                    self.buf.copy_within(n..self.len, 0);
                    self.len -= n;
                    self.phase = phase;
                    continue;
                }
                Next::Done(command, target, n) => {
                    let carry = Carry { buf: self.buf, start: n as u32, end: self.len as u32 };
                    return Progress::Request(Request { command, target, carry });
                }
                Next::Close(why) => return Progress::Stay(State::Handshake(self), Flow::Close(why)),
                Next::Fail(rep) => {
                    let (state, flow) = fail(self, rep, client, ctx);
                    return Progress::Stay(state, flow);
                }
                Next::Refused(outcome, why) => {
                    answer(client, outcome);
                    let (state, flow) = linger(self, why, client, ctx);
                    return Progress::Stay(state, flow);
                }
                Next::Answered(why) => {
                    let (state, flow) = linger(self, why, client, ctx);
                    return Progress::Stay(state, flow);
                }
            }
            if self.len == self.buf.len() {
                // Only an HTTP head may outgrow the first buffer, once.
                #[cfg(feature = "http")]
                if matches!(self.phase, Phase::Http) {
                    if self.buf.len() != HANDSHAKE_BUF {
                        send(&mut client.stream, http_response(431));
                        let (state, flow) = linger(self, Close::Http(431), client, ctx);
                        return Progress::Stay(state, flow);
                    }
                    let mut big = ctx.env.pool.http();
                    big[..self.len].copy_from_slice(&self.buf[..self.len]);
                    ctx.env.pool.put(std::mem::replace(&mut self.buf, big));
                    continue;
                }
                return Progress::Stay(State::Handshake(self), Flow::Close(Close::HandshakeTooLong));
            }
            if !client.ready.has(Ready::CLIENT_R) {
                return Progress::Stay(State::Handshake(self), Flow::Wait);
            }
            let room = &mut self.buf[self.len..];
            let want = room.len();
            match read(&mut client.stream, room) {
                Io::Done(n) => {
                    // A short read drained the socket (see relay.rs).
                    if n < want {
                        client.ready.short_read(Ready::CLIENT_R);
                    }
                    self.len += n;
                }
                Io::WouldBlock => {
                    client.ready.clear(Ready::CLIENT_R);
                    return Progress::Stay(State::Handshake(self), Flow::Wait);
                }
                Io::Eof => return Progress::Stay(State::Handshake(self), Flow::Close(Close::ClientClosedEarly)),
                Io::Err(_) => return Progress::Stay(State::Handshake(self), Flow::Close(Close::ClientError)),
            }
        }
    }
}

/// The PROXY header: its source address is the client from here on, in
/// the client rules, the per-client limit and the auth exemption (all
/// postponed at accept for this), the access log and the UDP check. A
/// LOCAL header (a health check) leaves the connection's own address.
fn proxy_header(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    let (header, n) = match parse_proxy(data) {
        Ok(Status::Partial) => return Next::Read,
        Err(_) => return Next::Close(Close::BadProxyHeader),
        Ok(Status::Complete(header, n)) => (header, n),
    };
    let source = match header {
        ProxyHeader::Proxied { source, .. } => Some(source),
        ProxyHeader::Local => None,
    };
    let Some(addr) = source.or_else(|| client.stream.peer_addr().ok()) else {
        return Next::Close(Close::ClientGone);
    };
    let env = &mut *ctx.env;
    if !env.rules.client_allowed(addr.ip()) {
        env.stats.inc(crate::stats::Stat::RuleDenials);
        log::debug!("#{} PROXY client {addr} refused: not an allowed client", ctx.id);
        return Next::Close(Close::ProxiedClientRefused);
    }
    if !env.limits.admit_client(ctx.key, addr.ip()) {
        env.warnings.warn(
            Warn::PerClient,
            ctx.now,
            format_args!("{addr} refused: its address has its maximum of connections"),
        );
        return Next::Close(Close::ProxiedClientRefused);
    }
    client.exempt = env.rules.auth_exempt(addr.ip());
    if let Some(p) = &mut env.proxied {
        p.set(ctx.key, source);
    }
    if let Some(r) = env.access.as_mut().and_then(|a| a.get(ctx.key)) {
        r.client = Some(addr);
    }
    log::debug!("#{} PROXY header: client {addr}", ctx.id);
    Next::Phase(Phase::Sniff, n)
}

/// The first byte picks the dialect; a dialect turned off is closed
/// without an answer, except HTTP, which gets a hint.
fn dialect(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    let on = &ctx.env.dialects;
    let (phase, dialect) = match sniff(data) {
        Status::Partial => return Next::Read,
        Status::Complete(Sniff::Socks5, _) => (Phase::Greeting, Dialect::Socks5),
        Status::Complete(Sniff::Socks4, _) if on.socks4 && cfg!(feature = "socks4") => (Phase::Socks4, Dialect::Socks4),
        #[cfg(feature = "http")]
        Status::Complete(Sniff::Http, _) if on.http => (Phase::Http, Dialect::Http),
        Status::Complete(Sniff::Http, _) => {
            send(&mut client.stream, HTTP_400);
            return Next::Answered(Close::HttpOnSocksPort);
        }
        Status::Complete(Sniff::Socks4 | Sniff::Other, _) => return Next::Close(Close::NotSocks),
    };
    client.dialect = dialect;
    Next::Phase(phase, 0)
}

/// A SOCKS5 greeting picks the method.
fn greeting(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    match parse_greeting(data) {
        Ok(Status::Partial) => Next::Read,
        Err(_) => Next::Close(Close::BadGreeting),
        Ok(Status::Complete(greeting, n)) => {
            // With users configured, only a password will do, except for
            // exempt clients, who may also go without (a client that
            // offers both logs in, so that its user's limits apply).
            let logins = ctx.env.users.is_some() && cfg!(feature = "auth");
            let preferred: &[Method] = match (logins, client.exempt) {
                (false, _) => &[Method::NoAuth],
                (true, false) => &[Method::UserPass],
                (true, true) => &[Method::UserPass, Method::NoAuth],
            };
            let method = greeting.choose(preferred);
            let mut out = [0u8; 2];
            let len = encode_method(method, &mut out);
            let sent = send(&mut client.stream, &out[..len]);
            match method {
                Method::NoAcceptable => Next::Answered(Close::NoAcceptableMethod),
                _ if !sent => Next::Close(Close::ClientGone),
                Method::UserPass => Next::Phase(Phase::Auth, n),
                _ => Next::Phase(Phase::Request, n),
            }
        }
    }
}

/// RFC 1929: one attempt; a failure is answered and closes the connection.
fn auth(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    let (creds, n) = match parse_auth(data) {
        Ok(Status::Partial) => return Next::Read,
        Err(_) => return Next::Close(Close::BadAuth),
        Ok(Status::Complete(creds, n)) => (creds, n),
    };
    let Credentials { user, password } = creds;
    let verdict = login(user, password, client, ctx);
    let mut out = [0u8; 2];
    let len = encode_auth_reply(verdict.is_ok(), &mut out);
    let sent = send(&mut client.stream, &out[..len]);
    match verdict {
        Ok(()) if sent => Next::Phase(Phase::Request, n),
        Ok(()) => Next::Close(Close::ClientGone),
        Err(why) => Next::Answered(why),
    }
}

/// Checks a user's password (in constant time) and counts the session
/// against the user's limit; a failure is logged, rate-limited. The same
/// for SOCKS5 and HTTP.
fn login(user: &[u8], password: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Result<(), Close> {
    let env = &mut *ctx.env;
    let verdict = match &env.users {
        Some(users) if users.verify(user, password) => match env.limits.admit_user(user) {
            Some(id) => {
                client.user = id;
                if let Some(s) = &mut env.shaping {
                    s.logged_in(id, ctx.now);
                }
                if let Some(r) = env.access.as_mut().and_then(|a| a.get(ctx.key)) {
                    r.user = Some(String::from_utf8_lossy(user).into());
                }
                Ok(())
            }
            None => Err(Close::UserAtLimit),
        },
        _ => Err(Close::LoginFailed),
    };
    if let Err(why) = verdict {
        env.stats.inc(crate::stats::Stat::AuthFailures);
        let (id, peer, user) = (ctx.id, Peer(&client.stream), user.escape_ascii());
        env.warnings.warn(Warn::Login, ctx.now, format_args!("#{id} {why}: user \"{user}\" from {peer}"));
    }
    verdict
}

/// A host as a target: an IP literal is an address, never a look-up.
fn target(host: &[u8], port: u16) -> Target {
    match (Addr::Domain(host).ip(), std::str::from_utf8(host)) {
        (Some(ip), _) => Target::Ip(SocketAddr::new(ip, port)),
        (None, Ok(name)) => Target::Name(name.to_owned(), port),
        (None, Err(_)) => Target::Unresolvable,
    }
}

/// SOCKS4 and SOCKS4a. SOCKS4 carries no password, so with logins required
/// only `--auth-exempt` clients may use it (anyone else would bypass them).
fn socks4(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    let (req, n) = match parse_socks4(data) {
        Ok(Status::Partial) => return Next::Read,
        Err(e) => {
            log::debug!("#{} SOCKS4: {e}", ctx.id);
            return Next::Fail(Reply::GeneralFailure);
        }
        Ok(Status::Complete(req, n)) => (req, n),
    };
    if ctx.env.users.is_some() && !client.exempt {
        log::debug!("#{} SOCKS4 refused: logins are required", ctx.id);
        return Next::Refused(Outcome::Failed(Reply::NotAllowed), Close::Socks4NeedsLogin);
    }
    let target = match req.domain {
        Some(name) => target(name, req.port),
        None => Target::Ip(SocketAddr::new(IpAddr::V4(req.ip), req.port)),
    };
    Next::Done(req.command, target, n)
}

#[cfg(feature = "http")]
/// HTTP CONNECT. With logins required, `Proxy-Authorization: Basic` carries
/// them (`--auth-exempt` clients may go without); a missing or wrong one
/// gets 407.
fn http(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    let (head, n) = match parse_connect(data) {
        Ok(Status::Partial) => return Next::Read,
        Err(e) => {
            log::debug!("#{} HTTP: {e:?}", ctx.id);
            send(&mut client.stream, http_response(e.status()));
            return Next::Answered(Close::Http(e.status()));
        }
        Ok(Status::Complete(head, n)) => (head, n),
    };
    // Exempt clients may go without credentials; one that sends them logs
    // in, so that its user's limits apply (as for SOCKS5).
    if ctx.env.users.is_some() && (!client.exempt || head.authorization.is_some()) {
        let mut decoded = [0u8; MAX_CREDENTIALS];
        let verdict = match head.authorization.and_then(|v| basic_credentials(v, &mut decoded)) {
            Some((user, password)) => login(user, password, client, ctx),
            // A browser asks without credentials first: no warning for that.
            None => Err(Close::LoginFailed),
        };
        let status = match verdict {
            Ok(()) => None,
            Err(Close::UserAtLimit) => Some(429),
            Err(_) => Some(407),
        };
        if let Some(status) = status {
            send(&mut client.stream, http_response(status));
            return Next::Answered(Close::Http(status));
        }
    }
    Next::Done(Command::Connect, target(head.host.as_bytes(), head.port), n)
}

fn request(data: &[u8], ctx: &mut Ctx<'_>) -> Next {
    match parse_request(data) {
        Ok(Status::Partial) => Next::Read,
        Err(e) => {
            log::debug!("#{} {e}", ctx.id);
            e.reply().map_or(Next::Close(Close::BadRequest), Next::Fail)
        }
        Ok(Status::Complete(req, n)) => {
            let target = match req.addr {
                Addr::Domain(host) => target(host, req.port),
                addr => match addr.ip() {
                    Some(ip) => Target::Ip(SocketAddr::new(ip, req.port)),
                    None => Target::Unresolvable,
                },
            };
            Next::Done(req.command, target, n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation (`recycle` made a no-op): a closing handshake gives its
    /// buffer back to the pool.
    #[test]
    fn a_recycled_handshake_gives_its_buffer_back() {
        let mut pool = Pool::new(4096);
        let hs = Handshake::new(pool.handshake(), false);
        assert_eq!(pool.free(), (0, 0));
        hs.recycle(&mut pool);
        assert_eq!(pool.free(), (0, 1));
    }
}
