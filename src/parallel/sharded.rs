//! Sharded optimizer state (ZeRO stage 1): every replica keeps the whole model's weights and
//! gradients, but the fp32 masters and the optimizer state of one window of the arena only, so
//! optimizer memory per replica is the unsharded one ÷ N.
//!
//! A step, in lockstep as in [`super`]: the backward pass writes the whole gradient arena; a
//! reduce-scatter leaves each replica the average of its window; every replica computes its
//! window's per-chunk Σ g² and all exchange them (on the host, with their verdicts; on a GPU,
//! gathered on the device after the verdicts), so each sums the same chunks in the same order as
//! an unsharded step and finds the same global norm, clip factor and non-finite verdict; each
//! steps its window; the replicas confirm they ended the step alike; an all-gather writes every
//! window's new weights into every replica's model.
//!
//! Windows are [`SHARD_GRANULE`] elements aligned (a whole number of every engine's chunks, and
//! so of quantization blocks), all the same length: the arena is padded to N windows. So a
//! window's chunks are the unsharded step's chunks and the step is bit-identical to it, with
//! dense or quantized state and every kind of masters, whenever the communicator's
//! reduce-scatter adds as its all-reduce does (the CPU, MPI and single-device communicators add
//! in rank order; NCCL chooses its own order per collective, which the stand-in NCCL does not
//! model). Gradients are reduced once the backward pass has returned, not bucket by bucket
//! during it.
//!
//! On a GPU the same happens on the device: each replica's engine writes its window's chunk
//! partials, an all-gather brings every window's to every replica (as f64 bits), and one block
//! adds them as the unsharded norm pass adds its own (trailing zero partials of the padding
//! change no bit), deciding the step in device memory; the stochastic-rounding stream is indexed
//! by whole-set position, so a window draws what the whole set would.
//!
//! Checkpoints are a directory: one file per replica (its window's masters and state, in the
//! usual format) and a manifest naming them, written last; they load into a group of any size,
//! or into one unsharded optimizer ([`load_sharded_checkpoint`]), and a whole checkpoint loads
//! into a sharded group.

use std::path::Path;
use std::sync::Arc;

use super::gradients::{BucketSlot, BucketState, Gradients};
use super::replica::{confirm_alike, exchange, settle, words_to_f32, Failure};
use super::{on_every_replica, DataParallel, DataParallelOptions, Replica};
use crate::comm::cpu::CpuCommunicator;
use crate::comm::nccl::NcclCommunicator;
use crate::comm::single_device::SingleDeviceCommunicator;
use crate::comm::{Buffer, Communicator, DeviceBuffer, HostBuffer, ReduceOp};
use crate::cuda::engine::DeviceStorage;
use crate::cuda::masters::DeviceMasters;
use crate::error::{Error, Result};
use crate::host::HostStorage;
use crate::layout::Layout;
use crate::masters::{weights_missing, HostMasters};
use crate::optim::{Norm, Partials, StepReport};
use crate::params::{ParamSet, Storage};
use crate::schedule::LrSchedule;
use crate::{Device, Optimizer};

pub use crate::checkpoint::load_sharded_checkpoint;
pub use crate::plan::{ShardPlan, SHARD_GRANULE};

/// What one replica of a sharded group holds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardMemory {
    /// Optimizer state of the window (moments; codes and scales when quantized).
    pub state_bytes: usize,
    /// The window's masters (fp32, or remainders), beyond the model's weights.
    pub masters_bytes: usize,
    /// Elements in the window (padding included).
    pub window_len: usize,
}

/// One replica of a sharded group (see the module docs).
#[derive(Debug)]
pub struct ShardedReplica<C: Communicator> {
    /// The whole model's weights and gradients, padded to the plan; no engine.
    model: ParamSet,
    /// This replica's window: its masters, gradients and state, and the engine that steps them.
    shard: Optimizer,
    /// The whole set's layout, unpadded (checkpoints are cut along it).
    whole: Arc<Layout>,
    plan: ShardPlan,
    comm: C,
}

