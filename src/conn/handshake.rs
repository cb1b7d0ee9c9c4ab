//! Greeting, authentication and request: read into the session's handshake
//! buffer until the codec has a whole message, answer it, and hand the rest
//! on. Each phase runs as soon as its bytes are there, so a client may send
//! all three in one write, or one byte at a time.

use super::{Carry, Client, Ctx, Flow, Ready, State, connect, fail, reject, send};
use crate::buf::{Buf, Io, read};
use crate::proto::{
    Addr, Command, Credentials, HTTP_400, Method, Reply, Sniff, Status, encode_auth_reply, encode_method, parse_auth,
    parse_greeting, parse_request, sniff,
};
use crate::resolver::Job;
use crate::timer::Kind;
use std::net::SocketAddr;

enum Phase {
    Greeting,
    /// RFC 1929 sub-negotiation.
    Auth,
    Request,
}

pub(crate) struct Handshake {
    buf: Buf,
    len: usize,
    phase: Phase,
}

/// What one message did to the handshake.
enum Next {
    /// The message is incomplete: read more.
    Read,
    /// Consumed; go on to the next phase.
    Phase(Phase, usize),
    /// The handshake failed (any answer has been sent).
    Close(&'static str),
}

impl Handshake {
    pub(crate) fn new(buf: Buf) -> Handshake {
        Handshake { buf, len: 0, phase: Phase::Greeting }
    }

    pub(crate) fn into_buf(self) -> Buf {
        self.buf
    }

    pub(crate) fn step(mut self, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        loop {
            let data = &self.buf[..self.len];
            let next = match self.phase {
                Phase::Greeting => greeting(data, client, ctx),
                Phase::Auth => auth(data, client, ctx),
                Phase::Request => match parse_request(data) {
                    Ok(Status::Partial) => Next::Read,
                    Err(e) => {
                        log::debug!("#{} {e}", ctx.key);
                        Next::Close(e.reply().map_or("bad request", |r| fail(&mut client.stream, r)))
                    }
                    Ok(Status::Complete(req, _)) if req.command != Command::Connect => {
                        Next::Close(fail(&mut client.stream, Reply::CommandNotSupported))
                    }
                    Ok(Status::Complete(req, n)) => {
                        let port = req.port;
                        let target = req.addr.ip().map(|ip| SocketAddr::new(ip, port));
                        let host = match (target, req.addr) {
                            (None, Addr::Domain(d)) => std::str::from_utf8(d).ok().map(str::to_owned),
                            _ => None,
                        };
                        ctx.timers.set(ctx.key, Kind::Connect, ctx.now);
                        let carry = Carry { buf: self.buf, start: n as u32, end: self.len as u32 };
                        return match target {
                            Some(addr) => connect::start(connect::Addrs::one(addr), carry, None, client, ctx),
                            None => resolve(host, port, carry, client, ctx),
                        };
                    }
                },
            };
            match next {
                Next::Phase(phase, n) => {
                    self.buf.copy_within(n..self.len, 0);
                    self.len -= n;
                    self.phase = phase;
                    continue;
                }
                Next::Close(why) => return (State::Handshake(self), Flow::Close(why)),
                Next::Read => {}
            }
            if self.len == self.buf.len() {
                return (State::Handshake(self), Flow::Close("handshake too long"));
            }
            if !client.ready.has(Ready::CLIENT_R) {
                return (State::Handshake(self), Flow::Wait);
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
                    return (State::Handshake(self), Flow::Wait);
                }
                Io::Eof => return (State::Handshake(self), Flow::Close("client closed during handshake")),
                Io::Err(_) => return (State::Handshake(self), Flow::Close("client error during handshake")),
            }
        }
    }
}

/// The first bytes pick the protocol; a SOCKS5 greeting picks the method.
fn greeting(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    match sniff(data) {
        Status::Partial => Next::Read,
        Status::Complete(Sniff::Http, _) => {
            send(&mut client.stream, HTTP_400);
            reject(&mut client.stream);
            Next::Close("HTTP request on the SOCKS port")
        }
        Status::Complete(Sniff::Other, _) => Next::Close("not SOCKS5"),
        Status::Complete(Sniff::Socks5, _) => match parse_greeting(data) {
            Ok(Status::Partial) => Next::Read,
            Err(_) => Next::Close("bad greeting"),
            Ok(Status::Complete(greeting, n)) => {
                // With users configured, only a password will do, except for
                // exempt clients, who may also go without (a client that
                // offers both logs in, so that its user's limits apply).
                let preferred: &[Method] = match (ctx.users.is_some(), client.exempt) {
                    (false, _) => &[Method::NoAuth],
                    (true, false) => &[Method::UserPass],
                    (true, true) => &[Method::UserPass, Method::NoAuth],
                };
                let method = greeting.choose(preferred);
                let mut out = [0u8; 2];
                let len = encode_method(method, &mut out);
                let sent = send(&mut client.stream, &out[..len]);
                match method {
                    Method::NoAcceptable => {
                        reject(&mut client.stream);
                        Next::Close("no acceptable method")
                    }
                    _ if !sent => Next::Close("client gone"),
                    Method::UserPass => Next::Phase(Phase::Auth, n),
                    _ => Next::Phase(Phase::Request, n),
                }
            }
        },
    }
}

/// RFC 1929: one attempt; a failure is answered and closes the connection.
fn auth(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    let (creds, n) = match parse_auth(data) {
        Ok(Status::Partial) => return Next::Read,
        Err(_) => return Next::Close("bad username/password message"),
        Ok(Status::Complete(creds, n)) => (creds, n),
    };
    let Credentials { user, password } = creds;
    let verdict = match ctx.users {
        Some(users) if users.verify(user, password) => match ctx.limits.admit_user(user) {
            Some(id) => {
                client.user = id;
                Ok(())
            }
            None => Err("user is at its session limit"),
        },
        _ => Err("login failed"),
    };
    let mut out = [0u8; 2];
    let len = encode_auth_reply(verdict.is_ok(), &mut out);
    let sent = send(&mut client.stream, &out[..len]);
    match verdict {
        Ok(()) if sent => Next::Phase(Phase::Request, n),
        Ok(()) => Next::Close("client gone"),
        Err(why) => {
            let peer = client.stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
            log::warn!("{why}: user {:?} from {peer}", user.escape_ascii().to_string());
            reject(&mut client.stream);
            Next::Close(why)
        }
    }
}

/// Hands a domain name to the resolver. Names that are not UTF-8 cannot be
/// looked up, and with no resolver threads no name can.
fn resolve(host: Option<String>, port: u16, carry: Carry, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let waiting = State::Resolving { carry };
    let (Some(host), Some(resolver)) = (host, ctx.resolver) else {
        return (waiting, Flow::Close(fail(&mut client.stream, Reply::HostUnreachable)));
    };
    log::debug!("#{} resolving {host}", ctx.key);
    match resolver.submit(Job { key: ctx.key, id: ctx.id, host, port }) {
        Ok(()) => (waiting, Flow::Wait),
        Err(_) => {
            *ctx.resolver_full += 1;
            (waiting, Flow::Close(fail(&mut client.stream, Reply::GeneralFailure)))
        }
    }
}
