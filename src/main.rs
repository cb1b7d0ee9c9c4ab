//! The `slabsocks` binary: command line, logger, signals, then the library.

mod cli;

use clap::Parser;
use simplelog::{ConfigBuilder, WriteLogger};
use slabsocks::Server;
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
    if let Err(e) = slabsocks::sys::raise_nofile_limit() {
        log::warn!("cannot raise the open-file limit: {e}");
    }
    match serve(cli.config()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slabsocks: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: slabsocks::Config) -> std::io::Result<()> {
    let server = Server::bind(config)?;
    let handle = server.handle();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    std::thread::Builder::new().name("slabsocks-signals".into()).spawn(move || {
        let mut seen = 0;
        for sig in signals.forever() {
            seen += 1;
            if seen > 1 {
                log::warn!("second signal {sig}: exiting now");
                std::process::exit(1);
            }
            handle.shutdown();
        }
    })?;
    server.run()
}
