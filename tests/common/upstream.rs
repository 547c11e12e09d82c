//! Upstreams for the gateway to forward to: an actix-web echo server in a
//! thread of its own, a raw socket that answers with canned bytes, and the
//! helpers that run any test server in its own thread and System.

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::proc::free_port;

/// A small upstream: echoes requests, streams bytes, counts what it served.
pub struct Upstream {
    pub port: u16,
    pub hits: Arc<AtomicU64>,
    stop: Option<actix_web::dev::ServerHandle>,
}

impl Upstream {
    pub fn start() -> Upstream {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Upstream {
        Self::start_with(port, None)
    }

    /// An upstream that closes idle keep-alive connections after `idle`.
    pub fn start_keep_alive(idle: Duration) -> Upstream {
        Self::start_with(free_port(), Some(idle))
    }

    fn start_with(port: u16, keep_alive: Option<Duration>) -> Upstream {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        use futures_util::StreamExt;
        let hits = Arc::new(AtomicU64::new(0));
        let h2 = hits.clone();
        let (handle, _) = serve_in_thread!(port, move || {
            HttpServer::new(move || {
                let h = h2.clone();
                App::new()
                        .app_data(web::Data::new(h))
                        .app_data(web::PayloadConfig::new(usize::MAX))
                        .route(
                            "/status/{code}",
                            web::to(|p: web::Path<u16>| async move {
                                HttpResponse::build(
                                    actix_web::http::StatusCode::from_u16(p.into_inner()).unwrap(),
                                )
                                .body("status")
                            }),
                        )
                        .route(
                            // `n` bytes with a Content-Length (the gateway
                            // may read such an answer whole).
                            "/sized/{n}",
                            web::to(|p: web::Path<usize>| async move {
                                HttpResponse::Ok().body(vec![b'y'; p.into_inner()])
                            }),
                        )
                        .route(
                            "/bytes/{n}",
                            web::to(|p: web::Path<usize>| async move {
                                let n = p.into_inner();
                                let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
                                let stream = futures_util::stream::unfold(n, move |left| {
                                    let chunk = chunk.clone();
                                    async move {
                                        if left == 0 {
                                            return None;
                                        }
                                        let take = left.min(chunk.len());
                                        Some((
                                            Ok::<_, std::io::Error>(chunk.slice(..take)),
                                            left - take,
                                        ))
                                    }
                                });
                                HttpResponse::Ok().streaming(stream)
                            }),
                        )
                        .route(
                            "/upload",
                            web::to(|mut body: web::Payload| async move {
                                let mut n = 0usize;
                                while let Some(chunk) = body.next().await {
                                    match chunk {
                                        Ok(c) => n += c.len(),
                                        Err(_) => break,
                                    }
                                }
                                HttpResponse::Ok().json(serde_json::json!({"received": n}))
                            }),
                        )
                        .route(
                            "/slow/{ms}",
                            web::to(|p: web::Path<u64>| async move {
                                actix_web::rt::time::sleep(Duration::from_millis(p.into_inner()))
                                    .await;
                                HttpResponse::Ok().body("slow")
                            }),
                        )
                        .default_service(web::to(
                            |req: HttpRequest,
                             body: web::Bytes,
                             hits: web::Data<Arc<AtomicU64>>| async move {
                                hits.fetch_add(1, Ordering::Relaxed);
                                let headers: Vec<(String, String)> = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        )
                                    })
                                    .collect();
                                HttpResponse::Ok()
                                    .insert_header(("x-upstream", "yes"))
                                    .append_header(("set-cookie", "a=1"))
                                    .append_header(("set-cookie", "b=2"))
                                    .insert_header(("connection", "close, x-hop"))
                                    .insert_header(("x-hop", "must-not-pass"))
                                    .insert_header(("keep-alive", "timeout=5"))
                                    .json(serde_json::json!({
                                        "method": req.method().as_str(),
                                        "path": req.path(),
                                        "query": req.query_string(),
                                        "headers": headers,
                                        "body_len": body.len(),
                                    }))
                            },
                        ))
            })
            .keep_alive(keep_alive.map_or(
                actix_web::http::KeepAlive::default(),
                actix_web::http::KeepAlive::Timeout,
            ))
        });
        Upstream {
            port,
            hits,
            stop: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(h) = self.stop.take() {
            let _ = futures_util::FutureExt::now_or_never(h.stop(false));
        }
    }
}

/// Runs a server in a thread of its own (its own System, as actix needs:
/// `make` runs inside it). Returns its handle, to stop it, and the thread,
/// to wait for it. Use it through [`serve_in_thread!`].
pub fn run_in_thread(
    make: impl FnOnce() -> actix_web::dev::Server + Send + 'static,
) -> (actix_web::dev::ServerHandle, thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let join = thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = make();
            let _ = tx.send(server.handle());
            let _ = server.await;
        });
    });
    let handle = rx.recv().expect("the test server starts");
    (handle, join)
}

/// Serves the `HttpServer` that `$make` builds on `127.0.0.1:$port`, with
/// two workers and no signal handling, in a thread of its own; evaluates to
/// `(ServerHandle, JoinHandle<()>)`. A macro because `HttpServer`'s bounds
/// name types actix-web does not re-export.
macro_rules! serve_in_thread {
    ($port:expr, $make:expr) => {{
        let (port, make) = ($port, $make);
        $crate::common::run_in_thread(move || {
            make()
                .workers(2)
                .disable_signals()
                .bind(("127.0.0.1", port))
                .expect("the test server binds its port")
                .run()
        })
    }};
}
pub(crate) use serve_in_thread;

/// An upstream that answers every connection with `response` verbatim.
pub fn canned_upstream(response: &'static str) -> u16 {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
                let _ = s.write_all(response.as_bytes());
            });
        }
    });
    port
}
