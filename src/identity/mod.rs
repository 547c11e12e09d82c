//! `[jwt]`: the request's bearer token, verified, so that its claims can
//! key rules (`key = "jwt:<claim>"`) and consumers (`consumers.key`,
//! `consumers.plan_claim`).
//!
//! A token is verified with `jsonwebtoken` (never by hand): RS256, ES256
//! and EdDSA against the keys of a JWKS (a file or a URL, fetched again in
//! the background; [`jwks`]), HS256 against the secret in `jwt.secret_env`.
//! The algorithm comes from the key, never from the token alone: a JWKS
//! key verifies only its own algorithm, and HS256 only ever uses the
//! configured secret. `exp` is required; `exp`, `nbf`, `iss` and `aud` are
//! checked with `jwt.leeway`.
//!
//! Only a verified token's claims reach the rules ([`WithClaims`]): a
//! request with a bad token is answered 401 (`jwt.invalid = "reject"`) or
//! decided as one without a token (`"anonymous"`), and a request without
//! one skips every `jwt:` rule. Every outcome is counted.
//!
//! It runs after the allowlist, the ban cache and the blocklists, so that
//! refusals that cost nothing come before a signature check.

mod jwks;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use metrics::Counter;

use crate::config::{InvalidToken, JwtConfig};
use crate::rules::{KeyHeader, RequestParts};
use jwks::{JwksSource, KeySet};

/// The outcomes of `floodgate_jwt_total{outcome}`.
const OUTCOMES: [&str; 12] = [
    "valid",
    "absent",
    "too_large",
    "malformed",
    "unsupported_algorithm",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "missing_claim",
];

/// A verified token's claims that can name a subject: the top-level
/// strings, numbers and booleans, as text.
#[derive(Debug, Default)]
pub(crate) struct Claims(Vec<(String, String)>);

impl Claims {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the request's token says.
pub(crate) enum Token {
    /// No `[jwt]`, or no bearer token: nothing to key by.
    None,
    Verified(Claims),
    /// A bad token; `reject`: answer 401 (else decide as anonymous).
    Invalid {
        why: &'static str,
        reject: bool,
    },
}

/// A request with its verified claims, as the rules read it.
pub(crate) struct WithClaims<'a, R: ?Sized> {
    pub(crate) req: &'a R,
    pub(crate) claims: Option<&'a Claims>,
}

impl<R: RequestParts + ?Sized> RequestParts for WithClaims<'_, R> {
    fn method(&self) -> &str {
        self.req.method()
    }
    fn path(&self) -> &str {
        self.req.path()
    }
    fn host(&self) -> Option<&str> {
        self.req.host()
    }
    fn key_header(&self, name: &HeaderName) -> Option<KeyHeader<'_>> {
        self.req.key_header(name)
    }
    fn claim(&self, name: &str) -> Option<&str> {
        self.claims.and_then(|c| c.get(name))
    }
}

/// The verifier in effect (a reload that changes `[jwt]` replaces it).
pub(crate) struct Identity {
    current: ArcSwap<Option<Arc<Verifier>>>,
    outcomes: Vec<(&'static str, Counter)>,
}

impl Identity {
    /// Builds the verifier of `jwt` (its JWKS read before returning).
    pub(crate) fn start(config_file: &Path, jwt: Option<&JwtConfig>) -> Arc<Identity> {
        let identity = Identity {
            current: ArcSwap::from_pointee(None),
            outcomes: OUTCOMES
                .iter()
                .map(|o| (*o, metrics::counter!(crate::metrics::JWT, "outcome" => *o)))
                .collect(),
        };
        identity.configure(config_file, jwt);
        Arc::new(identity)
    }

    /// Puts `jwt` in effect; an unchanged section keeps its verifier and
    /// keys.
    pub(crate) fn configure(&self, config_file: &Path, jwt: Option<&JwtConfig>) {
        let current = self.current.load_full();
        if current.as_ref().as_ref().map(|v| &v.config) == jwt {
            return;
        }
        let next = jwt.map(|c| Verifier::start(config_file, c.clone()));
        self.current.store(Arc::new(next));
    }

