//! The integration-test harness: real processes on free loopback ports.
//!
//! Every test starts what it needs itself: `redis-server` (standalone, or a
//! 3-master + 3-replica cluster), a small upstream (actix-web in a thread),
//! and one or more `floodgate` processes built from this crate. Each gets
//! its own ports and key prefix, so tests run in parallel and can kill,
//! freeze or restart their servers.
#![allow(dead_code)]

mod cluster;
mod faults;
mod gateway;
mod http;
mod load;
mod proc;
mod redis;
mod tls;
mod upstream;

// Each test uses only part of the harness: a re-export it leaves unused
// is not a mistake.
#[allow(unused_imports)]
pub use cluster::*;
#[allow(unused_imports)]
pub use faults::*;
#[allow(unused_imports)]
pub use gateway::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use load::*;
#[allow(unused_imports)]
pub use proc::*;
#[allow(unused_imports)]
pub use redis::*;
#[allow(unused_imports)]
pub use tls::*;
#[allow(unused_imports)]
pub use upstream::*;
