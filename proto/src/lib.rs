//! inagg-proto: the whole aggregation protocol of inagg, and no networking code.
//!
//! This crate never opens a socket and never reads a clock: every entry point takes
//! the current time as an argument, and every datagram goes in and out through
//! buffers the caller owns. The same state machines run behind UDP, QUIC and the
//! deterministic simulator in [`sim`]. It holds no `unsafe` code: the SIMD kernels
//! live in `inagg-codec`, re-exported here as [`codec`].
//!
//! # Layout
//!
//! - [`wire`]: every message, encoded and decoded (validating, never panicking).
//! - [`codec`] (the `inagg-codec` crate): how `f32` gradients become wire bytes and
//!   how the aggregator sums them (`f32`, block-scaled fixed point `i32`, ...).
//! - [`aggregator`]: the aggregator: jobs, slot pools of two versions per slot, the
//!   control plane (join, grant, heartbeat, leave, abort), and slot memory as a budget
//!   shared in max-min fair shares, pools re-granted at allreduce boundaries.
//! - [`worker`]: one rank: joining, heartbeats, and an allreduce with a sliding
//!   window, exponent lookahead and retransmission.
//! - [`fuzzing`]: harnesses that feed arbitrary bytes to the decoder and the
//!   aggregator (cargo-fuzz targets and CI property tests).
//! - [`sim`]: one aggregator and many workers on a virtual clock, with seeded loss,
//!   duplication, reordering and delay.
//!
//! # Example
//!
//! Two ranks sum their tensors through the simulator:
//!
//! ```
//! use inagg_proto::codec::CodecId;
//! use inagg_proto::sim::{Sim, SimConfig};
//! use inagg_proto::worker::WorkerConfig;
//!
//! let workers = (0..2).map(|r| WorkerConfig::new(7, r, 2, CodecId::I32)).collect();
//! let mut sim = Sim::new(SimConfig::lossy(42), Default::default(), workers);
//! let out = sim.allreduce(vec![vec![1.0, 2.0, 3.0], vec![0.5, 0.25, -3.0]]).unwrap();
//! assert_eq!(out[0], vec![1.5, 2.25, 0.0]);
//! assert_eq!(out[0], out[1]);
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod aggregator;
pub use inagg_codec as codec;
pub mod fuzzing;
pub mod sim;
pub mod wire;
pub mod worker;
