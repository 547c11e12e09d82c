//! `[jwt]`: rules and consumers keyed by the claims of a verified bearer
//! token. Tokens are signed here with real keys (ES256 and EdDSA from
//! rcgen, RS256 from `openssl genrsa`, HS256 with a secret from the
//! environment) and verified by the gateway against a JWKS file or URL.
//! Bad tokens are refused (401) or decided as anonymous, never keyed.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A signing key and its public JWK.
struct SigningKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

fn es256(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    SigningKey {
        alg: Algorithm::ES256,
        kid: kid.into(),
        key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty":"EC","crv":"P-256","kid":kid,"x":b64(&raw[1..33]),"y":b64(&raw[33..65])}),
    }
}

fn eddsa(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    SigningKey {
        alg: Algorithm::EdDSA,
        kid: kid.into(),
        key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty":"OKP","crv":"Ed25519","kid":kid,"x":b64(pair.public_key_raw())}),
    }
}

fn rs256(dir: &Path, kid: &str) -> SigningKey {
    let pem = dir.join(format!("{kid}.pem"));
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&pem)
        .arg("2048")
        .output()
        .expect("openssl must be installed")
        .status
        .success();
    assert!(ok, "openssl genrsa");
    let out = Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.trim().strip_prefix("Modulus=").unwrap();
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    SigningKey {
        alg: Algorithm::RS256,
        kid: kid.into(),
        key: EncodingKey::from_rsa_pem(&std::fs::read(&pem).unwrap()).unwrap(),
        jwk: json!({"kty":"RSA","kid":kid,"alg":"RS256","n":b64(&n),"e":"AQAB"}),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Standard claims valid for an hour, plus `extra`.
fn claims(extra: Value) -> Value {
    let mut c = json!({"iss":"https://idp.test/","aud":"api","exp":now() + 3600,"iat":now()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.key).unwrap()
}

fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn jwt_section(jwks: &str, extra: &str) -> String {
    format!(
        "[jwt]\njwks = \"{jwks}\"\nsecret_env = \"TEST_JWT_SECRET\"\nissuer = \"https://idp.test/\"\naudience = \"api\"\nleeway = \"30s\"\n{extra}\n"
    )
}

fn start(redis: &RedisServer, up: &Upstream, rules: &str, extra: &str) -> Gateway {
    let (port, admin_port, config) = Gateway::config_on(redis, &up.url(), rules, extra);
    Gateway::start_config(port, admin_port, config, &[("TEST_JWT_SECRET", SECRET)])
}

fn with_token(gw: &Gateway, path: &str, token: &str) -> Resp {
    get(
        &gw.url(path),
        &[("Authorization", &format!("Bearer {token}"))],
    )
}

const PER_SUB: &str = "[[rules]]\nname = \"per-sub\"\nkey = \"jwt:sub\"\nrate = 1\nper = \"60s\"\nburst = 2\nmatch = { path_prefix = \"/api\" }\n";

#[test]
fn rules_are_keyed_by_the_claims_of_tokens_of_every_algorithm() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let (ec, ed, rsa) = (es256("ec-1"), eddsa("ed-1"), rs256(dir.path(), "rsa-1"));
    let file = write_file(dir.path(), "jwks.json", &jwks(&[&ec, &ed, &rsa]));
    let gw = start(
        &redis,
        &up,
        PER_SUB,
        &jwt_section(&file.display().to_string(), ""),
    );

    let tokens = [
        sign(&ec, &claims(json!({"sub":"alice"}))),
        sign(&ed, &claims(json!({"sub":"bob"}))),
        sign(&rsa, &claims(json!({"sub":"carol"}))),
        hs256(&claims(json!({"sub":"dave"}))),
        // Expired 10 s ago: within the leeway.
        sign(&ec, &claims(json!({"sub":"erin","exp":now() - 10}))),
    ];
    // All from one address, yet each subject has its own bucket.
    for token in &tokens {
        for _ in 0..2 {
            let r = with_token(&gw, "/api/x", token);
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    for token in &tokens {
        let r = with_token(&gw, "/api/x", token);
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(r.json()["rule"], "per-sub");
    }
    // Without a token the rule does not apply.
    assert_eq!(get(&gw.url("/api/x"), &[]).status, 200);
    assert_eq!(gw.metric("floodgate_jwt_total{outcome=\"valid\"}"), 15.0);
    assert_eq!(gw.metric("floodgate_jwks_keys"), 3.0);
}

#[test]
fn bad_tokens_are_refused_with_401_and_counted() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let ec = es256("ec-1");
    let impostor = es256("ec-1");
    let file = write_file(dir.path(), "jwks.json", &jwks(&[&ec]));
    let gw = start(
        &redis,
        &up,
        PER_SUB,
        &jwt_section(&file.display().to_string(), ""),
    );
    let ok = claims(json!({"sub":"alice"}));
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(ok.to_string().as_bytes())
    );
    // HS256 signed with the public key's JWK as the secret (the classic
    // algorithm confusion): only the configured secret verifies HS256.
    let confused = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("ec-1".into());
        jsonwebtoken::encode(
            &header,
            &ok,
            &EncodingKey::from_secret(ec.jwk.to_string().as_bytes()),
        )
        .unwrap()
    };
    let cases = [
        (
            "expired",
            sign(&ec, &claims(json!({"sub":"a","exp":now() - 120}))),
        ),
        (
            "not_yet_valid",
            sign(&ec, &claims(json!({"sub":"a","nbf":now() + 120}))),
        ),
        (
            "wrong_issuer",
            sign(&ec, &claims(json!({"sub":"a","iss":"https://evil/"}))),
        ),
        (
            "wrong_audience",
            sign(&ec, &claims(json!({"sub":"a","aud":"other"}))),
        ),
        ("bad_signature", sign(&impostor, &ok)),
        ("bad_signature", confused),
        // `alg: none` is not even an algorithm to the parser.
        ("malformed", unsigned),
        (
            "unsupported_algorithm",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS512),
                &ok,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap(),
        ),
        ("malformed", "not.a.token".to_string()),
        ("unknown_key", {
            let mut other = es256("ec-2");
            other.kid = "nobody".into();
            sign(&other, &ok)
        }),
        ("missing_claim", {
            let mut c = ok.clone();
            c.as_object_mut().unwrap().remove("exp");
            sign(&ec, &c)
        }),
        ("too_large", format!("{}x", "a".repeat(9000))),
    ];
    for (why, token) in &cases {
        let r = with_token(&gw, "/api/x", token);
        assert_eq!(r.status, 401, "{why}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
        assert_eq!(r.json()["error"], "invalid_token");
        assert!(r.body.contains(why), "{why}: {}", r.body);
    }
    for why in [
        "expired",
        "bad_signature",
        "too_large",
        "unsupported_algorithm",
    ] {
        assert!(
            gw.metric(&format!("floodgate_jwt_total{{outcome=\"{why}\"}}")) >= 1.0,
            "{why}"
        );
    }
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
    // A 1 MB header never reaches the verifier: the HTTP parser's bound.
    let huge = format!("Bearer {}", "a".repeat(1 << 20));
    let answer = {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The gateway may answer and close before taking it all.
        let _ = s.write_all(
            format!("GET /api/x HTTP/1.1\r\nHost: x\r\nAuthorization: {huge}\r\n\r\n").as_bytes(),
        );
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert_eq!(
        raw_status(&answer),
        431,
        "{}",
        &answer[..answer.len().min(200)]
    );
    // The gateway is fine afterwards.
    assert_eq!(with_token(&gw, "/api/x", &sign(&ec, &ok)).status, 200);
}

#[test]
fn anonymous_mode_decides_bad_tokens_as_no_token_and_never_keys_by_them() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let (ec, impostor) = (es256("ec-1"), es256("ec-1"));
    let file = write_file(dir.path(), "jwks.json", &jwks(&[&ec]));
    let rules = format!(
        "{PER_SUB}[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 3\nmatch = {{ path_prefix = \"/api\" }}\n"
    );
    let gw = start(
        &redis,
        &up,
        &rules,
        &jwt_section(&file.display().to_string(), "invalid = \"anonymous\""),
    );
    // Forged tokens naming a fresh subject each time: decided by address.
    for i in 0..3 {
        let forged = sign(&impostor, &claims(json!({"sub": format!("fresh-{i}")})));
        assert_eq!(with_token(&gw, "/api/x", &forged).status, 200);
    }
    let forged = sign(&impostor, &claims(json!({"sub":"fresh-9"})));
    let r = with_token(&gw, "/api/x", &forged);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["rule"], "per-ip");
    assert_eq!(
        gw.metric("floodgate_jwt_total{outcome=\"bad_signature\"}"),
        4.0
    );
    // Nothing was ever charged to a forged subject.
    let bucket = gw.admin("GET", "/admin/buckets/per-sub/fresh-0", None);
    assert_eq!(bucket.status, 200, "{}", bucket.body);
    assert!(
        bucket.json()["tokens"].as_f64().unwrap() > 1.99,
        "{}",
        bucket.body
    );
}

