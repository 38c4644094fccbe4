//! One replica's data-parallel step, in lockstep with the others (the module docs of
//! [`super`] tell the three phases).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};

use super::fingerprint::{fingerprint, fnv1a};
use super::gradients::{Bucket, BucketSlot, BucketState, Gradients};
use crate::comm::{Buffer, Communicator, HostBuffer, ReduceOp};
use crate::error::{Error, Result};
use crate::Optimizer;

/// How a replica's step failed.
pub(super) enum Failure {
    /// Every replica knows and fails alike; the group is still in step.
    Agreed(Error),
    /// This replica left the lockstep (communication failed, replicas diverged): the group is
    /// aborted.
    OutOfStep(Error),
}

/// 64-bit words as four 16-bit pieces each, exact in f32 (collectives move f32).
/// The error of a failed lockstep; a replica that left the lockstep aborts its group, so the
/// others neither wait for it nor pair up with it later.
pub(super) fn settle<C: Communicator>(
    comm: &C,
    outcome: std::result::Result<(), Failure>,
) -> Result<()> {
    match outcome {
        Ok(()) => Ok(()),
        Err(Failure::Agreed(e)) => Err(e),
        Err(Failure::OutOfStep(e)) => {
            comm.abort(&format!("replica {} failed: {e}", comm.rank()));
            Err(e)
        }
    }
}

pub(super) fn words_to_f32(words: &[u64]) -> Vec<f32> {
    words
        .iter()
        .flat_map(|w| (0..4).map(move |k| ((w >> (16 * k)) & 0xffff) as f32))
        .collect()
}

/// What a replica's step did, as the replicas compare it: how it ended, and the step count, lr
/// and loss scale it left (a skip on one replica and not another shows in the step count).
pub(super) fn outcome(opt: &Optimizer, r: &Result<()>) -> Result<Vec<u64>> {
    let code = match r {
        Ok(()) => 0,
        Err(Error::NonFiniteGradient { .. }) => 1,
        Err(_) => 2,
    };
    let s = opt.saved()?;
    Ok(vec![code, s.step, s.lr.to_bits(), s.loss_scale.to_bits()])
}

/// One replica of a data-parallel group: its optimizer, its communicator and the bucket plan.
/// [`DataParallel::step`](super::DataParallel::step) steps them all;
/// [`DataParallel::into_replicas`](super::DataParallel::into_replicas) hands them out to be
/// stepped from threads of the caller's own, so that one stalled backward pass blocks only its
/// own thread while the others' steps fail within the timeout.
#[derive(Debug)]
pub struct Replica<C: Communicator> {
    pub(super) optimizer: Optimizer,
    pub(super) comm: C,
    pub(super) buckets: Arc<[Bucket]>,
}

impl<C: Communicator> Replica<C> {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    pub fn communicator(&self) -> &C {
        &self.comm
    }

