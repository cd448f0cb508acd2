//! The aggregator's end: accepts connections and turns them back into what the
//! aggregator's loop knows, messages tagged with the peer's address. A tokio runtime
//! runs quinn and one task per connection (plus one per stream); everything they
//! receive arrives in one bounded channel ([`INBOUND_QUEUE`]), read by the caller's
//! thread, which owns the protocol state machine as it does over UDP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};

use crate::{tls::Identity, Error};

/// Messages drained per receive call before the loop goes on to send.
const RECV_BATCH: usize = 256;

/// Messages received from all connections and not yet taken by the loop, at most
/// (of at most `MAX_FRAME` bytes each: 256 MiB). When the queue is full the connection
/// tasks wait: a stream's reader stops reading, and once quinn's receive window for
/// the stream is full, QUIC's flow control stops its peer; datagrams wait in quinn's
/// receive buffer, which drops the oldest when full. Before the bound, a peer sending
/// faster than the loop could take grew the aggregator's memory without limit.
/// (quinn's own buffers, up to its receive windows per connection, come on top.)
/// Honest ranks have at most their windows of contributions in flight; 4096 is 16
/// batches of the loop's receives, or 32 ranks with 128 slots each.
pub const INBOUND_QUEUE: usize = 4096;

/// What the connection tasks tell the loop.
#[derive(Debug)]
enum Inbound {
    Open(SocketAddr, usize, quinn::Connection),
    Stream(SocketAddr, usize, tokio::sync::mpsc::Sender<Bytes>),
    Data(SocketAddr, Bytes),
    Closed(SocketAddr, usize),
}

/// How to answer one peer: the way it spoke last.
#[derive(Debug)]
struct Peer {
    id: usize,
    conn: quinn::Connection,
    stream: Option<tokio::sync::mpsc::Sender<Bytes>>,
}

/// Counters of the QUIC front end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections accepted (handshake done).
    pub connections: u64,
    /// Handshakes that failed.
    pub failed_handshakes: u64,
    /// Messages for peers without a connection (closed meanwhile), dropped.
    pub unroutable: u64,
    /// Messages that did not fit the peer's datagram size, dropped.
    pub too_large: u64,
    /// Messages dropped because the peer's stream already had a full queue of frames
    /// waiting to be written: it has stopped reading.
    pub queue_full: u64,
}

/// A QUIC endpoint accepting workers.
#[derive(Debug)]
pub struct QuicListener {
    inbound: tokio::sync::mpsc::Receiver<Inbound>,
    peers: HashMap<SocketAddr, Peer>,
    local: SocketAddr,
    /// Receives in a row that stopped at the batch limit.
    full_streak: usize,
    /// Where [`inagg_net::Transport::send`] writes each message.
    pub(crate) buf: Vec<u8>,
    stats: ListenerStats,
    failed: Arc<std::sync::atomic::AtomicU64>,
    endpoint: quinn::Endpoint,
    /// Dropped last: quinn's tasks run on it.
    runtime: tokio::runtime::Runtime,
}