    /// Reads and verifies the request's bearer token.
    pub(crate) fn token(&self, headers: &HeaderMap) -> Token {
        let current = self.current.load();
        let Some(verifier) = current.as_ref() else {
            return Token::None;
        };
        let result = verifier.verify(headers);
        let outcome = match &result {
            Ok(Some(_)) => "valid",
            Ok(None) => "absent",
            Err(why) => why,
        };
        if let Some((_, c)) = self.outcomes.iter().find(|(o, _)| *o == outcome) {
            c.increment(1);
        }
        match result {
            Ok(Some(claims)) => Token::Verified(claims),
            Ok(None) => Token::None,
            Err(why) => Token::Invalid {
                why,
                reject: verifier.config.invalid == InvalidToken::Reject,
            },
        }
    }
}

/// One `[jwt]` section's keys and checks.
struct Verifier {
    config: JwtConfig,
    secret: Option<DecodingKey>,
    keys: ArcSwap<KeySet>,
    /// A token named a `kid` the JWKS lacks: perhaps a key just rotated
    /// in, so the refresher fetches the JWKS early (at most every
    /// [`EARLY_REFRESH_GAP`]).
    kid_missed: AtomicBool,
}

/// The least time between two fetches of the JWKS that tokens with an
/// unknown `kid` ask for, so that they cannot make the gateway hammer the
/// identity provider.
const EARLY_REFRESH_GAP: Duration = Duration::from_secs(10);

impl Verifier {
    fn start(config_file: &Path, config: JwtConfig) -> Arc<Verifier> {
        let secret = config.secret_env.as_deref().and_then(|var| {
            match std::env::var(var).map(|s| s.trim().to_string()) {
                Ok(s) if !s.is_empty() => {
                    if s.len() < 32 {
                        log::warn!("jwt.secret_env: the secret in {var} is shorter than 32 bytes: HS256 wants at least 32");
                    }
                    Some(DecodingKey::from_secret(s.as_bytes()))
                }
                _ => {
                    log::error!("jwt.secret_env: {var} is not set: HS256 tokens are refused as unknown_key");
                    None
                }
            }
        });
        let verifier = Arc::new(Verifier {
            config: config.clone(),
            secret,
            keys: ArcSwap::from_pointee(KeySet::default()),
            kid_missed: AtomicBool::new(false),
        });
        if let Some(jwks) = &config.jwks {
            let source = if jwks.starts_with("https://") || jwks.starts_with("http://") {
                JwksSource::Url(jwks.clone())
            } else {
                let base = config_file.parent().unwrap_or(Path::new("."));
                JwksSource::File(base.join(jwks))
            };
            let refresher = Refresher {
                source,
                every: config.jwks_refresh,
                failing: Mutex::new(false),
            };
            refresher.refresh(&verifier);
            refresher.run(Arc::downgrade(&verifier));
        }
        verifier
    }

    /// `Ok(None)`: no bearer token; `Err`: why the token is bad.
    fn verify(&self, headers: &HeaderMap) -> Result<Option<Claims>, &'static str> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Ok(None);
        };
        let value = value.as_bytes();
        if value.len() > self.config.max_token_bytes {
            return Err("too_large");
        }
        let Some(token) = bearer(value) else {
            return Ok(None);
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed")?;
        let keys = self.keys.load();
        let candidates: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => self.secret.iter().collect(),
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => keys
                .candidates(header.alg, header.kid.as_deref())
                .into_iter()
                .map(|k| &k.key)
                .collect(),
            _ => return Err("unsupported_algorithm"),
        };
        if candidates.is_empty() {
            if header.kid.is_some() && header.alg != Algorithm::HS256 {
                self.kid_missed.store(true, Ordering::Relaxed);
            }
            return Err("unknown_key");
        }
        let validation = self.validation(header.alg);
        let mut why = "bad_signature";
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                key,
                &validation,
            ) {
                Ok(data) => return Ok(Some(claims_of(data.claims))),
                Err(e) => {
                    why = reason(e.kind());
                    if why != "bad_signature" {
                        break;
                    }
                }
            }
        }
        Err(why)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.config.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        match &self.config.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.config.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        v
    }
}

