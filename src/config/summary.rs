//! `floodgate --check`'s summary of a valid configuration: one line per
//! listener, store, pool, route, rule, plan and the ban settings. Apart
//! because it reads every section and checks none.

use super::Config;

impl Config {
    /// A short human summary, printed by `--check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let scheme = match &self.server.tls {
            Some(tls) => format!(
                "HTTPS, HTTP/2 and HTTP/1.1, certificate {}",
                tls.cert.display()
            ),
            None => "HTTP/1.1".to_string(),
        };
        let _ = writeln!(s, "listen        {} ({scheme})", self.server.listen);
        let _ = writeln!(
            s,
            "admin_listen  {} (admin API, /metrics, health)",
            self.server.admin_listen
        );
        let store = match &self.redis {
            None => "in-process only (no [redis] section)".to_string(),
            Some(r) if !r.cluster.is_empty() => format!(
                "Redis Cluster {} (timeout {}, on_failure {})",
                r.cluster.join(", "),
                humantime::format_duration(r.timeout),
                r.on_failure
            ),
            Some(r) => format!(
                "Redis {} (timeout {}, on_failure {})",
                r.url.as_deref().unwrap_or("-"),
                humantime::format_duration(r.timeout),
                r.on_failure
            ),
        };
        let _ = writeln!(s, "store         {store}");
        let _ = writeln!(s, "upstream      {}", self.upstream.urls.join(", "));
        for (name, pool) in &self.upstreams {
            let _ = writeln!(s, "pool          {name}: {}", pool.urls.join(", "));
        }
        for r in &self.routes {
            let m = &r.matcher;
            let _ = writeln!(
                s,
                "route         host {} path {} methods {} -> {}",
                m.host.as_deref().unwrap_or("*"),
                m.path_prefix.as_deref().unwrap_or("*"),
                m.methods
                    .as_ref()
                    .map_or("*".to_string(), |ms| ms.join(",")),
                r.upstream
            );
        }
        let _ = writeln!(
            s,
            "websocket     {}",
            if self.upstream.websocket {
                format!(
                    "forwarded, idle timeout {}",
                    humantime::format_duration(self.upstream.websocket_idle_timeout)
                )
            } else {
                "refused with 501".to_string()
            }
        );
        for r in &self.rules {
            let _ = writeln!(
                s,
                "rule          {}: key {}, {}",
                r.name,
                r.key.as_deref().unwrap_or("-"),
                r.describe()
            );
        }
        if let Some(c) = &self.consumers {
            let _ = writeln!(
                s,
                "consumers     key {}, default plan {}, {} static keys",
                c.key,
                c.default_plan.as_deref().unwrap_or("none"),
                c.keys.len()
            );
        }
        for (name, plan) in &self.plans {
            let _ = writeln!(s, "plan          {name}: {} rules", plan.rules.len());
            for r in &plan.rules {
                let _ = writeln!(s, "  rule        {}: {}", r.name, r.describe());
            }
        }
        if self.ban.enabled {
            let _ = writeln!(
                s,
                "ban           after {} denials within {}: {} x{} up to {}",
                self.ban.after,
                humantime::format_duration(self.ban.within),
                humantime::format_duration(self.ban.duration),
                self.ban.factor,
                humantime::format_duration(self.ban.max_duration)
            );
        } else {
            let _ = writeln!(s, "ban           off");
        }
        let _ = writeln!(s, "allowlist     {} entries", self.allowlist.len());
        self.identity_summary(&mut s);
        s
    }

    /// The lines of SPEC section 16: PROXY protocol, `[jwt]`,
    /// `[[blocklists]]`, `[crowdsec]`.
    fn identity_summary(&self, s: &mut String) {
        use std::fmt::Write;
        if self.server.proxy_protocol {
            let _ = writeln!(
                s,
                "proxy         PROXY protocol v1/v2 from client_ip.trusted_proxies"
            );
        }
        if let Some(j) = &self.jwt {
            let keys: Vec<String> = j
                .jwks
                .iter()
                .map(|k| format!("JWKS {k}"))
                .chain(j.secret_env.iter().map(|e| format!("HS256 secret in ${e}")))
                .collect();
            let invalid = match j.invalid {
                super::InvalidToken::Reject => "401",
                super::InvalidToken::Anonymous => "anonymous",
            };
            let _ = writeln!(
                s,
                "jwt           {}; bad tokens: {invalid}",
                keys.join(", ")
            );
        }
        for b in &self.blocklists {
            let _ = writeln!(
                s,
                "blocklist     {}: {} (checked every {})",
                b.name(),
                b.path.display(),
                humantime::format_duration(b.poll)
            );
        }
        if let Some(c) = &self.crowdsec {
            let _ = writeln!(
                s,
                "crowdsec      {} every {} (key in ${})",
                c.url,
                humantime::format_duration(c.poll),
                c.api_key_env
            );
        }
    }
}
