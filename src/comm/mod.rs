//! Collective communication between data-parallel replicas.
//!
//! [`Communicator`] is the interface the data-parallel engine uses. Implementations:
//! [`cpu::CpuCommunicator`] for replicas that are threads of one process (host buffers),
//! [`nccl::NcclCommunicator`] for one GPU per rank, in one process or many (device buffers, host
//! buffers staged through the device), and [`single_device::SingleDeviceCommunicator`] for several
//! replicas on one GPU, reduced by a kernel (its host buffers go through the CPU communicator),
//! and, with the cargo feature `mpi`, `mpi::MpiCommunicator` for one process per rank under
//! `mpirun`, which computes the CPU communicator's bits.
//! The CPU and single-device communicators reduce in rank order, so every rank gets the same bits
//! and the two agree bit for bit; NCCL gives every rank the same bits in its own order.
//! [`rendezvous`] connects the processes of a multi-process group.
//!
//! Averaging follows PyTorch DDP: each contribution is multiplied by 1/N, then the contributions
//! are summed.

pub mod cpu;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod nccl;
pub mod rendezvous;
pub mod single_device;

use std::time::{Duration, Instant};

use half::{bf16, f16};

pub use crate::cuda::arena::DeviceBuffer;
use crate::dtype::round_into;
use crate::error::Result;
use crate::DType;

/// The instant `timeout` from now. A timeout past a year (`Duration::MAX` for "wait forever")
/// waits a year, so the arithmetic never overflows.
pub(crate) fn deadline(timeout: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    Instant::now() + timeout.min(YEAR)
}

/// How contributions are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Each contribution × 1/N, then summed (PyTorch DDP's order of rounding).
    Average,
}

/// A host buffer of any arena dtype.
#[derive(Debug)]
pub enum HostBuffer<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl HostBuffer<'_> {
    pub fn len(&self) -> usize {
        match self {
            HostBuffer::F32(b) => b.len(),
            HostBuffer::BF16(b) => b.len(),
            HostBuffer::F16(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            HostBuffer::F32(_) => DType::F32,
            HostBuffer::BF16(_) => DType::BF16,
            HostBuffer::F16(_) => DType::F16,
        }
    }

    /// A shorter-lived handle on the same memory, to pass to one collective and keep using after.
    pub fn reborrow(&mut self) -> HostBuffer<'_> {
        match self {
            HostBuffer::F32(b) => HostBuffer::F32(b),
            HostBuffer::BF16(b) => HostBuffer::BF16(b),
            HostBuffer::F16(b) => HostBuffer::F16(b),
        }
    }

    /// Appends the elements, widened to f32, to `out`.
    pub(crate) fn read_into(&self, out: &mut Vec<f32>) {
        out.clear();
        match self {
            HostBuffer::F32(b) => out.extend_from_slice(b),
            HostBuffer::BF16(b) => out.extend(b.iter().map(|x| x.to_f32())),
            HostBuffer::F16(b) => out.extend(b.iter().map(|x| x.to_f32())),
        }
    }

    /// Overwrites the elements from f32 `values`, rounding to nearest even.
    pub(crate) fn write_from(&mut self, values: &[f32]) {
        self.write_range(0, values);
    }

    /// Overwrites the elements from `at` on with f32 `values`, rounding to nearest even.
    pub(crate) fn write_range(&mut self, at: usize, values: &[f32]) {
        let end = at + values.len();
        match self {
            HostBuffer::F32(b) => round_into(&mut b[at..end], values),
            HostBuffer::BF16(b) => round_into(&mut b[at..end], values),
            HostBuffer::F16(b) => round_into(&mut b[at..end], values),
        }
    }
}

impl<'a> HostBuffer<'a> {
    /// Splits into consecutive pieces of the given lengths (which must sum to at most the length).
    pub(crate) fn split(self, lens: &[usize]) -> Vec<HostBuffer<'a>> {
        fn go<'a, T>(
            mut s: &'a mut [T],
            lens: &[usize],
            wrap: fn(&'a mut [T]) -> HostBuffer<'a>,
        ) -> Vec<HostBuffer<'a>> {
            let mut out = Vec::with_capacity(lens.len());
            for &n in lens {
                let n = n.min(s.len());
                let (head, tail) = std::mem::take(&mut s).split_at_mut(n);
                out.push(wrap(head));
                s = tail;
            }
            out
        }
        match self {
            HostBuffer::F32(b) => go(b, lens, HostBuffer::F32),
            HostBuffer::BF16(b) => go(b, lens, HostBuffer::BF16),
            HostBuffer::F16(b) => go(b, lens, HostBuffer::F16),
        }
    }
}

