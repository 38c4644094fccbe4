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

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::comm::cpu::CpuCommunicator;
use crate::comm::nccl::NcclCommunicator;
use crate::comm::single_device::SingleDeviceCommunicator;
use crate::comm::{Buffer, Communicator, HostBuffer, ReduceOp};
use crate::error::{Error, Result};
use crate::params::Layout;
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

/// A bucket: whole tensors, one contiguous arena range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub range: Range<usize>,
    pub tensors: Vec<usize>,
}

/// Cuts the arena into buckets from its end, at tensor boundaries. A tensor of zero elements
/// shares its offset with the next tensor; it is visited after that one, so it can never close
/// a bucket in front of it.
pub fn buckets(layout: &Layout, elem_bytes: usize, options: &DataParallelOptions) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    let mut order: Vec<usize> = (0..layout.tensors().len()).collect();
    order.sort_by_key(|&i| {
        let t = &layout.tensors()[i];
        std::cmp::Reverse((t.offset + t.len, t.offset))
    });
    let mut end = layout.arena_len();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        let t = &layout.tensors()[i];
        current.push(i);
        let cap = if out.is_empty() {
            options.first_bucket_bytes
        } else {
            options.bucket_bytes
        };
        if t.len > 0 && (end - t.offset).saturating_mul(elem_bytes) >= cap {
            out.push(Bucket {
                range: t.offset..end,
                tensors: std::mem::take(&mut current),
            });
            end = t.offset;
        }
    }
    if !current.is_empty() || end > 0 {
        out.push(Bucket {
            range: 0..end,
            tensors: current,
        });
    }
    out
}

/// One bucket's gradients and which of its tensors are final.
struct BucketState<'a> {
    buffer: Buffer<'a>,
    /// Per tensor of the bucket (in [`Bucket::tensors`] order): marked ready this step.
    marked: Vec<bool>,
    pending: usize,
}

struct BucketSlot<'a> {
    start: usize,
    state: Mutex<BucketState<'a>>,
    ready: Condvar,
}

/// What a replica's training loop sees during a data-parallel step: its parameters, to read, and
/// its gradients, to write and mark ready. Each gradient is written, then marked ready, once per
/// step; a second mark, or a write after the mark, is [`Error::GradientAlreadyReady`] (its bucket
/// may already be reduced) and fails the step on every replica.
pub struct Gradients<'a> {
    layout: &'a Layout,
    /// The masters, when they live on the host.
    masters: Option<&'a [f32]>,
    device: Device,
    buckets: Vec<BucketSlot<'a>>,
    /// Per tensor: its bucket and its place in the bucket's tensor list.
    place: Vec<(usize, usize)>,
}

fn poisoned<T>(_: T) -> Error {
    Error::Communicator("gradient buckets poisoned by a panicking thread".into())
}

impl<'a> Gradients<'a> {
    fn bucket(&self, name: &str) -> Result<(MutexGuard<'_, BucketState<'a>>, usize, usize)> {
        let index = self.layout.tensor_index(name)?;
        let (b, i) = self.place[index];
        let state = self.buckets[b].state.lock().map_err(poisoned)?;
        if state.marked[i] {
            return Err(Error::GradientAlreadyReady(name.to_string()));
        }
        Ok((state, b, i))
    }

    /// A tensor's current parameters (fp32 masters), when they live on the host.
    pub fn param(&self, name: &str) -> Result<&[f32]> {
        let masters = self.masters.ok_or(Error::NotHostMemory(self.device))?;
        Ok(&masters[self.layout.tensor(name)?.range()])
    }

    /// Writes a tensor's gradient (rounded to the gradient dtype).
    pub fn set(&self, name: &str, values: &[f32]) -> Result<()> {
        let t = self.layout.tensor(name)?;
        crate::error::check_len(&format!("gradient of '{name}'"), t.len, values.len())?;
        let (mut state, b, _) = self.bucket(name)?;
        let at = t.offset - self.buckets[b].start;
        state.buffer.write_range(at, values)
    }

    /// Declares a tensor's gradient final; its bucket is all-reduced once all its tensors are.
    pub fn mark_ready(&self, name: &str) -> Result<()> {
        let (mut state, b, i) = self.bucket(name)?;
        state.marked[i] = true;
        state.pending -= 1;
        if state.pending == 0 {
            self.buckets[b].ready.notify_all();
        }
        Ok(())
    }

