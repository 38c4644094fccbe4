//! The data-parallel engine: N replicas of one model, gradients averaged once with an all-reduce,
//! and the same fused step on every replica, which therefore hold bit-identical parameters.
//!
//! Gradients live in the arena, so all-reduce buckets are contiguous ranges of it, made of whole
//! tensors and counted from the end of the arena (a backward pass produces the last layers'
//! gradients first). Each replica has a communication thread that all-reduces bucket after bucket,
//! in the same order on every replica, each as soon as the training loop has marked all its
//! tensors ready, while the loop is still computing earlier layers.
//!
//! Replicas move in lockstep and agree before anything changes:
//! 1. backward and bucket reduction: a replica whose backward pass fails or panics still takes
//!    part in every collective, so the group stays in step;
//! 2. every replica prepares its step (the lr its schedule gives) and all exchange their verdicts:
//!    if any replica failed, every replica returns an error and none steps;
//! 3. every replica steps, and all exchange what the step did: replicas that ended a step
//!    differently (which identical inputs make impossible short of a device fault, or a replica
//!    changed behind the group's back), or a comparison that could not complete, give
//!    [`Error::ReplicasDiverged`], never `Ok`, and the group is aborted.
//!
//! A benign failure (an error or panic in one replica's backward pass, a refused lr, non-finite
//! gradients under [`crate::NonFinitePolicy::Error`]) therefore ends the step with an error on
//! every replica, nothing changed anywhere, and the group ready for the next step. Only a replica
//! that stalls or dies (a collective timing out) aborts the group: every other replica's step then
//! fails within the timeout, and the group must be rebuilt ([`DataParallel::into_replicas`] gives
//! the optimizers back).
//!
//! Beside the synchronous engine: [`sharded`] (each replica keeps the optimizer state of one
//! window of the arena) and [`parameter_server`] (asynchronous SGD).

mod fingerprint;
mod gradients;
pub mod parameter_server;
mod replica;
pub mod sharded;

use std::sync::Arc;
use std::time::Duration;

pub use gradients::{buckets, Bucket, Gradients};
pub use parameter_server::{ParameterServer, Staleness};
pub use replica::Replica;
pub use sharded::{ShardMemory, ShardPlan, ShardedDataParallel, ShardedReplica};

use crate::comm::cpu::CpuCommunicator;
use crate::comm::nccl::NcclCommunicator;
use crate::comm::single_device::SingleDeviceCommunicator;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::{Device, Optimizer};

/// Bucketing and failure detection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DataParallelOptions {
    /// Bucket size in bytes of gradient (PyTorch DDP: 25 MiB).
    pub bucket_bytes: usize,
    /// The first bucket (the last layers) is smaller, so communication starts early (DDP: 1 MiB).
    pub first_bucket_bytes: usize,
    /// How long a replica waits for the others in a collective before the group is aborted.
    pub timeout: Duration,
}

impl Default for DataParallelOptions {
    fn default() -> Self {
        DataParallelOptions {
            bucket_bytes: 25 << 20,
            first_bucket_bytes: 1 << 20,
            timeout: Duration::from_secs(60),
        }
    }
}

/// N replicas and their communicators.
#[derive(Debug)]
pub struct DataParallel<C: Communicator> {
    replicas: Vec<Replica<C>>,
}

impl DataParallel<CpuCommunicator> {
    /// Replicas that are threads of this process, on the CPU engine.
    pub fn cpu(optimizers: Vec<Optimizer>, options: DataParallelOptions) -> Result<Self> {
        let comms = CpuCommunicator::group(optimizers.len(), options.timeout)?;
        Self::new(optimizers, comms, options)
    }
}

impl DataParallel<SingleDeviceCommunicator> {
    /// Replicas sharing one GPU (every parameter set on the same CUDA device), reduced by a kernel.
    pub fn single_device(optimizers: Vec<Optimizer>, options: DataParallelOptions) -> Result<Self> {
        let ordinal = common_cuda_device(&optimizers)?;
        if optimizers
            .iter()
            .any(|o| o.params().device() != Device::Cuda(ordinal))
        {
            return Err(Error::Communicator(
                "single-device replicas must all live on the same CUDA device".into(),
            ));
        }
        let comms = SingleDeviceCommunicator::group(ordinal, optimizers.len(), options.timeout)?;
        Self::new(optimizers, comms, options)
    }
}

