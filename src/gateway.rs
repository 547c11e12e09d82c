//! The gateway's shared state: what every worker reads to serve a request.
//!
//! [`Gateway`] holds the parts that live as long as the process (the
//! limiter, the bans, the consumer table, the metric handles) and the
//! current [`Snapshot`] of everything a reload can change, behind one
//! atomic pointer. [`UpstreamClients`] are a worker's own connections to
//! the upstream pools. The front door reads all of this; the admin API and
//! reload change it; none of it is request logic, so it lives apart from
//! the phases that use it.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::http::StatusCode;
use arc_swap::ArcSwap;

use crate::access_log::AccessLog;
use crate::bans::{Bans, Breadth};
use crate::blocklists::Blocklists;
use crate::client_ip::ClientIpResolver;
use crate::config::Config;
use crate::consumers::{ConsumerTable, Plans};
use crate::crowdsec::Crowdsec;
use crate::identity::Identity;
use crate::limiter::Limiter;
use crate::metrics::GatewayMetrics;
use crate::proxy::{AnswerLimits, Upstream};
use crate::rules::RuleSet;
use crate::screening::HeaderLimits;
use crate::upload::BodyLimits;
use crate::upstreams::{Pool, PoolSet};

/// The parts of the configuration a reload replaces, as one immutable
/// value: a request reads it once, at its start.
pub(crate) struct Snapshot {
    pub(crate) resolver: ClientIpResolver,
    pub(crate) rules: RuleSet,
    pub(crate) ban_status: StatusCode,
    /// `[upstream]`, `[upstreams.*]` and `[[routes]]`. A pool whose settings
    /// a reload left alone is the same `Arc`, so the workers keep their
    /// connections to it; every URL keeps its health state.
    pub(crate) pools: PoolSet,
    /// `[consumers]` and `[plans.*]`, compiled (`None`: no consumers).
    pub(crate) plans: Option<Plans>,
    /// Phase 0's limits on request headers.
    pub(crate) header_limits: HeaderLimits,
    /// How wide a network an operator may ban or allowlist without `force`.
    pub(crate) breadth: Breadth,
}

impl Snapshot {
    /// Compiles `config`; `previous` lends its pools (and their health)
    /// where they stay.
    pub(crate) fn new(config: &Config, previous: Option<&Snapshot>) -> Snapshot {
        let pools = PoolSet::compile(config, previous.map(|p| &p.pools));
        let rules = RuleSet::compile(&config.rules);
        let plans = Plans::compile(config, &rules);
        Snapshot {
            resolver: ClientIpResolver::new(
                config.client_ip.trusted_proxies.clone(),
                config.client_ip.ipv6_prefix,
            ),
            rules,
            ban_status: StatusCode::from_u16(config.ban.status)
                .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            pools,
            plans,
            header_limits: HeaderLimits {
                max_headers: config.server.max_headers,
                max_header_bytes: config.server.max_header_bytes,
            },
            breadth: Breadth {
                min_prefix_v4: config.ban.min_prefix_v4,
                min_prefix_v6: config.ban.min_prefix_v6,
            },
        }
    }
}

/// What parties other than the gateway say about a client: the blocklist
/// files, the issuers of bearer tokens, CrowdSec's decisions.
pub(crate) struct Vouchers {
    pub(crate) blocklists: Arc<Blocklists>,
    pub(crate) identity: Arc<Identity>,
    pub(crate) crowdsec: Arc<Crowdsec>,
}

/// Everything the front door needs, shared by all workers.
pub(crate) struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// The runtime plan assignments, cached on this node.
    pub(crate) consumers: Arc<ConsumerTable>,
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) bans: Arc<Bans>,
    /// `[[blocklists]]`, kept fresh by their own thread.
    pub(crate) blocklists: Arc<Blocklists>,
    /// `[jwt]`: the bearer token's verifier.
    pub(crate) identity: Arc<Identity>,
    /// `[crowdsec]`: the decisions this node enforces as a bouncer.
    pub(crate) crowdsec: Arc<Crowdsec>,
    pub(crate) metrics: GatewayMetrics,
    /// `server.access_log`, when set.
    pub(crate) access_log: Option<Arc<AccessLog>>,
}

impl Gateway {
    pub(crate) fn new(
        snapshot: Snapshot,
        consumers: Arc<ConsumerTable>,
        limiter: Arc<Limiter>,
        bans: Arc<Bans>,
        vouchers: Vouchers,
        metrics: GatewayMetrics,
        access_log: Option<Arc<AccessLog>>,
    ) -> Gateway {
        let Vouchers {
            blocklists,
            identity,
            crowdsec,
        } = vouchers;
        Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            consumers,
            limiter,
            bans,
            blocklists,
            identity,
            crowdsec,
            metrics,
            access_log,
        }
    }

    /// The configuration in effect now; requests that start later may see
    /// a newer one.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Puts `next` in effect for every request that starts from now on.
    pub(crate) fn replace_snapshot(&self, next: Snapshot) {
        self.snapshot.store(Arc::new(next));
    }
}

/// One worker's upstream clients (connections are per thread), one per
/// pool, built on a pool's first request and dropped once no snapshot
/// holds that pool any more; requests in flight finish on the client they
/// started with.
pub(crate) struct UpstreamClients {
    current: RefCell<Vec<(Arc<Pool>, Rc<Upstream>)>>,
    /// Set at start-up (`server.client_body_timeout`, `max_body_size`,
    /// `response_buffer`, `send_timeout` need a restart).
    body_limits: BodyLimits,
    response_buffer: usize,
    send_timeout: std::time::Duration,
}

impl UpstreamClients {
    pub(crate) fn new(
        body_limits: BodyLimits,
        response_buffer: usize,
        send_timeout: std::time::Duration,
    ) -> UpstreamClients {
        UpstreamClients {
            current: RefCell::new(Vec::new()),
            body_limits,
            response_buffer,
            send_timeout,
        }
    }

    /// The client for `pool`, built on first use.
    pub(crate) fn for_pool(&self, pool: &Arc<Pool>) -> Rc<Upstream> {
        let mut current = self.current.borrow_mut();
        if let Some((_, up)) = current.iter().find(|(p, _)| Arc::ptr_eq(p, pool)) {
            return up.clone();
        }
        // Pools only this list still holds were replaced by a reload.
        current.retain(|(p, _)| Arc::strong_count(p) > 1);
        let answers = AnswerLimits {
            buffer_response: pool.config.buffer_response,
            max_streaming_per_client: pool.config.streaming_cap(),
            idle: pool.config.timeout,
            piece: self.response_buffer,
            send_timeout: self.send_timeout,
        };
        let up = Rc::new(Upstream::new(&pool.config, self.body_limits, answers));
        current.push((pool.clone(), up.clone()));
        up
    }
}
