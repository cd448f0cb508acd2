//! Child processes of the commands that start others (`bench`, `demo`, `sweep`): each
//! one ends with its parent, however the parent ends. The integration tests supervise
//! the processes they start with the same [`Proc`] (`tests/common`).
//!
//! - Normal return or error: [`Proc`]'s `Drop` stops the child (SIGTERM, then SIGKILL
//!   after [`GRACE`]).
//! - SIGINT, SIGTERM or SIGHUP to the parent: [`stop_on_signals`] stops every live
//!   child the same way, removes the parent's scratch files, and exits with 128 + the
//!   signal, as the default action would have reported it.
//! - SIGKILL of the parent, or any other death: each child asked the kernel for SIGTERM
//!   when its parent dies (`PR_SET_PDEATHSIG`). Children are spawned from the main
//!   thread, whose end is the process's end, so that signal comes only then.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long a child has to stop after SIGTERM before it gets SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);

/// Process ids of the children not yet reaped.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The signal that is ending this process, once one came (0 before).
static ENDING: AtomicI32 = AtomicI32::new(0);
/// Scratch files and directories to remove when a signal ends the parent.
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A child process, stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Spawns `cmd` as a child that ends with this process.
    pub fn spawn(cmd: &mut Command, name: impl Into<String>) -> Result<Proc> {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // prctl(2) and getppid(2), which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the request took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        Self::spawn_unlinked(cmd, name)
    }

    /// Spawns `cmd` as a child that is stopped when dropped or when a signal ends this
    /// process ([`stop_on_signals`]), but not by the kernel when the spawning thread
    /// ends: for tests, whose threads hand children to each other.
    pub fn spawn_unlinked(cmd: &mut Command, name: impl Into<String>) -> Result<Proc> {
        let name = name.into();
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        live.push(child.id());
        Ok(Proc { child, name })
    }

    /// Kills the child at once (SIGKILL) and reaps it.
    #[allow(dead_code)] // The integration tests' (tests/common).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget(self.child.id());
    }

    /// Stops the child (SIGTERM, then SIGKILL after [`GRACE`]) and reaps it.
    pub fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) on our own, not yet reaped child has no memory effects.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        forget(self.child.id());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Removes `pid` from the live children (it was reaped).
fn forget(pid: u32) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&p| p != pid);
}

/// Removes `path` (a file or a directory) if a signal ends this process; the
/// owner's `Drop` removes it otherwise.
pub fn remove_on_signal(path: PathBuf) {
    SCRATCH.lock().unwrap_or_else(|p| p.into_inner()).push(path);
}

/// Makes SIGINT, SIGTERM and SIGHUP stop every live child, remove the scratch files
/// and exit with 128 + the signal. Call it before starting children.
pub fn stop_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                ENDING.store(sig, Ordering::SeqCst);
                stop_all();
                for path in SCRATCH.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
                }
                std::process::exit(128 + sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Where a signal is ending this process, waits for the signal thread to end it: the
/// command saw its children stop and would report that as its own failure. Returns
/// at once otherwise.
pub fn await_signal_exit() {
    let sig = ENDING.load(Ordering::SeqCst);
    if sig == 0 {
        return;
    }
    std::thread::sleep(2 * GRACE + Duration::from_secs(1));
    std::process::exit(128 + sig);
}

/// Sends SIGTERM to every live child, waits up to [`GRACE`] for them to exit, and
/// kills those left. Holds the list throughout, so that no child starts meanwhile.
fn stop_all() {
    let live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    let pids: Vec<libc::pid_t> = live.iter().map(|&p| p as libc::pid_t).collect();
    for &pid in &pids {
        // SAFETY: kill(2) has no memory effects; `pid` is a child not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + GRACE;
    let mut left = pids;
    while !left.is_empty() && Instant::now() < deadline {
        // A child is gone once reaped, here (waitpid returns it) or by its owner's
        // thread (waitpid fails: not our child any more).
        left.retain(|&pid| {
            // SAFETY: waitpid(2) with WNOHANG on a child's pid; no memory is shared.
            let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            r == 0
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    for &pid in &left {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
