//! Porting a model: the rule and the schedule a framework computes, built from that framework's
//! own constructor arguments ([`rule_from_framework`], [`schedule_from_framework`]), so a model
//! ported from PyTorch, Keras 3, Optax or TensorFlow 1 trains the same way. A key the mapping
//! does not understand is an error ([`Error::FrameworkArgument`]), never ignored.
//!
//! Argument objects are JSON, as `docs/FORMAT.md` (the conformance case format) writes them;
//! `docs/SEMANTICS.md` says what each framework computes.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::optim::{
    Adagrad, Adam, AmsGrad, Common, EpsPlacement, Flavor, RmsProp, Rule, Sgd, WeightDecay,
};
use crate::schedule::plateau::{Mode, ReduceLrOnPlateau, Variant};
use crate::schedule::{keras, optax, torch, Counted, LrSchedule};

fn bad(msg: impl Into<String>) -> Error {
    Error::FrameworkArgument(msg.into())
}

/// A number, or one of the strings FORMAT.md uses for non-finite values.
pub fn number(v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| bad("number out of range")),
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => Err(bad(format!("'{s}' is not a number"))),
        },
        _ => Err(bad(format!("{v} is not a number"))),
    }
}

/// Numbers, as [`number`] reads each.
pub fn numbers(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .ok_or_else(|| bad(format!("{v} is not an array")))?
        .iter()
        .map(number)
        .collect()
}

/// Framework constructor arguments, consumed key by key so leftovers can be refused.
struct Args {
    map: Map<String, Value>,
    what: String,
}

impl Args {
    fn new(map: &Map<String, Value>, what: &str) -> Self {
        Args {
            map: map.clone(),
            what: what.to_string(),
        }
    }

    /// Takes a key; `null` and absence both mean "the framework's default".
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn f64(&mut self, key: &str, default: f64) -> Result<f64> {
        self.take(key).map_or(Ok(default), |v| number(&v))
    }

    fn opt_f64(&mut self, key: &str) -> Result<Option<f64>> {
        self.take(key).map(|v| number(&v)).transpose()
    }

    fn bool(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(v) => Err(bad(format!(
                "{}: '{key}' must be a boolean, got {v}",
                self.what
            ))),
        }
    }

    fn str(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(bad(format!(
                "{}: '{key}' must be a string, got {v}",
                self.what
            ))),
        }
    }

    fn pair(&mut self, key: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => match numbers(&v)?.as_slice() {
                [a, b] => Ok((*a, *b)),
                _ => Err(bad(format!("{}: '{key}' must be a pair", self.what))),
            },
        }
    }

    fn finish<T>(self, value: T) -> Result<T> {
        match self.map.keys().next() {
            None => Ok(value),
            Some(k) => Err(bad(format!("{}: unknown argument '{k}'", self.what))),
        }
    }
}

/// A knob that frameworks expose as a constructor argument, under their own names.
#[derive(Clone, Copy)]
enum Knob {
    Lr,
    Momentum,
    Dampening,
    Nesterov,
    Maximize,
    Beta1,
    Beta2,
    Eps,
    EpsRoot,
    AmsGrad,
    Decay,
    Centered,
    InitialScale,
    EpsInSqrt,
    BiasCorrection,
    LrDecay,
    InitialAccumulator,
    WeightDecay,
}

/// The argument name of `knob` in `flavor`'s constructors, if it has one.
fn key(flavor: Flavor, knob: Knob) -> Option<&'static str> {
    use Flavor::*;
    use Knob::*;
    Some(match (knob, flavor) {
        (Lr, PyTorch) => "lr",
        (Lr, _) => "learning_rate",
        (Momentum, _) => "momentum",
        (Dampening | Maximize | LrDecay, PyTorch) => match knob {
            Dampening => "dampening",
            Maximize => "maximize",
            _ => "lr_decay",
        },
        (Nesterov, Tf1) => "use_nesterov",
        (Nesterov, _) => "nesterov",
        (Beta1, Keras) => "beta_1",
        (Beta1, Optax) => "b1",
        (Beta1, Tf1) => "beta1",
        (Beta2, Keras) => "beta_2",
        (Beta2, Optax) => "b2",
        (Beta2, Tf1) => "beta2",
        (Eps, PyTorch | Optax) => "eps",
        (Eps, Keras | Tf1) => "epsilon",
        (EpsRoot, Optax) => "eps_root",
        (AmsGrad, PyTorch | Keras) => "amsgrad",
        (Decay, PyTorch) => "alpha",
        (Decay, Keras) => "rho",
        (Decay, Optax | Tf1) => "decay",
        (Centered, _) => "centered",
        (InitialScale, Optax) => "initial_scale",
        (EpsInSqrt, Optax) => "eps_in_sqrt",
        (BiasCorrection, Optax) => "bias_correction",
        (InitialAccumulator, _) => "initial_accumulator_value",
        (WeightDecay, PyTorch | Keras | Optax) => "weight_decay",
        _ => return None,
    })
}

