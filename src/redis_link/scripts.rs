//! The Lua scripts the binary carries (`lua/`), each with its SHA1
//! computed once, and the assembly of `decide_batch.lua` from
//! `decide.lua`.
//!
//! This is the registry the link loads at connect time. What each script
//! takes and answers is owned by its caller, typed: `decide.lua`,
//! `decide_batch.lua` and `lease.lua` by the limiter's Redis store,
//! `ban.lua`, `unban.lua` and `inspect.lua` by the ban service.

use std::sync::LazyLock;

/// A Lua script from `lua/`, with its SHA1 computed once.
#[derive(Debug)]
pub(crate) struct LuaScript {
    pub(super) body: &'static str,
    pub(super) sha: String,
}

impl LuaScript {
    pub(crate) fn new(body: &'static str) -> LuaScript {
        LuaScript {
            body,
            sha: redis::Script::new(body).get_hash().to_string(),
        }
    }
}

pub(crate) static DECIDE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("../../lua/decide.lua")));
pub(crate) static BAN: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("../../lua/ban.lua")));
pub(crate) static UNBAN: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("../../lua/unban.lua")));
pub(crate) static INSPECT: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("../../lua/inspect.lua")));
/// `decide_batch.lua` assembled with `decide.lua` (see its header), so
/// the batch decides each subject with the very same code. Built once
/// for the life of the process.
pub(crate) static DECIDE_BATCH: LazyLock<LuaScript> = LazyLock::new(|| {
    let body = decide_batch_source(
        include_str!("../../lua/decide_batch.lua"),
        include_str!("../../lua/decide.lua"),
    );
    LuaScript::new(Box::leak(body.into_boxed_str()))
});

/// The batch script's text: `decide.lua`'s helpers (above its `-- @BODY@`
/// line) at the batch's `-- @PRELUDE@` line, and the rest of it, without
/// its `-- @FRAME@` line (the batch passes that frame as parameters), at
/// the `-- @DECIDE@` line. Markers are whole lines, so text that merely
/// mentions them is left alone.
pub fn decide_batch_source(batch: &str, decide: &str) -> String {
    let (mut prelude, mut body) = (String::new(), String::new());
    let mut in_body = false;
    for line in decide.lines() {
        if line == "-- @BODY@" {
            in_body = true;
        } else if in_body {
            if !line.ends_with("-- @FRAME@") {
                body.push_str(line);
                body.push('\n');
            }
        } else {
            prelude.push_str(line);
            prelude.push('\n');
        }
    }
    let mut out = String::with_capacity(batch.len() + decide.len());
    for line in batch.lines() {
        match line {
            "-- @PRELUDE@" => out.push_str(&prelude),
            "-- @DECIDE@" => out.push_str(&body),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
pub(crate) static LEASE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("../../lua/lease.lua")));

/// Every script, for loading at connect time.
pub(super) fn all() -> [&'static LuaScript; 6] {
    [&DECIDE, &BAN, &UNBAN, &INSPECT, &DECIDE_BATCH, &LEASE]
}
