//! Wiring: the two listeners, start-up, background tasks and graceful
//! shutdown. The per-request logic is [`crate::front_door`]; this module
//! only builds what it needs and serves it.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};

use crate::access_log::{self, AccessLog};
use crate::admin::{self, AdminState};
use crate::bans::{key_tag, BanCache, BanEvent, BanTarget, Bans, Follower};
use crate::config::Config;
use crate::consumers::ConsumerTable;
use crate::front_door;
use crate::gateway::{Gateway, Snapshot, UpstreamClients, Vouchers};
use crate::limiter::{BanParams, Breakers, Limiter, LimiterSettings, LocalStore, RedisStore};
use crate::metrics::GatewayMetrics;
use crate::redis_link::RedisLink;
use crate::reload::{self, ConfigFile, Reloader};
use crate::tls::{self, ServedCertificate};
use crate::upload::BodyLimits;

/// Subjects the in-process store tracks at most (bounded memory).
const LOCAL_MAX_SUBJECTS: usize = 1_000_000;
/// Client connections the public listener holds at most, per worker.
const MAX_CONNECTIONS: usize = 100_000;

fn node_id(config: &Config) -> String {
    config.server.node_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "node".into());
        format!("{host}:{}", std::process::id())
    })
}

/// Runs the gateway until SIGTERM or SIGINT; SIGHUP reloads `file`. The
/// listeners are bound once Redis has been tried and the bans read, so a
/// node takes no connection before it knows who is banned.
pub async fn run(file: ConfigFile) -> std::io::Result<()> {
    let node = Node::start(&file).await;
    let listeners = Listeners::bind(&file.config)?;
    node.serve(&file, listeners, wait_for_stop_signal()).await
}

/// Runs the gateway on listeners bound by the caller until `shutdown`
/// resolves, then stops as on SIGTERM: no new connections, requests in
/// flight finished within `server.shutdown_timeout`. Tests run whole
/// gateways in process this way, on ports they bound themselves.
pub async fn run_with(
    file: ConfigFile,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + 'static,
) -> std::io::Result<()> {
    let node = Node::start(&file).await;
    node.serve(&file, listeners, shutdown).await
}

/// The public and admin listeners, bound.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `server.listen` and `server.admin_listen` as the gateway does
    /// itself (address reuse, a backlog of 4096).
    pub(crate) fn bind(config: &Config) -> std::io::Result<Listeners> {
        let bind = |addr: SocketAddr, key: &str| {
            tcp_listener(addr).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({key}): {e}"))
            })
        };
        Ok(Listeners {
            public: bind(config.server.listen, "server.listen")?,
            admin: bind(config.server.admin_listen, "server.admin_listen")?,
        })
    }
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from(socket))
}

/// A node's parts once started: connected to Redis (or not), bans read.
struct Node {
    prom: Option<metrics_exporter_prometheus::PrometheusHandle>,
    metrics: GatewayMetrics,
    link: Option<Arc<RedisLink>>,
    local: Arc<LocalStore>,
    limiter: Arc<Limiter>,
    bans: Arc<Bans>,
    consumers: Arc<ConsumerTable>,
}

impl Node {
    /// Start-up steps 1 to 3: metrics, the stores, Redis (tried, never
    /// waited for beyond `redis.connect_timeout`), and the bans it holds.
    async fn start(file: &ConfigFile) -> Node {
        let config = &file.config;
        let prom = crate::metrics::install();
        crate::log_throttle::LOG.set_window(config.server.log_throttle);
        let metrics = GatewayMetrics::resolve();
        let params = BanParams::from_config(&config.ban);
        let local = Arc::new(LocalStore::new(
            params,
            LOCAL_MAX_SUBJECTS,
            config.redis.is_some(),
        ));

        let link = config.redis.clone().map(RedisLink::new);
        let mut connected = false;
        if let Some(link) = &link {
            let target = link
                .config()
                .url
                .clone()
                .unwrap_or_else(|| link.config().cluster.join(","));
            match link.connect().await {
            Ok(()) => {
                connected = true;
                log::info!("connected to Redis at {target}");
            }
            Err(e) => log::warn!(
                "Redis at {target} is unreachable ({e}); serving with on_failure = {} until it answers",
                link.config().on_failure
            ),
        }
        } else {
            log::warn!(
                "no [redis] section: limits and bans are kept in this process only, per node"
            );
        }
        let breakers = Arc::new(Breakers::new(
            config
                .redis
                .as_ref()
                .map(|r| r.breaker_failures)
                .unwrap_or(1),
            link.is_some() && !connected,
            metrics.degraded.clone(),
        ));
        if let (Some(link), true) = (&link, connected) {
            if let Err(e) = breakers.refresh(link).await {
                log::warn!("could not read the Redis Cluster slot map at start-up: {e}");
            }
        }
        let redis_store = link.clone().map(|l| RedisStore::new(l, params));
        let settings = LimiterSettings {
            on_failure: config
                .redis
                .as_ref()
                .map(|r| r.on_failure)
                .unwrap_or(crate::config::OnFailure::Local),
            max_decisions_per_second: config
                .redis
                .as_ref()
                .map_or(0, |r| r.max_decisions_per_second),
            lease: config.redis.as_ref().map_or(Duration::ZERO, |r| r.lease),
        };
        let limiter = Arc::new(Limiter::new(
            redis_store,
            local.clone(),
            breakers.clone(),
            settings,
            params,
            metrics.clone(),
        ));
        let cache = Arc::new(BanCache::new(
            config.allowlist.clone(),
            metrics.bans_active.clone(),
        ));
        let prefix = config
            .redis
            .as_ref()
            .map(|r| r.key_prefix.clone())
            .unwrap_or_default();
        let consumers = Arc::new(ConsumerTable::new(
            link.clone(),
            prefix.clone(),
            config.plans.keys().cloned().collect(),
        ));
        let bans = Arc::new(Bans::new(
            cache,
            link.clone(),
            local.clone(),
            prefix,
            params,
            node_id(config),
            config.ban.audit_max_len,
            config.client_ip.ipv6_prefix,
        ));
        bans.follow_with(consumers.clone());
        bans.follow_with(Arc::new(LeasesFollowEvents {
            limiter: limiter.clone(),
            ipv6_prefix: config.client_ip.ipv6_prefix,
        }));
        if connected {
            if let Err(e) = bans.reconcile().await {
                log::warn!("could not read bans from Redis at start-up: {e}");
            }
        }
        Node {
            prom,
            metrics,
            link,
            local,
            limiter,
            bans,
            consumers,
        }
    }

