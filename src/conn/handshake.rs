//! Greeting, authentication and request: read into the session's handshake
//! buffer until the codec has a whole message, answer it, and hand the rest
//! on. Each phase runs as soon as its bytes are there, so a client may send
//! all three in one write, or one byte at a time. The handshake ends by
//! handing a [`Request`] (command, target, pipelined bytes) to the dial step.

use super::dial::{Request, Target};
use super::{Carry, Client, Close, Ctx, Flow, Peer, Ready, Recycle, State, fail, linger, send};
use crate::buf::{Buf, Io, Pool, read};
use crate::proto::{
    Addr, Command, Credentials, HTTP_400, Method, Reply, Sniff, Status, encode_auth_reply, encode_method, parse_auth,
    parse_greeting, parse_request, sniff,
};
use crate::warn::Warn;
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
    /// Send failure reply `Reply`, then close.
    Fail(Reply),
    /// An answer that ends the session was sent: linger, then close.
    Answered(Close),
}

impl Handshake {
    pub(crate) fn new(buf: Buf) -> Handshake {
        Handshake { buf, len: 0, phase: Phase::Greeting }
    }

    pub(crate) fn step(mut self, client: &mut Client, ctx: &mut Ctx<'_>) -> Progress {
        loop {
            let data = &self.buf[..self.len];
            let next = match self.phase {
                Phase::Greeting => greeting(data, client, ctx),
                Phase::Auth => auth(data, client, ctx),
                Phase::Request => request(data, ctx),
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
                Next::Answered(why) => {
                    let (state, flow) = linger(self, why, client, ctx);
                    return Progress::Stay(state, flow);
                }
            }
            if self.len == self.buf.len() {
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

/// The first bytes pick the protocol; a SOCKS5 greeting picks the method.
fn greeting(data: &[u8], client: &mut Client, ctx: &mut Ctx<'_>) -> Next {
    match sniff(data) {
        Status::Partial => Next::Read,
        Status::Complete(Sniff::Http, _) => {
            send(&mut client.stream, HTTP_400);
            Next::Answered(Close::HttpOnSocksPort)
        }
        Status::Complete(Sniff::Other, _) => Next::Close(Close::NotSocks),
        Status::Complete(Sniff::Socks5, _) => match parse_greeting(data) {
            Ok(Status::Partial) => Next::Read,
            Err(_) => Next::Close(Close::BadGreeting),
            Ok(Status::Complete(greeting, n)) => {
                // With users configured, only a password will do, except for
                // exempt clients, who may also go without (a client that
                // offers both logs in, so that its user's limits apply).
                let preferred: &[Method] = match (ctx.env.users.is_some(), client.exempt) {
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
        },
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
    let env = &mut *ctx.env;
    let verdict = match &env.users {
        Some(users) if users.verify(user, password) => match env.limits.admit_user(user) {
            Some(id) => {
                client.user = id;
                Ok(())
            }
            None => Err(Close::UserAtLimit),
        },
        _ => Err(Close::LoginFailed),
    };
    let mut out = [0u8; 2];
    let len = encode_auth_reply(verdict.is_ok(), &mut out);
    let sent = send(&mut client.stream, &out[..len]);
    match verdict {
        Ok(()) if sent => Next::Phase(Phase::Request, n),
        Ok(()) => Next::Close(Close::ClientGone),
        Err(why) => {
            let (id, peer, user) = (ctx.id, Peer(&client.stream), user.escape_ascii());
            env.warnings.warn(Warn::Login, ctx.now, format_args!("#{id} {why}: user \"{user}\" from {peer}"));
            Next::Answered(why)
        }
    }
}

fn request(data: &[u8], ctx: &mut Ctx<'_>) -> Next {
    match parse_request(data) {
        Ok(Status::Partial) => Next::Read,
        Err(e) => {
            log::debug!("#{} {e}", ctx.id);
            e.reply().map_or(Next::Close(Close::BadRequest), Next::Fail)
        }
        Ok(Status::Complete(req, n)) => {
            let target = match (req.addr.ip(), req.addr) {
                (Some(ip), _) => Target::Ip(SocketAddr::new(ip, req.port)),
                (None, Addr::Domain(d)) => match std::str::from_utf8(d) {
                    Ok(host) => Target::Name(host.to_owned(), req.port),
                    Err(_) => Target::Unresolvable,
                },
                (None, _) => Target::Unresolvable,
            };
            Next::Done(req.command, target, n)
        }
    }
}
