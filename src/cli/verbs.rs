//! What each admin verb asks the node and how it reports the answer.
//!
//! One function per verb family; each prints to stdout either the API's
//! JSON (`--json`) or a short table or sentence, and leaves errors to the
//! caller, which prints them once with their exit code.

use serde_json::{json, Value};

use super::client::{segment, AdminClient};
use super::render::{cell, generic, pairs, printable, seconds, table};
use super::{AllowAction, BanAction, ConsumerAction, Failure, Verb};

pub(super) fn run(client: &AdminClient, verb: &Verb, as_json: bool) -> Result<(), Failure> {
    let out = Output { as_json };
    match verb {
        Verb::Bans { action } => bans(client, action, out),
        Verb::Allow { action } => allow(client, action, out),
        Verb::Audit { count } => audit(client, *count, out),
        Verb::Reload => reload(client, out),
        Verb::Consumers { action } => consumers(client, action, out),
        Verb::Status => status(client, out),
    }
}

#[derive(Clone, Copy)]
struct Output {
    as_json: bool,
}

impl Output {
    /// Prints `v` as JSON, or `human` for people.
    fn show(self, v: &Value, human: impl FnOnce() -> String) {
        if self.as_json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            println!("{}", human());
        }
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn ban_rows(v: &Value) -> Vec<(&'static str, String)> {
    vec![
        ("subject", cell(v.get("subject"))),
        ("until", cell(v.get("until"))),
        ("remaining", seconds(num(v, "remaining"))),
        ("strikes", cell(v.get("strikes"))),
        ("source", cell(v.get("source"))),
        ("reason", cell(v.get("reason"))),
    ]
}

fn bans(client: &AdminClient, action: &BanAction, out: Output) -> Result<(), Failure> {
    match action {
        BanAction::List => {
            let r = client.call("GET", "/admin/bans", None)?;
            out.show(&r.json, || {
                let list = r.json.as_array().map(Vec::as_slice).unwrap_or(&[]);
                if list.is_empty() {
                    return "no active bans".into();
                }
                let rows = list
                    .iter()
                    .map(|b| {
                        vec![
                            cell(b.get("subject")),
                            seconds(num(b, "remaining")),
                            cell(b.get("until")),
                            cell(b.get("strikes")),
                            cell(b.get("source")),
                            cell(b.get("reason")),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "SUBJECT",
                        "REMAINING",
                        "UNTIL",
                        "STRIKES",
                        "SOURCE",
                        "REASON",
                    ],
                    rows,
                )
            });
        }
        BanAction::Get { subject } => {
            let r = client.call("GET", &format!("/admin/bans/{}", segment(subject)), None)?;
            out.show(&r.json, || pairs(ban_rows(&r.json)));
        }
        BanAction::Add {
            subject,
            duration,
            reason,
        } => {
            let mut body = json!({"subject": subject, "duration": duration});
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            let r = client.call("POST", "/admin/bans", Some(&body))?;
            out.show(&r.json, || {
                format!(
                    "banned {} until {} ({})",
                    printable(&cell(r.json.get("subject"))),
                    printable(&cell(r.json.get("until"))),
                    seconds(num(&r.json, "remaining"))
                )
            });
        }
        BanAction::Rm { subject } => {
            client.call("DELETE", &format!("/admin/bans/{}", segment(subject)), None)?;
            if !out.as_json {
                println!("lifted the ban on {}", printable(subject));
            }
        }
    }
    Ok(())
}

fn allow(client: &AdminClient, action: &AllowAction, out: Output) -> Result<(), Failure> {
    match action {
        AllowAction::List => {
            let r = client.call("GET", "/admin/allowlist", None)?;
            out.show(&r.json, || {
                let mut rows = Vec::new();
                for source in ["config", "runtime"] {
                    for net in r
                        .json
                        .get(source)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        rows.push(vec![cell(Some(net)), source.to_string()]);
                    }
                }
                if rows.is_empty() {
                    "the allowlist is empty".into()
                } else {
                    table(&["NETWORK", "FROM"], rows)
                }
            });
        }
        AllowAction::Add { cidr } => {
            let r = client.call("POST", "/admin/allowlist", Some(&json!({"cidr": cidr})))?;
            out.show(&r.json, || {
                let lifted = cell(r.json.get("lifted"));
                let mut s = format!(
                    "added {} to the runtime allowlist",
                    printable(&cell(r.json.get("cidr")))
                );
                if !lifted.is_empty() {
                    s.push_str(&format!("; lifted the bans on {}", printable(&lifted)));
                }
                s
            });
        }
        AllowAction::Rm { cidr } => {
            client.call(
                "DELETE",
                &format!("/admin/allowlist/{}", segment(cidr)),
                None,
            )?;
            if !out.as_json {
                println!("removed {} from the runtime allowlist", printable(cidr));
            }
        }
    }
    Ok(())
}

fn audit(client: &AdminClient, count: u32, out: Output) -> Result<(), Failure> {
    let r = client.call("GET", &format!("/admin/audit?count={count}"), None)?;
    out.show(&r.json, || {
        let list = r.json.as_array().map(Vec::as_slice).unwrap_or(&[]);
        if list.is_empty() {
            return "the audit log is empty".into();
        }
        let rows = list
            .iter()
            .map(|e| {
                let ms = num(e, "duration_ms");
                vec![
                    cell(e.get("time")),
                    cell(e.get("event")),
                    cell(e.get("subject")),
                    if ms == 0 {
                        String::new()
                    } else {
                        seconds(ms.div_ceil(1000))
                    },
                    cell(e.get("strikes")),
                    cell(e.get("source")),
                    cell(e.get("node")),
                    cell(e.get("reason")),
                ]
            })
            .collect();
        table(
            &[
                "TIME", "EVENT", "SUBJECT", "DURATION", "STRIKES", "SOURCE", "NODE", "REASON",
            ],
            rows,
        )
    });
    Ok(())
}

fn reload(client: &AdminClient, out: Output) -> Result<(), Failure> {
    let r = client
        .call("POST", "/admin/reload", None)
        .map_err(|f| match f {
            Failure::Usage(m) => Failure::Usage(format!("the node kept its configuration: {m}")),
            f => f,
        })?;
    out.show(&r.json, || {
        let restart: Vec<String> = r
            .json
            .get("restart_needed")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|k| cell(Some(k)))
            .collect();
        let mut s = String::from("configuration reloaded");
        if !restart.is_empty() {
            s.push_str(&format!(
                "; these keys keep their old value until a restart: {}",
                printable(&restart.join(", "))
            ));
        }
        s
    });
    Ok(())
}

