//! Both directions of an established session, through kernel pipes
//! (`splice`, Linux) or fixed buffers.
//!
//! A direction borrows a pipe from the pool when its source has bytes, and
//! a buffer when no pipe can be had (or while bytes that came with the
//! request still wait in one: they go first); it gives either back as soon
//! as everything read has been written, so an idle session holds neither. A full buffer stops reading its source until the
//! destination drains it (backpressure). An EOF is passed on as
//! `shutdown(Write)` once the bytes before it are out (half-close).
//!
//! A direction ends on its own: a read error ends it like an EOF (the bytes
//! read before it are still delivered) and marks the same socket dead for
//! the other direction (a reset socket takes nothing either), and a write
//! error ends it at once (its destination takes nothing more: what it held
//! is dropped, and what its source still sends is read and dropped). The other direction runs on
//! to its own end, so a destination that answers and hangs up while the
//! client is still uploading (an HTTP 413, say) gets its answer through.
//! The session ends when both directions have ended, or when the client can
//! no longer be written to. Then, unless the client's EOF has been passed
//! on, the upstream gets a reset ([`Relay::abort`]), never the FIN that
//! would make a cut-off upload look complete.

use super::{Carry, Client, Close, Ctx, Flow, Ready, Recycle, State, linger};
use crate::buf::{Buf, Io, Pool, read, write};
use crate::pipe::{PipeId, splice};
use crate::shaping::Shaping;
use crate::stats::Stat;
use crate::timer::Kind;
use mio::net::TcpStream;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Socket operations per turn before a session yields to the others.
const BUDGET: u32 = 32;

/// One direction: bytes read from `src` wait in `buf[start..end]`, or, when
/// it holds a pipe instead (never both), `end` bytes wait in the pipe. Its
/// pipe and its end state live in `Relay` (packed there, a session is
/// smaller): `Relay::pipes[0]` for TX, `[1]` for RX, and the end bits its
/// `Dir` names.
struct Half {
    buf: Option<Buf>,
    start: u32,
    end: u32,
}

/// What both directions' passes share: the session's readiness and end
/// bits, the pool, and the session id for the log.
struct Pass<'a> {
    ready: &'a mut Ready,
    ends: &'a mut u8,
    pool: &'a mut Pool,
    id: u32,
    /// Bytes delivered this pump, by `Dir::idx` (for the access log).
    moved: [u64; 2],
    /// Rate limits, when set: the session's slot and user, and whether a
    /// direction found its buckets empty.
    shape: Option<&'a mut Shaping>,
    key: usize,
    user: u32,
    now: Instant,
    throttled: bool,
}

/// The rate-limit side of a pass, apart from the fields a pass borrows
/// while it reads.
struct Limit<'a, 'b> {
    shape: &'a mut Option<&'b mut Shaping>,
    key: usize,
    user: u32,
    now: Instant,
    throttled: &'a mut bool,
}

impl Limit<'_, '_> {
    /// How much direction `dir` may read now (`want` at most); 0 marks the
    /// pump throttled.
    fn allow(&mut self, dir: &Dir, want: usize) -> usize {
        let Some(s) = self.shape.as_deref_mut() else { return want };
        let allow = s.allowance(self.key, self.user, dir.idx, self.now);
        if allow == 0 {
            *self.throttled = true;
        }
        want.min(usize::try_from(allow).unwrap_or(usize::MAX))
    }

    fn spend(&mut self, dir: &Dir, n: usize) {
        if let Some(s) = self.shape.as_deref_mut() {
            s.spend(self.key, self.user, dir.idx, n as u64);
        }
    }
}

/// Which readiness and end bits a direction uses.
struct Dir {
    /// 0 up (client to upstream), 1 down.
    idx: usize,
    src_r: u8,
    dst_w: u8,
    /// `src` has sent EOF (or failed).
    eof: u8,
    /// This direction is over: its EOF was passed on, or `dst` failed and
    /// `src` has ended since.
    shut: u8,
    /// `dst` failed a write: what `src` sends is dropped.
    dead: u8,
    /// A read error on `src` (a reset): `eof`, and the other direction's
    /// `dead` (a reset socket cannot be written to either).
    reset: u8,
    /// `eof` and `shut`: the EOF is to be passed on when, of these, only
    /// `eof` is set.
    eof_shut: u8,
    /// The other direction's `shut` and this one's `dead`: with either
    /// set, no `shutdown` (the close sends the FIN, or the destination is
    /// gone).
    no_fin: u8,
    /// The client is gone (`RX_DEAD`), for client to upstream: its EOF is
    /// not passed on at all (the session ends now, and the upstream gets a
    /// reset). None for the other direction.
    abort: u8,
    /// A read has filled a whole buffer: the direction carries bulk, and
    /// splices from now on. Until then it copies: for small messages a
    /// splice costs a syscall more than a copy (its `EAGAIN`, which the
    /// short-read rule saves), and moves too little to win anything back.
    bulk: u8,
}

