//! The worker's end: one connection to one aggregator, behind a blocking façade. A
//! small tokio runtime (one thread) runs quinn; received messages reach the caller's
//! loop through a channel, sent ones go straight to quinn (datagrams) or through a
//! writer task (the stream).

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{tls::Trust, Error, Mode};

/// How to reach and trust an aggregator.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How the aggregator's certificate is checked.
    pub trust: Trust,
    /// The name the certificate must carry (with [`Trust::Ca`]).
    pub server_name: String,
    /// Datagrams or a stream.
    pub mode: Mode,
    /// The longest the handshake may take.
    pub connect_timeout: Duration,
}

impl ClientOptions {
    /// Stream mode, the default server name, a 5 s handshake limit.
    pub fn new(trust: Trust) -> Self {
        Self {
            trust,
            server_name: crate::DEFAULT_SERVER_NAME.to_string(),
            mode: Mode::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
enum Outbound {
    Datagram,
    Stream(tokio::sync::mpsc::Sender<Bytes>),
}

/// A connection to an aggregator: send and receive protocol messages.
#[derive(Debug)]
pub struct QuicLink {
    conn: quinn::Connection,
    out: Outbound,
    inbound: mpsc::Receiver<Bytes>,
    remote: SocketAddr,
    /// Where [`inagg_net::Transport::send`] writes each message.
    pub(crate) buf: Vec<u8>,
    endpoint: quinn::Endpoint,
    /// Dropped last: quinn's tasks run on it.
    runtime: tokio::runtime::Runtime,
}

impl QuicLink {
    /// Binds `bind`, connects to the aggregator at `remote` and checks its certificate.
    pub fn connect(
        opts: &ClientOptions,
        remote: SocketAddr,
        bind: SocketAddr,
    ) -> Result<Self, Error> {
        let crypto = opts.trust.client_crypto()?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| {
            Error::Connect {
                addr: remote,
                detail: e.to_string(),
            }
        })?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(crate::transport_config());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("inagg-quic")
            .enable_all()
            .build()?;
        let socket = inagg_net::bind_socket(bind, inagg_net::DEFAULT_SOCKET_BUFFER)?;
        let (tx, inbound) = mpsc::channel();
        let mode = opts.mode;
        let timeout = opts.connect_timeout;
        let name = opts.server_name.clone();
        let (endpoint, conn, out) = runtime.block_on(async move {
            let mut endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )?;
            endpoint.set_default_client_config(client);
            let connecting = endpoint
                .connect(remote, &name)
                .map_err(|e| Error::Connect {
                    addr: remote,
                    detail: e.to_string(),
                })?;
            let conn = match tokio::time::timeout(timeout, connecting).await {
                Err(_) => {
                    return Err(Error::ConnectTimeout {
                        addr: remote,
                        timeout,
                    })
                }
                Ok(Err(e)) => {
                    return Err(Error::Connect {
                        addr: remote,
                        detail: e.to_string(),
                    })
                }
                Ok(Ok(c)) => c,
            };
            let out = match mode {
                Mode::Datagram => {
                    let c = conn.clone();
                    tokio::spawn(async move {
                        while let Ok(d) = c.read_datagram().await {
                            if tx.send(d).is_err() {
                                return;
                            }
                        }
                    });
                    Outbound::Datagram
                }
                Mode::Stream => {
                    let (send, recv) = conn.open_bi().await.map_err(|e| Error::Connect {
                        addr: remote,
                        detail: e.to_string(),
                    })?;
                    let (wtx, wrx) = tokio::sync::mpsc::channel(crate::STREAM_QUEUE);
                    tokio::spawn(crate::write_frames(send, wrx));
                    let c = conn.clone();
                    tokio::spawn(async move {
                        if let Err(why) =
                            crate::read_frames(recv, |m| std::future::ready(tx.send(m).is_ok()))
                                .await
                        {
                            c.close(quinn::VarInt::from_u32(1), why.as_bytes());
                        }
                    });
                    Outbound::Stream(wtx)
                }
            };
            Ok((endpoint, conn, out))
        })?;
        Ok(Self {
            runtime,
            endpoint,
            conn,
            out,
            inbound,
            remote,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// The aggregator's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The largest message [`QuicLink::send`] takes: the path's datagram size in
    /// datagram mode (it may grow as path MTU discovery proceeds), on a stream the
    /// largest inagg message (65,507 bytes, as over UDP).
    pub fn max_message(&self) -> usize {
        match self.out {
            Outbound::Datagram => self.conn.max_datagram_size().unwrap_or(0),
            Outbound::Stream(_) => crate::MAX_FRAME,
        }
    }

    /// Sends one protocol message. A datagram may be lost (the protocol retransmits);
    /// an error means the connection is gone or the message cannot fit.
    pub fn send(&self, msg: &[u8]) -> Result<(), Error> {
        match &self.out {
            Outbound::Datagram => match self.conn.send_datagram(Bytes::copy_from_slice(msg)) {
                Ok(()) => Ok(()),
                Err(quinn::SendDatagramError::TooLarge) => Err(Error::TooLarge {
                    size: msg.len(),
                    max: self.max_message(),
                }),
                Err(e) => Err(Error::Closed(e.to_string())),
            },
            Outbound::Stream(tx) => match tx.try_send(crate::frame(msg)) {
                // The aggregator has stopped reading (`STREAM_QUEUE` frames behind):
                // lost, as over UDP; the worker's timeouts take it from there.
                Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Ok(()),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    Err(Error::Closed(self.close_reason()))
                }
            },
        }
    }

    /// Hands every message received to `f`, waiting up to `timeout` if none is there.
    /// Returns how many; an error once the connection is closed and drained.
    pub fn recv(&mut self, timeout: Duration, mut f: impl FnMut(&[u8])) -> Result<usize, Error> {
        // Err(true): the connection is gone and everything it delivered was read.
        let first = if timeout.is_zero() {
            self.inbound
                .try_recv()
                .map_err(|e| matches!(e, mpsc::TryRecvError::Disconnected))
        } else {
            self.inbound
                .recv_timeout(timeout)
                .map_err(|e| matches!(e, mpsc::RecvTimeoutError::Disconnected))
        };
        match first {
            Ok(m) => f(&m),
            Err(false) => return Ok(0),
            Err(true) => return Err(Error::Closed(self.close_reason())),
        }
        let mut n = 1;
        while n < 256 {
            match self.inbound.try_recv() {
                Ok(m) => {
                    f(&m);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        Ok(n)
    }

    fn close_reason(&self) -> String {
        self.conn
            .close_reason()
            .map_or_else(|| "closed".to_string(), |e| e.to_string())
    }

    /// Closes the connection and waits briefly for the close to go out.
    pub fn close(&self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
        let ep = self.endpoint.clone();
        let _ = self.runtime.block_on(async move {
            tokio::time::timeout(Duration::from_millis(200), ep.wait_idle()).await
        });
    }
}
