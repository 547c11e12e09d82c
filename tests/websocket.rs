//! WebSocket through the gateway: the upgrade is decided like any request,
//! then the connection is relayed both ways until a side closes or it goes
//! idle; refusals by the upstream come back as they are.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{Request, Response};
use tungstenite::Message;

const GAUGE: &str = "floodgate_websocket_connections";

/// An upstream that accepts WebSockets, greets with the path and the
/// `X-Forwarded-For` it was given, then echoes (text prefixed with
/// `echo: `, binary as is). Counts the connections it accepted.
struct EchoUpstream {
    port: u16,
    accepted: Arc<AtomicU64>,
}

impl EchoUpstream {
    fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let count = count.clone();
                thread::spawn(move || {
                    let mut greeting = String::new();
                    // The callback type is tungstenite's, large error and all.
                    #[allow(clippy::result_large_err)]
                    let seen = |req: &Request, resp: Response| {
                        let xff = req
                            .headers()
                            .get("x-forwarded-for")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        greeting = format!("hello {} {xff}", req.uri());
                        Ok(resp)
                    };
                    let Ok(mut ws) = tungstenite::accept_hdr(stream, seen) else {
                        return;
                    };
                    count.fetch_add(1, Ordering::Relaxed);
                    if ws.send(Message::text(greeting)).is_err() {
                        return;
                    }
                    loop {
                        let reply = match ws.read() {
                            Ok(Message::Text(t)) => Message::text(format!("echo: {}", t.as_str())),
                            Ok(Message::Binary(b)) => Message::Binary(b),
                            Ok(Message::Close(_)) | Err(_) => break,
                            Ok(_) => continue,
                        };
                        if ws.send(reply).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        EchoUpstream { port, accepted }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

fn gateway_config(
    redis: &RedisServer,
    upstream: &str,
    rules: &str,
    upstream_keys: &str,
) -> Gateway {
    let (port, admin_port) = (free_port(), free_port());
    let p = prefix();
    let text = Gateway::config(
        port,
        admin_port,
        &Setup {
            redis: Some(redis.url()),
            upstream,
            prefix: &p,
            rules,
            extra: "",
        },
    )
    .replace(
        "connect_timeout = \"500ms\"\n",
        &format!("connect_timeout = \"500ms\"\n{upstream_keys}"),
    );
    Gateway::start_config(port, admin_port, text, &[])
}

fn per_ip(burst: u32) -> String {
    format!(
        "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"60s\"\nburst = {burst}\n"
    )
}

type Ws = tungstenite::WebSocket<TcpStream>;

/// A WebSocket through the gateway as client `ip`; the handshake answer
/// (101), or the refusal's status and body.
fn open(
    port: u16,
    path: &str,
    ip: &str,
) -> Result<(Ws, tungstenite::handshake::client::Response), (u16, String)> {
    let mut req = format!("ws://127.0.0.1:{port}{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", ip.parse().unwrap());
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match tungstenite::client(req, stream) {
        Ok(ok) => Ok(ok),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => Err((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

fn text(ws: &mut Ws) -> String {
    match ws.read().unwrap() {
        Message::Text(t) => t.as_str().to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Sends an upgrade request by hand; returns the status line's code, the
/// head, and the body (read by its Content-Length).
fn raw_upgrade(port: u16, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    (
        raw_status(&head),
        head,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[test]
fn messages_cross_the_gateway_both_ways_and_the_upgrade_takes_one_token() {
    let redis = RedisServer::start();
    let echo = EchoUpstream::start();
    let gw = gateway_config(&redis, &echo.url(), &per_ip(5), "");

    let (mut ws, resp) = open(gw.port, "/chat?room=1", "203.0.113.10").expect("upgraded");
    assert_eq!(resp.status().as_u16(), 101);
    assert_eq!(
        resp.headers()
            .get("ratelimit-remaining")
            .map(|v| v.to_str().unwrap()),
        Some("4"),
        "the upgrade took one token"
    );
    assert_eq!(
        text(&mut ws),
        "hello /chat?room=1 203.0.113.10, 127.0.0.1",
        "path, query and X-Forwarded-For reach the upstream"
    );
    for i in 0..20 {
        ws.send(Message::text(format!("message {i}"))).unwrap();
        assert_eq!(text(&mut ws), format!("echo: message {i}"));
    }
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(b) => assert!(b[..] == big[..], "2 MB came back intact"),
        other => panic!("expected binary, got {other:?}"),
    }
    assert_eq!(gw.metric(GAUGE), 1.0);

    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    wait_until("the relay to end", Duration::from_secs(10), || {
        gw.metric(GAUGE) == 0.0
    });
    assert_eq!(echo.accepted(), 1);
    assert_eq!(gw.requests_metric("per-ip", "allowed"), 1);
}

#[test]
fn limited_and_banned_clients_cannot_upgrade() {
    let redis = RedisServer::start();
    let echo = EchoUpstream::start();
    let gw = gateway_config(&redis, &echo.url(), &per_ip(2), "");

    let _first = open(gw.port, "/", "203.0.113.20").expect("first upgrade");
    let _second = open(gw.port, "/", "203.0.113.20").expect("second upgrade");
    let (status, body) = open(gw.port, "/", "203.0.113.20").expect_err("refused");
    assert_eq!(status, 429, "{body}");

    let ban = gw.admin(
        "POST",
        "/admin/bans",
        Some(r#"{"subject":"203.0.113.66","duration":"10m"}"#),
    );
    assert_eq!(ban.status, 201, "{}", ban.body);
    let (status, _) = open(gw.port, "/", "203.0.113.66").expect_err("banned");
    assert_eq!(status, 429);
    assert_eq!(
        echo.accepted(),
        2,
        "refused upgrades never reach the upstream"
    );
}

#[test]
fn an_upgrade_the_upstream_refuses_comes_back_as_it_is() {
    let redis = RedisServer::start();
    let sized = canned_upstream(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nX-Reason: members only\r\n\r\nforbidden",
    );
    let gw = gateway_config(
        &redis,
        &format!("http://127.0.0.1:{sized}"),
        &per_ip(10),
        "",
    );
    let (status, head, body) = raw_upgrade(gw.port, "/chat");
    assert_eq!((status, body.as_str()), (403, "forbidden"));
    assert!(
        head.to_ascii_lowercase().contains("x-reason: members only"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("ratelimit-remaining: 9"),
        "{head}"
    );

    let chunked = canned_upstream(
        "HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    let gw = gateway_config(&redis, &format!("http://127.0.0.1:{chunked}"), "", "");
    let (status, _, body) = raw_upgrade(gw.port, "/chat");
    assert_eq!((status, body.as_str()), (400, "hello world"));

    let gw = gateway_config(&redis, &format!("http://127.0.0.1:{}", free_port()), "", "");
    let (status, _, body) = raw_upgrade(gw.port, "/chat");
    assert_eq!(status, 502, "{body}");
}

#[test]
fn websocket_false_answers_501() {
    let redis = RedisServer::start();
    let echo = EchoUpstream::start();
    let gw = gateway_config(&redis, &echo.url(), "", "websocket = false\n");
    let (status, body) = open(gw.port, "/chat", "203.0.113.30").expect_err("refused");
    assert_eq!(status, 501);
    assert!(body.contains("websocket_disabled"), "{body}");
    assert_eq!(echo.accepted(), 0);
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let redis = RedisServer::start();
    let echo = EchoUpstream::start();
    let gw = gateway_config(&redis, &echo.url(), "", "websocket_idle_timeout = \"1s\"\n");

    // Traffic every 300 ms keeps it open past the idle timeout.
    let (mut busy, _) = open(gw.port, "/", "203.0.113.40").expect("upgraded");
    text(&mut busy);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        busy.send(Message::text("tick")).unwrap();
        assert_eq!(text(&mut busy), "echo: tick");
        thread::sleep(Duration::from_millis(300));
    }

    // Silence closes it.
    let (mut idle, _) = open(gw.port, "/", "203.0.113.41").expect("upgraded");
    text(&mut idle);
    let start = Instant::now();
    let ended = loop {
        match idle.read() {
            Ok(Message::Close(_)) | Err(_) => break start.elapsed(),
            Ok(_) => continue,
        }
    };
    assert!(
        ended < Duration::from_secs(8),
        "closed after {ended:?}, not at the socket's read timeout"
    );
    drop(busy);
    wait_until("both relays to end", Duration::from_secs(10), || {
        gw.metric(GAUGE) == 0.0
    });
}