impl<C: Communicator> ShardedReplica<C> {
    /// Cuts a replica of a data-parallel group (identical to the others, which are cut alike at
    /// the same time) into its window; every replica of the group must call this.
    fn from_replica(r: Replica<C>) -> Result<Self> {
        let Replica {
            optimizer, comm, ..
        } = r;
        let whole = optimizer.params().layout().clone();
        let plan = ShardPlan::new(whole.arena_len(), comm.world_size());
        let cut = cut_shard(&optimizer, &plan, comm.rank());
        // Every window's chunks must be the same size for their partials to line up (GPUs of
        // different models size them differently).
        let chunk = match &cut {
            Ok(shard) => shard.plan().map_or(0.0, |p| p.chunk_elems() as f32),
            Err(_) => 0.0,
        };
        let verdicts = exchange(&comm, &[if cut.is_ok() { 0.0 } else { 1.0 }, chunk]);
        let shard = match (cut, verdicts) {
            (Err(e), _) | (_, Err(e)) => return Err(e),
            (Ok(_), Ok(v)) if v.iter().step_by(2).any(|&x| x != 0.0) => {
                let rank = v.iter().step_by(2).position(|&x| x != 0.0).unwrap_or(0);
                return Err(Error::ReplicaFailed { rank });
            }
            (Ok(_), Ok(v)) if v.iter().skip(1).step_by(2).any(|&c| c != chunk) => {
                return Err(Error::ReplicasDiffer {
                    what: "engine chunk sizes (GPUs with different SM counts)".into(),
                });
            }
            (Ok(shard), Ok(_)) => shard,
        };
        let model = model_side(optimizer.into_params(), &plan).inspect_err(|e| {
            comm.abort(&format!(
                "replica {} cannot hold its model: {e}",
                comm.rank()
            ));
        })?;
        Ok(ShardedReplica {
            model,
            shard,
            whole,
            plan,
            comm,
        })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn communicator(&self) -> &C {
        &self.comm
    }

    /// The whole model: its weights (read them with [`ParamSet::read_param`]) and gradients.
    pub fn params(&self) -> &ParamSet {
        &self.model
    }

    /// The optimizer of this replica's window (its layout holds the pieces of the tensors
    /// inside the window).
    pub fn shard(&self) -> &Optimizer {
        &self.shard
    }

    pub fn plan(&self) -> ShardPlan {
        self.plan
    }

    /// The whole set's layout (unpadded).
    pub fn whole_layout(&self) -> &Arc<Layout> {
        &self.whole
    }

    pub fn memory(&self) -> Result<ShardMemory> {
        Ok(ShardMemory {
            state_bytes: self.shard.state_bytes()?,
            masters_bytes: masters_bytes(&self.shard),
            window_len: self.plan.window_len,
        })
    }

    pub fn lr(&self) -> f64 {
        self.shard.lr()
    }

    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.shard.set_lr(lr)
    }

    pub fn set_schedule(&mut self, schedule: Option<Box<dyn LrSchedule>>) -> Result<()> {
        self.shard.set_schedule(schedule)
    }

    pub fn observe(&mut self, metric: f64) -> Result<()> {
        self.shard.observe(metric)
    }

    pub fn report(&self) -> Result<StepReport> {
        self.shard.report()
    }

    pub fn step_count(&self) -> Result<u64> {
        self.shard.step_count()
    }

