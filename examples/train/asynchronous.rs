//! Asynchronous training with a parameter server (`--async`): `--replicas` worker threads each
//! take the next batch of `--batch / --replicas` rows, pull the server's weights, compute the
//! batch's gradients and push them; the server applies every push with the fused step, so an
//! epoch is `--replicas` times as many (smaller) steps as a synchronous one. `--compare-async`
//! trains both ways over several seeds and writes `async.md`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use fusedopt::parallel::parameter_server::{Pushed, ServerStats};
use fusedopt::parallel::{ParameterServer, Staleness};
use fusedopt::schedule::optax::Schedule;
use fusedopt::schedule::Counted;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::cli::{default_lr, Args, ScheduleName};
use crate::compare::{mean, spread};
use crate::data::Error;
use crate::metrics;
use crate::run::{model_of, replicas, train, weights_of, History, Run, Splits};

/// What one asynchronous run produced, beside the usual.
pub(crate) struct AsyncRun {
    pub(crate) run: Run,
    pub(crate) stats: ServerStats,
}

/// The staleness policy the command line asks for.
pub(crate) fn staleness_of(args: &Args) -> Staleness {
    match (args.max_staleness, args.down_weight) {
        (None, false) => Staleness::Unbounded,
        (Some(max), false) => Staleness::Bounded { max },
        (max, true) => Staleness::DownWeighted {
            max: max.unwrap_or(u64::MAX),
        },
    }
}

/// The server's lr schedule, counted in pushes (`pushes_per_epoch` of them an epoch).
pub(crate) fn attach_schedule(
    args: &Args,
    optimizer: &mut fusedopt::Optimizer,
    lr: f64,
    pushes_per_epoch: usize,
) -> Result<(), Error> {
    match args.schedule {
        ScheduleName::Constant => {}
        ScheduleName::WarmupCosine => {
            let total = (pushes_per_epoch * args.epochs) as f64;
            let cosine = Schedule::warmup_cosine_decay(
                0.0,
                lr,
                pushes_per_epoch as f64,
                total,
                lr * 0.01,
                1.0,
            );
            optimizer.set_schedule(Some(Box::new(Counted::new(cosine))))?;
        }
        ScheduleName::Plateau => {
            return Err("--async takes --schedule constant or warmup-cosine".into())
        }
    }
    Ok(())
}

pub(crate) fn train_async(
    args: &Args,
    splits: &Splits,
    lr: f64,
    seed: u64,
    report: bool,
) -> Result<AsyncRun, Error> {
    let workers = args.replicas;
    if workers == 0 || args.batch % workers != 0 {
        return Err(format!(
            "--batch {} must split evenly between {workers} workers",
            args.batch
        )
        .into());
    }
    let model = model_of(args, splits.train.side);
    let one = Args {
        replicas: 1,
        ..args.clone()
    };
    let mut optimizer = replicas(&one, &model, lr, seed)?
        .pop()
        .ok_or("no optimizer")?;
    let share = args.batch / workers;
    attach_schedule(args, &mut optimizer, lr, splits.train.len() / share)?;
    let server = ParameterServer::new(optimizer, staleness_of(args))?;
    let mut history = History::default();
    for epoch in 1..=args.epochs {
        let start = Instant::now();
        let mut order: Vec<usize> = (0..splits.train.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
        ));
        let batches: Vec<&[usize]> = order.chunks_exact(share).collect();
        let next = AtomicUsize::new(0);
        let losses = Mutex::new((0.0f64, 0usize));
        std::thread::scope(|scope| -> Result<(), Error> {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| -> fusedopt::Result<()> {
                        let mut worker = server.worker()?;
                        while let Some(rows) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                            worker.pull()?;
                            let b = splits.train.rows(rows);
                            let fwd = model.forward(worker.params(), &b.x)?;
                            let (loss, dlogits) = args.loss.eval(&fwd.logits, &b.y);
                            let mut grads = Vec::new();
                            model.backward(worker.params(), &fwd, dlogits, &mut |name, g| {
                                grads.push((name.to_string(), g.to_vec()));
                                Ok(())
                            })?;
                            for (name, g) in &grads {
                                worker.params_mut().set_grad(name, g)?;
                            }
                            if let Pushed::Applied { .. } = worker.push()? {
                                if let Ok(mut l) = losses.lock() {
                                    l.0 += f64::from(loss);
                                    l.1 += 1;
                                }
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "a worker panicked")??;
            }
            Ok(())
        })?;
        let seconds = start.elapsed().as_secs_f64();
        let (loss_sum, applied) = losses.into_inner().unwrap_or_default();
        let val = server
            .with_optimizer(|o| metrics::evaluate(&model, o.params(), &splits.val, args.loss))?;
        history.epochs_done = epoch;
        history.train_loss.push(loss_sum / applied.max(1) as f64);
        history.val_loss.push(val.loss);
        history.val_accuracy.push(val.accuracy);
        history.seconds_per_epoch.push(seconds);
        if report {
            let stats = server.stats()?;
            println!(
                "epoch {epoch:>3}  {:.0} samples/s  val {val}  staleness mean {:.2} max {}, \
                 {} refused",
                (batches.len() * share) as f64 / seconds,
                stats.mean_staleness(),
                stats.max_staleness,
                stats.refused
            );
        }
    }
    let stats = server.stats()?;
    let optimizer = server.into_optimizer()?;
    let test = metrics::evaluate(&model, optimizer.params(), &splits.test, args.loss)?;
    Ok(AsyncRun {
        run: Run {
            history,
            test,
            params: weights_of(optimizer.params())?,
            replicas_identical: true,
        },
        stats,
    })
}

