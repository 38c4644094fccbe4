//! Data: the handwritten digits shipped in `data/` (1,797 images of 8×8), or MNIST IDX files;
//! deterministic splits, standardisation fitted on the training rows, shuffling from a seed.

use std::io::Read;
use std::path::Path;

use ndarray::{Array2, Axis};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub const CLASSES: usize = 10;

/// Images as rows of pixels, with their labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub x: Array2<f32>,
    pub y: Vec<usize>,
    /// Images are `side × side`.
    pub side: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn rows(&self, idx: &[usize]) -> Dataset {
        Dataset {
            x: self.x.select(Axis(0), idx),
            y: idx.iter().map(|&i| self.y[i]).collect(),
            side: self.side,
        }
    }
}

/// The digits set embedded in the example (UCI optdigits via scikit-learn; see data/README.md).
pub fn digits() -> Result<Dataset, Error> {
    const GZ: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(GZ).read_to_string(&mut text)?;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: Vec<f32> = line
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("digits line {}: {e}", n + 1))?;
        if v.len() != 65 || v[64] < 0.0 || v[64] >= CLASSES as f32 {
            return Err(format!("digits line {}: expected 64 pixels and a label", n + 1).into());
        }
        xs.extend_from_slice(&v[..64]);
        ys.push(v[64] as usize);
    }
    Ok(Dataset {
        x: Array2::from_shape_vec((ys.len(), 64), xs)?,
        y: ys,
        side: 8,
    })
}

/// Reads an IDX file, plain or gzipped.
fn idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), Error> {
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .read_to_end(&mut raw)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out)?;
        raw = out;
    }
    let bad = || format!("{} is not an IDX file of unsigned bytes", path.display());
    if raw.len() < 4 || raw[0] != 0 || raw[1] != 0 || raw[2] != 0x08 {
        return Err(bad().into());
    }
    let dims = raw[3] as usize;
    let header = 4 + 4 * dims;
    let shape: Vec<usize> = (0..dims)
        .map(|d| {
            raw.get(4 + 4 * d..8 + 4 * d)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(bad)
        })
        .collect::<Result<_, _>>()?;
    let body = raw.get(header..).ok_or_else(bad)?;
    if body.len() != shape.iter().product::<usize>() {
        return Err(bad().into());
    }
    Ok((shape, body.to_vec()))
}

/// MNIST from `dir`: `train-images-idx3-ubyte` and friends, optionally `.gz`. Returns the official
/// training and test sets.
pub fn mnist(dir: &Path) -> Result<(Dataset, Dataset), Error> {
    let find = |stem: &str| -> Result<std::path::PathBuf, Error> {
        [stem.to_string(), format!("{stem}.gz")]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| format!("{}: no {stem}[.gz]", dir.display()).into())
    };
    let load = |images: &str, labels: &str| -> Result<Dataset, Error> {
        let (shape, pixels) = idx(&find(images)?)?;
        let (lshape, labels) = idx(&find(labels)?)?;
        if shape.len() != 3 || shape[1] != shape[2] || lshape != [shape[0]] {
            return Err(format!("{images}: shape {shape:?} with labels {lshape:?}").into());
        }
        if labels.iter().any(|&l| l as usize >= CLASSES) {
            return Err(format!("{labels:?}: a label is not a digit").into());
        }
        Ok(Dataset {
            x: Array2::from_shape_vec(
                (shape[0], shape[1] * shape[2]),
                pixels.into_iter().map(f32::from).collect(),
            )?,
            y: labels.into_iter().map(usize::from).collect(),
            side: shape[1],
        })
    };
    Ok((
        load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
    ))
}

/// Row indices 0..n shuffled by `seed`, cut into consecutive parts of the given fractions (the
/// last part takes the rest).
pub fn split(n: usize, fractions: &[f64], seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut parts = Vec::new();
    let mut at = 0;
    for (i, f) in fractions.iter().enumerate() {
        let end = if i + 1 == fractions.len() {
            n
        } else {
            (at + (f * n as f64).round() as usize).min(n)
        };
        parts.push(order[at..end].to_vec());
        at = end;
    }
    parts
}

/// Per-pixel mean and standard deviation of `train`, applied to every set (constant pixels keep
/// a deviation of 1, so they map to 0).
pub fn standardise(train: &mut Dataset, others: &mut [&mut Dataset]) {
    let mean = train.x.mean_axis(Axis(0)).unwrap_or_default();
    let std = train
        .x
        .std_axis(Axis(0), 0.0)
        .mapv(|s| if s > 1e-6 { s } else { 1.0 });
    for d in std::iter::once(train).chain(others.iter_mut().map(|d| &mut **d)) {
        d.x -= &mean;
        d.x /= &std;
    }
}
