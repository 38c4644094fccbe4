//! The optimizer: a rule, its state, and the engine that runs the fused step.

pub mod config;
pub mod rules;

pub use config::{
    Adagrad, Adam, AdamEps, AmsGrad, EpsPlacement, Flavor, LrPlacement, MomentumInit, RmsProp,
    Rule, Sgd, WeightDecay,
};

use crate::arena::Arena;
use crate::clip::GlobalNormClip;
use crate::cuda::abi::StepState;
use crate::cuda::engine::CudaEngine;
use crate::engine::cpu::CpuEngine;
use crate::error::{Error, Result};
use crate::params::{ParamSet, Storage};
use crate::plan::{LaunchPlan, CPU_CHUNK_ELEMS};
use crate::schedule::LrSchedule;
use crate::{DType, Device};
use rules::{StepCoefficients, StepContext};

/// The largest step count an optimizer reaches or loads (exact in f64, so schedules and bias
/// corrections see it exactly).
pub const MAX_STEP: u64 = 1 << 53;

/// What a step does when the gradients hold NaN or ±∞ (detected in the norm pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NonFinitePolicy {
    /// Leave parameters, state and the step count untouched and report the skip.
    #[default]
    Skip,
    /// Compute what the framework computes (NaN/0 propagate through clipping and the update).
    Propagate,
    /// Return [`Error::NonFiniteGradient`]; nothing changes.
    Error,
}

/// Loss scaling for low-precision training: gradients arrive multiplied by the scale, and the step
/// divides it out on the fly (fused into the update, no extra pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LossScale {
    #[default]
    None,
    Static(f64),
    /// PyTorch `GradScaler`'s policy: a step with non-finite gradients is skipped and the scale
    /// multiplied by `backoff_factor`; after `growth_interval` applied steps in a row it is
    /// multiplied by `growth_factor`.
    Dynamic {
        init_scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u64,
    },
}

impl LossScale {
    /// `GradScaler`'s defaults: 2^16, ×2 every 2000 good steps, ×0.5 on overflow.
    pub fn dynamic() -> Self {
        LossScale::Dynamic {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }

    /// The scale before any step.
    pub(crate) fn initial(&self) -> f64 {
        match *self {
            LossScale::None => 1.0,
            LossScale::Static(s) => s,
            LossScale::Dynamic { init_scale, .. } => init_scale,
        }
    }
}

/// Step-wide options beside the rule.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerOptions {
    pub clip: Option<GlobalNormClip>,
    pub non_finite: NonFinitePolicy,
    /// Storage dtype of the optimizer state (moments): f32, or bf16 to halve its memory.
    pub state_dtype: DType,
    pub loss_scale: LossScale,
}

impl OptimizerOptions {
    /// Whether a step needs the gradients' norm: to clip, to detect non-finite values, or to let
    /// the dynamic loss scaler see an overflow.
    pub(crate) fn needs_norm(&self) -> bool {
        self.clip.is_some()
            || self.non_finite != NonFinitePolicy::Propagate
            || matches!(self.loss_scale, LossScale::Dynamic { .. })
    }
}

impl Default for OptimizerOptions {
    fn default() -> Self {
        OptimizerOptions {
            clip: None,
            non_finite: NonFinitePolicy::Skip,
            state_dtype: DType::F32,
            loss_scale: LossScale::None,
        }
    }
}

/// What one call of [`Optimizer::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The step count after this call (unchanged when skipped).
    pub step: u64,
    /// The learning rate used (before group scales).
    pub lr: f64,
    /// The pre-clip global L2 norm of the gradients, when it was computed (clipping on, or a
    /// non-finite policy other than `Propagate`).
    pub global_norm: Option<f64>,
    /// The factor the gradients were multiplied by (1 without clipping).
    pub clip_factor: f64,
    pub skipped: bool,
    /// The loss scale the gradients of this step were divided by (1 without loss scaling).
    pub loss_scale: f64,
}

/// The scalar part of an optimizer, as checkpoints record it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Saved {
    pub rule: Rule,
    pub options: OptimizerOptions,
    pub lr: f64,
    pub step: u64,
    pub loss_scale: f64,
    pub good_steps: u64,
}

