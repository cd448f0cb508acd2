//! The demo's model: an MLP in candle, with real autodiff, whose parameters every rank
//! initializes identically from one seed.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{linear, Linear, Module, VarBuilder, VarMap};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A ReLU MLP.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    /// Parameters in a fixed order (sorted by name), the same on every rank.
    pub vars: Vec<(String, Var)>,
}

impl Mlp {
    /// `dims[0]` inputs, hidden layers, `dims.last()` outputs; parameters drawn from a
    /// seeded RNG (He uniform), so every rank starts from the same replica.
    pub fn new(dims: &[usize], seed: u64) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear(w[0], w[1], vb.pp(format!("l{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("var map poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rng = SmallRng::seed_from_u64(seed);
        for (name, var) in &vars {
            let shape = var.shape().clone();
            let fan_in = if name.ends_with("weight") {
                shape.dims()[1]
            } else {
                1
            };
            let bound = if name.ends_with("weight") {
                (6.0 / fan_in as f32).sqrt()
            } else {
                0.0
            };
            let vals: Vec<f32> = (0..shape.elem_count())
                .map(|_| {
                    if bound > 0.0 {
                        rng.random_range(-bound..bound)
                    } else {
                        0.0
                    }
                })
                .collect();
            var.set(&Tensor::from_vec(vals, shape, &Device::Cpu)?)?;
        }
        Ok(Self { layers, vars })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Parameters in total.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// FNV-1a over every parameter's bits, in name order.
    pub fn checksum(&self) -> Result<u64> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for (_, v) in &self.vars {
            for x in v.as_tensor().flatten_all()?.to_vec1::<f32>()? {
                for b in x.to_bits().to_le_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        Ok(h)
    }

    /// Fraction of rows of `x` whose arg-max logit is the label.
    pub fn accuracy(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<f64> {
        let pred = self.forward(x)?.argmax(D::Minus1)?;
        let hits = pred
            .eq(y)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok(f64::from(hits) / y.dims()[0].max(1) as f64)
    }
}
