//! Rules from a framework's optimizer name and its own constructor arguments.

use serde_json::{Map, Value};

use super::{bad, Args, Knob};
use crate::error::Result;
use crate::optim::{
    Adadelta, Adagrad, Adam, Adamax, Ademamix, Adopt, AmsGrad, Common, EpsPlacement, Flavor, Lion,
    Nadam, Radam, RmsProp, Rule, ScheduleFree, ScheduleFreeBase, Sgd, WeightDecay,
};

/// How a framework's optimizer takes weight decay.
#[derive(Clone, Copy, PartialEq)]
enum DecayArg {
    /// No weight-decay argument.
    Absent,
    /// `weight_decay` is coupled L2 (PyTorch's classic optimizers; Optax's `adadelta`, which
    /// chains `add_decayed_weights` first).
    Coupled,
    /// `weight_decay` is coupled unless `decoupled_weight_decay` (PyTorch Adam, RAdam).
    CoupledUnlessFlag,
    /// `weight_decay` is decoupled (PyTorch AdamW, every Keras optimizer, Optax's `*w` and `lion`,
    /// the reference Lion).
    Decoupled,
}

fn decay_arg(flavor: Flavor, kind: &str) -> DecayArg {
    use DecayArg::*;
    match (flavor, kind) {
        (Flavor::Tf1, _) => Absent,
        (Flavor::Keras, _) => Decoupled,
        (Flavor::Optax, "adamw" | "nadamw" | "adamaxw" | "lion" | "ademamix") => Decoupled,
        (Flavor::Optax | Flavor::PyTorch, "schedule_free_adamw") => Decoupled,
        (Flavor::Optax, "adadelta" | "schedule_free_sgd") => Coupled,
        (Flavor::Optax, _) => Absent,
        (Flavor::PyTorch, "adamw" | "lion") => Decoupled,
        (Flavor::PyTorch, "adam" | "radam" | "nadam") => CoupledUnlessFlag,
        (Flavor::PyTorch, _) => Coupled,
    }
}