    /// Marks every gradient ready (the end of a backward pass, whatever it did).
    fn mark_all_ready(&self) {
        for slot in &self.buckets {
            if let Ok(mut state) = slot.state.lock() {
                state.marked.iter_mut().for_each(|m| *m = true);
                state.pending = 0;
            }
            slot.ready.notify_all();
        }
    }

    /// Bucket `b`, once all its tensors are ready.
    fn wait_ready(&self, b: usize) -> Result<MutexGuard<'_, BucketState<'a>>> {
        let slot = &self.buckets[b];
        let mut state = slot.state.lock().map_err(poisoned)?;
        while state.pending > 0 {
            state = slot.ready.wait(state).map_err(poisoned)?;
        }
        Ok(state)
    }
}

/// How a replica's step failed.
enum Failure {
    /// Every replica knows and fails alike; the group is still in step.
    Agreed(Error),
    /// This replica left the lockstep (communication failed, replicas diverged): the group is
    /// aborted.
    OutOfStep(Error),
}

/// 64-bit words as four 16-bit pieces each, exact in f32 (collectives move f32).
fn words_to_f32(words: &[u64]) -> Vec<f32> {
    words
        .iter()
        .flat_map(|w| (0..4).map(move |k| ((w >> (16 * k)) & 0xffff) as f32))
        .collect()
}

/// What a replica's step did, as the replicas compare it: how it ended, and the step count, lr
/// and loss scale it left (a skip on one replica and not another shows in the step count).
fn outcome(opt: &Optimizer, r: &Result<()>) -> Result<Vec<u64>> {
    let code = match r {
        Ok(()) => 0,
        Err(Error::NonFiniteGradient { .. }) => 1,
        Err(_) => 2,
    };
    let s = opt.saved()?;
    Ok(vec![code, s.step, s.lr.to_bits(), s.loss_scale.to_bits()])
}

/// One replica of a data-parallel group: its optimizer, its communicator and the bucket plan.
/// [`DataParallel::step`] steps them all; [`DataParallel::into_replicas`] hands them out to be
/// stepped from threads of the caller's own, so that one stalled backward pass blocks only its
/// own thread while the others' steps fail within the timeout.
#[derive(Debug)]
pub struct Replica<C: Communicator> {
    optimizer: Optimizer,
    comm: C,
    buckets: Arc<[Bucket]>,
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
        match outcome {
            Ok(()) => Ok(()),
            Err(Failure::Agreed(e)) => Err(e),
            Err(Failure::OutOfStep(e)) => {
                // The others must not wait for this replica, nor pair up with it later.
                self.comm
                    .abort(&format!("replica {} failed: {e}", self.rank()));
                Err(e)
            }
        }
    }

    fn step_in_lockstep<F>(&mut self, backward: F) -> std::result::Result<(), Failure>
    where
        F: FnOnce(&Gradients<'_>) -> Result<()>,
    {
        let out_of_step = Failure::OutOfStep;
        let computed = self.reduce_gradients(backward).map_err(out_of_step)?;
        let prepared = computed.and_then(|()| self.optimizer.apply_schedule());
        let verdicts = self
            .exchange(&[if prepared.is_ok() { 0.0 } else { 1.0 }])
            .map_err(out_of_step)?;
        match (prepared, verdicts.iter().position(|&v| v != 0.0)) {
            (Err(mine), _) => return Err(Failure::Agreed(mine)),
            (Ok(()), Some(rank)) => return Err(Failure::Agreed(Error::ReplicaFailed { rank })),
            (Ok(()), None) => {}
        }
        let stepped = self.optimizer.step_at_current_lr();
        // From here on this replica may have applied the step: a failure to compare outcomes
        // cannot be undone, and says so.
        let unconfirmed = |e: Error| {
            out_of_step(Error::ReplicasDiverged(format!(
                "replica {} ended its step, but whether every replica ended it alike could not be \
                 confirmed: {e}",
                self.comm.rank()
            )))
        };
        let mine = outcome(&self.optimizer, &stepped).map_err(unconfirmed)?;
        let all = self.exchange(&words_to_f32(&mine)).map_err(unconfirmed)?;
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
            return Err(out_of_step(Error::ReplicasDiverged(format!(
                "after the step their step counts, lrs or loss scales differ ({detail})"
            ))));
        }
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
        let (masters, pieces) = self.optimizer.params_mut().grad_buffers_mut(&lens)?;
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

    /// Exchanges a few numbers with every replica (all ranks' values, in rank order).
    /// The values are never NaN: the receive buffer starts all NaN, so a collective that
    /// reported success but delivered nothing (a rank whose peers are gone) is an error here.
    fn exchange(&self, mine: &[f32]) -> Result<Vec<f32>> {
        let n = mine.len();
        let mut send = mine.to_vec();
        let mut all = vec![f32::NAN; n * self.comm.world_size()];
        self.comm.all_gather(
            HostBuffer::F32(&mut send).into(),
            HostBuffer::F32(&mut all).into(),
        )?;
        let rank = self.comm.rank();
        if all.iter().any(|x| x.is_nan()) || all[rank * n..(rank + 1) * n] != *mine {
            return Err(Error::Communicator(format!(
                "replica {rank}: an exchange with the other replicas did not complete"
            )));
        }
        Ok(all)
    }

    /// Checks, with every replica, that they would stay identical (see [`fingerprint`]), then
    /// takes rank 0's parameters.
    fn join_group(&mut self) -> Result<()> {
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
        let mut values = self.optimizer.params().values_snapshot()?.into_owned();
        self.comm
            .broadcast(HostBuffer::F32(&mut values).into(), 0)?;
        self.optimizer.params_mut().restore_values(&values)
    }
}

