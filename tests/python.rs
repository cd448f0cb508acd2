//! The Python binding's tests (python/tests, pytest) as part of `cargo test`: builds
//! the abi3 wheel with maturin, installs it into a scratch directory and runs pytest
//! with Debian's interpreter against this build's `inagg` binary.
//!
//! Needs `/usr/bin/python3` (or `INAGG_PYTHON`) with torch, numpy, pytest and
//! maturin, which `.ci/run` installs. Where the build found them missing (`build.rs`)
//! the test is ignored, and says why; `.ci/run` fails on any ignored test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::run_bounded;

fn python() -> String {
    std::env::var("INAGG_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

/// Whether `python` can import these modules (`None`: yes; else what is missing).
fn missing(py: &str) -> Option<String> {
    let probe = Command::new(py)
        .args(["-c", "import torch, numpy, pytest, matplotlib, maturin"])
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Some(format!("{py}: {e}")),
    }
}

fn step(mut cmd: Command, limit: Duration, what: &str) -> String {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (st, out, err) = run_bounded(cmd, limit);
    assert!(st.success(), "{what} failed:\n{out}\n{err}");
    out
}

#[test]
#[cfg_attr(
    inagg_no_python,
    ignore = "needs python3 with torch, numpy, pytest, matplotlib and maturin (.ci/run installs them; then touch build.rs)"
)]
fn python_binding_and_ddp_hook() {
    let py = python();
    if let Some(why) = missing(&py) {
        panic!("the Python tests need torch, numpy, pytest, matplotlib and maturin: {why}");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python");
    let (wheels, site) = (scratch.join("wheels"), scratch.join("site"));
    let _ = std::fs::remove_dir_all(&scratch);
    // The dev profile shares its compiled dependencies with `cargo test`'s build.
    let mut build = Command::new(&py);
    build
        .args(["-m", "maturin", "build", "-m"])
        .arg(root.join("python/Cargo.toml"))
        .arg("-o")
        .arg(&wheels)
        .args(["-i", &py]);
    step(build, Duration::from_secs(900), "maturin build");
    let wheel = std::fs::read_dir(&wheels)
        .expect("wheel directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("a wheel");
    let name = wheel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(name.contains("abi3"), "not an abi3 wheel: {name}");
    let mut install = Command::new(&py);
    install
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(&site)
        .arg(&wheel)
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1");
    step(install, Duration::from_secs(120), "pip install");
    let mut pytest = Command::new(&py);
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("python/tests"))
        .env("PYTHONPATH", &site)
        .env("INAGG_BIN", env!("CARGO_BIN_EXE_inagg"))
        .current_dir(root);
    let out = step(pytest, Duration::from_secs(600), "pytest");
    eprintln!("{out}");
    // pytest's summary, word by word ("xfailed" is not "failed").
    let words: Vec<&str> = out.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    let has = |w: &str| words.contains(&w);
    assert!(
        has("passed") && !has("failed") && !has("error") && !has("errors"),
        "{out}"
    );
}
