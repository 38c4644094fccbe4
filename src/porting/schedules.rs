//! Schedules from a framework's class or function name and its own arguments.

use serde_json::{Map, Value};

use super::{bad, number, numbers, Args};
use crate::error::Result;
use crate::optim::Flavor;
use crate::schedule::plateau::{Mode, ReduceLrOnPlateau, Variant};
use crate::schedule::{keras, optax, torch, Counted, LrSchedule};

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
            // CyclicLR's own base_lr is required; the others take the optimizer's lr.
            let base = match kind.as_str() {
                "CyclicLR" => req(&mut a, "base_lr")?,
                _ => a.f64("base_lr", 0.1)?,
            };
            let k = torch_kind(&kind, &mut a, base)?;
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

/// `cycle_momentum` (default on) with `base_momentum` and `max_momentum` (defaults given).
fn momentum_range(a: &mut Args, (base, max): (f64, f64)) -> Result<Option<torch::MomentumRange>> {
    let range = torch::MomentumRange {
        base: a.f64("base_momentum", base)?,
        max: a.f64("max_momentum", max)?,
    };
    Ok(a.bool("cycle_momentum", true)?.then_some(range))
}

fn req(a: &mut Args, key: &str) -> Result<f64> {
    a.opt_f64(key)?
        .ok_or_else(|| bad(format!("{}: '{key}' is required", a.what)))
}

/// A PyTorch scheduler from its arguments; `base` is the optimizer's lr (CyclicLR's `base_lr`).
fn torch_kind(kind: &str, a: &mut Args, base: f64) -> Result<torch::Kind> {
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
            momentum: momentum_range(a, (0.85, 0.95))?,
        }),
        "CyclicLR" => {
            let up = a.f64("step_size_up", 2000.0)?;
            let mode = match a.str("mode")?.as_deref() {
                None | Some("triangular") => torch::CyclicMode::Triangular,
                Some("triangular2") => torch::CyclicMode::Triangular2,
                Some("exp_range") => torch::CyclicMode::ExpRange,
                Some(m) => return Err(bad(format!("CyclicLR has no mode '{m}'"))),
            };
            if a.take("scale_fn").is_some() {
                return Err(bad(
                    "CyclicLR: a custom scale_fn is Python code, not an argument",
                ));
            }
            // Without scale_fn PyTorch replaces scale_mode by the mode's own.
            a.str("scale_mode")?;
            K::CyclicLR(torch::Cyclic {
                base_lr: base,
                max_lr: req(a, "max_lr")?,
                step_size_up: up,
                step_size_down: a.f64("step_size_down", up)?,
                mode,
                gamma: a.f64("gamma", 1.0)?,
                momentum: momentum_range(a, (0.8, 0.9))?,
            })
        }
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
                    let kind = torch_kind(k, &mut ca, base)?;
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