/// FNV-1a of `text`.
fn fnv1a(text: &[u8]) -> u64 {
    text.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Hashes of everything replicas must agree on to stay identical, each part named: the layout
/// and dtypes, the groups, the rule, the lr, the options, the step count, the loss-scale state,
/// the schedule and its position, and the optimizer state. (Parameters may differ: rank 0's are
/// broadcast.) Each part is hashed from its JSON, so no two different values read alike.
fn fingerprint(opt: &Optimizer) -> Result<Vec<(&'static str, u64)>> {
    let json = |v: serde_json::Value| fnv1a(v.to_string().as_bytes());
    let params = opt.params();
    let layout = params.layout();
    let saved = opt.saved()?;
    let mut rule = serde_json::to_value(&saved.rule)
        .map_err(|e| Error::Communicator(format!("fingerprint: {e}")))?;
    if let serde_json::Value::Object(m) = &mut rule {
        m.remove("lr");
    }
    let tensors: Vec<serde_json::Value> = layout
        .tensors()
        .iter()
        .map(|t| serde_json::json!([t.name, t.shape, t.group, t.offset]))
        .collect();
    let groups: Vec<serde_json::Value> = layout
        .groups()
        .iter()
        .map(|g| serde_json::json!([g.name, g.options, [g.range.start, g.range.end]]))
        .collect();
    let dtypes = format!("{:?} {:?}", params.grad_dtype(), params.model_dtype());
    let state = opt.state_arenas()?;
    let state: Vec<u32> = state
        .iter()
        .map(|a| crc32fast::hash(a.bytes(0..a.len())))
        .collect();
    Ok(vec![
        (
            "layout",
            json(serde_json::json!([tensors, layout.arena_len(), dtypes])),
        ),
        ("groups", json(serde_json::json!(groups))),
        ("rule", json(rule)),
        ("lr", saved.lr.to_bits()),
        ("options", json(serde_json::json!(saved.options))),
        ("step", saved.step),
        (
            "loss scale",
            json(serde_json::json!([
                saved.loss_scale.to_bits(),
                saved.good_steps
            ])),
        ),
        (
            "schedule",
            json(opt.schedule().map_or(serde_json::Value::Null, |s| s.save())),
        ),
        ("state", json(serde_json::json!(state))),
    ])
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
fn on_every_replica<C, F>(replicas: &mut [Replica<C>], f: F) -> Result<()>
where
    C: Communicator,
    F: Fn(&mut Replica<C>) -> Result<()> + Sync,
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
    let rank_of_cause = |e: &Error| match e {
        Error::ReplicaFailed { .. } => 2,
        Error::Communicator(_) | Error::Timeout(_) => 1,
        _ => 0,
    };
    results
        .into_iter()
        .filter_map(|r| r.err())
        .min_by_key(rank_of_cause)
        .map_or(Ok(()), Err)
}
