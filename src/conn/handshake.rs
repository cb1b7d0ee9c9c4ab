//! Greeting and request: read into the session's handshake buffer until the
//! codec has a whole message, answer it, and hand the rest on.

use super::{Carry, Ctx, Flow, Ready, State, connect, fail, reject, send};
use crate::buf::{Buf, Io, read};
use crate::proto::{
    Addr, Command, HTTP_400, Method, Reply, Sniff, Status, encode_method, parse_greeting, parse_request, sniff,
};
use crate::resolver::Job;
use crate::timer::Kind;
use mio::net::TcpStream;
use std::net::SocketAddr;

/// Methods we accept, best first.
const METHODS: &[Method] = &[Method::NoAuth];

enum Phase {
    Greeting,
    Request,
}

pub(crate) struct Handshake {
    buf: Buf,
    len: usize,
    phase: Phase,
}

impl Handshake {
    pub(crate) fn new(buf: Buf) -> Handshake {
        Handshake { buf, len: 0, phase: Phase::Greeting }
    }

    pub(crate) fn into_buf(self) -> Buf {
        self.buf
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
    }

    pub(crate) fn step(mut self, client: &mut TcpStream, ready: &mut Ready, ctx: &mut Ctx<'_>) -> (State, Flow) {
        loop {
            let data = &self.buf[..self.len];
            let need_more = match self.phase {
                Phase::Greeting => match sniff(data) {
                    Status::Partial => true,
                    Status::Complete(Sniff::Http, _) => {
                        send(client, HTTP_400);
                        reject(client);
                        return (State::Handshake(self), Flow::Close("HTTP request on the SOCKS port"));
                    }
                    Status::Complete(Sniff::Other, _) => {
                        return (State::Handshake(self), Flow::Close("not SOCKS5"));
                    }
                    Status::Complete(Sniff::Socks5, _) => match parse_greeting(data) {
                        Ok(Status::Partial) => true,
                        Err(_) => return (State::Handshake(self), Flow::Close("bad greeting")),
                        Ok(Status::Complete(greeting, n)) => {
                            let method = greeting.choose(METHODS);
                            let mut out = [0u8; 2];
                            let len = encode_method(method, &mut out);
                            let sent = send(client, &out[..len]);
                            if method == Method::NoAcceptable {
                                reject(client);
                                return (State::Handshake(self), Flow::Close("no acceptable method"));
                            }
                            if !sent {
                                return (State::Handshake(self), Flow::Close("client gone"));
                            }
                            self.consume(n);
                            self.phase = Phase::Request;
                            false
                        }
                    },
                },
                Phase::Request => match parse_request(data) {
                    Ok(Status::Partial) => true,
                    Err(e) => {
                        let why = match e.reply() {
                            Some(rep) => fail(client, rep),
                            None => "bad request",
                        };
                        log::debug!("#{} {e}", ctx.key);
                        return (State::Handshake(self), Flow::Close(why));
                    }
                    Ok(Status::Complete(req, n)) => {
                        if req.command != Command::Connect {
                            let why = fail(client, Reply::CommandNotSupported);
                            return (State::Handshake(self), Flow::Close(why));
                        }
                        let port = req.port;
                        ctx.timers.set(ctx.key, Kind::Connect, ctx.now);
                        let target = req.addr.ip().map(|ip| SocketAddr::new(ip, port));
                        let host = match (target, req.addr) {
                            (None, Addr::Domain(d)) => std::str::from_utf8(d).ok().map(str::to_owned),
                            _ => None,
                        };
                        let carry = Carry { buf: self.buf, start: n as u32, end: self.len as u32 };
                        return match target {
                            Some(addr) => connect::start(connect::Addrs::one(addr), carry, None, client, ready, ctx),
                            None => resolve(host, port, carry, client, ctx),
                        };
                    }
                },
            };
            if !need_more {
                continue;
            }
            if self.len == self.buf.len() {
                return (State::Handshake(self), Flow::Close("handshake too long"));
            }
            if !ready.has(Ready::CLIENT_R) {
                return (State::Handshake(self), Flow::Wait);
            }
            let room = &mut self.buf[self.len..];
            let want = room.len();
            match read(client, room) {
                Io::Done(n) => {
                    // A short read drained the socket (see relay.rs).
                    if n < want {
                        ready.short_read(Ready::CLIENT_R);
                    }
                    self.len += n;
                }
                Io::WouldBlock => {
                    ready.clear(Ready::CLIENT_R);
                    return (State::Handshake(self), Flow::Wait);
                }
                Io::Eof => return (State::Handshake(self), Flow::Close("client closed during handshake")),
                Io::Err(_) => return (State::Handshake(self), Flow::Close("client error during handshake")),
            }
        }
    }
}

/// Hands a domain name to the resolver. Names that are not UTF-8 cannot be
/// looked up, and with no resolver threads no name can.
fn resolve(host: Option<String>, port: u16, carry: Carry, client: &mut TcpStream, ctx: &mut Ctx<'_>) -> (State, Flow) {
    let waiting = State::Resolving { carry };
    let (Some(host), Some(resolver)) = (host, ctx.resolver) else {
        return (waiting, Flow::Close(fail(client, Reply::HostUnreachable)));
    };
    log::debug!("#{} resolving {host}", ctx.key);
    match resolver.submit(Job { key: ctx.key, id: ctx.id, host, port }) {
        Ok(()) => (waiting, Flow::Wait),
        Err(_) => {
            *ctx.resolver_full += 1;
            (waiting, Flow::Close(fail(client, Reply::GeneralFailure)))
        }
    }
}
