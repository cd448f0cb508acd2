//! inagg-aggregator: the aggregator server. It drives the protocol state machine of
//! `inagg_proto::aggregator` from a UDP socket (batched receive, batched send) or a
//! QUIC endpoint, with timers and a clean shutdown that tells every rank.
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

mod memory;
mod server;

pub use memory::return_freed_pools;

pub use inagg_proto::aggregator::{AggregatorConfig, DropReason, Stats};
pub use inagg_quic::Identity;
pub use server::{
    Front, QuicFront, Server, ServerConfig, ServerError, UdpFront, DEFAULT_MAX_JOB_MEMORY,
    DEFAULT_SLOT_MEMORY, DEFAULT_YIELDS_BEFORE_SLEEP,
};
