//! The in-process CPU communicator: ranks are threads of one process sharing staging buffers.
//!
//! A collective is: every rank copies its contribution into its own staging slot; a barrier; every
//! rank combines all slots in rank order (so every rank computes the same bits); a barrier, after
//! which slots may be reused. Barriers wait at most the group's timeout; a rank that times out, fails
//! or is dropped aborts the group, and every waiting or later collective returns an error.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{Buffer, Communicator, HostBuffer, ReduceOp};
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Phase {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    timeout: Duration,
    slots: Vec<RwLock<Vec<f32>>>,
    phase: Mutex<Phase>,
    wake: Condvar,
}

fn fail(reason: impl Into<String>) -> Error {
    Error::Communicator(reason.into())
}

/// The host buffer inside `buf`: this communicator has no device to reduce device buffers on.
fn host(buf: Buffer<'_>) -> Result<HostBuffer<'_>> {
    match buf {
        Buffer::Host(b) => Ok(b),
        Buffer::Device(b) => Err(fail(format!(
            "the CPU communicator reduces host buffers; a buffer on {} needs the NCCL or \
             single-device communicator",
            b.device()
        ))),
    }
}

/// Room for `n` more elements, or the typed error for a group too large for host memory.
fn reserve<T>(v: &mut Vec<T>, n: usize) -> Result<()> {
    v.try_reserve_exact(n).map_err(|_| Error::OutOfHostMemory {
        bytes: n.saturating_mul(std::mem::size_of::<T>()),
    })
}

fn poisoned<T>(_: T) -> Error {
    fail("communicator state poisoned by a panicking rank")
}

impl Shared {
    fn barrier(&self, rank: usize) -> Result<()> {
        let mut p = self.phase.lock().map_err(poisoned)?;
        if let Some(r) = &p.aborted {
            return Err(fail(r.clone()));
        }
        let generation = p.generation;
        p.arrived += 1;
        if p.arrived == self.size {
            p.arrived = 0;
            p.generation += 1;
            self.wake.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        while p.generation == generation {
            if let Some(r) = &p.aborted {
                return Err(fail(r.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "rank {rank} waited {:?} for the other ranks: a replica failed or stalled",
                    self.timeout
                );
                p.aborted = Some(reason.clone());
                self.wake.notify_all();
                return Err(fail(reason));
            }
            p = self
                .wake
                .wait_timeout(p, deadline - now)
                .map_err(poisoned)?
                .0;
        }
        Ok(())
    }

    fn abort(&self, reason: &str) {
        if let Ok(mut p) = self.phase.lock() {
            if p.aborted.is_none() {
                p.aborted = Some(reason.to_string());
            }
        }
        self.wake.notify_all();
    }

    fn slot(&self, rank: usize) -> Result<std::sync::RwLockReadGuard<'_, Vec<f32>>> {
        self.slots[rank]
            .read()
            .map_err(|_| fail("communicator slot poisoned by a panicking rank"))
    }
}

/// One rank's handle on an in-process group.
#[derive(Debug)]
pub struct CpuCommunicator {
    rank: usize,
    shared: Arc<Shared>,
    scratch: Mutex<Vec<f32>>,
}

impl CpuCommunicator {
    /// A group of `size` ranks whose collectives give up after waiting `timeout` for the others.
    pub fn group(size: usize, timeout: Duration) -> Result<Vec<CpuCommunicator>> {
        if size == 0 {
            return Err(fail("a group needs at least one rank"));
        }
        let mut slots = Vec::new();
        reserve(&mut slots, size)?;
        slots.extend((0..size).map(|_| RwLock::new(Vec::new())));
        let shared = Arc::new(Shared {
            size,
            timeout,
            slots,
            phase: Mutex::new(Phase::default()),
            wake: Condvar::new(),
        });
        let mut ranks = Vec::new();
        reserve(&mut ranks, size)?;
        ranks.extend((0..size).map(|rank| CpuCommunicator {
            rank,
            shared: shared.clone(),
            scratch: Mutex::new(Vec::new()),
        }));
        Ok(ranks)
    }

    /// Stages this rank's contribution (× 1/N when averaging).
    fn contribute(&self, buf: &HostBuffer<'_>, op: ReduceOp) -> Result<()> {
        let mut slot = self.shared.slots[self.rank]
            .write()
            .map_err(|_| fail("communicator slot poisoned by a panicking rank"))?;
        buf.read_into(&mut slot);
        if op == ReduceOp::Average {
            let inv = 1.0 / self.shared.size as f32;
            slot.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }

    /// Checks every rank staged `len` elements; on a mismatch every rank aborts the same way.
    fn check_lengths(&self, len: usize, what: &str) -> Result<()> {
        for r in 0..self.shared.size {
            let got = self.shared.slot(r)?.len();
            if got != len {
                let reason = format!(
                    "{what}: rank {r} has {got} elements, rank {} has {len}",
                    self.rank
                );
                self.shared.abort(&reason);
                return Err(fail(reason));
            }
        }
        Ok(())
    }

    /// Σ over ranks (in rank order) of `range` of every slot, into `out`.
    fn combine(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.resize(range.len(), 0.0);
        for r in 0..self.shared.size {
            let slot = self.shared.slot(r)?;
            out.iter_mut()
                .zip(&slot[range.clone()])
                .for_each(|(a, &x)| *a += x);
        }
        Ok(())
    }

    fn scratch(&self) -> Result<std::sync::MutexGuard<'_, Vec<f32>>> {
        self.scratch
            .lock()
            .map_err(|_| fail("communicator scratch poisoned"))
    }
}

impl Communicator for CpuCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let mut buf = host(buf)?;
        self.contribute(&buf, op)?;
        self.shared.barrier(self.rank)?;
        self.check_lengths(buf.len(), "all_reduce")?;
        let mut acc = self.scratch()?;
        self.combine(0..buf.len(), &mut acc)?;
        buf.write_from(&acc);
        self.shared.barrier(self.rank)
    }

    fn broadcast(&self, buf: Buffer<'_>, root: usize) -> Result<()> {
        let mut buf = host(buf)?;
        if root >= self.shared.size {
            return Err(fail(format!(
                "broadcast root {root} out of {}",
                self.shared.size
            )));
        }
        if self.rank == root {
            self.contribute(&buf, ReduceOp::Sum)?;
        }
        self.shared.barrier(self.rank)?;
        let root_len = self.shared.slot(root)?.len();
        if root_len != buf.len() {
            let reason = format!(
                "broadcast: root has {root_len} elements, rank {} has {}",
                self.rank,
                buf.len()
            );
            self.shared.abort(&reason);
            return Err(fail(reason));
        }
        if self.rank != root {
            buf.write_from(&self.shared.slot(root)?);
        }
        self.shared.barrier(self.rank)
    }

    fn all_gather(&self, send: Buffer<'_>, recv: Buffer<'_>) -> Result<()> {
        let (send, mut recv) = (host(send)?, host(recv)?);
        let n = send.len();
        if recv.len() != n * self.shared.size {
            return Err(fail(format!(
                "all_gather: recv holds {} elements, needs {}",
                recv.len(),
                n * self.shared.size
            )));
        }
        self.contribute(&send, ReduceOp::Sum)?;
        self.shared.barrier(self.rank)?;
        self.check_lengths(n, "all_gather")?;
        let mut all = self.scratch()?;
        all.clear();
        for r in 0..self.shared.size {
            all.extend_from_slice(&self.shared.slot(r)?);
        }
        recv.write_from(&all);
        self.shared.barrier(self.rank)
    }

    fn reduce_scatter(&self, send: Buffer<'_>, recv: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let (send, mut recv) = (host(send)?, host(recv)?);
        let (n, size) = (send.len(), self.shared.size);
        if n % size != 0 || recv.len() != n / size {
            return Err(fail(format!(
                "reduce_scatter: {n} elements do not split into {size} shards of {}",
                recv.len()
            )));
        }
        self.contribute(&send, op)?;
        self.shared.barrier(self.rank)?;
        self.check_lengths(n, "reduce_scatter")?;
        let shard = n / size;
        let mut acc = self.scratch()?;
        self.combine(self.rank * shard..(self.rank + 1) * shard, &mut acc)?;
        recv.write_from(&acc);
        self.shared.barrier(self.rank)
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier(self.rank)
    }

    fn abort(&self, reason: &str) {
        self.shared.abort(reason);
    }
}

impl Drop for CpuCommunicator {
    /// A rank that leaves (finished, failed or unwound by a panic) must not leave the others
    /// waiting: ranks still in a collective are woken with an error. Ranks that already passed
    /// their last barrier are unaffected.
    fn drop(&mut self) {
        self.shared
            .abort(&format!("rank {} left the group", self.rank));
    }
}
