//! The files in `deploy/`: the alert rules pass `promtool check rules` and
//! their own `promtool test rules`, the Grafana dashboard is valid JSON
//! whose queries are valid PromQL, every metric either names is one the
//! gateway exports, and the systemd unit passes `systemd-analyze verify`.
//! promtool (Debian: prometheus) and systemd-analyze must be installed
//! (`.ci/run` installs them); without them these tests fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use floodgate::metrics;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed (bash .ci/run installs it): {e}"))
}

fn assert_success(out: &Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// Every `floodgate_*` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("floodgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// A name the gateway exports (histograms as their `_bucket`, `_sum`,
/// `_count` series).
fn exported(name: &str) -> bool {
    let all = [
        metrics::REQUESTS,
        metrics::REDIS_SECONDS,
        metrics::UPSTREAM_SECONDS,
        metrics::REDIS_ERRORS,
        metrics::BANS_ACTIVE,
        metrics::DEGRADED,
        metrics::BANS_TOTAL,
        metrics::UPSTREAM_ERRORS,
        metrics::UPSTREAM_EJECTIONS,
        metrics::UPSTREAM_EJECTIONS_HELD,
        metrics::UPSTREAM_HEALTHY,
        metrics::DECISIONS,
        metrics::SHARD_DEGRADED,
        metrics::DECISIONS_SHED,
        metrics::CONFIG_RELOADS,
        metrics::SETTLE_ERRORS,
        metrics::SETTLEMENTS,
        metrics::BLOCKLIST_STALE,
        metrics::JWKS_STALE,
        metrics::CROWDSEC_UP,
    ];
    all.iter().any(|m| {
        name == *m
            || (m.ends_with("_seconds")
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{m}{s}")))
    })
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo("deploy/prometheus");
    let out = run(
        "promtool",
        &["check", "rules", "floodgate-alerts.yml"],
        &dir,
    );
    let text = assert_success(&out, "promtool check rules");
    assert!(text.contains("SUCCESS: 18 rules found"), "{text}");
    let out = run(
        "promtool",
        &["test", "rules", "floodgate-alerts.test.yml"],
        &dir,
    );
    assert_success(&out, "promtool test rules");

    let rules = std::fs::read_to_string(dir.join("floodgate-alerts.yml")).unwrap();
    // The alerts cover where decisions are made and the pools' health too.
    for alert in [
        "FloodgateShardDegraded",
        "FloodgateDecisionsOffRedis",
        "FloodgateDecisionsShed",
        "FloodgateReloadFailed",
        "FloodgateUpstreamOut",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert}");
    }
    let names = metric_names(&rules);
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        assert!(
            exported(&name),
            "the alert rules use {name}, which floodgate does not export"
        );
    }
}

#[test]
fn grafana_dashboard_is_json_with_valid_queries_on_exported_metrics() {
    let text = std::fs::read_to_string(repo("deploy/grafana/floodgate-dashboard.json")).unwrap();
    let dash: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {e}"));
    assert_eq!(dash["uid"], "floodgate");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");

    // Every metric of section 5 of the contract has a panel.
    let used: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for m in [
        metrics::REQUESTS,
        metrics::REDIS_ERRORS,
        metrics::BANS_ACTIVE,
        metrics::DEGRADED,
        // And where decisions are made, shards, shedding, reloads, pools.
        metrics::DECISIONS,
        metrics::SHARD_DEGRADED,
        metrics::DECISIONS_SHED,
        metrics::CONFIG_RELOADS,
        metrics::UPSTREAM_HEALTHY,
        metrics::UPSTREAM_EJECTIONS,
        metrics::UPSTREAM_EJECTIONS_HELD,
    ] {
        assert!(used.iter().any(|u| u == m), "no panel shows {m}");
    }
    for m in [metrics::REDIS_SECONDS, metrics::UPSTREAM_SECONDS] {
        assert!(used.contains(&format!("{m}_bucket")), "no panel shows {m}");
    }
    for name in &used {
        assert!(
            exported(name),
            "the dashboard uses {name}, which floodgate does not export"
        );
    }

    // The queries parse: promtool checks them as recording rules, with
    // Grafana's variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("queries.yml"), rules).unwrap();
    let out = run("promtool", &["check", "rules", "queries.yml"], dir.path());
    assert_success(&out, "promtool check rules on the dashboard's queries");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo("deploy/floodgate.service")).unwrap();
    for setting in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(
            unit.lines().any(|l| l == setting),
            "the unit lacks {setting}"
        );
    }
    // Verify it as installed, with the binary these tests built in place
    // of /usr/local/bin/floodgate.
    let dir = tempfile::tempdir().unwrap();
    let local = unit.replace("/usr/local/bin/floodgate", env!("CARGO_BIN_EXE_floodgate"));
    std::fs::write(dir.path().join("floodgate.service"), local).unwrap();
    let out = run(
        "systemd-analyze",
        &["verify", "--man=no", "floodgate.service"],
        dir.path(),
    );
    let text = assert_success(&out, "systemd-analyze verify");
    // It exits 0 on keys it ignores; a warning about the unit is a failure.
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("floodgate.service"))
        .collect();
    assert!(warnings.is_empty(), "systemd-analyze verify warns:\n{text}");
}
