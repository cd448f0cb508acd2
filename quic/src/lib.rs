//! inagg-quic: the QUIC transport, on quinn-proto with rustls (ring). It carries the same
//! protocol messages the UDP transport carries, so the protocol state machines and the
//! driver loops stay the same; QUIC adds encryption (the job secret in the join never
//! crosses the network in clear), authentication of the aggregator, and its own
//! congestion control underneath inagg's.
//!
//! - [`tls`]: the aggregator's self-signed certificate (generated once, kept in a
//!   file) and how a worker trusts it: the certificate as its only root (`--ca`) or
//!   its SHA-256 fingerprint (`--fingerprint`). No mode skips verification.
//! - [`QuicLink`]: a worker's connection to its aggregator.
//! - [`QuicListener`]: the aggregator's side: accepts connections and hands every
//!   message to the caller's loop with the peer's address, as a UDP socket would.
//!
//! Both implement `inagg_net::Transport`, the seam the server and driver loops run
//! over, and both are sans-IO underneath, as the rest of inagg is: quinn-proto's
//! endpoint and connection state machines, fed and polled by one driver
//! (`driver.rs`) on the caller's thread from an `inagg_net::UdpEndpoint` (GRO
//! receives, GSO sends). No async runtime and no channels.
//!
//! Two framings, chosen by the worker ([`Mode`]), served side by side: QUIC datagrams
//! (unreliable, one protocol message each, limited to the path MTU: the worker sizes
//! its chunks to fit [`MIN_DATAGRAM`]) and one bidirectional stream per connection (reliable and
//! ordered, each message prefixed with its length, any chunk size). Streams are the
//! default: they carry inagg's default chunks, fewer messages that QUIC packs into
//! full packets, and so beat datagrams, which are held to about 1.1 KB per message by
//! the initial path MTU (docs/performance.md, "QUIC streams and datagrams").

#![warn(missing_docs)]

pub mod tls;

mod client;
mod driver;
mod frames;
mod server;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use client::{ClientOptions, QuicLink};
pub use server::{ListenerStats, QuicListener};
pub use tls::{Identity, Trust, DEFAULT_SERVER_NAME};

use thiserror::Error;

/// How protocol messages travel inside the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One reliable, ordered bidirectional stream; messages framed by length.
    #[default]
    Stream,
    /// One QUIC datagram per message: unreliable, like UDP, at most the path's
    /// datagram size.
    Datagram,
}

impl Mode {
    /// The mode's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Datagram => "datagram",
        }
    }

    /// Parses `stream` or `datagram`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stream" => Some(Mode::Stream),
            "datagram" => Some(Mode::Datagram),
            _ => None,
        }
    }
}

/// Why a QUIC operation failed.
#[derive(Debug, Error)]
pub enum Error {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot read {path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Only one of the certificate and key files exists.
    #[error("{present} exists but {missing} does not: refusing to generate a new identity over half of an old one")]
    HalfIdentity {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// rcgen failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    /// Not a SHA-256 fingerprint.
    #[error("not a SHA-256 fingerprint (64 hex digits): {0:?}")]
    BadFingerprint(String),
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A socket or runtime failed.
    #[error("QUIC I/O")]
    Io(#[from] std::io::Error),
    /// The connection could not be opened.
    #[error("cannot connect to the aggregator at {addr} over QUIC: {detail}")]
    Connect {
        /// The aggregator.
        addr: SocketAddr,
        /// Why, from quinn and rustls (a wrong fingerprint or CA shows here).
        detail: String,
    },
    /// The handshake did not finish in time.
    #[error("no QUIC handshake with the aggregator at {addr} within {timeout:?}")]
    ConnectTimeout {
        /// The aggregator.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The connection ended.
    #[error("QUIC connection to the aggregator closed: {0}")]
    Closed(String),
    /// A message does not fit in one QUIC datagram on this path.
    #[error(
        "a {size}-byte message does not fit in a QUIC datagram of at most {max} bytes on this path"
    )]
    TooLarge {
        /// The message.
        size: usize,
        /// The path's limit.
        max: usize,
    },
}

/// A QUIC datagram this long always fits: QUIC requires paths to carry 1200-byte
/// packets, and quinn's packet and frame headers plus the 16-byte tag take under 100.
pub const MIN_DATAGRAM: usize = 1100;

/// The largest UDP payload path MTU discovery tries. Loopback could take far more, but
/// quinn sends up to 10 packets per GSO call and the kernel refuses more than 64 KB in
/// one call, so jumbo packets made throughput collapse; this ceiling is where a probe
/// found throughput best (docs/performance.md, "QUIC streams and datagrams"). Real
/// links stop discovery at their MTU anyway.
pub(crate) const MTU_CEILING: u16 = 6000;

/// quinn's transport settings for inagg, both ends: buffers sized for a window of
/// chunks in flight, keep-alives, idle timeout, path MTU discovery up to
/// [`MTU_CEILING`].
pub(crate) fn transport_config() -> Arc<quinn_proto::TransportConfig> {
    let mut t = quinn_proto::TransportConfig::default();
    t.max_idle_timeout(quinn_proto::IdleTimeout::try_from(Duration::from_secs(10)).ok());
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    // A window of 1024 slots of 4 KiB chunks is 4 MiB in flight per direction; quinn
    // drops the oldest queued datagram when its buffer is full, so leave room.
    t.datagram_receive_buffer_size(Some(16 << 20));
    t.datagram_send_buffer_size(16 << 20);
    t.stream_receive_window(quinn_proto::VarInt::from_u32(16 << 20));
    t.receive_window(quinn_proto::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    let mut mtu = quinn_proto::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_CEILING);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}