impl<'a> From<&'a mut crate::Arena> for HostBuffer<'a> {
    fn from(a: &'a mut crate::Arena) -> Self {
        match a {
            crate::Arena::F32(v) => HostBuffer::F32(v),
            crate::Arena::BF16(v) => HostBuffer::BF16(v),
            crate::Arena::F16(v) => HostBuffer::F16(v),
        }
    }
}

impl<'a> From<&'a mut [f32]> for HostBuffer<'a> {
    fn from(b: &'a mut [f32]) -> Self {
        HostBuffer::F32(b)
    }
}

/// A buffer a collective works on, in host or device memory.
#[derive(Debug)]
pub enum Buffer<'a> {
    Host(HostBuffer<'a>),
    Device(DeviceBuffer<'a>),
}

impl Buffer<'_> {
    pub fn len(&self) -> usize {
        match self {
            Buffer::Host(b) => b.len(),
            Buffer::Device(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Buffer::Host(b) => b.dtype(),
            Buffer::Device(b) => b.dtype(),
        }
    }

    /// Writes f32 `values` from element `at` on, rounded to the buffer's dtype.
    pub fn write_range(&mut self, at: usize, values: &[f32]) -> Result<()> {
        match self {
            Buffer::Host(b) => {
                crate::error::check_range("buffer write", at, values.len(), b.len())?;
                b.write_range(at, values);
                Ok(())
            }
            Buffer::Device(b) => b.write_range(at, values),
        }
    }

    /// A shorter-lived handle on the same memory, to pass to one collective and keep using after.
    pub fn reborrow(&mut self) -> Buffer<'_> {
        match self {
            Buffer::Host(b) => Buffer::Host(b.reborrow()),
            Buffer::Device(b) => Buffer::Device(b.reborrow()),
        }
    }
}

impl<'a> From<HostBuffer<'a>> for Buffer<'a> {
    fn from(b: HostBuffer<'a>) -> Self {
        Buffer::Host(b)
    }
}

impl<'a> From<DeviceBuffer<'a>> for Buffer<'a> {
    fn from(b: DeviceBuffer<'a>) -> Self {
        Buffer::Device(b)
    }
}

impl<'a> From<&'a mut [f32]> for Buffer<'a> {
    fn from(b: &'a mut [f32]) -> Self {
        Buffer::Host(HostBuffer::F32(b))
    }
}

/// Collectives among the ranks of one group. A collective that cannot complete (a rank failed,
/// aborted, or did not arrive within the group's timeout) returns an error on every rank; after
/// that the group is aborted and every later collective fails at once.
///
/// Collectives on device buffers are enqueued on the buffer's stream and may return before they
/// finish; [`Communicator::barrier`] waits for them and reports their failures. A collective on
/// host buffers orders them before the device work this rank enqueues once it returns (the
/// data-parallel steps rely on it: their verdict exchange orders the reduced gradients before the
/// update). An all-gather moves bits: `recv` holds exactly the
/// bytes of every rank's `send` (a sharded step gathers f64 partials as pairs of f32 words).
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `buf` becomes the combination of all ranks' buffers.
    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()>;
    /// Every rank's `buf` becomes rank `root`'s.
    fn broadcast(&self, buf: Buffer<'_>, root: usize) -> Result<()>;
    /// `recv` (world_size × send.len()) becomes every rank's `send`, in rank order.
    fn all_gather(&self, send: Buffer<'_>, recv: Buffer<'_>) -> Result<()>;
    /// `recv` becomes this rank's share (rank-th slice of send.len() / world_size) of the
    /// combination of all ranks' `send`.
    fn reduce_scatter(&self, send: Buffer<'_>, recv: Buffer<'_>, op: ReduceOp) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Makes every rank's current and future collectives fail with `reason`.
    fn abort(&self, reason: &str);
}
