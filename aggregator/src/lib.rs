//! inagg-aggregator: the aggregator server that drives `inagg_proto::aggregator` from
//! sockets. The UDP front end arrives with the "real processes over UDP" work; until
//! then the protocol runs in `inagg_proto::sim`.

pub use inagg_proto::aggregator::{Aggregator, AggregatorConfig};
