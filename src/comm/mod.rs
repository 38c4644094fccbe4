//! Collective communication between data-parallel replicas.
//!
//! [`Communicator`] is the interface the data-parallel engine uses; [`cpu::CpuCommunicator`]
//! implements it for replicas that are threads of one process. Every collective reduces in a
//! fixed order (rank 0, 1, …), so every rank gets the same bits.
//!
//! Averaging follows PyTorch DDP: each contribution is multiplied by 1/N, then the contributions
//! are summed.

pub mod cpu;
pub mod rendezvous;

use half::{bf16, f16};

use crate::dtype::round_into;
use crate::error::Result;
use crate::DType;

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

impl<'a> From<&'a mut [f32]> for HostBuffer<'a> {
    fn from(b: &'a mut [f32]) -> Self {
        HostBuffer::F32(b)
    }
}

/// Collectives among the ranks of one group. A collective that cannot complete (a rank failed,
/// aborted, or did not arrive within the group's timeout) returns an error on every rank; after
/// that the group is aborted and every later collective fails at once.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `buf` becomes the combination of all ranks' buffers.
    fn all_reduce(&self, buf: HostBuffer<'_>, op: ReduceOp) -> Result<()>;
    /// Every rank's `buf` becomes rank `root`'s.
    fn broadcast(&self, buf: HostBuffer<'_>, root: usize) -> Result<()>;
    /// `recv` (world_size × send.len()) becomes every rank's `send`, in rank order.
    fn all_gather(&self, send: HostBuffer<'_>, recv: HostBuffer<'_>) -> Result<()>;
    /// `recv` becomes this rank's share (rank-th slice of send.len() / world_size) of the
    /// combination of all ranks' `send`.
    fn reduce_scatter(
        &self,
        send: HostBuffer<'_>,
        recv: HostBuffer<'_>,
        op: ReduceOp,
    ) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Makes every rank's current and future collectives fail with `reason`.
    fn abort(&self, reason: &str);
}
