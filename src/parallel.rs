//! The data-parallel engine: N replicas of one model, gradients averaged once with an all-reduce,
//! and the same fused step on every replica, which therefore hold bit-identical parameters.
//!
//! Gradients live in the arena, so all-reduce buckets are contiguous ranges of it, made of whole
//! tensors and counted from the end of the arena (a backward pass produces the last layers'
//! gradients first). Each replica has a communication thread that all-reduces bucket after bucket,
//! in the same order on every replica, each as soon as the training loop has marked all its
//! tensors ready, while the loop is still computing earlier layers. After every bucket is reduced,
//! a barrier confirms that all replicas got there before any of them steps: a replica that fails
//! or stalls makes every replica return an error within the timeout, and no replica steps.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex};
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

/// Cuts the arena into buckets from its end, at tensor boundaries.
pub fn buckets(layout: &Layout, elem_bytes: usize, options: &DataParallelOptions) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    let mut order: Vec<usize> = (0..layout.tensors().len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(layout.tensors()[i].offset));
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
        if (end - t.offset) * elem_bytes >= cap {
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

/// What a replica's training loop sees during [`DataParallel::step`]: its parameters, to read,
/// and its gradients, to write and mark ready.
pub struct Gradients<'a> {
    layout: &'a Layout,
    /// The masters, when they live on the host.
    values: Option<&'a [f32]>,
    device: crate::Device,
    /// Each bucket's range of the gradient arena.
    buckets: Vec<Mutex<Buffer<'a>>>,
    starts: Vec<usize>,
    bucket_of: Vec<usize>,
    /// Tensors not yet marked ready, per bucket.
    pending: Mutex<Vec<usize>>,
    ready: Condvar,
}

impl Gradients<'_> {
    fn locate(&self, name: &str) -> Result<(usize, usize, usize)> {
        let index = self.layout.tensor_index(name)?;
        let t = &self.layout.tensors()[index];
        let b = self.bucket_of[index];
        Ok((b, t.offset - self.starts[b], t.len))
    }

    /// A tensor's current parameters (fp32 masters), when they live on the host.
    pub fn param(&self, name: &str) -> Result<&[f32]> {
        let values = self.values.ok_or(Error::NotHostMemory(self.device))?;
        Ok(&values[self.layout.tensor(name)?.range()])
    }

    /// Writes a tensor's gradient (rounded to the gradient dtype).
    pub fn set(&self, name: &str, values: &[f32]) -> Result<()> {
        let (b, at, len) = self.locate(name)?;
        crate::error::check_len(&format!("gradient of '{name}'"), len, values.len())?;
        let mut bucket = self.buckets[b]
            .lock()
            .map_err(|_| Error::Communicator("bucket lock poisoned".into()))?;
        bucket.write_range(at, values)
    }

    /// Declares a tensor's gradient final; its bucket is all-reduced once all its tensors are.
    pub fn mark_ready(&self, name: &str) -> Result<()> {
        let (b, _, _) = self.locate(name)?;
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| Error::Communicator("bucket state poisoned".into()))?;
        pending[b] = pending[b].saturating_sub(1);
        self.ready.notify_all();
        Ok(())
    }

    fn mark_all_ready(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.iter_mut().for_each(|p| *p = 0);
        }
        self.ready.notify_all();
    }

    fn wait_ready(&self, b: usize) -> Result<()> {
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| Error::Communicator("bucket state poisoned".into()))?;
        while pending[b] > 0 {
            pending = self
                .ready
                .wait(pending)
                .map_err(|_| Error::Communicator("bucket state poisoned".into()))?;
        }
        Ok(())
    }
}