const TX_EOF: u8 = 1;
const TX_SHUT: u8 = 2;
const RX_EOF: u8 = 4;
const RX_SHUT: u8 = 8;
const TX_DEAD: u8 = 16;
const RX_DEAD: u8 = 32;
const TX_BULK: u8 = 64;
const RX_BULK: u8 = 128;
/// Both directions are over.
const BOTH_SHUT: u8 = TX_SHUT | RX_SHUT;
/// The bits [`end`] looks at, past `RX_DEAD`.
const END_BITS: u8 = TX_SHUT | RX_SHUT | TX_DEAD;
/// The answer is out and the upstream is gone while the client may still
/// be sending: linger on the client.
const LINGER_ENDS: u8 = RX_SHUT | TX_DEAD;
/// Client to upstream.
const TX: Dir = Dir {
    idx: 0,
    src_r: Ready::CLIENT_R,
    dst_w: Ready::UP_W,
    eof: TX_EOF,
    shut: TX_SHUT,
    dead: TX_DEAD,
    reset: TX_EOF | RX_DEAD,
    eof_shut: TX_EOF | TX_SHUT,
    no_fin: RX_SHUT | TX_DEAD,
    abort: RX_DEAD,
    bulk: TX_BULK,
};
/// Upstream to client.
const RX: Dir = Dir {
    idx: 1,
    src_r: Ready::UP_R,
    dst_w: Ready::CLIENT_W,
    eof: RX_EOF,
    shut: RX_SHUT,
    dead: RX_DEAD,
    reset: RX_EOF | TX_DEAD,
    eof_shut: RX_EOF | RX_SHUT,
    no_fin: TX_SHUT | RX_DEAD,
    abort: 0,
    bulk: RX_BULK,
};

impl Half {
    fn empty() -> Half {
        Half { buf: None, start: 0, end: 0 }
    }

    /// One read (if there is room and the source may have data) and one
    /// write (if there are bytes and the destination may take them); true
    /// when anything moved. When the other direction has ended already,
    /// this one ending ends the session, and closing the socket sends the
    /// FIN: no `shutdown` then.
    ///
    /// A short read means the socket was drained, and a short write that its
    /// buffer is full: both clear the readiness bit at once, saving the
    /// `EAGAIN` round trip (epoll raises a new edge for any later arrival).
    fn pass(
        &mut self,
        pipe: &mut Option<PipeId>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        dir: &Dir,
        p: &mut Pass<'_>,
    ) -> bool {
        match self.splice_pass(pipe, src, dst, dir, p) {
            Some(moved) => moved,
            None => self.copy_pass(src, dst, dir, p),
        }
    }

