//! Fixed buffers and the pool they are borrowed from, and the one place
//! where socket I/O results are folded.

use std::io::{self, Read, Write};

/// A fixed buffer. Its length never changes after allocation; it says which
/// pool the buffer goes back to.
pub(crate) type Buf = Box<[u8]>;

/// Size of the buffer a new session reads its handshake into. A greeting
/// (≤ 257 bytes) and a request (≤ 262) fit together, with room for the start
/// of a pipelined payload.
pub(crate) const HANDSHAKE_BUF: usize = 1024;

/// Free buffers of two sizes: handshake and relay. Checkouts take from the
/// free lists and allocate only when one is empty, so once the pool has
/// grown to the peak number of buffers in flight, moving data allocates
/// nothing. It keeps that peak; the cap on sessions bounds it at two relay
/// buffers a session.
pub(crate) struct Pool {
    size: usize,
    relay: Vec<Buf>,
    handshake: Vec<Buf>,
}

impl Pool {
    pub(crate) fn new(size: usize) -> Pool {
        Pool { size, relay: Vec::new(), handshake: Vec::new() }
    }

    pub(crate) fn relay(&mut self) -> Buf {
        self.relay.pop().unwrap_or_else(|| vec![0; self.size].into_boxed_slice())
    }

    pub(crate) fn handshake(&mut self) -> Buf {
        self.handshake.pop().unwrap_or_else(|| vec![0; HANDSHAKE_BUF].into_boxed_slice())
    }

    pub(crate) fn put(&mut self, buf: Buf) {
        if buf.len() == self.size {
            self.relay.push(buf);
        } else {
            self.handshake.push(buf);
        }
    }

    #[cfg(test)]
    fn free(&self) -> (usize, usize) {
        (self.relay.len(), self.handshake.len())
    }
}

/// One socket operation's outcome, `Interrupted` already retried.
#[derive(Debug)]
pub(crate) enum Io {
    Done(usize),
    WouldBlock,
    /// The peer finished sending (read returned 0).
    Eof,
    Err(io::Error),
}

fn fold(mut op: impl FnMut() -> io::Result<usize>, zero: Io) -> Io {
    loop {
        return match op() {
            Ok(0) => zero,
            Ok(n) => Io::Done(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Io::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Io::Err(e),
        };
    }
}

/// Reads into a non-empty `buf`.
pub(crate) fn read(src: &mut impl Read, buf: &mut [u8]) -> Io {
    fold(|| src.read(buf), Io::Eof)
}

/// Writes from a non-empty `buf`.
pub(crate) fn write(dst: &mut impl Write, buf: &[u8]) -> Io {
    fold(|| dst.write(buf), Io::Err(io::ErrorKind::WriteZero.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_by_size() {
        let mut pool = Pool::new(4096);
        let (a, b) = (pool.relay(), pool.handshake());
        assert_eq!((a.len(), b.len()), (4096, HANDSHAKE_BUF));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        pool.put(a);
        pool.put(b);
        assert_eq!(pool.free(), (1, 1));
        let (a, b) = (pool.relay(), pool.handshake());
        assert_eq!((a.as_ptr(), b.as_ptr()), (pa, pb));
    }

    #[test]
    fn fold_table() {
        let mut eof: &[u8] = b"";
        assert!(matches!(read(&mut eof, &mut [0; 4]), Io::Eof));
        let mut two: &[u8] = b"ab";
        assert!(matches!(read(&mut two, &mut [0; 4]), Io::Done(2)));
        let mut full: &mut [u8] = &mut [];
        assert!(matches!(write(&mut full, b"x"), Io::Err(e) if e.kind() == io::ErrorKind::WriteZero));
        let mut interrupted_once = {
            let mut first = true;
            move || {
                if std::mem::take(&mut first) {
                    Err(io::ErrorKind::Interrupted.into())
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
        };
        assert!(matches!(fold(&mut interrupted_once, Io::Eof), Io::WouldBlock));
    }
}
