//! Trains a handwritten-digit classifier data-parallel with fusedopt's fused optimizers, and
//! reproduces the classic comparison of optimizers with measured numbers.
//!
//! cargo run --release --example train                      # Adam, MLP, 2 CPU replicas
//! cargo run --release --example train -- --help
//! cargo run --release --example train -- --compare --out benches/results/compare
//! cargo run --release --example train -- --compare-state --out benches/results/compare
//! cargo run --release --example train -- --shard-state     # ZeRO-1: state sharded
//! cargo run --release --example train -- --async --replicas 4   # parameter server
//! cargo run --release --example train -- --compare-async --out benches/results/compare
//! cargo run --release --example train -- --compare-shard --out benches/results/compare
//! mpirun -np 4 target/release/examples/train --mpi         # built with --features mpi
//!
//! Each replica computes the gradients of its share of every batch (forward and backward with
//! ndarray's matrix products), marks them ready layer by layer from the last so their all-reduce
//! overlaps the rest of the backward pass, and every replica takes the same fused step.

mod asynchronous;
mod cli;
mod compare;
mod compare_shard;
mod compare_state;
mod data;
mod metrics;
mod model;
#[cfg(feature = "mpi")]
mod mpi;
mod run;
#[cfg(test)]
mod tests;

use std::time::Instant;

use clap::Parser;
use fusedopt::Device;

use cli::{default_lr, Args};
use compare::compare;
use compare_state::compare_state;
use data::Error;
use run::{load, model_of, train};

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let splits = load(&args)?;
    if args.compare {
        return compare(&args, &splits);
    }
    if args.compare_state {
        return compare_state(&args, &splits);
    }
    if args.compare_shard {
        return compare_shard::compare_shard(&args);
    }
    if args.compare_async {
        return asynchronous::compare_async(&args, &splits);
    }
    #[cfg(feature = "mpi")]
    if args.mpi {
        return mpi::train_mpi(&args, &splits);
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
        "training: {} CPU replicas{}, global batch {}, {:?} ({:?} flavor) lr {lr}, {:?} schedule, clip {}, {:?} gradients",
        args.replicas,
        match (args.shard_state, args.asynchronous) {
            (_, true) => " (asynchronous workers of a parameter server)",
            (true, _) => " (optimizer state sharded)",
            _ => "",
        },
        args.batch, args.rule, args.flavor, args.schedule, args.clip, args.grad_dtype
    );
    if let Some(why) = selection.gpu_unavailable {
        println!("device: CPU engine (GPU not used: {why})");
    } else {
        println!("device: CPU replicas (the example's forward and backward run on the CPU; a GPU model path is not built)");
    }
    let start = Instant::now();
    if args.asynchronous {
        let r = asynchronous::train_async(&args, &splits, lr, args.seed, true)?;
        println!(
            "done in {:.1} s: test {}; {} pushes, {} applied, {} refused, staleness mean {:.2} \
             max {}",
            start.elapsed().as_secs_f64(),
            r.run.test,
            r.stats.pushes,
            r.stats.applied,
            r.stats.refused,
            r.stats.mean_staleness(),
            r.stats.max_staleness
        );
        return Ok(());
    }
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