fn consumers(client: &AdminClient, action: &ConsumerAction, out: Output) -> Result<(), Failure> {
    match action {
        ConsumerAction::Get { key } => {
            let r = client.call("GET", &format!("/admin/consumers/{}", segment(key)), None)?;
            out.show(&r.json, || generic(&r.json));
        }
        ConsumerAction::Set { key, plan } => {
            let r = client.call(
                "PUT",
                &format!("/admin/consumers/{}", segment(key)),
                Some(&json!({"plan": plan})),
            )?;
            out.show(&r.json, || {
                let verb = if r.status == 201 { "added" } else { "updated" };
                format!("consumer {verb}: plan {}", printable(plan))
            });
        }
        ConsumerAction::Rm { key } => {
            client.call(
                "DELETE",
                &format!("/admin/consumers/{}", segment(key)),
                None,
            )?;
            if !out.as_json {
                println!("consumer removed; its requests get the default plan");
            }
        }
    }
    Ok(())
}

/// Readiness from `/readyz`, the rest from `/admin/stats` and
/// `/admin/config`; what a node does not offer shows as unknown.
fn status(client: &AdminClient, out: Output) -> Result<(), Failure> {
    let ready = client.call_public("/readyz")?;
    let readiness = ready.text.trim().to_string();
    let stats = client.call_any("GET", "/admin/stats", None)?;
    let stats = (stats.status == 200).then_some(stats.json);
    let config = client.call_any("GET", "/admin/config", None)?;
    let config = (config.status == 200).then_some(config.json);
    let field = |v: &Option<Value>, k: &str| v.as_ref().and_then(|v| v.get(k)).cloned();
    let report = json!({
        "url": client.base(),
        "node": field(&stats, "node"),
        "ready": ready.status == 200,
        "readiness": readiness,
        "degraded": field(&stats, "degraded"),
        "store": field(&stats, "store"),
        "version": field(&stats, "version"),
        "bans_active": field(&stats, "bans_active"),
        "config_sha256": field(&config, "sha256"),
        "config_loaded_at": field(&config, "loaded_at"),
        "reloads": field(&config, "reloads"),
    });
    out.show(&report, || {
        let known = |k: &str| {
            let c = cell(report.get(k));
            if c.is_empty() {
                "unknown".to_string()
            } else {
                c
            }
        };
        let degraded = match report["degraded"].as_bool() {
            Some(true) => "yes: Redis is unavailable; on_failure applies".to_string(),
            Some(false) => "no".to_string(),
            None => "unknown".to_string(),
        };
        let mut sha = known("config_sha256");
        if config.is_none() {
            sha.push_str(" (this node has no GET /admin/config)");
        } else if let Some(at) = report["config_loaded_at"].as_str() {
            sha.push_str(&format!(" (loaded {at})"));
        }
        let mut node = client.base().to_string();
        if let Some(id) = report["node"].as_str() {
            node.push_str(&format!(" ({id})"));
        }
        pairs(vec![
            ("node", node),
            (
                "ready",
                format!(
                    "{} ({})",
                    if ready.status == 200 { "yes" } else { "no" },
                    readiness
                        .trim_start_matches("not ready: ")
                        .trim_start_matches("ready: ")
                ),
            ),
            ("degraded", degraded),
            ("store", known("store")),
            ("version", known("version")),
            ("config sha256", sha),
            ("bans active", known("bans_active")),
        ])
    });
    Ok(())
}
