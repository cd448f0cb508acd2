//! inagg-aggregator: the aggregator server. It drives the protocol state machine of
//! `inagg_proto::aggregator` from a UDP socket (batched receive, batched send) or a
//! QUIC endpoint, with timers and a clean shutdown that tells every rank;
//! [`ShardedServer`] runs several UDP servers as shards of one aggregator, one per
//! core, and [`run_together`] runs loops side by side (shards and QUIC) so that they
//! stop together.
//!
//! ```no_run
//! use std::sync::{atomic::AtomicBool, Arc};
//! use inagg_aggregator::{Server, ServerConfig};
//!
//! let server = Server::bind(ServerConfig::new("127.0.0.1:0".parse().unwrap())).unwrap();
//! println!("listening on {}", server.local_addr().unwrap());
//! let stop = Arc::new(AtomicBool::new(false));
//! let stats = server.run(&stop).unwrap();
//! println!("{} datagrams", stats.packets_received);
//! ```

#![warn(missing_docs)]

mod memory;
mod server;
mod shards;

pub use memory::return_freed_pools;

pub use inagg_net::mem::{MemFaults, MemNet};
pub use inagg_proto::aggregator::{AggregatorConfig, DropReason, Stats};
pub use inagg_quic::Identity;
pub use server::{
    Front, MemFront, ParentConfig, QuicFront, Server, ServerConfig, ServerError, UdpFront,
    DEFAULT_MAX_JOB_MEMORY, DEFAULT_SLOT_MEMORY, DEFAULT_YIELDS_BEFORE_SLEEP,
};
pub use shards::{run_together, Loop, ShardedServer};
