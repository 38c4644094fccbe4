//! The CUDA engine: the launch plan resident on the device, the per-group configs, the step state
//! in device memory, and the two launches of a step (norm pass, fused update), optionally captured
//! as a CUDA graph. Nothing in a step synchronises with the host.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaFunction, CudaGraph, CudaSlice, CudaStream, DriverError, LaunchArgs, LaunchConfig,
    PushKernelArg,
};

use super::abi::{DeviceSegment, GroupConfig, StepEntry, StepParams, StepState};
use super::arena::DeviceArena;
use super::masters::{DeviceMasters, WeightArgs};
use super::quantized::DeviceQuantized;
use super::runtime::{driver_error, CudaRuntime};
use crate::error::{Error, Result};
use crate::host::quantized_state::{QuantizedBuffer, QuantizedLayout};
use crate::layout::Layout;
use crate::plan::{cuda_chunk_elems, LaunchPlan};
use crate::rules::{Rule, StateInit};
use crate::step::{OptimizerOptions, QuantizedState};
use crate::DType;

pub(super) const BLOCK: u32 = 256;

/// How many steps ahead the device's lr ring reaches: a schedule on a GPU costs one
/// synchronisation per this many steps (see `optim::lr_window`).
pub(crate) const LR_RING_LEN: usize = 256;

/// A parameter set's arenas in device memory: the masters, the gradients, and the optional
/// low-precision model copy (the bf16 weights when the masters are not kept in fp32).
#[derive(Debug)]
pub(crate) struct DeviceArenas {
    pub masters: DeviceMasters,
    pub grads: DeviceArena,
    pub model: Option<DeviceArena>,
}

/// A parameter set on a CUDA device — the one place its device is recorded — and its
/// optimizer's engine once there is one.
#[derive(Debug)]
pub(crate) struct DeviceStorage {
    pub rt: Arc<CudaRuntime>,
    pub arenas: DeviceArenas,
    pub engine: Option<Box<CudaEngine>>,
}

// cudarc frees a device buffer without making its context current, so the fields of these are
// dropped with the context made current first: on a thread where another device's context is
// current, the free would fail (and poison the context's error state for its next call).
impl Drop for DeviceStorage {
    fn drop(&mut self) {
        let _ = self.rt.bind();
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        let _ = self.rt.bind();
    }
}

pub(crate) struct CudaEngine {
    pub(super) rt: Arc<CudaRuntime>,
    update: CudaFunction,
    pub(super) norm: CudaFunction,
    pub(super) advance: CudaFunction,
    /// A sharded group's norm: `partials_<dtype>` writes this window's chunk sums,
    /// `norm_of_partials` adds every window's, gathered into `gathered`.
    pub(super) partials_only: CudaFunction,
    pub(super) norm_of_partials: CudaFunction,
    pub(super) gathered: Option<CudaSlice<f64>>,
    /// The whole set's index of this arena's element 0 (a shard's window start).
    first: u64,
    pub(super) plan: LaunchPlan,
    segments: CudaSlice<DeviceSegment>,
    configs: CudaSlice<GroupConfig>,
    pub(super) step_state: CudaSlice<StepState>,
    /// The lr (and rule scalars) of each step, by its applied-step count modulo
    /// [`LR_RING_LEN`]: one lr everywhere after [`CudaEngine::set_lr`], the next steps' own after
    /// [`CudaEngine::write_lr_window`]. Device memory, so a replayed graph reads it too.
    lr_ring: CudaSlice<StepEntry>,
    lr_ring_len: u32,
    pub(super) partials: CudaSlice<f64>,
    pub(super) step_params: StepParams,
    pub(crate) state: Vec<DeviceArena>,
    /// The state when it is quantized (`state` is then empty).
    pub(crate) quantized: Option<DeviceQuantized>,
    graph: Option<CapturedGraph>,
}

/// A captured step. cudarc's graph holds raw CUDA handles and so is not `Send`.
struct CapturedGraph(CudaGraph);

impl CapturedGraph {
    /// Launches the graph on `stream` (the device's working stream, not the private stream it
    /// was captured on, so it is ordered with everything else on the device).
    fn launch(&self, stream: &CudaStream) -> std::result::Result<(), DriverError> {
        stream.context().bind_to_thread()?;
        // SAFETY: the executable graph is alive (owned by `self`) and belongs to this stream's
        // context; launching it only enqueues its recorded launches, whose buffers the engine
        // keeps alive as long as the graph.
        unsafe { cudarc::driver::result::graph::launch(self.0.cu_graph_exec(), stream.cu_stream()) }
    }
}

