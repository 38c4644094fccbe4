//! Update rules, one folder each, holding everything the rule is: its hyperparameters and the
//! frameworks' presets (`mod.rs`), its per-element maths for the CPU engine (`math.rs`), and the
//! same maths for the GPU (`<rule>.cuh`), which reads line for line like `math.rs`.
//!
//! Each field of a rule is a knob on which the frameworks differ (the flavor table in the README);
//! the `preset` constructors set every knob, and every default, the way PyTorch, Keras 3, Optax
//! or TensorFlow 1 does. The knobs every rule has — weight decay, maximize — are one [`Common`]
//! struct (serialised flat beside the rule's own). The learning rate is not a rule's: it belongs
//! to the optimizer and its schedule (the frameworks' default lrs are the porting module's).
//!
//! **Adding a rule**: a folder like `adam/` (the struct implementing [`RuleSpec`], `math.rs` with
//! its coefficients implementing [`Update`], and a `.cuh` declaring its kernel families with
//! `FUSEDOPT_FAMILY`), and one line in the `rules!` registry below. The kernels find every
//! `src/rules/*/*.cuh` themselves.

mod common;

use serde::{Deserialize, Serialize};

pub(crate) use common::{max_nan, powu, stored, Decay};
pub(crate) use custom::GeneratedFamily;

use crate::error::{Error, Result};
use crate::Element;

