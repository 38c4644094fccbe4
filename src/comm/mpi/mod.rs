//! The MPI communicator: one rank per process, launched by `mpirun` (cargo feature `mpi`).
//!
//! Every collective computes exactly what [`super::cpu::CpuCommunicator`] computes — elements
//! widened to f32, × 1/N when averaging, summed in rank order from zero, rounded once to the
//! buffer's dtype — so processes and threads train bit for bit alike. A reduction is an
//! all-to-all of pieces (rank r receives piece r of every rank's contribution and sums it), then,
//! for an all-reduce, an all-gather of the sums: each rank moves 2·(N−1)/N of the buffer, as a
//! ring would, and the order of the sum is fixed.
//!
//! Every collective first all-gathers what each rank is calling (sequence number, collective,
//! sizes): ranks that call different collectives fail alike instead of pairing wrongly. Every
//! wait is a non-blocking MPI request polled up to the group's timeout; a rank that times out
//! marks its communicator aborted and returns [`Error::Timeout`], and the buffers lent to the
//! request are leaked, since MPI may still write into them. MPI itself cannot cancel a collective,
//! so [`Communicator::abort`] is local: the other ranks learn of it when their next collective
//! times out. A rank that is killed ends the job (`mpirun` kills the others). After a timeout,
//! requests that MPI cannot cancel stay pending, so the process creates no new groups and does not
//! finalize MPI (which could wait forever for the failed peer); MPI is finalized when the last
//! handle drops on the thread that initialized it.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::mpi::collective::CommunicatorCollectives;
use ::mpi::environment::Universe;
use ::mpi::raw::{AsRaw, FromRaw};
use ::mpi::request::{Request, StaticScope};
use ::mpi::topology::{Communicator as _, SimpleCommunicator};
use ::mpi::traits::Equivalence;
use ::mpi::Threading;

use super::{Buffer, Communicator, HostBuffer, ReduceOp};
use crate::error::{Error, Result};

mod point_to_point;
mod requests;

use requests::{wait, Lent};

fn fail(reason: impl Into<String>) -> Error {
    Error::Communicator(reason.into())
}

/// The process's MPI environment: initialized by [`Mpi::init`], finalized when it and every
/// communicator made from it are dropped.
#[derive(Clone)]
pub struct Mpi {
    world: Arc<World>,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.world.rank)
            .field("size", &self.world.size)
            .finish()
    }
}

/// The process's MPI state: the world communicator, the lock every MPI call of this process
/// holds (MPI is initialized as `MPI_THREAD_SERIALIZED` or better: calls must never overlap),
/// and the universe that finalizes MPI when dropped.
struct World {
    lock: Mutex<()>,
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// The thread that initialized MPI: the only one allowed to finalize it.
    init_thread: std::thread::ThreadId,
    /// Set when a wait timed out: requests MPI cannot cancel are pending, and MPI_Finalize could
    /// wait for a peer that never comes, so it is skipped.
    timed_out: std::sync::atomic::AtomicBool,
    /// Finalizes MPI when dropped, in `drop`, when that is safe.
    universe: ManuallyDrop<Universe>,
}

// SAFETY: `SimpleCommunicator` is a handle on an MPI communicator; MPI allows any thread to use
// it when the library was initialized with at least MPI_THREAD_SERIALIZED and calls never
// overlap. `Mpi::init` refuses a weaker level, and every MPI call holds `lock`. `Universe` holds
// only the optional buffered-send buffer; it finalizes MPI only on the initializing thread
// (`Drop for World`).
unsafe impl Send for World {}
// SAFETY: as for Send: every use of the handles goes through `lock`.
unsafe impl Sync for World {}

impl World {
    fn lock(&self) -> Result<MutexGuard<'_, ()>> {
        self.lock
            .lock()
            .map_err(|_| fail("MPI poisoned by a panicking thread"))
    }
}

impl Drop for World {
    /// MPI_Finalize on the thread that initialized MPI, unless a wait timed out: then (or on
    /// another thread) MPI is left for the process's exit to end, since finalizing could wait
    /// forever for a peer that failed.
    fn drop(&mut self) {
        let _held = self.lock.lock();
        let safe = std::thread::current().id() == self.init_thread
            && !self.timed_out.load(Ordering::Relaxed);
        if safe {
            // SAFETY: dropped once, here; nothing uses MPI after the last reference to the world.
            unsafe { ManuallyDrop::drop(&mut self.universe) };
        }
    }
}

