//! A user-written optimizer rule, fused like the built-in ones: sign momentum (signum,
//! `m = β·m + (1−β)·g; θ −= lr·sign(m)`), with decoupled weight decay and global-norm clipping
//! from the library, trained on the handwritten digits (the quickstart's MLP).
//!
//! cargo run --release --example custom_rule

#[path = "shared/digits.rs"]
mod digits;

use fusedopt::schedule::{optax::Schedule, Counted, LrSchedule};
use fusedopt::{
    CustomRule, Device, Error, Flavor, GlobalNormClip, GroupOptions, Optimizer, OptimizerOptions,
    ParamSet, WeightDecay,
};
use ndarray::Axis;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use digits::{accuracy, load_digits, train_batch, CLASSES, HIDDEN};

const BATCH: usize = 64;
const EPOCHS: usize = 30;
const LR: f64 = 2e-3;

/// Sign momentum, written once for the CPU engine and once in CUDA C++ for the GPU; its
/// coefficients are arithmetic the library evaluates once per step.
fn sign_momentum(beta: f64) -> fusedopt::Result<CustomRule> {
    let mut r = CustomRule::builder("sign_momentum");
    r.hyperparameter("beta", beta)
        .slot("m", 0.0)
        .coefficient("lr", "lr")
        .coefficient("beta", "beta")
        .coefficient("one_minus_beta", "1 - beta")
        .cpu(|k, p, g, s| {
            s[0] = k[1] * s[0] + k[2] * g;
            let sign = if s[0] > 0.0 {
                1.0
            } else if s[0] < 0.0 {
                -1.0
            } else {
                0.0
            };
            *p -= k[0] * sign;
        })
        .cuda(
            "s[0] = k.beta * s[0] + k.one_minus_beta * g;
             p -= k.lr * (s[0] > 0.0f ? 1.0f : (s[0] < 0.0f ? -1.0f : 0.0f));",
        );
    Ok(r.build()?.with_weight_decay(WeightDecay::Decoupled(0.01)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // On a GPU the rule's CUDA body is compiled (NVRTC) into the fused kernels when the optimizer
    // is built; on the CPU its Rust function runs in the engine's loop.
    let selection = Device::auto();
    let mut device = selection.device;
    match &selection.gpu_unavailable {
        Some(why) => println!("device: cpu (GPU not used: {why})"),
        None => println!("device: {device} ({})", device.name().unwrap_or_default()),
    }
    let (x, y) = load_digits()?;
    let mut rng = StdRng::seed_from_u64(0);
    let mut order: Vec<usize> = (0..y.len()).collect();
    order.shuffle(&mut rng);
    let (train_idx, test_idx) = order.split_at(y.len() * 4 / 5);
    let x_test = x.select(Axis(0), test_idx);
    let y_test: Vec<usize> = test_idx.iter().map(|&i| y[i]).collect();

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
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        ..Default::default()
    };
    let mut opt = match Optimizer::with_options(build(device)?, sign_momentum(0.9)?, LR, options) {
        Ok(opt) => opt,
        Err(e) if device != Device::Cpu => {
            println!("device: cpu (the CUDA engine could not start: {e})");
            device = Device::Cpu;
            Optimizer::with_options(build(device)?, sign_momentum(0.9)?, LR, options)?
        }
        Err(e) => return Err(e.into()),
    };
    let steps_per_epoch = train_idx.len().div_ceil(BATCH);
    let total = (EPOCHS * steps_per_epoch) as f64;
    let schedule = || {
        let s = Schedule::warmup_cosine_decay(0.0, LR, steps_per_epoch as f64, total, 1e-5, 1.0);
        Some(Box::new(Counted::new(s)) as Box<dyn LrSchedule>)
    };
    opt.set_schedule(schedule())?;
    println!(
        "rule: sign momentum (β 0.9), decoupled decay 0.01, clip 1.0, lr {LR} warmup then cosine, \
         {EPOCHS} epochs of batch {BATCH}"
    );
    let mut shuffled = train_idx.to_vec();
    for epoch in 1..=EPOCHS {
        shuffled.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for batch in shuffled.chunks(BATCH) {
            let yb: Vec<usize> = batch.iter().map(|&i| y[i]).collect();
            loss_sum += train_batch(&mut opt, &x.select(Axis(0), batch), &yb)?;
            opt.step()?;
        }
        if epoch % 5 == 0 || epoch == 1 {
            println!(
                "epoch {epoch:>2}: train loss {:.4}, test accuracy {:.2}%",
                loss_sum / steps_per_epoch as f32,
                100.0 * accuracy(&opt, &x_test, &y_test)?
            );
        }
    }
    let final_accuracy = accuracy(&opt, &x_test, &y_test)?;
    println!("final test accuracy {:.2}%", 100.0 * final_accuracy);

    // A checkpoint records the rule: it loads into the same rule, and is refused by another.
    let dir = std::env::temp_dir().join(format!("fusedopt-custom-rule-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("signum.safetensors");
    opt.save_checkpoint(&path)?;
    let mut same = Optimizer::with_options(build(device)?, sign_momentum(0.9)?, LR, options)?;
    same.set_schedule(schedule())?;
    same.load_checkpoint(&path)?;
    let mut other = Optimizer::with_options(build(device)?, sign_momentum(0.8)?, LR, options)?;
    other.set_schedule(schedule())?;
    match other.load_checkpoint(&path) {
        Err(e @ Error::BadCheckpoint { .. }) => {
            println!("checkpoint: reloads; another β is refused ({e})")
        }
        other => return Err(format!("a checkpoint loaded into another rule: {other:?}").into()),
    }
    std::fs::remove_dir_all(&dir)?;
    if final_accuracy < 0.9 {
        return Err(format!("sign momentum reached only {:.2}%", 100.0 * final_accuracy).into());
    }
    Ok(())
}