/// Builds the rule a framework's optimizer computes from its own constructor arguments.
/// `kind` is the optimizer's name in that framework, lower case: `sgd`, `adam`, `adamw`,
/// `rmsprop`, `adagrad`, `adamax`, `adadelta`, `nadam` (PyTorch and Keras: [`Nadam`]; Optax:
/// Adam with Nesterov momentum); `radam` (PyTorch, Optax); `lion` (Keras, Optax, and for PyTorch
/// the reference `lion-pytorch`); Optax's `amsgrad`, `nadamw`, `adamaxw`, and `adopt` and
/// `ademamix` from `optax.contrib`; `schedule_free_sgd` and `schedule_free_adamw` (Optax's
/// `optax.contrib` functions, and for PyTorch the reference `schedulefree` package's
/// `SGDScheduleFree` and `AdamWScheduleFree`). A framework argument that is Python code (Optax's
/// `clip_value_fn`, a schedule for `b3` or `alpha`) is not an argument here: refused. `add_decayed_weights` is Optax's coupled L2 chained before the optimizer.
pub fn rule_from_framework(
    flavor: Flavor,
    kind: &str,
    args: &Map<String, Value>,
    add_decayed_weights: Option<f64>,
) -> Result<Ported> {
    let f = flavor;
    let optax = f == Flavor::Optax;
    let mut a = Args::new(args, &format!("{flavor:?} {kind}"));
    let lr = a.knob(f, Knob::Lr, default_lr(f, kind))?;
    // The knobs every rule has (weight decay comes after: it depends on the rule).
    let common = |a: &mut Args, d: &Common| -> Result<Common> {
        Ok(Common {
            maximize: a.flag(f, Knob::Maximize, false)?,
            ..*d
        })
    };
    // β1, β2 as `betas` (PyTorch) or one by one.
    let betas = |a: &mut Args, d: (f64, f64)| -> Result<(f64, f64)> {
        if f == Flavor::PyTorch {
            a.pair("betas", d)
        } else {
            Ok((a.knob(f, Knob::Beta1, d.0)?, a.knob(f, Knob::Beta2, d.1)?))
        }
    };
    let missing = || bad(format!("{flavor:?} has no optimizer '{kind}'"));
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
        "nadam" if matches!(f, Flavor::PyTorch | Flavor::Keras) => {
            let d = Nadam::preset(f);
            let (beta1, beta2) = betas(&mut a, (d.beta1, d.beta2))?;
            Rule::Nadam(Nadam {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                momentum_decay: if f == Flavor::PyTorch {
                    a.f64("momentum_decay", d.momentum_decay)?
                } else {
                    d.momentum_decay
                },
            })
        }
        "adam" | "adamw" | "amsgrad" | "nadam" | "nadamw" => {
            let d = match kind {
                "adam" => Adam::preset(f),
                "adamw" => Adam::adamw(f),
                "amsgrad" if optax => Adam::amsgrad(f),
                "nadam" if optax => Adam::nadam_optax(),
                "nadamw" if optax => Adam {
                    nesterov: true,
                    ..Adam::adamw(f)
                },
                _ => return Err(missing()),
            };
            let (beta1, beta2) = betas(&mut a, (d.beta1, d.beta2))?;
            let amsgrad = match a.flag(f, Knob::AmsGrad, d.amsgrad != AmsGrad::Off)? {
                true if d.amsgrad == AmsGrad::Off => AmsGrad::MaxRaw,
                true => d.amsgrad,
                false => AmsGrad::Off,
            };
            // Optax's adam and adamw take `nesterov` (nadam and nadamw are them with True).
            let nesterov = match kind {
                "adam" | "adamw" | "nadam" | "nadamw" if optax => a.bool("nesterov", d.nesterov)?,
                _ => d.nesterov,
            };
            Rule::Adam(Adam {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                eps_root: a.knob(f, Knob::EpsRoot, 0.0)?,
                amsgrad,
                nesterov,
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
                nesterov: if optax {
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
        "adamax" | "adamaxw" if f != Flavor::Tf1 && (kind == "adamax" || optax) => {
            let d = match kind {
                "adamaxw" => Adamax::preset(f).with_weight_decay(WeightDecay::Decoupled(1e-4)),
                _ => Adamax::preset(f),
            };
            let (beta1, beta2) = betas(&mut a, (d.beta1, d.beta2))?;
            Rule::Adamax(Adamax {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                ..d
            })
        }
        "lion" if f != Flavor::Tf1 => {
            let d = Lion::preset(f);
            let (beta1, beta2) = betas(&mut a, (d.beta1, d.beta2))?;
            if f == Flavor::PyTorch {
                // lion-pytorch's Triton kernel computes the same update; it has no `maximize`.
                a.bool("use_triton", false)?;
                if args.contains_key("maximize") {
                    return Err(bad("lion-pytorch's Lion has no argument 'maximize'"));
                }
            }
            Rule::Lion(Lion {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                ..d
            })
        }
        "radam" if matches!(f, Flavor::PyTorch | Flavor::Optax) => {
            let d = Radam::preset(f);
            let (beta1, beta2) = betas(&mut a, (d.beta1, d.beta2))?;
            Rule::Radam(Radam {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                eps_root: a.knob(f, Knob::EpsRoot, 0.0)?,
                threshold: if optax {
                    a.f64("threshold", d.threshold)?
                } else {
                    d.threshold
                },
                nesterov: optax && a.bool("nesterov", false)?,
                ..d
            })
        }
        "adadelta" if f != Flavor::Tf1 => {
            let d = Adadelta::preset(f);
            let mut common = common(&mut a, &d.common)?;
            // Optax's default learning_rate None skips `scale_by_learning_rate`, and with it the
            // sign flip: the update then ascends, which is `maximize` at lr 1.
            let no_lr = !matches!(args.get("learning_rate"), Some(v) if !v.is_null());
            if optax && no_lr {
                common.maximize = true;
                if args
                    .get("weight_decay")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
                    != 0.0
                {
                    return Err(bad(
                        "Optax adadelta without a learning_rate ascends along the decayed \
                         gradient, which no fusedopt rule computes: give a learning_rate",
                    ));
                }
            }
            Rule::Adadelta(Adadelta {
                common,
                rho: a.f64("rho", d.rho)?,
                eps: a.knob(f, Knob::Eps, d.eps)?,
            })
        }
        "adopt" if optax => {
            let d = Adopt::preset(f);
            let (beta1, beta2) = betas(&mut a, (d.beta1, d.beta2))?;
            Rule::Adopt(Adopt {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                clipping: a.bool("use_clipping", d.clipping)?,
                nesterov: a.bool("nesterov", d.nesterov)?,
            })
        }
        "ademamix" if optax => {
            let d = Ademamix::preset(f);
            let (beta1, beta2) = betas(&mut a, (d.beta1, d.beta2))?;
            Rule::Ademamix(Ademamix {
                common: common(&mut a, &d.common)?,
                beta1,
                beta2,
                beta3: a.f64("b3", d.beta3)?,
                alpha: a.f64("alpha", d.alpha)?,
                eps: a.knob(f, Knob::Eps, d.eps)?,
                eps_root: a.knob(f, Knob::EpsRoot, d.eps_root)?,
            })
        }
        "schedule_free_sgd" | "schedule_free_adamw"
            if matches!(f, Flavor::PyTorch | Flavor::Optax) =>
        {
            let adamw = kind == "schedule_free_adamw";
            let d = if adamw {
                ScheduleFree::adamw(f)
            } else {
                ScheduleFree::sgd(f)
            };
            let (beta1, beta2) = match (f, adamw) {
                (Flavor::PyTorch, false) => (a.knob(f, Knob::Momentum, d.beta1)?, d.beta2),
                (Flavor::PyTorch, true) => a.pair("betas", (d.beta1, d.beta2))?,
                (_, false) => (a.knob(f, Knob::Beta1, d.beta1)?, d.beta2),
                (_, true) => betas(&mut a, (d.beta1, d.beta2))?,
            };
            if optax && a.str("state_dtype")?.is_some() {
                return Err(bad(
                    "Optax's state_dtype is OptimizerOptions::state_dtype here (for every buffer)",
                ));
            }
            if !optax {
                a.bool("foreach", true)?;
            }
            Rule::ScheduleFree(ScheduleFree {
                common: common(&mut a, &d.common)?,
                base: if adamw {
                    ScheduleFreeBase::AdamW
                } else {
                    ScheduleFreeBase::Sgd
                },
                beta1,
                beta2,
                eps: if adamw {
                    a.knob(f, Knob::Eps, d.eps)?
                } else {
                    d.eps
                },
                warmup_steps: a.steps("warmup_steps", 0)?,
                r: if optax { 0.0 } else { a.f64("r", d.r)? },
                weight_lr_power: a.f64("weight_lr_power", d.weight_lr_power)?,
                ..d
            })
        }
        _ => return Err(missing()),
    };
    let decay = decay_arg(f, kind);
    if decay != DecayArg::Absent {
        let lambda = a.knob(f, Knob::WeightDecay, rule.weight_decay().coefficient())?;
        let decoupled = match decay {
            DecayArg::CoupledUnlessFlag => a.bool("decoupled_weight_decay", false)?,
            DecayArg::Coupled => false,
            _ => true,
        };
        // lion-pytorch's `decoupled_weight_decay` divides the decay by the initial lr:
        // θ *= 1 − (lr/lr₀)·λ.
        let lion_pytorch = f == Flavor::PyTorch && kind == "lion";
        let lambda = match lion_pytorch && a.bool("decoupled_weight_decay", false)? {
            true => lambda / lr,
            false => lambda,
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
    crate::rules::check_nonneg("lr", lr)?;
    Ok(Ported { rule, lr })
}

/// A framework optimizer as fusedopt builds it: the rule, and the learning rate the optimizer
/// starts at (the constructor's, or the framework's default).
#[derive(Clone, Debug, PartialEq)]
pub struct Ported {
    pub rule: Rule,
    pub lr: f64,
}

/// The framework's default lr for optimizer `kind` (where the framework has none, Optax's
/// mostly and TF1's, 1e-3).
fn default_lr(flavor: Flavor, kind: &str) -> f64 {
    use Flavor::*;
    match (flavor, kind) {
        (Keras, "sgd") => 0.01,
        (PyTorch, "rmsprop" | "adagrad") => 1e-2,
        (PyTorch, "adamax") => 2e-3,
        (PyTorch, "nadam") => 2e-3,
        (PyTorch, "lion") => 1e-4,
        (PyTorch | Optax, "adadelta") => 1.0,
        (_, "schedule_free_sgd") => 1.0,
        (_, "schedule_free_adamw") => 2.5e-3,
        _ => 1e-3,
    }
}

fn set_weight_decay(rule: &mut Rule, wd: WeightDecay) {
    rule.common_mut().weight_decay = wd;
}
