//! The `slabsocks` binary: command line, logger, signals, then the library.

mod cli;

use clap::Parser;
use simplelog::{ConfigBuilder, WriteLogger};
use slabsocks::users::Users;
use slabsocks::{Handle, Server};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, not clap's usage block.
            let msg = e.to_string();
            let line = msg.lines().next().unwrap_or("bad arguments");
            eprintln!("slabsocks: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let log_config =
        ConfigBuilder::new().set_target_level(log::LevelFilter::Off).set_thread_level(log::LevelFilter::Off).build();
    let _ = WriteLogger::init(cli.log_level, log_config, std::io::stderr());
    // Before anything slow (the users file, binding): from here on signals
    // go to our thread, never to their default action.
    let signals = match Signals::start(cli.users.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("slabsocks: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = slabsocks::sys::raise_nofile_limit() {
        log::warn!("cannot raise the open-file limit: {e}");
    }
    let mut config = cli.config();
    if let Some(path) = &cli.users {
        match load_users(path) {
            Ok(users) => config.users = Some(users),
            Err(e) => {
                eprintln!("slabsocks: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match serve(config, signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slabsocks: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the users file, warning when others may read it.
fn load_users(path: &Path) -> Result<Users, slabsocks::users::UsersError> {
    let users = Users::load(path)?;
    if slabsocks::users::readable_by_others(path) {
        log::warn!("{} is readable by group or others: chmod 600 it", path.display());
    }
    Ok(users)
}

fn serve(config: slabsocks::Config, signals: Signals) -> std::io::Result<()> {
    // systemd socket activation: serve the listeners it hands over
    // (`--listen` is then ignored).
    let server = match slabsocks::sys::activated_listeners()? {
        Some(listeners) if !listeners.is_empty() => {
            log::info!("socket activation: {} listener(s) handed over", listeners.len());
            Server::from_listeners(listeners, config)?
        }
        _ => Server::bind(config)?,
    };
    signals.serving(server.handle());
    server.run()
}

/// SIGINT, SIGTERM and SIGHUP, handled on a thread of their own from the
/// first moments of start-up. Until the server runs, a stop request exits
/// at once (there is nothing to drain) and a SIGHUP is held, then acted on.
struct Signals {
    state: Arc<Mutex<SignalState>>,
}

#[derive(Default)]
struct SignalState {
    handle: Option<Handle>,
    /// A SIGHUP came before the server ran.
    held_hup: bool,
}

impl Signals {
    fn start(users_file: Option<PathBuf>) -> std::io::Result<Signals> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let state: Arc<Mutex<SignalState>> = Arc::default();
        let shared = Arc::clone(&state);
        std::thread::Builder::new().name("slabsocks-signals".into()).spawn(move || {
            let reload = |handle: &Handle| {
                // Read off the loop; a file that fails to load changes nothing.
                match users_file.as_deref().map(load_users) {
                    None => log::info!("SIGHUP: no --users file to reload"),
                    Some(Ok(users)) => handle.set_users(users),
                    Some(Err(e)) => log::error!("keeping the old users: {e}"),
                }
            };
            let mut stops = 0;
            for sig in signals.forever() {
                let handle = {
                    let mut st = shared.lock().unwrap_or_else(|p| p.into_inner());
                    if st.handle.is_none() {
                        if sig == SIGHUP {
                            st.held_hup = true;
                            continue;
                        }
                        log::info!("signal {sig} during start-up: exiting");
                        std::process::exit(0);
                    }
                    st.handle.clone()
                };
                let Some(handle) = handle else { continue };
                if sig == SIGHUP {
                    reload(&handle);
                    continue;
                }
                stops += 1;
                if stops > 1 {
                    log::warn!("second signal {sig}: exiting now");
                    std::process::exit(1);
                }
                handle.shutdown();
            }
        })?;
        Ok(Signals { state })
    }

    /// The server is about to run: signals act on it from now on, and a
    /// held SIGHUP is replayed.
    fn serving(self, handle: Handle) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.handle = Some(handle);
        if std::mem::take(&mut st.held_hup) {
            drop(st);
            // signal-hook's handler is installed: this only queues it.
            let _ = signal_hook::low_level::raise(signal_hook::consts::SIGHUP);
        }
    }
}