impl QuicListener {
    /// Binds `addr` and starts accepting connections authenticated by `identity`.
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<Self, Error> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_crypto()?)
            .map_err(|e| Error::Generate(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(crate::transport_config());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("inagg-quic")
            .enable_all()
            .build()?;
        let socket = inagg_net::bind_socket(addr, inagg_net::DEFAULT_SOCKET_BUFFER)?;
        let endpoint = {
            let _rt = runtime.enter();
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server),
                socket,
                Arc::new(quinn::TokioRuntime),
            )?
        };
        let local = endpoint.local_addr()?;
        let (tx, inbound) = tokio::sync::mpsc::channel(INBOUND_QUEUE);
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        runtime.spawn(accept(endpoint.clone(), tx, Arc::clone(&failed)));
        Ok(Self {
            inbound,
            peers: HashMap::new(),
            local,
            full_streak: 0,
            buf: Vec::with_capacity(64 * 1024),
            stats: ListenerStats::default(),
            failed,
            endpoint,
            runtime,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The counters.
    pub fn stats(&self) -> ListenerStats {
        let mut s = self.stats.clone();
        s.failed_handshakes = self.failed.load(std::sync::atomic::Ordering::Relaxed);
        s
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.peers.len()
    }

    /// Messages received and waiting for [`recv`](Self::recv): at most
    /// [`INBOUND_QUEUE`].
    pub fn queued(&self) -> usize {
        self.inbound.len()
    }

    /// Whether the last receive stopped at its batch limit: more was waiting.
    pub fn last_batch_full(&self) -> bool {
        self.full_streak > 0
    }

    /// Receives in a row that stopped at the batch limit, since one did not.
    pub fn full_batches(&self) -> usize {
        self.full_streak
    }

    /// Hands every message received to `f` with its peer's address, waiting up to
    /// `timeout` if none is there. Returns how many. Blocks the calling thread (on the
    /// listener's runtime), so it must not be called from within an async runtime.
    pub fn recv(&mut self, timeout: Duration, mut f: impl FnMut(SocketAddr, &[u8])) -> usize {
        let mut n = 0;
        let mut handled = 0;
        let mut wait = !timeout.is_zero();
        while handled < RECV_BATCH {
            let next = if wait {
                wait = false;
                let rx = &mut self.inbound;
                self.runtime
                    .block_on(async { tokio::time::timeout(timeout, rx.recv()).await })
                    .ok()
                    .flatten()
            } else {
                self.inbound.try_recv().ok()
            };
            let Some(m) = next else { break };
            handled += 1;
            match m {
                Inbound::Data(from, d) => {
                    f(from, &d);
                    n += 1;
                }
                Inbound::Open(addr, id, conn) => {
                    self.stats.connections += 1;
                    debug!(%addr, "QUIC connection");
                    self.peers.insert(
                        addr,
                        Peer {
                            id,
                            conn,
                            stream: None,
                        },
                    );
                }
                Inbound::Stream(addr, id, s) => {
                    if let Some(p) = self.peers.get_mut(&addr).filter(|p| p.id == id) {
                        p.stream = Some(s);
                    }
                }
                Inbound::Closed(addr, id) => {
                    if self.peers.get(&addr).is_some_and(|p| p.id == id) {
                        debug!(%addr, "QUIC connection closed");
                        self.peers.remove(&addr);
                    }
                }
            }
        }
        self.full_streak = if handled == RECV_BATCH {
            self.full_streak.saturating_add(1)
        } else {
            0
        };
        n
    }

    /// Sends one message to `to` the way it last spoke: on its stream if it opened
    /// one, as a datagram otherwise. A peer that is gone is counted, not an error: as
    /// over UDP, the protocol notices its silence.
    pub fn send(&mut self, to: SocketAddr, msg: &[u8]) {
        let Some(p) = self.peers.get(&to) else {
            self.stats.unroutable += 1;
            return;
        };
        match &p.stream {
            Some(s) => match s.try_send(crate::frame(msg)) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => self.stats.queue_full += 1,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    self.stats.unroutable += 1
                }
            },
            None => match p.conn.send_datagram(Bytes::copy_from_slice(msg)) {
                Ok(()) => {}
                Err(quinn::SendDatagramError::TooLarge) => {
                    self.stats.too_large += 1;
                    warn!(%to, size = msg.len(), "message larger than the peer's QUIC datagrams: dropped");
                }
                Err(_) => self.stats.unroutable += 1,
            },
        }
    }

    /// Closes every connection and waits briefly for the closes to go out.
    pub fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"aggregator stopping");
        let ep = self.endpoint.clone();
        let _ = self.runtime.block_on(async move {
            tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await
        });
    }
}

/// Accepts connections until the endpoint closes.
async fn accept(
    endpoint: quinn::Endpoint,
    tx: tokio::sync::mpsc::Sender<Inbound>,
    failed: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut next_id = 0usize;
    while let Some(incoming) = endpoint.accept().await {
        next_id += 1;
        let id = next_id;
        let tx = tx.clone();
        let failed = Arc::clone(&failed);
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve(conn, id, tx).await,
                Err(e) => {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    debug!(%remote, "QUIC handshake failed: {e}");
                }
            }
        });
    }
}

