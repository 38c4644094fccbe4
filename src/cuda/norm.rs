//! The launches of kernels/norm.cu: the norm pass of a step, a sharded group's two halves of it
//! (this window's partials; every window's, added), and the decider's test cases.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::abi::{StepParams, StepState};
use super::arena::{DeviceArena, DeviceBuffer};
use super::engine::{push_arena, CudaEngine, DeviceArenas, BLOCK};
use super::runtime::{driver_error, CudaRuntime};
use crate::error::{Error, Result};
use crate::DType;

impl CudaEngine {
    /// Enqueues the norm pass on `stream`: every chunk's partial, and the last block to finish
    /// adds them and decides the step (or, when the step needs no norm, just decides it).
    pub(super) fn enqueue_norm(
        &mut self,
        p: &DeviceArenas,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let dev = self.rt.device;
        let len = self.plan.num_chunks() as u64 * self.plan.chunk_elems() as u64;
        let arena_len = match &p.grads {
            DeviceArena::F32(s) => s.len(),
            DeviceArena::BF16(s) => s.len(),
            DeviceArena::F16(s) => s.len(),
        } as u64;
        debug_assert!(arena_len <= len);
        if self.step_params.needs_norm() && self.plan.num_chunks() > 0 {
            let chunk = self.plan.chunk_elems() as u32;
            let mut b = stream.launch_builder(&self.norm);
            push_arena(&mut b, &p.grads);
            b.arg(&arena_len)
                .arg(&chunk)
                .arg(&mut self.partials)
                .arg(&mut self.step_state)
                .arg(&self.step_params);
            let cfg = LaunchConfig {
                grid_dim: (self.plan.num_chunks() as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `norm_<dtype>` in kernels/norm.cu in order and type:
            // the gradient arena of the dtype named by this kernel, its length, the chunk size,
            // `num_chunks` f64 partials, the step state and the norm parameters by value.
            unsafe { b.launch(cfg) }.map_err(driver_error(dev, 0))?;
        } else {
            self.enqueue_advance(stream)?;
        }
        Ok(())
    }

    /// A sharded step, first half: enqueues the partials of this window's chunks and lends them
    /// with a buffer for every rank's (`world` windows, in rank order), for an all-gather.
    /// `None` when the step needs no norm.
    pub(crate) fn shard_partials(
        &mut self,
        p: &DeviceArenas,
        world: usize,
    ) -> Result<Option<(DeviceBuffer<'_>, DeviceBuffer<'_>)>> {
        if !self.step_params.needs_norm() {
            return Ok(None);
        }
        let (dev, stream) = (self.rt.device, self.rt.stream.clone());
        let n = self.plan.num_chunks();
        if n > 0 {
            let mut b = stream.launch_builder(&self.partials_only);
            push_arena(&mut b, &p.grads);
            let (len, chunk) = (p.grads.len() as u64, self.plan.chunk_elems() as u32);
            b.arg(&len).arg(&chunk).arg(&mut self.partials);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `partials_<dtype>` in kernels/norm.cu: the gradient arena of the
            // kernel's dtype, its length, the chunk size and `num_chunks` f64 partials.
            unsafe { b.launch(cfg) }.map_err(driver_error(dev, 0))?;
        }
        let want = world.saturating_mul(n).max(1);
        if self.gathered.as_ref().map(CudaSlice::len) != Some(want) {
            self.gathered = Some(
                stream
                    .alloc_zeros::<f64>(want)
                    .map_err(driver_error(dev, want * 8))?,
            );
        }
        let Some(gathered) = self.gathered.as_mut() else {
            return Err(Error::Cuda(
                "internal: no buffer for the gathered partials".into(),
            ));
        };
        // f64 partials travel as pairs of f32 words: the all-gather copies their bits.
        let rt = &self.rt;
        let mine = DeviceBuffer::over(&mut self.partials, DType::F32, rt).first(2 * n);
        let all = DeviceBuffer::over(gathered, DType::F32, rt);
        Ok(Some((mine, all)))
    }

    /// A sharded step, second half: decides the step from the partials every rank gathered (or,
    /// when the step needs no norm, without), then enqueues the window's update.
    pub(crate) fn step_gathered(&mut self, p: &mut DeviceArenas) -> Result<()> {
        let (dev, stream) = (self.rt.device, self.rt.stream.clone());
        match (self.step_params.needs_norm(), &self.gathered) {
            (true, Some(gathered)) => {
                let n = gathered.len() as u32;
                let mut b = stream.launch_builder(&self.norm_of_partials);
                b.arg(gathered)
                    .arg(&n)
                    .arg(&mut self.step_state)
                    .arg(&self.step_params);
                let cfg = LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches `norm_of_partials(const double*, unsigned, StepState*,
                // StepParams)` in kernels/norm.cu; `gathered` holds `n` partials.
                unsafe { b.launch(cfg) }.map_err(driver_error(dev, 0))?;
            }
            (true, None) => {
                return Err(Error::Cuda(
                    "internal: a sharded step's partials were not gathered".into(),
                ))
            }
            (false, _) => self.enqueue_advance(&stream)?,
        }
        self.enqueue_update(p, &stream)
    }

    pub(super) fn enqueue_advance(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        let mut b = stream.launch_builder(&self.advance);
        b.arg(&mut self.step_state).arg(&self.step_params);
        // SAFETY: matches `advance_step(StepState*, StepParams)` in kernels/norm.cu.
        unsafe { b.launch(LaunchConfig::for_num_elems(1)) }
            .map_err(driver_error(self.rt.device, 0))?;
        Ok(())
    }
}

/// `decide_step` (src/step/decide.cuh) on every case, one thread each, on device `ordinal`: the
/// device half of the test that compares the two deciders.
pub(crate) fn decide_cases(
    ordinal: usize,
    cases: &[(StepState, StepParams, f64, bool)],
) -> Result<Vec<StepState>> {
    let rt = CudaRuntime::shared(ordinal)?;
    let (dev, stream) = (rt.device, &rt.stream);
    let err = |n| driver_error(dev, n);
    let module = rt.module("norm")?;
    let kernel = rt.function(&module, "decide_cases")?;
    let mut out = Vec::with_capacity(cases.len());
    for batch in cases.chunks(BLOCK as usize) {
        let states: Vec<StepState> = batch.iter().map(|c| c.0).collect();
        let params: Vec<StepParams> = batch.iter().map(|c| c.1).collect();
        let sums: Vec<f64> = batch.iter().map(|c| c.2).collect();
        let have: Vec<i32> = batch.iter().map(|c| c.3 as i32).collect();
        let mut states_dev = stream.clone_htod(&states).map_err(err(0))?;
        let params_dev = stream.clone_htod(&params).map_err(err(0))?;
        let sums_dev = stream.clone_htod(&sums).map_err(err(0))?;
        let have_dev = stream.clone_htod(&have).map_err(err(0))?;
        let n = batch.len() as i32;
        let mut b = stream.launch_builder(&kernel);
        b.arg(&mut states_dev)
            .arg(&params_dev)
            .arg(&sums_dev)
            .arg(&have_dev)
            .arg(&n);
        // SAFETY: matches `decide_cases(StepState*, const StepParams*, const double*, const int*,
        // int)` in kernels/norm.cu; every array holds `n` elements, one per thread used.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(err(0))?;
        out.extend(stream.clone_dtoh(&states_dev).map_err(err(0))?);
    }
    Ok(out)
}
