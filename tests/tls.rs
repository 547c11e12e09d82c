//! HTTPS on the front door: HTTP/1.1 and HTTP/2 through ALPN with a
//! certificate made by the test, limits over HTTP/2, a certificate renewed
//! by a reload, and bad certificates as config errors.
//!
//! HTTP/2 is exercised with curl (built with nghttp2), the handshake itself
//! with a rustls client, which shows the certificate the gateway presented.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn rule(name: &str, path: &str, burst: u32) -> String {
    format!(
        "[[rules]]\nname = \"{name}\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = {burst}\nmatch = {{ path_prefix = \"{path}\" }}\n"
    )
}

/// curl with the test CA trusted; returns stdout. `input` goes to stdin.
fn curl(ca: &Path, args: &[&str], input: Option<&[u8]>) -> String {
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl must be installed (with HTTP/2 support)");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(data) = input {
        stdin.write_all(data).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The leaf certificate the gateway presented on `tls`.
fn served(tls: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Vec<u8> {
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP/1.1 GET on an open connection; returns the status.
fn get_on(tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>, path: &str) -> u16 {
    write!(tls, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    tls.flush().unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a sized response");
    let mut body = vec![0u8; length];
    tls.read_exact(&mut body).unwrap();
    raw_status(&head)
}

fn ca_file(dir: &Path, ca: &TestCa) -> PathBuf {
    write_file(dir, "ca.pem", &ca.pem)
}

#[test]
fn https_speaks_http2_and_http1_and_limits_hold_over_http2() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let tls = install(dir.path(), &ca.issue("floodgate test A", 1));
    let gw = Gateway::on(&redis, &up, &rule("per-ip", "/limited", 3), &tls);
    let ca_pem = ca_file(dir.path(), &ca);
    let base = format!("https://127.0.0.1:{}", gw.port);
    let status_line = "%{http_version} %{http_code}\n";

    let h1 = curl(
        &ca_pem,
        &[
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            status_line,
            &format!("{base}/"),
        ],
        None,
    );
    assert_eq!(h1.trim(), "1.1 200");
    let h2 = curl(
        &ca_pem,
        &[
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            status_line,
            &format!("{base}/"),
        ],
        None,
    );
    assert_eq!(h2.trim(), "2 200", "ALPN chose HTTP/2");

    // An HTTP/2 request reaches the HTTP/1.1 upstream whole.
    let echo: serde_json::Value = serde_json::from_str(&curl(
        &ca_pem,
        &[
            "--http2",
            "-H",
            "cookie: a=1",
            "-H",
            "cookie: b=2",
            &format!("{base}/echo?q=1"),
        ],
        None,
    ))
    .unwrap();
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "q=1");
    let header = |name: &str| -> Vec<String> {
        echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(header("x-forwarded-proto"), vec!["https"]);
    assert_eq!(
        header("x-forwarded-host"),
        vec![format!("127.0.0.1:{}", gw.port)],
        ":authority becomes X-Forwarded-Host"
    );
    assert_eq!(header("host"), vec![format!("127.0.0.1:{}", up.port)]);
    assert_eq!(header("cookie"), vec!["a=1; b=2"]);

    // An upload without a length (HTTP/2 frames it) is streamed whole.
    let data = vec![b'u'; 300_000];
    let up_json: serde_json::Value = serde_json::from_str(&curl(
        &ca_pem,
        &["--http2", "-T", "-", &format!("{base}/upload")],
        Some(&data),
    ))
    .unwrap();
    assert_eq!(up_json["received"], 300_000);

    // Four requests on one HTTP/2 connection: the limit holds.
    let url = format!("{base}/limited");
    let lines = curl(
        &ca_pem,
        &[
            "--http2",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            status_line,
            &url,
            &url,
            &url,
            &url,
        ],
        None,
    );
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        vec!["2 200", "2 200", "2 200", "2 429"]
    );
    assert_eq!(gw.requests_metric("per-ip", "limited"), 1);
}

#[test]
fn a_renewed_certificate_is_served_after_a_reload_and_open_connections_stay() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let first = ca.issue("floodgate test A", 1);
    let tls = install(dir.path(), &first);
    let gw = Gateway::on(&redis, &up, "", &tls);

    let mut open = connect(gw.port, &ca.pem, &[b"http/1.1"]);
    assert_eq!(served(&open), first.der);
    assert_eq!(get_on(&mut open, "/before"), 200);
    let h2 = connect(gw.port, &ca.pem, &[b"h2", b"http/1.1"]);
    assert_eq!(h2.conn.alpn_protocol(), Some(&b"h2"[..]));

    // Renewal: new files at the same paths, then a reload.
    let renewed = ca.issue("floodgate test B", 2);
    install(dir.path(), &renewed);
    let resp = gw.admin("POST", "/admin/reload", None);
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json()["restart_needed"], serde_json::json!([]));

    let fresh = connect(gw.port, &ca.pem, &[b"http/1.1"]);
    assert_eq!(
        served(&fresh),
        renewed.der,
        "new handshakes get the renewed one"
    );
    assert_ne!(renewed.der, first.der);
    assert_eq!(
        get_on(&mut open, "/after"),
        200,
        "a connection opened before the reload still works"
    );
}

#[test]
fn a_bad_certificate_or_key_is_a_config_error_at_start_and_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let a = ca.issue("floodgate test A", 1);
    let b = ca.issue("floodgate test B", 2);
    let base = "[upstream]\nurls = [\"http://127.0.0.1:3000\"]\n";
    let check = |cert: &str, key: &str| {
        write_file(dir.path(), "c.pem", cert);
        write_file(dir.path(), "k.pem", key);
        let config = write_file(
            dir.path(),
            "f.toml",
            &format!("{base}[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n"),
        );
        let out = Command::new(binary())
            .arg("--config")
            .arg(&config)
            .arg("--check")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cert_path = dir.path().join("c.pem").display().to_string();
    let key_path = dir.path().join("k.pem").display().to_string();
    let cases = [
        (
            check("not a certificate", &a.key_pem),
            "server.tls.cert",
            &cert_path,
        ),
        (check(&a.cert_pem, "not a key"), "server.tls.key", &key_path),
        (check(&a.cert_pem, &b.key_pem), "server.tls.key", &key_path),
        (check(&a.key_pem, &a.key_pem), "server.tls.cert", &cert_path),
    ];
    for ((code, err), key, file) in cases {
        assert_eq!(code, Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("f.toml") && err.contains(key) && err.contains(file.as_str()),
            "expected {key} and {file}: {err}"
        );
    }
    assert!(
        check(&a.cert_pem, &a.key_pem).0 == Some(0),
        "relative paths read from the config's directory"
    );

    // On reload: 400, and the certificate being served stays.
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let served_dir = tempfile::tempdir().unwrap();
    let gw = Gateway::on(&redis, &up, "", &install(served_dir.path(), &a));
    write_file(
        served_dir.path(),
        "cert.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let resp = gw.admin("POST", "/admin/reload", None);
    assert_eq!(resp.status, 400, "{}", resp.body);
    assert_eq!(resp.json()["key"], "server.tls.cert");
    assert!(resp.json()["message"]
        .as_str()
        .unwrap()
        .contains(&served_dir.path().join("cert.pem").display().to_string()));
    assert_eq!(served(&connect(gw.port, &ca.pem, &[])), a.der);
}
