//! floodgate: a distributed rate-limiting HTTP gateway.
//!
//! The modules follow a request's path: [`front_door`] runs its phases,
//! [`client_ip`] says who is asking, [`rules`] which limits apply (and
//! [`consumers`] which plan an API key has),
//! [`limiter`] decides (Redis or in-process), [`bans`] keeps every node's
//! view of bans and the allowlist, [`proxy`] forwards allowed traffic, and
//! [`responses`] is everything the gateway answers by itself. [`admin`]
//! serves operators, [`reload`] applies a changed config file to the running
//! gateway, [`tls`] serves HTTPS, and [`server`] wires them into listeners.
//! [`dashboard`] is the operators' page on the admin listener and [`cli`]
//! the `floodgate admin` command line. [`replay`] decides recorded traffic
//! (access logs, among them [`access_log`]'s) with a candidate
//! configuration.

#![warn(unreachable_pub)]

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod bans;
pub(crate) mod blocklists;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod consumers;
pub(crate) mod crowdsec;
pub(crate) mod dashboard;
pub(crate) mod front_door;
pub(crate) mod gateway;
pub(crate) mod identity;
pub(crate) mod in_flight;
pub(crate) mod keys;
pub mod limiter;
pub mod log_throttle;
pub mod metrics;
pub mod path_match;
pub mod policy;
pub(crate) mod proxy;
pub(crate) mod proxy_protocol;
pub mod redis_link;
pub mod reload;
pub mod replay;
pub(crate) mod responses;
pub mod rules;
pub(crate) mod screening;
pub(crate) mod send_timeout;
pub mod server;
pub(crate) mod tls;
pub(crate) mod upload;
pub(crate) mod upstreams;
