//! Several replicas on one GPU, reduced by a kernel: the data-parallel path on a one-GPU machine
//! (NCCL allows one rank per device).
//!
//! Every replica's parameter set on a device shares that device's one stream, so a collective is:
//! each rank publishes its buffer's address; a host barrier; rank 0 enqueues one kernel that reads
//! every rank's buffer in rank order and writes the result to each (or memory copies, for
//! broadcast and all-gather); a second barrier, after which any rank's later work is enqueued
//! behind it. Rounding matches [`CpuCommunicator`] bit for bit. Host buffers, barriers, timeouts
//! and aborts are the in-process CPU communicator's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

use super::cpu::CpuCommunicator;
use super::{Buffer, Communicator, ReduceOp};
use crate::cuda::runtime::{driver_error, CudaRuntime};
use crate::error::{Error, Result};
use crate::{DType, Device};

/// The most replicas one device's kernel combines (`MAX_RANKS` in kernels/all_reduce.cu).
pub const MAX_RANKS: usize = 16;

/// `RankBuffers` in kernels/all_reduce.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RankBuffers {
    input: [u64; MAX_RANKS],
    output: [u64; MAX_RANKS],
}

// SAFETY: plain `#[repr(C)]` data matching the kernel's struct field for field, passed by value.
unsafe impl DeviceRepr for RankBuffers {}

/// What a rank lends to the current collective.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Published {
    input: u64,
    output: u64,
    len: usize,
    dtype: DType,
}

#[derive(Debug)]
struct Shared {
    rt: Arc<CudaRuntime>,
    kernels: [CudaFunction; 3],
    slots: Mutex<Vec<Option<Published>>>,
}

/// One replica's handle on a group of replicas sharing one GPU.
#[derive(Debug)]
pub struct SingleDeviceCommunicator {
    host: CpuCommunicator,
    shared: Arc<Shared>,
}

fn fail(reason: impl Into<String>) -> Error {
    Error::Communicator(reason.into())
}

impl SingleDeviceCommunicator {
    /// `size` replicas on CUDA device `ordinal`, giving up after waiting `timeout` for the others.
    pub fn group(ordinal: usize, size: usize, timeout: Duration) -> Result<Vec<Self>> {
        if size > MAX_RANKS {
            return Err(fail(format!(
                "{size} replicas on one device; at most {MAX_RANKS} are supported"
            )));
        }
        let rt = CudaRuntime::shared(ordinal)?;
        let module = rt.module("all_reduce")?;
        let kernels = [
            rt.function(&module, "reduce_ranks_f32")?,
            rt.function(&module, "reduce_ranks_bf16")?,
            rt.function(&module, "reduce_ranks_f16")?,
        ];
        let shared = Arc::new(Shared {
            rt,
            kernels,
            slots: Mutex::new(vec![None; size]),
        });
        Ok(CpuCommunicator::group(size, timeout)?
            .into_iter()
            .map(|host| SingleDeviceCommunicator {
                host,
                shared: shared.clone(),
            })
            .collect())
    }

    pub fn device(&self) -> Device {
        self.shared.rt.device
    }

    /// Lends this rank's buffers to the collective and returns every rank's, once all have; every
    /// rank checks the same table, so a mismatch fails every rank the same way.
    fn publish(&self, mine: Published, what: &str) -> Result<Vec<Published>> {
        let lock = || {
            self.shared
                .slots
                .lock()
                .map_err(|_| fail("single-device communicator state poisoned"))
        };
        lock()?[self.host.rank()] = Some(mine);
        self.host.barrier()?;
        let all: Vec<Published> = lock()?.iter().flatten().copied().collect();
        if all.len() != self.host.world_size()
            || all
                .iter()
                .any(|p| (p.len, p.dtype) != (mine.len, mine.dtype))
        {
            let reason = format!("{what}: ranks lent buffers of different lengths or dtypes");
            self.host.abort(&reason);
            return Err(fail(reason));
        }
        Ok(all)
    }

    /// Ends a collective: nobody reuses a slot or touches its buffer before rank 0 has enqueued.
    fn finish(&self) -> Result<()> {
        self.host.barrier()
    }

    /// Aborts the group and returns the error: a collective that cannot go ahead on one rank
    /// must not go ahead on any.
    fn refuse(&self, reason: String) -> Error {
        self.host.abort(&reason);
        fail(reason)
    }

    fn device_buffer(&self, buf: &Buffer<'_>) -> Result<(u64, usize, DType)> {
        match buf {
            Buffer::Device(b) if b.device() == self.device() => Ok((b.ptr(), b.len(), b.dtype())),
            Buffer::Device(b) => Err(self.refuse(format!(
                "a buffer on {} given to the communicator of {}",
                b.device(),
                self.device()
            ))),
            Buffer::Host(_) => {
                Err(self.refuse("mixed host and device buffers in one collective".into()))
            }
        }
    }

    /// What each contribution is multiplied by (×1/N before the sum when averaging, as the CPU
    /// communicator does).
    fn scale(&self, op: ReduceOp) -> f32 {
        match op {
            ReduceOp::Sum => 1.0,
            ReduceOp::Average => 1.0 / self.world_size() as f32,
        }
    }