    /// One sharded step of this replica (see the module docs): `backward` writes its gradients
    /// through the [`Gradients`] it is given. Every replica of the group must call this, each
    /// once per step; the failure semantics are those of [`Replica::step`].
    pub fn step<F>(&mut self, backward: F) -> Result<()>
    where
        F: FnOnce(&Gradients<'_>) -> Result<()>,
    {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.step_in_lockstep(backward)
        }))
        .unwrap_or_else(|_| {
            Err(Failure::OutOfStep(Error::Panicked(format!(
                "replica {}'s sharded step",
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
        let computed = self.backward(backward).map_err(out_of_step)?;
        {
            let send = whole_grads(&mut self.model).map_err(out_of_step)?;
            let recv = whole_grads(self.shard.set_mut()).map_err(out_of_step)?;
            self.comm
                .reduce_scatter(send, recv, ReduceOp::Average)
                .map_err(out_of_step)?;
        }
        let prepared = computed.and_then(|()| self.shard.apply_schedule());
        // Mine: the verdict, then (on the host) this window's chunk partials, as many on every
        // replica; none when the step needs no norm, alike on every replica.
        let mut mine = vec![if prepared.is_ok() { 0.0 } else { 1.0 }];
        let world = self.plan.world;
        let on_device = self.shard.device() != Device::Cpu;
        if !on_device {
            if let Some(Partials::Host(p)) =
                self.shard.chunk_partials(world).map_err(out_of_step)?
            {
                let words: Vec<u64> = p.iter().map(|x| x.to_bits()).collect();
                mine.extend(words_to_f32(&words));
            }
        }
        // (On a device, this also orders the window's reduced gradients before what follows.)
        let all = exchange(&self.comm, &mine).map_err(out_of_step)?;
        let per = mine.len();
        let failed = (0..world).find(|&r| all[r * per] != 0.0);
        match (prepared, failed) {
            (Err(e), _) => return Err(Failure::Agreed(e)),
            (Ok(()), Some(rank)) => return Err(Failure::Agreed(Error::ReplicaFailed { rank })),
            (Ok(()), None) => {}
        }
        // Σ g² as the unsharded step sums it: the chunks' partials in arena order, added here or
        // on the device once every window's are gathered there.
        let norm = match on_device {
            false => Norm::Given(
                (0..world)
                    .flat_map(|r| f32_to_words(&all[r * per + 1..(r + 1) * per]))
                    .map(f64::from_bits)
                    .sum::<f64>(),
            ),
            true => {
                let partials = self.shard.chunk_partials(world).map_err(out_of_step)?;
                if let Some(Partials::Device(partials, all)) = partials {
                    self.comm
                        .all_gather(partials.into(), all.into())
                        .and_then(|()| self.comm.barrier())
                        .map_err(out_of_step)?;
                }
                Norm::Gathered
            }
        };
        let stepped = self.shard.step_at_current_lr(norm);
        confirm_alike(&self.comm, &self.shard, &stepped)?;
        if stepped.is_ok() {
            self.gather_weights().map_err(|e| {
                out_of_step(Error::ReplicasDiverged(format!(
                    "replica {} stepped its window, but the new weights did not reach every \
                     replica: {e}",
                    self.rank()
                )))
            })?;
        }
        stepped.map_err(Failure::Agreed)
    }

    /// Runs `backward` over the whole gradient arena. `Err` only when the arena cannot be lent.
    fn backward<F>(&mut self, backward: F) -> Result<Result<()>>
    where
        F: FnOnce(&Gradients<'_>) -> Result<()>,
    {
        let rank = self.rank();
        let layout = self.model.layout().clone();
        let device = self.model.device();
        let (masters, mut pieces) = self.model.grad_buffers_mut(&[layout.arena_len()])?;
        let buffer = pieces
            .pop()
            .ok_or_else(|| Error::Communicator("no gradient arena".into()))?;
        let n = layout.tensors().len();
        let grads = Gradients {
            layout: &layout,
            masters,
            device,
            buckets: vec![BucketSlot {
                start: 0,
                state: std::sync::Mutex::new(BucketState {
                    buffer,
                    marked: vec![false; n],
                    pending: n,
                }),
                ready: std::sync::Condvar::new(),
            }],
            place: (0..n).map(|i| (0, i)).collect(),
        };
        Ok(
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backward(&grads)))
                .unwrap_or_else(|_| {
                    Err(Error::Panicked(format!("replica {rank}'s backward pass")))
                }),
        )
    }

    /// Writes every window's weights into every replica's model.
    fn gather_weights(&mut self) -> Result<()> {
        let send = weights_buffer(self.shard.set_mut())?;
        let recv = weights_buffer(&mut self.model)?;
        // The barrier: collectives on device buffers may return before they finish.
        self.comm.all_gather(send, recv)?;
        self.comm.barrier()
    }

    /// Saves the group's state to directory `dir`: this replica's window in a file of its own,
    /// then (rank 0, once every replica has saved) the manifest. Every replica must call this.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> Result<()> {
        // Rank 0's number names this save's files on every replica.
        let mine = words_to_f32(&[crate::checkpoint::save_number()]);
        let save = f32_to_words(&exchange(&self.comm, &mine)?[..mine.len()])
            .first()
            .copied()
            .unwrap_or(0);
        let saved =
            crate::checkpoint::save_shard(dir.as_ref(), &self.shard, save, self.rank(), &self.plan);
        let verdicts = exchange(&self.comm, &[if saved.is_ok() { 0.0 } else { 1.0 }])?;
        saved?;
        if let Some(rank) = verdicts.iter().position(|&v| v != 0.0) {
            return Err(Error::ReplicaFailed { rank });
        }
        let manifest = match self.rank() {
            0 => self.step_count().and_then(|step| {
                crate::checkpoint::write_manifest(dir.as_ref(), &self.whole, &self.plan, step, save)
            }),
            _ => Ok(()),
        };
        // Nobody returns before the manifest is there.
        let verdicts = exchange(&self.comm, &[if manifest.is_ok() { 0.0 } else { 1.0 }])?;
        manifest?;
        match verdicts[0] {
            0.0 => Ok(()),
            _ => Err(Error::ReplicaFailed { rank: 0 }),
        }
    }

    /// Loads a checkpoint into the group: a sharded one (a directory, saved by a group of any
    /// size) or a whole one (a file). Every replica must call this; if any replica cannot load,
    /// none changes.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let prepared =
            crate::checkpoint::prepare_sharded_restore(path.as_ref(), &self.whole, &self.shard);
        let verdicts = exchange(&self.comm, &[if prepared.is_ok() { 0.0 } else { 1.0 }])?;
        let restore = prepared?;
        if let Some(rank) = verdicts.iter().position(|&v| v != 0.0) {
            return Err(Error::ReplicaFailed { rank });
        }
        let restored = self.shard.restore(restore);
        let outcome = restored
            .map_err(Failure::OutOfStep)
            .and_then(|()| self.gather_weights().map_err(Failure::OutOfStep));
        settle(&self.comm, outcome)
    }
}

/// The `window` of `optimizer`'s set, with its own optimizer holding the state of that window.
pub(super) fn cut_shard(optimizer: &Optimizer, plan: &ShardPlan, rank: usize) -> Result<Optimizer> {
    let window = plan.window(rank);
    let set = optimizer.params();
    let storage = match set.storage() {
        Storage::Host(h) => Storage::Host(HostStorage {
            arenas: h.arenas.window(window.clone())?,
            engine: None,
        }),
        Storage::Cuda(d) => Storage::Cuda(Box::new(DeviceStorage {
            rt: d.rt.clone(),
            arenas: d.arenas.window(&d.rt.stream, window.clone(), d.rt.device)?,
            engine: None,
        })),
    };
    let layout = Arc::new(set.layout().window(window));
    let params = ParamSet::from_parts(layout.clone(), storage);
    let mut shard = Optimizer::with_options(
        params,
        optimizer.rule().clone(),
        optimizer.lr(),
        *optimizer.options(),
    )?;
    let values = optimizer.params().masters_snapshot()?;
    let state = optimizer.state_buffers()?;
    let names = optimizer.state_names();
    let pieces = crate::checkpoint::pieces::of_optimizer(set.layout(), names, &values, &state);
    let restore = pieces.restore_for(&shard, optimizer.saved()?, optimizer.schedule_now()?)?;
    shard.restore(restore)?;
    Ok(shard)
}

/// The whole set as a sharded replica keeps it: padded to the plan, and without fp32 masters
/// when the model is a low-precision copy (the shards keep them).
fn model_side(set: ParamSet, plan: &ShardPlan) -> Result<ParamSet> {
    let (layout, mut storage) = set.into_parts();
    let len = plan.padded_len();
    match &mut storage {
        Storage::Host(h) => h.arenas.make_model_side(len)?,
        Storage::Cuda(d) => d.arenas.make_model_side(&d.rt.stream, len, d.rt.device)?,
    }
    Ok(ParamSet::from_parts(
        Arc::new(layout.padded_to(len)),
        storage,
    ))
}

/// The whole gradient arena, for a collective.
fn whole_grads(set: &mut ParamSet) -> Result<Buffer<'_>> {
    let len = set.layout().arena_len();
    set.grad_buffers_mut(&[len])?
        .1
        .pop()
        .ok_or_else(|| Error::Communicator("no gradient arena".into()))
}

