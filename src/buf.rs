//! Fixed buffers and the pool they are borrowed from, and the one place
//! where socket I/O results are folded.

use crate::pipe::Pipes;
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
/// nothing. After a spike, [`Pool::trim`] frees what went unused for a
/// whole period, so the peak is not kept forever.
pub(crate) struct Pool {
    size: usize,
    /// Kernel pipes for splicing, borrowed the same way.
    pub(crate) pipes: Pipes,
    relay: FreeList,
    handshake: FreeList,
    udp: FreeList,
    http: FreeList,
}

/// Size of the buffer an HTTP CONNECT head may grow into: real clients send
/// a few hundred bytes to a few KiB; beyond this, 431.
pub(crate) const HTTP_BUF: usize = 8 * 1024;

/// Size of the buffer a UDP datagram waits in while its destination's name
/// is resolved: the largest UDP payload.
pub(crate) const UDP_BUF: usize = 65_536;

/// Free buffers, and the fewest there were since the last trim: that many
/// were not needed during the period.
#[derive(Default)]
struct FreeList {
    bufs: Vec<Buf>,
    low: usize,
}

impl FreeList {
    fn take(&mut self, size: usize) -> Buf {
        let buf = self.bufs.pop();
        self.low = self.low.min(self.bufs.len());
        buf.unwrap_or_else(|| vec![0; size].into_boxed_slice())
    }

    fn trim(&mut self) -> usize {
        let unused = self.low;
        self.bufs.truncate(self.bufs.len() - unused);
        self.low = self.bufs.len();
        unused
    }
}

impl Pool {
    pub(crate) fn new(size: usize) -> Pool {
        Pool {
            size,
            pipes: Pipes::off(),
            relay: FreeList::default(),
            handshake: FreeList::default(),
            udp: FreeList::default(),
            http: FreeList::default(),
        }
    }

    pub(crate) fn with_pipes(size: usize, pipes: Pipes) -> Pool {
        Pool { pipes, ..Pool::new(size) }
    }

    /// The size of a relay buffer.
    pub(crate) fn relay_size(&self) -> usize {
        self.size
    }

    pub(crate) fn relay(&mut self) -> Buf {
        self.take(self.size)
    }

    pub(crate) fn handshake(&mut self) -> Buf {
        self.take(HANDSHAKE_BUF)
    }

    pub(crate) fn udp(&mut self) -> Buf {
        self.take(UDP_BUF)
    }

    pub(crate) fn http(&mut self) -> Buf {
        self.take(HTTP_BUF)
    }

    fn take(&mut self, len: usize) -> Buf {
        self.list(len).take(len)
    }

    /// The free list for buffers of `len` bytes. Kinds of the same size
    /// (the relay size may be set to any of the others) share one list, so
    /// a buffer goes back where the next checkout of that size looks.
    fn list(&mut self, len: usize) -> &mut FreeList {
        match len {
            n if n == self.size => &mut self.relay,
            UDP_BUF => &mut self.udp,
            HTTP_BUF => &mut self.http,
            _ => &mut self.handshake,
        }
    }

    /// Frees the buffers that stayed in the pool since the last call;
    /// returns how many. Called every [`TRIM_PERIOD`].
    pub(crate) fn trim(&mut self) -> usize {
        let freed = self.relay.trim() + self.handshake.trim() + self.udp.trim() + self.http.trim();
        if freed > 0 {
            release_to_os();
        }
        freed + self.pipes.trim()
    }

    /// Takes a buffer back, into the list of its size.
    pub(crate) fn put(&mut self, buf: Buf) {
        self.list(buf.len()).bufs.push(buf);
    }

    /// Free relay and handshake buffers (for tests).
    #[cfg(test)]
    pub(crate) fn free(&self) -> (usize, usize) {
        (self.relay.bufs.len(), self.handshake.bufs.len())
    }
}

