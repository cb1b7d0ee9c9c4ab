//! Where upstream connections leave from: `--outbound-addr` (a source
//! address per family, bound without a port) and `--outbound-interface`.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};

/// A listener on `at` that reports each connection's peer address.
fn peer_reporter(at: &str) -> (SocketAddr, std::sync::mpsc::Receiver<SocketAddr>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let l = TcpListener::bind(at).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let peer = s.peer_addr().unwrap();
            let _ = tx.send(peer);
            let mut s = s;
            let _ = s.write_all(b"hi");
        }
    });
    (addr, rx)
}

#[test]
fn the_remote_sees_the_outbound_address() {
    let proxy = Proxy::with(|c| c.outbound_addrs = vec!["127.0.0.2".parse().unwrap()]);
    let (target, peers) = peer_reporter("127.0.0.1:0");
    let (mut s, rep, frame) = request(proxy.addr, &connect_request(target));
    assert_eq!(rep, 0);
    assert_eq!(bnd(&frame).ip(), "127.0.0.2".parse::<IpAddr>().unwrap(), "BND.ADDR is the source used");
    let peer = peers.recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(peer.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
    let mut hi = [0u8; 2];
    s.read_exact(&mut hi).unwrap();
    assert_eq!(&hi, b"hi");
}

/// An address of the other family is not used: the system picks.
#[test]
fn an_outbound_address_of_the_other_family_is_left_alone() {
    let proxy = Proxy::with(|c| c.outbound_addrs = vec!["::1".parse().unwrap()]);
    let (target, peers) = peer_reporter("127.0.0.1:0");
    let (_s, rep, _) = request(proxy.addr, &connect_request(target));
    assert_eq!(rep, 0);
    assert_eq!(peers.recv_timeout(IO_TIMEOUT).unwrap().ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
    // And it is used for IPv6 destinations, where the machine has IPv6.
    if let Ok(l) = TcpListener::bind("[::1]:0") {
        drop(l);
        let (target6, peers6) = peer_reporter("[::1]:0");
        let (_s, rep, _) = request(proxy.addr, &connect_request(target6));
        assert_eq!(rep, 0);
        assert_eq!(peers6.recv_timeout(IO_TIMEOUT).unwrap().ip(), "::1".parse::<IpAddr>().unwrap());
    }
}

/// An interface that does not exist fails the connect (REP 0x01); the
/// loopback interface works.
#[test]
fn the_outbound_interface_is_used() {
    let echo = echo_server("127.0.0.1:0");
    let bogus = Proxy::with(|c| c.outbound_interface = Some("nosuch0".into()));
    let (_s, rep, _) = request(bogus.addr, &connect_request(echo));
    assert_ne!(rep, 0, "a connect through a missing interface succeeded");
    let lo = Proxy::with(|c| c.outbound_interface = Some("lo".into()));
    let (mut s, rep, _) = request(lo.addr, &connect_request(echo));
    if rep != 0 {
        eprintln!("note: SO_BINDTODEVICE needs CAP_NET_RAW; REP {rep:#04x} without it");
        return;
    }
    s.write_all(b"via lo").unwrap();
    expect(&mut s, b"via lo");
}

/// The upstream socket is bound with IP_BIND_ADDRESS_NO_PORT (checked on a
/// duplicate of the server's descriptor, taken with pidfd_getfd).
#[test]
fn the_source_is_bound_without_a_port() {
    let (child, addr) = spawn(&["--workers", "1", "--outbound-addr", "127.0.0.2"]);
    let echo = echo_server("127.0.0.1:0");
    let mut s = open(addr, echo);
    s.write_all(b"x").unwrap();
    expect(&mut s, b"x");
    let Some(sockets) = sockets_of(child.id()) else { return };
    let mut checked = 0;
    for sock in sockets {
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
        if local.is_some_and(|a| a.ip() == "127.0.0.2".parse::<IpAddr>().unwrap()) && peer == Some(echo) {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes one int through a valid pointer.
            let r = unsafe {
                libc::getsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!((r, v), (0, 1), "IP_BIND_ADDRESS_NO_PORT on the upstream socket");
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "the upstream socket was not found");
}
