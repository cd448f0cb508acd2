//! inagg-worker: the client library that drives `inagg_proto::worker` from sockets.
//! The UDP transport arrives with the "real processes over UDP" work; until then the
//! protocol runs in `inagg_proto::sim`.

pub use inagg_proto::worker::{Worker, WorkerConfig};
