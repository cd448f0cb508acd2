//! QUIC as an [`inagg_net::Transport`]: the worker's [`QuicLink`] (one peer, the
//! aggregator) and the aggregator's [`QuicListener`] (every connected worker), each
//! message sent whole (QUIC copies it into its own packets).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use inagg_net::{send_each, Outbox, Transport};

use crate::{Error, QuicLink, QuicListener};

impl<B: Copy> Transport<B> for QuicLink {
    type Error = Error;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        QuicLink::local_addr(self)
    }

    fn recv(
        &mut self,
        wait: Duration,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, Error> {
        let from = self.remote();
        QuicLink::recv(self, wait, |d| f(from, d))
    }

    fn send(&mut self, out: &mut impl Outbox<Body = B>) -> Result<usize, Error> {
        let mut buf = std::mem::take(&mut self.buf);
        let sent = send_each(out, &mut buf, |_, d| self.queue(d));
        self.buf = buf;
        let sent = sent?;
        self.flush()?;
        Ok(sent)
    }

    fn close(&mut self) {
        QuicLink::close(self);
    }

    fn describe(&self) -> String {
        format!("quic, connected to {}", self.remote())
    }
}

impl<B: Copy> Transport<B> for QuicListener {
    type Error = io::Error;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(QuicListener::local_addr(self))
    }

    fn recv(
        &mut self,
        wait: Duration,
        f: impl FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, io::Error> {
        QuicListener::recv(self, wait, f)
    }

    fn send(&mut self, out: &mut impl Outbox<Body = B>) -> Result<usize, io::Error> {
        let mut buf = std::mem::take(&mut self.buf);
        let sent = send_each(out, &mut buf, |to, d| {
            QuicListener::send(self, to, d);
            Ok::<(), io::Error>(())
        });
        self.buf = buf;
        let sent = sent?;
        self.flush()?;
        Ok(sent)
    }

    fn backlog_batches(&self) -> usize {
        self.full_batches()
    }

    fn close(&mut self) {
        QuicListener::close(self);
    }

    fn describe(&self) -> String {
        let s = self.stats();
        format!(
            "quic, {} connections ({} handshakes failed), {} messages unroutable, {} too large, \
             {} behind a peer that stopped reading",
            s.connections, s.failed_handshakes, s.unroutable, s.too_large, s.queue_full
        )
    }
}