impl DataParallel<NcclCommunicator> {
    /// One replica per GPU of this process, joined by NCCL (replica i on its own device). For one
    /// replica per process, join with [`NcclCommunicator::from_rendezvous`] and call [`Self::new`].
    pub fn nccl(optimizers: Vec<Optimizer>, options: DataParallelOptions) -> Result<Self> {
        common_cuda_device(&optimizers)?;
        let ordinals = optimizers
            .iter()
            .map(|o| match o.params().device() {
                Device::Cuda(i) => Ok(i),
                d => Err(Error::Communicator(format!(
                    "NCCL replicas live on GPUs, not {d}"
                ))),
            })
            .collect::<Result<Vec<usize>>>()?;
        let comms = NcclCommunicator::group(&ordinals, options.timeout)?;
        Self::new(optimizers, comms, options)
    }
}

/// The CUDA device of the first replica (an error when there is none or it is on the CPU).
fn common_cuda_device(optimizers: &[Optimizer]) -> Result<usize> {
    match optimizers.first().map(|o| o.params().device()) {
        Some(Device::Cuda(i)) => Ok(i),
        Some(d) => Err(Error::Communicator(format!(
            "GPU replicas expected, got {d}"
        ))),
        None => Err(Error::Communicator("no replicas".into())),
    }
}

impl<C: Communicator> DataParallel<C> {
    /// Checks that the replicas would stay identical (same layout, rule, hyperparameters,
    /// options, step count, loss-scale state, schedule and optimizer state; checked through the
    /// communicators, so across processes too) and refuses them, naming what differs, if not;
    /// then broadcasts rank 0's parameters to all.
    pub fn new(
        optimizers: Vec<Optimizer>,
        comms: Vec<C>,
        options: DataParallelOptions,
    ) -> Result<Self> {
        if optimizers.is_empty() || optimizers.len() != comms.len() {
            return Err(Error::Communicator(format!(
                "{} optimizers for {} communicators",
                optimizers.len(),
                comms.len()
            )));
        }
        let layout = optimizers[0].params().layout().clone();
        let elem = optimizers[0].params().grad_dtype().size_bytes();
        let buckets: Arc<[Bucket]> = buckets(&layout, elem, &options).into();
        let mut replicas: Vec<Replica<C>> = optimizers
            .into_iter()
            .zip(comms)
            .map(|(optimizer, comm)| Replica {
                optimizer,
                comm,
                buckets: buckets.clone(),
            })
            .collect();
        on_every_replica(&mut replicas, |r| {
            let joined = r.join_group();
            if let Err(e) = &joined {
                r.comm
                    .abort(&format!("replica {} cannot join: {e}", r.rank()));
            }
            joined
        })?;
        Ok(DataParallel { replicas })
    }

    pub fn replicas(&self) -> impl Iterator<Item = &Optimizer> {
        self.replicas.iter().map(|r| &r.optimizer)
    }

    /// Every replica's optimizer, to change all of them alike (a learning rate, a checkpoint):
    /// replicas that differ are no longer replicas.
    pub fn replicas_mut(&mut self) -> impl Iterator<Item = &mut Optimizer> {
        self.replicas.iter_mut().map(|r| &mut r.optimizer)
    }

    /// The lr of the next step (every replica's).
    pub fn lr(&self) -> f64 {
        self.replicas[0].optimizer.lr()
    }

