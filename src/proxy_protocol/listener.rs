//! The public listener with the PROXY step in front of HTTP: each accepted
//! connection has its header read ([`super::accept`]), then goes through
//! TLS (when `[server.tls]` is set) and into actix-web's HTTP service with
//! the header's client as its peer address, where `HttpRequest::peer_addr`
//! finds it.
//!
//! actix-web's `HttpServer` hands accepted sockets straight to TLS or
//! HTTP, with no step in between and no way to name the peer, so this
//! builds the same server from its parts (`actix_server` accepting,
//! `actix_tls`'s rustls acceptor, `actix_http`'s service), with the same
//! settings `HttpServer` gives them: keep-alive, request and disconnect
//! timeouts, half-closed connections, the write buffer, the connection
//! callback, the TLS handshake timeout, ALPN (`h2`, `http/1.1`) and the
//! graceful shutdown of HTTP/2 connections.

use std::any::Any;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, Protocol};
use actix_service::{
    fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory,
    ServiceFactoryExt,
};
use actix_tls::accept::rustls_0_23::{Acceptor, TlsStream};
use actix_web::body::BoxBody;
use actix_web::dev::{AppConfig, Extensions, Server};
use actix_web::rt::net::TcpStream;
use actix_web::App;

use super::{accept, Arrival, Outcomes};

/// What the public listener is built with, the settings `HttpServer` would
/// otherwise take.
pub(crate) struct PublicListener<A, T, C> {
    pub(crate) listener: TcpListener,
    /// Builds one worker's application.
    pub(crate) app: A,
    /// Whether a peer is a trusted proxy, asked per connection (the
    /// current configuration's `client_ip.trusted_proxies`).
    pub(crate) trusted: T,
    /// The callback run on each connection before HTTP (socket options).
    pub(crate) on_connect: C,
    pub(crate) tls: Option<rustls::ServerConfig>,
    pub(crate) workers: usize,
    pub(crate) max_connections: usize,
    pub(crate) write_buffer: usize,
    pub(crate) shutdown_timeout: u64,
}

/// The timeouts `HttpServer` gives connections by default.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves the public listener, PROXY headers first; runs like
/// `HttpServer::run`.
pub(crate) fn serve<A, E, T, C>(public: PublicListener<A, T, C>) -> std::io::Result<Server>
where
    A: Fn() -> App<E> + Send + Clone + 'static,
    E: ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse<BoxBody>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    T: Fn(IpAddr) -> bool + Send + Clone + 'static,
    C: Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static,
{
    let PublicListener {
        listener,
        app,
        trusted,
        on_connect,
        tls,
        workers,
        max_connections,
        write_buffer,
        shutdown_timeout,
    } = public;
    let addr = listener.local_addr()?;
    let on_connect = Arc::new(on_connect);
    let tls = tls.map(|mut config| {
        let mut protos = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        protos.extend_from_slice(&config.alpn_protocols);
        config.alpn_protocols = protos;
        Arc::new(config)
    });
    let builder = actix_server::Server::build()
        .workers(workers)
        .max_concurrent_connections(max_connections)
        .shutdown_timeout(shutdown_timeout)
        .disable_signals();
    let shutdown = builder.graceful_shutdown_signal();
    let outcomes = Outcomes::resolve();
    let server = builder.listen("floodgate-public", listener, move || {
        let settings = Settings {
            app: app.clone(),
            on_connect: on_connect.clone(),
            shutdown: shutdown.clone(),
            write_buffer,
            addr,
        };
        let (trusted, outcomes) = (trusted.clone(), outcomes.clone());
        let tls = tls.clone();
        fn_factory(move || {
            let plain = settings.http::<TcpStream>(false).new_service(());
            let secure = tls.as_ref().map(|config| {
                let acceptor = Acceptor::new((**config).clone());
                let http = settings.http::<TlsStream<TcpStream>>(true).new_service(());
                (acceptor, http)
            });
            let (trusted, outcomes) = (trusted.clone(), outcomes.clone());
            async move {
                let plain = Rc::new(plain.await?);
                let secure = match secure {
                    Some((acceptor, http)) => {
                        let acceptor =
                            ServiceFactory::<TcpStream>::new_service(&acceptor, ()).await?;
                        Some(Rc::new((acceptor, http.await?)))
                    }
                    None => None,
                };
                Ok::<_, ()>(fn_service(move |tcp: TcpStream| {
                    let (plain, secure) = (plain.clone(), secure.clone());
                    let (trusted, outcomes) = (trusted.clone(), outcomes.clone());
                    async move {
                        let Some((tcp, client)) = proxied(tcp, &trusted, &outcomes).await else {
                            return Ok(());
                        };
                        match secure.as_deref() {
                            None => plain.call((tcp, Protocol::Http1, client)).await,
                            Some((acceptor, http)) => {
                                let Ok(io) = acceptor.call(tcp).await else {
                                    return Ok(());
                                };
                                let proto = match io.get_ref().1.alpn_protocol() {
                                    Some(p) if p.windows(2).any(|w| w == b"h2") => Protocol::Http2,
                                    _ => Protocol::Http1,
                                };
                                http.call((io, proto, client)).await
                            }
                        }
                        .map_err(|e| log::debug!("client connection ended with an error: {e}"))
                    }
                }))
            }
        })
    })?;
    Ok(server.run())
}

