//! Update rules as plain hyperparameter structs. Each field is a knob on which the frameworks differ
//! (see the flavor table in the README); the `preset` constructors set every knob, and every default,
//! the way PyTorch, Keras 3, Optax or TensorFlow 1 does.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
}

/// Where the learning rate enters a momentum buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LrPlacement {
    /// `b = μb + g; θ -= lr·b` (PyTorch, Optax SGD, TF1 Momentum).
    Outside,
    /// `b = μb + lr·g; θ -= b` (Keras, Optax and TF1 RMSProp): differs once lr changes.
    Inside,
}

/// The SGD momentum buffer on the first step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MomentumInit {
    /// `b₁ = g`, undampened (PyTorch).
    CopyGrad,
    /// `b₀ = 0`, so `b₁ = (1 − dampening)·g` (Keras, Optax, TF1).
    Zero,
}

/// Where ε sits relative to the square root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EpsPlacement {
    /// `√v + ε` (PyTorch).
    OutsideSqrt,
    /// `√(v + ε)` (Keras, Optax default, TF1).
    InsideSqrt,
}

/// On which scale Adam's ε is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdamEps {
    /// `m̂ / (√v̂ + ε)`: ε on the bias-corrected scale (PyTorch, Optax).
    BiasCorrected,
    /// `lr·√bc2/bc1 · m / (√v + ε̂)`: "epsilon hat" on the raw scale (Keras, TF1).
    Raw,
}

/// AMSGrad: which second moment is max'ed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AmsGrad {
    Off,
    /// Max over the raw `v` (PyTorch, Keras).
    MaxRaw,
    /// Max over the bias-corrected `v̂` (Optax `amsgrad`).
    MaxCorrected,
}

/// Stochastic gradient descent with optional (Nesterov) momentum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub maximize: bool,
    pub weight_decay: WeightDecay,
    pub momentum_init: MomentumInit,
    pub lr_placement: LrPlacement,
}

/// Adam, AdamW (decoupled decay) and AMSGrad.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Added to `v̂` inside the root (Optax `eps_root`).
    pub eps_root: f64,
    pub eps_scale: AdamEps,
    pub amsgrad: AmsGrad,
    pub maximize: bool,
    pub weight_decay: WeightDecay,
}

/// RMSProp: plain, centered, with momentum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmsProp {
    pub lr: f64,
    /// Decay of the squared-gradient average (PyTorch `alpha`, Keras `rho`, Optax/TF1 `decay`).
    pub alpha: f64,
    pub eps: f64,
    pub eps_placement: EpsPlacement,
    pub centered: bool,
    pub momentum: f64,
    /// Nesterov momentum (Optax only).
    pub nesterov: bool,
    pub lr_placement: LrPlacement,
    /// Initial value of the squared average (TF1: 1, Optax `initial_scale`).
    pub initial_square_avg: f64,
    /// Divide the averages by `1 − αᵗ` (Optax `bias_correction`).
    pub bias_correction: bool,
    pub maximize: bool,
    pub weight_decay: WeightDecay,
}

/// Adagrad.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adagrad {
    pub lr: f64,
    /// PyTorch: `clr = lr / (1 + (t − 1)·lr_decay)`.
    pub lr_decay: f64,
    pub initial_accumulator: f64,
    pub eps: f64,
    pub eps_placement: EpsPlacement,
    /// Zero update where the accumulator is 0 (Optax's `where(sum > 0, …, 0)`).
    pub zero_where_empty: bool,
    pub maximize: bool,
    pub weight_decay: WeightDecay,
}

/// Any update rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "lowercase")]
pub enum Rule {
    Sgd(Sgd),
    Adam(Adam),
    RmsProp(RmsProp),
    Adagrad(Adagrad),
}

macro_rules! into_rule {
    ($($t:ident),*) => {$(impl From<$t> for Rule { fn from(r: $t) -> Rule { Rule::$t(r) } })*};
}
into_rule!(Sgd, Adam, RmsProp, Adagrad);

