//! Reloading the configuration without a restart (`SIGHUP` or
//! `POST /admin/reload`).
//!
//! A reload reads and validates the whole file first, certificate and key
//! included; only a file that passes changes anything, so a broken file
//! leaves the gateway exactly as it was. A valid one is applied in one step
//! per part: escalation settings to the stores and the ban service, the
//! config allowlist to the ban cache, the certificate to the TLS listener,
//! and then one new [`Snapshot`] (rules, trusted proxies, ban status,
//! upstreams) for the front door. Requests that start after the reload see
//! all of it; requests in flight finish with what they started with.
//! Buckets, bans and violations live in the stores under the rule's name,
//! so a rule that keeps its name keeps its state.
//!
//! Some keys shape what was built at start-up (listeners, workers, the
//! Redis connection, the key layout); a reload keeps their old value and
//! reports them as needing a restart. The list is [`keep_restart_only`].
//!
//! It is separate from the server wiring because it is the one path that
//! changes a running gateway's settings, and it needs to know every part
//! that a reload may touch.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use actix_web::web;
use rustls::sign::CertifiedKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError};
use crate::gateway::{Gateway, Snapshot};
use crate::limiter::BanParams;
use crate::tls::{self, ServedCertificate};

/// A configuration file read and checked whole: the config, the SHA-256 of
/// its bytes, and the certificate `[server.tls]` names, if any.
pub struct ConfigFile {
    pub(crate) path: PathBuf,
    pub config: Config,
    /// Lower-case hex.
    pub(crate) sha256: String,
    pub(crate) certificate: Option<Arc<CertifiedKey>>,
}