    /// Start-up step 4 and the life of the node: serves `listeners` until
    /// `shutdown` resolves.
    async fn serve(
        self,
        file: &ConfigFile,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + 'static,
    ) -> std::io::Result<()> {
        let Node {
            prom,
            metrics,
            link,
            local,
            limiter,
            bans,
            consumers,
        } = self;
        let config = &file.config;
        let public_addr = listeners.public.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let access_log = match config.server.access_log.as_deref() {
            Some(setting) => Some(Arc::new(AccessLog::start(&access_log::Target::resolve(
                &file.path, setting,
            ))?)),
            None => None,
        };
        let gateway = web::Data::new(Gateway::new(
            Snapshot::new(config, None),
            consumers,
            limiter.clone(),
            bans.clone(),
            Vouchers {
                blocklists: crate::blocklists::Blocklists::start(&file.path, &config.blocklists),
                identity: crate::identity::Identity::start(&file.path, config.jwt.as_ref()),
                crowdsec: crate::crowdsec::Crowdsec::start(config.crowdsec.as_ref()),
            },
            metrics,
            access_log,
        ));
        let served = file
            .certificate
            .clone()
            .map(|c| Arc::new(ServedCertificate::new(c)));
        let reloader = Arc::new(Reloader::new(file, gateway.clone(), served.clone()));
        reload::reload_on_hangup(reloader.clone());

        spawn_background(
            config,
            link.clone(),
            limiter.clone(),
            bans.clone(),
            local.clone(),
            prom.clone(),
        );

        let response_buffer = config.server.response_buffer;
        let send_timeout = config.server.send_timeout;
        crate::proxy::set_buffer_total(config.server.response_buffer_total);
        let body_limits = BodyLimits {
            idle: config.server.client_body_timeout,
            max_size: config.server.max_body_size,
        };
        let workers = if config.server.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            config.server.workers
        };
        let app = {
            let gateway = gateway.clone();
            move || {
                App::new()
                    .app_data(gateway.clone())
                    .app_data(web::Data::new(UpstreamClients::new(
                        body_limits,
                        response_buffer,
                        send_timeout,
                    )))
                    .default_service(web::to(front_door::front_door))
            }
        };
        let shutdown_timeout = config.server.shutdown_timeout.as_secs().max(1);
        let tls_config = match &served {
            Some(served) => Some(tls::server_config(served.clone())?),
            None => None,
        };
        let public = if config.server.proxy_protocol {
            let gateway = gateway.clone();
            crate::proxy_protocol::serve(crate::proxy_protocol::PublicListener {
                listener: listeners.public,
                app,
                trusted: move |peer| gateway.snapshot().resolver.is_trusted(peer),
                on_connect: crate::send_timeout::on_connect(send_timeout),
                tls: tls_config,
                workers,
                max_connections: MAX_CONNECTIONS,
                write_buffer: response_buffer,
                shutdown_timeout,
            })?
        } else {
            let public = HttpServer::new(app)
                .workers(workers)
                .max_connections(MAX_CONNECTIONS)
                .h1_write_buffer_size(response_buffer)
                .on_connect(crate::send_timeout::on_connect(send_timeout))
                .shutdown_timeout(shutdown_timeout)
                .disable_signals();
            match tls_config {
                Some(tls_config) => public.listen_rustls_0_23(listeners.public, tls_config),
                None => public.listen(listeners.public),
            }?
            .run()
        };

