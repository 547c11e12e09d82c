//! `server.proxy_protocol`: the gateway behind a real HAProxy in TCP mode
//! (`send-proxy-v2` and `send-proxy`), plain HTTP and TLS passed through;
//! the client the header names is the client of every rule, ban and
//! forwarded header. Clients connect from their own loopback addresses
//! (127.0.0.5, ...), HAProxy from 127.0.0.1, the only trusted proxy.
//!
//! HAProxy must be installed (Debian `haproxy`): these tests fail without it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// HAProxy in TCP mode: one frontend sending PROXY v2, one sending v1,
/// both to the gateway on `gateway_port`.
struct Haproxy {
    _proc: Proc,
    _dir: tempfile::TempDir,
    v2_port: u16,
    v1_port: u16,
}

impl Haproxy {
    fn start(gateway_port: u16) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let (v2_port, v1_port) = (free_port(), free_port());
        let config = format!(
            "global\n  maxconn 1000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\n\
             frontend v2\n  bind 127.0.0.1:{v2_port}\n  default_backend gateway_v2\n\n\
             frontend v1\n  bind 127.0.0.1:{v1_port}\n  default_backend gateway_v1\n\n\
             backend gateway_v2\n  server gw 127.0.0.1:{gateway_port} send-proxy-v2\n\n\
             backend gateway_v1\n  server gw 127.0.0.1:{gateway_port} send-proxy\n"
        );
        let path = write_file(dir.path(), "haproxy.cfg", &config);
        // Debian installs it in /usr/sbin, not always on a user's PATH.
        let binary = if Path::new("/usr/sbin/haproxy").exists() {
            "/usr/sbin/haproxy"
        } else {
            "haproxy"
        };
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy must be installed (Debian package haproxy)");
        let proc = Proc::new(child);
        for port in [v2_port, v1_port] {
            wait_until("haproxy listening", Duration::from_secs(10), || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
        Haproxy {
            _proc: proc,
            _dir: dir,
            v2_port,
            v1_port,
        }
    }
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `src`.
fn connect_from(src: &str, port: u16) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    socket.bind(&src.into()).unwrap();
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    socket.connect(&dst.into()).unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp
}

/// Sends `bytes` from `src` and reads until the server closes.
fn exchange_from(src: &str, port: u16, bytes: &[u8]) -> String {
    let mut tcp = connect_from(src, port);
    tcp.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// One GET from `src`: the status and the body.
fn get_from(src: &str, port: u16, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let answer = exchange_from(src, port, request.as_bytes());
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (raw_status(&answer), body)
}

/// The value of `name` among the echoed request headers in `body`.
fn echoed(body: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["headers"].as_array()?.iter().find_map(|h| {
        (h[0].as_str()? == name).then(|| h[1].as_str().unwrap_or_default().to_string())
    })
}

const RULE: &str = "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = 2\nmatch = { path_prefix = \"/limited\" }\n";

/// The gateway's extra config: PROXY protocol on, 127.0.0.1 trusted.
fn proxied(extra: &str) -> String {
    format!("{extra}\n[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n")
}

fn start_gateway(redis: &RedisServer, up: &Upstream, extra: &str) -> Gateway {
    let (port, admin_port, config) = Gateway::config_on(redis, &up.url(), RULE, &proxied(extra));
    let config = config.replacen("[server]\n", "[server]\nproxy_protocol = true\n", 1);
    Gateway::start_config(port, admin_port, config, &[])
}

#[test]
fn the_header_names_the_client_for_rules_bans_and_forwarding() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start_gateway(&redis, &up, "");
    let haproxy = Haproxy::start(gw.port);

    // v2: the upstream hears of the client, not of HAProxy.
    let (status, body) = get_from("127.0.0.5", haproxy.v2_port, "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        echoed(&body, "x-forwarded-for").as_deref(),
        Some("127.0.0.5")
    );
    // v1 too.
    let (status, body) = get_from("127.0.0.7", haproxy.v1_port, "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        echoed(&body, "x-forwarded-for").as_deref(),
        Some("127.0.0.7")
    );

    // Each client has its own bucket, although all come from HAProxy.
    for _ in 0..2 {
        assert_eq!(get_from("127.0.0.5", haproxy.v2_port, "/limited").0, 200);
    }
    assert_eq!(get_from("127.0.0.5", haproxy.v2_port, "/limited").0, 429);
    assert_eq!(get_from("127.0.0.6", haproxy.v2_port, "/limited").0, 200);
    assert_eq!(get_from("127.0.0.7", haproxy.v1_port, "/limited").0, 200);

    // A ban of one client refuses it and nobody else.
    let made = gw.admin(
        "POST",
        "/admin/bans",
        Some(r#"{"subject":"127.0.0.6","duration":"10m","reason":"test"}"#),
    );
    assert_eq!(made.status, 201, "{}", made.body);
    wait_until("the ban applies", Duration::from_secs(5), || {
        get_from("127.0.0.6", haproxy.v2_port, "/").0 != 200
    });
    let (status, body) = get_from("127.0.0.6", haproxy.v2_port, "/");
    assert!(body.contains("\"banned\""), "{status} {body}");
    assert_eq!(get_from("127.0.0.8", haproxy.v2_port, "/").0, 200);

    assert!(gw.metric("floodgate_proxy_protocol_total{outcome=\"v2\"}") >= 6.0);
    assert!(gw.metric("floodgate_proxy_protocol_total{outcome=\"v1\"}") >= 2.0);
}

#[test]
fn tls_passes_through_haproxy_and_the_header_still_names_the_client() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let tls = install(dir.path(), &ca.issue("floodgate proxied", 1));
    let gw = start_gateway(&redis, &up, &tls);
    let haproxy = Haproxy::start(gw.port);
    let ca_pem = write_file(dir.path(), "ca.pem", &ca.pem);

    for (version, src) in [("--http2", "127.0.0.9"), ("--http1.1", "127.0.0.10")] {
        let out = curl(
            &ca_pem,
            &[
                version,
                "--interface",
                src,
                "-w",
                "\n%{http_version} %{http_code}",
                &format!("https://127.0.0.1:{}/", haproxy.v2_port),
            ],
        );
        let (body, status) = out.rsplit_once('\n').unwrap();
        let expected = if version == "--http2" {
            "2 200"
        } else {
            "1.1 200"
        };
        assert_eq!(status, expected);
        assert_eq!(echoed(body, "x-forwarded-for").as_deref(), Some(src));
        assert_eq!(echoed(body, "x-forwarded-proto").as_deref(), Some("https"));
    }
    // The limit is the client's, over HTTP/2 through HAProxy.
    let limited = |src: &str| {
        curl(
            &ca_pem,
            &[
                "--http2",
                "--interface",
                src,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://127.0.0.1:{}/limited", haproxy.v2_port),
            ],
        )
    };
    assert_eq!(limited("127.0.0.11"), "200");
    assert_eq!(limited("127.0.0.11"), "200");
    assert_eq!(limited("127.0.0.11"), "429");
    assert_eq!(limited("127.0.0.12"), "200");
}

#[test]
fn only_trusted_proxies_may_send_a_header_and_a_bad_one_closes_the_connection() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let gw = start_gateway(&redis, &up, "");
    let forged = b"PROXY TCP4 203.0.113.7 127.0.0.1 4711 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    // From an untrusted peer: closed, nothing answered.
    assert_eq!(exchange_from("127.0.0.20", gw.port, forged), "");
    // The same peer without a header is served as itself.
    let (status, body) = get_from("127.0.0.20", gw.port, "/");
    assert_eq!(status, 200);
    assert_eq!(
        echoed(&body, "x-forwarded-for").as_deref(),
        Some("127.0.0.20")
    );
    // From the trusted proxy, the header is believed...
    let answer = exchange_from("127.0.0.1", gw.port, forged);
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert!(answer.contains("203.0.113.7"), "{answer}");
    // ... unless it is malformed.
    for bad in [
        &b"PROXY TCP4 not-an-address 127.0.0.1 4711 80\r\nGET / HTTP/1.1\r\n\r\n"[..],
        &b"PROXY TCP4 1.2.3.4 5.6.7.8 4711 80 and much more text than any header may hold, past 107 bytes\r\n"[..],
        &b"\r\n\r\n\0\r\nQUIT\n\x99\x11\x00\x0c1234567890ab"[..],
    ] {
        assert_eq!(exchange_from("127.0.0.1", gw.port, bad), "");
    }
    // A connection that says nothing is closed as HTTP would close it,
    // quietly; a header that never ends is cut off after 5 s.
    let mut quiet = connect_from("127.0.0.21", gw.port);
    let mut nothing = Vec::new();
    let _ = quiet.read_to_end(&mut nothing);
    assert!(nothing.is_empty());
    let mut slow = connect_from("127.0.0.1", gw.port);
    slow.write_all(b"PROXY TCP4 1.2.3.4").unwrap();
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let _ = slow.read_to_end(&mut out);
    assert!(out.is_empty());
    assert!(started.elapsed() < Duration::from_secs(9));

    assert_eq!(
        gw.metric("floodgate_proxy_protocol_total{outcome=\"untrusted\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("floodgate_proxy_protocol_total{outcome=\"malformed\"}"),
        3.0
    );
    assert_eq!(
        gw.metric("floodgate_proxy_protocol_total{outcome=\"timeout\"}"),
        1.0
    );
    assert!(gw.log().contains("not in client_ip.trusted_proxies"));
}

/// curl with the test CA trusted; returns stdout.
fn curl(ca: &Path, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(args)
        .output()
        .expect("curl must be installed");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