impl Args {
    fn knob(&mut self, flavor: Flavor, knob: Knob, default: f64) -> Result<f64> {
        key(flavor, knob).map_or(Ok(default), |k| self.f64(k, default))
    }

    fn flag(&mut self, flavor: Flavor, knob: Knob, default: bool) -> Result<bool> {
        key(flavor, knob).map_or(Ok(default), |k| self.bool(k, default))
    }
}

/// Builds the rule a framework's optimizer computes from its own constructor arguments.
/// `kind` is `sgd`, `adam`, `adamw`, `amsgrad` (Optax), `rmsprop` or `adagrad`;
/// `add_decayed_weights` is Optax's coupled L2 chained before the optimizer.
pub fn rule_from_framework(
    flavor: Flavor,
    kind: &str,
    args: &Map<String, Value>,
    add_decayed_weights: Option<f64>,
) -> Result<Rule> {
    let f = flavor;
    let mut a = Args::new(args, &format!("{flavor:?} {kind}"));
    // The knobs every rule has (weight decay comes after: it depends on the rule).
    let common = |a: &mut Args, d: &Common| -> Result<Common> {
        Ok(Common {
            lr: a.knob(f, Knob::Lr, d.lr)?,
            maximize: a.flag(f, Knob::Maximize, false)?,
            ..*d
        })
    };
    let mut rule = match kind {
        "sgd" => {
            let d = Sgd::preset(f);
            Rule::Sgd(Sgd {
                common: common(&mut a, &d.common)?,
                momentum: a.knob(f, Knob::Momentum, 0.0)?,
                dampening: a.knob(f, Knob::Dampening, 0.0)?,
                nesterov: a.flag(f, Knob::Nesterov, false)?,
                ..d
            })
        }
        "adam" | "adamw" | "amsgrad" => {
            let d = match kind {
                "adam" => Adam::preset(f),
                "adamw" => Adam::adamw(f),
                _ => Adam::amsgrad(f),
            };
            let (beta1, beta2) = if f == Flavor::PyTorch {
                a.pair("betas", (d.beta1, d.beta2))?
            } else {
                (
                    a.knob(f, Knob::Beta1, d.beta1)?,
                    a.knob(f, Knob::Beta2, d.beta2)?,
                )
            };
            let amsgrad = match a.flag(f, Knob::AmsGrad, d.amsgrad != AmsGrad::Off)? {
                true if d.amsgrad == AmsGrad::Off => AmsGrad::MaxRaw,
                true => d.amsgrad,
                false => AmsGrad::Off,
            };
            Rule::Adam(Adam {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                eps_root: a.knob(f, Knob::EpsRoot, 0.0)?,
                amsgrad,
                ..d
            })
        }
        "rmsprop" => {
            let d = RmsProp::preset(f);
            Rule::RmsProp(RmsProp {
                common: common(&mut a, &d.common)?,
                alpha: a.knob(f, Knob::Decay, d.alpha)?,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                eps_placement: match a.flag(
                    f,
                    Knob::EpsInSqrt,
                    d.eps_placement == EpsPlacement::InsideSqrt,
                )? {
                    true => EpsPlacement::InsideSqrt,
                    false => EpsPlacement::OutsideSqrt,
                },
                centered: a.flag(f, Knob::Centered, false)?,
                momentum: a.knob(f, Knob::Momentum, 0.0)?,
                nesterov: if f == Flavor::Optax {
                    a.flag(f, Knob::Nesterov, false)?
                } else {
                    false
                },
                initial_square_avg: a.knob(f, Knob::InitialScale, d.initial_square_avg)?,
                bias_correction: a.flag(f, Knob::BiasCorrection, false)?,
                ..d
            })
        }
        "adagrad" => {
            let d = Adagrad::preset(f);
            Rule::Adagrad(Adagrad {
                common: common(&mut a, &d.common)?,
                lr_decay: a.knob(f, Knob::LrDecay, 0.0)?,
                initial_accumulator: a.knob(f, Knob::InitialAccumulator, d.initial_accumulator)?,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                ..d
            })
        }
        _ => return Err(bad(format!("{flavor:?} has no optimizer '{kind}'"))),
    };
    // Weight decay: PyTorch couples it (L2) unless AdamW or `decoupled_weight_decay`; Keras
    // decouples it for every optimizer; Optax has it only in `adamw` (decoupled).
    let has_decay = match f {
        Flavor::Optax => kind == "adamw",
        Flavor::Tf1 => false,
        _ => true,
    };
    if has_decay {
        let lambda = a.knob(f, Knob::WeightDecay, rule.weight_decay().coefficient())?;
        let decoupled = match f {
            Flavor::PyTorch => a.bool("decoupled_weight_decay", kind == "adamw")?,
            _ => true,
        };
        set_weight_decay(
            &mut rule,
            if decoupled {
                WeightDecay::Decoupled(lambda)
            } else {
                WeightDecay::L2(lambda)
            },
        );
    }
    let mut rule = a.finish(rule)?;
    if let Some(wd) = add_decayed_weights {
        if flavor != Flavor::Optax || rule.weight_decay().coefficient() != 0.0 {
            return Err(bad(
                "add_decayed_weights is Optax's, and only without other decay",
            ));
        }
        set_weight_decay(&mut rule, WeightDecay::L2(wd));
    }
    rule.validate()?;
    Ok(rule)
}

