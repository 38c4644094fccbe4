//! The optimizer: a rule, its state, and the engine that runs the fused step.

pub use crate::rules::adagrad::Adagrad;
pub use crate::rules::adam::{Adam, AdamEps, AmsGrad};
pub use crate::rules::rmsprop::RmsProp;
pub use crate::rules::sgd::{MomentumInit, Sgd};
pub use crate::rules::{Common, EpsPlacement, Flavor, LrPlacement, Rule, WeightDecay};

pub use crate::step::{LossScale, NonFinitePolicy, OptimizerOptions, StepReport, MAX_STEP};

use crate::arena::Arena;
use crate::cuda::engine::CudaEngine;
use crate::engine::cpu::CpuEngine;
use crate::error::{Error, Result};
use crate::params::{ParamSet, Storage};
use crate::plan::{LaunchPlan, CPU_CHUNK_ELEMS};
use crate::rules::{Coefficients, StepContext};
use crate::schedule::LrSchedule;
use crate::step::{decide, StepParams, StepState, POLICY_ERROR};
use crate::Device;

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

/// Everything a load writes into an optimizer, checked against it and prepared in fresh buffers.
pub(crate) struct Restore {
    pub saved: Saved,
    pub values: Vec<f32>,
    pub state: Vec<Arena>,
    pub schedule: Option<Box<dyn LrSchedule>>,
}

/// Checks that `lr`, scaled by every group's lr scale, is one the f32 step can use.
pub(crate) fn check_lr(layout: &crate::params::Layout, lr: f64) -> Result<()> {
    crate::rules::check_nonneg("lr", lr)?;
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

/// The CPU engine with the state a CPU step keeps on the host: the same [`StepState`] the CUDA
/// engine keeps in device memory, decided by the same rules ([`crate::step`]).
#[derive(Debug)]
struct CpuSteps {
    engine: CpuEngine,
    state: Vec<Arena>,
    coeffs: Vec<Coefficients>,
    step_state: StepState,
    step_params: StepParams,
}

/// Where a step runs.
#[derive(Debug)]
enum Engine {
    Cpu(Box<CpuSteps>),
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
                Engine::Cpu(Box::new(CpuSteps {
                    engine: CpuEngine::new(LaunchPlan::new(&layout, CPU_CHUNK_ELEMS)),
                    state,
                    coeffs: Vec::with_capacity(layout.groups().len()),
                    step_state: StepState::initial(&options),
                    step_params: StepParams::new(&options),
                }))
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
            Engine::Cpu(cpu) => cpu.step(&mut self.params, &self.rule, self.lr)?,
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
        Ok(self.step_state()?.report(self.lr))
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
        let st = self.step_state()?;
        Ok(Saved {
            rule: self.rule.clone(),
            options: self.options,
            lr: self.lr,
            step: st.step,
            loss_scale: st.loss_scale,
            good_steps: st.good_steps,
        })
    }

    /// The step state, wherever it lives (read back from the device on a GPU, which waits).
    fn step_state(&self) -> Result<StepState> {
        match &self.engine {
            Engine::Cpu(cpu) => Ok(cpu.step_state),
            Engine::Cuda(engine) => engine.read_state(),
        }
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
    pub(crate) fn restore(&mut self, restore: Restore) -> Result<()> {
        let Restore {
            saved,
            values,
            state,
            schedule,
        } = restore;
        self.params.restore_values(&values)?;
        let restored = StepState {
            step: saved.step,
            loss_scale: saved.loss_scale,
            good_steps: saved.good_steps,
            grad_scale: 1.0,
            clip_factor: 1.0,
            step_loss_scale: saved.loss_scale,
            ..Default::default()
        };
        match &mut self.engine {
            Engine::Cpu(cpu) => {
                cpu.state = state;
                cpu.step_state = restored;
            }
            Engine::Cuda(engine) => {
                let len = self.params.layout().arena_len();
                let Storage::Cuda(d) = self.params.storage_mut() else {
                    return Err(no_device_storage());
                };
                for (dst, src) in engine.state.iter_mut().zip(&state) {
                    dst.write(&d.rt.stream, 0, &src.to_f32(0..len), d.rt.device)?;
                }
                engine.write_state(restored)?;
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
    fn step(&mut self, params: &mut ParamSet, rule: &Rule, lr: f64) -> Result<bool> {
        let layout = params.layout().clone();
        let Storage::Host {
            values,
            grads,
            model,
        } = params.storage_mut()
        else {
            return Err(Error::NotHostMemory(Device::Cpu));
        };
        let q = self.step_params;
        let needs_norm = q.needs_norm();
        let sum_sq = if needs_norm {
            self.engine.sum_of_squares(grads)
        } else {
            0.0
        };
        if self.step_state.step >= MAX_STEP {
            return Err(Error::InvalidHyperparameter(
                "the step count is at its limit".into(),
            ));
        }
        // Decided on a copy: with NonFinitePolicy::Error a refused step must change nothing.
        let mut st = self.step_state;
        decide(&mut st, &q, sum_sq, needs_norm);
        if st.skip != 0 && q.policy == POLICY_ERROR {
            return Err(Error::NonFiniteGradient { norm: st.norm });
        }
        self.step_state = st;
        if st.skip != 0 {
            return Ok(false);
        }
        let sign = if rule.maximize() { -1.0 } else { 1.0 };
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
            };
            self.coeffs.push(rule.coefficients(&ctx));
        }
        self.engine
            .update(values, grads, &mut self.state, model.as_mut(), &self.coeffs);
        Ok(true)
    }
}
