//! Statistics over measurements: medians and Jain's fairness index.

/// The median of `v` (0 for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Jain's fairness index of `x`: 1 when all are equal, 1/n when one takes all.
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares > 0.0 {
        sum * sum / (x.len() as f64 * squares)
    } else {
        1.0
    }
}