impl Sgd {
    /// The framework's `SGD` with its defaults (Optax and TF1 have no default lr: 1e-3 is used).
    pub fn preset(flavor: Flavor) -> Self {
        let pytorch_like = matches!(flavor, Flavor::PyTorch);
        Sgd {
            lr: if flavor == Flavor::Keras { 0.01 } else { 1e-3 },
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            maximize: false,
            weight_decay: WeightDecay::None,
            momentum_init: if pytorch_like {
                MomentumInit::CopyGrad
            } else {
                MomentumInit::Zero
            },
            lr_placement: if flavor == Flavor::Keras {
                LrPlacement::Inside
            } else {
                LrPlacement::Outside
            },
        }
    }
}

impl Adam {
    /// The framework's `Adam` with its defaults.
    pub fn preset(flavor: Flavor) -> Self {
        Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: if flavor == Flavor::Keras { 1e-7 } else { 1e-8 },
            eps_root: 0.0,
            eps_scale: match flavor {
                Flavor::PyTorch | Flavor::Optax => AdamEps::BiasCorrected,
                Flavor::Keras | Flavor::Tf1 => AdamEps::Raw,
            },
            amsgrad: AmsGrad::Off,
            maximize: false,
            weight_decay: WeightDecay::None,
        }
    }

    /// The framework's `AdamW` with its default decay (PyTorch 0.01, Keras 0.004, Optax 1e-4;
    /// TF1 has none, so 0).
    pub fn adamw(flavor: Flavor) -> Self {
        let lambda = match flavor {
            Flavor::PyTorch => 0.01,
            Flavor::Keras => 0.004,
            Flavor::Optax => 1e-4,
            Flavor::Tf1 => 0.0,
        };
        Adam {
            weight_decay: WeightDecay::Decoupled(lambda),
            ..Adam::preset(flavor)
        }
    }

    /// The framework's AMSGrad: max over raw `v` except in Optax, which maxes `v̂`.
    pub fn amsgrad(flavor: Flavor) -> Self {
        Adam {
            amsgrad: if flavor == Flavor::Optax {
                AmsGrad::MaxCorrected
            } else {
                AmsGrad::MaxRaw
            },
            ..Adam::preset(flavor)
        }
    }
}

impl RmsProp {
    /// The framework's `RMSprop` with its defaults.
    pub fn preset(flavor: Flavor) -> Self {
        let pytorch = flavor == Flavor::PyTorch;
        RmsProp {
            lr: match flavor {
                Flavor::PyTorch => 1e-2,
                _ => 1e-3,
            },
            alpha: if pytorch { 0.99 } else { 0.9 },
            eps: match flavor {
                Flavor::PyTorch | Flavor::Optax => 1e-8,
                Flavor::Keras => 1e-7,
                Flavor::Tf1 => 1e-10,
            },
            eps_placement: if pytorch {
                EpsPlacement::OutsideSqrt
            } else {
                EpsPlacement::InsideSqrt
            },
            centered: false,
            momentum: 0.0,
            nesterov: false,
            lr_placement: if pytorch {
                LrPlacement::Outside
            } else {
                LrPlacement::Inside
            },
            initial_square_avg: if flavor == Flavor::Tf1 { 1.0 } else { 0.0 },
            bias_correction: false,
            maximize: false,
            weight_decay: WeightDecay::None,
        }
    }
}

