//! The in-process CPU communicator: ranks are threads of one process sharing staging buffers.
//!
//! A collective is: every rank posts what it is calling (its sequence number, the collective and
//! its sizes) and copies its contribution into its own staging slot; a barrier; every rank checks
//! that all ranks posted the same call, then combines the slots in rank order (so every rank
//! computes the same bits); a barrier, after which slots may be reused. Barriers wait at most the
//! group's timeout. A rank that times out, fails, is dropped, or calls a collective with arguments
//! that do not fit (or another collective than the others) aborts the group, and every waiting or
//! later collective of every rank returns an error: ranks can never pair up wrongly.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{Buffer, Communicator, HostBuffer, ReduceOp};
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Phase {
    arrived: usize,
    generation: u64,
    /// Why the group was aborted, and whether it was a rank timing out.
    aborted: Option<(String, bool)>,
}

impl Phase {
    /// The error every collective returns once the group is aborted.
    fn aborted(&self) -> Option<Error> {
        self.aborted
            .as_ref()
            .map(|(reason, timed_out)| match timed_out {
                true => Error::Timeout(reason.clone()),
                false => fail(reason.clone()),
            })
    }
}

/// What a rank is calling: ranks may combine their slots only when all posted the same call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Call {
    /// This rank's count of collectives so far.
    seq: u64,
    kind: Kind,
    /// Elements contributed (the send buffer's length), and the root of a broadcast.
    len: usize,
    root: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    None,
    AllReduce(ReduceOp),
    Broadcast,
    AllGather,
    ReduceScatter(ReduceOp),
    Barrier,
}

/// A rank's staging slot: the call it posted and its contribution.
#[derive(Debug, Default)]
struct Slot {
    call: Call,
    data: Vec<f32>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    timeout: Duration,
    slots: Vec<RwLock<Slot>>,
    phase: Mutex<Phase>,
    wake: Condvar,
}

fn fail(reason: impl Into<String>) -> Error {
    Error::Communicator(reason.into())
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
        if let Some(e) = p.aborted() {
            return Err(e);
        }
        let generation = p.generation;
        p.arrived += 1;
        if p.arrived == self.size {
            p.arrived = 0;
            p.generation += 1;
            self.wake.notify_all();
            return Ok(());
        }
        let deadline = super::deadline(self.timeout);
        while p.generation == generation {
            if let Some(e) = p.aborted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "rank {rank} waited {:?} for the other ranks: a replica failed or stalled",
                    self.timeout
                );
                p.aborted = Some((reason.clone(), true));
                self.wake.notify_all();
                return Err(Error::Timeout(reason));
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
                p.aborted = Some((reason.to_string(), false));
            }
        }
        self.wake.notify_all();
    }

    fn slot(&self, rank: usize) -> Result<std::sync::RwLockReadGuard<'_, Slot>> {
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
    /// Collectives this rank has called.
    calls: std::sync::atomic::AtomicU64,
}

