//! The optimizer: a rule, its state, and the engine that runs the fused step.

mod lr_window;
mod shard;
pub(crate) use shard::{Norm, Partials};

pub use crate::rules::adadelta::Adadelta;
pub use crate::rules::adagrad::Adagrad;
pub use crate::rules::adam::{Adam, AdamEps, AmsGrad};
pub use crate::rules::adamax::{Adamax, AdamaxEps};
pub use crate::rules::ademamix::Ademamix;
pub use crate::rules::adopt::Adopt;
pub use crate::rules::custom::{CoefficientValues, CustomRule, CustomRuleBuilder, SlotValues};
pub use crate::rules::lion::{Lion, NanSign};
pub use crate::rules::nadam::Nadam;
pub use crate::rules::radam::Radam;
pub use crate::rules::rmsprop::RmsProp;
pub use crate::rules::schedule_free::{ScheduleFree, ScheduleFreeBase, ScheduleFreeForm};
pub use crate::rules::sgd::{MomentumInit, Sgd};
pub use crate::rules::{
    Common, EpsPlacement, Flavor, LrPlacement, MomentForm, Rule, StateInit, WeightDecay,
};

pub use crate::step::{
    LossScale, NonFinitePolicy, OptimizerOptions, QuantizedState, StepReport, MAX_STEP,
};

use std::sync::Arc;

use crate::arena::Arena;
use crate::cuda::engine::{CudaEngine, DeviceArenas, DeviceStorage};
use crate::cuda::runtime::CudaRuntime;
use crate::error::{Error, Result};
use crate::host::state::StateBuffers;
use crate::host::{HostArenas, HostEngine};
use crate::params::{ParamSet, ParamsMut, Storage};
use crate::plan::LaunchPlan;
use crate::rules::StepMemo;
use crate::schedule::LrSchedule;
use crate::step::StepState;
use crate::Device;
use lr_window::LrWindow;

/// The scalar part of an optimizer, as checkpoints record it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Saved {
    pub rule: Rule,
    pub options: OptimizerOptions,
    pub lr: f64,
    pub step: u64,
    pub loss_scale: f64,
    pub good_steps: u64,
    /// What the rule's step scalars carry from step to step (absent before they did).
    #[serde(default)]
    pub memo: StepMemo,
}

/// Everything a load writes into an optimizer, checked against it and prepared in fresh buffers.
pub(crate) struct Restore {
    pub saved: Saved,
    pub masters: Vec<f32>,
    pub state: StateBuffers,
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

/// Checks that a schedule may cycle `rule`'s momentum (or β1), starting at `momentum`. (NAdam's
/// μ-product would need each step's β1; PyTorch refuses rules without momentum or betas.)
fn check_momentum(rule: &Rule, momentum: f64) -> Result<()> {
    if !rule.cycles_momentum() {
        return Err(Error::InvalidHyperparameter(format!(
            "the schedule cycles momentum, which {} cannot follow: turn off cycle_momentum \
             (SGD and RMSProp need a momentum ≠ 0 when built)",
            rule.family()
        )));
    }
    crate::rules::check_unit("the scheduled momentum", momentum)
}

/// What an optimizer's engine is beside: the arenas it steps, on their device.
enum Parts<'a> {
    Host(&'a HostEngine),
    Cuda(&'a DeviceStorage, &'a CudaEngine),
}

enum PartsMut<'a> {
    Host(&'a mut HostArenas, &'a mut HostEngine),
    Cuda(
        &'a Arc<CudaRuntime>,
        &'a mut DeviceArenas,
        &'a mut CudaEngine,
    ),
}

/// An optimizer builds its engine into its parameter set's storage; without one it would not
/// exist, so this error means a bug in fusedopt.
fn no_engine() -> Error {
    Error::Cuda("internal: an optimizer without its engine".into())
}

