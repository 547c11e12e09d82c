//! The Redis store: `lua/decide.lua` (and `lua/lease.lua` for the slots of
//! requests in flight) over the shared connection, one key per subject
//! apart from lease sets (see the script's header), with decisions going
//! through the worker's [`Coalescer`] on a standalone Redis.
//!
//! Each script's contract (keys, arguments, reply) is written once, in
//! `decide` and `lease`; `coalesce` only decides when calls leave.

mod coalesce;
mod decide;
mod lease;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use coalesce::Coalescer;
use decide::{parse_reply, unexpected, BanArgs, DecideCall};

use super::call::{BanParams, DecisionStore, SharedStore, SubjectCall, SubjectReply};
use super::slots::LeaseCall;
use crate::redis_link::{RedisFailure, RedisLink};

/// Decides subjects with one EVALSHA each (or one per batch).
pub struct RedisStore {
    link: Arc<RedisLink>,
    prefix: String,
    /// Escalation settings with their script arguments; a reload replaces them.
    ban: ArcSwap<BanArgs>,
    /// Batches concurrent decisions (standalone Redis with `redis.coalesce`).
    coalescer: Option<Coalescer>,
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>, ban: BanParams) -> RedisStore {
        let prefix = link.config().key_prefix.clone();
        let coalescer =
            (link.config().coalesce && !link.is_cluster()).then(|| Coalescer::new(link.clone()));
        RedisStore {
            link,
            prefix,
            ban: ArcSwap::from_pointee(BanArgs::new(ban)),
            coalescer,
        }
    }

    async fn call(&self, call: &SubjectCall<'_>) -> Result<SubjectReply, RedisFailure> {
        let rendered = DecideCall::render(&self.prefix, call, &self.ban.load());
        let value = match &self.coalescer {
            Some(c) => c.decide(rendered).await?,
            None => {
                rendered
                    .send(&self.link, self.link.config().timeout)
                    .await?
            }
        };
        parse_reply(&value).ok_or_else(|| unexpected("decide.lua returned an unexpected reply"))
    }
}

impl DecisionStore for RedisStore {
    fn decide(
        &self,
        call: &SubjectCall<'_>,
    ) -> impl std::future::Future<Output = Result<SubjectReply, RedisFailure>> {
        self.call(call)
    }

    fn leases(
        &self,
        call: &LeaseCall<'_>,
    ) -> impl std::future::Future<Output = Result<u32, RedisFailure>> {
        lease::send(&self.link, &self.prefix, call)
    }
}

impl SharedStore for RedisStore {
    fn call_timeout(&self) -> Duration {
        self.link.config().timeout
    }

    async fn ping(&self) -> Result<(), RedisFailure> {
        self.link
            .query::<String>(&redis::cmd("PING"))
            .await
            .map(|_| ())
    }

    fn set_ban_params(&self, ban: BanParams) {
        self.ban.store(Arc::new(BanArgs::new(ban)));
    }
}
