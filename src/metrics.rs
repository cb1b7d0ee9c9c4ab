//! `--metrics-listen`: Prometheus text format over HTTP/1.1 from the first
//! worker's loop. `GET /metrics` (or `HEAD`) gets the sums of every
//! worker's counters; any other path 404, another method on the path 405,
//! a malformed head 400, a head beyond 1 KiB 431; every answer closes.
//! The endpoint has its own small limits, so it cannot be used to exhaust
//! the server: at most four connections at once (more are closed at
//! accept), 1 KiB of head, 5 s from accept to close.

use crate::stats::{Published, render};
use crate::token::{self, MAX_METRICS};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HEAD: usize = 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

/// What a request head says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// Not complete yet.
    Partial,
    /// A well-formed request: its status and whether a body follows.
    Answer(u16, bool),
}

/// Parses a request head (sans I/O): the request line and the blank line
/// that ends the head; headers are not needed and are skipped.
pub(crate) fn parse(head: &[u8]) -> Head {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if head.len() >= HEAD { Head::Answer(431, false) } else { Head::Partial };
    };
    let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap_or(end);
    let mut parts = head[..line_end].split(|&b| b == b' ');
    let (Some(method), Some(path), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Head::Answer(400, false);
    };
    let token = |s: &[u8]| !s.is_empty() && s.iter().all(|b| b.is_ascii_alphabetic());
    if !token(method) || !path.starts_with(b"/") || !(version == b"HTTP/1.1" || version == b"HTTP/1.0") {
        return Head::Answer(400, false);
    }
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => Head::Answer(200, true),
        (b"HEAD", b"/metrics") => Head::Answer(200, false),
        (_, b"/metrics") => Head::Answer(405, false),
        _ => Head::Answer(404, false),
    }
}

struct Conn {
    stream: TcpStream,
    head: [u8; HEAD],
    len: usize,
    /// The answer, once known, and how much of it is written.
    out: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// The endpoint: its listener and connections, and every worker's
/// published counters.
pub(crate) struct Metrics {
    listener: TcpListener,
    conns: [Option<Box<Conn>>; MAX_METRICS],
    loops: Arc<[Arc<Published>]>,
}

impl Metrics {
    pub(crate) fn new(
        mut listener: TcpListener,
        loops: Arc<[Arc<Published>]>,
        registry: &Registry,
    ) -> io::Result<Metrics> {
        registry.register(&mut listener, token::METRICS_LISTENER, Interest::READABLE)?;
        Ok(Metrics { listener, conns: Default::default(), loops })
    }

    /// Accepts everything waiting; beyond the connection limit, closes.
    pub(crate) fn accept(&mut self, registry: &Registry, now: Instant) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("metrics accept: {e}");
                    return;
                }
            };
            let Some(i) = self.conns.iter().position(Option::is_none) else {
                log::debug!("metrics: {MAX_METRICS} connections open, one more closed");
                continue;
            };
            if registry.register(&mut stream, token::metrics(i), Interest::READABLE | Interest::WRITABLE).is_err() {
                continue;
            }
            self.conns[i] =
                Some(Box::new(Conn { stream, head: [0; HEAD], len: 0, out: None, deadline: now + TIMEOUT }));
            self.drive(i);
        }
    }

    /// Reads the head, answers, writes, closes: as far as the socket lets.
    pub(crate) fn drive(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else { return };
        if c.out.is_none() {
            loop {
                match c.stream.read(&mut c.head[c.len..]) {
                    Ok(0) => {
                        self.conns[i] = None;
                        return;
                    }
                    Ok(n) => {
                        c.len += n;
                        if let Head::Answer(status, body) = parse(&c.head[..c.len]) {
                            c.out = Some((response(status, body, &self.loops), 0));
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.conns[i] = None;
                        return;
                    }
                }
            }
        }
        let Some((out, at)) = &mut c.out else { return };
        while *at < out.len() {
            match c.stream.write(&out[*at..]) {
                Ok(n) => *at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Answered: close (the client reads to EOF: `Connection: close`).
        self.conns[i] = None;
    }

    /// Closes the connections past their deadline.
    pub(crate) fn expire(&mut self, now: Instant) {
        for c in &mut self.conns {
            if c.as_ref().is_some_and(|c| now >= c.deadline) {
                *c = None;
            }
        }
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.conns.iter().flatten().map(|c| c.deadline).min()
    }
}

fn response(status: u16, body: bool, loops: &[Arc<Published>]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let text = if status == 200 { render(loops.iter().map(|l| &**l), loops.len()) } else { String::new() };
    let length = if status == 200 { text.len() } else { 0 };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    if body {
        out.extend_from_slice(text.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let cases: [(&[u8], Head); 11] = [
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Head::Answer(200, true)),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", Head::Answer(200, true)),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", Head::Answer(200, false)),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Head::Answer(405, false)),
            (b"GET / HTTP/1.1\r\n\r\n", Head::Answer(404, false)),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", Head::Answer(404, false)),
            (b"GET /metrics HTTP/2\r\n\r\n", Head::Answer(400, false)),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", Head::Answer(400, false)),
            (b"\x05\x01\x00\r\n\r\n", Head::Answer(400, false)),
            (b"GET /metrics HTTP/1.1\r\n", Head::Partial),
            (b"", Head::Partial),
        ];
        for (head, want) in cases {
            assert_eq!(parse(head), want, "{:?}", String::from_utf8_lossy(head));
        }
        assert_eq!(parse(&[b'a'; HEAD]), Head::Answer(431, false));
        assert_eq!(parse(&[b'a'; HEAD - 1]), Head::Partial);
    }
}
