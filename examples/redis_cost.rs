//! Redis CPU per decision, in isolation: what one Redis core sustains with
//! floodgate's scripts, for sizing a fleet (docs/performance.md, "Sizing").
//!
//! Runs against a Redis of its own (`loadtest/redis-cost.sh` starts one on a
//! free port and passes its pid): for each way decisions reach Redis, keeps
//! `--conns` connections each with `--depth` calls in flight for
//! `--seconds`, then divides the Redis process's CPU time (from /proc, so
//! its network work counts) and the scripts' own time (INFO commandstats)
//! by the decisions made. The scripts are the ones built into the gateway,
//! or those of `--lua-dir` (to compare a change to them, before and after).
//!
//! Every subject has one token-bucket rule that never refuses, bans on, as
//! the gateway sends it; keys live under `fgcost:` and are left behind.

use std::time::{Duration, Instant};

use floodgate::redis_link::scripts::decide_batch_source;
use redis::aio::MultiplexedConnection;

/// Redis CPU per decision, in isolation (see the file's header).
#[derive(clap::Parser)]
struct Options {
    /// Port of a Redis of its own on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// That Redis' process id, to read its CPU time.
    #[arg(long)]
    pid: u32,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    conns: u16,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    depth: u16,
    /// Decisions per batch call.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    batch: u16,
    /// Measure decide.lua and decide_batch.lua from this directory instead
    /// of the built-in ones.
    #[arg(long)]
    lua_dir: Option<String>,
}

/// One subject's key and `decide.lua` arguments (see its header): Redis'
/// clock, decide, idle TTL 1 h, bannable, escalation settings, no
/// concurrency lease, one request (no token lease), one rule of 1 000
/// tokens per second with a burst far above the load.
fn subject(i: usize) -> (String, Vec<String>) {
    let key = format!(
        "fgcost:{{ip:10.{}.{}.{}}}:b",
        i >> 16,
        (i >> 8) & 255,
        i & 255
    );
    let args = [
        "",
        "d",
        "3600000",
        "1",
        "5",
        "10000",
        "60000",
        "2",
        "3600000",
        "86400000",
        "",
        "1",
        "per_ip",
        "r",
        "1000",
        "1000000000",
        "1",
        "0",
    ];
    (key, args.iter().map(|s| s.to_string()).collect())
}

/// How decisions reach Redis in one scenario.
#[derive(Clone, Copy)]
enum Shape {
    /// One `decide.lua` call per decision (`coalesce = false`, a Cluster).
    Single,
    /// `decide_batch.lua` calls of `batch` distinct subjects.
    Distinct,
    /// `decide_batch.lua` calls of `batch` decisions of one subject.
    Hot,
}

fn call(shape: Shape, sha: &str, batch: usize, n: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha);
    match shape {
        Shape::Single => {
            let (key, args) = subject(n % 100_000);
            cmd.arg(1).arg(key).arg(args);
        }
        Shape::Distinct | Shape::Hot => {
            let subjects: Vec<_> = (0..batch)
                .map(|j| match shape {
                    Shape::Hot => subject(n % 100_000),
                    _ => subject((n * batch + j) % 100_000),
                })
                .collect();
            cmd.arg(batch);
            for (key, _) in &subjects {
                cmd.arg(key);
            }
            cmd.arg(batch);
            for (_, args) in &subjects {
                cmd.arg(1).arg(args.len()).arg(args);
            }
        }
    }
    cmd
}

/// Whether a reply is that of allowed decisions (status 0), one or a batch:
/// what the never-refusing rule must give, so a change to `decide.lua`'s
/// arguments that this tool missed shows at once instead of measuring
/// something else.
fn allowed(reply: &redis::Value, shape: Shape) -> bool {
    let one = |v: &redis::Value| matches!(v, redis::Value::Array(items) if matches!(items.first(), Some(redis::Value::Int(0))));
    match (shape, reply) {
        (Shape::Single, v) => one(v),
        (_, redis::Value::Array(replies)) => !replies.is_empty() && replies.iter().all(one),
        _ => false,
    }
}

