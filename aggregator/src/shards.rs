//! An aggregator of several UDP shards on consecutive ports, one thread, socket and
//! state machine each: what `inagg aggregator --threads T` runs.
//!
//! Nothing is shared between the shards: every grant names its shard and the count,
//! and workers join the same job on every shard and stripe each tensor over them (as
//! over several aggregators). Sharding by port rather than by `SO_REUSEPORT` on one
//! port keeps all the ranks' packets for a slot on one core: the kernel spreads a
//! reuseport group by sender, and a slot needs every sender.
//!
//! [`run_together`] runs any set of server loops (the shards, and a QUIC server beside
//! them) so that when one ends, fails or panics, the others stop: their jobs could not
//! all finish anyway.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use inagg_proto::aggregator::{Aggregator, Stats};

use crate::server::{Server, ServerConfig, ServerError};

/// Runs of free ports tried before a sharded server on port 0 gives up.
const ATTEMPTS: usize = 32;

/// Several UDP servers, shard `k` on the first one's port + `k`.
#[derive(Debug)]
pub struct ShardedServer {
    shards: Vec<Server>,
}

impl ShardedServer {
    /// Binds `shards` servers with `config` (its budgets are each shard's), shard `k`
    /// of `shards` on `config.listen`'s port + `k`. With port 0 the first gets a free
    /// port and the others the ports after it; where one of those is taken the whole
    /// run is tried again elsewhere, a bounded number of times. With a given port, a
    /// taken one is an error that names it.
    pub fn bind(config: &ServerConfig, shards: u16) -> Result<Self, ServerError> {
        let shards = shards.max(1);
        let any_port = config.listen.port() == 0;
        let shard_config = |k: u16, listen: SocketAddr| {
            let mut c = config.clone();
            c.listen = listen;
            c.protocol.shard = k;
            c.protocol.shards = shards;
            c
        };
        for _ in 0..ATTEMPTS {
            let first = Server::bind(shard_config(0, config.listen))?;
            let base = first.local_addr()?;
            let mut all = vec![first];
            for k in 1..shards {
                let Some(port) = base.port().checked_add(k) else {
                    if any_port {
                        break; // Too near the top: another run.
                    }
                    return Err(ServerError::NoRoomAbove {
                        shards,
                        port: base.port(),
                    });
                };
                // A copy keeps an IPv6 scope id.
                let mut addr = base;
                addr.set_port(port);
                match Server::bind(shard_config(k, addr)) {
                    Ok(s) => all.push(s),
                    Err(e) if any_port => {
                        tracing::debug!(%addr, error = %e, "shard port taken, trying another run");
                        break;
                    }
                    Err(e) => {
                        return Err(ServerError::ShardPort {
                            shards,
                            shard: k,
                            port,
                            source: Box::new(e),
                        })
                    }
                }
            }
            if all.len() == usize::from(shards) {
                return Ok(Self { shards: all });
            }
        }
        Err(ServerError::NoPortRun {
            shards,
            attempts: ATTEMPTS,
        })
    }

    /// The shards' addresses, shard 0 first: workers need only the first.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.shards.iter().map(Server::local_addr).collect()
    }

    /// The shards' servers, shard 0 first, for callers that run each their own way
    /// (with [`run_together`]).
    pub fn into_shards(self) -> Vec<Server> {
        self.shards
    }

    /// Serves on every shard until `stop` is set or one shard's loop ends; returns each
    /// shard's counters, shard 0 first.
    pub fn run(self, stop: &AtomicBool) -> Result<Vec<Stats>, ServerError> {
        self.run_observed(stop, Duration::MAX, |_, _| {})
    }

    /// [`ShardedServer::run`], calling `observe(shard, state machine)` from each
    /// shard's thread about every `every` ([`Server::run_observed`]).
    pub fn run_observed(
        self,
        stop: &AtomicBool,
        every: Duration,
        observe: impl Fn(u16, &Aggregator<SocketAddr>) + Sync,
    ) -> Result<Vec<Stats>, ServerError> {
        let observe = &observe;
        let loops: Vec<Loop<'_, Stats>> = (0u16..)
            .zip(self.shards)
            .map(|(k, s)| -> Loop<'_, Stats> {
                Box::new(move |stop| s.run_observed(stop, every, |agg| observe(k, agg)))
            })
            .collect();
        run_together(stop, loops).into_iter().collect()
    }
}

/// A server loop for [`run_together`]: runs until the flag it is given is set.
pub type Loop<'a, T> = Box<dyn FnOnce(&AtomicBool) -> Result<T, ServerError> + Send + 'a>;

/// Sets the stop flag when dropped: a loop that returns, fails or panics stops the
/// others.
struct StopOthers<'a>(&'a AtomicBool);

impl Drop for StopOthers<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs every loop on a thread of its own until `stop` is set; the first loop to end,
/// fail or panic sets it, so that the others stop too. Returns each loop's outcome, in
/// order ([`ServerError::Panicked`] for a loop that panicked).
pub fn run_together<T: Send>(
    stop: &AtomicBool,
    loops: Vec<Loop<'_, T>>,
) -> Vec<Result<T, ServerError>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = loops
            .into_iter()
            .map(|run| {
                scope.spawn(move || {
                    let _stop = StopOthers(stop);
                    run(stop)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(ServerError::Panicked)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> ServerConfig {
        ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    #[test]
    fn shards_bind_consecutive_ports_and_stop_together() {
        let sharded = ShardedServer::bind(&loopback(), 3).expect("three shards");
        let addrs = sharded.local_addrs().expect("addresses");
        assert_eq!(addrs.len(), 3);
        for (k, a) in addrs.iter().enumerate() {
            assert_eq!(a.port(), addrs[0].port() + k as u16, "{addrs:?}");
        }
        let stop = AtomicBool::new(false);
        let stats = std::thread::scope(|s| {
            let running = s.spawn(|| sharded.run(&stop));
            stop.store(true, Ordering::Relaxed);
            running.join().expect("no panic")
        });
        assert_eq!(stats.expect("clean stop").len(), 3);
    }

    #[test]
    fn a_loop_that_ends_stops_the_others() {
        let stop = AtomicBool::new(false);
        let waits: Loop<'_, u32> = Box::new(|stop| {
            // Bounded: a loop that never saw the flag fails the test, not hangs it.
            for _ in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    return Ok(1);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(0)
        });
        let fails: Loop<'_, u32> = Box::new(|_| Err(ServerError::Panicked));
        let panics: Loop<'_, u32> = Box::new(|_| panic!("a loop panics"));
        let out = run_together(&stop, vec![waits, fails, panics]);
        assert!(matches!(out[0], Ok(1)), "{out:?}");
        assert!(matches!(out[1], Err(ServerError::Panicked)));
        assert!(matches!(out[2], Err(ServerError::Panicked)));
    }
}
