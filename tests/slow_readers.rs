//! Clients that stop reading, against real processes: a small answer frees
//! its upstream connection before the client has it, and a client that
//! takes nothing is cut off after `server.send_timeout` over HTTPS (the
//! kernel's timeout on the TCP connection under TLS) and over HTTP/2 (a
//! stream whose window the client never opens, on a connection it keeps
//! alive), its upstream connection freed for everyone else.
//! (`tests/hardening.rs` holds the plain HTTP/1.1 cases: thousands of
//! stalled readers, and one address that cannot pin the pool.)

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A gateway in front of `up` with `server` lines added to `[server]` and
/// `upstream` lines (which must set `timeout`) to `[upstream]`, `rest`
/// appended.
fn gateway(up: &Upstream, server: &str, upstream: &str, rest: &str) -> Gateway {
    let (port, admin_port) = (free_port(), free_port());
    let p = prefix();
    let config = Gateway::config(
        port,
        admin_port,
        &Setup {
            redis: None,
            upstream: &up.url(),
            prefix: &p,
            rules: "",
            extra: rest,
        },
    )
    .replace("workers = 2\n", &format!("{server}\n"))
    .replace(
        "timeout = \"2s\"\nconnect_timeout = \"500ms\"\n",
        &format!("connect_timeout = \"500ms\"\n{upstream}\n"),
    );
    Gateway::start_config(port, admin_port, config, &[])
}

/// Opens a connection that asks for `path` as client `ip` (in
/// X-Forwarded-For) with a tiny receive buffer, and never reads.
fn stalled_plain(port: u16, path: &str, ip: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {ip}\r\n\r\n"
    )
    .unwrap();
    s
}

/// The status of an HTTPS GET of `url` by curl trusting `ca_pem`, as
/// client `ip`.
fn https_status(ca_pem: &std::path::Path, url: &str, ip: &str) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "15",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", &format!("X-Forwarded-For: {ip}"), "--cacert"])
        .arg(ca_pem)
        .arg(url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_small_answer_frees_its_upstream_connection_before_the_client_reads_it() {
    let up = Upstream::start();
    // One upstream connection per worker; answers up to 8 MiB are read
    // whole. Six clients fetch 4 MiB each and read none of it: their
    // answers wait in the gateway's memory, not on upstream connections.
    let gw = gateway(
        &up,
        "workers = 2\nsend_timeout = \"30s\"",
        "timeout = \"2s\"\nmax_connections = 1\nbuffer_response = 8388608",
        "",
    );
    let stalled: Vec<TcpStream> = (0..6)
        .map(|i| stalled_plain(gw.port, "/sized/4194304", &format!("10.50.0.{}", i + 1)))
        .collect();
    thread::sleep(Duration::from_millis(500));
    for i in 0..6 {
        let started = Instant::now();
        let r = get_as(&gw.url("/sized/1000"), &format!("10.51.0.{}", i + 1));
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "served in {:?}: the stalled answers held the upstream connections",
            started.elapsed()
        );
    }
    drop(stalled);
}

#[test]
fn https_clients_that_stop_reading_are_cut_off_after_the_send_timeout() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let tls = install(dir.path(), &ca.issue("slow readers", 1));
    let gw = gateway(
        &up,
        "workers = 2\nsend_timeout = \"2s\"",
        "timeout = \"30s\"\nmax_connections = 2",
        &tls,
    );
    // Four HTTPS clients (HTTP/1.1) ask for 50 MB and read nothing.
    let mut stalled = Vec::new();
    for i in 0..4 {
        let mut c = connect(gw.port, &ca.pem, &[b"http/1.1"]);
        write!(
            c,
            "GET /bytes/52428800 HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 10.52.0.{}\r\n\r\n",
            i + 1
        )
        .unwrap();
        c.flush().unwrap();
        stalled.push(c);
    }
    thread::sleep(Duration::from_millis(300));
    assert!(accepted_connections(gw.port) >= 4);
    // The kernel's send timeout on the TCP connection under TLS closes
    // them soon after `send_timeout`.
    let started = Instant::now();
    wait_until(
        "the stalled HTTPS connections to be closed",
        Duration::from_secs(10),
        || accepted_connections(gw.port) == 0,
    );
    eprintln!("stalled HTTPS clients closed after {:?}", started.elapsed());
    // Their upstream connections are free again.
    let ca_pem = write_file(dir.path(), "ca.pem", &ca.pem);
    let url = format!("https://127.0.0.1:{}/sized/1000", gw.port);
    assert_eq!(https_status(&ca_pem, &url, "10.52.1.1"), "200");
    drop(stalled);
}

/// An HTTP/2 client over TLS whose streams have a window of 0: it keeps
/// its connection alive but takes no byte of any answer. Sends one GET of
/// `path` and holds the stream until the returned sender is dropped.
fn stalled_h2(port: u16, ca_pem: String, path: &'static str) -> std::sync::mpsc::Sender<()> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (ready, got_head) = std::sync::mpsc::channel::<u16>();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let connector = tokio_rustls::TlsConnector::from(client_config(&ca_pem, &[b"h2"]));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let (mut send, conn) = h2::client::Builder::new()
                .initial_window_size(0)
                .handshake::<_, bytes::Bytes>(tls)
                .await
                .unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = http02::Request::builder()
                .uri(format!("https://localhost:{port}{path}"))
                .header("x-forwarded-for", "10.53.0.1")
                .body(())
                .unwrap();
            let (resp, _) = send.send_request(req, true).unwrap();
            let resp = resp.await.unwrap();
            ready.send(resp.status().as_u16()).unwrap();
            let _body = resp.into_body();
            // Hold the stream, reading nothing, until told to stop.
            tokio::task::spawn_blocking(move || {
                let _ = stopped.recv();
            })
            .await
            .unwrap();
        });
    });
    let status = got_head
        .recv_timeout(Duration::from_secs(10))
        .expect("the stalled HTTP/2 stream's head");
    assert_eq!(status, 200);
    stop
}

#[test]
fn an_http2_stream_that_takes_nothing_is_cut_off_and_frees_its_upstream_connection() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let tls = install(dir.path(), &ca.issue("h2 slow reader", 1));
    // One worker, one upstream connection: the stalled stream holds it.
    let gw = gateway(
        &up,
        "workers = 1\nsend_timeout = \"2s\"",
        "timeout = \"10s\"\nmax_connections = 1",
        &tls,
    );
    let stop = stalled_h2(gw.port, ca.pem.clone(), "/bytes/52428800");
    let ca_pem = write_file(dir.path(), "ca.pem", &ca.pem);
    let started = Instant::now();
    // Waits for the upstream connection the stalled stream holds, which
    // the watch frees once the stream has taken nothing for send_timeout.
    let url = format!("https://127.0.0.1:{}/sized/1000", gw.port);
    let status = https_status(&ca_pem, &url, "10.54.0.1");
    let waited = started.elapsed();
    eprintln!("served after {waited:?}");
    assert_eq!(status, "200");
    assert!(
        waited < Duration::from_secs(6),
        "the stalled stream held the upstream connection for {waited:?}"
    );
    assert!(gw.metric("floodgate_client_errors_total{kind=\"response_stalled\"}") >= 1.0);
    drop(stop);
}