fn set_weight_decay(rule: &mut Rule, wd: WeightDecay) {
    rule.common_mut().weight_decay = wd;
}

/// A schedule built from a framework's class or function name and its own arguments; `base_lr`
/// is the optimizer's initial lr where the framework takes it from there.
#[derive(Debug)]
pub enum FrameworkSchedule {
    Stepped(Box<dyn LrSchedule>),
    Plateau(ReduceLrOnPlateau),
}

/// Builds a schedule from a FORMAT.md `schedule` object.
pub fn schedule_from_framework(
    flavor: Flavor,
    spec: &Map<String, Value>,
) -> Result<FrameworkSchedule> {
    let kind = spec
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("schedule without 'kind'"))?
        .to_string();
    let mut a = Args::new(spec, &format!("{flavor:?} {kind}"));
    a.take("kind");
    let s = match flavor {
        Flavor::PyTorch if kind == "ReduceLROnPlateau" => {
            let base = a.f64("base_lr", 0.1)?;
            let mut p = ReduceLrOnPlateau::pytorch(base);
            if a.str("mode")?.as_deref() == Some("max") {
                p = p.with_mode(Mode::Max);
            }
            p.factor = a.f64("factor", 0.1)?;
            p.patience = a.f64("patience", 10.0)? as u64;
            p.threshold = a.f64("threshold", 1e-4)?;
            p.cooldown = a.f64("cooldown", 0.0)? as u64;
            p.min_lr = a.f64("min_lr", 0.0)?;
            p.variant = Variant::PyTorch {
                relative: a.str("threshold_mode")?.as_deref() != Some("abs"),
                eps: a.f64("eps", 1e-8)?,
            };
            FrameworkSchedule::Plateau(p)
        }
        Flavor::Keras if kind == "ReduceLROnPlateau" => {
            let base = a.f64("base_lr", 0.001)?;
            let mut p = ReduceLrOnPlateau::keras(base);
            if a.str("mode")?.as_deref() == Some("max") {
                p = p.with_mode(Mode::Max);
            }
            p.factor = a.f64("factor", 0.1)?;
            p.patience = a.f64("patience", 10.0)? as u64;
            p.threshold = a.f64("min_delta", 1e-4)?;
            p.cooldown = a.f64("cooldown", 0.0)? as u64;
            p.min_lr = a.f64("min_lr", 0.0)?;
            FrameworkSchedule::Plateau(p)
        }
        Flavor::PyTorch => {
            let base = a.f64("base_lr", 0.1)?;
            let k = torch_kind(&kind, &mut a)?;
            FrameworkSchedule::Stepped(Box::new(torch::Scheduler::new(k, base)?))
        }
        Flavor::Keras => {
            FrameworkSchedule::Stepped(Box::new(Counted::new(keras_schedule(&kind, &mut a)?)))
        }
        Flavor::Optax => {
            FrameworkSchedule::Stepped(Box::new(Counted::new(optax_schedule(&kind, &mut a)?)))
        }
        Flavor::Tf1 => return Err(bad("TF1 schedules are not part of the format")),
    };
    a.finish(s)
}

