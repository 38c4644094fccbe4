//! NCCL through cudarc: one rank per GPU, in one process (a thread per GPU) or in many processes
//! connected by the [`rendezvous`](super::rendezvous).
//!
//! NCCL is loaded at run time (`ffi.rs`); without it every constructor returns
//! [`Unavailable::NoNccl`]. Collectives on device buffers run on a
//! communication stream of their own, after everything already enqueued on the device's stream
//! (the gradients written so far) and concurrently with what is enqueued there later (the rest of
//! the backward pass); they return at once. [`Communicator::barrier`] waits for them, makes the
//! device's stream wait for them too (so the step sees reduced gradients), polling NCCL's asynchronous error state, and aborts the communicator when a peer
//! failed or nothing finished within the timeout, so a dead or stalled rank surfaces as an error
//! on every rank instead of a hang. Host buffers are staged through the device.
//!
//! Initialisation is blocking: the rendezvous that delivers the unique id has already seen every
//! rank alive, which is what makes that safe.

pub(crate) mod ffi;

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUresult;

use ffi::{nccl, Comm, Nccl, NcclResult};

use super::rendezvous::Rendezvous;
use super::{Buffer, Communicator, HostBuffer, ReduceOp};
use crate::cuda::runtime::{driver_error, CudaRuntime};
use crate::device::Unavailable;
use crate::error::{Error, Result};
use crate::DType;

/// Checks that NCCL can be loaded (`ffi.rs` says where it is looked for).
pub fn nccl_available() -> Result<()> {
    lib().map(|_| ())
}

fn lib() -> Result<&'static Nccl> {
    nccl().map_err(|_| Unavailable::NoNccl.into())
}

fn name(r: NcclResult) -> &'static str {
    match r {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        _ => "unknown NCCL result",
    }
}

/// Maps an NCCL status to the crate's error, with NCCL's own explanation.
fn check(r: NcclResult, comm: Option<Comm>) -> Result<()> {
    if r == ffi::SUCCESS || r == ffi::IN_PROGRESS {
        return Ok(());
    }
    let n = lib()?;
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated static or per-communicator strings that stay
            // valid until the next NCCL call on this thread; they are copied at once.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: ncclGetErrorString accepts any status; ncclGetLastError accepts a live communicator
    // (callers pass one only while holding it).
    let mut message = text(unsafe { (n.get_error_string)(r) });
    if let (Some(c), Some(last_error)) = (comm, n.get_last_error) {
        // SAFETY: `c` is a live communicator (see above).
        let last = text(unsafe { last_error(c) });
        if !last.is_empty() {
            message = format!("{message}; {last}");
        }
    }
    Err(Error::Nccl {
        code: r,
        name: name(r),
        message,
    })
}

/// The 128-byte id every rank of one communicator must share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NcclId([u8; 128]);

impl NcclId {
    /// A fresh id (on one rank; the others receive it through a rendezvous).
    pub fn new() -> Result<Self> {
        let n = lib()?;
        let mut id = ffi::UniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid out-pointer.
        check(unsafe { (n.get_unique_id)(&mut id) }, None)?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    pub fn as_bytes(&self) -> &[u8; 128] {
        &self.0
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let b: [u8; 128] = bytes.try_into().map_err(|_| {
            Error::Rendezvous(format!("an NCCL id has 128 bytes, got {}", bytes.len()))
        })?;
        Ok(NcclId(b))
    }
}

/// The raw communicator; `None` once destroyed or aborted.
struct Handle(Option<Comm>);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap;
// every use goes through the `Mutex<Handle>` below.
unsafe impl Send for Handle {}

/// One rank of an NCCL communicator, bound to one GPU.
pub struct NcclCommunicator {
    rank: usize,
    world_size: usize,
    rt: Arc<CudaRuntime>,
    /// Collectives run here, ordered after the device stream's work at the time they are issued.
    comm_stream: Arc<cudarc::driver::CudaStream>,
    timeout: Duration,
    handle: Mutex<Handle>,
    aborted: Mutex<Option<String>>,
    /// Set by `abort` so that a rank polling in `barrier` lets go of the handle at once.
    abort_requested: AtomicBool,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.rt.device)
            .finish()
    }
}

fn data_type(d: DType) -> c_int {
    match d {
        DType::F32 => ffi::FLOAT32,
        DType::BF16 => ffi::BFLOAT16,
        DType::F16 => ffi::FLOAT16,
    }
}

fn reduce_op(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => ffi::SUM,
        // NCCL averages floating-point data by scaling each contribution by 1/N before the sum,
        // the order of rounding PyTorch DDP uses.
        ReduceOp::Average => ffi::AVG,
    }
}