    /// Rank 0 enqueues the reduction kernel over every rank's buffers.
    fn reduce(&self, all: &[Published], scale: f32, shard_len: usize) -> Result<()> {
        if self.host.rank() != 0 || all[0].len == 0 {
            return Ok(());
        }
        let mut b = RankBuffers {
            input: [0; MAX_RANKS],
            output: [0; MAX_RANKS],
        };
        for (r, p) in all.iter().enumerate() {
            b.input[r] = p.input;
            b.output[r] = p.output;
        }
        let rt = &self.shared.rt;
        let kernel = &self.shared.kernels[match all[0].dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
        }];
        let (ranks, len) = (all.len() as u32, all[0].len as u64);
        let shard = shard_len as u64;
        let blocks = (all[0].len.div_ceil(256)).clamp(1, rt.sm_count * 8) as u32;
        let mut launch = rt.stream.launch_builder(kernel);
        launch.arg(&b).arg(&ranks).arg(&len).arg(&scale).arg(&shard);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every pointer in `b` is a live device buffer of `len` elements (outputs: `len` or
        // `shard_len`) on this device, lent by its rank until the barrier after this launch; the
        // kernel's signature is (RankBuffers, u32, u64, f32, u64), as pushed.
        unsafe { launch.launch(cfg) }.map_err(driver_error(rt.device, 0))?;
        Ok(())
    }

    /// Rank 0 enqueues device-to-device copies.
    fn copy(&self, copies: &[(u64, u64)], bytes: usize) -> Result<()> {
        if self.host.rank() != 0 || bytes == 0 {
            return Ok(());
        }
        let rt = &self.shared.rt;
        rt.bind()?;
        for &(dst, src) in copies {
            // SAFETY: both ranges are live device buffers of at least `bytes` bytes lent for this
            // collective; the copies are ordered on the one stream every replica uses.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, rt.stream.cu_stream())
            }
            .map_err(driver_error(rt.device, 0))?;
        }
        Ok(())
    }
}

impl Communicator for SingleDeviceCommunicator {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn world_size(&self) -> usize {
        self.host.world_size()
    }

    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()> {
        if let Buffer::Host(_) = buf {
            return self.host.all_reduce(buf, op);
        }
        let (ptr, len, dtype) = self.device_buffer(&buf)?;
        let all = self.publish(
            Published {
                input: ptr,
                output: ptr,
                len,
                dtype,
            },
            "all_reduce",
        )?;
        let r = self.reduce(&all, self.scale(op), 0);
        self.finish().and(r)
    }

    fn broadcast(&self, buf: Buffer<'_>, root: usize) -> Result<()> {
        if let Buffer::Host(_) = buf {
            return self.host.broadcast(buf, root);
        }
        if root >= self.world_size() {
            return Err(self.refuse(format!(
                "broadcast root {root} out of {}",
                self.world_size()
            )));
        }
        let (ptr, len, dtype) = self.device_buffer(&buf)?;
        let mine = Published {
            input: ptr,
            output: ptr,
            len,
            dtype,
        };
        let all = self.publish(mine, "broadcast")?;
        let copies: Vec<(u64, u64)> = (0..all.len())
            .filter(|&r| r != root)
            .map(|r| (all[r].output, all[root].input))
            .collect();
        let r = self.copy(&copies, len * dtype.size_bytes());
        self.finish().and(r)
    }

    fn all_gather(&self, send: Buffer<'_>, recv: Buffer<'_>) -> Result<()> {
        if let (Buffer::Host(_), Buffer::Host(_)) = (&send, &recv) {
            return self.host.all_gather(send, recv);
        }
        let (s, n, dtype) = self.device_buffer(&send)?;
        let (r, m, rdtype) = self.device_buffer(&recv)?;
        if Some(m) != n.checked_mul(self.world_size()) || rdtype != dtype {
            return Err(self.refuse(format!(
                "all_gather: recv holds {m} elements of {rdtype}, needs {n} × {} of {dtype}",
                self.world_size()
            )));
        }
        let all = self.publish(
            Published {
                input: s,
                output: r,
                len: n,
                dtype,
            },
            "all_gather",
        )?;
        let bytes = n * dtype.size_bytes();
        let copies: Vec<(u64, u64)> = all
            .iter()
            .flat_map(|dst| {
                all.iter()
                    .enumerate()
                    .map(move |(k, src)| (dst.output + (k * bytes) as u64, src.input))
            })
            .collect();
        let result = self.copy(&copies, bytes);
        self.finish().and(result)
    }

    fn reduce_scatter(&self, send: Buffer<'_>, recv: Buffer<'_>, op: ReduceOp) -> Result<()> {
        if let (Buffer::Host(_), Buffer::Host(_)) = (&send, &recv) {
            return self.host.reduce_scatter(send, recv, op);
        }
        let (s, n, dtype) = self.device_buffer(&send)?;
        let (r, m, rdtype) = self.device_buffer(&recv)?;
        let size = self.world_size();
        if n % size != 0 || m != n / size || rdtype != dtype {
            return Err(self.refuse(format!(
                "reduce_scatter: {n} elements of {dtype} do not split into {size} shards of {m} {rdtype}"
            )));
        }
        let all = self.publish(
            Published {
                input: s,
                output: r,
                len: n,
                dtype,
            },
            "reduce_scatter",
        )?;
        let result = self.reduce(&all, self.scale(op), m);
        self.finish().and(result)
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()?;
        // Everything enqueued so far, by every replica, has finished without a device error.
        let rt = &self.shared.rt;
        rt.stream.synchronize().map_err(driver_error(rt.device, 0))
    }

    fn abort(&self, reason: &str) {
        self.host.abort(reason);
    }
}
