//! The models (an MLP and a small CNN) and the losses, forward and backward on the CPU with
//! ndarray's matrix products. Gradients are emitted last layer first, so a data-parallel engine
//! can start reducing them while earlier layers are still being differentiated.

use std::borrow::Cow;

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, Axis, CowArray, Ix1, Ix2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::CLASSES;

/// Where a forward pass reads parameters from: an optimizer's set, or a replica's view of it.
/// Borrowed where they are fp32 masters, widened (or joined) where they are not.
pub trait Params {
    fn param(&self, name: &str) -> fusedopt::Result<Cow<'_, [f32]>>;
}

impl Params for fusedopt::ParamSet {
    fn param(&self, name: &str) -> fusedopt::Result<Cow<'_, [f32]>> {
        match fusedopt::ParamSet::param(self, name) {
            Err(fusedopt::Error::MastersNotF32(_)) => Ok(Cow::Owned(self.read_param(name)?)),
            p => p.map(Cow::Borrowed),
        }
    }
}

impl Params for fusedopt::parallel::Gradients<'_> {
    fn param(&self, name: &str) -> fusedopt::Result<Cow<'_, [f32]>> {
        match fusedopt::parallel::Gradients::param(self, name) {
            Err(fusedopt::Error::MastersNotF32(_)) => Ok(Cow::Owned(self.read_param(name)?)),
            p => p.map(Cow::Borrowed),
        }
    }
}

/// A parameter as a vector, borrowed or owned.
fn vector<'a>(p: &'a dyn Params, name: &str) -> fusedopt::Result<CowArray<'a, f32, Ix1>> {
    Ok(match p.param(name)? {
        Cow::Borrowed(v) => CowArray::from(ArrayView1::from(v)),
        Cow::Owned(v) => CowArray::from(Array1::from(v)),
    })
}

#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    Mlp {
        hidden: Vec<usize>,
    },
    /// One 3×3 convolution (padding 1) with `channels` filters, ReLU, 2×2 max-pooling, then an MLP.
    Cnn {
        channels: usize,
        hidden: Vec<usize>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Loss {
    /// Softmax cross-entropy.
    CrossEntropy,
    /// Multi-class hinge, max(0, 1 + max_{j≠y} s_j − s_y) (Keras' categorical_hinge).
    Hinge,
    /// Mean squared error between the outputs and the one-hot labels.
    Mse,
}

/// One parameter tensor of the model.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Biases take no weight decay.
    pub decay: bool,
    pub fan_in: usize,
}

#[derive(Clone, Debug)]
pub struct Model {
    pub arch: Arch,
    pub side: usize,
}

/// What the backward pass needs from the forward pass.
pub struct Forward {
    pub logits: Array2<f32>,
    /// Inputs of each dense layer, and each dense layer's pre-activation (all but the last).
    dense_in: Vec<Array2<f32>>,
    dense_pre: Vec<Array2<f32>>,
    conv: Option<ConvCache>,
}

struct ConvCache {
    patches: Array2<f32>,
    pre: Array2<f32>,
    /// For each pooled output (batch row, feature), the row of `pre` that won the max.
    argmax: Array2<usize>,
}

fn view<'a>(
    p: &'a dyn Params,
    name: &str,
    rows: usize,
    cols: usize,
) -> fusedopt::Result<CowArray<'a, f32, Ix2>> {
    let shape_error = |e: ndarray::ShapeError| fusedopt::Error::ShapeMismatch {
        what: format!("{name}: {e}"),
        expected: vec![rows, cols],
        got: vec![],
    };
    Ok(match p.param(name)? {
        Cow::Borrowed(v) => {
            CowArray::from(ArrayView2::from_shape((rows, cols), v).map_err(shape_error)?)
        }
        Cow::Owned(v) => {
            CowArray::from(Array2::from_shape_vec((rows, cols), v).map_err(shape_error)?)
        }
    })
}

impl Model {
    /// Widths of the dense layers, input first.
    fn dense_widths(&self) -> Vec<usize> {
        let (first, hidden) = match &self.arch {
            Arch::Mlp { hidden } => (self.side * self.side, hidden),
            Arch::Cnn { channels, hidden } => (channels * (self.side / 2).pow(2), hidden),
        };
        let mut w = vec![first];
        w.extend(hidden);
        w.push(CLASSES);
        w
    }