impl NcclCommunicator {
    /// Rank `rank` of `world_size`, on CUDA device `ordinal`, joining the communicator of `id`.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world_size: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<Self> {
        nccl_available()?;
        let rt = CudaRuntime::shared(ordinal)?;
        Self::init(rt, rank, world_size, id, timeout)
    }

    /// One communicator per device of this process, ranks in the order of `ordinals` (use one
    /// thread per rank afterwards).
    pub fn group(ordinals: &[usize], timeout: Duration) -> Result<Vec<Self>> {
        nccl_available()?;
        let id = NcclId::new()?;
        let rts = ordinals
            .iter()
            .map(|&o| CudaRuntime::shared(o))
            .collect::<Result<Vec<_>>>()?;
        let n = lib()?;
        // Several ranks initialised from one thread must be inside one NCCL group.
        // SAFETY: group calls take no arguments.
        check(unsafe { (n.group_start)() }, None)?;
        let comms: Vec<Result<Self>> = rts
            .into_iter()
            .enumerate()
            .map(|(rank, rt)| Self::init(rt, rank, ordinals.len(), &id, timeout))
            .collect();
        // SAFETY: as above; ends the group opened above whatever the inits returned.
        let ended = check(unsafe { (n.group_end)() }, None);
        let comms = comms.into_iter().collect::<Result<Vec<_>>>()?;
        ended?;
        Ok(comms)
    }

    /// Joins through a rendezvous: rank 0 makes the id, every rank receives it.
    pub fn from_rendezvous(rdzv: &mut Rendezvous, ordinal: usize) -> Result<Self> {
        let mine = if rdzv.rank() == 0 {
            NcclId::new()?.as_bytes().to_vec()
        } else {
            nccl_available()?;
            Vec::new()
        };
        let id = NcclId::from_bytes(&rdzv.broadcast(&mine, 0)?)?;
        Self::new(ordinal, rdzv.rank(), rdzv.world_size(), &id, rdzv.timeout())
    }

    fn init(
        rt: Arc<CudaRuntime>,
        rank: usize,
        world_size: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<Self> {
        if rank >= world_size {
            return Err(Error::Communicator(format!(
                "rank {rank} is not below the world size {world_size}"
            )));
        }
        let n = lib()?;
        rt.bind()?;
        let mut comm: Comm = std::ptr::null_mut();
        let uid = ffi::UniqueId {
            internal: id.0.map(|b| b as std::ffi::c_char),
        };
        let size = i32::try_from(world_size)
            .map_err(|_| Error::Communicator(format!("world size {world_size} is too large")))?;
        // SAFETY: `comm` is a valid out-pointer; the id is the 128 bytes NCCL produced; the
        // device's context is current on this thread, as NCCL requires.
        let status = unsafe { (n.comm_init_rank)(&mut comm, size, uid, rank as i32) };
        check(status, None)?;
        let comm_stream = rt.stream.fork().map_err(driver_error(rt.device, 0))?;
        Ok(NcclCommunicator {
            rank,
            world_size,
            rt,
            comm_stream,
            timeout,
            handle: Mutex::new(Handle(Some(comm))),
            aborted: Mutex::new(None),
            abort_requested: AtomicBool::new(false),
        })
    }

    pub fn device(&self) -> crate::Device {
        self.rt.device
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Communicator("NCCL communicator state poisoned by a panicking thread".into())
}

impl NcclCommunicator {
    /// The live communicator, or the reason it is gone.
    fn live(&self) -> Result<(MutexGuard<'_, Handle>, Comm)> {
        if let Some(reason) = self.aborted.lock().map_err(poisoned)?.clone() {
            return Err(Error::Communicator(reason));
        }
        let guard = self.handle.lock().map_err(poisoned)?;
        match guard.0 {
            Some(c) => Ok((guard, c)),
            None => Err(Error::Communicator(
                "the NCCL communicator was aborted".into(),
            )),
        }
    }

    /// Runs one NCCL call on the live communicator; a failure aborts it.
    fn call(&self, f: impl FnOnce(&Nccl, Comm, ffi::Stream) -> NcclResult) -> Result<()> {
        let (mut guard, comm) = self.live()?;
        self.rt.bind()?;
        // Everything enqueued on the device's stream so far (this buffer's gradients) comes first.
        self.comm_stream
            .join(&self.rt.stream)
            .map_err(driver_error(self.rt.device, 0))?;
        let stream = self.comm_stream.cu_stream() as ffi::Stream;
        let r = check(f(lib()?, comm, stream), Some(comm));
        if let Err(e) = &r {
            self.abort_locked(&mut guard, &format!("rank {}: {e}", self.rank));
        }
        r
    }

    fn abort_locked(&self, guard: &mut MutexGuard<'_, Handle>, reason: &str) {
        if let Ok(mut a) = self.aborted.lock() {
            a.get_or_insert_with(|| reason.to_string());
        }
        if let (Some(c), Ok(n)) = (guard.0.take(), lib()) {
            // SAFETY: `c` is live (taken out of the handle, so never used again) and no other
            // call on it is running: the handle's lock is held.
            unsafe { (n.comm_abort)(c) };
        }
    }

    /// Aborts the communicator and returns the error: arguments that do not fit on one rank
    /// must end the collective on every rank (the others learn of it through NCCL's abort),
    /// never leave this rank out of step with the rest.
    fn refuse(&self, reason: String) -> Error {
        let reason = format!("rank {}: {reason}", self.rank);
        self.abort(&reason);
        Error::Communicator(reason)
    }

    /// Device pointers of a same-length send/receive pair of device buffers.
    fn device_pair(&self, send: &Buffer<'_>, recv: &Buffer<'_>, what: &str) -> Result<(u64, u64)> {
        match (send, recv) {
            (Buffer::Device(s), Buffer::Device(r)) if s.dtype() == r.dtype() => {
                Ok((s.ptr(), r.ptr()))
            }
            _ => Err(self.refuse(format!(
                "{what}: NCCL needs both buffers on the device, of one dtype"
            ))),
        }
    }

    /// Runs `f` on a device copy of a host buffer (f32), then copies the result back.
    fn staged(
        &self,
        host: &mut HostBuffer<'_>,
        f: impl FnOnce(u64, usize) -> Result<()>,
    ) -> Result<()> {
        let mut values = Vec::new();
        host.read_into(&mut values);
        let dev = self.rt.device;
        let mut slice = self
            .rt
            .stream
            .clone_htod(&values)
            .map_err(driver_error(dev, values.len() * 4))?;
        {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _sync) = slice.device_ptr_mut(&self.rt.stream);
            f(ptr, values.len())?;
        }
        self.wait("staged collective")?;
        let back = self
            .rt
            .stream
            .clone_dtoh(&slice)
            .map_err(driver_error(dev, 0))?;
        host.write_from(&back);
        Ok(())
    }

    /// Waits for every collective enqueued so far, polling NCCL for peer failures; aborts the
    /// communicator on a failure or after the timeout.
    fn wait(&self, what: &str) -> Result<()> {
        let deadline = crate::comm::deadline(self.timeout);
        loop {
            let (mut guard, comm) = self.live()?;
            let mut state = ffi::SUCCESS;
            // SAFETY: `comm` is live and the handle's lock is held; `state` is a valid out-pointer.
            let polled = unsafe { (lib()?.comm_get_async_error)(comm, &mut state) };
            let failed = check(polled, Some(comm)).and_then(|_| check(state, Some(comm)));
            if let Err(e) = failed {
                self.abort_locked(&mut guard, &format!("rank {}: {what}: {e}", self.rank));
                return Err(e);
            }
            self.rt.bind()?;
            // SAFETY: the stream belongs to this communicator and outlives the call; cuStreamQuery
            // only reads its state.
            match unsafe { cudarc::driver::sys::cuStreamQuery(self.comm_stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => {
                    // Later work on the device's stream (the step) sees the reduced buffers.
                    return self
                        .rt
                        .stream
                        .join(&self.comm_stream)
                        .map_err(driver_error(self.rt.device, 0));
                }
                CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    let e = Error::Driver {
                        device: self.rt.device,
                        code: other as i32,
                        name: format!("{other:?} ({what})"),
                    };
                    self.abort_locked(&mut guard, &e.to_string());
                    return Err(e);
                }
            }
            if self.abort_requested.load(Ordering::Acquire) {
                self.abort_locked(&mut guard, "aborted by another thread");
                return Err(Error::Communicator(format!(
                    "rank {}: {what}: aborted",
                    self.rank
                )));
            }
            if Instant::now() >= deadline {
                let reason = format!(
                    "rank {}: {what} did not finish within {:?}: a rank failed or stalled",
                    self.rank, self.timeout
                );
                self.abort_locked(&mut guard, &reason);
                return Err(Error::Timeout(reason));
            }
            drop(guard);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let op = reduce_op(op);
        let run = |ptr: u64, len: usize, dt: c_int| {
            self.call(|n, comm, stream| {
                // SAFETY: `ptr .. ptr + len` is a live device buffer on this rank's device, lent
                // for the call; NCCL reduces it in place in stream order.
                unsafe { (n.all_reduce)(ptr as _, ptr as _, len, dt, op, comm, stream) }
            })
        };
        match buf {
            Buffer::Device(b) => run(b.ptr(), b.len(), data_type(b.dtype())),
            Buffer::Host(mut h) => self.staged(&mut h, |ptr, len| run(ptr, len, ffi::FLOAT32)),
        }
    }

    fn broadcast(&self, buf: Buffer<'_>, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(self.refuse(format!("broadcast root {root} out of {}", self.world_size)));
        }
        let run = |ptr: u64, len: usize, dt: c_int| {
            self.call(|n, comm, stream| {
                // SAFETY: as in all_reduce; in place.
                unsafe { (n.broadcast)(ptr as _, ptr as _, len, dt, root as c_int, comm, stream) }
            })
        };
        match buf {
            Buffer::Device(b) => run(b.ptr(), b.len(), data_type(b.dtype())),
            Buffer::Host(mut h) => self.staged(&mut h, |ptr, len| run(ptr, len, ffi::FLOAT32)),
        }
    }

    fn all_gather(&self, send: Buffer<'_>, recv: Buffer<'_>) -> Result<()> {
        if Some(recv.len()) != send.len().checked_mul(self.world_size) {
            return Err(self.refuse(format!(
                "all_gather: recv holds {} elements, needs {} × {}",
                recv.len(),
                send.len(),
                self.world_size
            )));
        }
        match (send, recv) {
            (Buffer::Host(s), Buffer::Host(mut r)) => {
                // Stage both through one device buffer: [recv | send].
                let n = s.len();
                let mut mine = Vec::new();
                s.read_into(&mut mine);
                // recv as the caller gave it: a collective that delivers nothing leaves it so.
                let mut joined = Vec::new();
                r.read_into(&mut joined);
                joined.extend_from_slice(&mine);
                let send_at = (r.len() * 4) as u64;
                self.staged(&mut HostBuffer::F32(&mut joined), |ptr, _| {
                    self.call(|nccl, comm, stream| {
                        // SAFETY: `ptr` holds recv (n × world f32) then send (n f32), alive until
                        // the staged copy-back, which waits for the stream.
                        unsafe {
                            (nccl.all_gather)(
                                (ptr + send_at) as _,
                                ptr as _,
                                n,
                                ffi::FLOAT32,
                                comm,
                                stream,
                            )
                        }
                    })
                })?;
                r.write_from(&joined[..r.len()]);
                Ok(())
            }
            (send, recv) => {
                let (s, r) = self.device_pair(&send, &recv, "all_gather")?;
                let (dt, n) = (data_type(send.dtype()), send.len());
                self.call(|nccl, comm, stream| {
                    // SAFETY: both are live device buffers of this rank, of the checked lengths.
                    unsafe { (nccl.all_gather)(s as _, r as _, n, dt, comm, stream) }
                })
            }
        }
    }

    fn reduce_scatter(&self, send: Buffer<'_>, recv: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let n = send.len();
        if n % self.world_size != 0 || recv.len() != n / self.world_size {
            return Err(self.refuse(format!(
                "reduce_scatter: {n} elements do not split into {} shards of {}",
                self.world_size,
                recv.len()
            )));
        }
        let (s, r) = self.device_pair(&send, &recv, "reduce_scatter")?;
        let (dt, op, count) = (data_type(send.dtype()), reduce_op(op), recv.len());
        self.call(|n, comm, stream| {
            // SAFETY: both are live device buffers of this rank, of the checked lengths.
            unsafe { (n.reduce_scatter)(s as _, r as _, count, dt, op, comm, stream) }
        })
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [0.0f32];
        self.all_reduce(HostBuffer::F32(&mut one).into(), ReduceOp::Sum)?;
        self.wait("barrier")
    }

    fn abort(&self, reason: &str) {
        if let Ok(mut a) = self.aborted.lock() {
            a.get_or_insert_with(|| reason.to_string());
        }
        self.abort_requested.store(true, Ordering::Release);
        if let Ok(mut guard) = self.handle.lock() {
            self.abort_locked(&mut guard, reason);
        }
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        // The communication stream is destroyed after this; its context must be current.
        let _ = self.rt.bind();
        if let Ok(mut guard) = self.handle.lock() {
            if let (Some(c), Ok(n)) = (guard.0.take(), lib()) {
                // SAFETY: the last use of `c`; nothing else can hold it (we are dropping self).
                // Abort rather than destroy: destroy would wait forever for a dead peer.
                unsafe { (n.comm_abort)(c) };
            }
        }
    }
}