fn int(a: &mut Args, key: &str, default: Option<i64>) -> Result<i64> {
    match (a.opt_f64(key)?, default) {
        (Some(x), _) => Ok(x as i64),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(bad(format!("{}: '{key}' is required", a.what))),
    }
}

fn req(a: &mut Args, key: &str) -> Result<f64> {
    a.opt_f64(key)?
        .ok_or_else(|| bad(format!("{}: '{key}' is required", a.what)))
}

fn torch_kind(kind: &str, a: &mut Args) -> Result<torch::Kind> {
    use torch::Kind as K;
    Ok(match kind {
        "StepLR" => K::StepLR {
            step_size: int(a, "step_size", None)?,
            gamma: a.f64("gamma", 0.1)?,
        },
        "MultiStepLR" => K::MultiStepLR {
            milestones: numbers(&a.take("milestones").unwrap_or(Value::Null))?
                .into_iter()
                .map(|m| m as i64)
                .collect(),
            gamma: a.f64("gamma", 0.1)?,
        },
        "ConstantLR" => K::ConstantLR {
            factor: a.f64("factor", 1.0 / 3.0)?,
            total_iters: int(a, "total_iters", Some(5))?,
        },
        "ExponentialLR" => K::ExponentialLR {
            gamma: req(a, "gamma")?,
        },
        "LinearLR" => K::LinearLR {
            start_factor: a.f64("start_factor", 1.0 / 3.0)?,
            end_factor: a.f64("end_factor", 1.0)?,
            total_iters: int(a, "total_iters", Some(5))?,
        },
        "CosineAnnealingLR" => K::CosineAnnealingLR {
            t_max: int(a, "T_max", None)?,
            eta_min: a.f64("eta_min", 0.0)?,
        },
        "PolynomialLR" => K::PolynomialLR {
            total_iters: int(a, "total_iters", Some(5))?,
            power: a.f64("power", 1.0)?,
        },
        "CosineAnnealingWarmRestarts" => K::CosineAnnealingWarmRestarts {
            t_0: int(a, "T_0", None)?,
            t_mult: int(a, "T_mult", Some(1))?,
            eta_min: a.f64("eta_min", 0.0)?,
        },
        "OneCycleLR" => K::OneCycleLR(torch::OneCycle {
            max_lr: req(a, "max_lr")?,
            total_steps: int(a, "total_steps", None)?,
            pct_start: a.f64("pct_start", 0.3)?,
            cosine: a.str("anneal_strategy")?.as_deref() != Some("linear"),
            div_factor: a.f64("div_factor", 25.0)?,
            final_div_factor: a.f64("final_div_factor", 1e4)?,
            three_phase: a.bool("three_phase", false)?,
        }),
        "SequentialLR" => {
            let children = a.take("schedulers").unwrap_or(Value::Null);
            let children = children
                .as_array()
                .ok_or_else(|| bad("SequentialLR needs 'schedulers'"))?
                .iter()
                .map(|c| {
                    let map = c
                        .as_object()
                        .ok_or_else(|| bad("scheduler must be an object"))?;
                    let k = map.get("kind").and_then(Value::as_str).unwrap_or_default();
                    let mut ca = Args::new(map, k);
                    ca.take("kind");
                    let kind = torch_kind(k, &mut ca)?;
                    ca.finish(kind)
                })
                .collect::<Result<Vec<_>>>()?;
            K::SequentialLR {
                schedulers: children,
                milestones: numbers(&a.take("milestones").unwrap_or(Value::Null))?
                    .into_iter()
                    .map(|m| m as i64)
                    .collect(),
            }
        }
        _ => return Err(bad(format!("unknown PyTorch scheduler '{kind}'"))),
    })
}