impl ConfigFile {
    /// Reads, parses and validates `path`, and loads the certificate and
    /// key it names. Every problem is one [`ConfigError`] line.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            message: format!("cannot read the file: {e}"),
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            message: format!("not UTF-8 text: {e}"),
        })?;
        let config = Config::parse(text, &file)?;
        let certificate = match &config.server.tls {
            Some(t) => Some(tls::load(path, t)?),
            None => None,
        };
        crate::blocklists::check_files(path, &config.blocklists)?;
        Ok(ConfigFile {
            path: path.to_path_buf(),
            config,
            sha256: hex(&Sha256::digest(&bytes)),
            certificate,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `GET /admin/config`: which file is in effect.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConfigStatus {
    /// When the configuration in effect was loaded (RFC 3339).
    pub(crate) loaded_at: String,
    pub(crate) sha256: String,
    /// Successful reloads since start-up.
    pub(crate) reloads: u64,
}

/// What a successful reload did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Reloaded {
    pub(crate) sha256: String,
    /// Keys whose new value waits for a restart (their old value stays).
    pub(crate) restart_needed: Vec<&'static str>,
}

struct InEffect {
    config: Config,
    sha256: String,
    loaded_at: SystemTime,
    reloads: u64,
}

/// Re-reads the config file and applies it to the running gateway.
pub(crate) struct Reloader {
    path: PathBuf,
    gateway: web::Data<Gateway>,
    /// The TLS listener's certificate; `None` when serving plain HTTP.
    certificate: Option<Arc<ServedCertificate>>,
    /// One reload at a time; holds what is in effect.
    in_effect: Mutex<InEffect>,
}

impl Reloader {
    pub(crate) fn new(
        file: &ConfigFile,
        gateway: web::Data<Gateway>,
        certificate: Option<Arc<ServedCertificate>>,
    ) -> Reloader {
        Reloader {
            path: file.path.clone(),
            gateway,
            certificate,
            in_effect: Mutex::new(InEffect {
                config: file.config.clone(),
                sha256: file.sha256.clone(),
                loaded_at: SystemTime::now(),
                reloads: 0,
            }),
        }
    }

    /// Reads the file again and, if it is valid, puts it in effect; if not,
    /// changes nothing. Either way one log line says what happened.
    pub(crate) fn reload(&self) -> Result<Reloaded, ConfigError> {
        let mut in_effect = self.in_effect.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = match ConfigFile::read(&self.path) {
            Ok(f) => f,
            Err(e) => {
                crate::metrics::config_reload("error");
                log::error!("reload refused, configuration unchanged: {e}");
                return Err(e);
            }
        };
        let restart_needed = keep_restart_only(&in_effect.config, &mut file.config);
        self.apply(&file);
        in_effect.config = file.config;
        in_effect.sha256 = file.sha256.clone();
        in_effect.loaded_at = SystemTime::now();
        in_effect.reloads += 1;
        crate::metrics::config_reload("ok");
        if restart_needed.is_empty() {
            log::info!(
                "configuration reloaded from {} (sha256 {})",
                self.path.display(),
                file.sha256
            );
        } else {
            log::warn!(
                "configuration reloaded from {} (sha256 {}); these keys keep their old value until a restart: {}",
                self.path.display(),
                file.sha256,
                restart_needed.join(", ")
            );
        }
        Ok(Reloaded {
            sha256: file.sha256,
            restart_needed,
        })
    }

    /// Puts a validated file in effect, part by part, the front door's
    /// snapshot last.
    fn apply(&self, file: &ConfigFile) {
        let config = &file.config;
        let gw = &self.gateway;
        let params = BanParams::from_config(&config.ban);
        gw.limiter.set_ban_params(params);
        gw.bans.set_params(params);
        gw.bans
            .cache()
            .set_config_allowlist(config.allowlist.clone());
        // A file that turned TLS off keeps the certificate being served
        // (TLS on or off needs a restart).
        if let (Some(served), Some(cert)) = (&self.certificate, &file.certificate) {
            served.replace(cert.clone());
        }
        crate::log_throttle::LOG.set_window(config.server.log_throttle);
        // A rotated access log is let go of: the file is opened again by
        // its name.
        if let Some(access_log) = &gw.access_log {
            access_log.reopen();
        }
        // Every list is read again within a second (its content stays
        // until then).
        gw.blocklists.configure(&file.path, &config.blocklists);
        // A changed [jwt] gets a new verifier (its JWKS read first).
        gw.identity.configure(&file.path, config.jwt.as_ref());
        let previous = gw.snapshot();
        gw.replace_snapshot(Snapshot::new(config, Some(&previous)));
        // Leases were taken under the old rules: they end, and what they
        // held goes back.
        gw.limiter.end_all_leases();
        gw.consumers
            .set_known_plans(config.plans.keys().cloned().collect());
    }

    /// The file in effect: when it was loaded, its hash, reloads so far.
    pub(crate) fn status(&self) -> ConfigStatus {
        let in_effect = self.in_effect.lock().unwrap_or_else(|p| p.into_inner());
        ConfigStatus {
            loaded_at: humantime::format_rfc3339_seconds(in_effect.loaded_at).to_string(),
            sha256: in_effect.sha256.clone(),
            reloads: in_effect.reloads,
        }
    }
}

/// Reloads on every `SIGHUP` from now on, for as long as the process runs.
/// The handler is installed before this returns, so a `SIGHUP` right after
/// start-up reloads instead of ending the process.
pub(crate) fn reload_on_hangup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot listen for SIGHUP ({e}); reload with POST /admin/reload");
            return;
        }
    };
    actix_web::rt::spawn(async move {
        while hangups.recv().await.is_some() {
            // The outcome is logged (and counted) by the reload itself.
            if reloader.reload().is_ok() {
                reloader.gateway.limiter.return_leases().await;
            }
        }
    });
}