    /// Every tensor in forward order (so the last layer ends the arena).
    pub fn specs(&self) -> Vec<Spec> {
        let mut v = Vec::new();
        if let Arch::Cnn { channels, .. } = self.arch {
            v.push(Spec {
                name: "conv.weight".into(),
                shape: vec![channels, 1, 3, 3],
                decay: true,
                fan_in: 9,
            });
            v.push(Spec {
                name: "conv.bias".into(),
                shape: vec![channels],
                decay: false,
                fan_in: 9,
            });
        }
        for (i, w) in self.dense_widths().windows(2).enumerate() {
            v.push(Spec {
                name: format!("fc{}.weight", i + 1),
                shape: vec![w[1], w[0]],
                decay: true,
                fan_in: w[0],
            });
            v.push(Spec {
                name: format!("fc{}.bias", i + 1),
                shape: vec![w[1]],
                decay: false,
                fan_in: w[0],
            });
        }
        v
    }

    /// He-uniform weights and zero biases, from `seed`.
    pub fn init(&self, seed: u64) -> Vec<(Spec, Vec<f32>)> {
        let mut rng = StdRng::seed_from_u64(seed);
        self.specs()
            .into_iter()
            .map(|s| {
                let n: usize = s.shape.iter().product();
                let bound = (6.0 / s.fan_in as f32).sqrt();
                let v = if s.decay {
                    (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
                } else {
                    vec![0.0; n]
                };
                (s, v)
            })
            .collect()
    }

    pub fn describe(&self) -> String {
        let widths: Vec<String> = self.dense_widths().iter().map(|w| w.to_string()).collect();
        match &self.arch {
            Arch::Mlp { .. } => format!("MLP {}", widths.join("-")),
            Arch::Cnn { channels, .. } => format!(
                "CNN conv3x3×{channels}+ReLU+maxpool2 ({0}×{0}×1 → {1}×{1}×{channels}), dense {2}",
                self.side,
                self.side / 2,
                widths.join("-")
            ),
        }
    }

    pub fn forward(&self, p: &dyn Params, x: &Array2<f32>) -> fusedopt::Result<Forward> {
        let (mut h, conv) = match self.arch {
            Arch::Mlp { .. } => (x.clone(), None),
            Arch::Cnn { channels, .. } => {
                let (pooled, cache) = self.conv_forward(p, x, channels)?;
                (pooled, Some(cache))
            }
        };
        let widths = self.dense_widths();
        let layers = widths.len() - 1;
        let (mut dense_in, mut dense_pre) = (Vec::new(), Vec::new());
        for i in 0..layers {
            let w = view(p, &format!("fc{}.weight", i + 1), widths[i + 1], widths[i])?;
            let b = vector(p, &format!("fc{}.bias", i + 1))?;
            let z = h.dot(&w.t()) + b;
            dense_in.push(h);
            if i + 1 == layers {
                return Ok(Forward {
                    logits: z,
                    dense_in,
                    dense_pre,
                    conv,
                });
            }
            h = z.mapv(|v| v.max(0.0));
            dense_pre.push(z);
        }
        unreachable!("a model has at least one dense layer")
    }

    /// im2col of a batch of single-channel images: one row of 9 taps per output pixel.
    fn patches(&self, x: &Array2<f32>) -> Array2<f32> {
        let s = self.side as isize;
        let mut out = Array2::zeros((x.nrows() * self.side * self.side, 9));
        for (b, img) in x.axis_iter(Axis(0)).enumerate() {
            for y in 0..s {
                for xx in 0..s {
                    let row = (b * self.side + y as usize) * self.side + xx as usize;
                    for (t, (dy, dx)) in (-1..=1)
                        .flat_map(|dy| (-1..=1).map(move |dx| (dy, dx)))
                        .enumerate()
                    {
                        let (yy, xs) = (y + dy, xx + dx);
                        if (0..s).contains(&yy) && (0..s).contains(&xs) {
                            out[[row, t]] = img[(yy * s + xs) as usize];
                        }
                    }
                }
            }
        }
        out
    }

    fn conv_forward(
        &self,
        p: &dyn Params,
        x: &Array2<f32>,
        c: usize,
    ) -> fusedopt::Result<(Array2<f32>, ConvCache)> {
        let patches = self.patches(x);
        let w = view(p, "conv.weight", c, 9)?;
        let pre = patches.dot(&w.t()) + vector(p, "conv.bias")?;
        let (s, h) = (self.side, self.side / 2);
        let batch = x.nrows();
        let mut pooled = Array2::zeros((batch, c * h * h));
        let mut argmax = Array2::zeros((batch, c * h * h));
        for b in 0..batch {
            for ch in 0..c {
                for py in 0..h {
                    for px in 0..h {
                        let mut best = (0usize, f32::NEG_INFINITY);
                        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                            let row = (b * s + 2 * py + dy) * s + 2 * px + dx;
                            let v = pre[[row, ch]].max(0.0);
                            if v > best.1 {
                                best = (row, v);
                            }
                        }
                        let f = (ch * h + py) * h + px;
                        pooled[[b, f]] = best.1;
                        argmax[[b, f]] = best.0;
                    }
                }
            }
        }
        Ok((
            pooled,
            ConvCache {
                patches,
                pre,
                argmax,
            },
        ))
    }