/// How often the pool gives back what a traffic spike left unused.
pub(crate) const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Buffers live inside malloc's heap, which keeps freed memory for reuse;
/// glibc can be asked to hand free pages back.
fn release_to_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists.
    unsafe {
        libc::malloc_trim(0);
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

    /// Regression: with the relay size equal to another kind's, buffers of
    /// that kind went back to the relay list, and the next checkout of the
    /// kind allocated anew.
    #[test]
    fn kinds_of_the_same_size_reuse_their_buffers() {
        for size in [HANDSHAKE_BUF, HTTP_BUF, UDP_BUF, 4096] {
            let mut pool = Pool::new(size);
            let kinds: [fn(&mut Pool) -> Buf; 4] = [Pool::relay, Pool::handshake, Pool::http, Pool::udp];
            for take in kinds {
                let a = take(&mut pool);
                let at = a.as_ptr();
                pool.put(a);
                let again = take(&mut pool);
                assert_eq!(again.as_ptr(), at, "relay size {size}: a buffer went to the wrong list");
                pool.put(again);
            }
        }
    }

    #[test]
    fn trim_frees_only_what_a_whole_period_left_unused() {
        let mut pool = Pool::new(4096);
        let bufs: Vec<Buf> = (0..4).map(|_| pool.relay()).collect();
        bufs.into_iter().for_each(|b| pool.put(b));
        // All four were in use during this period.
        assert_eq!(pool.trim(), 0);
        // This period needs one at a time: three were never touched.
        let b = pool.relay();
        pool.put(b);
        assert_eq!(pool.trim(), 3);
        assert_eq!(pool.free(), (1, 0));
        assert_eq!(pool.trim(), 1);
        assert_eq!(pool.free(), (0, 0));
    }

    /// Every kind of checkout has its documented size (an HTTP head of up to
    /// 8 KiB, a datagram of up to 64 KiB), goes back to its own list, and is
    /// the one handed out next (no allocation on reuse).
    #[test]
    fn every_kind_is_sized_and_reused_from_its_own_list() {
        type Take = fn(&mut Pool) -> Buf;
        let kinds: [(&str, Take, usize); 4] = [
            ("relay", Pool::relay, 4096),
            ("handshake", Pool::handshake, HANDSHAKE_BUF),
            ("udp", Pool::udp, 65_536),
            ("http", Pool::http, 8 * 1024),
        ];
        let mut pool = Pool::new(4096);
        let bufs: Vec<Buf> = kinds.iter().map(|(_, take, _)| take(&mut pool)).collect();
        let ptrs: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
        for ((name, _, size), buf) in kinds.iter().zip(&bufs) {
            assert_eq!(buf.len(), *size, "{name}");
        }
        bufs.into_iter().for_each(|b| pool.put(b));
        let again: Vec<Buf> = kinds.iter().map(|(_, take, _)| take(&mut pool)).collect();
        for ((name, _, _), (buf, ptr)) in kinds.iter().zip(again.iter().zip(ptrs)) {
            assert_eq!(buf.as_ptr(), ptr, "{name}: the buffer put back is reused");
        }
        assert_eq!(pool.udp().len(), UDP_BUF, "the largest UDP payload fits a UDP buffer");
    }

    /// Trim counts the unused buffers of all four lists, not only the
    /// relay list.
    #[test]
    fn trim_counts_every_list() {
        let mut pool = Pool::new(4096);
        let takes: [fn(&mut Pool) -> Buf; 4] = [Pool::relay, Pool::handshake, Pool::udp, Pool::http];
        // One kind at a time, so a sum mistaken for a difference or a
        // product shows.
        for (i, take) in takes.iter().enumerate() {
            let b = take(&mut pool);
            pool.put(b);
            assert_eq!(pool.trim(), 0, "list {i}: in use this period");
            assert_eq!(pool.trim(), 1, "list {i}: unused for a whole period");
        }
        for take in takes {
            let b = take(&mut pool);
            pool.put(b);
        }
        assert_eq!(pool.trim(), 0);
        assert_eq!(pool.trim(), 4);
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
        // An error, then 3 bytes: only Interrupted is retried (into the
        // bytes), and no other error is taken for WouldBlock.
        let error_then_data = |kind: io::ErrorKind| {
            let mut first = true;
            move || if std::mem::take(&mut first) { Err(kind.into()) } else { Ok(3) }
        };
        assert!(matches!(fold(error_then_data(io::ErrorKind::Interrupted), Io::Eof), Io::Done(3)));
        let reset = fold(error_then_data(io::ErrorKind::ConnectionReset), Io::Eof);
        assert!(matches!(reset, Io::Err(e) if e.kind() == io::ErrorKind::ConnectionReset));
    }
}