/// The connection's header read: the stream, left at its first byte of TLS
/// or HTTP, and the client address the rest of the gateway sees; `None`
/// when the connection was refused (and closed by being dropped).
async fn proxied(
    mut tcp: TcpStream,
    trusted: &impl Fn(IpAddr) -> bool,
    outcomes: &Outcomes,
) -> Option<(TcpStream, Option<SocketAddr>)> {
    let peer = tcp.peer_addr().ok()?;
    match accept(&mut tcp, peer.ip(), trusted(peer.ip()), outcomes).await {
        Ok(Arrival::Named(client)) => Some((tcp, Some(client))),
        Ok(Arrival::Unnamed | Arrival::Direct) => Some((tcp, Some(peer))),
        // A connection that ended before saying anything (a balancer's
        // TCP health check) is not worth a warning.
        Err(refusal @ super::Refusal::Io { .. }) => {
            log::debug!("connection closed: {refusal}");
            None
        }
        Err(refusal) => {
            log::warn!("connection closed: {refusal}");
            None
        }
    }
}

/// One worker's HTTP settings, for either kind of stream.
struct Settings<A, C> {
    app: A,
    on_connect: C,
    shutdown: actix_server::GracefulShutdownSignal,
    write_buffer: usize,
    addr: SocketAddr,
}

impl<A, E, C> Settings<A, Arc<C>>
where
    A: Fn() -> App<E> + Clone + 'static,
    E: ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse<BoxBody>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    C: Fn(&dyn Any, &mut Extensions) + 'static + ?Sized,
{
    /// actix-web's HTTP service over `Io`, as `HttpServer` builds it.
    fn http<Io>(
        &self,
        secure: bool,
    ) -> impl ServiceFactory<
        (Io, Protocol, Option<SocketAddr>),
        Config = (),
        Response = (),
        Error = actix_http::error::DispatchError,
        InitError = (),
    >
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    {
        let shutdown = self.shutdown.clone();
        let on_connect = self.on_connect.clone();
        let addr = self.addr;
        let app = (self.app)()
            .into_factory()
            .map_err(|err| err.error_response());
        HttpService::<Io, _, _, _, _>::build()
            .graceful_shutdown_signal(move || {
                let signal = shutdown.clone();
                async move { signal.notified().await }
            })
            .keep_alive(actix_http::KeepAlive::default())
            .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
            .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
            .h1_allow_half_closed(true)
            .local_addr(addr)
            .h1_write_buffer_size(self.write_buffer)
            .on_connect_ext(move |io: &Io, ext: &mut Extensions| on_connect(io as &dyn Any, ext))
            .finish(map_config(app, move |_| {
                // The configuration `HttpServer` gives its application;
                // `secure` is what the forwarded X-Forwarded-Proto says.
                AppConfig::__priv_test_new(secure, addr.to_string(), addr)
            }))
    }
}
