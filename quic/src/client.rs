//! The worker's end: one connection to one aggregator, driven on the caller's thread
//! by the [`Driver`](crate::driver::Driver) whenever it receives, as a UDP socket is.
//! Between allreduces the worker's heartbeat thread receives often enough (every
//! eighth of a second) to answer QUIC's acknowledgements and keep-alives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::ConnectionHandle;

use crate::driver::{Conn, Driver, Sent};
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

/// A connection to an aggregator: send and receive protocol messages.
#[derive(Debug)]
pub struct QuicLink {
    driver: Driver,
    ch: ConnectionHandle,
    mode: Mode,
    remote: SocketAddr,
    /// Where [`inagg_net::Transport::send`] writes each message.
    pub(crate) buf: Vec<u8>,
}

impl QuicLink {
    /// Binds `bind`, connects to the aggregator at `remote` and checks its certificate.
    pub fn connect(
        opts: &ClientOptions,
        remote: SocketAddr,
        bind: SocketAddr,
    ) -> Result<Self, Error> {
        let connect_error = |detail: String| Error::Connect {
            addr: remote,
            detail,
        };
        let crypto = opts.trust.client_crypto()?;
        let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| connect_error(e.to_string()))?;
        let mut client = quinn_proto::ClientConfig::new(Arc::new(crypto));
        client.transport_config(crate::transport_config());
        let socket = inagg_net::UdpEndpoint::bind(bind, inagg_net::DEFAULT_SOCKET_BUFFER)?;
        let mut driver = Driver::new(socket, None);
        let ch = driver
            .connect(client, remote, &opts.server_name)
            .map_err(|e| connect_error(e.to_string()))?;
        let end = Instant::now() + opts.connect_timeout;
        loop {
            match driver.conns.get(&ch) {
                Some(c) if c.connected && c.lost.is_none() => break,
                Some(Conn {
                    lost: Some(why), ..
                }) => return Err(connect_error(why.to_string())),
                _ => {}
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::ConnectTimeout {
                    addr: remote,
                    timeout: opts.connect_timeout,
                });
            }
            // Nothing can arrive for the caller before the connection is up.
            driver.poll(left.min(Duration::from_millis(50)), 0, &mut |_, _, _| {})?;
        }
        if opts.mode == Mode::Stream && !driver.open_stream(ch) {
            return Err(connect_error(
                "the aggregator allows no stream to be opened".into(),
            ));
        }
        Ok(Self {
            driver,
            ch,
            mode: opts.mode,
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
        self.driver.local_addr()
    }

    /// The largest message [`QuicLink::send`] takes: the path's datagram size in
    /// datagram mode (it may grow as path MTU discovery proceeds), on a stream the
    /// largest inagg message (65,507 bytes, as over UDP).
    pub fn max_message(&mut self) -> usize {
        match self.mode {
            Mode::Datagram => self.driver.max_datagram(self.ch).unwrap_or(0),
            Mode::Stream => crate::frames::MAX_FRAME,
        }
    }

    /// Sends one protocol message. A datagram may be lost (the protocol retransmits);
    /// an error means the connection is gone or the message cannot fit.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.queue(msg)?;
        self.driver.flush()?;
        Ok(())
    }

    /// Hands one message to the connection; it goes out with the next flush.
    pub(crate) fn queue(&mut self, msg: &[u8]) -> Result<(), Error> {
        match self.driver.send(self.ch, msg) {
            // The aggregator has stopped reading (`STREAM_QUEUE` frames behind): lost,
            // as over UDP; the worker's timeouts take it from there.
            Sent::Ok | Sent::QueueFull => Ok(()),
            Sent::TooLarge => Err(Error::TooLarge {
                size: msg.len(),
                max: self.max_message(),
            }),
            Sent::Closed => Err(Error::Closed(self.close_reason())),
        }
    }

    /// Sends what the connection has to send.
    pub(crate) fn flush(&mut self) -> Result<(), Error> {
        Ok(self.driver.flush()?)
    }

    /// Hands every message received to `f`, waiting up to `timeout` if none is there.
    /// Returns how many; an error once the connection is closed and drained.
    pub fn recv(&mut self, timeout: Duration, mut f: impl FnMut(&[u8])) -> Result<usize, Error> {
        let n = self.driver.poll(timeout, usize::MAX, &mut |_, _, m| f(m))?;
        if n == 0
            && self
                .driver
                .conns
                .get(&self.ch)
                .is_none_or(|c| c.lost.is_some())
        {
            return Err(Error::Closed(self.close_reason()));
        }
        Ok(n)
    }

    fn close_reason(&self) -> String {
        self.driver
            .conns
            .get(&self.ch)
            .and_then(|c| c.lost.as_ref())
            .map_or_else(|| "closed".to_string(), |e| e.to_string())
    }

    /// Closes the connection and sends the close.
    pub fn close(&mut self) {
        self.driver.close_all(0, b"bye");
    }
}