/// Forwards one connection's datagrams and streams until it closes.
async fn serve(conn: quinn::Connection, id: usize, tx: tokio::sync::mpsc::Sender<Inbound>) {
    let addr = conn.remote_address();
    if tx
        .send(Inbound::Open(addr, id, conn.clone()))
        .await
        .is_err()
    {
        return;
    }
    let datagrams = {
        let (conn, tx) = (conn.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                if tx.send(Inbound::Data(addr, d)).await.is_err() {
                    return;
                }
            }
        })
    };
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (wtx, wrx) = tokio::sync::mpsc::channel(crate::STREAM_QUEUE);
        tokio::spawn(crate::write_frames(send, wrx));
        if tx.send(Inbound::Stream(addr, id, wtx)).await.is_err() {
            return;
        }
        let (conn, tx) = (conn.clone(), tx.clone());
        tokio::spawn(async move {
            let tx = &tx;
            let r = crate::read_frames(recv, |m| async move {
                tx.send(Inbound::Data(addr, m)).await.is_ok()
            })
            .await;
            if let Err(why) = r {
                conn.close(quinn::VarInt::from_u32(1), why.as_bytes());
            }
        });
    }
    let _ = datagrams.await;
    let _ = tx.send(Inbound::Closed(addr, id)).await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{Trust, INBOUND_QUEUE, STREAM_QUEUE};

    /// A listener with a fresh identity, a client runtime, and a quinn client
    /// connected to the listener with one stream open: (listener, runtime, endpoint,
    /// connection, send, recv, directory to remove).
    fn listener_and_raw_peer() -> (
        QuicListener,
        tokio::runtime::Runtime,
        (
            quinn::Endpoint,
            quinn::Connection,
            quinn::SendStream,
            quinn::RecvStream,
        ),
        std::path::PathBuf,
    ) {
        let dir = std::env::temp_dir().join(format!(
            "inagg-quic-peer-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let id = Identity::load_or_generate(&dir.join("c.pem"), &dir.join("k.pem")).expect("id");
        let listener = QuicListener::bind("127.0.0.1:0".parse().expect("addr"), &id).expect("bind");
        let crypto = Trust::fingerprint(&id.fingerprint())
            .and_then(|t| t.client_crypto())
            .expect("trust");
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("client crypto");
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(crate::transport_config());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let to = listener.local_addr();
        let peer = rt.block_on(async move {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr"))
                .expect("client endpoint");
            ep.set_default_client_config(client);
            let conn = ep
                .connect(to, crate::DEFAULT_SERVER_NAME)
                .expect("connect")
                .await
                .expect("handshake");
            let (send, recv) = conn.open_bi().await.expect("stream");
            (ep, conn, send, recv)
        });
        (listener, rt, peer, dir)
    }

    /// A peer that sends faster than the loop takes: what waits for the loop stops at
    /// `INBOUND_QUEUE` messages (the stream's reader waits; the rest stay in quinn's
    /// stream window, as the messages here are small), and once the loop takes them
    /// every message arrives, none dropped.
    #[test]
    fn a_peer_sending_faster_than_the_loop_takes_is_held_back_not_queued() {
        let (mut listener, rt, (_ep, _conn, mut send, _recv), dir) = listener_and_raw_peer();
        let sent = 3 * INBOUND_QUEUE;
        let writer = rt.spawn(async move {
            for i in 0..sent {
                let m = (i as u32).to_le_bytes();
                if send.write_all(&crate::frame(&m)).await.is_err() {
                    return send;
                }
            }
            send
        });
        let end = Instant::now() + Duration::from_secs(20);
        while listener.queued() < INBOUND_QUEUE && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(listener.queued(), INBOUND_QUEUE);
        let mut got = Vec::with_capacity(sent);
        while got.len() < sent && Instant::now() < end {
            listener.recv(Duration::from_millis(20), |_, m| {
                if let Ok(b) = <[u8; 4]>::try_from(m) {
                    got.push(u32::from_le_bytes(b));
                }
            });
        }
        assert_eq!(got.len(), sent);
        assert!(got.iter().enumerate().all(|(i, &x)| x == i as u32));
        let _send = rt.block_on(writer).expect("writer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer that opens its stream, says one thing and never reads: the replies
    /// queued for it stop at `STREAM_QUEUE` frames, the rest dropped and counted.
    #[test]
    fn replies_to_a_peer_that_stops_reading_are_bounded() {
        let (mut listener, rt, (_ep, _conn, mut send, _recv), dir) = listener_and_raw_peer();
        // Kept alive (and never read) until the end of the test.
        let _send = rt.block_on(async move {
            send.write_all(&crate::frame(b"hello"))
                .await
                .expect("write");
            send
        });
        let mut from = None;
        let end = Instant::now() + Duration::from_secs(10);
        while from.is_none() && Instant::now() < end {
            listener.recv(Duration::from_millis(20), |a, m| {
                if m == b"hello" {
                    from = Some(a);
                }
            });
        }
        let from = from.expect("the peer's message arrives");
        // The writer may hand quinn 48 MiB (its 32 MiB send buffer and the peer's 16
        // MiB stream window) before it blocks, 3072 replies of 16 KiB; then the queue
        // fills, and the 1000 after that must be dropped.
        let reply = vec![7u8; 16 << 10];
        let sent = 3 * 1024 + STREAM_QUEUE + 1000;
        for _ in 0..sent {
            listener.send(from, &reply);
        }
        let s = listener.stats();
        assert!(s.queue_full >= 1000, "{s:?}");
        assert!(s.queue_full < sent as u64, "{s:?}");
        assert_eq!(s.unroutable, 0, "{s:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