/// Seconds of CPU the process has used, all its threads (the first field
/// of each thread's schedstat is its time on a CPU in nanoseconds).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Microseconds the scripts ran, from INFO commandstats.
async fn script_usec(con: &mut MultiplexedConnection) -> redis::RedisResult<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:"))
        .filter_map(|l| {
            l.split("usec=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

async fn scenario(
    o: &Options,
    client: &redis::Client,
    name: &str,
    shape: Shape,
    sha: &str,
) -> redis::RedisResult<()> {
    let mut admin = client.get_multiplexed_async_connection().await?;
    let per_call = match shape {
        Shape::Single => 1,
        _ => usize::from(o.batch),
    };
    // Unmeasured warm-up: the keys exist, as they would under steady load.
    run_for(o, client, shape, sha, Duration::from_millis(500)).await?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(&mut admin)
        .await?;
    let cpu0 = cpu_seconds(o.pid);
    let calls = run_for(o, client, shape, sha, Duration::from_secs_f64(o.seconds)).await?;
    let cpu1 = cpu_seconds(o.pid);
    let usec = script_usec(&mut admin).await?;
    let decisions = (calls * per_call) as f64;
    let per_decision = (cpu1 - cpu0) * 1e6 / decisions.max(1.0);
    println!(
        "| {name} | {per_decision:.2} | {:.2} | {:.0} |",
        usec as f64 / decisions.max(1.0),
        1e6 / per_decision.max(0.01),
    );
    Ok(())
}

/// Keeps `conns` × `depth` calls in flight for `length`; returns the calls
/// answered.
async fn run_for(
    o: &Options,
    client: &redis::Client,
    shape: Shape,
    sha: &str,
    length: Duration,
) -> redis::RedisResult<usize> {
    let stop = Instant::now() + length;
    let mut tasks = Vec::new();
    let (conns, depth, batch) = (
        usize::from(o.conns),
        usize::from(o.depth),
        usize::from(o.batch),
    );
    for c in 0..conns {
        let con = client.get_multiplexed_async_connection().await?;
        for d in 0..depth {
            let mut con = con.clone();
            let cmds: Vec<redis::Cmd> = (0..64)
                .map(|i| call(shape, sha, batch, (c * depth + d) * 64 + i))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut done = 0usize;
                while Instant::now() < stop {
                    let reply: redis::Value = cmds[done % cmds.len()].query_async(&mut con).await?;
                    if done == 0 && !allowed(&reply, shape) {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "not an allowed decision: the arguments here are out of step with decide.lua",
                            format!("{reply:?}"),
                        )));
                    }
                    done += 1;
                }
                redis::RedisResult::Ok(done)
            }));
        }
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await.map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "task", e.to_string()))
        })??;
    }
    Ok(calls)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = <Options as clap::Parser>::parse();
    let (decide, batch) = match &o.lua_dir {
        Some(dir) => {
            let read = |f: &str| {
                std::fs::read_to_string(format!("{dir}/{f}")).unwrap_or_else(|e| {
                    eprintln!("redis_cost: {dir}/{f}: {e}");
                    std::process::exit(2)
                })
            };
            (read("decide.lua"), read("decide_batch.lua"))
        }
        None => (
            include_str!("../lua/decide.lua").to_string(),
            include_str!("../lua/decide_batch.lua").to_string(),
        ),
    };
    let batch = decide_batch_source(&batch, &decide);
    let result = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", o.port))?;
        let con = client.get_multiplexed_async_connection().await?;
        let load = |body: String| {
            let mut con = con.clone();
            async move {
                redis::cmd("SCRIPT").arg("LOAD").arg(body).query_async::<String>(&mut con).await
            }
        };
        let (single_sha, batch_sha) = (load(decide).await?, load(batch).await?);
        println!("| how decisions reach Redis | Redis CPU µs/decision | of which in scripts | decisions/s per Redis core |");
        println!("|---|---:|---:|---:|");
        let b = o.batch;
        scenario(&o, &client, "one `decide.lua` call each, distinct subjects", Shape::Single, &single_sha).await?;
        scenario(&o, &client, &format!("batches of {b}, distinct subjects"), Shape::Distinct, &batch_sha).await?;
        scenario(&o, &client, &format!("batches of {b}, one hot subject"), Shape::Hot, &batch_sha).await
    }
    .await;
    if let Err(e) = result {
        eprintln!("redis_cost: {e}");
        std::process::exit(1)
    }
}
