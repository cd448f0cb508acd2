//! The aggregator's end: accepts connections and turns them back into what the
//! aggregator's loop knows, messages tagged with the peer's address, all on the loop's
//! thread through the [`Driver`](crate::driver::Driver). Nothing waits between the
//! socket and the loop: a peer that sends faster than the loop takes is held back by
//! QUIC's flow control (what it sent waits in its stream's receive window).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::ConnectionHandle;
use tracing::warn;

use crate::driver::{Driver, Sent};
use crate::{tls::Identity, Error};

/// Messages delivered per receive call (about: a stream's piece is delivered whole)
/// before the loop goes on to send.
const RECV_BATCH: usize = 256;

/// Counters of the QUIC front end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections accepted.
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
    driver: Driver,
    /// The connection each peer address spoke on last.
    peers: HashMap<SocketAddr, ConnectionHandle>,
    local: SocketAddr,
    /// Receives in a row that stopped at the batch limit.
    full_streak: usize,
    /// Where [`inagg_net::Transport::send`] writes each message.
    pub(crate) buf: Vec<u8>,
    stats: ListenerStats,
}

impl QuicListener {
    /// Binds `addr` and starts accepting connections authenticated by `identity`.
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<Self, Error> {
        let crypto =
            quinn_proto::crypto::rustls::QuicServerConfig::try_from(identity.server_crypto()?)
                .map_err(|e| Error::Generate(e.to_string()))?;
        let mut server = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(crate::transport_config());
        let socket = inagg_net::UdpEndpoint::bind(addr, inagg_net::DEFAULT_SOCKET_BUFFER)?;
        let local = socket.local_addr()?;
        Ok(Self {
            driver: Driver::new(socket, Some(Arc::new(server))),
            peers: HashMap::new(),
            local,
            full_streak: 0,
            buf: Vec::with_capacity(64 * 1024),
            stats: ListenerStats::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The counters.
    pub fn stats(&self) -> ListenerStats {
        let mut s = self.stats.clone();
        s.connections = self.driver.accepted;
        s.failed_handshakes = self.driver.failed_handshakes;
        s
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.driver
            .conns
            .values()
            .filter(|c| c.lost.is_none())
            .count()
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
    /// `timeout` if none is there. Returns how many. Connections are served only
    /// while this runs: the loop calls it often.
    pub fn recv(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> std::io::Result<usize> {
        let peers = &mut self.peers;
        let n = self.driver.poll(timeout, RECV_BATCH, &mut |ch, from, m| {
            peers.insert(from, ch);
            f(from, m)
        })?;
        self.full_streak = if n >= RECV_BATCH {
            self.full_streak.saturating_add(1)
        } else {
            0
        };
        if self.peers.len() > self.driver.conns.len() {
            let conns = &self.driver.conns;
            self.peers.retain(|_, ch| conns.contains_key(ch));
        }
        Ok(n)
    }

    /// Sends one message to `to` the way it last spoke: on its stream if it opened
    /// one, as a datagram otherwise. It goes out with the next [`flush`](Self::flush).
    /// A peer that is gone is counted, not an error: as over UDP, the protocol notices
    /// its silence.
    pub fn send(&mut self, to: SocketAddr, msg: &[u8]) {
        let Some(&ch) = self.peers.get(&to) else {
            self.stats.unroutable += 1;
            return;
        };
        match self.driver.send(ch, msg) {
            Sent::Ok => {}
            Sent::QueueFull => self.stats.queue_full += 1,
            Sent::TooLarge => {
                self.stats.too_large += 1;
                warn!(%to, size = msg.len(), "message larger than the peer's QUIC datagrams: dropped");
            }
            Sent::Closed => self.stats.unroutable += 1,
        }
    }

    /// Sends what the connections have to send.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.driver.flush()
    }

    /// Closes every connection and sends the closes.
    pub fn close(&mut self) {
        self.driver.close_all(0, b"aggregator stopping");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;
    use crate::driver::STREAM_QUEUE;
    use crate::{ClientOptions, QuicLink, Trust};

    /// A listener with a fresh identity, and the options of a client that trusts it:
    /// (listener, options, directory to remove).
    fn listener() -> (QuicListener, ClientOptions, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "inagg-quic-peer-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let id = Identity::load_or_generate(&dir.join("c.pem"), &dir.join("k.pem")).expect("id");
        let listener = QuicListener::bind("127.0.0.1:0".parse().expect("addr"), &id).expect("bind");
        let trust = Trust::fingerprint(&id.fingerprint()).expect("trust");
        (listener, ClientOptions::new(trust), dir)
    }

    /// A worker's end on a thread of its own: connects to `to`, says "hello", runs
    /// `then`, and keeps the connection open until `done` is set (30 s at the most),
    /// receiving meanwhile if `reads`, idle otherwise.
    fn peer(
        opts: ClientOptions,
        to: SocketAddr,
        done: Arc<AtomicBool>,
        reads: bool,
        then: impl FnOnce(&mut QuicLink) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut link = QuicLink::connect(&opts, to, "127.0.0.1:0".parse().expect("addr"))
                .expect("connect");
            link.send(b"hello").expect("hello");
            then(&mut link);
            let end = Instant::now() + Duration::from_secs(30);
            while !done.load(Ordering::Relaxed) && Instant::now() < end {
                if reads {
                    let _ = link.recv(Duration::from_millis(10), |_| {});
                } else {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            link.close();
        })
    }

    /// Receives on `listener` until `want` messages came or `limit` passed.
    fn take(
        listener: &mut QuicListener,
        want: usize,
        limit: Duration,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let end = Instant::now() + limit;
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < end {
            listener
                .recv(Duration::from_millis(20), |a, m| got.push((a, m.to_vec())))
                .expect("recv");
        }
        got
    }

    /// A peer that sends while the loop is busy elsewhere: its messages wait in QUIC
    /// (the peer's send buffer and this end's stream window, bounded by flow control),
    /// not in a queue of the listener's, and once the loop receives again every one
    /// arrives, in order.
    #[test]
    fn messages_sent_while_the_loop_is_away_all_arrive_in_order() {
        let (mut listener, opts, dir) = listener();
        let to = listener.local_addr();
        let sent = 3 * 4096;
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let peer = peer(opts, to, Arc::clone(&done), true, move |link| {
            let _ = rx.recv();
            for i in 0..sent {
                link.send(&(i as u32).to_le_bytes()).expect("send");
            }
        });
        let hello = take(&mut listener, 1, Duration::from_secs(10));
        assert_eq!(hello.len(), 1);
        let _ = tx.send(());
        std::thread::sleep(Duration::from_millis(300));
        let got = take(&mut listener, sent, Duration::from_secs(20));
        done.store(true, Ordering::Relaxed);
        assert_eq!(got.len(), sent);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, (_, m))| m.as_slice() == (i as u32).to_le_bytes()));
        peer.join().expect("peer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer that opens its stream, says one thing and never reads: the replies
    /// waiting for it stop at `STREAM_QUEUE` frames, the rest dropped and counted.
    #[test]
    fn replies_to_a_peer_that_stops_reading_are_bounded() {
        let (mut listener, opts, dir) = listener();
        let to = listener.local_addr();
        let done = Arc::new(AtomicBool::new(false));
        // Kept open, never read, until the test is over.
        let peer = peer(opts, to, Arc::clone(&done), false, |_| {});
        let hello = take(&mut listener, 1, Duration::from_secs(10));
        let from = hello
            .first()
            .map(|(a, _)| *a)
            .expect("the peer's message arrives");
        // QUIC may take 48 MiB (its 32 MiB send buffer and the peer's 16 MiB stream
        // window) before it blocks, 3072 replies of 16 KiB; then the queue fills, and
        // the 1000 after that must be dropped.
        let reply = vec![7u8; 16 << 10];
        let sent = 3 * 1024 + STREAM_QUEUE + 1000;
        for _ in 0..sent {
            listener.send(from, &reply);
        }
        let _ = listener.flush();
        done.store(true, Ordering::Relaxed);
        let s = listener.stats();
        assert!(s.queue_full >= 1000, "{s:?}");
        assert!(s.queue_full < sent as u64, "{s:?}");
        assert_eq!(s.unroutable, 0, "{s:?}");
        peer.join().expect("peer");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