    /// Sets every replica's lr; an lr one refuses, all refuse (they are configured alike), and
    /// then none changes.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        for r in &self.replicas {
            crate::optim::check_lr(r.optimizer.params().layout(), lr)?;
        }
        self.replicas
            .iter_mut()
            .try_for_each(|r| r.optimizer.set_lr(lr))
    }

    /// Attaches a copy of `schedule` to every replica (see [`Optimizer::set_schedule`]); a
    /// schedule one refuses, all refuse, and then none changes.
    pub fn set_schedule(
        &mut self,
        schedule: Option<Box<dyn crate::schedule::LrSchedule>>,
    ) -> Result<()> {
        if let Some(s) = &schedule {
            s.validate()?;
            for r in &self.replicas {
                crate::optim::check_lr(r.optimizer.params().layout(), s.lr())?;
            }
        }
        self.replicas.iter_mut().try_for_each(|r| {
            r.optimizer
                .set_schedule(schedule.as_ref().map(|s| s.boxed_clone()))
        })
    }

    /// Passes an observed metric to every replica's schedule ([`Optimizer::observe`]); a metric
    /// one refuses, all refuse (their schedules are alike), and then none changes.
    pub fn observe(&mut self, metric: f64) -> Result<()> {
        self.replicas
            .iter_mut()
            .try_for_each(|r| r.optimizer.observe(metric))
    }

    /// Saves the group's state (every replica's: they are identical) to `path`
    /// ([`Optimizer::save_checkpoint`]).
    pub fn save_checkpoint(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.replicas[0].optimizer.save_checkpoint(path)
    }

    /// Loads `path` into every replica: the file is read and checked once, against every
    /// replica, before any changes ([`Optimizer::load_checkpoint`]).
    pub fn load_checkpoint(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let checkpoint = crate::checkpoint::Checkpoint::read(path.as_ref())?;
        let restores = self
            .replicas
            .iter()
            .map(|r| r.optimizer.prepare_restore(&checkpoint))
            .collect::<Result<Vec<_>>>()?;
        self.replicas
            .iter_mut()
            .zip(restores)
            .try_for_each(|(r, x)| r.optimizer.restore(x))
    }

    /// The replicas, each to be stepped from a thread of the caller's own ([`Replica::step`]).
    pub fn into_replicas(self) -> Vec<Replica<C>> {
        self.replicas
    }

    /// The optimizers, to rebuild a group after it was aborted (a replica stalled or died).
    pub fn into_optimizers(self) -> Vec<Optimizer> {
        self.replicas.into_iter().map(|r| r.optimizer).collect()
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.replicas[0].buckets
    }

    /// One data-parallel step of every replica, each on a thread of its own: `backward(rank,
    /// grads)` writes replica `rank`'s gradients and marks them ready (see [`Replica::step`]).
    /// Returns once every backward pass has returned (they borrow the caller's data): a replica
    /// slower than the timeout fails the step everywhere, but this call waits for it. To have the
    /// others return within the timeout whatever one replica does, step them from threads of
    /// your own ([`DataParallel::into_replicas`]).
    pub fn step<F>(&mut self, backward: F) -> Result<()>
    where
        F: Fn(usize, &Gradients<'_>) -> Result<()> + Sync,
    {
        on_every_replica(&mut self.replicas, |r| {
            let rank = r.rank();
            r.step(|grads| backward(rank, grads))
        })
    }
}

/// Runs `f` on every replica at once (one thread each) and returns the root cause of a failure:
/// a replica's own error before the errors it caused elsewhere.
fn on_every_replica<R, F>(replicas: &mut [R], f: F) -> Result<()>
where
    R: Send,
    F: Fn(&mut R) -> Result<()> + Sync,
{
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = replicas
            .iter_mut()
            .map(|r| {
                let f = &f;
                s.spawn(move || f(r))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Panicked("a replica thread".into())))
            })
            .collect()
    });
    root_cause(results.into_iter().filter_map(|r| r.err())).map_or(Ok(()), Err)
}

/// The error that explains the others: a replica's own error (a mismatch, a bad gradient, a
/// panic) comes before what it caused elsewhere (a communicator or NCCL call aborted under the
/// others, a timeout), and those before the others' "replica k failed". Ranks race to report, so
/// the choice must not depend on which rank's error came first.
fn root_cause(errors: impl Iterator<Item = Error>) -> Option<Error> {
    let consequence = |e: &Error| match e {
        Error::ReplicaFailed { .. } => 2,
        Error::Communicator(_) | Error::Timeout(_) | Error::Nccl { .. } => 1,
        _ => 0,
    };
    errors.min_by_key(consequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_cause_wins_whichever_rank_reports_it() {
        let nccl = || Error::Nccl {
            code: 5,
            name: "ncclInvalidUsage",
            message: "aborted".into(),
        };
        let differ = || Error::ReplicasDiffer {
            what: "layout".into(),
        };
        for errors in [
            vec![nccl(), differ()],
            vec![differ(), nccl()],
            vec![Error::ReplicaFailed { rank: 1 }, nccl(), differ()],
        ] {
            let cause = root_cause(errors.into_iter());
            assert!(
                matches!(cause, Some(Error::ReplicasDiffer { .. })),
                "{cause:?}"
            );
        }
        let cause = root_cause([Error::ReplicaFailed { rank: 0 }, nccl()].into_iter());
        assert!(matches!(cause, Some(Error::Nccl { .. })), "{cause:?}");
        assert!(root_cause(std::iter::empty()).is_none());
    }
}
