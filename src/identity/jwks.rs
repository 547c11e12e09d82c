//! Where a JWKS comes from (a file or a URL), reading it within bounds,
//! and the key set it holds. A JWKS is outside input: its size, its number
//! of keys and each key are checked, a key of a kind floodgate does not
//! verify with (symmetric keys above all: a JWKS never supplies an HMAC
//! secret) is skipped and counted, and a document past the bounds is
//! refused whole.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The largest JWKS document read, in bytes.
pub(crate) const MAX_JWKS_BYTES: u64 = 1 << 20;
/// The most keys a JWKS may hold.
pub(crate) const MAX_KEYS: usize = 100;
/// How long one fetch of a JWKS URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the JWKS is read from.
#[derive(Debug, Clone)]
pub(crate) enum JwksSource {
    File(PathBuf),
    Url(String),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(p) => write!(f, "{}", p.display()),
            JwksSource::Url(u) => f.write_str(u),
        }
    }
}

impl JwksSource {
    /// The document's bytes, at most [`MAX_JWKS_BYTES`].
    pub(crate) fn fetch(&self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        let read = match self {
            JwksSource::File(path) => std::fs::File::open(path)
                .and_then(|f| f.take(MAX_JWKS_BYTES + 1).read_to_end(&mut body))
                .map_err(|e| format!("cannot read it: {e}")),
            JwksSource::Url(url) => ureq::AgentBuilder::new()
                .timeout(FETCH_TIMEOUT)
                .build()
                .get(url)
                .call()
                .map_err(|e| format!("cannot fetch it: {e}"))
                .and_then(|r| {
                    r.into_reader()
                        .take(MAX_JWKS_BYTES + 1)
                        .read_to_end(&mut body)
                        .map_err(|e| format!("cannot fetch it: {e}"))
                }),
        };
        read?;
        if body.len() as u64 > MAX_JWKS_BYTES {
            return Err(format!("it is larger than {MAX_JWKS_BYTES} bytes"));
        }
        Ok(body)
    }
}

/// One verification key, with the one algorithm it verifies.
pub(crate) struct Key {
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// The keys of a JWKS: by `kid`, and those without one.
#[derive(Default)]
pub(crate) struct KeySet {
    by_kid: HashMap<String, Key>,
    unnamed: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS; also returns how many keys were skipped.
    pub(crate) fn parse(bytes: &[u8]) -> Result<(KeySet, usize), String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
        if doc.keys.len() > MAX_KEYS {
            return Err(format!(
                "it holds {} keys, more than the {MAX_KEYS} accepted",
                doc.keys.len()
            ));
        }
        let mut set = KeySet::default();
        let mut skipped = 0;
        for value in doc.keys {
            let Some((kid, key)) = serde_json::from_value::<Jwk>(value)
                .ok()
                .and_then(|j| key_of(&j))
            else {
                skipped += 1;
                continue;
            };
            match kid {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.unnamed.push(key),
            }
        }
        Ok((set, skipped))
    }

    pub(crate) fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    /// The keys that may have signed a token of `alg` with `kid`: the one
    /// named, or (without a `kid`) the first few of that algorithm, so
    /// that a token cannot make the gateway try every key.
    pub(crate) fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<&Key> {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .filter(|k| k.alg == alg)
                .into_iter()
                .collect(),
            None => self
                .unnamed
                .iter()
                .chain(self.by_kid.values())
                .filter(|k| k.alg == alg)
                .take(3)
                .collect(),
        }
    }
}

/// A JWK's `kid` and key, when it is an RS256, ES256 (P-256) or EdDSA
/// (Ed25519) public key that the `alg` it states (if any) agrees with.
fn key_of(jwk: &Jwk) -> Option<(Option<String>, Key)> {
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    if let Some(stated) = jwk.common.key_algorithm {
        if stated.to_string() != format!("{alg:?}") {
            return None;
        }
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((jwk.common.key_id.clone(), Key { alg, key }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_keys_of_the_three_algorithms_are_kept() {
        let doc = br#"{"keys":[
            {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"oct","kid":"secret","k":"c2VjcmV0"},
            {"kty":"EC","crv":"P-384","kid":"p384","x":"AA","y":"AA"},
            {"kty":"RSA","kid":"rsa","alg":"ES256","n":"AQAB","e":"AQAB"},
            {"kty":"weird"}
        ]}"#;
        let (set, skipped) = KeySet::parse(doc).unwrap();
        assert_eq!((set.len(), skipped), (1, 4));
        assert_eq!(set.candidates(Algorithm::EdDSA, Some("ed")).len(), 1);
        assert!(set.candidates(Algorithm::RS256, Some("ed")).is_empty());
        assert!(set.candidates(Algorithm::HS256, Some("secret")).is_empty());
    }

    #[test]
    fn documents_past_the_bounds_are_refused_whole() {
        let many = format!(
            "{{\"keys\":[{}]}}",
            vec!["{\"kty\":\"oct\",\"k\":\"AA\"}"; MAX_KEYS + 1].join(",")
        );
        let Err(why) = KeySet::parse(many.as_bytes()) else {
            panic!("101 keys taken");
        };
        assert!(why.contains("more than"), "{why}");
        assert!(KeySet::parse(b"{\"keys\":3}").is_err());
        assert!(KeySet::parse(b"\xff").is_err());
    }
}