fn keras_schedule(kind: &str, a: &mut Args) -> Result<keras::Schedule> {
    use keras::Schedule as S;
    Ok(match kind {
        "ExponentialDecay" => S::ExponentialDecay {
            initial_learning_rate: req(a, "initial_learning_rate")?,
            decay_steps: req(a, "decay_steps")?,
            decay_rate: req(a, "decay_rate")?,
            staircase: a.bool("staircase", false)?,
        },
        "PiecewiseConstantDecay" => S::PiecewiseConstantDecay {
            boundaries: numbers(&a.take("boundaries").unwrap_or(Value::Null))?,
            values: numbers(&a.take("values").unwrap_or(Value::Null))?,
        },
        "CosineDecay" => S::CosineDecay {
            initial_learning_rate: req(a, "initial_learning_rate")?,
            decay_steps: req(a, "decay_steps")?,
            alpha: a.f64("alpha", 0.0)?,
            warmup_target: a.opt_f64("warmup_target")?,
            warmup_steps: a.f64("warmup_steps", 0.0)?,
        },
        "CosineDecayRestarts" => S::CosineDecayRestarts {
            initial_learning_rate: req(a, "initial_learning_rate")?,
            first_decay_steps: req(a, "first_decay_steps")?,
            t_mul: a.f64("t_mul", 2.0)?,
            m_mul: a.f64("m_mul", 1.0)?,
            alpha: a.f64("alpha", 0.0)?,
        },
        "PolynomialDecay" => S::PolynomialDecay {
            initial_learning_rate: req(a, "initial_learning_rate")?,
            decay_steps: req(a, "decay_steps")?,
            end_learning_rate: a.f64("end_learning_rate", 1e-4)?,
            power: a.f64("power", 1.0)?,
            cycle: a.bool("cycle", false)?,
        },
        "InverseTimeDecay" => S::InverseTimeDecay {
            initial_learning_rate: req(a, "initial_learning_rate")?,
            decay_steps: req(a, "decay_steps")?,
            decay_rate: req(a, "decay_rate")?,
            staircase: a.bool("staircase", false)?,
        },
        _ => return Err(bad(format!("unknown Keras schedule '{kind}'"))),
    })
}

fn optax_schedule(kind: &str, a: &mut Args) -> Result<optax::Schedule> {
    use optax::Schedule as S;
    Ok(match kind {
        "exponential_decay" => S::ExponentialDecay {
            init_value: req(a, "init_value")?,
            transition_steps: req(a, "transition_steps")?,
            decay_rate: req(a, "decay_rate")?,
            transition_begin: a.f64("transition_begin", 0.0)?,
            staircase: a.bool("staircase", false)?,
            end_value: a.opt_f64("end_value")?,
        },
        "piecewise_constant_schedule" => {
            let init_value = req(a, "init_value")?;
            let table = a.take("boundaries_and_scales").unwrap_or(Value::Null);
            let mut pairs = match table {
                Value::Null => Vec::new(),
                Value::Object(m) => m
                    .iter()
                    .map(|(k, v)| {
                        let b: f64 = k.parse().map_err(|_| bad(format!("boundary '{k}'")))?;
                        Ok((b, number(v)?))
                    })
                    .collect::<Result<Vec<_>>>()?,
                _ => return Err(bad("boundaries_and_scales must be an object")),
            };
            pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
            S::PiecewiseConstant {
                init_value,
                boundaries_and_scales: pairs,
            }
        }
        "linear_schedule" => S::linear(
            req(a, "init_value")?,
            req(a, "end_value")?,
            req(a, "transition_steps")?,
            a.f64("transition_begin", 0.0)?,
        ),
        "polynomial_schedule" => S::Polynomial {
            init_value: req(a, "init_value")?,
            end_value: req(a, "end_value")?,
            power: req(a, "power")?,
            transition_steps: req(a, "transition_steps")?,
            transition_begin: a.f64("transition_begin", 0.0)?,
        },
        "cosine_decay_schedule" => S::CosineDecay {
            init_value: req(a, "init_value")?,
            decay_steps: req(a, "decay_steps")?,
            alpha: a.f64("alpha", 0.0)?,
            exponent: a.f64("exponent", 1.0)?,
        },
        "warmup_cosine_decay_schedule" => S::warmup_cosine_decay(
            req(a, "init_value")?,
            req(a, "peak_value")?,
            req(a, "warmup_steps")?,
            req(a, "decay_steps")?,
            a.f64("end_value", 0.0)?,
            a.f64("exponent", 1.0)?,
        ),
        "cosine_onecycle_schedule" => S::cosine_onecycle(
            req(a, "transition_steps")?,
            req(a, "peak_value")?,
            a.f64("pct_start", 0.3)?,
            a.f64("div_factor", 25.0)?,
            a.f64("final_div_factor", 1e4)?,
        ),
        _ => return Err(bad(format!("unknown Optax schedule '{kind}'"))),
    })
}