// SAFETY: moving the graph to another thread is sound: cudarc makes the context current on the
// calling thread before every launch, and the graph is launched only through `&mut CudaEngine`
// (`step`), so never from two threads at once.
unsafe impl Send for CapturedGraph {}
// SAFETY: a shared reference never touches the graph: it is launched (and replaced) only through
// `&mut CudaEngine`, so sharing `&CudaEngine` (inside a shared parameter set) across threads
// cannot use it concurrently.
unsafe impl Sync for CapturedGraph {}

fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

/// Pushes an arena's device pointer, whatever its dtype.
pub(super) fn push_arena<'a>(b: &mut LaunchArgs<'a>, a: &'a DeviceArena) {
    match a {
        DeviceArena::F32(s) => b.arg(s),
        DeviceArena::BF16(s) => b.arg(s),
        DeviceArena::F16(s) => b.arg(s),
    };
}

impl CudaEngine {
    /// Bytes of device memory its state buffers hold.
    pub(crate) fn state_bytes(&self) -> usize {
        let dense: usize = self
            .state
            .iter()
            .map(|a| a.len() * a.dtype().size_bytes())
            .sum();
        dense + self.quantized.as_ref().map_or(0, DeviceQuantized::bytes)
    }

    /// The quantized state copied to the host (synchronises the stream), if it is quantized.
    pub(crate) fn read_quantized(
        &self,
    ) -> Result<Option<(Arc<QuantizedLayout>, Vec<QuantizedBuffer>)>> {
        self.quantized
            .as_ref()
            .map(|q| {
                Ok((
                    q.layout.clone(),
                    q.download(&self.rt.stream, self.rt.device)?,
                ))
            })
            .transpose()
    }

    /// Overwrites the quantized state with host buffers of the same layout, in stream order.
    pub(crate) fn write_quantized(&mut self, buffers: &[QuantizedBuffer]) -> Result<()> {
        match &mut self.quantized {
            Some(q) => q.upload_from(&self.rt.stream, buffers, self.rt.device),
            None => Err(Error::Cuda(
                "this optimizer's state is not quantized".into(),
            )),
        }
    }

    pub(crate) fn new(
        rt: &Arc<CudaRuntime>,
        params: &DeviceArenas,
        layout: &Layout,
        rule: &Rule,
        options: &OptimizerOptions,
        lr: f64,
    ) -> Result<Self> {
        if let DeviceMasters::InShards(_) = params.masters {
            // A sharded replica's model side: its masters live in the shards, which step.
            return Err(Error::InvalidHyperparameter(
                "this parameter set is a sharded replica's model side (its masters are in the \
                 shards): build an optimizer over a set of its own"
                    .into(),
            ));
        }
        let rt = rt.clone();
        let dev = rt.device;
        let stream = &rt.stream;
        let update_module = match rule.generated_family() {
            Some(family) => rt.generated_module(&family)?,
            None => rt.module("update")?,
        };
        let norm_module = rt.module("norm")?;
        let grads = dtype_suffix(params.grads.dtype());
        let name = match options.quantized_state {
            QuantizedState::None => format!(
                "update_{}_{grads}_{}",
                rule.family(),
                dtype_suffix(options.state_dtype)
            ),
            QuantizedState::Block8 => format!("update_q8_{}_{grads}", rule.family()),
            QuantizedState::Block4 => format!("update_q4_{}_{grads}", rule.family()),
        };
        let update = rt.function(&update_module, &name)?;
        let norm = rt.function(
            &norm_module,
            &format!("norm_{}", dtype_suffix(params.grads.dtype())),
        )?;
        let advance = rt.function(&norm_module, "advance_step")?;
        let partials_only = rt.function(
            &norm_module,
            &format!("partials_{}", dtype_suffix(params.grads.dtype())),
        )?;
        let norm_of_partials = rt.function(&norm_module, "norm_of_partials")?;

        // Chunks sized by the whole set, so that a shard's chunks are the unsharded step's.
        let chunk = cuda_chunk_elems(layout.whole_arena_len(), rt.sm_count);
        let plan = LaunchPlan::new(layout, chunk);
        let segments: Vec<DeviceSegment> = plan.segments().iter().map(Into::into).collect();
        let configs: Vec<GroupConfig> = layout
            .groups()
            .iter()
            .map(|g| GroupConfig::new(rule, &g.options))
            .collect();
        let initial = StepState::initial(options);
        let bytes = |n: usize, size: usize| n.saturating_mul(size);
        let err = |n| driver_error(dev, n);
        let quantized = match options.quantized_state {
            QuantizedState::None => None,
            format => {
                let q = Arc::new(QuantizedLayout::new(layout, &plan, format));
                let host = rule
                    .state_names()
                    .iter()
                    .map(|n| QuantizedBuffer::new(&q, rule, n, layout.arena_len()))
                    .collect::<Result<Vec<_>>>()?;
                Some(DeviceQuantized::new(stream, q, &host, dev)?)
            }
        };
        let dense_names = match quantized {
            Some(_) => &[][..],
            None => rule.state_names(),
        };
        let state = dense_names
            .iter()
            .map(|n| {
                let value = match rule.state_init(n) {
                    StateInit::Value(v) => v,
                    StateInit::Params => 0.0,
                };
                let mut a = DeviceArena::filled(
                    stream,
                    options.state_dtype,
                    layout.arena_len(),
                    value,
                    dev,
                )?;
                if rule.state_init(n) == StateInit::Params {
                    let masters = params.read_masters(stream, 0..layout.arena_len(), dev)?;
                    a.write(stream, 0, &masters, dev)?;
                }
                Ok(a)
            })
            .collect::<Result<Vec<_>>>()?;
        // `clone_htod` of an empty slice is a zero-length allocation, which CUDA refuses: keep
        // one element in every table.
        let segments_dev = stream
            .clone_htod(&nonempty(segments))
            .map_err(err(bytes(plan.segments().len(), 16)))?;
        let configs_dev = stream.clone_htod(&configs).map_err(err(0))?;
        let step_state = stream.clone_htod(&[initial]).map_err(err(0))?;
        let lr_ring = stream
            .clone_htod(&[constant_lr(lr); LR_RING_LEN])
            .map_err(err(bytes(LR_RING_LEN, 40)))?;
        let partials = stream
            .alloc_zeros::<f64>(plan.num_chunks().max(1))
            .map_err(err(bytes(plan.num_chunks(), 8)))?;
        Ok(CudaEngine {
            step_params: StepParams::new(options),
            rt,
            update,
            norm,
            advance,
            partials_only,
            norm_of_partials,
            gathered: None,
            first: layout.base() as u64,
            plan,
            segments: segments_dev,
            configs: configs_dev,
            step_state,
            lr_ring,
            lr_ring_len: LR_RING_LEN as u32,
            partials,
            state,
            quantized,
            graph: None,
        })
    }

