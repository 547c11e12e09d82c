//! Active health probes: one task per probed URL per process, all on one
//! background thread with its own small runtime, so probing never competes
//! with a worker's requests and a process with N workers still probes each
//! URL once per interval.
//!
//! A probe is a plain `GET health.path` over a new connection, bounded by
//! `health.timeout`; a 2xx or 3xx status is a success. The verdict moves
//! only after `unhealthy_after` failures or `healthy_after` successes in a
//! row (hysteresis), and each move is one log line ([`Target::set_probed`]).
//! A probe task ends when its URL leaves the configuration (the last
//! snapshot holding it is gone) or its probe settings change.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::health::Target;
use crate::config::HealthConfig;

struct Job {
    target: Weak<Target>,
    health: HealthConfig,
    epoch: u64,
}

/// Starts probing `target` with `health` (replacing any older prober of
/// it).
pub(super) fn watch(target: &Arc<Target>, health: &HealthConfig) {
    let epoch = target.probe_epoch.fetch_add(1, Ordering::AcqRel) + 1;
    let job = Job {
        target: Arc::downgrade(target),
        health: health.clone(),
        epoch,
    };
    match prober() {
        Some(tx) => {
            if tx.send(job).is_err() {
                log::error!(
                    "the health prober has stopped; {} is not probed",
                    target.base
                );
            }
        }
        None => log::error!("no health prober thread; {} is not probed", target.base),
    }
}

/// The prober thread's queue, started on first use.
fn prober() -> Option<&'static UnboundedSender<Job>> {
    static PROBER: OnceLock<Option<UnboundedSender<Job>>> = OnceLock::new();
    PROBER
        .get_or_init(|| {
            let (tx, mut rx) = unbounded_channel::<Job>();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    log::error!("cannot start the health prober: {e}");
                    return None;
                }
            };
            let spawned = std::thread::Builder::new()
                .name("health-prober".into())
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(job) = rx.recv().await {
                            tokio::spawn(run(job));
                        }
                    })
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    log::error!("cannot start the health prober: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Probes one URL every interval until it is dropped or re-watched.
async fn run(job: Job) {
    let h = job.health;
    let mut streak = 0u32;
    loop {
        let (authority, current) = {
            let Some(t) = job.target.upgrade() else {
                return;
            };
            if t.probe_epoch.load(Ordering::Acquire) != job.epoch {
                return;
            }
            (t.authority.clone(), t.probed_ok())
        };
        let outcome = probe(&authority, &h.path, h.timeout).await;
        let Some(t) = job.target.upgrade() else {
            return;
        };
        if t.probe_epoch.load(Ordering::Acquire) != job.epoch {
            return;
        }
        if outcome.is_ok() == current {
            streak = 0;
        } else {
            streak += 1;
            let needed = if current {
                h.unhealthy_after
            } else {
                h.healthy_after
            };
            if streak >= needed {
                streak = 0;
                let detail = match &outcome {
                    Ok(status) => format!("{needed} probes of {} answered {status}", h.path),
                    Err(e) => format!("{needed} probes of {} failed, last: {e}", h.path),
                };
                t.set_probed(outcome.is_ok(), &detail);
            }
        }
        drop(t);
        tokio::time::sleep(h.interval).await;
    }
}

/// One probe: the status code of `GET path`, or why there is none (or it
/// is not 2xx/3xx).
async fn probe(authority: &str, path: &str, timeout: Duration) -> Result<u16, String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: floodgate-health\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| "no HTTP status line".to_string())?;
        if (200..400).contains(&status) {
            Ok(status)
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}