/// FNV-1a of everything replicas must agree on: tensors, shapes, groups, dtypes and state.
fn fingerprint(opt: &Optimizer) -> u64 {
    let layout = opt.params().layout();
    let mut text = format!("{:?}|{:?}|", opt.params().grad_dtype(), opt.state_names());
    for t in layout.tensors() {
        text += &format!("{}:{:?}:{}:{};", t.name, t.shape, t.group, t.offset);
    }
    for g in layout.groups() {
        text += &format!("{}:{:?}:{:?};", g.name, g.options, g.range);
    }
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// N replicas and their communicators.
#[derive(Debug)]
pub struct DataParallel<C: Communicator> {
    replicas: Vec<(Optimizer, C)>,
    buckets: Vec<Bucket>,
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
    /// Checks that every replica has the same parameter set and rule (through the communicators,
    /// so mismatches are refused at setup), then broadcasts rank 0's parameters to all.
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
        let mut replicas: Vec<(Optimizer, C)> = optimizers.into_iter().zip(comms).collect();
        run_all(&mut replicas, |opt, comm| {
            // Exchange fingerprints in 16-bit pieces (exact in f32).
            let h = fingerprint(opt);
            let mut mine: Vec<f32> = (0..4).map(|k| ((h >> (16 * k)) & 0xffff) as f32).collect();
            let mut all = vec![0.0f32; 4 * comm.world_size()];
            comm.all_gather(
                HostBuffer::F32(&mut mine).into(),
                HostBuffer::F32(&mut all).into(),
            )?;
            if all.chunks(4).any(|c| c != mine.as_slice()) {
                let reason = "replicas have different parameter sets, rules or dtypes";
                comm.abort(reason);
                return Err(Error::Communicator(reason.into()));
            }
            let mut values = opt.params().values_snapshot()?.into_owned();
            comm.broadcast(HostBuffer::F32(&mut values).into(), 0)?;
            opt.params_mut().restore_values(&values)
        })?;
        let layout = replicas[0].0.params().layout().clone();
        let elem = replicas[0].0.params().grad_dtype().size_bytes();
        Ok(DataParallel {
            buckets: buckets(&layout, elem, &options),
            replicas,
        })
    }

    pub fn replicas(&self) -> impl Iterator<Item = &Optimizer> {
        self.replicas.iter().map(|(o, _)| o)
    }

    /// Every replica's optimizer, to change all of them alike (a learning rate, a checkpoint):
    /// replicas that differ are no longer replicas.
    pub fn replicas_mut(&mut self) -> impl Iterator<Item = &mut Optimizer> {
        self.replicas.iter_mut().map(|(o, _)| o)
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// One data-parallel step: every replica runs `backward(rank, grads)` on its own thread, writing
    /// its gradients through `grads` and marking them ready (ideally last layer first); buckets are
    /// averaged across replicas as they become ready; then every replica takes the same fused step.
    pub fn step<F>(&mut self, backward: F) -> Result<()>
    where
        F: Fn(usize, &Gradients<'_>) -> Result<()> + Sync,
    {
        let buckets = &self.buckets;
        run_all(&mut self.replicas, |opt, comm| {
            let layout = opt.params().layout().clone();
            let mut bucket_of = vec![0; layout.tensors().len()];
            for (b, bucket) in buckets.iter().enumerate() {
                bucket.tensors.iter().for_each(|&t| bucket_of[t] = b);
            }
            // Buckets are stored in arena order; they are reduced from the end.
            let mut by_start: Vec<usize> = (0..buckets.len()).collect();
            by_start.sort_by_key(|&b| buckets[b].range.start);
            let lens: Vec<usize> = by_start.iter().map(|&b| buckets[b].range.len()).collect();
            let rank = comm.rank();
            // The gradient views end here, before the step.
            {
                let device = opt.params().device();
                let (values, pieces) = opt.params_mut().grad_buffers_mut(&lens)?;
                let mut pieces: Vec<Option<Buffer<'_>>> = pieces.into_iter().map(Some).collect();
                let mut ordered: Vec<Buffer<'_>> = Vec::with_capacity(buckets.len());
                for b in 0..buckets.len() {
                    let pos = by_start.iter().position(|&x| x == b).unwrap_or(0);
                    if let Some(p) = pieces[pos].take() {
                        ordered.push(p);
                    }
                }
                let grads = Gradients {
                    layout: &layout,
                    values,
                    device,
                    starts: buckets.iter().map(|b| b.range.start).collect(),
                    buckets: ordered.into_iter().map(Mutex::new).collect(),
                    bucket_of,
                    pending: Mutex::new(buckets.iter().map(|b| b.tensors.len()).collect()),
                    ready: Condvar::new(),
                };
                let (computed, reduced) = std::thread::scope(|s| {
                    let reducer = s.spawn(|| -> Result<()> {
                        for b in 0..buckets.len() {
                            grads.wait_ready(b)?;
                            let mut bucket = grads.buckets[b]
                                .lock()
                                .map_err(|_| Error::Communicator("bucket lock poisoned".into()))?;
                            comm.all_reduce(bucket.reborrow(), ReduceOp::Average)?;
                        }
                        Ok(())
                    });
                    let computed = catch_unwind(AssertUnwindSafe(|| backward(rank, &grads)))
                        .unwrap_or_else(|_| {
                            Err(Error::Communicator(format!(
                                "replica {rank} panicked in backward"
                            )))
                        });
                    if let Err(e) = &computed {
                        comm.abort(&format!("replica {rank} failed: {e}"));
                    }
                    grads.mark_all_ready();
                    let reduced = reducer.join().unwrap_or_else(|_| {
                        Err(Error::Communicator("communication thread panicked".into()))
                    });
                    (computed, reduced)
                });
                computed?;
                reduced?;
            }
            // Everyone reduced everything: only now may anyone step.
            comm.barrier()?;
            opt.step()
        })
    }
}

/// Runs `f` on every replica at once (one thread each) and returns the first error, preferring a
/// replica's own failure over the errors it caused elsewhere.
fn run_all<C, F>(replicas: &mut [(Optimizer, C)], f: F) -> Result<()>
where
    C: Communicator,
    F: Fn(&mut Optimizer, &C) -> Result<()> + Sync,
{
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = replicas
            .iter_mut()
            .map(|(opt, comm)| {
                let f = &f;
                s.spawn(move || {
                    let r = catch_unwind(AssertUnwindSafe(|| f(opt, comm))).unwrap_or_else(|_| {
                        Err(Error::Communicator(format!(
                            "replica {} panicked",
                            comm.rank()
                        )))
                    });
                    if let Err(e) = &r {
                        comm.abort(&format!("replica {} failed: {e}", comm.rank()));
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Communicator("replica thread panicked".into())))
            })
            .collect()
    });
    let mut first: Option<Error> = None;
    for r in results {
        match (r, &first) {
            (Err(e), None) => first = Some(e),
            (Err(e), Some(Error::Communicator(_))) if !matches!(e, Error::Communicator(_)) => {
                first = Some(e)
            }
            _ => {}
        }
    }
    first.map_or(Ok(()), Err)
}
