//! The audit log: every ban, unban, allow and unallow, appended to a Redis
//! stream (`XADD ... MAXLEN ~ N`) and never rewritten.
//!
//! Without Redis the same events are kept in a bounded in-memory ring. It is
//! separate because the log is write-only history with its own retention,
//! read back only by operators.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{rfc3339_ms, BanError, Bans};
use crate::keys;

/// One audit-log event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct AuditEvent {
    /// Stream entry id (`<ms>-<seq>`); ordered.
    pub(crate) id: String,
    pub(crate) time: String,
    pub(crate) event: String,
    pub(crate) subject: String,
    pub(crate) reason: String,
    pub(crate) duration_ms: u64,
    pub(crate) strikes: u32,
    pub(crate) source: String,
    pub(crate) node: String,
}

impl Bans {
    /// Appends one event to the audit log (Redis, or this node's ring).
    pub(crate) async fn audit(
        &self,
        event: &str,
        subject: &str,
        reason: &str,
        duration_ms: u64,
        strikes: u32,
        source: &str,
    ) {
        match &self.link {
            Some(link) => {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(keys::audit(&self.prefix))
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.audit_max_len)
                    .arg("*")
                    .arg("event")
                    .arg(event)
                    .arg("subject")
                    .arg(subject)
                    .arg("reason")
                    .arg(reason)
                    .arg("duration_ms")
                    .arg(duration_ms)
                    .arg("strikes")
                    .arg(strikes)
                    .arg("source")
                    .arg(source)
                    .arg("node")
                    .arg(&self.node);
                if let Err(e) = link
                    .query_within::<String>(&cmd, link.admin_timeout())
                    .await
                {
                    log::error!("could not append to the audit log: {event} {subject}: {e}");
                }
            }
            None => {
                let ms = crate::limiter::wall_clock_us() / 1000;
                let seq = self
                    .local_seq
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut log = self.local_audit.lock().unwrap_or_else(|p| p.into_inner());
                log.push_back(AuditEvent {
                    id: format!("{ms}-{seq}"),
                    time: rfc3339_ms(ms),
                    event: event.into(),
                    subject: subject.into(),
                    reason: reason.into(),
                    duration_ms,
                    strikes,
                    source: source.into(),
                    node: self.node.clone(),
                });
                while log.len() as u64 > self.audit_max_len {
                    log.pop_front();
                }
            }
        }
    }

    /// The newest `count` audit events, newest first.
    pub(crate) async fn audit_log(&self, count: usize) -> Result<Vec<AuditEvent>, BanError> {
        let Some(link) = &self.link else {
            let log = self.local_audit.lock().unwrap_or_else(|p| p.into_inner());
            return Ok(log.iter().rev().take(count).cloned().collect());
        };
        let cmd = redis::cmd("XREVRANGE")
            .arg(keys::audit(&self.prefix))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .clone();
        let entries: Vec<(String, HashMap<String, String>)> =
            link.query_within(&cmd, link.admin_timeout()).await?;
        Ok(entries
            .into_iter()
            .map(|(id, f)| {
                let ms = id
                    .split('-')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0);
                let s = |k: &str| f.get(k).cloned().unwrap_or_default();
                AuditEvent {
                    time: rfc3339_ms(ms),
                    id,
                    event: s("event"),
                    subject: s("subject"),
                    reason: s("reason"),
                    duration_ms: s("duration_ms").parse().unwrap_or(0),
                    strikes: s("strikes").parse().unwrap_or(0),
                    source: s("source"),
                    node: s("node"),
                }
            })
            .collect())
    }
}