impl CpuCommunicator {
    /// A group of `size` ranks whose collectives give up after waiting `timeout` for the others.
    pub fn group(size: usize, timeout: Duration) -> Result<Vec<CpuCommunicator>> {
        if size == 0 {
            return Err(fail("a group needs at least one rank"));
        }
        let mut slots = Vec::new();
        reserve(&mut slots, size)?;
        slots.extend((0..size).map(|_| RwLock::new(Slot::default())));
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
            calls: Default::default(),
        }));
        Ok(ranks)
    }

    /// Aborts the group for every rank and returns the error for this one: a collective that
    /// cannot go ahead on one rank must not go ahead on any.
    fn refuse(&self, reason: String) -> Error {
        self.shared.abort(&reason);
        fail(reason)
    }

    /// Posts this rank's call and its contribution (× 1/N when averaging), then waits for every
    /// rank's and checks they all posted the same call.
    fn post(
        &self,
        kind: Kind,
        contribution: Option<&HostBuffer<'_>>,
        len: usize,
        root: usize,
    ) -> Result<()> {
        let seq = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let call = Call {
            seq,
            kind,
            len,
            root,
        };
        {
            let mut slot = self.shared.slots[self.rank]
                .write()
                .map_err(|_| fail("communicator slot poisoned by a panicking rank"))?;
            slot.call = call;
            match contribution {
                Some(buf) => buf.read_into(&mut slot.data),
                None => slot.data.clear(),
            }
            if let Kind::AllReduce(ReduceOp::Average) | Kind::ReduceScatter(ReduceOp::Average) =
                kind
            {
                let inv = 1.0 / self.shared.size as f32;
                slot.data.iter_mut().for_each(|x| *x *= inv);
            }
        }
        self.shared.barrier(self.rank)?;
        for r in 0..self.shared.size {
            let theirs = self.shared.slot(r)?.call;
            if theirs != call {
                return Err(self.refuse(format!(
                    "rank {r} called {theirs:?} while rank {} called {call:?}",
                    self.rank
                )));
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
                .zip(&slot.data[range.clone()])
                .for_each(|(a, &x)| *a += x);
        }
        Ok(())
    }

    /// The host buffer inside `buf`: this communicator has no device to reduce device buffers on.
    fn host<'b>(&self, buf: Buffer<'b>) -> Result<HostBuffer<'b>> {
        match buf {
            Buffer::Host(b) => Ok(b),
            Buffer::Device(b) => Err(self.refuse(format!(
                "the CPU communicator reduces host buffers; a buffer on {} needs the NCCL or \
                 single-device communicator",
                b.device()
            ))),
        }
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
        let mut buf = self.host(buf)?;
        self.post(Kind::AllReduce(op), Some(&buf), buf.len(), 0)?;
        let mut acc = self.scratch()?;
        self.combine(0..buf.len(), &mut acc)?;
        buf.write_from(&acc);
        self.shared.barrier(self.rank)
    }

    fn broadcast(&self, buf: Buffer<'_>, root: usize) -> Result<()> {
        let mut buf = self.host(buf)?;
        if root >= self.shared.size {
            return Err(self.refuse(format!("broadcast root {root} out of {}", self.shared.size)));
        }
        let contribution = (self.rank == root).then_some(&buf);
        self.post(Kind::Broadcast, contribution, buf.len(), root)?;
        if self.rank != root {
            buf.write_from(&self.shared.slot(root)?.data);
        }
        self.shared.barrier(self.rank)
    }

    fn all_gather(&self, send: Buffer<'_>, recv: Buffer<'_>) -> Result<()> {
        let (send, mut recv) = (self.host(send)?, self.host(recv)?);
        let n = send.len();
        if Some(recv.len()) != n.checked_mul(self.shared.size) {
            return Err(self.refuse(format!(
                "all_gather: rank {}'s recv holds {} elements, needs {n} × {}",
                self.rank,
                recv.len(),
                self.shared.size
            )));
        }
        self.post(Kind::AllGather, Some(&send), n, 0)?;
        let mut all = self.scratch()?;
        all.clear();
        for r in 0..self.shared.size {
            all.extend_from_slice(&self.shared.slot(r)?.data);
        }
        recv.write_from(&all);
        self.shared.barrier(self.rank)
    }

    fn reduce_scatter(&self, send: Buffer<'_>, recv: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let (send, mut recv) = (self.host(send)?, self.host(recv)?);
        let (n, size) = (send.len(), self.shared.size);
        if n % size != 0 || recv.len() != n / size {
            return Err(self.refuse(format!(
                "reduce_scatter: {n} elements do not split into {size} shards of {}",
                recv.len()
            )));
        }
        self.post(Kind::ReduceScatter(op), Some(&send), n, 0)?;
        let shard = n / size;
        let mut acc = self.scratch()?;
        self.combine(self.rank * shard..(self.rank + 1) * shard, &mut acc)?;
        recv.write_from(&acc);
        self.shared.barrier(self.rank)
    }

    fn barrier(&self) -> Result<()> {
        self.post(Kind::Barrier, None, 0, 0)?;
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
