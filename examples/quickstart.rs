//! Trains a small real model with a fused optimizer on the best available device, and says what it
//! did: a 64-128-10 MLP on handwritten digits (data/digits.csv.gz), AdamW with global-norm clipping
//! and a warmup-then-cosine schedule, biases in a no-decay group.
//!
//! cargo run --release --example quickstart

use std::io::Read;
use std::time::Instant;

use fusedopt::schedule::{optax::Schedule, Counted};
use fusedopt::{
    Adam, Device, Flavor, GlobalNormClip, GroupOptions, Optimizer, OptimizerOptions, ParamSet,
};
use ndarray::{Array1, Array2, Axis};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 128;
const CLASSES: usize = 10;
const BATCH: usize = 64;
const EPOCHS: usize = 30;

fn load_digits() -> Result<(Array2<f32>, Vec<usize>), Box<dyn std::error::Error>> {
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
fn train_batch(opt: &mut Optimizer, x: &Array2<f32>, y: &[usize]) -> fusedopt::Result<f32> {
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

fn softmax_cross_entropy(logits: &Array2<f32>, y: &[usize]) -> (Array2<f32>, f32) {
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

fn accuracy(opt: &Optimizer, x: &Array2<f32>, y: &[usize]) -> fusedopt::Result<f32> {
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let selection = Device::auto();
    let device = selection.device;
    match &selection.gpu_unavailable {
        Some(why) => println!("device: cpu (GPU not used: {why})"),
        None => println!("device: {device} ({})", device.name().unwrap_or_default()),
    }

    let (x, y) = load_digits()?;
    let mut rng = StdRng::seed_from_u64(0);
    let mut order: Vec<usize> = (0..y.len()).collect();
    order.shuffle(&mut rng);
    let split = y.len() * 4 / 5;
    let (train_idx, test_idx) = order.split_at(split);
    let (x_test, y_test) = (
        x.select(Axis(0), test_idx),
        test_idx.iter().map(|&i| y[i]).collect::<Vec<_>>(),
    );
    println!(
        "data: {} digits ({} train, {} test), 8x8 pixels, 10 classes",
        y.len(),
        train_idx.len(),
        test_idx.len()
    );

    let mut init = |n: usize, fan_in: usize| -> Vec<f32> {
        let bound = (6.0 / fan_in as f32).sqrt();
        (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
    };
    let (fc1, fc2) = (init(HIDDEN * 64, 64), init(CLASSES * HIDDEN, HIDDEN));
    let build = |device: Device| -> fusedopt::Result<ParamSet> {
        let mut b = ParamSet::builder();
        b.group("no_decay", GroupOptions::no_decay())?;
        b.add("fc1.weight", &[HIDDEN, 64], &fc1)?;
        b.add("fc2.weight", &[CLASSES, HIDDEN], &fc2)?;
        b.add_to("no_decay", "fc1.bias", &[HIDDEN], &[0.0; HIDDEN])?;
        b.add_to("no_decay", "fc2.bias", &[CLASSES], &[0.0; CLASSES])?;
        b.build(device)
    };
    let params = build(device)?;
    println!(
        "model: MLP 64-{HIDDEN}-10, {} parameters in 4 tensors, 2 groups",
        params.layout().num_params()
    );

    let steps_per_epoch = train_idx.len().div_ceil(BATCH);
    let total = (EPOCHS * steps_per_epoch) as f64;
    let (rule, lr) = (Adam::adamw(Flavor::PyTorch), 3e-3);
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        ..Default::default()
    };
    let mut opt = match Optimizer::with_options(params, rule.clone(), lr, options) {
        Ok(opt) => opt,
        Err(e) if device != Device::Cpu => {
            println!("device: cpu (the CUDA engine could not start: {e})");
            Optimizer::with_options(build(Device::Cpu)?, rule, lr, options)?
        }
        Err(e) => return Err(e.into()),
    };
    opt.set_schedule(Some(Box::new(Counted::new(Schedule::warmup_cosine_decay(
        0.0,
        3e-3,
        steps_per_epoch as f64,
        total,
        1e-5,
        1.0,
    )))))?;
    println!("optimizer: AdamW (PyTorch flavor), clip 1.0, warmup 1 epoch then cosine, {EPOCHS} epochs of batch {BATCH}");

    let start = Instant::now();
    let mut step_time = 0.0;
    let mut shuffled = train_idx.to_vec();
    for epoch in 1..=EPOCHS {
        shuffled.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut clipped = 0;
        for batch in shuffled.chunks(BATCH) {
            let xb = x.select(Axis(0), batch);
            let yb: Vec<usize> = batch.iter().map(|&i| y[i]).collect();
            loss_sum += train_batch(&mut opt, &xb, &yb)?;
            let t = Instant::now();
            opt.step()?;
            let report = opt.report()?;
            step_time += t.elapsed().as_secs_f64();
            clipped += (report.clip_factor < 1.0) as usize;
        }
        if epoch % 5 == 0 || epoch == 1 {
            println!(
                "epoch {epoch:>2}: train loss {:.4}, test accuracy {:.2}%, lr {:.2e}, {clipped} of {steps_per_epoch} steps clipped",
                loss_sum / steps_per_epoch as f32,
                100.0 * accuracy(&opt, &x_test, &y_test)?,
                opt.lr()
            );
        }
    }
    println!(
        "done: {} fused steps in {:.2} s ({:.1} µs per optimizer step), final test accuracy {:.2}%",
        opt.step_count().unwrap(),
        start.elapsed().as_secs_f64(),
        1e6 * step_time / opt.step_count().unwrap() as f64,
        100.0 * accuracy(&opt, &x_test, &y_test)?
    );
    Ok(())
}
