//! The few process-level system calls the server needs.

use std::io;

/// Descriptors kept back from the session budget: listeners, the poll and
/// waker descriptors, resolver sockets, log files, stdio.
const FD_HEADROOM: u64 = 64;

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid, exclusive pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        Ok(lim)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The soft RLIMIT_NOFILE in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on some targets
pub fn nofile_limit() -> io::Result<u64> {
    get_nofile().map(|l| l.rlim_cur as u64)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft
/// limit.
#[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on some targets
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = get_nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one initialised rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur as u64)
}

/// The kernel's cap on a listen backlog: `net.core.somaxconn` where
/// `/proc` has it (4096 on Linux since 5.4), else the C library's
/// `SOMAXCONN`. A larger backlog asked of `listen` is cut to this.
pub fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(libc::SOMAXCONN as u32)
}

/// `IP_BIND_ADDRESS_NO_PORT` on a socket about to be bound to an address
/// with port 0: the port is chosen at connect time, so the same port can
/// serve many destinations (Linux 4.2).
#[cfg(target_os = "linux")]
pub(crate) fn bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int through a valid pointer of the size
    // given, on a descriptor the socket owns.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Listening sockets handed over by systemd socket activation (the
/// `sd_listen_fds` protocol: `LISTEN_PID` names this process, `LISTEN_FDS`
/// counts descriptors from 3). `None` when none were handed over; an error
/// when one of them is not a listening TCP socket. The variables are left
/// in place (changing the environment is unsafe once threads run).
pub fn activated_listeners() -> io::Result<Option<Vec<std::net::TcpListener>>> {
    const FIRST: i32 = 3;
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let Some(n) = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).filter(|_| ours) else {
        return Ok(None);
    };
    let bad = |fd| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("socket activation: fd {fd} is not a listening TCP socket"))
    };
    let mut listeners = Vec::new();
    for fd in FIRST..FIRST.saturating_add(n.clamp(0, 64)) {
        // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad(fd));
        }
        // SAFETY: the protocol hands these descriptors to this process, which
        // owns them from here on; nothing else in it uses them.
        let socket = unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tcp = socket.r#type().ok() == Some(socket2::Type::STREAM)
            && socket.local_addr().ok().and_then(|a| a.as_socket()).is_some()
            && socket.is_listener().unwrap_or(false);
        if !tcp {
            std::mem::forget(socket);
            return Err(bad(fd));
        }
        socket.set_cloexec(true)?;
        // Inherited by accepted sockets (see `Server::bind`).
        socket.set_tcp_nodelay(true)?;
        listeners.push(socket.into());
    }
    Ok(Some(listeners))
}

/// CPUs this process may run on: its affinity mask (`sched_getaffinity`),
/// narrowed by a cgroup CPU quota where there is one; 1 if unknown.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sessions that fit in `nofile` descriptors: two each (client, upstream).
pub fn max_connections_for(nofile: u64) -> usize {
    let n = nofile.saturating_sub(FD_HEADROOM) / 2;
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// Pipes for splicing that `nofile` descriptors set aside: an eighth of
/// them, two descriptors a pipe. Only directions with bytes in flight hold
/// one, so this serves that many busy directions at once; the others copy.
pub fn max_pipes_for(nofile: u64) -> usize {
    usize::try_from(nofile / 16).unwrap_or(usize::MAX)
}

/// The session and pipe budgets for `nofile` descriptors, each as
/// configured or derived: pipes take their share first, sessions the rest.
pub fn budgets(nofile: u64, max_connections: Option<usize>, max_pipes: Option<usize>) -> (usize, usize) {
    let pipes = max_pipes.unwrap_or_else(|| max_pipes_for(nofile));
    let pipe_fds = u64::try_from(pipes).unwrap_or(u64::MAX).saturating_mul(2);
    let conns = max_connections.unwrap_or_else(|| max_connections_for(nofile.saturating_sub(pipe_fds)));
    (conns, pipes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn budget() {
        assert_eq!(super::max_connections_for(20_000), 9_968);
        assert_eq!(super::max_connections_for(1024), 480);
        assert_eq!(super::max_connections_for(10), 1);
        // An eighth for pipes, the rest for sessions.
        assert_eq!(super::budgets(20_000, None, None), (8_718, 1_250));
        assert_eq!(super::budgets(20_000, None, Some(0)), (9_968, 0));
        assert_eq!(super::budgets(20_000, Some(100), None), (100, 1_250));
        assert_eq!(super::budgets(20_000, None, Some(100)), (9_868, 100));
        assert!(super::nofile_limit().unwrap() > 0);
        assert!(super::somaxconn() >= 128);
    }
}
