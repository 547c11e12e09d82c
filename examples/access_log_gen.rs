//! A made-up access log for measuring `floodgate replay`
//! (docs/performance.md, "Replay"): `--lines` requests from `--clients`
//! addresses, as floodgate's own JSON lines or the combined format.
//!
//! The traffic is skewed the way public traffic is: a few clients send
//! most requests (a client is drawn as `clients x u^3`, u uniform; `--skew`
//! changes the exponent), one
//! request in five carries one of `--keys` API keys (its SHA-256 in the
//! line, as floodgate writes it), and arrivals are Poisson at `--rps`.
//! The same flags give the same file (a fixed xorshift generator).

use std::io::{BufWriter, Write};
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// A made-up access log (see the file's header).
#[derive(clap::Parser)]
struct Options {
    /// Lines to write.
    #[arg(long, default_value_t = 1_000_000)]
    lines: u64,
    /// Distinct client addresses.
    #[arg(long, default_value_t = 50_000)]
    clients: u64,
    /// Distinct API keys.
    #[arg(long, default_value_t = 2_000)]
    keys: u64,
    /// How skewed clients are: a client is drawn as `clients x u^skew`
    /// (1: all alike).
    #[arg(long, default_value_t = 3)]
    skew: i32,
    /// Requests per second, all clients together.
    #[arg(long, default_value_t = 2_000.0)]
    rps: f64,
    /// `json` (floodgate's access log) or `combined`.
    #[arg(long, default_value = "json")]
    format: String,
    /// The first request's time, seconds since 1970.
    #[arg(long, default_value_t = 1_777_593_600)]
    start: u64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> std::io::Result<()> {
    let o = <Options as clap::Parser>::parse();
    let mut rng = Rng(o.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let key_hashes: Vec<String> = (0..o.keys.max(1))
        .map(|k| hex(&Sha256::digest(format!("key-{k}").as_bytes())))
        .collect();
    let paths = [
        "/api/items",
        "/api/items/42",
        "/api/search",
        "/login",
        "/static/app.js",
    ];
    let out = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, out.lock());
    let mut t_us = o.start as f64 * 1e6;
    for _ in 0..o.lines {
        t_us += -(1.0 - rng.unit()).ln() * 1e6 / o.rps;
        let client = (o.clients as f64 * rng.unit().powi(o.skew)) as u64;
        let ip = format!(
            "10.{}.{}.{}",
            (client >> 16) & 255,
            (client >> 8) & 255,
            client & 255
        );
        let path = paths[(rng.next() % paths.len() as u64) as usize];
        let method = if path == "/login" { "POST" } else { "GET" };
        let time = UNIX_EPOCH + Duration::from_micros(t_us as u64);
        if o.format == "combined" {
            let stamp = humantime::format_rfc3339_seconds(time).to_string();
            // 2026-05-01T00:00:00Z -> 01/May/2026:00:00:00 +0000
            let month = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ][stamp[5..7].parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
            writeln!(
                out,
                "{ip} - - [{}/{month}/{}:{} +0000] \"{method} {path}?page={} HTTP/1.1\" 200 512 \"-\" \"loadgen/1.0\"",
                &stamp[8..10],
                &stamp[0..4],
                &stamp[11..19],
                rng.next() % 50
            )?;
            continue;
        }
        let keys = if rng.next() % 5 == 0 {
            let k = &key_hashes[(rng.next() % key_hashes.len() as u64) as usize];
            format!(",\"keys\":{{\"x-api-key\":\"{k}\"}}")
        } else {
            String::new()
        };
        writeln!(
            out,
            "{{\"time\":\"{}\",\"client\":\"{ip}\",\"method\":\"{method}\",\"host\":\"api.example.com\",\"path\":\"{path}?page={}\",\"status\":200,\"decision\":\"allowed\",\"rule\":null,\"bytes\":512,\"duration_ms\":{:.3}{keys}}}",
            humantime::format_rfc3339_millis(time),
            rng.next() % 50,
            rng.unit() * 40.0
        )?;
    }
    out.flush()
}
