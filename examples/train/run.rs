//! One training run: data, model and data-parallel replicas, the epoch loop with its schedule,
//! checkpoints and metrics.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use fusedopt::comm::Communicator;
use fusedopt::parallel::{DataParallel, DataParallelOptions, Gradients, ShardedDataParallel};
use fusedopt::schedule::optax::Schedule;
use fusedopt::schedule::plateau::ReduceLrOnPlateau;
use fusedopt::schedule::LrAtStep;
use fusedopt::{
    Adagrad, Adam, DType, Device, GlobalNormClip, GroupOptions, Masters, Optimizer,
    OptimizerOptions, ParamSet, RmsProp, Rule, Sgd, WeightDecay,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::cli::{
    flavor, masters_of, state_options, Args, GradDType, ModelName, RuleName, ScheduleName,
};
use crate::data::{self, Dataset, Error};
use crate::metrics::{self, Metrics};
use crate::model::{self, Arch, Model};

/// Train / validation / test sets, standardised on the training rows.
pub(crate) struct Splits {
    pub(crate) train: Dataset,
    pub(crate) val: Dataset,
    pub(crate) test: Dataset,
}

pub(crate) fn load(args: &Args) -> Result<Splits, Error> {
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

pub(crate) fn model_of(args: &Args, side: usize) -> Model {
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

pub(crate) fn rule_of(args: &Args) -> Rule {
    let f = flavor(args.flavor);
    let l2 = WeightDecay::L2(args.weight_decay.unwrap_or(0.0));
    match args.rule {
        RuleName::Adam => Adam::preset(f).with_weight_decay(l2).into(),
        RuleName::Adamw => Adam::adamw(f)
            .with_weight_decay(WeightDecay::Decoupled(args.weight_decay.unwrap_or(0.01)))
            .into(),
        RuleName::Sgd => Sgd {
            momentum: args.momentum,
            ..Sgd::preset(f)
        }
        .with_weight_decay(l2)
        .into(),
        RuleName::Rmsprop => RmsProp {
            momentum: args.momentum,
            ..RmsProp::preset(f)
        }
        .with_weight_decay(l2)
        .into(),
        RuleName::Adagrad => Adagrad::preset(f).with_weight_decay(l2).into(),
    }
}

/// One optimizer per replica, all from the same initial parameters.
pub(crate) fn replicas(
    args: &Args,
    model: &Model,
    lr: f64,
    seed: u64,
) -> fusedopt::Result<Vec<Optimizer>> {
    let init = model.init(seed);
    let (state_dtype, quantized_state) = state_options(args.state);
    let options = OptimizerOptions {
        clip: (args.clip > 0.0).then(|| GlobalNormClip::new(args.clip, flavor(args.flavor))),
        state_dtype,
        quantized_state,
        ..Default::default()
    };
    (0..args.replicas)
        .map(|_| {
            let mut b = ParamSet::builder();
            b.group("no_decay", GroupOptions::no_decay())?;
            let masters = masters_of(args.masters, seed);
            b.masters(masters);
            if args.grad_dtype == GradDType::Bf16 {
                b.grad_dtype(DType::BF16);
                // Without fp32 masters the weights are bf16 already.
                if masters == Masters::F32 {
                    b.model_copy(DType::BF16)?;
                }
            }
            for (spec, values) in &init {
                if spec.decay {
                    b.add(&spec.name, &spec.shape, values)?;
                } else {
                    b.add_to("no_decay", &spec.name, &spec.shape, values)?;
                }
            }
            Optimizer::with_options(b.build(Device::Cpu)?, rule_of(args), lr, options)
        })
        .collect()
}

/// What one training run produced.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct History {
    pub(crate) epochs_done: usize,
    pub(crate) train_loss: Vec<f64>,
    pub(crate) val_loss: Vec<f64>,
    pub(crate) val_accuracy: Vec<f64>,
    pub(crate) seconds_per_epoch: Vec<f64>,
}

pub(crate) struct Run {
    pub(crate) history: History,
    pub(crate) test: Metrics,
    /// Replica 0's parameters at the end, in arena order.
    pub(crate) params: Vec<f32>,
    pub(crate) replicas_identical: bool,
}

/// A backward pass: replica `rank`'s gradients of its share of the batch.
pub(crate) type Backward<'a> = dyn Fn(usize, &Gradients<'_>) -> fusedopt::Result<()> + Sync + 'a;

/// The data-parallel group a run trains: replicated or sharded optimizer state, over threads of
/// this process or one replica per MPI process.
pub(crate) trait Group {
    fn lr(&self) -> f64;
    fn set_lr(&mut self, lr: f64) -> fusedopt::Result<()>;
    fn step(&mut self, backward: &Backward<'_>) -> fusedopt::Result<()>;
    /// The weights of every replica in this process.
    fn weights(&self) -> Vec<&ParamSet>;
    /// Saves into folder `dir`; `writer`: this process writes the files of an unsharded group.
    fn save(&self, dir: &Path, writer: bool) -> fusedopt::Result<()>;
    fn load(&mut self, dir: &Path) -> fusedopt::Result<()>;
    /// Optimizer memory per replica, for sharded state.
    fn shard_memory(&self) -> Option<String>;
}

impl<C: Communicator> Group for DataParallel<C> {
    fn lr(&self) -> f64 {
        DataParallel::lr(self)
    }
    fn set_lr(&mut self, lr: f64) -> fusedopt::Result<()> {
        DataParallel::set_lr(self, lr)
    }
    fn step(&mut self, backward: &Backward<'_>) -> fusedopt::Result<()> {
        DataParallel::step(self, backward)
    }
    fn weights(&self) -> Vec<&ParamSet> {
        self.replicas().map(|o| o.params()).collect()
    }
    fn save(&self, dir: &Path, writer: bool) -> fusedopt::Result<()> {
        match writer {
            true => self.save_checkpoint(dir.join("optimizer.safetensors")),
            false => Ok(()),
        }
    }
    fn load(&mut self, dir: &Path) -> fusedopt::Result<()> {
        self.load_checkpoint(dir.join("optimizer.safetensors"))
    }
    fn shard_memory(&self) -> Option<String> {
        None
    }
}

impl<C: Communicator> Group for ShardedDataParallel<C> {
    fn lr(&self) -> f64 {
        self.replicas().first().map_or(0.0, |r| r.lr())
    }
    fn set_lr(&mut self, lr: f64) -> fusedopt::Result<()> {
        ShardedDataParallel::set_lr(self, lr)
    }
    fn step(&mut self, backward: &Backward<'_>) -> fusedopt::Result<()> {
        ShardedDataParallel::step(self, backward)
    }
    fn weights(&self) -> Vec<&ParamSet> {
        self.replicas().iter().map(|r| r.params()).collect()
    }
    /// Every replica saves its own window.
    fn save(&self, dir: &Path, _writer: bool) -> fusedopt::Result<()> {
        self.save_checkpoint(dir.join("optimizer-shards"))
    }
    fn load(&mut self, dir: &Path) -> fusedopt::Result<()> {
        self.load_checkpoint(dir.join("optimizer-shards"))
    }
    fn shard_memory(&self) -> Option<String> {
        let r = self.replicas().first()?;
        let m = r.memory().ok()?;
        Some(format!(
            "sharded optimizer state: {} B of state and {} B of masters per replica \
             ({} of {} padded elements each)",
            m.state_bytes,
            m.masters_bytes,
            m.window_len,
            r.plan().padded_len()
        ))
    }
}

/// A set's weights, tensor after tensor in layout order.
pub(crate) fn weights_of(set: &ParamSet) -> fusedopt::Result<Vec<f32>> {
    let mut out = Vec::new();
    for t in set.layout().tensors() {
        out.extend(set.read_param(&t.name)?);
    }
    Ok(out)
}

fn check_split(args: &Args) -> Result<(), Error> {
    if args.replicas == 0 || args.batch % args.replicas != 0 {
        return Err(format!(
            "--batch {} must split evenly between {} replicas",
            args.batch, args.replicas
        )
        .into());
    }
    Ok(())
}

/// Trains for `args.epochs` with peak learning rate `lr` on `args.replicas` threads (sharded
/// with `--shard-state`); reports per epoch unless `quiet`.
pub(crate) fn train(
    args: &Args,
    splits: &Splits,
    lr: f64,
    seed: u64,
    report: bool,
) -> Result<Run, Error> {
    check_split(args)?;
    let model = model_of(args, splits.train.side);
    let optimizers = replicas(args, &model, lr, seed)?;
    let options = DataParallelOptions::default();
    match args.shard_state {
        true => train_group(
            args,
            splits,
            lr,
            seed,
            (report, true),
            &mut ShardedDataParallel::cpu(optimizers, options)?,
        ),
        false => train_group(
            args,
            splits,
            lr,
            seed,
            (report, true),
            &mut DataParallel::cpu(optimizers, options)?,
        ),
    }
}

/// Trains `group`, whose replicas (here or in other processes) are `args.replicas` in all;
/// `report`: print per epoch; `writer`: this process writes the checkpoint files (one process
/// of an MPI job).
pub(crate) fn train_group(
    args: &Args,
    splits: &Splits,
    lr: f64,
    seed: u64,
    (report, writer): (bool, bool),
    dp: &mut dyn Group,
) -> Result<Run, Error> {
    let model = model_of(args, splits.train.side);
    check_split(args)?;
    if let (true, Some(memory)) = (report, dp.shard_memory()) {
        println!("{memory}");
    }
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
        .map(|d| (d.clone(), d.join("history.json")));
    if let (true, Some((dir, hist_path))) = (args.resume, &ckpt) {
        history = serde_json::from_str(
            &std::fs::read_to_string(hist_path)
                .map_err(|e| format!("{}: {e}", hist_path.display()))?,
        )?;
        dp.load(dir)?;
        // The plateau rule's state is a function of the losses it saw: replay them.
        for &v in &history.val_loss {
            plateau.observe(v)?;
        }
        if report {
            println!(
                "resumed after epoch {} from {}",
                history.epochs_done,
                dir.display()
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
            // The losses of the replicas in this process (under MPI, its own share only).
            let losses = Mutex::new(vec![None; args.replicas]);
            dp.step(&|rank, grads| {
                let rows = rank * share..(rank + 1) * share;
                let x = model::rows(&b.x, rows.clone());
                let fwd = model.forward(grads, &x)?;
                let (loss, dlogits) = args.loss.eval(&fwd.logits, &b.y[rows]);
                if let Ok(mut l) = losses.lock() {
                    l[rank] = Some(loss);
                }
                model.backward(grads, &fwd, dlogits, &mut |name, g| {
                    grads.set(name, g)?;
                    grads.mark_ready(name)
                })
            })?;
            step += 1;
            let l: Vec<f32> = losses
                .into_inner()
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect();
            let batch_loss = l.iter().map(|&v| f64::from(v)).sum::<f64>() / l.len().max(1) as f64;
            loss_sum += batch_loss;
            if let Some(bar) = &bar {
                bar.set_message(format!("loss {batch_loss:.4}"));
                bar.inc(1);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let weights = dp.weights();
        let first = *weights.first().ok_or("no replicas")?;
        let val = metrics::evaluate(&model, first, &splits.val, args.loss)?;
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
            let train_m = metrics::evaluate(&model, first, &splits.train, args.loss)?;
            let test_m = metrics::evaluate(&model, first, &splits.test, args.loss)?;
            println!(
                "epoch {epoch:>3}  lr {:.2e}  {:.0} samples/s\n  train {train_m}\n  test  {test_m}",
                dp.lr(),
                (steps_per_epoch * args.batch) as f64 / seconds
            );
        }
        if let Some((dir, hist_path)) = &ckpt {
            std::fs::create_dir_all(dir)?;
            dp.save(dir, writer)?;
            if writer {
                std::fs::write(hist_path, serde_json::to_string_pretty(&history)?)?;
            }
        }
    }
    let weights = dp.weights();
    let first = *weights.first().ok_or("no replicas")?;
    let test = metrics::evaluate(&model, first, &splits.test, args.loss)?;
    let params = weights_of(first)?;
    let mut replicas_identical = true;
    for w in &weights {
        replicas_identical &= weights_of(w)? == params;
    }
    Ok(Run {
        history,
        test,
        params,
        replicas_identical,
    })
}

pub(crate) fn progress(
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