        if !admin_addr.ip().is_loopback() {
            log::warn!(
                "the admin API listens on {admin_addr}, not on loopback: keep it behind a firewall"
            );
        }
        let admin_state = web::Data::new(AdminState::new(config, gateway.clone(), prom, reloader));
        let admin_server = HttpServer::new(move || {
            App::new()
                .app_data(admin_state.clone())
                .configure(admin::routes)
        })
        .workers(1)
        .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1))
        .disable_signals()
        .listen(listeners.admin)?
        .run();

        let (public_handle, admin_handle) = (public.handle(), admin_server.handle());
        actix_web::rt::spawn(async move {
            shutdown.await;
            log::info!("stopping: no new connections; finishing requests in flight");
            let _ =
                futures_util::future::join(public_handle.stop(true), admin_handle.stop(true)).await;
        });
        log::info!(
            "floodgate {} listening on {} ({}; admin on {})",
            env!("CARGO_PKG_VERSION"),
            public_addr,
            if served.is_some() {
                "HTTPS, HTTP/2 and HTTP/1.1"
            } else {
                "HTTP/1.1"
            },
            admin_addr
        );
        let (a, b) = futures_util::future::join(public, admin_server).await;
        a?;
        b?;
        log::info!("stopped");
        Ok(())
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The tasks that keep a node's view fresh: Redis probing and recovery, ban
/// events, periodic reconcile, local-store sweeping, metric upkeep.
fn spawn_background(
    config: &Config,
    link: Option<Arc<RedisLink>>,
    limiter: Arc<Limiter>,
    bans: Arc<Bans>,
    local: Arc<LocalStore>,
    prom: Option<metrics_exporter_prometheus::PrometheusHandle>,
) {
    let sweeper = limiter.clone();
    if let Some(every) = limiter.lease_sweep_every() {
        let limiter = limiter.clone();
        actix_web::rt::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                limiter.return_leases().await;
            }
        });
    }
    if let Some(link) = link {
        let probe_every = link.config().probe_interval;
        {
            let (limiter, bans, link) = (limiter.clone(), bans.clone(), link.clone());
            actix_web::rt::spawn(async move {
                loop {
                    tokio::time::sleep(probe_every).await;
                    if limiter.breakers().probe(&link).await {
                        bans.write_back_local_bans().await;
                        if let Err(e) = bans.reconcile().await {
                            log::warn!("reconcile after Redis came back failed: {e}");
                        }
                    }
                }
            });
        }
        if link.is_cluster() {
            let (limiter, link) = (limiter.clone(), link.clone());
            actix_web::rt::spawn(async move { limiter.breakers().watch(&link).await });
        }
        {
            let (limiter, link) = (limiter.clone(), link.clone());
            actix_web::rt::spawn(async move { limiter.breakers().keep_watch(&link).await });
        }
        actix_web::rt::spawn(
            bans.clone()
                .run_subscriber(config.ban.reconcile_interval * 3),
        );
        let every = config.ban.reconcile_interval;
        let b = bans.clone();
        actix_web::rt::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if limiter.breakers().is_closed() {
                    b.write_back_local_bans().await;
                    b.heartbeat().await;
                    if let Err(e) = b.reconcile().await {
                        log::debug!("periodic reconcile failed: {e}");
                    }
                }
            }
        });
    }
    let b = bans;
    actix_web::rt::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            local.sweep();
            sweeper.deny_cache().purge(std::time::Instant::now());
            b.cache().purge();
            if let Some(p) = &prom {
                p.run_upkeep();
            }
        }
    });
}

/// Ends a subject's leased tokens when the fleet hears of a ban, an unban
/// or a plan change of it (the ban cache and the consumer table take those
/// events the same way): a lease is never used across such a change.
struct LeasesFollowEvents {
    limiter: Arc<Limiter>,
    ipv6_prefix: u8,
}

impl Follower for LeasesFollowEvents {
    fn apply(&self, event: &BanEvent) {
        let tag = match event {
            BanEvent::Ban { subject, .. } | BanEvent::Unban { subject } => {
                match BanTarget::parse(subject, self.ipv6_prefix) {
                    Ok(BanTarget::Key(k)) => key_tag(&k),
                    _ => return,
                }
            }
            BanEvent::Consumer { key, .. } => format!("consumer:{key}"),
            _ => return,
        };
        self.limiter.end_leases_of(&tag);
    }

    fn reconcile(
        &self,
        _lost: bool,
    ) -> futures_util::future::LocalBoxFuture<'_, Result<(), crate::redis_link::RedisFailure>> {
        Box::pin(std::future::ready(Ok(())))
    }
}
