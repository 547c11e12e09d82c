//! `floodgate replay`: what a candidate configuration would have done to
//! recorded traffic.
//!
//! It reads access logs (the combined format of nginx and Apache, JSON
//! lines, floodgate's own `server.access_log`), puts their requests in time
//! order, and decides each one with the candidate's rules, plans and bans
//! at its recorded time, as fast as the CPU allows, never sleeping. The
//! decision is the gateway's own: the same matching, the same
//! `Limiter::decide_at` over the same in-process store (the port of
//! `decide.lua`), so a refusal here is a refusal there. It then reports,
//! per rule, what was matched and refused and whom, and the bans made;
//! with `--suggest`, the subjects' real rates and the smallest limits that
//! would have refused no more than a given share of them.
//!
//! The parts: `parse` (lines into [`record::Record`]s, with `time` for
//! timestamps), `input` (files merged into one timeline), `engine` (the
//! decision), `tally` (the counts), `suggest` (rates and limits), `report`
//! (tables and JSON). Memory grows with the distinct subjects, never with
//! the number of lines.

mod engine;
mod input;
mod parse;
mod record;
mod report;
mod suggest;
mod tally;
mod time;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use crate::config::Config;
use engine::Engine;
use input::{LogFile, Timeline};
use parse::{Format, JsonFields};
use report::Report;

/// `floodgate replay`'s flags.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The candidate configuration (its rules, plans, bans, allowlist and
    /// client_ip settings are used; nothing is connected to).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// How the logs are written; auto: JSON if a file's first line starts
    /// with `{`, else combined.
    #[arg(long, value_enum, default_value = "auto")]
    format: Format,
    /// Where JSON lines keep a part of the request (repeatable): PART=NAME
    /// with PART one of time, client, method, path, host, request,
    /// duration_ms, keys, decision, or key:<header> for a field holding the
    /// SHA-256 of that header. Defaults: floodgate's own access log.
    #[arg(long = "field", value_name = "PART=NAME")]
    fields: Vec<String>,
    /// Also report each rule's per-subject rates and the smallest limits
    /// within --refuse-at-most.
    #[arg(long)]
    suggest: bool,
    /// The share of a rule's subjects a suggested limit may refuse: a
    /// percentage (0.1%) or a fraction (0.001). Default 0.1%.
    #[arg(long, value_name = "SHARE")]
    refuse_at_most: Option<String>,
    /// Print JSON instead of tables, for scripts.
    #[arg(long)]
    json: bool,
    /// Subjects listed at most per rule, and banned subjects listed.
    #[arg(long, value_name = "N", default_value_t = 10)]
    top: usize,
    /// How late a line may be written and still be put back in order
    /// (later ones are decided at the time of the line before them).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    reorder: String,
    /// Log files, in any order (`-` reads standard input).
    #[arg(value_name = "LOG", required = true)]
    logs: Vec<String>,
}

/// A usage or configuration error: exit 2, as `floodgate --check` and
/// `floodgate admin`.
struct Usage(String);

/// Runs a replay; `config` is the top-level `--config`, used when the
/// subcommand has none. Returns the exit code: 0 done, 2 usage or
/// configuration error (a bad flag, an unreadable config or log file).
pub fn run(args: ReplayArgs, config: Option<PathBuf>) -> ExitCode {
    match replay(args, config) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) is not a failure of the replay.
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            ExitCode::SUCCESS
        }
        Err(Usage(e)) => {
            eprintln!("floodgate replay: {e}");
            ExitCode::from(2)
        }
    }
}

fn replay(args: ReplayArgs, config: Option<PathBuf>) -> Result<String, Usage> {
    let Some(path) = args.config.or(config) else {
        return Err(Usage(
            "--config PATH (the candidate configuration) is required".into(),
        ));
    };
    let config = Config::load(&path).map_err(|e| Usage(format!("invalid configuration: {e}")))?;
    let mut fields = JsonFields::default();
    for spec in &args.fields {
        fields.set(spec).map_err(Usage)?;
    }
    let share = match &args.refuse_at_most {
        Some(s) if !args.suggest => {
            return Err(Usage(format!("--refuse-at-most {s} goes with --suggest")));
        }
        Some(s) => suggest::parse_share(s).map_err(Usage)?,
        None => 0.001,
    };
    let reorder = humantime::parse_duration(&args.reorder)
        .map_err(|e| Usage(format!("--reorder {}: {e}", args.reorder)))?;
    if args.logs.iter().filter(|l| *l == "-").count() > 1 {
        return Err(Usage("standard input (-) can be read once".into()));
    }
    let files = args
        .logs
        .iter()
        .map(|name| LogFile::open(name, args.format))
        .collect::<Result<Vec<_>, String>>()
        .map_err(Usage)?;

    let started = Instant::now();
    let mut engine = Engine::new(&config, args.suggest);
    let mut timeline = Timeline::new(files, fields, reorder.as_micros() as u64);
    while let Some(record) = timeline.next_record() {
        engine.replay(&record);
    }
    engine.finish();
    let mut report = Report::new(
        args.logs.clone(),
        timeline.stats.clone(),
        &engine.tally,
        started.elapsed(),
        args.top,
    );
    report.warnings = engine.warnings(&config);
    if let Some(s) = &engine.suggest {
        report.refuse_at_most = Some(share);
        report.suggestions = engine
            .tally
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| s.suggest(i, &r.name, share))
            .collect();
    }
    if engine.stalled > 0 {
        eprintln!(
            "floodgate replay: {} decisions did not complete and were skipped",
            engine.stalled
        );
    }
    if args.json {
        let mut text = serde_json::to_string_pretty(&report).unwrap_or_default();
        text.push('\n');
        Ok(text)
    } else {
        Ok(report.human())
    }
}
