//! Decides at build time which of the process tests this machine can run, so that a
//! test whose tools or privileges are missing is reported as *ignored*, with the
//! reason, rather than passing without having run. Each probe sets a `cfg` that the
//! tests read with `#[cfg_attr(inagg_no_X, ignore = "...")]`:
//!
//! | cfg                 | set when                                                   |
//! |---------------------|------------------------------------------------------------|
//! | `inagg_no_python`   | the interpreter cannot import torch, numpy, pytest, matplotlib, maturin |
//! | `inagg_no_netns`    | no CAP_NET_ADMIN, or no `ip`/`tc` (scripts/netlab.sh)       |
//! | `inagg_no_raw`      | no CAP_NET_RAW (raw sockets that forge source ports)        |
//! | `inagg_no_ipv6`     | no IPv6 loopback                                           |
//! | `inagg_no_multicast`| no socket may join a multicast group on loopback           |
//! | `inagg_no_cc`       | no C compiler (scripts/memory-floor.sh builds a probe)     |
//! | `inagg_no_fashion_mnist` | Debian's dataset-fashion-mnist is not installed       |
//! | `inagg_no_iperf3`   | no iperf3 (scripts/netlab.sh's bulk TCP flows)             |
//!
//! `.ci/run` fails when any test is ignored. The probes run again when this file or
//! `INAGG_PYTHON`, `PATH` or `CC` change; after installing a tool, `touch
//! build.rs` (or `cargo clean -p inagg`) makes the next build see it.

use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};

fn main() {
    for var in ["INAGG_PYTHON", "PATH", "CC"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    let probes: [(&str, Probe); 8] = [
        ("inagg_no_python", python),
        ("inagg_no_netns", netns),
        ("inagg_no_raw", raw_sockets),
        ("inagg_no_ipv6", ipv6),
        ("inagg_no_multicast", multicast),
        ("inagg_no_cc", cc),
        ("inagg_no_fashion_mnist", fashion_mnist),
        ("inagg_no_iperf3", iperf3),
    ];
    for (cfg, works) in probes {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if !works() {
            println!("cargo::rustc-cfg={cfg}");
            println!("cargo::warning=tests that need {cfg:?}'s tool will be ignored");
        }
    }
}

/// Whether Debian's dataset-fashion-mnist is installed (`inagg demo --data
/// fashion-mnist`).
fn fashion_mnist() -> bool {
    std::path::Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
}

/// A check of this machine: whether the tests that need something can run.
type Probe = fn() -> bool;

/// Whether `program args` runs and exits 0.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn python() -> bool {
    let py = std::env::var("INAGG_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    runs(
        &py,
        &["-c", "import torch, numpy, pytest, matplotlib, maturin"],
    )
}

/// The effective capability set's bit `bit` (`CapEff` in /proc/self/status).
fn capability(bit: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

fn netns() -> bool {
    capability(CAP_NET_ADMIN) && runs("ip", &["-V"]) && runs("tc", &["-V"])
}

fn raw_sockets() -> bool {
    capability(CAP_NET_RAW)
}

fn ipv6() -> bool {
    UdpSocket::bind("[::1]:0").is_ok()
}

fn multicast() -> bool {
    UdpSocket::bind("0.0.0.0:0").is_ok_and(|s| {
        s.join_multicast_v4(&Ipv4Addr::new(239, 255, 255, 255), &Ipv4Addr::LOCALHOST)
            .is_ok()
    })
}

fn iperf3() -> bool {
    runs("iperf3", &["--version"])
}

fn cc() -> bool {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    runs(&cc, &["--version"])
}