/// The registry: every rule, as `module::Type`. Generates [`Rule`], its conversions, the builders
/// of the [`Common`] knobs, and the dispatch from a `Rule` to its rule.
macro_rules! rules {
    ($($module:ident :: $Type:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// The registered rules' folders.
        #[cfg(test)]
        const FOLDERS: &[&str] = &[$(stringify!($module)),*];

        /// Any update rule.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "rule", rename_all = "lowercase")]
        pub enum Rule {
            $($Type($module::$Type),)*
        }

        $(impl From<$module::$Type> for Rule {
            fn from(r: $module::$Type) -> Rule {
                Rule::$Type(r)
            }
        }

        impl $module::$Type {
            /// The same rule with weight decay `wd`.
            pub fn with_weight_decay(mut self, wd: WeightDecay) -> Self {
                self.common.weight_decay = wd;
                self
            }

            /// The same rule, ascending the objective when `maximize`.
            pub fn maximizing(mut self, maximize: bool) -> Self {
                self.common.maximize = maximize;
                self
            }
        })*

        /// One rule's coefficients for one step and parameter group.
        #[derive(Clone, Debug, PartialEq)]
        pub(crate) enum Coefficients {
            $($Type(<$module::$Type as RuleSpec>::Coefficients),)*
        }

        impl Rule {
            /// The rule as its [`RuleSpec`].
            fn spec(&self) -> &dyn RuleSpecDyn {
                match self {
                    $(Rule::$Type(r) => r,)*
                }
            }

            /// The knobs every rule has, to change.
            pub fn common_mut(&mut self) -> &mut Common {
                match self {
                    $(Rule::$Type(r) => &mut r.common,)*
                }
            }

            /// The coefficients of one step for one parameter group.
            pub(crate) fn coefficients(&self, ctx: &StepContext) -> Coefficients {
                match self {
                    $(Rule::$Type(r) => Coefficients::$Type(r.coefficients(ctx)),)*
                }
            }
        }

        impl Coefficients {
            /// Updates one contiguous run of elements; `state` holds the rule's buffers in slot
            /// order ([`Rule::state_names`]), each as long as `p`.
            #[inline(always)]
            pub(crate) fn update<G: Element, S: Element>(
                &self,
                p: &mut [f32],
                g: &[G],
                state: &mut [&mut [S]],
            ) {
                match self {
                    $(Coefficients::$Type(c) => c.update(p, g, state),)*
                }
            }
        }
    };
}

rules! {
    sgd::Sgd,
    adam::Adam,
    rmsprop::RmsProp,
    adagrad::Adagrad,
    adamax::Adamax,
    lion::Lion,
    radam::Radam,
    adadelta::Adadelta,
    nadam::Nadam,
    adopt::Adopt,
    ademamix::Ademamix,
    schedule_free::ScheduleFree,
    custom::CustomRule,
}

/// What a rule is, as the engines see it. Implemented by each rule in its folder.
pub(crate) trait RuleSpec {
    /// Its coefficients for one step and parameter group (`math.rs`).
    type Coefficients: Update + Clone + std::fmt::Debug + PartialEq;
    fn common(&self) -> &Common;
    /// Refuses hyperparameters no framework accepts (the common ones are checked apart).
    fn validate(&self) -> Result<()>;
    /// The optimizer state buffers it keeps, in slot order.
    fn state_names(&self) -> &'static [&'static str];
    /// What state buffer `name` starts as.
    fn state_init(&self, _name: &str) -> StateInit {
        StateInit::Value(0.0)
    }
    /// Whether state buffer `name` never holds a negative value (quantized state then codes it on
    /// an unsigned map, with twice the resolution).
    fn nonnegative_state(&self, _name: &str) -> bool {
        false
    }
    /// Its kernel family: the CUDA entry points are `update_<family>_<grad>_<state>` (declared by
    /// `FUSEDOPT_FAMILY` in its `.cuh`).
    fn family(&self) -> &'static str;
    /// Its family's CUDA source, when the build did not compile it (a custom rule's).
    fn generated_family(&self) -> Option<GeneratedFamily> {
        None
    }
    /// Its part of a parameter group's device config, as its `.cuh` reads it.
    fn device_config(&self) -> DeviceConfig;
    fn coefficients(&self, ctx: &StepContext) -> Self::Coefficients;
    /// Whether a schedule may set its momentum (or β1) step by step (PyTorch's `cycle_momentum`).
    fn cycles_momentum(&self) -> bool {
        false
    }
    /// Whether its steps need [`StepScalars`] (computed on the host, where the device could not
    /// reproduce them bit for bit).
    fn needs_step_scalars(&self) -> bool {
        false
    }
    /// The scalars of step `t` (1-based) at the optimizer's lr `lr` (before any group's scale);
    /// `memo` carries what earlier steps computed.
    fn step_scalars(&self, _t: u64, _lr: f64, _memo: &mut StepMemo) -> StepScalars {
        [0.0; 3]
    }
    /// Whether its scalars depend on each step's lr (then an lr set on a GPU rewrites the steps
    /// written ahead from where the device stands).
    fn scalars_follow_lr(&self) -> bool {
        false
    }
    /// Whether its scalars need every earlier step's (its memo cannot be rebuilt from the step
    /// count alone, so checkpoints must carry it).
    fn memo_is_history(&self) -> bool {
        false
    }
    /// The parameters to evaluate the model at, from the trained ones `y` and the state buffers
    /// (slot order): `None` when they are the trained ones.
    fn eval_params(&self, _y: &[f32], _state: &[Vec<f32>]) -> Option<Vec<f32>> {
        None
    }
    /// Why no schedule may drive it, if none may.
    fn schedule_conflict(&self) -> Option<&'static str> {
        None
    }
    /// Whether an engine on `device` can run it (a custom rule needs its halves).
    fn runnable_on(&self, _device: crate::Device) -> Result<()> {
        Ok(())
    }
}

/// What a state buffer starts as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StateInit {
    Value(f32),
    /// A copy of the parameters (schedule-free's `z`).
    Params,
}

/// Per-step scalars of a rule that only the host computes (NAdam's μ_t, μ_{t+1} and its running
/// f32 product Π_t, made with `powf` and a product over every earlier step): the CPU engine passes
/// them in [`StepContext`], the CUDA engine writes them ahead into device memory beside each step's
/// lr (`optim::lr_window`).
pub(crate) type StepScalars = [f64; 3];

/// What a rule's [`RuleSpec::step_scalars`] remembers between steps: the last step it computed,
/// NAdam's running product, and schedule-free's running weight sum and largest lr. Saved in
/// checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StepMemo {
    pub t: u64,
    pub product: f64,
    #[serde(default)]
    pub weight_sum: f64,
    #[serde(default)]
    pub max_lr: f64,
}