impl Adagrad {
    /// The framework's `Adagrad` with its defaults.
    pub fn preset(flavor: Flavor) -> Self {
        let pytorch = flavor == Flavor::PyTorch;
        Adagrad {
            lr: if pytorch { 1e-2 } else { 1e-3 },
            lr_decay: 0.0,
            initial_accumulator: if pytorch { 0.0 } else { 0.1 },
            eps: match flavor {
                Flavor::PyTorch => 1e-10,
                Flavor::Keras | Flavor::Optax => 1e-7,
                Flavor::Tf1 => 0.0,
            },
            eps_placement: if pytorch {
                EpsPlacement::OutsideSqrt
            } else {
                EpsPlacement::InsideSqrt
            },
            zero_where_empty: flavor == Flavor::Optax,
            maximize: false,
            weight_decay: WeightDecay::None,
        }
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter(what()))
    }
}

fn check_unit(name: &str, x: f64) -> Result<()> {
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

impl Rule {
    pub fn lr(&self) -> f64 {
        match self {
            Rule::Sgd(r) => r.lr,
            Rule::Adam(r) => r.lr,
            Rule::RmsProp(r) => r.lr,
            Rule::Adagrad(r) => r.lr,
        }
    }

    pub fn weight_decay(&self) -> WeightDecay {
        match self {
            Rule::Sgd(r) => r.weight_decay,
            Rule::Adam(r) => r.weight_decay,
            Rule::RmsProp(r) => r.weight_decay,
            Rule::Adagrad(r) => r.weight_decay,
        }
    }

    /// Names of the optimizer state buffers this rule keeps, in slot order.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Rule::Sgd(r) if r.momentum != 0.0 => &["momentum_buffer"],
            Rule::Sgd(_) => &[],
            Rule::Adam(r) if r.amsgrad != AmsGrad::Off => {
                &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
            }
            Rule::Adam(_) => &["exp_avg", "exp_avg_sq"],
            Rule::RmsProp(r) => match (r.centered, r.momentum != 0.0) {
                (false, false) => &["square_avg"],
                (true, false) => &["square_avg", "grad_avg"],
                (false, true) => &["square_avg", "momentum_buffer"],
                (true, true) => &["square_avg", "grad_avg", "momentum_buffer"],
            },
            Rule::Adagrad(_) => &["sum"],
        }
    }

    /// Initial value of each state buffer.
    pub fn state_initial_value(&self, name: &str) -> f32 {
        match (self, name) {
            (Rule::RmsProp(r), "square_avg") => r.initial_square_avg as f32,
            (Rule::Adagrad(r), "sum") => r.initial_accumulator as f32,
            _ => 0.0,
        }
    }

    /// Refuses hyperparameters no framework accepts, before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr())?;
        check_nonneg("weight_decay", self.weight_decay().coefficient())?;
        match self {
            Rule::Sgd(r) => {
                check_nonneg("momentum", r.momentum)?;
                check_nonneg("dampening", r.dampening)?;
                check(
                    !r.nesterov || (r.momentum > 0.0 && r.dampening == 0.0),
                    || "nesterov needs momentum > 0 and zero dampening".into(),
                )
            }
            Rule::Adam(r) => {
                check_unit("beta1", r.beta1)?;
                check_unit("beta2", r.beta2)?;
                check_nonneg("eps", r.eps)?;
                check_nonneg("eps_root", r.eps_root)
            }
            Rule::RmsProp(r) => {
                check_nonneg("alpha", r.alpha)?;
                check(r.alpha <= 1.0, || {
                    format!("alpha must be <= 1, got {}", r.alpha)
                })?;
                check_nonneg("eps", r.eps)?;
                check_nonneg("momentum", r.momentum)?;
                check_nonneg("initial_square_avg", r.initial_square_avg)?;
                check(!(r.bias_correction && r.alpha == 1.0), || {
                    "bias correction divides by 1 - alpha^t: alpha must be < 1".into()
                })?;
                check(!r.nesterov || r.momentum > 0.0, || {
                    "nesterov needs momentum > 0".into()
                })
            }
            Rule::Adagrad(r) => {
                check_nonneg("lr_decay", r.lr_decay)?;
                check_nonneg("initial_accumulator", r.initial_accumulator)?;
                check_nonneg("eps", r.eps)
            }
        }
    }
}
