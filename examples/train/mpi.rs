//! The training run with one replica per MPI process (`--mpi`; cargo feature `mpi`):
//! `mpirun -np N target/release/examples/train --mpi`. Every process reads the data, builds the
//! same model and trains its share of each batch; rank 0 reports and writes checkpoints; at the
//! end the processes' weights are gathered and compared bit for bit.

use std::time::{Duration, Instant};

use fusedopt::comm::mpi::Mpi;
use fusedopt::comm::{Buffer, Communicator};
use fusedopt::parallel::{DataParallel, DataParallelOptions, ShardedDataParallel};

use crate::cli::{default_lr, Args};
use crate::data::Error;
use crate::run::{model_of, replicas, train_group, Splits};

/// How long a process waits for the others in one collective.
const TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn train_mpi(args: &Args, splits: &Splits) -> Result<(), Error> {
    let mpi = Mpi::init()?;
    let (rank, n) = (mpi.rank(), mpi.world_size());
    let args = Args {
        replicas: n,
        ..args.clone()
    };
    let lr = args.lr.unwrap_or(default_lr(args.rule));
    let model = model_of(&args, splits.train.side);
    let mine = replicas(
        &Args {
            replicas: 1,
            ..args.clone()
        },
        &model,
        lr,
        args.seed,
    )?;
    let report = rank == 0;
    if report {
        println!(
            "training: {n} MPI processes, one replica each, global batch {}, {:?} lr {lr}, {} \
             optimizer state",
            args.batch,
            args.rule,
            if args.shard_state {
                "sharded"
            } else {
                "replicated"
            }
        );
    }
    let comm = mpi.communicator(TIMEOUT)?;
    let options = DataParallelOptions {
        timeout: TIMEOUT,
        ..Default::default()
    };
    let start = Instant::now();
    let run = match args.shard_state {
        true => train_group(
            &args,
            splits,
            lr,
            args.seed,
            (report, report),
            &mut ShardedDataParallel::new(mine, vec![comm], options)?,
        ),
        false => train_group(
            &args,
            splits,
            lr,
            args.seed,
            (report, report),
            &mut DataParallel::new(mine, vec![comm], options)?,
        ),
    }?;
    // Every process's weights, side by side, compared bit for bit.
    let check = mpi.communicator(TIMEOUT)?;
    let mut weights = run.params.clone();
    let mut all = vec![0.0f32; weights.len() * n];
    check.all_gather(Buffer::from(&mut weights[..]), Buffer::from(&mut all[..]))?;
    let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let identical = all
        .chunks_exact(run.params.len().max(1))
        .all(|w| bits(w) == bits(&run.params));
    if report {
        println!(
            "done in {:.1} s: test {}; {} parameters, {n} processes bit-identical: {}",
            start.elapsed().as_secs_f64(),
            run.test,
            run.params.len(),
            if identical { "yes" } else { "NO" }
        );
    }
    match identical {
        true => Ok(()),
        false => Err("the processes' weights differ".into()),
    }
}
