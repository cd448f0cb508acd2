//! Training data for the demo: a seeded synthetic classification task generated at
//! start (no download), or MNIST from the standard IDX files.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A labelled set: `n` rows of `dim` features, labels below `classes`.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dim: usize,
    pub classes: usize,
    pub x: Vec<f32>,
    pub y: Vec<u32>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Rows `i` with `i % world == rank`: this rank's shard.
    pub fn shard(&self, rank: usize, world: usize) -> Dataset {
        let rows: Vec<usize> = (0..self.len())
            .filter(|i| i % world.max(1) == rank)
            .collect();
        self.rows(&rows)
    }

    /// The given rows, in that order.
    pub fn rows(&self, rows: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(rows.len() * self.dim);
        for &r in rows {
            x.extend_from_slice(&self.x[r * self.dim..(r + 1) * self.dim]);
        }
        Dataset {
            dim: self.dim,
            classes: self.classes,
            x,
            y: rows.iter().map(|&r| self.y[r]).collect(),
        }
    }
}

/// A train and a test set.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Dataset,
    pub test: Dataset,
    /// For the synthetic task, the held-out accuracy of the noise-free teacher: about
    /// the best a model can reach.
    pub ceiling: Option<f64>,
}

fn normal(rng: &mut SmallRng) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Labels from a fixed random teacher network (32 inputs, 64 tanh units, 10 classes)
/// with Gumbel noise (scale 0.25) on its logits: learnable, but not linearly separable and not
/// perfectly predictable (the noise caps accuracy below 100%).
pub fn synthetic(seed: u64, train: usize, test: usize) -> Split {
    const DIM: usize = 32;
    const HIDDEN: usize = 64;
    const CLASSES: usize = 10;
    let mut rng = SmallRng::seed_from_u64(seed);
    let w1: Vec<f32> = (0..DIM * HIDDEN)
        .map(|_| normal(&mut rng) / (DIM as f32).sqrt())
        .collect();
    let w2: Vec<f32> = (0..HIDDEN * CLASSES)
        .map(|_| 2.0 * normal(&mut rng) / (HIDDEN as f32).sqrt())
        .collect();
    let mut make = |n: usize| {
        let mut x = Vec::with_capacity(n * DIM);
        let mut y = Vec::with_capacity(n);
        let mut agree = 0usize;
        for _ in 0..n {
            let row: Vec<f32> = (0..DIM).map(|_| normal(&mut rng)).collect();
            let h: Vec<f32> = (0..HIDDEN)
                .map(|j| {
                    (0..DIM)
                        .map(|i| row[i] * w1[i * HIDDEN + j])
                        .sum::<f32>()
                        .tanh()
                })
                .collect();
            let mut best = (0, f32::NEG_INFINITY);
            let mut clean = (0, f32::NEG_INFINITY);
            for c in 0..CLASSES {
                let logit: f32 = (0..HIDDEN).map(|j| h[j] * w2[j * CLASSES + c]).sum();
                if logit > clean.1 {
                    clean = (c, logit);
                }
                let u: f32 = rng.random_range(1e-6f32..1.0);
                let noisy = logit - 0.25 * (-u.ln()).ln();
                if noisy > best.1 {
                    best = (c, noisy);
                }
            }
            agree += usize::from(clean.0 == best.0);
            x.extend_from_slice(&row);
            y.push(best.0 as u32);
        }
        let d = Dataset {
            dim: DIM,
            classes: CLASSES,
            x,
            y,
        };
        (d, agree as f64 / n.max(1) as f64)
    };
    let (train, _) = make(train);
    let (test, ceiling) = make(test);
    Split {
        train,
        test,
        ceiling: Some(ceiling),
    }
}

/// The bytes of an IDX file at `path`, or of its gzipped form at `path.gz` (as the
/// datasets are distributed, and as Debian's dataset-fashion-mnist installs them).
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    if path.exists() {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    }
    let mut gz = path.as_os_str().to_owned();
    gz.push(".gz");
    let gz = Path::new(&gz);
    let file = std::fs::File::open(gz)
        .with_context(|| format!("reading {} (or {})", path.display(), gz.display()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut bytes)
        .with_context(|| format!("decompressing {}", gz.display()))?;
    Ok(bytes)
}