impl Mpi {
    /// Initializes MPI for this process. Fails if MPI was initialized already (once per process)
    /// or cannot give the thread support the communicator needs.
    pub fn init() -> Result<Mpi> {
        let (universe, level) = ::mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| fail("MPI was already initialized in this process"))?;
        if level < Threading::Serialized {
            return Err(fail(format!(
                "this MPI library offers thread level {level:?}; fusedopt needs Serialized, \
                 since a replica's gradient buckets are reduced from a thread of its own"
            )));
        }
        let comm = universe.world();
        let (rank, size) = (comm.rank(), comm.size());
        let (Ok(rank), Ok(size)) = (usize::try_from(rank), usize::try_from(size)) else {
            return Err(fail(format!("MPI gave rank {rank} of {size}")));
        };
        Ok(Mpi {
            world: Arc::new(World {
                lock: Mutex::new(()),
                comm,
                rank,
                size,
                init_thread: std::thread::current().id(),
                timed_out: Default::default(),
                universe: ManuallyDrop::new(universe),
            }),
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank
    }

    pub fn world_size(&self) -> usize {
        self.world.size
    }

    /// A communicator over every process of the job whose collectives give up after waiting
    /// `timeout` for the others: a group of its own (a duplicate of MPI's world), so that a group
    /// aborted part-way never pairs its messages with a later group's. Every process must
    /// create its groups in the same order; one that does not arrive within `timeout` fails
    /// the others' creation.
    pub fn communicator(&self, timeout: Duration) -> Result<MpiCommunicator> {
        let world = &self.world;
        if world.timed_out.load(Ordering::Relaxed) {
            return Err(fail(
                "an earlier MPI wait of this process timed out; its pending requests make new \
                 groups unsafe: restart the job",
            ));
        }
        let _held = world.lock()?;
        let deadline = super::deadline(timeout);
        // MPI_Comm_idup writes the new handle when the request completes: it lives in a lent
        // box (leaked if the request never completes).
        // SAFETY: RSMPI_COMM_NULL is a constant the MPI library defines.
        let handle = Lent::new(vec![unsafe { ::mpi::ffi::RSMPI_COMM_NULL }]);
        // SAFETY: the box is lent once, to this request; RSMPI_REQUEST_NULL is MPI's constant.
        let mut raw_request = unsafe { ::mpi::ffi::RSMPI_REQUEST_NULL };
        // SAFETY: a collective on the world communicator, under the process's MPI lock; the
        // new handle's slot outlives the request (it is freed only after completion).
        unsafe {
            ::mpi::ffi::MPI_Comm_idup(
                world.comm.as_raw(),
                handle.lend().as_mut_ptr(),
                &mut raw_request,
            )
        };
        // SAFETY: `raw_request` is the live request MPI_Comm_idup returned; it borrows nothing
        // of Rust's (the handle slot is leaked on a timeout).
        let request = unsafe { Request::from_raw(raw_request, &(), StaticScope) };
        wait(request, deadline, || {
            format!(
                "MPI rank {} waited {timeout:?} for the other ranks to create a group",
                world.rank
            )
        })
        .inspect_err(|_| world.timed_out.store(true, Ordering::Relaxed))?;
        // SAFETY: the request completed, so MPI wrote the handle and no longer refers to it.
        let raw = unsafe { handle.take() }
            .first()
            .copied()
            .ok_or_else(|| fail("MPI_Comm_idup gave no communicator"))?;
        // SAFETY: `raw` is the new intra-communicator MPI_Comm_idup made; it is owned (freed)
        // by the SimpleCommunicator from here on, under the lock (`Drop for MpiCommunicator`).
        let comm = unsafe { SimpleCommunicator::from_raw(raw) };
        Ok(MpiCommunicator {
            comm: ManuallyDrop::new(comm),
            world: world.clone(),
            timeout,
            calls: AtomicU64::new(0),
            aborted: Mutex::new(None),
            worker: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// This process's rank of an MPI group (see the module docs).
pub struct MpiCommunicator {
    /// Freed in `drop`, under the process's MPI lock.
    comm: ManuallyDrop<SimpleCommunicator>,
    world: Arc<World>,
    timeout: Duration,
    /// Collectives this rank has called.
    calls: AtomicU64,
    /// Why the group was aborted, and whether it was this rank timing out.
    aborted: Mutex<Option<(String, bool)>>,
    /// Whether a parameter-server worker uses this communicator (one may, at a time).
    worker: std::sync::atomic::AtomicBool,
}

// SAFETY: `comm` is used only while holding the process's MPI lock (see `World`).
unsafe impl Send for MpiCommunicator {}
// SAFETY: as for Send.
unsafe impl Sync for MpiCommunicator {}

impl Drop for MpiCommunicator {
    fn drop(&mut self) {
        let _held = self.world.lock.lock();
        // SAFETY: `comm` is not used after this; freeing it is an MPI call, made under the lock.
        unsafe { ManuallyDrop::drop(&mut self.comm) };
    }
}

impl std::fmt::Debug for MpiCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCommunicator")
            .field("rank", &self.world.rank)
            .field("size", &self.world.size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What a rank is calling (the same words as the CPU communicator's check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AllReduce = 1,
    Broadcast,
    AllGather,
    ReduceScatter,
    Barrier,
}

impl MpiCommunicator {
    fn check_not_aborted(&self) -> Result<()> {
        let a = self
            .aborted
            .lock()
            .map_err(|_| fail("MPI communicator state poisoned"))?;
        match &*a {
            Some((reason, true)) => Err(Error::Timeout(reason.clone())),
            Some((reason, false)) => Err(fail(reason.clone())),
            None => Ok(()),
        }
    }

    fn mark_aborted(&self, reason: &str, timed_out: bool) {
        if let Ok(mut a) = self.aborted.lock() {
            a.get_or_insert_with(|| (reason.to_string(), timed_out));
        }
    }

    /// Aborts this rank's group and returns the error for it.
    fn refuse(&self, reason: String) -> Error {
        self.mark_aborted(&reason, false);
        fail(reason)
    }

    /// Waits for `request` until the group's deadline; a timeout aborts this rank's group.
    fn wait<R: ?Sized>(&self, request: Request<'static, R>, deadline: Instant) -> Result<()> {
        wait(request, deadline, || {
            format!(
                "MPI rank {} waited {:?} for the other ranks: a rank failed, stalled or left",
                self.world.rank, self.timeout
            )
        })
        .inspect_err(|e| {
            self.world.timed_out.store(true, Ordering::Relaxed);
            self.mark_aborted(&e.to_string(), true)
        })
    }

    /// Runs one non-blocking collective over `send` (given back) and a receive buffer of
    /// `recv_len` elements (returned), waiting at most until `deadline`.
    fn exchange<T: Equivalence + Default + Clone + 'static>(
        &self,
        send: Vec<T>,
        recv_len: usize,
        deadline: Instant,
        start: impl FnOnce(
            &SimpleCommunicator,
            &'static [T],
            &'static mut [T],
        ) -> Request<'static, [T], StaticScope>,
    ) -> Result<Vec<T>> {
        let send = Lent::new(send);
        let recv = Lent::new(vec![T::default(); recv_len]);
        // SAFETY: each buffer is lent once, to this one request.
        let request = start(&self.comm, unsafe { send.lend() }, unsafe { recv.lend() });
        self.wait(request, deadline)?;
        // SAFETY: the request completed (on a timeout `wait` returned early and both buffers
        // stay leaked).
        let _ = unsafe { send.take() };
        // SAFETY: as above.
        Ok(unsafe { recv.take() })
    }

    /// Checks that every rank calls the same collective with the same sizes; returns the
    /// process's MPI lock, held for the whole collective, and its deadline.
    fn begin(&self, kind: Kind, len: usize, root: usize) -> Result<(MutexGuard<'_, ()>, Instant)> {
        self.check_not_aborted()?;
        let held = self.world.lock()?;
        let deadline = super::deadline(self.timeout);
        let seq = self.calls.fetch_add(1, Ordering::Relaxed);
        let call = [seq, kind as u64, len as u64, root as u64];
        let all = self.exchange(call.to_vec(), 4 * self.world.size, deadline, |c, s, r| {
            c.immediate_all_gather_into(StaticScope, s, r)
        })?;
        for (r, theirs) in all.chunks_exact(4).enumerate() {
            if theirs != call {
                return Err(self.refuse(format!(
                    "MPI rank {r} called {theirs:?} while rank {} called {call:?} \
                     ([sequence, collective, length, root])",
                    self.world.rank
                )));
            }
        }
        Ok((held, deadline))
    }

    /// The host buffer inside `buf`: MPI here moves host memory only.
    fn host<'b>(&self, buf: Buffer<'b>) -> Result<HostBuffer<'b>> {
        match buf {
            Buffer::Host(b) => Ok(b),
            Buffer::Device(b) => Err(self.refuse(format!(
                "the MPI communicator moves host buffers; a buffer on {} needs NCCL",
                b.device()
            ))),
        }
    }

    /// This rank's contribution widened to f32 (× 1/N when averaging), padded to `padded`.
    fn contribution(&self, buf: &HostBuffer<'_>, op: ReduceOp, padded: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(padded);
        buf.read_into(&mut v);
        if op == ReduceOp::Average {
            let inv = 1.0 / self.world.size as f32;
            v.iter_mut().for_each(|x| *x *= inv);
        }
        v.resize(padded, 0.0);
        v
    }

    /// Rank-order sums of `piece`-element pieces: every rank's contribution `send` (N pieces)
    /// goes piece r to rank r, which sums what it receives in rank order.
    fn reduce_pieces(&self, send: Vec<f32>, piece: usize, deadline: Instant) -> Result<Vec<f32>> {
        let got = self.exchange(send, piece * self.world.size, deadline, |c, s, r| {
            c.immediate_all_to_all_into(StaticScope, s, r)
        })?;
        let mut sum = vec![0.0f32; piece];
        for theirs in got.chunks_exact(piece.max(1)) {
            sum.iter_mut().zip(theirs).for_each(|(a, &x)| *a += x);
        }
        Ok(sum)
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.world.rank
    }

    fn world_size(&self) -> usize {
        self.world.size
    }

    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let mut buf = self.host(buf)?;
        let (n, size) = (buf.len(), self.world.size);
        let (_held, deadline) = self.begin(Kind::AllReduce, n, op as usize)?;
        let piece = n.div_ceil(size);
        let send = self.contribution(&buf, op, piece * size);
        let mine = self.reduce_pieces(send, piece, deadline)?;
        let all = self.exchange(mine, piece * size, deadline, |c, s, r| {
            c.immediate_all_gather_into(StaticScope, s, r)
        })?;
        buf.write_from(&all[..n]);
        Ok(())
    }

    fn broadcast(&self, buf: Buffer<'_>, root: usize) -> Result<()> {
        let mut buf = self.host(buf)?;
        let size = self.world.size;
        if root >= size {
            return Err(self.refuse(format!("broadcast root {root} out of {size}")));
        }
        let n = buf.len();
        let (_held, deadline) = self.begin(Kind::Broadcast, n, root)?;
        let mut values = Vec::with_capacity(n);
        buf.read_into(&mut values);
        let root_process = self.comm.process_at_rank(root as i32);
        let data = Lent::new(values);
        // SAFETY: the buffer is lent once, to this one request.
        let request =
            ::mpi::collective::Root::immediate_broadcast_into(&root_process, StaticScope, unsafe {
                data.lend()
            });
        self.wait(request, deadline)?;
        // SAFETY: the request completed (on a timeout `wait` returned and the buffer is leaked).
        let values = unsafe { data.take() };
        if self.world.rank != root {
            buf.write_from(&values);
        }
        Ok(())
    }

    fn all_gather(&self, send: Buffer<'_>, recv: Buffer<'_>) -> Result<()> {
        let (send, mut recv) = (self.host(send)?, self.host(recv)?);
        let (n, size) = (send.len(), self.world.size);
        if Some(recv.len()) != n.checked_mul(size) {
            return Err(self.refuse(format!(
                "all_gather: rank {}'s recv holds {} elements, needs {n} × {size}",
                self.world.rank,
                recv.len()
            )));
        }
        let (_held, deadline) = self.begin(Kind::AllGather, n, 0)?;
        let mut mine = Vec::with_capacity(n);
        send.read_into(&mut mine);
        let all = self.exchange(mine, n * size, deadline, |c, s, r| {
            c.immediate_all_gather_into(StaticScope, s, r)
        })?;
        recv.write_from(&all);
        Ok(())
    }

    fn reduce_scatter(&self, send: Buffer<'_>, recv: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let (send, mut recv) = (self.host(send)?, self.host(recv)?);
        let (n, size) = (send.len(), self.world.size);
        if n % size != 0 || recv.len() != n / size {
            return Err(self.refuse(format!(
                "reduce_scatter: {n} elements do not split into {size} shards of {}",
                recv.len()
            )));
        }
        let (_held, deadline) = self.begin(Kind::ReduceScatter, n, op as usize)?;
        let contribution = self.contribution(&send, op, n);
        let mine = self.reduce_pieces(contribution, n / size, deadline)?;
        recv.write_from(&mine);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let (_held, deadline) = self.begin(Kind::Barrier, 0, 0)?;
        self.wait(self.comm.immediate_barrier(), deadline)
    }

    fn abort(&self, reason: &str) {
        self.mark_aborted(reason, false);
    }
}
