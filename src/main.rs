//! The `floodgate` binary: flags, logging, then [`floodgate::server::run`],
//! or `floodgate admin <verb>` ([`floodgate::cli`]) against a running node,
//! or `floodgate replay` ([`floodgate::replay`]) over recorded traffic.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the request path allocates many small, short-lived buffers;
/// glibc malloc showed up at ~8% of the gateway's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A distributed rate-limiting HTTP gateway.
#[derive(Parser)]
#[command(name = "floodgate", version, about, subcommand_negates_reqs = true)]
struct Flags {
    /// The configuration file (TOML).
    #[arg(long, env = "FLOODGATE_CONFIG", value_name = "PATH", required = true)]
    config: Option<PathBuf>,
    /// Validate the configuration, print a summary and exit (0 valid, 2 not).
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Talk to a running node's admin API (exit 0 done, 1 not found,
    /// 2 usage or config error, 3 admin API unreachable or refused).
    Admin(floodgate::cli::AdminArgs),
    /// Decide recorded requests (access logs) with a candidate
    /// configuration and report what it would have refused and banned
    /// (exit 0 done, 2 usage, config or log file error).
    Replay(floodgate::replay::ReplayArgs),
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.check && flags.command.is_some() {
        eprintln!("floodgate: --check validates a configuration; it does not go with a subcommand");
        return ExitCode::from(2);
    }
    match flags.command {
        Some(Command::Admin(args)) => return floodgate::cli::run(args, flags.config),
        Some(Command::Replay(args)) => return floodgate::replay::run(args, flags.config),
        None => {}
    }
    let Some(path) = flags.config else {
        eprintln!("floodgate: --config PATH is required");
        return ExitCode::from(2);
    };
    // The Redis client logs every lost connection and slot-map refresh
    // (many lines a second during a failover); floodgate logs each change
    // of state itself, so the client's own lines are errors only by default.
    let logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,redis=error"),
    )
    .build();
    let max = logger.filter();
    let _ = floodgate::log_throttle::install(logger, max);
    let file = match floodgate::reload::ConfigFile::read(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("floodgate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.check {
        print!("{}", file.config.summary());
        println!("configuration OK: {}", path.display());
        return ExitCode::SUCCESS;
    }
    match actix_web::rt::System::new().block_on(floodgate::server::run(file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("floodgate: {e}");
            ExitCode::from(1)
        }
    }
}
