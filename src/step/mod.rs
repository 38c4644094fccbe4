//! The step decision: what a step settles before any parameter changes — the global norm,
//! whether non-finite gradients skip it, the clip factor, the loss scaler's update and the step
//! count. Written twice, side by side in this folder: `decide` in `decide.rs` for the CPU engine
//! and `decide_step` in `decide.cuh` for the GPU, line for line, over one [`StepState`] and one
//! [`StepParams`] whose layouts both sides assert. `tests/step_decision.rs` feeds random cases to
//! both and compares the bits.

mod clip;
mod decide;
mod options;

pub use clip::{ClipFormula, GlobalNormClip};
pub(crate) use decide::decide;
pub(crate) use options::check_loss_scale;
pub use options::{
    LossScale, NonFinitePolicy, OptimizerOptions, QuantizedState, StepReport, MAX_STEP,
};

/// `StepParams::clip`: which formula turns the norm into the clip factor (decide.cuh: the same).
pub(crate) const CLIP_NONE: i32 = 0;
pub(crate) const CLIP_PYTORCH: i32 = 1;
pub(crate) const CLIP_KERAS: i32 = 2;
pub(crate) const CLIP_OPTAX: i32 = 3;
/// `StepParams::policy`: what non-finite gradients do (decide.cuh: the same).
pub(crate) const POLICY_SKIP: i32 = 0;
pub(crate) const POLICY_PROPAGATE: i32 = 1;
pub(crate) const POLICY_ERROR: i32 = 2;

/// Everything that changes from step to step: kept in host memory by the CPU engine and in device
/// memory by the CUDA engine (so a step never waits for the host, and a captured graph replays
/// with new values). `decide_step` in decide.cuh reads and writes the same struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepState {
    /// Applied steps, including the one in flight once decided.
    pub step: u64,
    /// Gradients arrive multiplied by this.
    pub loss_scale: f64,
    /// Applied steps since the loss scale last changed.
    pub good_steps: u64,
    /// The pre-clip global L2 norm of the unscaled gradients.
    pub norm: f64,
    /// What every gradient is multiplied by: clip factor / loss scale.
    pub grad_scale: f64,
    pub clip_factor: f64,
    /// The scale this step's gradients were divided by.
    pub step_loss_scale: f64,
    /// Non-zero: this step leaves parameters and state untouched.
    pub skip: u32,
    /// The norm pass's block counter (device only; reset by its last block).
    pub done: u32,
    /// Non-zero: `norm` was computed by this step (it may be NaN).
    pub have_norm: u32,
    pub pad: u32,
}

/// The step-wide options as both deciders read them (passed to the device by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepParams {
    pub max_norm: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// `CLIP_*`.
    pub clip: i32,
    /// `POLICY_*`.
    pub policy: i32,
    /// 1: dynamic loss scaling.
    pub dynamic_scale: i32,
    pub pad: i32,
}

// The same numbers as the static_asserts in decide.cuh.
abi_layout!(StepState, 72, {
    step: 0, loss_scale: 8, good_steps: 16, norm: 24, grad_scale: 32, clip_factor: 40,
    step_loss_scale: 48, skip: 56, done: 60, have_norm: 64, pad: 68,
});
abi_layout!(StepParams, 48, {
    max_norm: 0, growth_factor: 8, backoff_factor: 16, growth_interval: 24, clip: 32,
    policy: 36, dynamic_scale: 40, pad: 44,
});

impl StepParams {
    /// Whether a step needs the gradients' norm: to clip, to detect non-finite values, or to let
    /// the dynamic loss scaler see an overflow.
    pub(crate) fn needs_norm(&self) -> bool {
        self.clip != CLIP_NONE || self.policy != POLICY_PROPAGATE || self.dynamic_scale != 0
    }

    pub(crate) fn new(o: &OptimizerOptions) -> Self {
        let mut q = StepParams {
            policy: match o.non_finite {
                NonFinitePolicy::Skip => POLICY_SKIP,
                NonFinitePolicy::Propagate => POLICY_PROPAGATE,
                NonFinitePolicy::Error => POLICY_ERROR,
            },
            ..Default::default()
        };
        if let Some(clip) = o.clip {
            q.max_norm = clip.max_norm;
            q.clip = match clip.formula {
                ClipFormula::PyTorch => CLIP_PYTORCH,
                ClipFormula::Keras => CLIP_KERAS,
                ClipFormula::Optax => CLIP_OPTAX,
            };
        }
        if let LossScale::Dynamic {
            growth_factor,
            backoff_factor,
            growth_interval,
            ..
        } = o.loss_scale
        {
            q.dynamic_scale = 1;
            q.growth_factor = growth_factor;
            q.backoff_factor = backoff_factor;
            q.growth_interval = growth_interval;
        }
        q
    }
}

impl StepState {
    /// The state before any step.
    pub(crate) fn initial(o: &OptimizerOptions) -> Self {
        let scale = o.loss_scale.initial();
        StepState {
            loss_scale: scale,
            step_loss_scale: scale,
            grad_scale: 1.0,
            clip_factor: 1.0,
            ..Default::default()
        }
    }

    /// What the last step did, as [`crate::Optimizer::report`] tells it.
    pub(crate) fn report(&self, lr: f64) -> StepReport {
        StepReport {
            step: self.step,
            lr,
            global_norm: (self.have_norm != 0).then_some(self.norm),
            clip_factor: self.clip_factor,
            skipped: self.skip != 0,
            loss_scale: self.step_loss_scale,
        }
    }
}

/// The clip factor of norm `n` under `q`'s formula (`clip_factor` in decide.cuh).
fn clip_factor(q: &StepParams, n: f64) -> f64 {
    let max = q.max_norm;
    match q.clip {
        CLIP_PYTORCH => {
            let c = max / (n + 1e-6);
            if c.is_nan() {
                c
            } else {
                c.min(1.0)
            }
        }
        // TensorFlow adds (n − n), which is NaN when n is not finite.
        CLIP_KERAS => max * (1.0 / n).min(1.0 / max) + if n.is_finite() { 0.0 } else { f64::NAN },
        CLIP_OPTAX => {
            if n < max {
                1.0
            } else {
                max / n
            }
        }
        _ => 1.0,
    }
}

/// Whether the step can divide by `s`: finite and positive, with a finite reciprocal, in f32
/// (`usable_loss_scale` in decide.cuh).
pub(crate) fn usable_loss_scale(s: f64) -> bool {
    s > 0.0 && (s as f32).is_finite() && ((1.0 / s) as f32).is_finite() && s as f32 > 0.0
}