/// Samples per second over a run's epochs.
fn throughput(run: &Run, samples_per_epoch: usize) -> f64 {
    let seconds: f64 = run.history.seconds_per_epoch.iter().sum();
    (samples_per_epoch * run.history.epochs_done) as f64 / seconds
}

/// Synchronous against asynchronous training on the same data, several seeds each.
pub(crate) fn compare_async(args: &Args, splits: &Splits) -> Result<(), Error> {
    let lr = args.lr.unwrap_or(default_lr(args.rule));
    std::fs::create_dir_all(&args.out)?;
    let samples = splits.train.len() / args.batch * args.batch;
    let mut rows = Vec::new();
    let configs: Vec<(bool, usize, Option<u64>, bool)> = vec![
        (false, 1, None, false),
        (false, 2, None, false),
        (false, 4, None, false),
        (true, 2, None, false),
        (true, 4, None, false),
        (true, 4, Some(1), false),
        (true, 4, Some(4), true),
    ];
    for (asynchronous, n, max_staleness, down_weight) in configs {
        let a = Args {
            replicas: n,
            max_staleness,
            down_weight,
            ..args.clone()
        };
        let mut accuracy = Vec::new();
        let mut speed = Vec::new();
        let (mut mean_staleness, mut max_seen, mut refused, mut pushes) = (Vec::new(), 0, 0, 0);
        for seed in 0..args.seeds {
            match asynchronous {
                false => {
                    let run = train(&a, splits, lr, seed, false)?;
                    accuracy.push(run.test.accuracy * 100.0);
                    speed.push(throughput(&run, samples));
                }
                true => {
                    let r = train_async(&a, splits, lr, seed, false)?;
                    accuracy.push(r.run.test.accuracy * 100.0);
                    let share = args.batch / n;
                    speed.push(throughput(&r.run, splits.train.len() / share * share));
                    mean_staleness.push(r.stats.mean_staleness());
                    max_seen = max_seen.max(r.stats.max_staleness);
                    refused += r.stats.refused;
                    pushes += r.stats.pushes;
                }
            }
        }
        let mode = match (asynchronous, max_staleness, down_weight) {
            (false, ..) if n == 1 => "synchronous, 1 replica".to_string(),
            (false, ..) => format!("synchronous, {n} replicas"),
            (true, None, _) => format!("asynchronous, {n} workers"),
            (true, Some(k), false) => format!("asynchronous, {n} workers, staleness ≤ {k}"),
            (true, Some(k), true) => {
                format!("asynchronous, {n} workers, down-weighted 1/(1+s), ≤ {k}")
            }
        };
        let (staleness, refused) = match asynchronous {
            false => ("0 (lockstep)".to_string(), "–".to_string()),
            true => (
                format!("{:.2} (max {max_seen})", mean(&mean_staleness)),
                format!("{:.1} %", 100.0 * refused as f64 / pushes.max(1) as f64),
            ),
        };
        rows.push(format!(
            "| {mode} | {} | {:.2} ± {:.2} | {:.0} | {staleness} | {refused} |",
            match asynchronous {
                true => format!("{}", args.batch / n),
                false => format!("{} (global)", args.batch),
            },
            mean(&accuracy),
            spread(&accuracy),
            mean(&speed),
        ));
        println!("{}", rows.last().map(String::as_str).unwrap_or_default());
    }
    let table = format!(
        "Synchronous data parallelism against asynchronous SGD with a parameter server, on the \
         digits ({} train rows, {} test rows), {}, {:?} lr {lr}, {:?} schedule (asynchronous runs \
         count it in pushes), clip {}, {} epochs, {} seeds each; worker threads on this machine \
         ({} cores). Staleness: how many versions of the weights a pushed gradient is behind, over every push (refused ones included).\n\n\
         | mode | batch per step | test accuracy % (mean ± sd) | samples/s (mean) | staleness \
         (mean) | refused |\n|---|---:|---:|---:|---:|---:|\n{}\n",
        splits.train.len(),
        splits.test.len(),
        model_of(args, splits.train.side).describe(),
        args.rule,
        args.schedule,
        args.clip,
        args.epochs,
        args.seeds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rows.join("\n")
    );
    let path = args.out.join("async.md");
    std::fs::write(&path, &table)?;
    println!("\n{table}\nwrote {}", path.display());
    Ok(())
}
