//! The `slabsocks` binary: command line, logger, signals, then the library.

mod cli;

use clap::Parser;
use simplelog::{ConfigBuilder, WriteLogger};
use slabsocks::Server;
use slabsocks::users::Users;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    // Before anything slow (the users file, binding): from here on a SIGHUP
    // or SIGTERM waits in signal-hook's queue instead of killing the process
    // by default action; it is handled once the server runs.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
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
    match serve(config, cli.users, signals) {
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

fn serve(
    config: slabsocks::Config,
    users_file: Option<PathBuf>,
    mut signals: signal_hook::iterator::Signals,
) -> std::io::Result<()> {
    use signal_hook::consts::SIGHUP;
    let server = Server::bind(config)?;
    let handle = server.handle();
    std::thread::Builder::new().name("slabsocks-signals".into()).spawn(move || {
        let mut stops = 0;
        for sig in signals.forever() {
            if sig == SIGHUP {
                // Read off the loop; a file that fails to load changes nothing.
                match users_file.as_deref().map(load_users) {
                    None => log::info!("SIGHUP: no --users file to reload"),
                    Some(Ok(users)) => handle.set_users(users),
                    Some(Err(e)) => log::error!("keeping the old users: {e}"),
                }
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
    server.run()
}
