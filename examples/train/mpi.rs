//! The training run with one replica per MPI process (`--mpi`; cargo feature `mpi`):
//! `mpirun -np N target/release/examples/train --mpi`. Every process reads the data, builds the
//! same model and trains its share of each batch; rank 0 reports and writes checkpoints; at the
//! end the processes' weights are gathered and compared bit for bit. With `--async`, rank 0 is a
//! parameter server and every other rank an asynchronous worker.

use std::time::{Duration, Instant};

use fusedopt::comm::mpi::Mpi;
use fusedopt::comm::{Buffer, Communicator};
use fusedopt::parallel::{DataParallel, DataParallelOptions, ShardedDataParallel};

use fusedopt::parallel::parameter_server::mpi::{serve, RemoteWorker};
use fusedopt::parallel::ParameterServer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::asynchronous::{attach_schedule, staleness_of};
use crate::cli::{default_lr, Args};
use crate::data::Error;
use crate::metrics;
use crate::run::{model_of, replicas, train_group, Splits};

/// How long a process waits for the others in one collective.
const TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn train_mpi(args: &Args, splits: &Splits) -> Result<(), Error> {
    let mpi = Mpi::init()?;
    if args.asynchronous {
        return train_async_mpi(&mpi, args, splits);
    }
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

/// Rank 0 serves; each other rank works through every `workers`-th batch of `--batch /
/// --replicas` rows (the replicas being the workers), epoch after epoch, pushing as it goes.
fn train_async_mpi(mpi: &Mpi, args: &Args, splits: &Splits) -> Result<(), Error> {
    let (rank, n) = (mpi.rank(), mpi.world_size());
    if n < 2 {
        return Err(
            "--mpi --async needs a server and at least one worker: mpirun -np 2 or more".into(),
        );
    }
    let workers = n - 1;
    let args = Args {
        replicas: workers,
        ..args.clone()
    };
    if args.batch % workers != 0 {
        return Err(format!(
            "--batch {} must split evenly between {workers} workers",
            args.batch
        )
        .into());
    }
    let lr = args.lr.unwrap_or(default_lr(args.rule));
    let model = model_of(&args, splits.train.side);
    let one = Args {
        replicas: 1,
        ..args.clone()
    };
    let mut optimizer = replicas(&one, &model, lr, args.seed)?
        .pop()
        .ok_or("no optimizer")?;
    let comm = mpi.communicator(TIMEOUT)?;
    let start = Instant::now();
    if rank == 0 {
        attach_schedule(
            &args,
            &mut optimizer,
            lr,
            splits.train.len() / (args.batch / workers),
        )?;
        println!(
            "training: a parameter server and {workers} MPI worker processes, batch {} per push, \
             {:?} lr {lr}, {:?} schedule (counted in pushes), {:?}",
            args.batch / workers,
            args.rule,
            args.schedule,
            staleness_of(&args)
        );
        let server = ParameterServer::new(optimizer, staleness_of(&args))?;
        let stats = serve(&server, &comm)?;
        let optimizer = server.into_optimizer()?;
        let test = metrics::evaluate(&model, optimizer.params(), &splits.test, args.loss)?;
        println!(
            "done in {:.1} s: test {test}; {} pushes, {} applied, {} refused, staleness mean \
             {:.2} max {}",
            start.elapsed().as_secs_f64(),
            stats.pushes,
            stats.applied,
            stats.refused,
            stats.mean_staleness(),
            stats.max_staleness
        );
        return Ok(());
    }
    // A worker: its own copy of the set, and its strided share of every epoch's batches.
    let mut w = RemoteWorker::new(&comm, optimizer.into_params())?;
    let share = args.batch / workers;
    for epoch in 1..=args.epochs {
        let mut order: Vec<usize> = (0..splits.train.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            args.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
        ));
        for rows in order.chunks_exact(share).skip(rank - 1).step_by(workers) {
            w.pull()?;
            let b = splits.train.rows(rows);
            let fwd = model.forward(w.params(), &b.x)?;
            let (_, dlogits) = args.loss.eval(&fwd.logits, &b.y);
            let mut grads = Vec::new();
            model.backward(w.params(), &fwd, dlogits, &mut |name, g| {
                grads.push((name.to_string(), g.to_vec()));
                Ok(())
            })?;
            for (name, g) in &grads {
                w.params_mut().set_grad(name, g)?;
            }
            w.push()?;
        }
    }
    w.finish()?;
    Ok(())
}
