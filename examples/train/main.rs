//! Trains a handwritten-digit classifier data-parallel with fusedopt's fused optimizers, and
//! reproduces the classic comparison of optimizers with measured numbers.
//!
//! cargo run --release --example train                      # Adam, MLP, 2 CPU replicas
//! cargo run --release --example train -- --help
//! cargo run --release --example train -- --compare --out benches/results/compare
//!
//! Each replica computes the gradients of its share of every batch (forward and backward with
//! ndarray's matrix products), marks them ready layer by layer from the last so their all-reduce
//! overlaps the rest of the backward pass, and every replica takes the same fused step.

mod data;
mod metrics;
mod model;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use fusedopt::parallel::{DataParallel, DataParallelOptions};
use fusedopt::schedule::optax::Schedule;
use fusedopt::schedule::plateau::ReduceLrOnPlateau;
use fusedopt::schedule::LrAtStep;
use fusedopt::{
    Adagrad, Adam, DType, Device, Flavor, GlobalNormClip, GroupOptions, Optimizer,
    OptimizerOptions, ParamSet, RmsProp, Rule, Sgd, WeightDecay,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use data::{Dataset, Error};
use metrics::Metrics;
use model::{Arch, Loss, Model};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
enum RuleName {
    Adam,
    Adamw,
    Sgd,
    Rmsprop,
    Adagrad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FlavorName {
    Pytorch,
    Keras,
    Optax,
    Tf1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScheduleName {
    Constant,
    /// Linear warmup over the first epoch, then cosine decay to 1% (Optax's warmup_cosine_decay).
    WarmupCosine,
    /// ReduceLROnPlateau on the validation loss (PyTorch's rule, patience 2, factor 0.5).
    Plateau,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModelName {
    Mlp,
    Cnn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GradDType {
    F32,
    /// bf16 gradients and model copy, fp32 master weights and state.
    Bf16,
}

#[derive(Parser, Clone, Debug)]
#[command(about = "Data-parallel digit classifier trained with fusedopt's fused optimizers")]
struct Args {
    /// Read MNIST IDX files (train-images-idx3-ubyte[.gz], …) from this folder instead of the
    /// embedded 8×8 digits.
    #[arg(long)]
    mnist: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "mlp")]
    model: ModelName,
    /// Hidden layer widths, comma-separated (the dense part of the CNN too).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    hidden: Vec<usize>,
    /// Filters of the CNN's convolution.
    #[arg(long, default_value_t = 8)]
    channels: usize,
    #[arg(long, value_enum, default_value = "cross-entropy")]
    loss: Loss,
    #[arg(long, value_enum, default_value = "adam")]
    rule: RuleName,
    #[arg(long, value_enum, default_value = "pytorch")]
    flavor: FlavorName,
    /// Peak learning rate (default: 3e-3 Adam/AdamW, 0.05 SGD, 1e-3 RMSProp, 0.05 Adagrad).
    #[arg(long)]
    lr: Option<f64>,
    /// Momentum of SGD and RMSProp.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// L2 for Adam/SGD/RMSProp/Adagrad, decoupled for AdamW (default: 0, AdamW 0.01).
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long, value_enum, default_value = "warmup-cosine")]
    schedule: ScheduleName,
    /// Global-norm clipping threshold (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Gradient dtype (bf16: mixed precision with fp32 masters).
    #[arg(long, value_enum, default_value = "f32")]
    grad_dtype: GradDType,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Global batch, split evenly between replicas.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Data-parallel replicas (CPU threads).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save a checkpoint here after every epoch.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint.
    #[arg(long, requires = "checkpoint")]
    resume: bool,
    /// Stop after this epoch, as if interrupted (the schedule still spans --epochs).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Run the optimizer comparison (Adam, AdamW, SGD+momentum, RMSProp; lr grid on the validation
    /// split; several seeds) and write table.md and loss.svg to --out.
    #[arg(long)]
    compare: bool,
    #[arg(long, default_value = "compare-out")]
    out: PathBuf,
    /// With --compare: also put the table between the compare markers of this README.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Seeds per optimizer in --compare.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Train / validation / test sets, standardised on the training rows.
struct Splits {
    train: Dataset,
    val: Dataset,
    test: Dataset,
}

fn load(args: &Args) -> Result<Splits, Error> {
    let (mut train, mut val, mut test) = match &args.mnist {
        None => {
            let all = data::digits()?;
            let p = data::split(all.len(), &[0.7, 0.1, 0.2], 0);
            (all.rows(&p[0]), all.rows(&p[1]), all.rows(&p[2]))
        }
        Some(dir) => {
            let (train, test) = data::mnist(dir)?;
            let p = data::split(train.len(), &[50.0 / 60.0, 10.0 / 60.0], 0);
            (train.rows(&p[0]), train.rows(&p[1]), test)
        }
    };
    data::standardise(&mut train, &mut [&mut val, &mut test]);
    Ok(Splits { train, val, test })
}

fn model_of(args: &Args, side: usize) -> Model {
    let arch = match args.model {
        ModelName::Mlp => Arch::Mlp {
            hidden: args.hidden.clone(),
        },
        ModelName::Cnn => Arch::Cnn {
            channels: args.channels,
            hidden: args.hidden.clone(),
        },
    };
    Model { arch, side }
}

fn flavor(f: FlavorName) -> Flavor {
    match f {
        FlavorName::Pytorch => Flavor::PyTorch,
        FlavorName::Keras => Flavor::Keras,
        FlavorName::Optax => Flavor::Optax,
        FlavorName::Tf1 => Flavor::Tf1,
    }
}

fn default_lr(rule: RuleName) -> f64 {
    match rule {
        RuleName::Adam | RuleName::Adamw => 3e-3,
        RuleName::Sgd | RuleName::Adagrad => 0.05,
        RuleName::Rmsprop => 1e-3,
    }
}

fn rule_of(args: &Args, lr: f64) -> Rule {
    let f = flavor(args.flavor);
    let l2 = WeightDecay::L2(args.weight_decay.unwrap_or(0.0));
    match args.rule {
        RuleName::Adam => Adam::preset(f).with_lr(lr).with_weight_decay(l2).into(),
        RuleName::Adamw => Adam::adamw(f)
            .with_lr(lr)
            .with_weight_decay(WeightDecay::Decoupled(args.weight_decay.unwrap_or(0.01)))
            .into(),
        RuleName::Sgd => Sgd {
            momentum: args.momentum,
            ..Sgd::preset(f)
        }
        .with_lr(lr)
        .with_weight_decay(l2)
        .into(),
        RuleName::Rmsprop => RmsProp {
            momentum: args.momentum,
            ..RmsProp::preset(f)
        }
        .with_lr(lr)
        .with_weight_decay(l2)
        .into(),
        RuleName::Adagrad => Adagrad::preset(f).with_lr(lr).with_weight_decay(l2).into(),
    }
}

/// One optimizer per replica, all from the same initial parameters.
fn replicas(args: &Args, model: &Model, lr: f64, seed: u64) -> fusedopt::Result<Vec<Optimizer>> {
    let init = model.init(seed);
    let options = OptimizerOptions {
        clip: (args.clip > 0.0).then(|| GlobalNormClip::new(args.clip, flavor(args.flavor))),
        ..Default::default()
    };
    (0..args.replicas)
        .map(|_| {
            let mut b = ParamSet::builder();
            b.group("no_decay", GroupOptions::no_decay())?;
            if args.grad_dtype == GradDType::Bf16 {
                b.grad_dtype(DType::BF16).model_copy(DType::BF16)?;
            }
            for (spec, values) in &init {
                if spec.decay {
                    b.add(&spec.name, &spec.shape, values)?;
                } else {
                    b.add_to("no_decay", &spec.name, &spec.shape, values)?;
                }
            }
            Optimizer::with_options(b.build(Device::Cpu)?, rule_of(args, lr), options)
        })
        .collect()
}

/// What one training run produced.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct History {
    epochs_done: usize,
    train_loss: Vec<f64>,
    val_loss: Vec<f64>,
    val_accuracy: Vec<f64>,
    seconds_per_epoch: Vec<f64>,
}

struct Run {
    history: History,
    test: Metrics,
    /// Replica 0's parameters at the end, in arena order.
    params: Vec<f32>,
    replicas_identical: bool,
}

/// Trains for `args.epochs` with peak learning rate `lr`; reports per epoch unless `quiet`.
fn train(args: &Args, splits: &Splits, lr: f64, seed: u64, report: bool) -> Result<Run, Error> {
    let model = model_of(args, splits.train.side);
    if args.replicas == 0 || args.batch % args.replicas != 0 {
        return Err(format!(
            "--batch {} must split evenly between {} replicas",
            args.batch, args.replicas
        )
        .into());
    }
    let mut dp = DataParallel::cpu(
        replicas(args, &model, lr, seed)?,
        DataParallelOptions::default(),
    )?;
    let steps_per_epoch = splits.train.len() / args.batch;
    let total_steps = (steps_per_epoch * args.epochs) as f64;
    let cosine =
        Schedule::warmup_cosine_decay(0.0, lr, steps_per_epoch as f64, total_steps, lr * 0.01, 1.0);
    let mut plateau = ReduceLrOnPlateau::pytorch(lr);
    plateau.patience = 2;
    plateau.factor = 0.5;
    let mut history = History::default();

    let ckpt = args
        .checkpoint
        .as_ref()
        .map(|d| (d.join("optimizer.safetensors"), d.join("history.json")));
    if let (true, Some((opt_path, hist_path))) = (args.resume, &ckpt) {
        history = serde_json::from_str(
            &std::fs::read_to_string(hist_path)
                .map_err(|e| format!("{}: {e}", hist_path.display()))?,
        )?;
        dp.load_checkpoint(opt_path)?;
        // The plateau rule's state is a function of the losses it saw: replay them.
        for &v in &history.val_loss {
            plateau.observe(v)?;
        }
        if report {
            println!(
                "resumed after epoch {} from {}",
                history.epochs_done,
                opt_path.display()
            );
        }
    }

    let mut step = (history.epochs_done * steps_per_epoch) as u64;
    let last = args.stop_after.unwrap_or(args.epochs).min(args.epochs);
    for epoch in history.epochs_done + 1..=last {
        let start = Instant::now();
        let mut order: Vec<usize> = (0..splits.train.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
        ));
        let bar = progress(report && !args.quiet, steps_per_epoch, epoch, args.epochs);
        let mut loss_sum = 0.0f64;
        for batch in order.chunks_exact(args.batch) {
            let lr_now = match args.schedule {
                ScheduleName::Constant => lr,
                ScheduleName::WarmupCosine => cosine.lr_at(step),
                ScheduleName::Plateau => plateau.lr(),
            };
            dp.set_lr(lr_now)?;
            let b = splits.train.rows(batch);
            let share = args.batch / args.replicas;
            let losses = Mutex::new(vec![0.0f32; args.replicas]);
            dp.step(|rank, grads| {
                let rows = rank * share..(rank + 1) * share;
                let x = model::rows(&b.x, rows.clone());
                let fwd = model.forward(grads, &x)?;
                let (loss, dlogits) = args.loss.eval(&fwd.logits, &b.y[rows]);
                if let Ok(mut l) = losses.lock() {
                    l[rank] = loss;
                }
                model.backward(grads, &fwd, dlogits, &mut |name, g| {
                    grads.set(name, g)?;
                    grads.mark_ready(name)
                })
            })?;
            step += 1;
            let l = losses.into_inner().unwrap_or_default();
            let batch_loss = l.iter().map(|&v| f64::from(v)).sum::<f64>() / l.len() as f64;
            loss_sum += batch_loss;
            if let Some(bar) = &bar {
                bar.set_message(format!("loss {batch_loss:.4}"));
                bar.inc(1);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let first = dp.replicas().next().ok_or("no replicas")?;
        let val = metrics::evaluate(&model, first.params(), &splits.val, args.loss)?;
        if args.schedule == ScheduleName::Plateau {
            plateau.observe(val.loss)?;
        }
        history.epochs_done = epoch;
        history.train_loss.push(loss_sum / steps_per_epoch as f64);
        history.val_loss.push(val.loss);
        history.val_accuracy.push(val.accuracy);
        history.seconds_per_epoch.push(seconds);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if report {
            let train_m = metrics::evaluate(&model, first.params(), &splits.train, args.loss)?;
            let test_m = metrics::evaluate(&model, first.params(), &splits.test, args.loss)?;
            println!(
                "epoch {epoch:>3}  lr {:.2e}  {:.0} samples/s\n  train {train_m}\n  test  {test_m}",
                first.lr(),
                (steps_per_epoch * args.batch) as f64 / seconds
            );
        }
        if let Some((opt_path, hist_path)) = &ckpt {
            std::fs::create_dir_all(args.checkpoint.as_ref().ok_or("no checkpoint folder")?)?;
            dp.save_checkpoint(opt_path)?;
            std::fs::write(hist_path, serde_json::to_string_pretty(&history)?)?;
        }
    }
    let first = dp.replicas().next().ok_or("no replicas")?;
    let test = metrics::evaluate(&model, first.params(), &splits.test, args.loss)?;
    let params = first.params().values_arena()?.to_vec();
    let mut replicas_identical = true;
    for r in dp.replicas() {
        replicas_identical &= r.params().values_arena()? == params.as_slice();
    }
    Ok(Run {
        history,
        test,
        params,
        replicas_identical,
    })
}

fn progress(
    show: bool,
    steps: usize,
    epoch: usize,
    epochs: usize,
) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "epoch {epoch}/{epochs} {{bar:30}} {{pos}}/{{len}} steps, {{per_sec}}, {{msg}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

/// Adam, AdamW, SGD with momentum and RMSProp: each lr of a small grid trained once (seed 0) and
/// judged on the validation split; the best one trained with every seed and judged on the test set.
fn compare(args: &Args, splits: &Splits) -> Result<(), Error> {
    let grid: &[(RuleName, &str, [f64; 3])] = &[
        (RuleName::Adam, "Adam", [1e-3, 3e-3, 1e-2]),
        (RuleName::Adamw, "AdamW (wd 0.01)", [1e-3, 3e-3, 1e-2]),
        (RuleName::Sgd, "SGD, momentum 0.9", [0.01, 0.03, 0.1]),
        (
            RuleName::Rmsprop,
            "RMSProp, momentum 0.9",
            [1e-4, 3e-4, 1e-3],
        ),
    ];
    std::fs::create_dir_all(&args.out)?;
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for &(rule, label, lrs) in grid {
        let a = Args {
            rule,
            ..args.clone()
        };
        // Best validation accuracy; ties (a small validation split has few distinct values) go to
        // the lower validation loss.
        let mut best = (f64::NEG_INFINITY, f64::NEG_INFINITY, lrs[0]);
        for lr in lrs {
            let run = train(&a, splits, lr, 0, false)?;
            let val = *run.history.val_accuracy.last().unwrap_or(&0.0);
            let val_loss = *run.history.val_loss.last().unwrap_or(&f64::INFINITY);
            println!(
                "{label:<22} lr {lr:<7} validation accuracy {:.2}%, loss {val_loss:.4}",
                100.0 * val
            );
            if (val, -val_loss) > (best.0, best.1) {
                best = (val, -val_loss, lr);
            }
        }
        let best = (best.0, best.2);
        let runs: Vec<Run> = (0..args.seeds)
            .map(|s| train(&a, splits, best.1, s, false))
            .collect::<Result<_, _>>()?;
        let acc: Vec<f64> = runs.iter().map(|r| r.test.accuracy).collect();
        let f1: Vec<f64> = runs.iter().map(|r| r.test.f1).collect();
        let secs: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.history.seconds_per_epoch.clone())
            .collect();
        let mean_curve: Vec<f64> = (0..args.epochs)
            .map(|e| runs.iter().map(|r| r.history.train_loss[e]).sum::<f64>() / runs.len() as f64)
            .collect();
        curves.push((label, mean_curve));
        rows.push(format!(
            "| {label} | {} | {:.2} ± {:.2} % | {:.3} ± {:.3} | {:.0} ms |",
            best.1,
            100.0 * mean(&acc),
            100.0 * spread(&acc),
            mean(&f1),
            spread(&f1),
            1e3 * median(secs)
        ));
    }
    let table = format!(
        "Digits ({} train / {} validation / {} test), {}, {} loss, batch {} over {} CPU replicas, {} epochs, \
         warmup + cosine schedule, clip {}; lr chosen on validation accuracy (seed 0), then {} seeds.\n\n\
         | optimizer | best lr | test accuracy (mean ± sd) | test macro F1 | time per epoch (median) |\n\
         |---|---:|---:|---:|---:|\n{}\n",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        model_of(args, splits.train.side).describe(),
        args.loss
            .to_possible_value()
            .map_or(String::new(), |v| v.get_name().to_string()),
        args.batch,
        args.replicas,
        args.epochs,
        args.clip,
        args.seeds,
        rows.join("\n")
    );
    std::fs::write(args.out.join("table.md"), &table)?;
    if let Some(readme) = &args.readme {
        let text = std::fs::read_to_string(readme)?;
        let (begin, end) = ("<!-- compare:begin -->\n", "<!-- compare:end -->");
        let (Some(a), Some(b)) = (text.find(begin), text.find(end)) else {
            return Err(format!("{} has no {begin} … {end} block", readme.display()).into());
        };
        let new = format!("{}{table}{}", &text[..a + begin.len()], &text[b..]);
        std::fs::write(readme, new)?;
    }
    plot(&args.out.join("loss.svg"), &curves)?;
    println!(
        "\n{table}\nwrote {} and {}",
        args.out.join("table.md").display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Sample standard deviation.
fn spread(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Mean training-loss curves, log scale, one line per optimizer.
fn plot(path: &Path, curves: &[(&str, Vec<f64>)]) -> Result<(), Error> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let epochs = curves.iter().map(|c| c.1.len()).max().unwrap_or(1);
    let lo = curves
        .iter()
        .flat_map(|c| c.1.iter().copied())
        .fold(f64::INFINITY, f64::min)
        .max(1e-6);
    let hi = curves
        .iter()
        .flat_map(|c| c.1.iter().copied())
        .fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss (mean over seeds)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..epochs as f64, (lo * 0.8..hi * 1.2).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .draw()?;
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN];
    for (i, (label, c)) in curves.iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(
                c.iter().enumerate().map(|(e, &v)| ((e + 1) as f64, v)),
                colour.stroke_width(2),
            ))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let splits = load(&args)?;
    if args.compare {
        return compare(&args, &splits);
    }
    let selection = Device::auto();
    let model = model_of(&args, splits.train.side);
    println!(
        "data: {} ({} train, {} validation, {} test), {}×{} pixels, standardised",
        if args.mnist.is_some() {
            "MNIST"
        } else {
            "digits"
        },
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        splits.train.side,
        splits.train.side
    );
    println!(
        "model: {} ({} parameters), {:?} loss",
        model.describe(),
        model
            .specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum::<usize>(),
        args.loss
    );
    let lr = args.lr.unwrap_or(default_lr(args.rule));
    println!(
        "training: {} CPU replicas, global batch {}, {:?} ({:?} flavor) lr {lr}, {:?} schedule, clip {}, {:?} gradients",
        args.replicas, args.batch, args.rule, args.flavor, args.schedule, args.clip, args.grad_dtype
    );
    if let Some(why) = selection.gpu_unavailable {
        println!("device: CPU engine (GPU not used: {why})");
    } else {
        println!("device: CPU replicas (the example's forward and backward run on the CPU; a GPU model path is not built)");
    }
    let start = Instant::now();
    let run = train(&args, &splits, lr, args.seed, true)?;
    println!(
        "done in {:.1} s: test {}; {} parameters, replicas bit-identical: {}",
        start.elapsed().as_secs_f64(),
        run.test,
        run.params.len(),
        if run.replicas_identical { "yes" } else { "NO" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::parse_from(["train", "--quiet"].iter().chain(extra))
    }

    fn digits() -> Splits {
        load(&args(&[])).unwrap()
    }

    #[test]
    fn one_replica_and_n_replicas_agree_after_an_epoch() {
        let splits = digits();
        let one = train(
            &args(&["--epochs", "1", "--replicas", "1"]),
            &splits,
            3e-3,
            0,
            false,
        )
        .unwrap();
        for n in ["2", "4"] {
            let many = train(
                &args(&["--epochs", "1", "--replicas", n]),
                &splits,
                3e-3,
                0,
                false,
            )
            .unwrap();
            assert!(many.replicas_identical, "{n} replicas drifted apart");
            let worst = one
                .params
                .iter()
                .zip(&many.params)
                .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{n} replicas vs one after an epoch: relative difference {worst}"
            );
        }
    }

    #[test]
    fn resuming_from_a_checkpoint_continues_exactly() {
        let splits = digits();
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().to_str().unwrap();
        let straight = train(&args(&["--epochs", "4"]), &splits, 3e-3, 0, false).unwrap();
        train(
            &args(&["--epochs", "4", "--stop-after", "2", "--checkpoint", ck]),
            &splits,
            3e-3,
            0,
            false,
        )
        .unwrap();
        let resumed = train(
            &args(&["--epochs", "4", "--checkpoint", ck, "--resume"]),
            &splits,
            3e-3,
            0,
            false,
        )
        .unwrap();
        assert_eq!(resumed.history.epochs_done, 4);
        assert_eq!(
            resumed.params, straight.params,
            "resume changed the trajectory"
        );
    }

    #[test]
    fn the_default_adam_run_reaches_97_percent() {
        let a = args(&[]);
        let run = train(&a, &digits(), default_lr(a.rule), a.seed, false).unwrap();
        assert!(
            run.test.accuracy >= 0.97,
            "test accuracy {}",
            run.test.accuracy
        );
    }

    #[test]
    fn every_loss_and_the_cnn_learn() {
        let splits = digits();
        for extra in [["--loss", "hinge"], ["--loss", "mse"], ["--model", "cnn"]] {
            let mut e = vec!["--epochs", "12"];
            e.extend(extra);
            let run = train(&args(&e), &splits, 3e-3, 0, false).unwrap();
            assert!(
                run.test.accuracy > 0.85,
                "{extra:?}: test accuracy {}",
                run.test.accuracy
            );
        }
    }

    /// Parameters held in a map, for the gradient check.
    struct Map(std::collections::BTreeMap<String, Vec<f32>>);

    impl model::Params for Map {
        fn param(&self, name: &str) -> fusedopt::Result<&[f32]> {
            self.0
                .get(name)
                .map(Vec::as_slice)
                .ok_or_else(|| fusedopt::Error::UnknownTensor(name.into()))
        }
    }

    /// Backward against central differences of the loss, for both models and every loss.
    #[test]
    fn backward_matches_finite_differences() {
        let splits = digits();
        let batch = splits.train.rows(&[3, 141, 592, 653, 589]);
        for arch in [
            Arch::Mlp { hidden: vec![7, 5] },
            Arch::Cnn {
                channels: 3,
                hidden: vec![6],
            },
        ] {
            let m = Model {
                arch: arch.clone(),
                side: 8,
            };
            let mut p = Map(m.init(11).into_iter().map(|(s, v)| (s.name, v)).collect());
            // Non-zero biases, so that every path is exercised.
            for (i, v) in p.0.values_mut().flatten().enumerate() {
                *v += 0.05 * ((i % 7) as f32 - 3.0);
            }
            for loss in [Loss::CrossEntropy, Loss::Hinge, Loss::Mse] {
                let (mut checked, mut kinks) = (0, 0);
                let fwd = m.forward(&p, &batch.x).unwrap();
                let (_, d) = loss.eval(&fwd.logits, &batch.y);
                let mut grads = std::collections::HashMap::new();
                m.backward(&p, &fwd, d, &mut |n, g| {
                    grads.insert(n.to_string(), g.to_vec());
                    Ok(())
                })
                .unwrap();
                assert_eq!(
                    grads.len(),
                    m.specs().len(),
                    "{arch:?}: a tensor got no gradient"
                );
                for spec in m.specs() {
                    for k in (0..p.0[&spec.name].len()).step_by(5) {
                        let h = 1e-3f32;
                        let mut at = |delta: f32| {
                            p.0.get_mut(&spec.name).unwrap()[k] += delta;
                            let l = loss
                                .eval(&m.forward(&p, &batch.x).unwrap().logits, &batch.y)
                                .0;
                            p.0.get_mut(&spec.name).unwrap()[k] -= delta;
                            f64::from(l)
                        };
                        let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
                        // A ReLU or max-pool kink inside the step makes the difference quotient
                        // depend on the step: such elements are not differentiable there; skip.
                        let finer = (at(h / 4.0) - at(-h / 4.0)) / (0.5 * f64::from(h));
                        checked += 1;
                        if (numeric - finer).abs() > 1e-3 + 1e-2 * numeric.abs() {
                            kinks += 1;
                            continue;
                        }
                        let analytic = f64::from(grads[&spec.name][k]);
                        assert!(
                            (numeric - analytic).abs() <= 2e-3 + 5e-2 * numeric.abs(),
                            "{arch:?} {loss:?} {}[{k}]: backward {analytic}, finite difference {numeric}",
                            spec.name
                        );
                    }
                }
                assert!(
                    kinks * 10 < checked,
                    "{arch:?} {loss:?}: {kinks} of {checked} at kinks"
                );
            }
        }
    }

    #[test]
    fn uneven_batches_are_refused() {
        let e = train(&args(&["--batch", "63"]), &digits(), 3e-3, 0, false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("split evenly"), "{e}");
    }
}