#[test]
fn consumers_are_keyed_by_a_claim_and_their_plan_comes_from_another() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let ec = es256("ec-1");
    let file = write_file(dir.path(), "jwks.json", &jwks(&[&ec]));
    let plans =
        "[consumers]\nkey = \"jwt:sub\"\nplan_claim = \"plan\"\ndefault_plan = \"free\"\n\n\
        [plans.free]\nrules = [{ name = \"free-rate\", rate = 1, per = \"60s\", burst = 1 }]\n\n\
        [plans.pro]\nrules = [{ name = \"pro-rate\", rate = 1, per = \"60s\", burst = 3 }]\n";
    let gw = start(
        &redis,
        &up,
        "",
        &format!("{}{plans}", jwt_section(&file.display().to_string(), "")),
    );
    let run = |token: &str, allowed: usize, rule: &str| {
        for _ in 0..allowed {
            let r = with_token(&gw, "/", token);
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let r = with_token(&gw, "/", token);
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(r.json()["rule"], rule);
    };
    run(
        &sign(&ec, &claims(json!({"sub":"u1","plan":"pro"}))),
        3,
        "pro-rate",
    );
    run(
        &sign(&ec, &claims(json!({"sub":"u2","plan":"free"}))),
        1,
        "free-rate",
    );
    // A plan this config does not define: the default plan.
    run(
        &sign(&ec, &claims(json!({"sub":"u3","plan":"gold"}))),
        1,
        "free-rate",
    );
    // An assignment through the admin API wins over the claim.
    let set = gw.admin("PUT", "/admin/consumers/u4", Some(r#"{"plan":"pro"}"#));
    assert!(set.status == 200 || set.status == 201, "{}", set.body);
    // Every node applies an assignment within a second.
    std::thread::sleep(Duration::from_millis(1500));
    run(
        &sign(&ec, &claims(json!({"sub":"u4","plan":"free"}))),
        3,
        "pro-rate",
    );
}

/// Serves the current JWKS on a URL and counts the fetches.
struct JwksServer {
    port: u16,
    body: Arc<Mutex<String>>,
    fetches: Arc<Mutex<u32>>,
}

impl JwksServer {
    fn start(body: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = Arc::new(Mutex::new(body));
        let fetches = Arc::new(Mutex::new(0));
        let (b, f) = (body.clone(), fetches.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                *f.lock().unwrap() += 1;
                let body = b.lock().unwrap().clone();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer {
            port,
            body,
            fetches,
        }
    }

    fn serve(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn fetches(&self) -> u32 {
        *self.fetches.lock().unwrap()
    }
}

#[test]
fn a_jwks_url_is_refreshed_and_a_bad_document_keeps_the_keys_in_force() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let (old, new) = (es256("old"), es256("new"));
    let server = JwksServer::start(jwks(&[&old]));
    let url = format!("http://127.0.0.1:{}/jwks.json", server.port);
    let gw = start(
        &redis,
        &up,
        PER_SUB,
        &jwt_section(&url, "jwks_refresh = \"10s\""),
    );
    let old_token = sign(&old, &claims(json!({"sub":"a"})));
    let new_token = sign(&new, &claims(json!({"sub":"b"})));
    assert_eq!(with_token(&gw, "/", &old_token).status, 200);
    assert_eq!(with_token(&gw, "/", &new_token).status, 401);

    // 10 000 keys: refused whole, the keys fetched before stay.
    let many: Vec<Value> = (0..10_000)
        .map(|i| json!({"kty":"EC","crv":"P-256","kid":format!("k{i}"),"x":old.jwk["x"],"y":old.jwk["y"]}))
        .collect();
    server.serve(json!({ "keys": many }).to_string());
    let before = server.fetches();
    wait_until("a refresh", Duration::from_secs(30), || {
        gw.metric("floodgate_jwks_stale") == 1.0
    });
    assert!(server.fetches() > before);
    assert_eq!(with_token(&gw, "/", &old_token).status, 200);
    assert!(
        gw.log()
            .contains("is larger than 1048576 bytes; keeping the 1 keys in force"),
        "{}",
        gw.log()
    );

    // Rotated: the new key verifies, the old one no longer does.
    server.serve(jwks(&[&new]));
    wait_until("the rotation", Duration::from_secs(30), || {
        with_token(&gw, "/", &new_token).status == 200
    });
    assert_eq!(with_token(&gw, "/", &old_token).status, 401);
    assert_eq!(gw.metric("floodgate_jwks_stale"), 0.0);
}

#[test]
fn a_token_with_an_unknown_kid_fetches_the_jwks_early_but_not_every_time() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let (old, new) = (es256("old"), es256("new"));
    let server = JwksServer::start(jwks(&[&old]));
    let url = format!("http://127.0.0.1:{}/jwks.json", server.port);
    // No periodic fetch within the test: only the early one.
    let gw = start(
        &redis,
        &up,
        PER_SUB,
        &jwt_section(&url, "jwks_refresh = \"1h\""),
    );
    assert_eq!(server.fetches(), 1);
    server.serve(jwks(&[&old, &new]));
    let new_token = sign(&new, &claims(json!({"sub":"b"})));
    let started = std::time::Instant::now();
    wait_until("the new key fetched", Duration::from_secs(30), || {
        with_token(&gw, "/", &new_token).status == 200
    });
    eprintln!(
        "a rotated key verified {:?} after its first token",
        started.elapsed()
    );
    // Hundreds of tokens naming a kid nobody has cost one fetch per gap.
    let mut stranger = es256("stranger");
    stranger.kid = "nobody".into();
    let forged = sign(&stranger, &claims(json!({"sub":"c"})));
    for _ in 0..200 {
        assert_eq!(with_token(&gw, "/", &forged).status, 401);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(server.fetches() <= 3, "{} fetches", server.fetches());
}