/// The arena a forward pass reads: the model copy or bf16 weights when there is one, else the
/// fp32 masters.
fn weights_buffer(set: &mut ParamSet) -> Result<Buffer<'_>> {
    match set.storage_mut() {
        Storage::Host(h) => match (&mut h.arenas.model, &mut h.arenas.masters) {
            (Some(m), _) => Ok(HostBuffer::from(m).into()),
            (None, HostMasters::F32(v)) => Ok(HostBuffer::F32(v).into()),
            _ => Err(weights_missing()),
        },
        Storage::Cuda(d) => {
            let DeviceStorage { rt, arenas, .. } = &mut **d;
            match (&mut arenas.model, &mut arenas.masters) {
                (Some(m), _) => {
                    let len = m.len();
                    m.split_buffers(rt, &[len])?
                        .pop()
                        .map(Buffer::Device)
                        .ok_or_else(weights_missing)
                }
                (None, DeviceMasters::F32(v)) => {
                    Ok(DeviceBuffer::over(v, crate::DType::F32, rt).into())
                }
                _ => Err(weights_missing()),
            }
        }
    }
}

fn masters_bytes(shard: &Optimizer) -> usize {
    match shard.params().storage() {
        Storage::Host(h) => h.arenas.masters.bytes(),
        Storage::Cuda(d) => d.arenas.masters.bytes(),
    }
}

/// The inverse of [`words_to_f32`].
fn f32_to_words(pieces: &[f32]) -> Vec<u64> {
    pieces
        .chunks(4)
        .map(|c| c.iter().rev().fold(0u64, |w, &x| (w << 16) | x as u64))
        .collect()
}