/// The engine beside its arenas, to change them (a free function, so that the optimizer's other
/// fields stay borrowable).
fn parts_mut(params: &mut ParamSet) -> Result<PartsMut<'_>> {
    match params.storage_mut() {
        Storage::Host(h) => Ok(PartsMut::Host(
            &mut h.arenas,
            h.engine.as_deref_mut().ok_or_else(no_engine)?,
        )),
        Storage::Cuda(d) => {
            let DeviceStorage { rt, arenas, engine } = &mut **d;
            Ok(PartsMut::Cuda(
                rt,
                arenas,
                engine.as_deref_mut().ok_or_else(no_engine)?,
            ))
        }
    }
}

/// Runs one update rule over every tensor of a parameter set as one fused step, on the device the
/// parameter set lives on.
#[derive(Debug)]
pub struct Optimizer {
    params: ParamSet,
    rule: Rule,
    options: OptimizerOptions,
    lr: f64,
    /// The lr the last step was given (what its report tells).
    step_lr: f64,
    /// On the CPU at the current step; on a GPU at its `lr_window`'s anchor.
    schedule: Option<Box<dyn LrSchedule>>,
    /// On a GPU with a schedule or a rule with step scalars: the steps written ahead to the
    /// device.
    lr_window: Option<LrWindow>,
    /// [`Optimizer::set_lr`] was called after the last step (an attached schedule overrides it
    /// at the next step; removed first, the set lr stays).
    lr_set_since_step: bool,
}

impl Clone for Box<dyn LrSchedule> {
    fn clone(&self) -> Self {
        self.boxed_clone()
    }
}

impl Optimizer {
    /// An optimizer stepping `params` by `rule` at learning rate `lr`, with default options (no
    /// clipping, non-finite steps skipped). The lr is the optimizer's, as in the frameworks'
    /// constructors; [`Optimizer::set_lr`] or a schedule changes it.
    pub fn new(params: ParamSet, rule: impl Into<Rule>, lr: f64) -> Result<Self> {
        Self::with_options(params, rule, lr, OptimizerOptions::default())
    }

    pub fn with_options(
        mut params: ParamSet,
        rule: impl Into<Rule>,
        lr: f64,
        options: OptimizerOptions,
    ) -> Result<Self> {
        let rule = rule.into();
        rule.validate()?;
        rule.runnable_on(params.device())?;
        options.validate()?;
        check_lr(params.layout(), lr)?;
        let layout = params.layout().clone();
        match params.storage_mut() {
            Storage::Host(h) => {
                let a = &h.arenas;
                let masters = a.masters.read(a.model.as_ref(), 0..layout.arena_len())?;
                let engine = HostEngine::new(&layout, &rule, &options, &masters)?;
                h.engine = Some(Box::new(engine));
            }
            Storage::Cuda(d) => {
                let engine = CudaEngine::new(&d.rt, &d.arenas, &layout, &rule, &options, lr)?;
                d.engine = Some(Box::new(engine));
            }
        }
        let mut opt = Optimizer {
            lr,
            step_lr: lr,
            params,
            rule,
            options,
            schedule: None,
            lr_window: None,
            lr_set_since_step: false,
        };
        if opt.uses_lr_window() {
            opt.write_lr_window(None, 0, Default::default())?;
        }
        Ok(opt)
    }

