//! The host backend: a parameter set's arenas in host memory and, once an optimizer is built on
//! them, what the CPU engine keeps for it — state buffers, launch plan, and the same
//! [`StepState`] the CUDA engine keeps in device memory, decided by the same rules
//! ([`crate::step`]). The kernels, chunked loops over rayon's pool, are `kernels.rs`.

pub(crate) mod kernels;
mod quantized;
pub(crate) mod quantized_state;
pub(crate) mod state;
mod weights;

use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::masters::HostMasters;
use crate::plan::{LaunchPlan, CPU_CHUNK_ELEMS};
use crate::rules::{Coefficients, Rule, StepContext, StepMemo};
use crate::step::{decide, OptimizerOptions, StepParams, StepState, MAX_STEP, POLICY_ERROR};
use kernels::CpuEngine;
use state::StateBuffers;
use weights::Weights;

/// A parameter set's arenas in host memory: the masters, the gradients, and the optional
/// low-precision model copy (the bf16 weights when the masters are not kept in fp32).
#[derive(Clone, Debug)]
pub(crate) struct HostArenas {
    pub masters: HostMasters,
    pub grads: Arena,
    pub model: Option<Arena>,
}

impl HostArenas {
    /// A sharded group's window `range`: its masters and model copy, and zero gradients.
    pub(crate) fn window(&self, range: std::ops::Range<usize>) -> Result<Self> {
        Ok(HostArenas {
            masters: self.masters.window(range.clone())?,
            grads: Arena::filled(self.grads.dtype(), range.len(), 0.0)?,
            model: self.model.as_ref().map(|m| m.window(range)).transpose()?,
        })
    }

    /// A sharded replica's whole model: padded to `len`, and without fp32 masters when there is
    /// a low-precision model copy (the shards keep them).
    pub(crate) fn make_model_side(&mut self, len: usize) -> Result<()> {
        self.grads.pad_to(len)?;
        match &mut self.model {
            Some(m) => {
                m.pad_to(len)?;
                self.masters = HostMasters::InShards(self.masters.kind());
                Ok(())
            }
            None => self.masters.pad_to(len),
        }
    }
}

/// A parameter set in host memory, and its optimizer's engine once there is one.
#[derive(Debug)]
pub(crate) struct HostStorage {
    pub arenas: HostArenas,
    pub engine: Option<Box<HostEngine>>,
}

/// What the CPU engine keeps for one optimizer.
#[derive(Debug)]
pub(crate) struct HostEngine {
    kernels: CpuEngine,
    pub state: StateBuffers,
    coeffs: Vec<Coefficients>,
    pub step_state: StepState,
    step_params: StepParams,
    /// What the rule's step scalars carry from step to step (saved in checkpoints).
    pub memo: StepMemo,
}

impl HostEngine {
    /// The engine for `rule` over the arenas whose fp32 masters are `masters`.
    pub(crate) fn new(
        layout: &Layout,
        rule: &Rule,
        options: &OptimizerOptions,
        masters: &[f32],
    ) -> Result<Self> {
        let plan = LaunchPlan::new(layout, CPU_CHUNK_ELEMS);
        let state = StateBuffers::new(layout, &plan, rule, options, masters)?;
        Ok(HostEngine {
            kernels: CpuEngine::new(plan),
            state,
            coeffs: Vec::with_capacity(layout.groups().len()),
            step_state: StepState::initial(options),
            step_params: StepParams::new(options),
            memo: StepMemo::default(),
        })
    }

    pub(crate) fn plan(&self) -> &LaunchPlan {
        self.kernels.plan()
    }

    /// Whether a step needs Σ g² (clipping, or a non-finite check).
    pub(crate) fn needs_norm(&self) -> bool {
        self.step_params.needs_norm()
    }

    /// Σ g² of each chunk of the plan, in chunk order (the norm is their sum, in that order).
    pub(crate) fn chunk_sums_of_squares(&mut self, a: &HostArenas) -> Vec<f64> {
        self.kernels.sum_of_squares(&a.grads);
        self.kernels.partials().to_vec()
    }

    /// One step on the host; returns whether it was applied. `sum_sq` is Σ g² when the caller
    /// computed it (over every shard of a sharded group), else the step computes it.
    pub(crate) fn step(
        &mut self,
        a: &mut HostArenas,
        layout: &Layout,
        rule: &Rule,
        lr: f64,
        momentum: Option<f64>,
        sum_sq: Option<f64>,
    ) -> Result<bool> {
        let q = self.step_params;
        let needs_norm = q.needs_norm();
        let sum_sq = match sum_sq {
            _ if !needs_norm => 0.0,
            Some(s) => s,
            None => self.kernels.sum_of_squares(&a.grads),
        };
        // Decided on a copy: a refused step (NonFinitePolicy::Error, the step count at its
        // limit) must change nothing.
        let mut st = self.step_state;
        decide(&mut st, &q, sum_sq, needs_norm);
        if st.skip != 0 && q.policy == POLICY_ERROR {
            return Err(Error::NonFiniteGradient { norm: st.norm });
        }
        if st.skip == 0 && st.step > MAX_STEP {
            return Err(Error::InvalidHyperparameter(
                "the step count is at its limit".into(),
            ));
        }
        if st.skip != 0 {
            self.step_state = st;
            return Ok(false);
        }
        let weights = Weights::of(
            &mut a.masters,
            a.model.as_mut(),
            st.step,
            layout.base() as u64,
        )?;
        self.step_state = st;
        let sign = if rule.maximize() { -1.0 } else { 1.0 };
        let scalars = if rule.needs_step_scalars() {
            rule.step_scalars(st.step, lr, &mut self.memo)
        } else {
            [0.0; 3]
        };
        self.coeffs.clear();
        for group in layout.groups() {
            let wd = rule.weight_decay();
            let ctx = StepContext {
                lr: lr * group.options.lr_scale,
                weight_decay: group
                    .options
                    .weight_decay
                    .map_or(wd, |l| wd.with_coefficient(l)),
                step: st.step,
                grad_scale: st.grad_scale * sign,
                scalars,
                momentum,
            };
            self.coeffs.push(rule.coefficients(&ctx));
        }
        match &mut self.state {
            StateBuffers::Dense(state) => {
                self.kernels.update(weights, &a.grads, state, &self.coeffs)
            }
            StateBuffers::Quantized { layout, buffers } => {
                quantized::update(layout, weights, &a.grads, buffers, &self.coeffs)
            }
        }
        Ok(true)
    }
}