fn read_idx(path: &Path, want_magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    if bytes.len() < 4 {
        bail!("{}: too short for an IDX file", path.display());
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != want_magic {
        bail!(
            "{}: IDX magic {magic:#010x}, expected {want_magic:#010x}",
            path.display()
        );
    }
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        bail!("{}: truncated IDX header", path.display());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
    match count {
        Some(c) if bytes.len() == header + c => Ok((dims, bytes[header..].to_vec())),
        _ => bail!(
            "{}: IDX dimensions {dims:?} do not match {} data bytes",
            path.display(),
            bytes.len() - header
        ),
    }
}

fn load_idx_pair(images: &Path, labels: &Path) -> Result<Dataset> {
    let (idims, pixels) = read_idx(images, 0x0000_0803)?;
    let (ldims, labels_raw) = read_idx(labels, 0x0000_0801)?;
    if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
        bail!("MNIST files disagree: images {idims:?}, labels {ldims:?}");
    }
    let dim = idims[1] * idims[2];
    if let Some(bad) = labels_raw.iter().find(|l| **l > 9) {
        bail!("{}: label {bad} is not a digit", labels.display());
    }
    Ok(Dataset {
        dim,
        classes: 10,
        x: pixels.iter().map(|p| f32::from(*p) / 255.0).collect(),
        y: labels_raw.iter().map(|l| u32::from(*l)).collect(),
    })
}

/// MNIST from `dir`: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (uncompressed).
pub fn mnist(dir: &Path) -> Result<Split> {
    let train = load_idx_pair(
        &dir.join("train-images-idx3-ubyte"),
        &dir.join("train-labels-idx1-ubyte"),
    )?;
    let test = load_idx_pair(
        &dir.join("t10k-images-idx3-ubyte"),
        &dir.join("t10k-labels-idx1-ubyte"),
    )?;
    if train.dim != test.dim {
        bail!("MNIST train and test images differ in size");
    }
    Ok(Split {
        train,
        test,
        ceiling: None,
    })
}

/// Writes an IDX file (used by tests to build a tiny MNIST).
#[cfg(test)]
pub fn write_idx(path: &Path, magic: u32, dims: &[u32], data: &[u8]) -> std::io::Result<()> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    std::fs::write(path, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_seeded_and_balanced_enough() {
        let a = synthetic(1, 2000, 10);
        let b = synthetic(1, 2000, 10);
        assert_eq!(a.train.y, b.train.y);
        let mut counts = [0usize; 10];
        for y in &a.train.y {
            counts[*y as usize] += 1;
        }
        assert!(
            counts.iter().filter(|c| **c > 50).count() >= 6,
            "{counts:?}"
        );
        assert_eq!(a.train.shard(1, 4).len(), 500);
    }

    #[test]
    fn idx_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("inagg-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let px: Vec<u8> = (0..3 * 4).map(|i| (i * 20) as u8).collect();
        for (img, lab) in [
            ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ] {
            write_idx(&dir.join(img), 0x803, &[3, 2, 2], &px).expect("write");
            write_idx(&dir.join(lab), 0x801, &[3], &[1, 7, 9]).expect("write");
        }
        let s = mnist(&dir).expect("load");
        assert_eq!((s.train.dim, s.train.len()), (4, 3));
        assert_eq!(s.test.y, vec![1, 7, 9]);
        assert!((s.train.x[1] - 20.0 / 255.0).abs() < 1e-6);
        write_idx(&dir.join("t10k-labels-idx1-ubyte"), 0x801, &[2], &[1, 2]).expect("write");
        assert!(mnist(&dir).is_err(), "count mismatch");
        write_idx(&dir.join("t10k-labels-idx1-ubyte"), 0x803, &[3], &[1, 2, 3]).expect("write");
        assert!(mnist(&dir).is_err(), "wrong magic");
        std::fs::remove_file(dir.join("t10k-labels-idx1-ubyte")).expect("rm");
        assert!(mnist(&dir).is_err(), "missing file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
