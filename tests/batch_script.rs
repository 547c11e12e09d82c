//! `decide_batch.lua` against a real Redis: a batch in which the same
//! subjects come back many times (a hot client under load) answers and
//! leaves Redis exactly as the same decisions made one by one through
//! `decide.lua`, on the same pinned clock. The batch keeps the state hashes
//! it reads in memory and writes them back once; this is the check that
//! nothing is lost or reordered on the way.

mod common;

use common::*;
use redis::{Commands, Value};

/// The batch script as the gateway assembles it.
fn batch_script() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let batch = std::fs::read_to_string(format!("{dir}/lua/decide_batch.lua")).unwrap();
    let one = std::fs::read_to_string(format!("{dir}/lua/decide.lua")).unwrap();
    let text = floodgate::redis_link::scripts::decide_batch_source(&batch, &one);
    assert!(
        !text.contains("-- @"),
        "a marker was left in the batch script"
    );
    text
}

fn decide_script() -> String {
    std::fs::read_to_string(format!("{}/lua/decide.lua", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// One decision: its keys and `decide.lua` arguments.
struct Call {
    keys: Vec<String>,
    args: Vec<String>,
}

/// Subject `s` (0, 1 or 2) under `prefix`, decided at `now_us`.
/// Subject 0: a tight token bucket and an hourly quota, bans after 3
/// refusals; subject 1: a bucket and a concurrency cap (a lease set, a
/// second key); subject 2: a loose bucket, not bannable. Subject 3 has the
/// rules of subject 2.
fn call(prefix: &str, s: usize, now_us: u64, lease: usize) -> Call {
    let state = format!("{prefix}{{s{s}}}:b");
    let mut keys = vec![state];
    // Every fifth call of a subject without a concurrency cap is a top-up
    // (a node asking for more tokens for its lease).
    // Subjects 2 and 3 (one token bucket each) go the short path ('b') when
    // they ask for one request.
    let mode = if lease % 5 == 4 && s != 1 {
        "t"
    } else if s >= 2 && lease % 3 != 0 {
        "b"
    } else {
        "d"
    };
    let mut args: Vec<String> = vec![now_us.to_string(), mode.into(), "60000".into()];
    let bannable = if s == 2 { "0" } else { "1" };
    args.push(bannable.into());
    // after, within_ms, duration_ms, factor, max_ms, memory_ms
    for a in ["3", "60000", "1000", "2", "10000", "60000"] {
        args.push(a.into());
    }
    let rules: Vec<[&str; 6]> = match s {
        0 => vec![
            ["fast", "r", "1000000", "4", "1", "0"],
            ["hourly", "q", "h", "9", "1", "0"],
        ],
        1 => vec![
            ["b", "r", "500000", "6", "1", "0"],
            ["conc", "c", "30000", "3", "1", "0"],
        ],
        _ => vec![["loose", "r", "100000", "50", "2", "0"]],
    };
    if s == 1 {
        keys.push(format!("{prefix}{{s1}}:c:conc"));
        args.push(format!("lease-{lease}"));
    } else {
        args.push(String::new());
    }
    // Every third call asks for a lease of 6 requests; the grant depends
    // on what is left, so batch and one-by-one must agree on it too.
    args.push(if lease % 3 == 0 { "6" } else { "1" }.into());
    for r in rules {
        args.extend(r.iter().map(|a| a.to_string()));
    }
    Call { keys, args }
}

/// The sequence: 60 decisions over three subjects, the clock moving a
/// little now and then, so that buckets refill, refuse, and escalate.
fn sequence(prefix: &str) -> Vec<Call> {
    let start = 1_700_000_000_000_000u64;
    (0..60)
        .map(|i| {
            // Subject 3 comes once per batch of 20: decided on Redis
            // directly, between subjects decided on the batch's copy.
            let s = if i % 20 == 13 {
                3
            } else {
                [0, 0, 1, 0, 2, 1, 0, 0, 1, 2][i % 10]
            };
            call(prefix, s, start + (i as u64 / 7) * 250_000, i)
        })
        .collect()
}

fn hash(con: &mut redis::Connection, key: &str) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = con.hgetall(key).unwrap();
    h.sort();
    h
}

#[test]
fn a_batch_with_repeated_subjects_equals_the_decisions_one_by_one() {
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();

    // One by one, through decide.lua.
    let one = redis::Script::new(&decide_script());
    let mut alone = Vec::new();
    for c in sequence("one:") {
        let mut inv = one.prepare_invoke();
        for k in &c.keys {
            inv.key(k);
        }
        for a in &c.args {
            inv.arg(a);
        }
        let v: Value = inv.invoke(&mut con).unwrap();
        alone.push(v);
    }

    // The same decisions in batches of 20, through decide_batch.lua.
    let batch = redis::Script::new(&batch_script());
    let mut batched = Vec::new();
    let calls = sequence("bat:");
    for chunk in calls.chunks(20) {
        let mut inv = batch.prepare_invoke();
        inv.arg(chunk.len());
        for c in chunk {
            for k in &c.keys {
                inv.key(k);
            }
            inv.arg(c.keys.len()).arg(c.args.len());
            for a in &c.args {
                inv.arg(a);
            }
        }
        match inv.invoke::<Value>(&mut con).unwrap() {
            Value::Array(replies) => batched.extend(replies),
            other => panic!("batch reply {other:?}"),
        }
    }

    assert_eq!(batched.len(), alone.len());
    for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(b, a, "decision {i}: batch and one-by-one disagree");
    }
    // The sequence exercised what it is meant to: refusals, a ban, leases.
    let status = |v: &Value| match v {
        Value::Array(a) => match a.first() {
            Some(Value::Int(s)) => *s,
            _ => -1,
        },
        _ => -1,
    };
    assert!(alone.iter().any(|v| status(v) == 1), "nothing was refused");
    assert!(alone.iter().any(|v| status(v) == 3), "nobody was banned");
    assert!(alone.iter().any(|v| status(v) == 2), "no request met a ban");

    // Redis holds the same state either way, with the same expiries.
    for s in 0..4 {
        let (a, b) = (format!("one:{{s{s}}}:b"), format!("bat:{{s{s}}}:b"));
        assert_eq!(hash(&mut con, &a), hash(&mut con, &b), "subject {s}");
        assert!(!hash(&mut con, &a).is_empty(), "subject {s} has no state");
        let (ta, tb): (i64, i64) = (con.pttl(&a).unwrap(), con.pttl(&b).unwrap());
        assert!(ta > 0 && tb > 0, "subject {s}: no expiry ({ta}, {tb})");
        assert!((ta - tb).abs() < 2_000, "subject {s}: pttl {ta} vs {tb}");
    }
    let (la, lb) = ("one:{s1}:c:conc", "bat:{s1}:c:conc");
    let leases = |con: &mut redis::Connection, k: &str| -> Vec<(String, f64)> {
        con.zrange_withscores(k, 0, -1).unwrap()
    };
    assert_eq!(leases(&mut con, la), leases(&mut con, lb));
    assert!(!leases(&mut con, la).is_empty());
}
