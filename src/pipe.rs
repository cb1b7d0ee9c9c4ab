//! Kernel pipes for the zero-copy relay: `splice(2)` moves bytes from one
//! socket into a pipe and from the pipe into the other socket, as page
//! references, never through our memory.
//!
//! Pipes are borrowed like relay buffers: a direction takes one when its
//! source has bytes to move and gives it back once the pipe is drained, so
//! an idle session holds none. A pipe that still holds bytes (its session
//! ended mid-transfer) is closed, never pooled: the next borrower would get
//! another session's bytes. Free pipes that went unused for a whole trim
//! period are closed. When no pipe can be had (the cap, or `pipe2` failing
//! with `EMFILE`), the direction copies through a buffer instead.
//!
//! A session names its pipe by a [`PipeId`] (4 bytes) rather than holding
//! the two descriptors (8 bytes, and no niche for `None`): the session
//! stays small.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A pipe lent to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PipeId(NonZeroU32);

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// The pipes: lent and free ones in one slab, the free ones listed.
pub(crate) struct Pipes {
    open: slab::Slab<Pipe>,
    free: Vec<usize>,
    /// The fewest free pipes since the last trim.
    low: usize,
    /// Most pipes open at once (lent and free); 0 turns splicing off.
    max: usize,
    /// What `F_SETPIPE_SZ` asks for (0: the kernel's default, 64 KiB).
    size: usize,
    /// Bytes one splice into a pipe asks for: its capacity.
    chunk: usize,
    /// `pipe2` failed since the last pipe was closed: do not try again
    /// (a syscall) on every read until descriptors may have come free.
    exhausted: bool,
}

impl Pipes {
    /// No pipes: every direction copies.
    pub(crate) fn off() -> Pipes {
        Pipes::new(0, 0)
    }

    pub(crate) fn new(max: usize, size: usize) -> Pipes {
        let max = if cfg!(target_os = "linux") { max } else { 0 };
        let chunk = if size == 0 { DEFAULT_CAPACITY } else { size };
        Pipes { open: slab::Slab::new(), free: Vec::new(), low: 0, max, size, chunk, exhausted: false }
    }

    /// A drained pipe to fill, or `None`: copy instead.
    pub(crate) fn take(&mut self) -> Option<PipeId> {
        let key = match self.free.pop() {
            Some(key) => {
                self.low = self.low.min(self.free.len());
                key
            }
            None if self.open.len() < self.max && !self.exhausted => match new_pipe(self.size) {
                Ok((pipe, chunk)) => {
                    self.chunk = chunk;
                    self.open.insert(pipe)
                }
                Err(e) => {
                    log::debug!("no pipe for splicing, copying instead: {e}");
                    self.exhausted = true;
                    return None;
                }
            },
            None => return None,
        };
        let id = u32::try_from(key + 1).ok().and_then(NonZeroU32::new)?;
        Some(PipeId(id))
    }

    /// Takes a pipe back: pooled when `empty`, closed otherwise.
    pub(crate) fn put(&mut self, id: PipeId, empty: bool) {
        let key = id.0.get() as usize - 1;
        if empty {
            self.free.push(key);
        } else if self.open.try_remove(key).is_some() {
            self.exhausted = false;
        }
    }

    /// The pipe's read and write ends.
    pub(crate) fn fds(&self, id: PipeId) -> Option<(RawFd, RawFd)> {
        let p = self.open.get(id.0.get() as usize - 1)?;
        Some((p.r.as_raw_fd(), p.w.as_raw_fd()))
    }

    /// Bytes to ask of one splice into a pipe.
    pub(crate) fn chunk(&self) -> usize {
        self.chunk
    }

    /// Closes the free pipes that went unused since the last call; returns
    /// how many.
    pub(crate) fn trim(&mut self) -> usize {
        let unused = self.low;
        for key in self.free.drain(..unused) {
            self.open.remove(key);
        }
        if unused > 0 {
            self.exhausted = false;
        }
        self.low = self.free.len();
        unused
    }

    /// Pipes open (lent and free), and free (for tests).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.open.len(), self.free.len())
    }
}

#[cfg(target_os = "linux")]
const PIPE_FLAGS: libc::c_int = libc::O_NONBLOCK | libc::O_CLOEXEC;
#[cfg(target_os = "linux")]
const SPLICE_FLAGS: libc::c_uint = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;

/// The kernel's default pipe capacity, and the one assumed when it does
/// not say (it always does).
const DEFAULT_CAPACITY: usize = 65_536;

/// A non-blocking pipe, sized to `size` when it is not 0; with the capacity
/// it got (the kernel rounds up to pages, and may refuse a size beyond
/// `fs.pipe-max-size` or the user's pipe allowance: the default stays).
/// Elsewhere than on Linux, no pipe: the relay copies. (One function with
/// the platforms inside, not one per platform: cargo-mutants, run on Linux,
/// would count the other platform's mutants as missed.)
fn new_pipe(size: usize) -> io::Result<(Pipe, usize)> {
    #[cfg(not(target_os = "linux"))]
    {
        let _ = size;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    #[cfg(target_os = "linux")]
    {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), PIPE_FLAGS) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors owned by no
        // one else; each OwnedFd closes its own once.
        let pipe = unsafe { Pipe { r: OwnedFd::from_raw_fd(fds[0]), w: OwnedFd::from_raw_fd(fds[1]) } };
        let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        if size != 0 {
            // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int.
            unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, want) };
        }
        // SAFETY: fcntl on a descriptor we own; F_GETPIPE_SZ takes no argument.
        let got = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
        let chunk = usize::try_from(got).map_or(DEFAULT_CAPACITY, |n| n.max(4096));
        Ok((pipe, chunk))
    }
}

