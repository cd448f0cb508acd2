//! Starting the processes of a run: `inagg aggregator`, `inagg relay` and workers, on
//! 127.0.0.1 or in the namespaces of `scripts/netlab.sh`'s emulated cluster, each
//! ending with its parent ([`Proc`]); and the QUIC identity a run's aggregators share.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, Context, Result};

use crate::args::FaultArgs;
pub use crate::children::Proc;

/// A certificate and key generated for one run's QUIC aggregators, in a directory
/// removed afterwards.
#[derive(Debug)]
pub struct QuicIdentity {
    dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl QuicIdentity {
    /// Generates one in a fresh temporary directory.
    pub fn generate() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("inagg-quic-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::children::remove_on_signal(dir.clone());
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        inagg_quic::Identity::load_or_generate(&cert, &key)?;
        Ok(Self { dir, cert, key })
    }

    /// `inagg aggregator` flags that serve QUIC on `ip` (any port) with it.
    pub fn aggregator_flags(&self, ip: std::net::IpAddr) -> Vec<String> {
        vec![
            "--quic".into(),
            SocketAddr::new(ip, 0).to_string(),
            "--cert".into(),
            self.cert.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
        ]
    }
}

impl Drop for QuicIdentity {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the processes run inside `scripts/netlab.sh`'s emulated cluster (set by
/// the script through the environment; empty: everything on 127.0.0.1).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Netlab {
    /// Network namespace for the aggregator.
    #[arg(long, env = "INAGG_NETLAB_AGG_NETNS")]
    pub agg_netns: Option<String>,
    /// The aggregator's address in its namespace.
    #[arg(long, env = "INAGG_NETLAB_AGG_IP")]
    pub agg_ip: Option<std::net::IpAddr>,
    /// Worker r runs in the namespace named by this prefix followed by r.
    #[arg(long, env = "INAGG_NETLAB_WORKER_NETNS")]
    pub worker_netns: Option<String>,
    /// Rate of each worker's link, bits per second (for the line-rate bound).
    #[arg(long, env = "INAGG_NETLAB_LINK_BPS")]
    pub link_bps: Option<f64>,
    /// Rate of the aggregator's link where it is shaped too, bits per second: every
    /// rank's bytes cross it (for the line-rate bound).
    #[arg(long, env = "INAGG_NETLAB_AGG_LINK_BPS")]
    pub agg_link_bps: Option<f64>,
    /// Racks of the lab (`netlab.sh --racks R`; 0: none).
    #[arg(long, env = "INAGG_NETLAB_RACKS")]
    pub lab_racks: Option<u16>,
    /// Rack k's aggregator runs in the namespace named by this prefix followed by k.
    #[arg(long, env = "INAGG_NETLAB_RACK_NETNS")]
    pub rack_netns: Option<String>,
    /// Rack aggregators' addresses in their namespaces, rack by rack, comma-separated
    /// (empty without racks).
    #[arg(long, env = "INAGG_NETLAB_RACK_IPS")]
    pub rack_ips: Option<String>,
}

impl Netlab {
    /// The lab's rack aggregators' addresses, rack by rack (none outside the lab or
    /// without racks).
    pub fn rack_ips(&self) -> Result<Vec<std::net::IpAddr>> {
        self.rack_ips
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .with_context(|| format!("INAGG_NETLAB_RACK_IPS: {s:?} is not an address"))
            })
            .collect()
    }

    /// `cmd` for the inagg binary, run in namespace `ns` if there is one.
    pub fn command(ns: Option<&str>) -> Result<Command> {
        Ok(match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe()?);
                c
            }
            None => Command::new(exe()?),
        })
    }
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the inagg binary")
}

/// Starts `inagg aggregator` on 127.0.0.1 and learns its port from its first line.
pub fn start_aggregator(extra: &[String]) -> Result<(Proc, SocketAddr)> {
    start_aggregator_in(&Netlab::default(), extra)
}

/// Starts `inagg aggregator` serving QUIC only, where `lab` says, with `id`.
pub fn start_quic_aggregator_in(
    lab: &Netlab,
    id: &QuicIdentity,
    extra: &[String],
) -> Result<(Proc, SocketAddr)> {
    let ip = lab.agg_ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let mut cmd = Netlab::command(lab.agg_netns.as_deref())?;
    cmd.arg("aggregator")
        .args(id.aggregator_flags(ip))
        .args(extra);
    start_server(cmd, "aggregator", "quic on ")
}

/// Starts `inagg aggregator` where `lab` says (127.0.0.1 by default).
pub fn start_aggregator_in(lab: &Netlab, extra: &[String]) -> Result<(Proc, SocketAddr)> {
    let ip = lab.agg_ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let mut cmd = Netlab::command(lab.agg_netns.as_deref())?;
    cmd.args(["aggregator", "--listen"])
        .arg(SocketAddr::new(ip, 0).to_string())
        .args(extra);
    start_server(cmd, "aggregator", "listening on ")
}

/// Starts rack `rack`'s aggregator where `lab` says (127.0.0.1 outside the lab), with
/// `extra` flags (its `--parent`, `--rack`, `--racks`).
pub fn start_rack_aggregator_in(
    lab: &Netlab,
    rack: u16,
    extra: &[String],
) -> Result<(Proc, SocketAddr)> {
    let ns = lab.rack_netns.as_ref().map(|p| format!("{p}{rack}"));
    let ip = lab
        .rack_ips()?
        .get(usize::from(rack))
        .copied()
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let mut cmd = Netlab::command(ns.as_deref())?;
    cmd.args(["aggregator", "--listen"])
        .arg(SocketAddr::new(ip, 0).to_string())
        .args(extra);
    start_server(cmd, "rack aggregator", "listening on ")
}

/// Starts `inagg relay` in front of `upstream` with `faults` seeded by `seed`; returns
/// it and the address workers should use.
pub fn start_relay(
    upstream: SocketAddr,
    faults: &FaultArgs,
    seed: u64,
) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(exe()?);
    cmd.args(["relay", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.to_string())
        .args(faults.flags(seed));
    start_server(cmd, "relay", "relaying on ")
}

/// Spawns a server process whose first line of output is `prefix` and its address;
/// returns it and that address.
fn start_server(mut cmd: Command, name: &str, prefix: &str) -> Result<(Proc, SocketAddr)> {
    let mut proc = Proc::spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
        name,
    )?;
    let out = proc
        .child
        .stdout
        .take()
        .with_context(|| format!("{name} stdout"))?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .with_context(|| format!("reading the {name}'s address"))?;
    let addr = line
        .trim()
        .strip_prefix(prefix)
        .and_then(|s| s.split(' ').next())
        .ok_or_else(|| anyhow!("the {name} did not start (it said {line:?})"))?
        .parse()
        .with_context(|| format!("parsing the {name}'s address"))?;
    Ok((proc, addr))
}