/// A replica of a group being cut into shards, one thread each.
enum Cutting<C: Communicator> {
    Whole(Replica<C>),
    Cut(ShardedReplica<C>),
    Failed,
}

impl<C: Communicator> Cutting<C> {
    fn cut(&mut self) -> Result<()> {
        match std::mem::replace(self, Cutting::Failed) {
            Cutting::Whole(r) => *self = Cutting::Cut(ShardedReplica::from_replica(r)?),
            done => *self = done,
        }
        Ok(())
    }
}

/// N replicas with sharded optimizer state (see the module docs).
#[derive(Debug)]
pub struct ShardedDataParallel<C: Communicator> {
    replicas: Vec<ShardedReplica<C>>,
}

impl ShardedDataParallel<CpuCommunicator> {
    /// Replicas that are threads of this process, on the CPU engine.
    pub fn cpu(optimizers: Vec<Optimizer>, options: DataParallelOptions) -> Result<Self> {
        let comms = CpuCommunicator::group(optimizers.len(), options.timeout)?;
        Self::new(optimizers, comms, options)
    }
}

impl ShardedDataParallel<SingleDeviceCommunicator> {
    /// Replicas sharing one GPU, reduced by a kernel (see [`DataParallel::single_device`]).
    pub fn single_device(optimizers: Vec<Optimizer>, options: DataParallelOptions) -> Result<Self> {
        let replicas = DataParallel::single_device(optimizers, options)?.into_replicas();
        Self::cut(replicas)
    }
}

impl ShardedDataParallel<NcclCommunicator> {
    /// One replica per GPU of this process, joined by NCCL (see [`DataParallel::nccl`]).
    pub fn nccl(optimizers: Vec<Optimizer>, options: DataParallelOptions) -> Result<Self> {
        let replicas = DataParallel::nccl(optimizers, options)?.into_replicas();
        Self::cut(replicas)
    }
}

impl<C: Communicator> ShardedDataParallel<C> {
    /// Checks that the optimizers would stay identical and takes rank 0's parameters, as
    /// [`DataParallel::new`] does, then cuts each into its window.
    pub fn new(
        optimizers: Vec<Optimizer>,
        comms: Vec<C>,
        options: DataParallelOptions,
    ) -> Result<Self> {
        Self::cut(DataParallel::new(optimizers, comms, options)?.into_replicas())
    }

    /// Cuts the replicas of a checked group into their windows.
    fn cut(replicas: Vec<Replica<C>>) -> Result<Self> {
        let mut slots: Vec<Cutting<C>> = replicas.into_iter().map(Cutting::Whole).collect();
        on_every_replica(&mut slots, Cutting::cut)?;
        let replicas = slots
            .into_iter()
            .map(|s| match s {
                Cutting::Cut(r) => Ok(r),
                _ => Err(Error::Communicator("a replica was not cut".into())),
            })
            .collect::<Result<_>>()?;
        Ok(ShardedDataParallel { replicas })
    }

    pub fn replicas(&self) -> &[ShardedReplica<C>] {
        &self.replicas
    }

    /// The replicas, each to be stepped from a thread of the caller's own.
    pub fn into_replicas(self) -> Vec<ShardedReplica<C>> {
        self.replicas
    }

    /// One sharded step of every replica, each on a thread of its own (see
    /// [`DataParallel::step`]).
    pub fn step<F>(&mut self, backward: F) -> Result<()>
    where
        F: Fn(usize, &Gradients<'_>) -> Result<()> + Sync,
    {
        on_every_replica(&mut self.replicas, |r| {
            let rank = r.rank();
            r.step(|grads| backward(rank, grads))
        })
    }

    /// Sets every replica's lr (they refuse alike, and then none changes).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        crate::optim::check_lr(&self.replicas[0].whole, lr)?;
        self.replicas.iter_mut().try_for_each(|r| r.set_lr(lr))
    }

    pub fn set_schedule(&mut self, schedule: Option<Box<dyn LrSchedule>>) -> Result<()> {
        if let Some(s) = &schedule {
            s.validate()?;
            crate::optim::check_lr(&self.replicas[0].whole, s.lr())?;
        }
        self.replicas
            .iter_mut()
            .try_for_each(|r| r.set_schedule(schedule.as_ref().map(|s| s.boxed_clone())))
    }

    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let mut all: Vec<&ShardedReplica<C>> = self.replicas.iter().collect();
        on_every_replica(&mut all, |r| r.save_checkpoint(dir))
    }

    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        on_every_replica(&mut self.replicas, |r| r.load_checkpoint(path))
    }
}