    /// The pass through a pipe: one splice in (if the source may have
    /// data) and one out (if the pipe holds bytes and the destination may
    /// take them). `None` when this pass must copy instead: the direction
    /// has not carried bulk yet, bytes wait in a buffer, the destination is
    /// dead (what the source sends is read and dropped), the source has
    /// nothing to read and no pipe is held, or no pipe can be had.
    ///
    /// There is no short-read rule here: a splice into a pipe stops short
    /// when the pipe's slots fill, which depends on how the bytes arrived.
    /// `EAGAIN` from an empty pipe means the socket is drained; from a pipe
    /// holding bytes it may only mean the pipe is full, so the readiness
    /// bit stays until the pipe has been emptied and a splice into it
    /// finds nothing.
    fn splice_pass(
        &mut self,
        pipe: &mut Option<PipeId>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        dir: &Dir,
        p: &mut Pass<'_>,
    ) -> Option<bool> {
        let (ready, ends, pool, id) = (&mut *p.ready, &mut *p.ends, &mut *p.pool, p.id);
        let mut limit =
            Limit { shape: &mut p.shape, key: p.key, user: p.user, now: p.now, throttled: &mut p.throttled };
        let (src_r, dst_w) = (dir.src_r, dir.dst_w);
        if self.buf.is_some() || *ends & dir.bulk == 0 {
            return None;
        }
        if *ends & dir.dead != 0 {
            if let Some(held) = pipe.take() {
                pool.pipes.put(held, false);
                self.end = 0;
            }
            return None;
        }
        let held = match *pipe {
            Some(held) => held,
            None if *ends & dir.eof == 0 && ready.has(src_r) => {
                let held = pool.pipes.take()?;
                (self.start, self.end) = (0, 0);
                *pipe = Some(held);
                held
            }
            None => return None,
        };
        let Some((pipe_r, pipe_w)) = pool.pipes.fds(held) else {
            *pipe = None;
            return None;
        };
        let mut moved = false;
        let allow = if *ends & dir.eof == 0 && ready.has(src_r) { limit.allow(dir, pool.pipes.chunk()) } else { 0 };
        if allow > 0 {
            match splice(src.as_raw_fd(), pipe_w, allow) {
                Ok(0) => {
                    *ends |= dir.eof;
                    moved = true;
                }
                Ok(n) => {
                    self.end += n as u32;
                    limit.spend(dir, n);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.end == 0 {
                        ready.clear(src_r);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => moved = true,
                Err(e) => {
                    log::debug!("#{id} relay splice in: {e}");
                    *ends |= dir.reset;
                    moved = true;
                }
            }
        }
        if self.end > 0 && ready.has(dst_w) {
            match splice(pipe_r, dst.as_raw_fd(), self.end as usize) {
                Ok(n) if n > 0 => {
                    self.end -= n as u32;
                    p.moved[dir.idx] += n as u64;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear(dst_w),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => moved = true,
                _ => {
                    *ends |= dir.dead;
                    moved = true;
                }
            }
        }
        if self.end == 0 || *ends & dir.dead != 0 {
            pool.pipes.put(held, self.end == 0);
            *pipe = None;
            self.end = 0;
        }
        Some(self.pass_eof(dst, dir, ends) || moved)
    }

    /// The pass through a buffer.
    fn copy_pass(&mut self, src: &mut TcpStream, dst: &mut TcpStream, dir: &Dir, p: &mut Pass<'_>) -> bool {
        let (ready, ends, pool, id) = (&mut *p.ready, &mut *p.ends, &mut *p.pool, p.id);
        let mut limit =
            Limit { shape: &mut p.shape, key: p.key, user: p.user, now: p.now, throttled: &mut p.throttled };
        let (src_r, dst_w) = (dir.src_r, dir.dst_w);
        let dead = *ends & dir.dead != 0;
        let mut moved = false;
        let room = self.buf.as_ref().map_or(pool.relay_size(), |b| b.len() - self.end as usize);
        let allow = if *ends & dir.eof == 0 && room > 0 && ready.has(src_r) { limit.allow(dir, room) } else { 0 };
        if allow > 0 {
            let buf = self.buf.get_or_insert_with(|| pool.relay());
            let start = self.end as usize;
            let whole = start == 0 && allow == buf.len();
            let room = &mut buf[start..start + allow];
            let want = room.len();
            match read(src, room) {
                Io::Done(n) => {
                    limit.spend(dir, n);
                    if n < want {
                        ready.short_read(src_r);
                    } else if whole {
                        *ends |= dir.bulk;
                    }
                    if !dead {
                        self.end += n as u32;
                    }
                    moved = true;
                }
                Io::Eof => {
                    *ends |= dir.eof;
                    moved = true;
                }
                Io::WouldBlock => ready.clear(src_r),
                Io::Err(e) => {
                    log::debug!("#{id} relay read: {e}");
                    *ends |= dir.reset;
                    moved = true;
                }
            }
        }
        if !dead
            && self.start < self.end
            && ready.has(dst_w)
            && let Some(buf) = &self.buf
        {
            match write(dst, &buf[self.start as usize..self.end as usize]) {
                Io::Done(n) => {
                    if n < (self.end - self.start) as usize {
                        ready.clear(dst_w);
                    }
                    self.start += n as u32;
                    p.moved[dir.idx] += n as u64;
                    moved = true;
                }
                Io::WouldBlock => ready.clear(dst_w),
                Io::Eof | Io::Err(_) => {
                    *ends |= dir.dead;
                    (self.start, self.end) = (0, 0);
                    moved = true;
                }
            }
        }
        if self.start == self.end
            && let Some(buf) = self.buf.take()
        {
            pool.put(buf);
            (self.start, self.end) = (0, 0);
        }
        self.pass_eof(dst, dir, ends) || moved
    }

    /// Passes the source's EOF on once nothing is left to deliver (no
    /// buffer, and no pipe: both are given back when drained); true when it
    /// did. Not when the direction aborts: then the session is ending.
    fn pass_eof(&self, dst: &mut TcpStream, dir: &Dir, ends: &mut u8) -> bool {
        if *ends & dir.eof_shut != dir.eof || self.buf.is_some() || self.end != 0 || *ends & dir.abort != 0 {
            return false;
        }
        if *ends & dir.no_fin == 0 {
            // The peer may already be gone; the session ends on its own then.
            let _ = dst.shutdown(Shutdown::Write);
        }
        *ends |= dir.shut;
        true
    }
}

pub(crate) struct Relay {
    up: TcpStream,
    /// Client to upstream.
    tx: Half,
    /// Upstream to client.
    rx: Half,
    /// The `TX_*` and `RX_*` bits.
    ends: u8,
    /// The pipe each direction holds, by `Dir::pipe`.
    pipes: [Option<PipeId>; 2],
}

/// Whether the session is over, from the end bits alone: when the client
/// can no longer be written to (nothing left to deliver), when both
/// directions are over, or when the destination is gone for good while the
/// client may still be sending (then linger on the client).
fn end(ends: u8) -> Option<Pumped> {
    if ends & RX_DEAD != 0 {
        return Some(Pumped::Close(Close::ClientGone));
    }
    match ends & END_BITS {
        e if e & BOTH_SHUT == BOTH_SHUT => Some(Pumped::Close(Close::Done)),
        LINGER_ENDS => Some(Pumped::Linger),
        _ => None,
    }
}

/// How a pump ended.
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    Wait,
    Again,
    Close(Close),
    /// The destination is gone and has nothing more for the client, which
    /// may still be sending.
    Linger,
}

impl Relay {
    /// `carry`: client bytes that came with the request, sent first.
    pub(crate) fn new(up: TcpStream, carry: Carry) -> Relay {
        let tx = Half { buf: Some(carry.buf), start: carry.start, end: carry.end };
        Relay { up, tx, rx: Half::empty(), ends: 0, pipes: [None; 2] }
    }

    pub(crate) fn step(mut self, client: &mut Client, ctx: &mut Ctx<'_>) -> (State, Flow) {
        match self.pump(&mut client.stream, &mut client.ready, client.user, ctx) {
            Pumped::Wait => (State::Relaying(self), Flow::Wait),
            Pumped::Again => (State::Relaying(self), Flow::Again),
            Pumped::Close(Close::ClientGone) => {
                self.abort();
                (State::Relaying(self), Flow::Close(Close::ClientGone))
            }
            Pumped::Close(why) => (State::Relaying(self), Flow::Close(why)),
            Pumped::Linger => linger(self, Close::UpstreamGone, client, ctx),
        }
    }

    /// The session ends because the client is gone (reset, or no longer
    /// writable): unless the client's EOF was passed on, the upstream's
    /// close becomes a reset, so an upload cut off here never looks
    /// complete to it, as a FIN would make it look. Whatever the upstream
    /// had not yet taken is dropped; so is what the client sent and the
    /// relay still held, even when the client had finished (a known limit:
    /// the session ends at once when the client goes). After the EOF went
    /// out, a plain close lets the kernel deliver what it holds, unless
    /// the upstream has sent bytes the relay never read, when the kernel
    /// resets it anyway.
    pub(crate) fn abort(&self) {
        if self.ends & TX_SHUT == 0 {
            let _ = socket2::SockRef::from(&self.up).set_linger(Some(Duration::ZERO));
        }
    }

    /// `user`: the session's user id (0: none), for its rate limit.
    fn pump(&mut self, client: &mut TcpStream, ready: &mut Ready, user: u32, ctx: &mut Ctx<'_>) -> Pumped {
        let env = &mut *ctx.env;
        let mut p = Pass {
            ready,
            ends: &mut self.ends,
            pool: &mut env.pool,
            id: ctx.id,
            moved: [0; 2],
            shape: env.shaping.as_mut(),
            key: ctx.key,
            user,
            now: ctx.now,
            throttled: false,
        };
        let mut moved = false;
        let mut budget = BUDGET;
        let end = loop {
            let [tx_pipe, rx_pipe] = &mut self.pipes;
            let tx = self.tx.pass(tx_pipe, client, &mut self.up, &TX, &mut p);
            let rx = self.rx.pass(rx_pipe, &mut self.up, client, &RX, &mut p);
            if let Some(end) = end(*p.ends) {
                break end;
            }
            if !(tx || rx) {
                break Pumped::Wait;
            }
            moved = true;
            budget -= 1;
            if budget == 0 {
                break Pumped::Again;
            }
        };
        let [up, down] = p.moved;
        if p.throttled
            && let Some(s) = &mut ctx.env.shaping
        {
            s.throttled(ctx.key, ctx.now);
        }
        if moved {
            ctx.env.timers.touch(ctx.key, Kind::Idle, ctx.now);
            ctx.env.stats.add(Stat::BytesUp, up);
            ctx.env.stats.add(Stat::BytesDown, down);
            if let Some(r) = ctx.record() {
                r.up += up;
                r.down += down;
            }
        }
        end
    }
}

impl Recycle for Relay {
    fn recycle(self, pool: &mut Pool) {
        for (half, pipe) in [(&self.tx, self.pipes[0]), (&self.rx, self.pipes[1])] {
            if let Some(pipe) = pipe {
                pool.pipes.put(pipe, half.end == 0);
            }
        }
        for buf in [self.tx.buf, self.rx.buf].into_iter().flatten() {
            pool.put(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use super::super::tests::{arrived, ctx, pair};

    /// Regression (mutation: the budget never ends a pump): a session with
    /// more bytes waiting than one turn may move yields (`Again`) instead of
    /// moving them all while other sessions wait.
    #[test]
    fn a_pump_yields_after_its_budget() {
        let (mut client, mut client_peer) = pair();
        let (up, _sink) = pair();
        client_peer.write_all(&[7u8; 256 * 1024]).unwrap();
        let mut env = super::super::tests::env();
        env.pool = Pool::new(1024);
        let poll = mio::Poll::new().unwrap();
        let mut ctx = ctx(&poll, &mut env);
        let carry = Carry { buf: ctx.env.pool.relay(), start: 0, end: 0 };
        let mut relay = Relay::new(up, carry);
        let mut ready = Ready::default();
        ready.set(Ready::CLIENT_R | Ready::CLIENT_W | Ready::UP_W);
        assert_eq!(relay.pump(&mut client, &mut ready, 0, &mut ctx), Pumped::Again);
        // It yields after its whole budget, not before: 32 rounds of 1 KiB.
        _sink.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut got = 0;
        let mut buf = [0u8; 64 * 1024];
        while got < BUDGET as usize * 1024 {
            got += std::io::Read::read(&mut &_sink, &mut buf).unwrap();
        }
        assert_eq!(got, BUDGET as usize * 1024, "one turn moves its budget's worth");
    }

    /// The client's EOF read while its bytes still wait in the pipe (the
    /// upstream is full) is passed on only after them: no FIN while a pipe
    /// holds bytes.
    #[cfg(target_os = "linux")]
    #[test]
    fn no_fin_while_the_pipe_holds_bytes() {
        use std::io::Read;
        let (mut client, mut client_peer) = pair();
        let (up, mut up_peer) = pair();
        socket2::SockRef::from(&up).set_send_buffer_size(4096).unwrap();
        socket2::SockRef::from(&up_peer).set_recv_buffer_size(4096).unwrap();
        let sent = vec![7u8; 64 * 1024];
        client_peer.write_all(&sent).unwrap();
        client_peer.shutdown(Shutdown::Write).unwrap();
        let mut env = super::super::tests::env();
        env.pool = Pool::with_pipes(4096, crate::pipe::Pipes::new(2, 1 << 20));
        let poll = mio::Poll::new().unwrap();
        let mut ctx = ctx(&poll, &mut env);
        let carry = Carry { buf: ctx.env.pool.relay(), start: 0, end: 0 };
        let mut relay = Relay::new(up, carry);
        let mut ready = Ready::default();
        std::thread::sleep(std::time::Duration::from_millis(50));
        for _ in 0..8 {
            ready.set(Ready::CLIENT_R | Ready::UP_W);
            relay.pump(&mut client, &mut ready, 0, &mut ctx);
        }
        assert_ne!(relay.ends & TX_EOF, 0, "the EOF was read");
        assert!(relay.tx.end > 0 && relay.pipes[0].is_some(), "bytes wait in the pipe");
        assert_eq!(relay.ends & TX_SHUT, 0, "the FIN waits for them");
        // The upstream reads; everything arrives, then the EOF.
        up_peer.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            up_peer.read_to_end(&mut got).map(|_| got)
        });
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while relay.ends & TX_SHUT == 0 {
            assert!(std::time::Instant::now() < end, "the FIN was never passed on");
            ready.set(Ready::UP_W);
            relay.pump(&mut client, &mut ready, 0, &mut ctx);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap().unwrap(), sent);
    }

    /// A relay that closes with a pipe holding bytes closes that pipe (the
    /// next borrower would get them); a drained one goes back to the pool.
    #[cfg(target_os = "linux")]
    #[test]
    fn recycle_closes_a_pipe_holding_bytes() {
        let mut pool = Pool::with_pipes(4096, crate::pipe::Pipes::new(4, 0));
        let (up, _peer) = pair();
        let carry = Carry { buf: pool.handshake(), start: 0, end: 0 };
        let mut relay = Relay::new(up, carry);
        let (full, empty) = (pool.pipes.take().unwrap(), pool.pipes.take().unwrap());
        let (_, w) = pool.pipes.fds(full).unwrap();
        // SAFETY: write(2) of five bytes from a live buffer to a pipe we own.
        assert_eq!(unsafe { libc::write(w, b"stale".as_ptr().cast(), 5) }, 5);
        relay.rx.end = 5;
        relay.pipes = [Some(empty), Some(full)];
        relay.recycle(&mut pool);
        assert_eq!(pool.pipes.counts(), (1, 1), "the drained pipe pooled, the full one closed");
        assert_eq!(pool.pipes.take(), Some(empty), "the pooled one is the drained one");
    }

    /// A relay set up for the copy path, with the client's and upstream's
    /// peers.
    fn copying(env: &mut super::super::Env) -> (Relay, TcpStream, std::net::TcpStream, std::net::TcpStream) {
        let (client, client_peer) = pair();
        let (up, up_peer) = pair();
        let carry = Carry { buf: env.pool.relay(), start: 0, end: 0 };
        (Relay::new(up, carry), client, client_peer, up_peer)
    }

    /// A relay for `copying`, or for splicing when `bulk` (both directions
    /// carry bulk, with pipes to take).
    fn relay_for(bulk: bool) -> (super::super::Env, Relay, TcpStream, std::net::TcpStream, std::net::TcpStream) {
        let mut env = super::super::tests::env();
        if bulk {
            env.pool = Pool::with_pipes(4096, crate::pipe::Pipes::new(2, 0));
        }
        let (mut relay, client, client_peer, up_peer) = copying(&mut env);
        if bulk {
            relay.ends |= TX_BULK | RX_BULK;
            // No carried bytes: the first pass splices.
            if let Some(carry) = relay.tx.buf.take() {
                env.pool.put(carry);
            }
        }
        (env, relay, client, client_peer, up_peer)
    }

    /// Mutation (a read whatever the readiness): a direction reads only
    /// when its source is known readable (edge-triggered: it is told),
    /// copying or splicing.
    #[test]
    fn a_direction_reads_only_when_told_its_source_is_readable() {
        for bulk in [false, cfg!(target_os = "linux")] {
            let (mut env, mut relay, mut client, mut client_peer, up_peer) = relay_for(bulk);
            client_peer.write_all(b"queued").unwrap();
            arrived(&client, 6);
            let poll = mio::Poll::new().unwrap();
            let mut ctx = ctx(&poll, &mut env);
            let mut ready = Ready::default();
            ready.set(Ready::CLIENT_W | Ready::UP_W);
            assert_eq!(relay.pump(&mut client, &mut ready, 0, &mut ctx), Pumped::Wait);
            up_peer.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 16];
            assert!(std::io::Read::read(&mut &up_peer, &mut buf).is_err(), "bulk {bulk}: nothing read, nothing sent");
            ready.set(Ready::CLIENT_R);
            relay.pump(&mut client, &mut ready, 0, &mut ctx);
            up_peer.set_nonblocking(false).unwrap();
            assert_eq!(std::io::Read::read(&mut &up_peer, &mut buf).unwrap(), 6, "bulk {bulk}: told, it reads");
            relay.recycle(&mut ctx.env.pool);
        }
    }

    /// Mutation (reading on after the EOF): a half-closed session waits for
    /// the other direction; it does not read its EOF again and again.
    #[test]
    fn after_the_clients_eof_the_session_waits() {
        for bulk in [false, cfg!(target_os = "linux")] {
            let (mut env, mut relay, mut client, client_peer, _up_peer) = relay_for(bulk);
            client_peer.shutdown(Shutdown::Write).unwrap();
            arrived(&client, 0);
            let poll = mio::Poll::new().unwrap();
            let mut ctx = ctx(&poll, &mut env);
            let mut ready = Ready::default();
            ready.set(Ready::CLIENT_R | Ready::CLIENT_W | Ready::UP_W);
            assert_eq!(relay.pump(&mut client, &mut ready, 0, &mut ctx), Pumped::Wait, "bulk {bulk}");
            assert_ne!(relay.ends & TX_SHUT, 0, "bulk {bulk}: the EOF was passed on");
            ready.set(Ready::CLIENT_R);
            assert_eq!(relay.pump(&mut client, &mut ready, 0, &mut ctx), Pumped::Wait, "bulk {bulk}: and stays passed");
            relay.recycle(&mut ctx.env.pool);
        }
    }

    /// Mutation (reading on after the EOF while bytes wait): the client's
    /// bytes and EOF read while the upstream cannot take them yet, the
    /// session waits for it; it does not read the EOF again and again.
    #[test]
    fn an_eof_behind_waiting_bytes_waits() {
        for bulk in [false, cfg!(target_os = "linux")] {
            let (mut env, mut relay, mut client, mut client_peer, _up_peer) = relay_for(bulk);
            client_peer.write_all(b"waiting").unwrap();
            client_peer.shutdown(Shutdown::Write).unwrap();
            arrived(&client, 7);
            let poll = mio::Poll::new().unwrap();
            let mut ctx = ctx(&poll, &mut env);
            let mut ready = Ready::default();
            // As the event says: readable, with the FIN queued (hang-up).
            ready.set(Ready::CLIENT_R | (Ready::CLIENT_R << 4) | Ready::CLIENT_W);
            assert_eq!(relay.pump(&mut client, &mut ready, 0, &mut ctx), Pumped::Wait, "bulk {bulk}");
            assert_ne!(relay.ends & TX_EOF, 0, "bulk {bulk}: the EOF was read");
            assert_eq!(relay.tx.end, 7, "bulk {bulk}: the bytes wait");
            relay.recycle(&mut ctx.env.pool);
        }
    }

    /// Mutation (a splice out of an empty pipe): a readiness that turns out
    /// spurious (nothing to read) leaves a splicing direction as it was:
    /// not dead, its destination still writable.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_spurious_readiness_changes_nothing() {
        let (mut env, mut relay, mut client, _client_peer, _up_peer) = relay_for(true);
        let poll = mio::Poll::new().unwrap();
        let mut ctx = ctx(&poll, &mut env);
        let mut ready = Ready::default();
        ready.set(Ready::CLIENT_R | Ready::CLIENT_W | Ready::UP_W);
        assert_eq!(relay.pump(&mut client, &mut ready, 0, &mut ctx), Pumped::Wait);
        assert_eq!(relay.ends & (TX_DEAD | TX_EOF), 0, "the direction goes on");
        assert!(ready.has(Ready::UP_W) && !ready.has(Ready::CLIENT_R));
        assert_eq!(relay.pipes, [None, None]);
    }

    /// Mutation (a read error's marks lost): a client that resets ends the
    /// session at once, as gone, copying or splicing: the reset socket
    /// takes nothing either, so the session does not wait for the upstream.
    #[test]
    fn a_client_reset_ends_the_session_at_once() {
        for bulk in [false, cfg!(target_os = "linux")] {
            let (mut env, mut relay, mut client, client_peer, _up_peer) = relay_for(bulk);
            socket2::SockRef::from(&client_peer).set_linger(Some(std::time::Duration::ZERO)).unwrap();
            drop(client_peer);
            arrived(&client, 0);
            let poll = mio::Poll::new().unwrap();
            let mut ctx = ctx(&poll, &mut env);
            let mut ready = Ready::default();
            ready.set(Ready::CLIENT_R | Ready::CLIENT_W | Ready::UP_W);
            assert_eq!(
                relay.pump(&mut client, &mut ready, 0, &mut ctx),
                Pumped::Close(Close::ClientGone),
                "bulk {bulk}"
            );
            relay.recycle(&mut ctx.env.pool);
        }
    }

    /// Mutation (a pipe taken whatever the source's readiness): a bulk
    /// direction with nothing to read takes no pipe (it would open one,
    /// two descriptors, to give it back empty); with bytes to read it
    /// splices, and gives the drained pipe back to the pool.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_pipe_is_taken_only_when_the_source_has_bytes() {
        let mut env = super::super::tests::env();
        env.pool = Pool::with_pipes(4096, crate::pipe::Pipes::new(2, 0));
        let (mut relay, mut client, mut client_peer, mut up_peer) = copying(&mut env);
        let poll = mio::Poll::new().unwrap();
        let mut ctx = ctx(&poll, &mut env);
        relay.ends |= TX_BULK | RX_BULK;
        let mut ready = Ready::default();
        ready.set(Ready::CLIENT_W | Ready::UP_W);
        relay.pump(&mut client, &mut ready, 0, &mut ctx);
        assert_eq!(ctx.env.pool.pipes.counts(), (0, 0), "nothing to read: no pipe");
        client_peer.write_all(b"bulk").unwrap();
        arrived(&client, 4);
        ready.set(Ready::CLIENT_R);
        relay.pump(&mut client, &mut ready, 0, &mut ctx);
        assert_eq!(relay.pipes, [None, None], "drained pipes are given back");
        assert_eq!(ctx.env.pool.pipes.counts(), (1, 1), "the bytes went through a pipe, now pooled");
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut up_peer, &mut got).unwrap();
        assert_eq!(&got, b"bulk");
    }

    /// A write error while the pipe holds bytes ends the direction and
    /// closes the pipe, never pools it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_dead_destination_closes_the_pipe() {
        let (mut env, mut relay, mut client, client_peer, mut up_peer) = relay_for(true);
        socket2::SockRef::from(&client_peer).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(client_peer);
        up_peer.write_all(&[9u8; 64 * 1024]).unwrap();
        arrived(&relay.up, 1);
        let poll = mio::Poll::new().unwrap();
        let mut ctx = ctx(&poll, &mut env);
        let mut ready = Ready::default();
        ready.set(Ready::UP_R | Ready::CLIENT_W);
        relay.pump(&mut client, &mut ready, 0, &mut ctx);
        assert_ne!(relay.ends & RX_DEAD, 0, "the write to the reset client failed");
        assert_eq!(ctx.env.pool.pipes.counts(), (0, 0), "the pipe with bytes was closed");
    }

    /// A reset read through a pipe ends that direction like an EOF and
    /// marks the same socket dead for the other (it takes nothing either).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_reset_read_through_a_pipe_ends_both_ways_on_that_socket() {
        let (mut env, mut relay, mut client, _client_peer, up_peer) = relay_for(true);
        socket2::SockRef::from(&up_peer).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(up_peer);
        arrived(&relay.up, 0);
        let poll = mio::Poll::new().unwrap();
        let mut ctx = ctx(&poll, &mut env);
        let mut ready = Ready::default();
        ready.set(Ready::UP_R);
        relay.pump(&mut client, &mut ready, 0, &mut ctx);
        assert_eq!(relay.ends & (RX_EOF | TX_DEAD), RX_EOF | TX_DEAD, "ends {:#010b}", relay.ends);
    }

    /// A relay that closes gives every buffer it holds back to the pool.
    #[test]
    fn recycle_gives_the_buffers_back() {
        let mut pool = Pool::new(4096);
        let (up, _peer) = pair();
        let carry = Carry { buf: pool.handshake(), start: 0, end: 10 };
        let mut relay = Relay::new(up, carry);
        relay.rx.buf = Some(pool.relay());
        assert_eq!(pool.free(), (0, 0));
        relay.recycle(&mut pool);
        assert_eq!(pool.free(), (1, 1), "the relay buffer and the carried handshake buffer");
    }

    /// Every combination of the end bits that matter, and what it means.
    #[test]
    fn end_table() {
        let close = |why| Some(Pumped::Close(why));
        let table = [
            (0, None),
            (TX_EOF, None),
            (TX_EOF | TX_SHUT, None),
            (RX_EOF | RX_SHUT, None),
            // Both directions over: done, however they ended.
            (TX_SHUT | RX_SHUT, close(Close::Done)),
            (TX_EOF | TX_SHUT | RX_EOF | RX_SHUT, close(Close::Done)),
            (TX_DEAD | TX_SHUT | RX_SHUT, close(Close::Done)),
            // The destination is gone: the other way runs on to its end...
            (TX_DEAD, None),
            (TX_DEAD | RX_EOF, None),
            // ...then the client, who may still be sending, gets a linger.
            (TX_DEAD | RX_EOF | RX_SHUT, Some(Pumped::Linger)),
            // The client cannot be written to: nothing left to deliver.
            (RX_DEAD, close(Close::ClientGone)),
            (RX_DEAD | TX_SHUT, close(Close::ClientGone)),
            (RX_DEAD | TX_DEAD, close(Close::ClientGone)),
        ];
        for (ends, want) in table {
            assert_eq!(end(ends), want, "ends {ends:#08b}");
        }
    }
}