/// Gives `new` the old value of every key that only a restart can change,
/// and names those whose value differed.
///
/// Restart-only: the listeners (`server.listen`, `server.admin_listen`,
/// turning `server.tls` on or off), `server.workers`,
/// `server.shutdown_timeout`, `server.admin_token_env`, `server.node_id`,
/// what each connection and worker is built with (`server.send_timeout`,
/// `client_body_timeout`, `max_body_size`, `response_buffer`), the access
/// log's file (`server.access_log`; a reload reopens it), the PROXY
/// protocol step (`server.proxy_protocol`), the CrowdSec bouncer
/// (`[crowdsec]`),
/// the whole `[redis]` section (the connection and key layout), the IPv6
/// grouping of clients (`client_ip.ipv6_prefix`, part of every key), and the
/// background intervals `ban.reconcile_interval` and `ban.audit_max_len`.
pub(crate) fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if old.$($field).+ != new.$($field).+ {
                changed.push($key);
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!("server.listen", server.listen);
    keep!("server.admin_listen", server.admin_listen);
    keep!("server.workers", server.workers);
    keep!("server.shutdown_timeout", server.shutdown_timeout);
    keep!("server.admin_token_env", server.admin_token_env);
    keep!("server.node_id", server.node_id);
    // Set on each accepted socket and on each worker's upstream client.
    keep!("server.send_timeout", server.send_timeout);
    keep!("server.client_body_timeout", server.client_body_timeout);
    keep!("server.max_body_size", server.max_body_size);
    keep!("server.response_buffer", server.response_buffer);
    // The writer thread is started with its file (a reload reopens it).
    keep!("server.access_log", server.access_log);
    // The public listener is built with or without the PROXY step.
    keep!("server.proxy_protocol", server.proxy_protocol);
    // The bouncer's poller is started once, with its key.
    keep!("crowdsec", crowdsec);
    if old.server.tls.is_some() != new.server.tls.is_some() {
        changed.push("server.tls");
        new.server.tls = old.server.tls.clone();
    }
    match (&old.redis, &new.redis) {
        (Some(o), Some(n)) => {
            let before = changed.len();
            for (key, differs) in [
                ("redis.url", o.url != n.url),
                ("redis.cluster", o.cluster != n.cluster),
                ("redis.key_prefix", o.key_prefix != n.key_prefix),
                ("redis.timeout", o.timeout != n.timeout),
                (
                    "redis.connect_timeout",
                    o.connect_timeout != n.connect_timeout,
                ),
                ("redis.on_failure", o.on_failure != n.on_failure),
                (
                    "redis.breaker_failures",
                    o.breaker_failures != n.breaker_failures,
                ),
                ("redis.probe_interval", o.probe_interval != n.probe_interval),
            ] {
                if differs {
                    changed.push(key);
                }
            }
            if changed.len() == before && o != n {
                changed.push("redis");
            }
        }
        (None, None) => {}
        _ => changed.push("redis"),
    }
    new.redis = old.redis.clone();
    keep!("client_ip.ipv6_prefix", client_ip.ipv6_prefix);
    keep!("ban.reconcile_interval", ban.reconcile_interval);
    keep!("ban.audit_max_len", ban.audit_max_len);
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(
            &format!("[upstream]\nurls = [\"http://127.0.0.1:3000\"]\n{text}"),
            "t.toml",
        )
        .expect("valid")
    }

    #[test]
    fn restart_only_keys_keep_their_old_value_and_are_named() {
        let old = parse(
            "[server]\nlisten = \"127.0.0.1:1000\"\nworkers = 2\n[redis]\nurl = \"redis://127.0.0.1:1\"\n",
        );
        let mut new = parse(
            "[server]\nlisten = \"127.0.0.1:2000\"\nworkers = 2\n[redis]\nurl = \"redis://127.0.0.1:2\"\ntimeout = \"1s\"\n[[rules]]\nname = \"r\"\nkey = \"ip\"\nrate = 1\nper = \"1s\"\nburst = 1\n",
        );
        let changed = keep_restart_only(&old, &mut new);
        assert_eq!(changed, vec!["server.listen", "redis.url", "redis.timeout"]);
        assert_eq!(new.server.listen, old.server.listen);
        assert_eq!(new.redis, old.redis);
        assert_eq!(new.rules.len(), 1, "reloadable keys take the new value");
    }

    #[test]
    fn an_unchanged_file_needs_no_restart() {
        let old = parse("[redis]\ncluster = [\"redis://127.0.0.1:1\"]\n");
        let mut new = old.clone();
        assert!(keep_restart_only(&old, &mut new).is_empty());
    }

    #[test]
    fn adding_redis_is_a_restart() {
        let old = parse("");
        let mut new = parse("[redis]\nurl = \"redis://127.0.0.1:1\"\n");
        assert_eq!(keep_restart_only(&old, &mut new), vec!["redis"]);
        assert!(new.redis.is_none());
    }

    #[test]
    fn hashes_are_lower_case_hex() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