/// The token of `Bearer <token>` (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidSignature => "bad_signature",
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not_yet_valid",
        ErrorKind::InvalidIssuer => "wrong_issuer",
        ErrorKind::InvalidAudience => "wrong_audience",
        ErrorKind::MissingRequiredClaim(_) => "missing_claim",
        ErrorKind::InvalidAlgorithm => "unsupported_algorithm",
        _ => "malformed",
    }
}

fn claims_of(map: serde_json::Map<String, serde_json::Value>) -> Claims {
    Claims(
        map.into_iter()
            .filter_map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((k, text))
            })
            .collect(),
    )
}

/// Keeps a verifier's JWKS fresh: fetched every `jwks_refresh` by a thread
/// that ends with the verifier; a failed fetch keeps the keys in force.
struct Refresher {
    source: JwksSource,
    every: Duration,
    failing: Mutex<bool>,
}

impl Refresher {
    fn refresh(&self, verifier: &Verifier) {
        use crate::metrics::{JWKS_KEYS, JWKS_REFRESH, JWKS_STALE};
        let result = self.source.fetch().and_then(|bytes| KeySet::parse(&bytes));
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((set, skipped)) => {
                metrics::counter!(JWKS_REFRESH, "result" => "ok").increment(1);
                metrics::gauge!(JWKS_STALE).set(0.0);
                metrics::gauge!(JWKS_KEYS).set(set.len() as f64);
                if *failing || verifier.keys.load().len() != set.len() || skipped > 0 {
                    log::info!(
                        "jwt: {} keys from {}{}",
                        set.len(),
                        self.source,
                        if skipped > 0 {
                            format!(" ({skipped} skipped: not an RS256, ES256 or EdDSA public key)")
                        } else {
                            String::new()
                        }
                    );
                }
                *failing = false;
                verifier.keys.store(Arc::new(set));
            }
            Err(why) => {
                metrics::counter!(JWKS_REFRESH, "result" => "error").increment(1);
                metrics::gauge!(JWKS_STALE).set(1.0);
                if !*failing {
                    log::warn!(
                        "jwt: the JWKS at {}: {why}; keeping the {} keys in force",
                        self.source,
                        verifier.keys.load().len()
                    );
                }
                *failing = true;
            }
        }
    }

    fn run(self, verifier: Weak<Verifier>) {
        let spawned = std::thread::Builder::new()
            .name("jwks".into())
            .spawn(move || {
                let mut last = Instant::now();
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let Some(verifier) = verifier.upgrade() else {
                        return;
                    };
                    let due = last.elapsed() >= self.every;
                    let early = last.elapsed() >= EARLY_REFRESH_GAP
                        && verifier.kid_missed.swap(false, Ordering::Relaxed);
                    if due || early {
                        self.refresh(&verifier);
                        last = Instant::now();
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("jwt: cannot start the JWKS refresher: keys are not refreshed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bearer_tokens_are_read() {
        assert_eq!(bearer(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer(b"bearer   abc "), Some("abc"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"\xff\xfe"), None);
    }

    #[test]
    fn only_scalar_claims_can_key() {
        let claims = claims_of(
            serde_json::json!({"sub":"u1","n":7,"ok":true,"roles":["a"],"o":{"x":1}})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(claims.get("sub"), Some("u1"));
        assert_eq!(claims.get("n"), Some("7"));
        assert_eq!(claims.get("ok"), Some("true"));
        assert_eq!(claims.get("roles"), None);
        assert_eq!(claims.get("o"), None);
    }
}