    /// Gradients of the mean loss, handed to `emit(name, values)` last layer first (bias before
    /// weight).
    pub fn backward(
        &self,
        p: &dyn Params,
        fwd: &Forward,
        dlogits: Array2<f32>,
        emit: &mut dyn FnMut(&str, &[f32]) -> fusedopt::Result<()>,
    ) -> fusedopt::Result<()> {
        let widths = self.dense_widths();
        let mut d = dlogits;
        for i in (0..widths.len() - 1).rev() {
            let dw = d.t().dot(&fwd.dense_in[i]);
            let db = d.sum_axis(Axis(0));
            emit(&format!("fc{}.bias", i + 1), &flat(db.view()))?;
            emit(&format!("fc{}.weight", i + 1), &flat(dw.view()))?;
            if i == 0 && fwd.conv.is_none() {
                break;
            }
            let w = view(p, &format!("fc{}.weight", i + 1), widths[i + 1], widths[i])?;
            d = d.dot(&w);
            if i > 0 {
                d.zip_mut_with(&fwd.dense_pre[i - 1], |g, &z| {
                    if z <= 0.0 {
                        *g = 0.0
                    }
                });
            }
        }
        if let (Some(c), Arch::Cnn { channels, .. }) = (&fwd.conv, &self.arch) {
            // Route each pooled gradient to the pixel that won the max, through the ReLU.
            let mut dpre = Array2::<f32>::zeros(c.pre.raw_dim());
            for ((b, f), &row) in c.argmax.indexed_iter() {
                let ch = f / (self.side / 2).pow(2);
                if c.pre[[row, ch]] > 0.0 {
                    dpre[[row, ch]] += d[[b, f]];
                }
            }
            let dw = dpre.t().dot(&c.patches);
            let db = dpre.sum_axis(Axis(0));
            debug_assert_eq!(dw.dim(), (*channels, 9));
            emit("conv.bias", &flat(db.view()))?;
            emit("conv.weight", &flat(dw.view()))?;
        }
        Ok(())
    }
}

impl Loss {
    /// The mean loss over the batch and its gradient with respect to the logits.
    pub fn eval(self, logits: &Array2<f32>, y: &[usize]) -> (f32, Array2<f32>) {
        let n = y.len().max(1) as f32;
        let mut d = Array2::zeros(logits.raw_dim());
        let mut total = 0.0f64;
        for ((row, mut drow), &label) in logits
            .axis_iter(Axis(0))
            .zip(d.axis_iter_mut(Axis(0)))
            .zip(y)
        {
            match self {
                Loss::CrossEntropy => {
                    let p = softmax(row);
                    total -= f64::from(p[label].max(1e-30).ln());
                    drow.assign(&(p / n));
                    drow[label] -= 1.0 / n;
                }
                Loss::Hinge => {
                    let (j, best) = row.iter().enumerate().filter(|&(j, _)| j != label).fold(
                        (0, f32::NEG_INFINITY),
                        |a, (j, &v)| if v > a.1 { (j, v) } else { a },
                    );
                    let margin = 1.0 + best - row[label];
                    if margin > 0.0 {
                        total += f64::from(margin);
                        drow[j] += 1.0 / n;
                        drow[label] -= 1.0 / n;
                    }
                }
                Loss::Mse => {
                    for (k, (&s, g)) in row.iter().zip(drow.iter_mut()).enumerate() {
                        let e = s - if k == label { 1.0 } else { 0.0 };
                        total += f64::from(e * e) / CLASSES as f64;
                        *g = 2.0 * e / (n * CLASSES as f32);
                    }
                }
            }
        }
        ((total / f64::from(n)) as f32, d)
    }
}

pub fn softmax(row: ArrayView1<f32>) -> Array1<f32> {
    let max = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e = row.mapv(|v| (v - max).exp());
    let sum = e.sum();
    e / sum
}

/// Rows `range` of a batch (a replica's share).
pub fn rows(x: &Array2<f32>, range: std::ops::Range<usize>) -> Array2<f32> {
    x.slice(s![range, ..]).to_owned()
}

/// The elements in row-major order, whatever the array's memory layout.
fn flat<D: ndarray::Dimension>(a: ndarray::ArrayView<f32, D>) -> Vec<f32> {
    a.iter().copied().collect()
}
