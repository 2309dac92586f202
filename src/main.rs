//! The `mles` binary: parse flags and environment, start logging, run the server.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Flags come first, since they choose the log format; a bad flag is one line on stderr
    // and exit status 2 either way.
    let config = match mles::config::Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("mles: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = mles::logging::init(config.log_format) {
        eprintln!("mles: {e}");
        return ExitCode::FAILURE;
    }
    log::info!("mles {}", mles::version::LONG);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(mles::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
