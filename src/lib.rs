//! slabsocks: a SOCKS5 proxy server (RFC 1928) on one mio poll loop.
//!
//! Sessions are state machines in a slab, driven by readiness events; the
//! relay moves bytes through fixed, pooled buffers and allocates nothing.
//! Domain names are resolved on helper threads. For more cores, run more
//! servers; they share nothing.
//!
//! ```no_run
//! let config = slabsocks::Config { listen: vec!["127.0.0.1:0".parse().unwrap()], ..Default::default() };
//! let server = slabsocks::Server::bind(config)?;
//! println!("listening on {:?}", server.local_addrs());
//! let handle = server.handle();
//! let thread = std::thread::spawn(move || server.run());
//! // ...
//! handle.shutdown();
//! thread.join().unwrap()?;
//! # Ok::<(), std::io::Error>(())
//! ```

// A build that leaves a protocol out leaves some of the shared helpers
// unused; the full build (what clippy checks with -D warnings) has none.
#![cfg_attr(
    not(all(feature = "auth", feature = "bind", feature = "udp", feature = "socks4", feature = "http")),
    allow(dead_code, unused_imports, unused_mut, unused_variables)
)]

mod accept;
mod access;
mod buf;
mod config;
mod conn;
mod limits;
mod metrics;
mod pipe;
pub mod proto;
mod resolver;
pub mod rules;
mod server;
mod shaping;
mod stats;
pub mod sys;
mod timer;
mod token;
pub mod users;
mod warn;

pub use config::{
    Config, ConfigError, MAX_BUFFER_SIZE, MAX_BUSY_POLL, MAX_DURATION, MAX_WORKERS, MIN_BUFFER_SIZE, UdpMatch,
};
pub use resolver::Lookup;
pub use server::{Handle, Server};
