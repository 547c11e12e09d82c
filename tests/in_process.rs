//! Whole gateways run inside the test process: `server::run_with` serves
//! listeners bound here and stops when the test says so. No Redis (the
//! in-process store decides), a real upstream on loopback, real HTTP.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::Duration;

use floodgate::reload::ConfigFile;
use floodgate::server::{run_with, Listeners};

use common::*;

/// A gateway running on a thread of this process.
struct InProcess {
    public: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Binds two loopback ports, writes a config naming them (and
    /// `upstream`, and `rules`), and serves it until [`InProcess::stop`].
    fn start(upstream: &Upstream, rules: &str) -> InProcess {
        let public = TcpListener::bind("127.0.0.1:0").expect("a public port");
        let admin = TcpListener::bind("127.0.0.1:0").expect("an admin port");
        let (public_addr, admin_addr) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
        let dir = tempfile::tempdir().expect("a temp dir");
        let text = format!(
            "[server]\nlisten = \"{public_addr}\"\nadmin_listen = \"{admin_addr}\"\nworkers = 1\nshutdown_timeout = \"5s\"\n\n[upstream]\nurls = [\"{}\"]\n\n{rules}\n",
            upstream.url()
        );
        let path = write_file(dir.path(), "floodgate.toml", &text);
        let file = ConfigFile::read(&path).expect("a valid config");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(run_with(
                file,
                Listeners { public, admin },
                async move {
                    let _ = stopped.await;
                },
            ))
        });
        let gw = InProcess {
            public: public_addr,
            admin: admin_addr,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        };
        wait_until(
            "the in-process gateway answers",
            Duration::from_secs(10),
            || call("GET", &gw.admin_url("/healthz"), &[], None).status == 200,
        );
        gw
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Resolves the shutdown future and waits for `run_with` to return.
    fn stop(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().expect("the gateway thread ended cleanly"),
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

const PER_IP: &str = r#"
[[rules]]
name = "per-ip"
key = "ip"
rate = 1
per = "1h"
burst = 3
"#;

#[test]
fn an_in_process_gateway_limits_with_its_own_store() {
    let up = Upstream::start();
    let gw = InProcess::start(&up, PER_IP);
    for left in (0..3).rev() {
        let r = get(&gw.url("/"), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
    }
    let r = get(&gw.url("/"), &[]);
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["rule"], "per-ip");
    assert_eq!(
        up.hits(),
        3,
        "the refused request never reached the upstream"
    );
}

#[test]
fn the_shutdown_future_stops_the_gateway_after_its_requests_in_flight() {
    let up = Upstream::start();
    let mut gw = InProcess::start(&up, PER_IP);
    let url = gw.url("/slow/700");
    let slow = std::thread::spawn(move || get(&url, &[]).status);
    // Let the slow request reach the upstream before stopping.
    std::thread::sleep(Duration::from_millis(250));
    gw.stop()
        .expect("run_with returns Ok after a graceful stop");
    assert_eq!(slow.join().unwrap(), 200, "the request in flight finished");
    assert!(
        std::net::TcpStream::connect(gw.public).is_err(),
        "the listener is closed once run_with returned"
    );
}
