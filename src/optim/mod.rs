//! The optimizer: a rule, its state, and the engine that runs the fused step.

pub mod config;
pub mod rules;

pub use config::{
    Adagrad, Adam, AdamEps, AmsGrad, EpsPlacement, Flavor, LrPlacement, MomentumInit, RmsProp,
    Rule, Sgd, WeightDecay,
};

use crate::clip::GlobalNormClip;
use crate::engine::cpu::CpuEngine;
use crate::error::{Error, Result};
use crate::params::{zeroed_arena, ParamSet};
use crate::plan::{LaunchPlan, CPU_CHUNK_ELEMS};
use crate::schedule::LrSchedule;
use crate::Device;
use rules::{StepCoefficients, StepContext};

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

/// Step-wide options beside the rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerOptions {
    pub clip: Option<GlobalNormClip>,
    pub non_finite: NonFinitePolicy,
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
}

/// Runs one update rule over every tensor of a parameter set as one fused step.
#[derive(Clone, Debug)]
pub struct Optimizer {
    params: ParamSet,
    rule: Rule,
    options: OptimizerOptions,
    lr: f64,
    step: u64,
    state: Vec<Vec<f32>>,
    engine: CpuEngine,
    coeffs: Vec<StepCoefficients>,
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
        params: ParamSet,
        rule: impl Into<Rule>,
        options: OptimizerOptions,
    ) -> Result<Self> {
        let rule = rule.into();
        rule.validate()?;
        if let Some(clip) = options.clip {
            if !(clip.max_norm.is_finite() && clip.max_norm > 0.0) {
                return Err(Error::InvalidHyperparameter(format!(
                    "clip max_norm must be finite and > 0, got {}",
                    clip.max_norm
                )));
            }
        }
        if params.device() != Device::Cpu {
            params.device().check()?;
        }
        let len = params.layout().arena_len();
        let state = rule
            .state_names()
            .iter()
            .map(|name| {
                let mut buf = zeroed_arena(len)?;
                buf.fill(rule.state_initial_value(name));
                Ok(buf)
            })
            .collect::<Result<Vec<_>>>()?;
        let engine = CpuEngine::new(LaunchPlan::new(params.layout(), CPU_CHUNK_ELEMS));
        Ok(Optimizer {
            lr: rule.lr(),
            coeffs: Vec::with_capacity(params.layout().groups().len()),
            params,
            rule,
            options,
            step: 0,
            state,
            engine,
            schedule: None,
        })
    }

    /// One fused step over all tensors: norm pass (when needed), then the update with clipping,
    /// weight decay and the rule applied element by element.
    pub fn step(&mut self) -> Result<StepReport> {
        if let Some(s) = &self.schedule {
            self.set_lr(s.lr())?;
        }
        let needs_norm =
            self.options.clip.is_some() || self.options.non_finite != NonFinitePolicy::Propagate;
        let norm = needs_norm.then(|| self.engine.sum_of_squares(self.params.grads_arena()).sqrt());
        let mut report = StepReport {
            step: self.step,
            lr: self.lr,
            global_norm: norm,
            clip_factor: 1.0,
            skipped: false,
        };
        if let Some(n) = norm.filter(|n| !n.is_finite()) {
            match self.options.non_finite {
                NonFinitePolicy::Skip => {
                    report.skipped = true;
                    return Ok(report);
                }
                NonFinitePolicy::Error => return Err(Error::NonFiniteGradient { norm: n }),
                NonFinitePolicy::Propagate => {}
            }
        }
        if let (Some(clip), Some(n)) = (self.options.clip, norm) {
            report.clip_factor = clip.factor(n);
        }
        let sign = if self.rule.maximize() { -1.0 } else { 1.0 };
        let step = self.step + 1;
        self.coeffs.clear();
        for group in self.params.layout().groups() {
            let wd = self.rule.weight_decay();
            let ctx = StepContext {
                lr: self.lr * group.options.lr_scale,
                weight_decay: group
                    .options
                    .weight_decay
                    .map_or(wd, |l| wd.with_coefficient(l)),
                step,
                grad_scale: report.clip_factor * sign,
            };
            self.coeffs.push(StepCoefficients::new(&self.rule, &ctx));
        }
        let (values, grads) = self.params.split_mut();
        self.engine
            .update(values, grads, &mut self.state, &self.coeffs);
        self.step = step;
        report.step = step;
        if let Some(s) = &mut self.schedule {
            s.step();
        }
        Ok(report)
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

    /// Sets the learning rate for the next steps; a scalar change, nothing is rebuilt.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::InvalidHyperparameter(format!(
                "lr must be finite and >= 0, got {lr}"
            )));
        }
        self.lr = lr;
        Ok(())
    }

    /// Lets `schedule` set the lr of every step; it ticks once per applied step (skipped steps do
    /// not advance it, as Keras' and Optax's iteration counts do not). PyTorch-style per-epoch
    /// schedulers are better ticked by the caller with [`Optimizer::set_lr`].
    pub fn set_schedule(&mut self, schedule: Option<Box<dyn LrSchedule>>) {
        self.schedule = schedule;
    }

    /// Steps applied so far (skipped steps do not count).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the state buffers this optimizer keeps.
    pub fn state_names(&self) -> &'static [&'static str] {
        self.rule.state_names()
    }

    /// One tensor's slice of a state buffer.
    pub fn state(&self, buffer: &str, tensor: &str) -> Result<&[f32]> {
        let slot = self.state_slot(buffer)?;
        let r = self.params.layout().tensor(tensor)?.range();
        Ok(&self.state[slot][r])
    }

    pub fn device(&self) -> Device {
        self.params.device()
    }

    pub fn plan(&self) -> &LaunchPlan {
        self.engine.plan()
    }

    fn state_slot(&self, buffer: &str) -> Result<usize> {
        self.rule
            .state_names()
            .iter()
            .position(|n| *n == buffer)
            .ok_or_else(|| Error::UnknownTensor(format!("state buffer '{buffer}'")))
    }

    /// Replaces everything a checkpoint holds; the caller has validated it against this layout.
    pub(crate) fn restore(
        &mut self,
        rule: Rule,
        options: OptimizerOptions,
        lr: f64,
        step: u64,
        values: Vec<f32>,
        state: Vec<Vec<f32>>,
    ) {
        self.rule = rule;
        self.options = options;
        self.lr = lr;
        self.step = step;
        self.params.values_arena_mut().copy_from_slice(&values);
        self.state = state;
    }

    pub(crate) fn state_arenas(&self) -> &[Vec<f32>] {
        &self.state
    }
}