impl Default for StepMemo {
    fn default() -> Self {
        StepMemo {
            t: 0,
            product: 1.0,
            weight_sum: 0.0,
            max_lr: 0.0,
        }
    }
}

/// Declares [`RuleSpec`]'s methods once more without its associated type, for dispatch through
/// `&dyn`, each forwarded to the rule's own.
macro_rules! dyn_rule_spec {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        trait RuleSpecDyn {
            $(fn $name(&self $(, $arg: $ty)*) -> $ret;)*
        }
        impl<R: RuleSpec> RuleSpecDyn for R {
            $(fn $name(&self $(, $arg: $ty)*) -> $ret {
                RuleSpec::$name(self $(, $arg)*)
            })*
        }
    };
}

dyn_rule_spec! {
    fn cycles_momentum(&self) -> bool;
    fn needs_step_scalars(&self) -> bool;
    fn step_scalars(&self, t: u64, lr: f64, memo: &mut StepMemo) -> StepScalars;
    fn scalars_follow_lr(&self) -> bool;
    fn memo_is_history(&self) -> bool;
    fn eval_params(&self, y: &[f32], state: &[Vec<f32>]) -> Option<Vec<f32>>;
    fn schedule_conflict(&self) -> Option<&'static str>;
    fn runnable_on(&self, device: crate::Device) -> Result<()>;
    fn common(&self) -> &Common;
    fn validate(&self) -> Result<()>;
    fn state_names(&self) -> &'static [&'static str];
    fn state_init(&self, name: &str) -> StateInit;
    fn nonnegative_state(&self, name: &str) -> bool;
    fn family(&self) -> &'static str;
    fn generated_family(&self) -> Option<GeneratedFamily>;
    fn device_config(&self) -> DeviceConfig;
}

/// A rule's coefficients applied to a run of elements.
pub(crate) trait Update {
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]);
}

/// A rule's part of a group's device config: mode flags and up to eight hyperparameters, in the
/// order its `.cuh` reads them from `GroupConfig::params`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct DeviceConfig {
    pub flags: u32,
    pub params: [f64; 8],
}

/// One parameter group's rule, uploaded once (`GroupConfig` in common.cuh): the group's lr scale
/// and effective weight decay, ±1 for maximize, and the rule's [`DeviceConfig`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GroupConfig {
    pub lr_scale: f64,
    pub decay: f64,
    pub sign: f64,
    pub params: [f64; 8],
    pub decay_kind: u32,
    pub flags: u32,
}

// The same numbers as the static_asserts in common.cuh.
abi_layout!(GroupConfig, 96, {
    lr_scale: 0, decay: 8, sign: 16, params: 24, decay_kind: 88, flags: 92,
});

impl GroupConfig {
    pub(crate) fn new(rule: &Rule, group: &crate::layout::GroupOptions) -> Self {
        let wd = rule.weight_decay();
        let wd = group.weight_decay.map_or(wd, |l| wd.with_coefficient(l));
        let DeviceConfig { flags, params } = rule.device_config();
        GroupConfig {
            lr_scale: group.lr_scale,
            decay: wd.coefficient(),
            sign: if rule.maximize() { -1.0 } else { 1.0 },
            params,
            decay_kind: wd.kind(),
            flags,
        }
    }
}

/// Whose semantics and defaults a rule reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// `torch.optim` (2.x).
    PyTorch,
    /// `keras.optimizers` (Keras 3).
    Keras,
    /// `optax` (with `clip_by_global_norm` / `add_decayed_weights` chained as usual).
    Optax,
    /// TensorFlow 1 `tf.compat.v1.train`.
    Tf1,
}

impl std::str::FromStr for Flavor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "pytorch" | "torch" => Ok(Flavor::PyTorch),
            "keras" => Ok(Flavor::Keras),
            "optax" => Ok(Flavor::Optax),
            "tf1" => Ok(Flavor::Tf1),
            _ => Err(Error::InvalidHyperparameter(format!(
                "unknown flavor '{s}' (pytorch, keras, optax, tf1)"
            ))),
        }
    }
}