    /// The engine beside its arenas.
    fn parts(&self) -> Result<Parts<'_>> {
        match self.params.storage() {
            Storage::Host(h) => Ok(Parts::Host(h.engine.as_deref().ok_or_else(no_engine)?)),
            Storage::Cuda(d) => Ok(Parts::Cuda(d, d.engine.as_deref().ok_or_else(no_engine)?)),
        }
    }

    /// One fused step over all tensors: norm pass (when needed), then the update with clipping,
    /// loss-scale unscaling, weight decay and the rule applied element by element. On a GPU this
    /// only enqueues work: nothing waits for the device (except with [`NonFinitePolicy::Error`],
    /// which must read the verdict back); [`Optimizer::report`] reads the outcome when asked.
    pub fn step(&mut self) -> Result<()> {
        self.apply_schedule()?;
        self.step_at_current_lr(Norm::Own)
    }

    /// [`Optimizer::step`] with the lr already set from the schedule ([`Self::apply_schedule`]),
    /// its norm from `norm`.
    pub(crate) fn step_at_current_lr(&mut self, norm: Norm) -> Result<()> {
        let layout = self.params.layout().clone();
        let (rule, lr, policy) = (&self.rule, self.lr, self.options.non_finite);
        let momentum = self.schedule.as_ref().and_then(|s| s.momentum());
        self.step_lr = lr;
        self.lr_set_since_step = false;
        match parts_mut(&mut self.params)? {
            PartsMut::Host(arenas, engine) => {
                if engine.step(arenas, &layout, rule, lr, momentum, norm.given()?)? {
                    if let Some(s) = &mut self.schedule {
                        s.step();
                    }
                }
            }
            PartsMut::Cuda(_, arenas, engine) => {
                match norm.gathered()? {
                    true => engine.step_gathered(arenas)?,
                    false => engine.step(arenas)?,
                }
                // The schedule ticks on the device: the step reads its lr from the window.
                if let Some(w) = &mut self.lr_window {
                    w.enqueued += 1;
                }
                if policy == NonFinitePolicy::Error {
                    let st = engine.read_state()?;
                    if st.skip != 0 {
                        return Err(Error::NonFiniteGradient { norm: st.norm });
                    }
                }
            }
        }
        Ok(())
    }

    /// Captures the whole step (norm pass + update) as a CUDA graph; every later
    /// [`Optimizer::step`] replays it, reading the current lr, step count and loss scale from
    /// device memory. CUDA only.
    pub fn capture_graph(&mut self) -> Result<()> {
        match parts_mut(&mut self.params)? {
            PartsMut::Cuda(_, arenas, engine) => engine.capture(arenas),
            PartsMut::Host(..) => Err(Error::NeedsGpu("a CUDA graph")),
        }
    }

    /// Waits until every queued step has finished on the device (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self.params.storage() {
            Storage::Host(_) => Ok(()),
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
        let st = self.step_state()?;
        Ok(st.report(self.last_step_lr(&st)))
    }

    /// The lr the last step was given: on a GPU with a schedule, found from the device's count.
    fn last_step_lr(&self, st: &StepState) -> f64 {
        self.lr_window
            .as_ref()
            .and_then(|w| w.last_lr(st))
            .unwrap_or(self.step_lr)
    }

    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// Parameters and gradients, for the training loop to write gradients (and parameters)
    /// into. A view, not the set itself: the set carries this optimizer's state, so it cannot be
    /// swapped out from under the optimizer.
    pub fn params_mut(&mut self) -> ParamsMut<'_> {
        ParamsMut::new(&mut self.params)
    }

    /// The set itself, for the crate's own use (its storage must stay this optimizer's).
    pub(crate) fn set_mut(&mut self) -> &mut ParamSet {
        &mut self.params
    }

    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    pub fn options(&self) -> &OptimizerOptions {
        &self.options
    }

    /// The lr set last, or the one an attached schedule gave the last step (on a GPU: as of the
    /// last time the host refreshed its window of steps, see [`Optimizer::set_schedule`];
    /// [`Optimizer::report`] tells each step's own).
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate for the next steps; a scalar write (to device memory on a GPU, in
    /// stream order), nothing is rebuilt and a captured graph stays valid (for a rule whose step
    /// scalars follow the lr, schedule-free, a GPU waits once and rewrites the steps ahead). An
    /// attached schedule overrides it at the next step.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(self.params.layout(), lr)?;
        if self.schedule.is_none() {
            self.write_constant_lr(lr)?;
        }
        self.lr = lr;
        self.lr_set_since_step = true;
        Ok(())
    }

    /// Lets `schedule` set the lr of every step; it ticks once per applied step (skipped steps do
    /// not advance it, as Keras' and Optax's iteration counts do not). PyTorch-style per-epoch
    /// schedulers are better ticked by the caller with [`Optimizer::set_lr`].
    ///
    /// On a GPU the host does not know which steps apply without waiting for the device, so the
    /// schedule's next lrs go to device memory ahead of time and each step picks its own by the
    /// device's step count (a captured graph too): the host waits for the device once every 256
    /// steps, and when attaching or removing a schedule, observing a metric, reporting or saving.
    ///
    /// A schedule whose tables leave some step without an lr, or whose first lr the step cannot
    /// use, is refused and the optimizer keeps what it had.
    pub fn set_schedule(&mut self, schedule: Option<Box<dyn LrSchedule>>) -> Result<()> {
        if let Some(s) = &schedule {
            if let Some(why) = self.rule.schedule_conflict() {
                return Err(Error::InvalidHyperparameter(why.into()));
            }
            s.validate()?;
            check_lr(self.params.layout(), s.lr())?;
            if let Some(m) = s.momentum() {
                check_momentum(&self.rule, m)?;
            }
        }
        if self.params.device() == Device::Cpu {
            self.schedule = schedule;
            return Ok(());
        }
        self.set_schedule_on_device(schedule)
    }

    /// Passes a metric the training loop observed (a validation loss, say) to the attached
    /// schedule: a plateau schedule ([`crate::schedule::plateau`]) sets the next steps' lr from
    /// it. Without a schedule, or with one that ignores metrics, nothing changes.
    pub fn observe(&mut self, metric: f64) -> Result<()> {
        let Some(s) = &self.schedule else {
            return Ok(());
        };
        if self.params.device() != Device::Cpu {
            return self.observe_on_device(metric);
        }
        let mut next = s.boxed_clone();
        next.observe(metric)?;
        check_lr(self.params.layout(), next.lr())?;
        self.schedule = Some(next);
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

    /// Bytes of optimizer state this optimizer holds (every buffer, padding included; with
    /// quantized state: codes, block scales and the f32 part). Masters, gradients and the model
    /// copy are the parameter set's.
    pub fn state_bytes(&self) -> Result<usize> {
        Ok(match self.parts()? {
            Parts::Host(engine) => engine.state.bytes(),
            Parts::Cuda(_, engine) => engine.state_bytes(),
        })
    }

    /// One tensor's part of a state buffer, widened to f32 and copied out (decoded when the
    /// state is quantized: the documented way to export quantized moments).
    pub fn state(&self, buffer: &str, tensor: &str) -> Result<Vec<f32>> {
        let slot = self.state_slot(buffer)?;
        let layout = self.params.layout();
        let index = layout.tensor_index(tensor)?;
        let t = &layout.tensors()[index];
        match self.parts()? {
            Parts::Host(engine) => Ok(engine.state.tensor_f32(slot, index, t)),
            Parts::Cuda(d, engine) => match engine.read_quantized()? {
                Some((q, buffers)) => Ok(buffers[slot].tensor_f32(&q, index, t)),
                None => engine.state[slot].read(&d.rt.stream, t.range(), d.rt.device),
            },
        }
    }

    /// One tensor's parameters to evaluate the model at: the trained ones, except for a rule
    /// that averages its iterates (schedule-free: `x`, from `y` and `z` by its framework's
    /// formula, as Optax's `schedule_free_eval_params` or the reference's `eval()` give it).
    /// Training goes on from the trained ones; on a GPU this reads device memory.
    pub fn eval_param(&self, tensor: &str) -> Result<Vec<f32>> {
        let y = self.params.read_param(tensor)?;
        // Before the first step the averaged iterate is the parameters (z starts there then).
        if self.saved()?.step == 0 {
            return Ok(y);
        }
        let state = self
            .state_names()
            .iter()
            .map(|buffer| self.state(buffer, tensor))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.rule.eval_params(&y, &state).unwrap_or(y))
    }

    pub fn device(&self) -> Device {
        self.params.device()
    }

    /// The launch plan its steps walk (an optimizer always has one).
    pub fn plan(&self) -> Result<&LaunchPlan> {
        Ok(match self.parts()? {
            Parts::Host(engine) => engine.plan(),
            Parts::Cuda(_, engine) => engine.plan(),
        })
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
        let lr = match &self.lr_window {
            Some(w) => w.last_lr(&st).unwrap_or(self.lr),
            None => self.lr,
        };
        let memo = match self.parts()? {
            Parts::Host(engine) => engine.memo,
            Parts::Cuda(..) => self.memo_at(st.step),
        };
        Ok(Saved {
            rule: self.rule.clone(),
            options: self.options,
            lr,
            step: st.step,
            loss_scale: st.loss_scale,
            good_steps: st.good_steps,
            memo,
        })
    }

    /// The step state, wherever it lives (read back from the device on a GPU, which waits).
    fn step_state(&self) -> Result<StepState> {
        match self.parts()? {
            Parts::Host(engine) => Ok(engine.step_state),
            Parts::Cuda(_, engine) => engine.read_state(),
        }
    }

    /// Every state buffer, on the host: in place on the CPU, copied from the device on a GPU.
    pub(crate) fn state_buffers(&self) -> Result<std::borrow::Cow<'_, StateBuffers>> {
        use std::borrow::Cow;
        let len = self.params.layout().arena_len();
        let (d, engine) = match self.parts()? {
            Parts::Host(engine) => return Ok(Cow::Borrowed(&engine.state)),
            Parts::Cuda(d, engine) => (d, engine),
        };
        if let Some((layout, buffers)) = engine.read_quantized()? {
            return Ok(Cow::Owned(StateBuffers::Quantized { layout, buffers }));
        }
        engine
            .state
            .iter()
            .map(|a| {
                let mut host = Arena::filled(a.dtype(), len, 0.0)?;
                host.write_f32(0, &a.read(&d.rt.stream, 0..len, d.rt.device)?);
                Ok(host)
            })
            .collect::<Result<Vec<_>>>()
            .map(|a| Cow::Owned(StateBuffers::Dense(a)))
    }

    /// Replaces everything a checkpoint holds: masters (and the model copy), state, step count,
    /// loss-scale state, lr, and the schedule's position. The caller has validated all of it
    /// against this optimizer (same layout, rule and options). Device buffers are overwritten in
    /// place, so a captured graph stays valid.
    pub(crate) fn restore(&mut self, restore: Restore) -> Result<()> {
        let Restore {
            saved,
            masters,
            state,
            schedule,
        } = restore;
        self.params.restore_masters(&masters)?;
        // Running scalars a rule can rebuild from the step count (NAdam's product) are rebuilt,
        // not taken from the file.
        let memo = match self.rule.memo_is_history() {
            true => saved.memo,
            false => StepMemo::default(),
        };
        let restored = StepState {
            step: saved.step,
            loss_scale: saved.loss_scale,
            good_steps: saved.good_steps,
            grad_scale: 1.0,
            clip_factor: 1.0,
            step_loss_scale: saved.loss_scale,
            ..Default::default()
        };
        let len = self.params.layout().arena_len();
        match parts_mut(&mut self.params)? {
            PartsMut::Host(_, engine) => {
                engine.state = state;
                engine.step_state = restored;
                engine.memo = memo;
            }
            PartsMut::Cuda(rt, _, engine) => {
                match &state {
                    StateBuffers::Dense(state) => {
                        for (dst, src) in engine.state.iter_mut().zip(state) {
                            dst.write(&rt.stream, 0, &src.to_f32(0..len), rt.device)?;
                        }
                    }
                    StateBuffers::Quantized { buffers, .. } => engine.write_quantized(buffers)?,
                }
                engine.write_state(restored)?;
                engine.set_lr(saved.lr)?;
            }
        }
        self.lr = saved.lr;
        self.step_lr = saved.lr;
        self.lr_set_since_step = false;
        self.lr_window = None;
        self.schedule = schedule;
        if self.uses_lr_window() {
            self.restore_lr_window(saved.step, memo)?;
        }
        Ok(())
    }

    /// Gives the next step its lr from the attached schedule, if any; an lr the step cannot use
    /// is refused with nothing changed. On the CPU this sets the lr; on a GPU it writes the next
    /// steps' entries ahead when the next step could run past those written (see `lr_window`).
    pub(crate) fn apply_schedule(&mut self) -> Result<()> {
        if self.params.device() != Device::Cpu {
            return self.refill_lr_window();
        }
        match &self.schedule {
            Some(s) => self.set_lr(s.lr()),
            None => Ok(()),
        }
    }

    /// The attached schedule, if any, standing where its configuration can be compared (not
    /// necessarily at the current step on a GPU: see [`Optimizer::schedule_now`]).
    pub(crate) fn schedule(&self) -> Option<&dyn LrSchedule> {
        self.schedule.as_deref()
    }
}
