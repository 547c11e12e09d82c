//! `floodgate admin <verb>`: the operator's command line for a running
//! node's admin API.
//!
//! It ships in the gateway's binary so that whoever has a node's
//! configuration file has the tool as well: the admin address and the name
//! of the token variable come from that file (or from `--url` and
//! `--token-env`). It is a small blocking HTTP client and shares no state
//! with the gateway. Its exit codes are part of the contract: 0 done,
//! 1 not found, 2 usage or configuration error, 3 admin API unreachable or
//! refused.

mod client;
pub(crate) mod render;
mod target;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// Why a verb did not do what was asked; each kind has its exit code.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum Failure {
    /// The subject, entry or consumer does not exist (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// The command line, the configuration file or the request is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The admin API could not be reached, refused the token, or cannot do
    /// this now (exit 3).
    #[error("{0}")]
    Refused(String),
}

impl Failure {
    /// The process exit code for this failure.
    pub(crate) fn code(&self) -> u8 {
        match self {
            Failure::NotFound(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Refused(_) => 3,
        }
    }
}

/// Where the node is and how to print; then the verb.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The node's configuration file; gives server.admin_listen and
    /// server.admin_token_env.
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// The admin API's address, such as http://127.0.0.1:9090 (overrides
    /// the configuration's admin_listen).
    #[arg(long, value_name = "URL", global = true)]
    url: Option<String>,
    /// The environment variable holding the admin token (overrides the
    /// configuration's admin_token_env; default FLOODGATE_ADMIN_TOKEN).
    #[arg(long, value_name = "VAR", global = true)]
    token_env: Option<String>,
    /// Print the API's JSON instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Active bans: list, show, ban, lift.
    Bans {
        #[command(subcommand)]
        action: BanAction,
    },
    /// The runtime allowlist: list, add, remove.
    Allow {
        #[command(subcommand)]
        action: AllowAction,
    },
    /// The newest ban, unban and allowlist events.
    Audit {
        /// How many events, newest first (1-10000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        count: u32,
    },
    /// Re-read the node's configuration file.
    Reload,
    /// Consumers (API keys) and their plans.
    Consumers {
        #[command(subcommand)]
        action: ConsumerAction,
    },
    /// Readiness, degraded state, version and configuration hash of the node.
    Status,
}

#[derive(Subcommand, Debug)]
enum BanAction {
    /// Every active ban.
    List,
    /// One ban (exit 1 if the subject is not banned).
    Get {
        /// An IP address, an IPv6 network or a CIDR.
        subject: String,
    },
    /// Ban a client or a network.
    Add {
        /// An IP address, an IPv6 network or a CIDR such as 198.51.100.0/24.
        subject: String,
        /// How long, such as 10m or 24h.
        #[arg(long)]
        duration: String,
        /// Why (shown in the ban list and the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a ban (exit 1 if the subject is not banned).
    #[command(alias = "remove")]
    Rm {
        /// The subject as the ban list shows it.
        subject: String,
    },
}

#[derive(Subcommand, Debug)]
enum AllowAction {
    /// The allowlist: entries from the configuration and from the runtime list.
    List,
    /// Add a network (or one address) to the runtime allowlist; lifts the bans inside it.
    Add {
        /// A CIDR such as 10.0.0.0/8, or one address.
        cidr: String,
    },
    /// Remove an entry from the runtime allowlist (exit 1 if it is not there).
    #[command(alias = "remove")]
    Rm {
        /// The entry as the list shows it.
        cidr: String,
    },
}

#[derive(Subcommand, Debug)]
enum ConsumerAction {
    /// A consumer's plan and the state of each of its rules.
    Get {
        /// The consumer's key (its API key).
        key: String,
    },
    /// Put a consumer on a plan.
    Set {
        /// The consumer's key (its API key).
        key: String,
        /// The plan's name, from the configuration's [plans].
        #[arg(long)]
        plan: String,
    },
    /// Remove a consumer's runtime plan assignment (exit 1 if there is none).
    #[command(alias = "remove")]
    Rm {
        /// The consumer's key (its API key).
        key: String,
    },
}

/// Runs one admin verb; `config` is the top-level `--config`, used when the
/// verb has none of its own. Prints errors to stderr and returns the exit code.
pub fn run(args: AdminArgs, config: Option<PathBuf>) -> ExitCode {
    let config = args.config.clone().or(config);
    let result = target::Target::resolve(
        config.as_deref(),
        args.url.as_deref(),
        args.token_env.as_deref(),
    )
    .and_then(|t| verbs::run(&client::AdminClient::new(t), &args.verb, args.json));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("floodgate admin: {f}");
            ExitCode::from(f.code())
        }
    }
}