/// How weight decay enters the step. The coefficient may be overridden per parameter group.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WeightDecay {
    None,
    /// Coupled L2: `g += λ·θ` before the rule sees the gradient (PyTorch `weight_decay`, Optax
    /// `add_decayed_weights` chained first).
    L2(f64),
    /// L1: `g += λ·sign(θ)`.
    L1(f64),
    /// Decoupled: `θ -= lr·λ·θ` before the update (PyTorch AdamW, every Keras optimizer, Optax `adamw`).
    Decoupled(f64),
}

impl WeightDecay {
    pub fn coefficient(self) -> f64 {
        match self {
            WeightDecay::None => 0.0,
            WeightDecay::L2(l) | WeightDecay::L1(l) | WeightDecay::Decoupled(l) => l,
        }
    }

    /// The same style with another coefficient (a parameter group's override).
    pub fn with_coefficient(self, lambda: f64) -> Self {
        match self {
            WeightDecay::None | WeightDecay::L2(_) => WeightDecay::L2(lambda),
            WeightDecay::L1(_) => WeightDecay::L1(lambda),
            WeightDecay::Decoupled(_) => WeightDecay::Decoupled(lambda),
        }
    }

    /// Its code in `GroupConfig::decay_kind` (`DECAY_*` in common.cuh).
    pub(crate) fn kind(self) -> u32 {
        match self {
            WeightDecay::None => 0,
            WeightDecay::L2(_) => 1,
            WeightDecay::L1(_) => 2,
            WeightDecay::Decoupled(_) => 3,
        }
    }
}

/// Where the learning rate enters a momentum buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LrPlacement {
    /// `b = μb + g; θ -= lr·b` (PyTorch, Optax SGD, TF1 Momentum).
    Outside,
    /// `b = μb + lr·g; θ -= b` (Keras, Optax and TF1 RMSProp): differs once lr changes.
    Inside,
}

/// Where ε sits relative to the square root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EpsPlacement {
    /// `√v + ε` (PyTorch).
    OutsideSqrt,
    /// `√(v + ε)` (Keras, Optax default, TF1).
    InsideSqrt,
}

/// How a first moment is averaged: the same number, but not the same rounding, and not the same
/// result once `m` is infinite (`m + (1−β)(g − m)` is then NaN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MomentForm {
    /// `m + (1−β)(g − m)` (PyTorch's `lerp_`, Keras).
    Lerp,
    /// `β·m + (1−β)·g` (Optax's `update_moment`).
    Average,
}

/// The knobs every rule has.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Common {
    pub weight_decay: WeightDecay,
    /// Ascend the objective instead (PyTorch `maximize`).
    pub maximize: bool,
}

impl Default for Common {
    /// No decay, minimising.
    fn default() -> Self {
        Common {
            weight_decay: WeightDecay::None,
            maximize: false,
        }
    }
}

impl Common {
    fn validate(&self) -> Result<()> {
        check_nonneg("weight_decay", self.weight_decay.coefficient())
    }
}

impl Rule {
    pub fn weight_decay(&self) -> WeightDecay {
        self.spec().common().weight_decay
    }

    pub fn maximize(&self) -> bool {
        self.spec().common().maximize
    }