impl OptimizerOptions {
    /// Refuses options that would corrupt every step, as the constructor does.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidHyperparameter(m));
        if let Some(clip) = self.clip {
            if !(clip.max_norm > 0.0 && (clip.max_norm as f32).is_finite()) {
                return bad(format!(
                    "clip max_norm must be finite and > 0, got {}",
                    clip.max_norm
                ));
            }
        }
        if self.state_dtype == DType::F16 {
            return bad(
                "optimizer state is f32 or bf16 (f16's range is too narrow for second moments)"
                    .into(),
            );
        }
        match self.loss_scale {
            LossScale::None => Ok(()),
            LossScale::Static(s) => check_loss_scale("loss scale", s),
            LossScale::Dynamic {
                init_scale,
                growth_factor,
                backoff_factor,
                growth_interval,
            } => {
                check_loss_scale("init_scale", init_scale)?;
                let growth_ok = growth_factor >= 1.0 && (growth_factor as f32).is_finite();
                let backoff_ok = backoff_factor > 0.0 && backoff_factor < 1.0;
                if !growth_ok || !backoff_ok || growth_interval == 0 {
                    bad(format!(
                        "dynamic loss scale needs a finite growth >= 1, backoff in (0, 1) and \
                         interval > 0, got {growth_factor}, {backoff_factor}, {growth_interval}"
                    ))
                } else if self.non_finite != NonFinitePolicy::Skip {
                    bad(
                        "dynamic loss scaling skips overflowing steps: use NonFinitePolicy::Skip"
                            .into(),
                    )
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Whether the step can divide by `s`: finite and positive, with a finite reciprocal, in f32.
/// (kernels/norm.cu tests the same before a dynamic scale grows or backs off.)
pub(crate) fn usable_loss_scale(s: f64) -> bool {
    s > 0.0 && (s as f32).is_finite() && ((1.0 / s) as f32).is_finite() && s as f32 > 0.0
}

/// A loss scale the step can divide by (see [`usable_loss_scale`]), or a typed error.
pub(crate) fn check_loss_scale(what: &str, s: f64) -> Result<()> {
    if usable_loss_scale(s) {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter(format!(
            "{what} must be positive with a finite reciprocal in f32, got {s}"
        )))
    }
}

/// Checks that `lr`, scaled by every group's lr scale, is one the f32 step can use.
pub(crate) fn check_lr(layout: &crate::params::Layout, lr: f64) -> Result<()> {
    config::check_nonneg("lr", lr)?;
    for g in layout.groups() {
        let scaled = lr * g.options.lr_scale;
        if !(scaled as f32).is_finite() {
            return Err(Error::InvalidHyperparameter(format!(
                "lr {lr} × lr_scale {} of group '{}' overflows f32",
                g.options.lr_scale, g.name
            )));
        }
    }
    Ok(())
}

/// A CUDA engine always sits beside device storage; this is the error if that invariant broke.
fn no_device_storage() -> Error {
    Error::Cuda("CUDA engine without device storage".into())
}

/// The CPU engine with the state and bookkeeping a CPU step keeps on the host.
#[derive(Debug)]
struct CpuSteps {
    engine: CpuEngine,
    state: Vec<Arena>,
    coeffs: Vec<StepCoefficients>,
    step: u64,
    /// Current loss scale and the applied steps since it last changed (dynamic scaling).
    loss_scale: f64,
    good_steps: u64,
    report: StepReport,
}

/// Where a step runs.
#[derive(Debug)]
enum Engine {
    Cpu(CpuSteps),
    Cuda(Box<CudaEngine>),
}

/// Runs one update rule over every tensor of a parameter set as one fused step, on the device the
/// parameter set lives on.
#[derive(Debug)]
pub struct Optimizer {
    params: ParamSet,
    rule: Rule,
    options: OptimizerOptions,
    lr: f64,
    engine: Engine,
    schedule: Option<Box<dyn LrSchedule>>,
}

impl Clone for Box<dyn LrSchedule> {
    fn clone(&self) -> Self {
        self.boxed_clone()
    }
}

impl Rule {
    fn maximize(&self) -> bool {
        match self {
            Rule::Sgd(r) => r.maximize,
            Rule::Adam(r) => r.maximize,
            Rule::RmsProp(r) => r.maximize,
            Rule::Adagrad(r) => r.maximize,
        }
    }
}

impl Optimizer {
    /// An optimizer with default options (no clipping, non-finite steps skipped).
    pub fn new(params: ParamSet, rule: impl Into<Rule>) -> Result<Self> {
        Self::with_options(params, rule, OptimizerOptions::default())
    }

    pub fn with_options(
        mut params: ParamSet,
        rule: impl Into<Rule>,
        options: OptimizerOptions,
    ) -> Result<Self> {
        let rule = rule.into();
        rule.validate()?;
        options.validate()?;
        let lr = rule.lr();
        check_lr(params.layout(), lr)?;
        let layout = params.layout().clone();
        let engine = match params.storage_mut() {
            Storage::Host { .. } => {
                let len = layout.arena_len();
                let state = rule
                    .state_names()
                    .iter()
                    .map(|n| Arena::filled(options.state_dtype, len, rule.state_initial_value(n)))
                    .collect::<Result<Vec<_>>>()?;
                let loss_scale = options.loss_scale.initial();
                Engine::Cpu(CpuSteps {
                    engine: CpuEngine::new(LaunchPlan::new(&layout, CPU_CHUNK_ELEMS)),
                    state,
                    coeffs: Vec::with_capacity(layout.groups().len()),
                    step: 0,
                    loss_scale,
                    good_steps: 0,
                    report: StepReport {
                        step: 0,
                        lr,
                        global_norm: None,
                        clip_factor: 1.0,
                        skipped: false,
                        loss_scale,
                    },
                })
            }
            Storage::Cuda(d) => {
                Engine::Cuda(Box::new(CudaEngine::new(d, &layout, &rule, &options, lr)?))
            }
        };
        Ok(Optimizer {
            lr,
            params,
            rule,
            options,
            engine,
            schedule: None,
        })
    }

    /// One fused step over all tensors: norm pass (when needed), then the update with clipping,
    /// loss-scale unscaling, weight decay and the rule applied element by element. On a GPU this
    /// only enqueues work: nothing waits for the device (except with [`NonFinitePolicy::Error`],
    /// which must read the verdict back); [`Optimizer::report`] reads the outcome when asked.
    pub fn step(&mut self) -> Result<()> {
        self.apply_schedule()?;
        self.step_at_current_lr()
    }

    /// [`Optimizer::step`] with the lr already set from the schedule ([`Self::apply_schedule`]).
    pub(crate) fn step_at_current_lr(&mut self) -> Result<()> {
        let applied = match &mut self.engine {
            Engine::Cpu(cpu) => cpu.step(&mut self.params, &self.rule, &self.options, self.lr)?,
            Engine::Cuda(engine) => {
                let Storage::Cuda(d) = self.params.storage_mut() else {
                    return Err(no_device_storage());
                };
                engine.step(d)?;
                if self.options.non_finite == NonFinitePolicy::Error {
                    let st = engine.read_state()?;
                    if st.skip != 0 {
                        return Err(Error::NonFiniteGradient { norm: st.norm });
                    }
                }
                // The host cannot know about a skip without synchronising: on a GPU an attached
                // schedule ticks on every call.
                true
            }
        };
        if applied {
            if let Some(s) = &mut self.schedule {
                s.step();
            }
        }
        Ok(())
    }

    /// Captures the whole step (norm pass + update) as a CUDA graph; every later
    /// [`Optimizer::step`] replays it, reading the current lr, step count and loss scale from
    /// device memory. CUDA only.
    pub fn capture_graph(&mut self) -> Result<()> {
        match (&mut self.engine, self.params.storage_mut()) {
            (Engine::Cuda(engine), Storage::Cuda(d)) => engine.capture(d),
            _ => Err(Error::NeedsGpu("a CUDA graph")),
        }
    }

    /// Waits until every queued step has finished on the device (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self.params.storage() {
            Storage::Host { .. } => Ok(()),
            Storage::Cuda(d) => {
                d.rt.stream
                    .synchronize()
                    .map_err(crate::cuda::runtime::driver_error(d.rt.device, 0))
            }
        }
    }

    /// What the last step did (the initial state before any). On a GPU this reads device memory
    /// and so waits for the queued work.
    pub fn report(&self) -> Result<StepReport> {
        match &self.engine {
            Engine::Cpu(cpu) => Ok(cpu.report),
            Engine::Cuda(engine) => {
                let st = engine.read_state()?;
                Ok(StepReport {
                    step: st.step,
                    lr: self.lr,
                    global_norm: (st.have_norm != 0).then_some(st.norm),
                    clip_factor: st.clip_factor,
                    skipped: st.skip != 0,
                    loss_scale: st.step_loss_scale,
                })
            }
        }
    }

    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// Parameters and gradients, for the training loop to write gradients into.
    pub fn params_mut(&mut self) -> &mut ParamSet {
        &mut self.params
    }

    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    pub fn options(&self) -> &OptimizerOptions {
        &self.options
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate for the next steps; a scalar write (to device memory on a GPU, in
    /// stream order), nothing is rebuilt and a captured graph stays valid.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(self.params.layout(), lr)?;
        if let Engine::Cuda(engine) = &mut self.engine {
            engine.set_lr(lr)?;
        }
        self.lr = lr;
        Ok(())
    }

    /// Lets `schedule` set the lr of every step; it ticks once per applied step (skipped steps do
    /// not advance it, as Keras' and Optax's iteration counts do not; on a GPU it ticks on every
    /// call). PyTorch-style per-epoch schedulers are better ticked by the caller with
    /// [`Optimizer::set_lr`].
    ///
    /// A schedule whose tables leave some step without an lr, or whose first lr the step cannot
    /// use, is refused and the optimizer keeps what it had.
    pub fn set_schedule(&mut self, schedule: Option<Box<dyn LrSchedule>>) -> Result<()> {
        if let Some(s) = &schedule {
            s.validate()?;
            check_lr(self.params.layout(), s.lr())?;
        }
        self.schedule = schedule;
        Ok(())
    }

    /// Steps applied so far (skipped steps do not count). Reads device memory on a GPU.
    pub fn step_count(&self) -> Result<u64> {
        Ok(self.saved()?.step)
    }

    /// The loss scale the next step divides gradients by. Reads device memory on a GPU.
    pub fn loss_scale(&self) -> Result<f64> {
        Ok(self.saved()?.loss_scale)
    }

    /// Names of the state buffers this optimizer keeps.
    pub fn state_names(&self) -> &'static [&'static str] {
        self.rule.state_names()
    }

    /// One tensor's part of a state buffer, widened to f32 and copied out.
    pub fn state(&self, buffer: &str, tensor: &str) -> Result<Vec<f32>> {
        let slot = self.state_slot(buffer)?;
        let r = self.params.layout().tensor(tensor)?.range();
        match &self.engine {
            Engine::Cpu(cpu) => Ok(cpu.state[slot].to_f32(r)),
            Engine::Cuda(engine) => {
                let Storage::Cuda(d) = self.params.storage() else {
                    return Err(no_device_storage());
                };
                engine.state[slot].read(&d.rt.stream, r, self.device())
            }
        }
    }

    pub fn device(&self) -> Device {
        self.params.device()
    }

    pub fn plan(&self) -> &LaunchPlan {
        match &self.engine {
            Engine::Cpu(cpu) => cpu.engine.plan(),
            Engine::Cuda(engine) => engine.plan(),
        }
    }

    fn state_slot(&self, buffer: &str) -> Result<usize> {
        self.rule
            .state_names()
            .iter()
            .position(|n| *n == buffer)
            .ok_or_else(|| Error::UnknownTensor(format!("state buffer '{buffer}'")))
    }

    /// The scalar part of the optimizer that a checkpoint records.
    pub(crate) fn saved(&self) -> Result<Saved> {
        let (step, loss_scale, good_steps) = match &self.engine {
            Engine::Cpu(cpu) => (cpu.step, cpu.loss_scale, cpu.good_steps),
            Engine::Cuda(engine) => {
                let st = engine.read_state()?;
                (st.step, st.loss_scale, st.good_steps)
            }
        };
        Ok(Saved {
            rule: self.rule.clone(),
            options: self.options,
            lr: self.lr,
            step,
            loss_scale,
            good_steps,
        })
    }

    /// Every state buffer, on the host: in place on the CPU, copied from the device on a GPU.
    pub(crate) fn state_arenas(&self) -> Result<std::borrow::Cow<'_, [Arena]>> {
        match &self.engine {
            Engine::Cpu(cpu) => Ok(std::borrow::Cow::Borrowed(&cpu.state)),
            Engine::Cuda(engine) => {
                let Storage::Cuda(d) = self.params.storage() else {
                    return Err(no_device_storage());
                };
                let len = self.params.layout().arena_len();
                engine
                    .state
                    .iter()
                    .map(|a| {
                        let mut host = Arena::filled(a.dtype(), len, 0.0)?;
                        host.write_f32(0, &a.read(&d.rt.stream, 0..len, self.device())?);
                        Ok(host)
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(std::borrow::Cow::Owned)
            }
        }
    }

    /// Replaces everything a checkpoint holds: masters (and the model copy), state, step count,
    /// loss-scale state, lr, and the schedule's position. The caller has validated all of it
    /// against this optimizer (same layout, rule and options). Device buffers are overwritten in
    /// place, so a captured graph stays valid.
    pub(crate) fn restore(&mut self, restore: crate::checkpoint::Restore) -> Result<()> {
        let crate::checkpoint::Restore {
            saved,
            values,
            state,
            schedule,
        } = restore;
        self.params.restore_values(&values)?;
        match &mut self.engine {
            Engine::Cpu(cpu) => {
                cpu.state = state;
                cpu.step = saved.step;
                cpu.loss_scale = saved.loss_scale;
                cpu.good_steps = saved.good_steps;
                cpu.report = StepReport {
                    step: saved.step,
                    lr: saved.lr,
                    global_norm: None,
                    clip_factor: 1.0,
                    skipped: false,
                    loss_scale: saved.loss_scale,
                };
            }
            Engine::Cuda(engine) => {
                let len = self.params.layout().arena_len();
                let Storage::Cuda(d) = self.params.storage_mut() else {
                    return Err(no_device_storage());
                };
                for (dst, src) in engine.state.iter_mut().zip(&state) {
                    dst.write(&d.rt.stream, 0, &src.to_f32(0..len), d.rt.device)?;
                }
                engine.write_state(StepState {
                    step: saved.step,
                    loss_scale: saved.loss_scale,
                    good_steps: saved.good_steps,
                    grad_scale: 1.0,
                    clip_factor: 1.0,
                    step_loss_scale: saved.loss_scale,
                    ..Default::default()
                })?;
                engine.set_lr(saved.lr)?;
            }
        }
        self.lr = saved.lr;
        self.schedule = schedule;
        Ok(())
    }

    /// Sets the lr of the next step from the attached schedule, if any; an lr the step cannot use
    /// is refused with nothing changed.
    pub(crate) fn apply_schedule(&mut self) -> Result<()> {
        match &self.schedule {
            Some(s) => self.set_lr(s.lr()),
            None => Ok(()),
        }
    }

    /// The attached schedule, if any.
    pub(crate) fn schedule(&self) -> Option<&dyn LrSchedule> {
        self.schedule.as_deref()
    }
}

impl CpuSteps {
    /// One step on the host; returns whether it was applied.
    fn step(
        &mut self,
        params: &mut ParamSet,
        rule: &Rule,
        options: &OptimizerOptions,
        lr: f64,
    ) -> Result<bool> {
        let needs_norm = options.needs_norm();
        let inv_scale = 1.0 / self.loss_scale;
        let layout = params.layout().clone();
        let Storage::Host {
            values,
            grads,
            model,
        } = params.storage_mut()
        else {
            return Err(Error::NotHostMemory(Device::Cpu));
        };
        let norm = needs_norm.then(|| self.engine.sum_of_squares(grads).sqrt() * inv_scale);
        let mut report = StepReport {
            step: self.step,
            lr,
            global_norm: norm,
            clip_factor: 1.0,
            skipped: false,
            loss_scale: self.loss_scale,
        };
        if let Some(n) = norm.filter(|n| !n.is_finite()) {
            if let LossScale::Dynamic { backoff_factor, .. } = options.loss_scale {
                // Back off only while the scale stays usable (its reciprocal finite in f32).
                let backed = self.loss_scale * backoff_factor;
                if usable_loss_scale(backed) {
                    self.loss_scale = backed;
                }
                self.good_steps = 0;
                report.skipped = true;
                self.report = report;
                return Ok(false);
            }
            match options.non_finite {
                NonFinitePolicy::Skip => {
                    report.skipped = true;
                    self.report = report;
                    return Ok(false);
                }
                NonFinitePolicy::Error => return Err(Error::NonFiniteGradient { norm: n }),
                NonFinitePolicy::Propagate => {}
            }
        }
        if let (Some(clip), Some(n)) = (options.clip, norm) {
            report.clip_factor = clip.factor(n);
        }
        let sign = if rule.maximize() { -1.0 } else { 1.0 };
        let step = self
            .step
            .checked_add(1)
            .filter(|&s| s <= MAX_STEP)
            .ok_or_else(|| Error::InvalidHyperparameter("the step count is at its limit".into()))?;
        self.coeffs.clear();
        for group in layout.groups() {
            let wd = rule.weight_decay();
            let ctx = StepContext {
                lr: lr * group.options.lr_scale,
                weight_decay: group
                    .options
                    .weight_decay
                    .map_or(wd, |l| wd.with_coefficient(l)),
                step,
                grad_scale: report.clip_factor * inv_scale * sign,
            };
            self.coeffs.push(StepCoefficients::new(rule, &ctx));
        }
        self.engine
            .update(values, grads, &mut self.state, model.as_mut(), &self.coeffs);
        self.step = step;
        report.step = step;
        if let LossScale::Dynamic {
            growth_factor,
            growth_interval,
            ..
        } = options.loss_scale
        {
            self.good_steps += 1;
            if self.good_steps >= growth_interval {
                // As GradScaler: grow only while the scale stays finite in f32 (and usable).
                let grown = self.loss_scale * growth_factor;
                if usable_loss_scale(grown) {
                    self.loss_scale = grown;
                }
                self.good_steps = 0;
            }
        }
        self.report = report;
        Ok(true)
    }
}
