//! Trains a small real model with a fused optimizer on the best available device, and says what it
//! did: a 64-128-10 MLP on handwritten digits (data/digits.csv.gz), AdamW with global-norm clipping
//! and a warmup-then-cosine schedule, biases in a no-decay group.
//!
//! cargo run --release --example quickstart

#[path = "shared/digits.rs"]
mod digits;

use std::time::Instant;

use fusedopt::schedule::{optax::Schedule, Counted};
use fusedopt::{
    Adam, Device, Flavor, GlobalNormClip, GroupOptions, Optimizer, OptimizerOptions, ParamSet,
};
use ndarray::Axis;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use digits::{accuracy, load_digits, train_batch, CLASSES, HIDDEN};

const BATCH: usize = 64;
const EPOCHS: usize = 30;

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
