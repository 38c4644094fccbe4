//! The digits MLP the quickstart and custom-rule examples train: data (embedded), forward and
//! backward passes writing gradients into the optimizer's arena, and test accuracy.

use std::io::Read;

use fusedopt::Optimizer;
use ndarray::{Array1, Array2, Axis};

pub const HIDDEN: usize = 128;
pub const CLASSES: usize = 10;

pub fn load_digits() -> Result<(Array2<f32>, Vec<usize>), Box<dyn std::error::Error>> {
    // Embedded, so the program runs wherever it is copied (the GPU bundle carries it).
    const GZ: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(GZ).read_to_string(&mut text)?;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Vec<f32> = line
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?;
        xs.extend(v[..64].iter().map(|p| p / 16.0));
        ys.push(v[64] as usize);
    }
    Ok((Array2::from_shape_vec((ys.len(), 64), xs)?, ys))
}

/// Forward and backward of the MLP on one batch; writes gradients into the optimizer's arena and
/// returns the mean cross-entropy.
pub fn train_batch(opt: &mut Optimizer, x: &Array2<f32>, y: &[usize]) -> fusedopt::Result<f32> {
    let p = opt.params();
    let w1 = Array2::from_shape_vec((HIDDEN, 64), p.read_param("fc1.weight")?).expect("shape");
    let b1 = Array1::from(p.read_param("fc1.bias")?);
    let w2 = Array2::from_shape_vec((CLASSES, HIDDEN), p.read_param("fc2.weight")?).expect("shape");
    let b2 = Array1::from(p.read_param("fc2.bias")?);
    let pre = x.dot(&w1.t()) + &b1;
    let h = pre.mapv(|v| v.max(0.0));
    let logits = h.dot(&w2.t()) + &b2;
    let (probs, loss) = softmax_cross_entropy(&logits, y);
    let n = y.len() as f32;
    let mut dlogits = probs;
    for (mut row, &label) in dlogits.axis_iter_mut(Axis(0)).zip(y) {
        row[label] -= 1.0;
    }
    dlogits /= n;
    let dw2 = dlogits.t().dot(&h);
    let db2 = dlogits.sum_axis(Axis(0));
    let mut dh = dlogits.dot(&w2);
    dh.zip_mut_with(&pre, |d, &z| {
        if z <= 0.0 {
            *d = 0.0
        }
    });
    let dw1 = dh.t().dot(x);
    let db1 = dh.sum_axis(Axis(0));
    // set_grad works on every device (a copy to the GPU there); on the CPU, grad_mut gives the
    // arena slice itself for a backward pass that writes in place.
    let mut grads = opt.params_mut();
    let flat = |g: ndarray::ArrayViewD<'_, f32>| g.iter().copied().collect::<Vec<f32>>();
    for (name, g) in [
        ("fc1.weight", dw1.view().into_dyn()),
        ("fc2.weight", dw2.view().into_dyn()),
        ("fc1.bias", db1.view().into_dyn()),
        ("fc2.bias", db2.view().into_dyn()),
    ] {
        grads.set_grad(name, &flat(g))?;
    }
    Ok(loss)
}

pub fn softmax_cross_entropy(logits: &Array2<f32>, y: &[usize]) -> (Array2<f32>, f32) {
    let mut probs = logits.clone();
    let mut loss = 0.0;
    for (mut row, &label) in probs.axis_iter_mut(Axis(0)).zip(y) {
        let max = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row /= sum;
        loss -= row[label].max(1e-12).ln();
    }
    (probs, loss / y.len() as f32)
}

pub fn accuracy(opt: &Optimizer, x: &Array2<f32>, y: &[usize]) -> fusedopt::Result<f32> {
    let p = opt.params();
    let w1 = Array2::from_shape_vec((HIDDEN, 64), p.read_param("fc1.weight")?).expect("shape");
    let w2 = Array2::from_shape_vec((CLASSES, HIDDEN), p.read_param("fc2.weight")?).expect("shape");
    let h = (x.dot(&w1.t()) + &Array1::from(p.read_param("fc1.bias")?)).mapv(|v| v.max(0.0));
    let logits = h.dot(&w2.t()) + &Array1::from(p.read_param("fc2.bias")?);
    let correct = logits
        .axis_iter(Axis(0))
        .zip(y)
        .filter(|(row, &label)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| {
                        if v > b.1 {
                            (i, v)
                        } else {
                            b
                        }
                    },
                );
            best.0 == label
        })
        .count();
    Ok(correct as f32 / y.len() as f32)
}
