//! The gradient side of a data-parallel step: the arena cut into all-reduce buckets, and the
//! [`Gradients`] a replica's training loop writes and marks ready, bucket by bucket.

use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::DataParallelOptions;
use crate::comm::Buffer;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::masters::HostWeights;
use crate::Device;

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
pub(super) struct BucketState<'a> {
    pub(super) buffer: Buffer<'a>,
    /// Per tensor of the bucket (in [`Bucket::tensors`] order): marked ready this step.
    pub(super) marked: Vec<bool>,
    pub(super) pending: usize,
}

pub(super) struct BucketSlot<'a> {
    pub(super) start: usize,
    pub(super) state: Mutex<BucketState<'a>>,
    pub(super) ready: Condvar,
}

/// What a replica's training loop sees during a data-parallel step: its parameters, to read, and
/// its gradients, to write and mark ready. Each gradient is written, then marked ready, once per
/// step; a second mark, or a write after the mark, is [`Error::GradientAlreadyReady`] (its bucket
/// may already be reduced) and fails the step on every replica.
pub struct Gradients<'a> {
    pub(super) layout: &'a Layout,
    /// The masters and model arena, when they live on the host.
    pub(super) masters: Option<HostWeights<'a>>,
    pub(super) device: Device,
    pub(super) buckets: Vec<BucketSlot<'a>>,
    /// Per tensor: its bucket and its place in the bucket's tensor list.
    pub(super) place: Vec<(usize, usize)>,
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

    /// A tensor's current parameters (fp32 masters), when they live on the host as fp32.
    pub fn param(&self, name: &str) -> Result<&[f32]> {
        let (masters, _) = self.masters.ok_or(Error::NotHostMemory(self.device))?;
        Ok(&masters.as_f32()?[self.layout.tensor(name)?.range()])
    }

    /// A tensor's current fp32 masters, copied out (host memory; joined or widened when not kept
    /// as fp32, see [`crate::Masters`]).
    pub fn read_param(&self, name: &str) -> Result<Vec<f32>> {
        let (masters, model) = self.masters.ok_or(Error::NotHostMemory(self.device))?;
        let range = self.layout.tensor(name)?.range();
        Ok(masters.read(model, range)?.into_owned())
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
    pub(super) fn mark_all_ready(&self) {
        for slot in &self.buckets {
            if let Ok(mut state) = slot.state.lock() {
                state.marked.iter_mut().for_each(|m| *m = true);
                state.pending = 0;
            }
            slot.ready.notify_all();
        }
    }

    /// Bucket `b`, once all its tensors are ready.
    pub(super) fn wait_ready(&self, b: usize) -> Result<MutexGuard<'_, BucketState<'a>>> {
        let slot = &self.buckets[b];
        let mut state = slot.state.lock().map_err(poisoned)?;
        while state.pending > 0 {
            state = slot.ready.wait(state).map_err(poisoned)?;
        }
        Ok(state)
    }
}