/// Moves up to `len` bytes from `from` to `to`, one of which is a pipe,
/// without blocking on the pipe (the socket is non-blocking already).
/// `Ok(0)` from a socket is its EOF. Linux only (see [`new_pipe`]).
pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (from, to, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: splice(2) with null offsets (both ends are a pipe or a
        // socket) only reads and writes the kernel objects the descriptors
        // name.
        let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, SPLICE_FLAGS) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn drained_pipes_are_reused_and_full_ones_closed() {
        let mut pipes = Pipes::new(2, 0);
        let a = pipes.take().unwrap();
        let b = pipes.take().unwrap();
        assert_ne!(a, b);
        assert_eq!(pipes.take(), None, "at the cap: copy instead");
        pipes.put(a, true);
        assert_eq!(pipes.counts(), (2, 1));
        assert_eq!(pipes.take(), Some(a), "a drained pipe is lent again");
        pipes.put(a, false);
        assert_eq!(pipes.counts(), (1, 0), "a pipe holding bytes is closed");
        let c = pipes.take().unwrap();
        assert_eq!(pipes.counts(), (2, 0));
        pipes.put(b, true);
        pipes.put(c, true);
        assert_eq!(pipes.counts(), (2, 2));
    }

    #[test]
    fn off_lends_nothing() {
        assert_eq!(Pipes::off().take(), None);
    }

    #[test]
    fn trim_closes_what_went_unused_for_a_period() {
        let mut pipes = Pipes::new(8, 0);
        let ids: Vec<_> = (0..4).map(|_| pipes.take().unwrap()).collect();
        for id in ids {
            pipes.put(id, true);
        }
        assert_eq!(pipes.trim(), 0, "all four were in use this period");
        let one = pipes.take().unwrap();
        pipes.put(one, true);
        assert_eq!(pipes.trim(), 3, "one was borrowed again; three idled");
        assert_eq!(pipes.counts(), (1, 1));
    }

    /// Bytes go socket → pipe → socket unchanged; an EOF reads as 0.
    #[test]
    fn splice_moves_bytes_through_a_pipe() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut d, _) = l2.accept().unwrap();
        let mut pipes = Pipes::new(1, 0);
        let id = pipes.take().unwrap();
        let (r, w) = pipes.fds(id).unwrap();
        a.write_all(b"through the pipe").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        // Bounded: a splice that moves nothing must fail the test, not hang it.
        let mut n = 0;
        for _ in 0..16 {
            if n < 16 {
                n += splice(b.as_raw_fd(), w, pipes.chunk()).unwrap();
            }
        }
        assert_eq!(n, 16);
        assert_eq!(splice(b.as_raw_fd(), w, pipes.chunk()).unwrap(), 0, "EOF");
        assert_eq!(splice(r, c.as_raw_fd(), n).unwrap(), 16);
        let mut got = [0u8; 16];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through the pipe");
    }

    /// After `pipe2` failed, no new pipe is tried until a pipe has been
    /// closed (by `put` or by a trim that closed some).
    #[test]
    fn exhaustion_lasts_until_a_pipe_is_closed() {
        let mut pipes = Pipes::new(4, 0);
        let a = pipes.take().unwrap();
        pipes.put(a, true);
        assert_eq!(pipes.take(), Some(a));
        pipes.exhausted = true;
        assert_eq!(pipes.take(), None, "no pipe2 while exhausted");
        pipes.put(a, true);
        assert_eq!(pipes.trim(), 0, "a was used this period");
        assert!(pipes.exhausted, "a trim that closed nothing freed nothing");
        assert_eq!(pipes.trim(), 1);
        assert!(!pipes.exhausted, "a trim that closed a pipe ends it");
        pipes.exhausted = true;
        let b = pipes.take();
        assert_eq!(b, None);
        pipes.exhausted = false;
        let b = pipes.take().unwrap();
        pipes.exhausted = true;
        pipes.put(b, false);
        assert!(!pipes.exhausted, "closing a pipe ends it");
    }

    /// Pipes are non-blocking (a splice never waits on one) and close on
    /// exec.
    #[test]
    fn pipes_are_non_blocking_and_close_on_exec() {
        let mut pipes = Pipes::new(1, 0);
        let id = pipes.take().unwrap();
        let (r, w) = pipes.fds(id).unwrap();
        for fd in [r, w] {
            // SAFETY: fcntl reads the flags of a descriptor the pool owns.
            let (fl, fd_fl) = unsafe { (libc::fcntl(fd, libc::F_GETFL), libc::fcntl(fd, libc::F_GETFD)) };
            assert_ne!(fl & libc::O_NONBLOCK, 0);
            assert_ne!(fd_fl & libc::FD_CLOEXEC, 0);
        }
    }

    #[test]
    fn the_pipe_size_is_set_and_read_back() {
        let mut pipes = Pipes::new(1, 256 * 1024);
        pipes.take().unwrap();
        assert_eq!(pipes.chunk(), 256 * 1024);
    }
}