    /// One data-parallel step of this replica: `backward` writes its gradients through the
    /// [`Gradients`] it is given and marks them ready (ideally last layer first); buckets are
    /// averaged across replicas as they become ready; then, if every replica got that far, every
    /// replica takes the same fused step (see the module docs). Every replica of the group must
    /// call this, each once per step.
    pub fn step<F>(&mut self, backward: F) -> Result<()>
    where
        F: FnOnce(&Gradients<'_>) -> Result<()>,
    {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.step_in_lockstep(backward)))
            .unwrap_or_else(|_| {
                Err(Failure::OutOfStep(Error::Panicked(format!(
                    "replica {}'s data-parallel step",
                    self.rank()
                ))))
            });
        settle(&self.comm, outcome)
    }

    fn step_in_lockstep<F>(&mut self, backward: F) -> std::result::Result<(), Failure>
    where
        F: FnOnce(&Gradients<'_>) -> Result<()>,
    {
        let out_of_step = Failure::OutOfStep;
        let computed = self.reduce_gradients(backward).map_err(out_of_step)?;
        let prepared = computed.and_then(|()| self.optimizer.apply_schedule());
        let verdicts = exchange(&self.comm, &[if prepared.is_ok() { 0.0 } else { 1.0 }])
            .map_err(out_of_step)?;
        match (prepared, verdicts.iter().position(|&v| v != 0.0)) {
            (Err(mine), _) => return Err(Failure::Agreed(mine)),
            (Ok(()), Some(rank)) => return Err(Failure::Agreed(Error::ReplicaFailed { rank })),
            (Ok(()), None) => {}
        }
        let stepped = self.optimizer.step_at_current_lr(crate::optim::Norm::Own);
        confirm_alike(&self.comm, &self.optimizer, &stepped)?;
        // Every replica ended the step the same way: an error here is one they all share.
        stepped.map_err(Failure::Agreed)
    }

    /// Runs `backward` beside the communication thread that reduces the buckets. `Err` only when
    /// the group's communication failed; the backward pass's own outcome is the `Ok` value.
    fn reduce_gradients<F>(&mut self, backward: F) -> Result<Result<()>>
    where
        F: FnOnce(&Gradients<'_>) -> Result<()>,
    {
        let rank = self.comm.rank();
        let buckets = self.buckets.clone();
        let layout = self.optimizer.params().layout().clone();
        let device = self.optimizer.device();
        // The arena is split in arena order; buckets are numbered from the arena's end.
        let mut by_start: Vec<usize> = (0..buckets.len()).collect();
        by_start.sort_by_key(|&b| buckets[b].range.start);
        let lens: Vec<usize> = by_start.iter().map(|&b| buckets[b].range.len()).collect();
        let (masters, pieces) = self.optimizer.set_mut().grad_buffers_mut(&lens)?;
        let mut pieces: Vec<Option<Buffer<'_>>> = pieces.into_iter().map(Some).collect();
        let mut place = vec![(0, 0); layout.tensors().len()];
        let mut slots = Vec::with_capacity(buckets.len());
        for (b, bucket) in buckets.iter().enumerate() {
            let pos = by_start.iter().position(|&x| x == b).unwrap_or(0);
            let buffer = pieces[pos].take().ok_or_else(|| {
                Error::Communicator("bucket plan does not cover the arena".into())
            })?;
            for (i, &t) in bucket.tensors.iter().enumerate() {
                place[t] = (b, i);
            }
            slots.push(BucketSlot {
                start: bucket.range.start,
                state: Mutex::new(BucketState {
                    buffer,
                    marked: vec![false; bucket.tensors.len()],
                    pending: bucket.tensors.len(),
                }),
                ready: Condvar::new(),
            });
        }
        let grads = Gradients {
            layout: &layout,
            masters,
            device,
            buckets: slots,
            place,
        };
        let comm = &self.comm;
        let (computed, reduced) = std::thread::scope(|s| {
            let reducer = s.spawn(|| -> Result<()> {
                for b in 0..grads.buckets.len() {
                    let mut state = grads.wait_ready(b)?;
                    comm.all_reduce(state.buffer.reborrow(), ReduceOp::Average)?;
                }
                Ok(())
            });
            let computed =
                catch_unwind(AssertUnwindSafe(|| backward(&grads))).unwrap_or_else(|_| {
                    Err(Error::Panicked(format!("replica {rank}'s backward pass")))
                });
            // Whatever the pass did, the buckets are reduced: the group stays in step.
            grads.mark_all_ready();
            let reduced = reducer.join().unwrap_or_else(|_| {
                Err(Error::Panicked(format!(
                    "replica {rank}'s communication thread"
                )))
            });
            (computed, reduced)
        });
        reduced.map(|()| computed)
    }

    /// Checks, with every replica, that they would stay identical (see [`fingerprint`]), then
    /// takes rank 0's parameters.
    pub(super) fn join_group(&mut self) -> Result<()> {
        let mut mine = fingerprint(&self.optimizer)?;
        mine.push(("buckets", fnv1a(format!("{:?}", self.buckets).as_bytes())));
        let hashes: Vec<u64> = mine.iter().map(|(_, h)| *h).collect();
        let mut send = words_to_f32(&hashes);
        let mut all = vec![0.0f32; send.len() * self.comm.world_size()];
        self.comm.all_gather(
            HostBuffer::F32(&mut send).into(),
            HostBuffer::F32(&mut all).into(),
        )?;
        let differ: Vec<&str> = mine
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                all.chunks(send.len())
                    .any(|theirs| theirs[4 * i..4 * i + 4] != send[4 * i..4 * i + 4])
            })
            .map(|(_, (what, _))| *what)
            .collect();
        if !differ.is_empty() {
            return Err(Error::ReplicasDiffer {
                what: differ.join(", "),
            });
        }
        let mut values = self.optimizer.params().masters_snapshot()?.into_owned();
        self.comm
            .broadcast(HostBuffer::F32(&mut values).into(), 0)?;
        self.optimizer.set_mut().restore_masters(&values)
    }
}

/// Exchanges a few numbers with every replica (all ranks' values, in rank order).
/// The values are never NaN: the receive buffer starts all NaN, so a collective that
/// reported success but delivered nothing (a rank whose peers are gone) is an error here.
pub(super) fn exchange<C: Communicator>(comm: &C, mine: &[f32]) -> Result<Vec<f32>> {
    let n = mine.len();
    let mut send = mine.to_vec();
    let mut all = vec![f32::NAN; n * comm.world_size()];
    comm.all_gather(
        HostBuffer::F32(&mut send).into(),
        HostBuffer::F32(&mut all).into(),
    )?;
    let rank = comm.rank();
    if all.iter().any(|x| x.is_nan()) || all[rank * n..(rank + 1) * n] != *mine {
        return Err(Error::Communicator(format!(
            "replica {rank}: an exchange with the other replicas did not complete"
        )));
    }
    Ok(all)
}

/// Checks with every replica that all ended the step alike ([`outcome`]). From the step on a
/// replica may have applied it: a failure to compare cannot be undone, and says so.
pub(super) fn confirm_alike<C: Communicator>(
    comm: &C,
    optimizer: &Optimizer,
    stepped: &Result<()>,
) -> std::result::Result<(), Failure> {
    let unconfirmed = |e: Error| {
        Failure::OutOfStep(Error::ReplicasDiverged(format!(
            "replica {} ended its step, but whether every replica ended it alike could not be \
             confirmed: {e}",
            comm.rank()
        )))
    };
    let mine = outcome(optimizer, stepped).map_err(unconfirmed)?;
    let all = exchange(comm, &words_to_f32(&mine)).map_err(unconfirmed)?;
    let theirs: Vec<&[f32]> = all.chunks(4 * mine.len()).collect();
    if theirs.iter().any(|t| *t != theirs[0]) {
        let describe = |t: &[f32]| match t[0] as u8 {
            0 => "stepped",
            1 => "refused non-finite gradients",
            _ => "failed",
        };
        let detail = theirs
            .iter()
            .enumerate()
            .map(|(r, t)| format!("replica {r} {}", describe(t)))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Failure::OutOfStep(Error::ReplicasDiverged(format!(
            "after the step their step counts, lrs or loss scales differ ({detail})"
        ))));
    }
    Ok(())
}