    /// Names of the optimizer state buffers this rule keeps, in slot order.
    pub fn state_names(&self) -> &'static [&'static str] {
        self.spec().state_names()
    }

    /// What each state buffer starts as.
    pub fn state_init(&self, name: &str) -> StateInit {
        self.spec().state_init(name)
    }

    /// Whether state buffer `name` is never negative.
    pub(crate) fn nonnegative_state(&self, name: &str) -> bool {
        self.spec().nonnegative_state(name)
    }

    /// Refuses hyperparameters no framework accepts, before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        self.spec().common().validate()?;
        self.spec().validate()
    }

    /// The CUDA kernel family of this rule.
    pub(crate) fn family(&self) -> &'static str {
        self.spec().family()
    }

    /// Its family's CUDA source, when the runtime must compile it (a custom rule's).
    pub(crate) fn generated_family(&self) -> Option<GeneratedFamily> {
        self.spec().generated_family()
    }

    /// This rule's part of a parameter group's device config.
    pub(crate) fn device_config(&self) -> DeviceConfig {
        self.spec().device_config()
    }

    /// Whether a schedule may set its momentum (or β1) step by step.
    pub fn cycles_momentum(&self) -> bool {
        self.spec().cycles_momentum()
    }

    /// Whether its steps need host-computed [`StepScalars`].
    pub(crate) fn needs_step_scalars(&self) -> bool {
        self.spec().needs_step_scalars()
    }

    /// The host-computed scalars of step `t` (1-based) at the optimizer's lr `lr`.
    pub(crate) fn step_scalars(&self, t: u64, lr: f64, memo: &mut StepMemo) -> StepScalars {
        self.spec().step_scalars(t, lr, memo)
    }

    /// Whether its step scalars depend on each step's lr.
    pub(crate) fn scalars_follow_lr(&self) -> bool {
        self.spec().scalars_follow_lr()
    }

    /// Whether its memo holds history a checkpoint must carry.
    pub(crate) fn memo_is_history(&self) -> bool {
        self.spec().memo_is_history()
    }

    /// The parameters to evaluate at, or `None` when they are the trained ones.
    pub(crate) fn eval_params(&self, y: &[f32], state: &[Vec<f32>]) -> Option<Vec<f32>> {
        self.spec().eval_params(y, state)
    }

    /// Why no schedule may drive it, if none may.
    pub(crate) fn schedule_conflict(&self) -> Option<&'static str> {
        self.spec().schedule_conflict()
    }

    /// Whether an engine on `device` can run it.
    pub(crate) fn runnable_on(&self, device: crate::Device) -> Result<()> {
        self.spec().runnable_on(device)
    }
}

/// What a step needs to know beyond the rule: the group's lr and decay, the 1-based step number,
/// and the factor every gradient is multiplied by first (clip factor × loss-scale inverse × ±1
/// for `maximize`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepContext {
    pub lr: f64,
    pub weight_decay: WeightDecay,
    pub step: u64,
    pub grad_scale: f64,
    pub scalars: StepScalars,
    /// The momentum (or β1) a schedule cycles; `None`: the rule's own.
    pub momentum: Option<f64>,
}

pub(crate) fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter(what()))
    }
}

pub(crate) fn check_unit(name: &str, x: f64) -> Result<()> {
    check((0.0..1.0).contains(&x), || {
        format!("{name} must be in [0, 1), got {x}")
    })
}

/// Finite, `>= 0`, and finite in the f32 arithmetic of the step too.
pub(crate) fn check_nonneg(name: &str, x: f64) -> Result<()> {
    check(x >= 0.0 && (x as f32).is_finite(), || {
        format!("{name} must be finite (in f32 too) and >= 0, got {x}")
    })
}

#[cfg(test)]
mod tests {
    /// Every folder under src/rules is a registered rule with its three files: a folder the
    /// registry lacks would compile its kernels but never be reachable.
    #[test]
    fn every_rule_folder_is_registered_and_complete() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/rules");
        let mut folders: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        folders.sort();
        let mut registered: Vec<String> = super::FOLDERS.iter().map(|s| s.to_string()).collect();
        registered.sort();
        assert_eq!(
            folders, registered,
            "src/rules folders vs the rules! registry"
        );
        for f in &folders {
            // A custom rule's CUDA half is the user's, generated at run time.
            let cuh = (f != "custom").then(|| format!("{f}.cuh"));
            for file in ["mod.rs", "math.rs"].into_iter().chain(cuh.as_deref()) {
                assert!(
                    root.join(f).join(file).is_file(),
                    "src/rules/{f}/{file} is missing"
                );
            }
        }
    }
}
