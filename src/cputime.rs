//! CPU time, user and system together: of this process (all its threads, from
//! `getrusage`) and of another by pid (`/proc/PID/stat`), for the CPU an allreduce
//! costs (`cpu_s_per_allreduce` in `inagg bench` and `inagg worker` reports).

/// Seconds of CPU this process has used so far, all threads, user and system.
pub fn own() -> f64 {
    // SAFETY: getrusage(2) writes one `rusage` that we own and reads nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Seconds of CPU process `pid` has used so far (user and system, all threads), or
/// `None` where it cannot be read (gone, or not Linux).
pub fn of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf(3) reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work_and_matches_proc() {
        // Spin until getrusage shows a tenth of a second of CPU, bounded in wall time
        // (a starved thread on a loaded machine gets its CPU late, not never).
        let before = own();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while own() - before < 0.1 && t.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..10_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let after = own();
        assert!(after - before >= 0.1, "{before} -> {after}");
        let proc = of(std::process::id()).expect("own /proc stat");
        // /proc counts in clock ticks and is read a moment later: it lies
        // between the two readings' rounding and a little past the last.
        assert!(
            proc > before && proc < after + 1.0,
            "{proc} vs {before}..{after}"
        );
        assert_eq!(of(u32::MAX), None);
    }
}