    pub fn plan(&self) -> &LaunchPlan {
        &self.plan
    }

    /// Sets the lr of every later step, in stream order (a replayed graph reads it too). A copy
    /// from pageable memory: staged by the driver, so nothing waits for the device.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.write_lr_ring(&[constant_lr(lr); LR_RING_LEN])
    }

    /// Gives the step that applies at count `anchor + i` the entry `entries[i]` (at most
    /// [`LR_RING_LEN`] of them), in stream order. Slots no step may read hold NaN, so that a read
    /// outside the window shows.
    pub fn write_lr_window(&mut self, anchor: u64, entries: &[StepEntry]) -> Result<()> {
        let unread = StepEntry {
            lr: f64::NAN,
            momentum: f64::NAN,
            scalars: [f64::NAN; 3],
        };
        let mut ring = [unread; LR_RING_LEN];
        for (count, e) in (anchor..).zip(entries.iter().take(LR_RING_LEN)) {
            ring[(count % LR_RING_LEN as u64) as usize] = *e;
        }
        self.write_lr_ring(&ring)
    }

    fn write_lr_ring(&mut self, ring: &[StepEntry; LR_RING_LEN]) -> Result<()> {
        self.rt
            .stream
            .memcpy_htod(ring, &mut self.lr_ring)
            .map_err(driver_error(self.rt.device, 0))
    }

    /// Enqueues one step (or replays the captured graph).
    pub(crate) fn step(&mut self, p: &mut DeviceArenas) -> Result<()> {
        match &self.graph {
            Some(graph) => graph
                .launch(&self.rt.stream)
                .map_err(driver_error(self.rt.device, 0)),
            None => {
                let stream = self.rt.stream.clone();
                self.enqueue(p, &stream)
            }
        }
    }

    /// Captures the whole step (norm pass + update) as a CUDA graph; later steps replay it.
    /// Capture belongs to a stream, and the device's working stream is shared by every parameter
    /// set on the device (and every thread using them): their work must not end up in this graph,
    /// nor their synchronisations break the capture. So the step is captured on a private stream.
    pub(crate) fn capture(&mut self, p: &mut DeviceArenas) -> Result<()> {
        let dev = self.rt.device;
        self.graph = None;
        let private = self.rt.ctx.new_stream().map_err(driver_error(dev, 0))?;
        private
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_error(dev, 0))?;
        let enqueued = self.enqueue(p, &private);
        let graph = private
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .map_err(driver_error(dev, 0))?;
        enqueued?;
        let graph = graph.ok_or_else(|| Error::Cuda("graph capture produced no graph".into()))?;
        self.graph = Some(CapturedGraph(graph));
        Ok(())
    }

    /// Enqueues the norm pass and the update on `stream`.
    fn enqueue(&mut self, p: &mut DeviceArenas, stream: &Arc<CudaStream>) -> Result<()> {
        self.enqueue_norm(p, stream)?;
        self.enqueue_update(p, stream)
    }

    /// Enqueues the fused update on `stream` (after the step was decided).
    pub(super) fn enqueue_update(
        &mut self,
        p: &mut DeviceArenas,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let dev = self.rt.device;
        let null = 0u64;
        let weights = WeightArgs::of(p, self.first)?;
        if let Some(q) = self.quantized.as_mut() {
            let pieces = q.num_pieces() as u32;
            if pieces == 0 {
                return Ok(());
            }
            let mut b = stream.launch_builder(&self.update);
            b.arg(&q.pieces)
                .arg(&self.configs)
                .arg(&self.step_state)
                .arg(&self.lr_ring)
                .arg(&self.lr_ring_len);
            weights.push_masters(&mut b, &null);
            push_arena(&mut b, &p.grads);
            let mut buffers = q.buffers.iter_mut();
            for _ in 0..3 {
                match buffers.next() {
                    Some(d) => {
                        b.arg(&mut d.codes)
                            .arg(&mut d.scales)
                            .arg(&mut d.full)
                            .arg(&d.table);
                    }
                    None => {
                        b.arg(&null).arg(&null).arg(&null).arg(&null);
                    }
                }
            }
            weights.push_rest(&mut b, &null);
            let cfg = LaunchConfig {
                grid_dim: (pieces, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `update_q<bits>_<rule>_<grad>` in kernels/update.cuh,
            // chosen in `new` from this rule, gradient dtype and code width: piece table, group
            // configs, step state, lr ring and its length, fp32 masters or null, gradients, then
            // for each of three slots its codes, block scales, f32 part and code table (null
            // pointers for slots the rule does not use, which the kernel never touches), then
            // the weights' model arena, remainders, seed, first index and kind (`WeightArgs`). Every piece lies
            // inside the arenas; coded pieces are whole blocks (the layout aligns coded tensors)
            // and f32 pieces index the f32 part within its length (the same layout built the part).
            // The kind names exactly the weight buffers passed non-null.
            return unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(driver_error(dev, 0));
        }
        let segments = self.plan.segments().len() as u32;
        if segments == 0 {
            return Ok(());
        }
        let mut b = stream.launch_builder(&self.update);
        b.arg(&self.segments)
            .arg(&self.configs)
            .arg(&self.step_state)
            .arg(&self.lr_ring)
            .arg(&self.lr_ring_len);
        weights.push_masters(&mut b, &null);
        push_arena(&mut b, &p.grads);
        for slot in 0..3 {
            match self.state.get(slot) {
                Some(a) => push_arena(&mut b, a),
                None => {
                    b.arg(&null);
                }
            }
        }
        weights.push_rest(&mut b, &null);
        let cfg = LaunchConfig {
            grid_dim: (segments, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `update_<rule>_<grad>_<state>` in kernels/update.cu, chosen
        // in `new` from this rule and these dtypes: segment table, group configs, step state, lr
        // ring and its length, fp32 masters or null, gradients, the rule's state buffers in slot
        // order (null pointers for slots the rule does not use, which the kernel never touches),
        // then the weights' model arena, remainders, seed, first index and kind (`WeightArgs`; the kind names
        // exactly the weight buffers passed non-null). Every segment lies inside the arenas, which
        // all have the layout's length.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(driver_error(dev, 0))
    }

    /// Reads the step state back (synchronises the stream).
    pub fn read_state(&self) -> Result<StepState> {
        let v = self
            .rt
            .stream
            .clone_dtoh(&self.step_state)
            .map_err(driver_error(self.rt.device, 0))?;
        v.into_iter()
            .next()
            .ok_or_else(|| Error::Cuda("empty step state".into()))
    }

    /// Overwrites the step state (checkpoint restore), in stream order.
    pub fn write_state(&mut self, state: StepState) -> Result<()> {
        self.rt
            .stream
            .memcpy_htod(&[state], &mut self.step_state)
            .map_err(driver_error(self.rt.device, 0))
    }
}

impl std::fmt::Debug for CudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaEngine")
            .field("device", &self.rt.device)
            .field("segments", &self.plan.segments().len())
            .field("chunk_elems", &self.plan.chunk_elems())
            .field("graph", &self.graph.is_some())
            .finish()
    }
}

/// A ring entry with `lr` and no rule scalars.
fn constant_lr(lr: f64) -> StepEntry {
    StepEntry {
        lr,
        momentum: f64::NAN,
        scalars: [0.0; 3],
    }
}

fn nonempty(mut v: Vec<DeviceSegment>) -> Vec<DeviceSegment> {
    if v.is_empty() {
        v.push(DeviceSegment::default());
    }
    v
}
