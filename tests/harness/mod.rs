//! The conformance harness: replays a recorded framework trajectory (`docs/FORMAT.md`) through
//! fusedopt's public API and compares the result with what the framework recorded. Shared by
//! `tests/conformance.rs`, `tests/gpu.rs` and the `replay` example.
#![allow(dead_code)]

use fusedopt::porting::{
    number, numbers, rule_from_framework, schedule_from_framework, FrameworkSchedule, Ported,
};
use fusedopt::{
    Device, Flavor, GlobalNormClip, NonFinitePolicy, Optimizer, OptimizerOptions, ParamSet,
};
use serde_json::{Map, Value};

/// A harness error: a malformed case, or the library refusing it.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn bad(msg: impl Into<String>) -> Box<dyn std::error::Error + Send + Sync> {
    format!("bad conformance case: {}", msg.into()).into()
}

/// The JSON form of a value: non-finite values as FORMAT.md's strings.
pub fn json_number(x: f64) -> Value {
    if x.is_nan() {
        Value::from("NaN")
    } else if x.is_infinite() {
        Value::from(if x > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        Value::from(x)
    }
}

fn floats(v: &Value) -> Result<Vec<f32>> {
    Ok(numbers(v)?.into_iter().map(|x| x as f32).collect())
}

/// What a replay produced (FORMAT.md's output object).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replay {
    pub name: String,
    /// `params[step][tensor][element]`; empty for schedule cases.
    pub params: Vec<Vec<Vec<f32>>>,
    /// The parameters to evaluate at after each step ([`Optimizer::eval_param`]), alike.
    pub eval_params: Vec<Vec<Vec<f32>>>,
    pub global_norm: Option<Vec<f64>>,
    pub lrs: Vec<f64>,
}

impl Replay {
    pub fn to_json(&self) -> Value {
        let steps = |v: &[Vec<Vec<f32>>]| -> Vec<Value> {
            v.iter()
                .map(|step| {
                    Value::from(
                        step.iter()
                            .map(|t| {
                                Value::from(
                                    t.iter().map(|&x| json_number(x as f64)).collect::<Vec<_>>(),
                                )
                            })
                            .collect::<Vec<_>>(),
                    )
                })
                .collect()
        };
        serde_json::json!({
            "name": self.name,
            "params": steps(&self.params),
            "eval_params": steps(&self.eval_params),
            "global_norm": self.global_norm.as_ref().map(|n| n.iter().map(|&x| json_number(x)).collect::<Vec<_>>()),
            "lrs": self.lrs.iter().map(|&x| json_number(x)).collect::<Vec<_>>(),
        })
    }
}

fn field<'a>(case: &'a Map<String, Value>, key: &str) -> Result<&'a Value> {
    case.get(key)
        .ok_or_else(|| bad(format!("case has no '{key}'")))
}

/// Runs a case (optimizer trajectory or schedule) through the public API. Expected values are never
/// read.
pub fn replay(case: &Value, device: Device) -> Result<Replay> {
    let case = case
        .as_object()
        .ok_or_else(|| bad("a case is a JSON object"))?;
    let name = field(case, "name")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    let flavor: Flavor = field(case, "flavor")?
        .as_str()
        .ok_or_else(|| bad("flavor must be a string"))?
        .parse()?;
    if let Some(spec) = case.get("schedule") {
        return replay_schedule(name, flavor, spec, case);
    }
    let opt_spec = field(case, "optimizer")?
        .as_object()
        .ok_or_else(|| bad("optimizer must be an object"))?;
    let kind = opt_spec
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut args = opt_spec.clone();
    args.remove("kind");
    let decayed = case
        .get("add_decayed_weights")
        .filter(|v| !v.is_null())
        .map(number)
        .transpose()?;
    let Ported { rule, lr } = rule_from_framework(flavor, kind, &args, decayed)?;
    let clip = case
        .get("clip_global_norm")
        .filter(|v| !v.is_null())
        .map(number)
        .transpose()?;
    let lrs = case
        .get("lrs")
        .filter(|v| !v.is_null())
        .map(numbers)
        .transpose()?;

    let mut builder = ParamSet::builder();
    let params0 = field(case, "params0")?
        .as_array()
        .ok_or_else(|| bad("params0"))?;
    for (i, t) in params0.iter().enumerate() {
        let shape: Vec<usize> = numbers(t.get("shape").unwrap_or(&Value::Null))?
            .into_iter()
            .map(|d| d as usize)
            .collect();
        builder.add(
            &format!("t{i}"),
            &shape,
            &floats(t.get("values").unwrap_or(&Value::Null))?,
        )?;
    }
    let options = OptimizerOptions {
        clip: clip.map(|c| GlobalNormClip::new(c, flavor)),
        non_finite: NonFinitePolicy::Propagate,
        ..Default::default()
    };
    let mut opt = Optimizer::with_options(builder.build(device)?, rule, lr, options)?;
    // A scheduler stepped after every optimizer step, setting the lr (and cycling momentum).
    if let Some(spec) = case.get("lr_scheduler").filter(|v| !v.is_null()) {
        let spec = spec
            .as_object()
            .ok_or_else(|| bad("lr_scheduler must be an object"))?;
        match schedule_from_framework(flavor, spec)? {
            FrameworkSchedule::Stepped(s) => opt.set_schedule(Some(s))?,
            FrameworkSchedule::Plateau(_) => return Err(bad("lr_scheduler cannot be a plateau")),
        }
    }
    let grads = field(case, "grads")?
        .as_array()
        .ok_or_else(|| bad("grads"))?;
    let mut out = Replay {
        name,
        global_norm: clip.map(|_| Vec::new()),
        ..Default::default()
    };
    for (t, step) in grads.iter().enumerate() {
        if let Some(lrs) = &lrs {
            opt.set_lr(*lrs.get(t).ok_or_else(|| bad("fewer lrs than steps"))?)?;
        }
        let step = step
            .as_array()
            .ok_or_else(|| bad("grads[t] must be an array"))?;
        if step.len() != params0.len() {
            return Err(bad(format!(
                "grads[{t}] has {} tensors, params0 {}",
                step.len(),
                params0.len()
            )));
        }
        for (i, g) in step.iter().enumerate() {
            opt.params_mut().set_grad(&format!("t{i}"), &floats(g)?)?;
        }
        opt.step()?;
        let report = opt.report()?;
        if let (Some(norms), Some(n)) = (out.global_norm.as_mut(), report.global_norm) {
            norms.push(n);
        }
        out.lrs.push(report.lr);
        out.params.push(
            (0..params0.len())
                .map(|i| opt.params().read_param(&format!("t{i}")))
                .collect::<fusedopt::Result<_>>()?,
        );
        out.eval_params.push(
            (0..params0.len())
                .map(|i| opt.eval_param(&format!("t{i}")))
                .collect::<fusedopt::Result<_>>()?,
        );
    }
    Ok(out)
}

fn replay_schedule(
    name: String,
    flavor: Flavor,
    spec: &Value,
    case: &Map<String, Value>,
) -> Result<Replay> {
    let spec = spec
        .as_object()
        .ok_or_else(|| bad("schedule must be an object"))?;
    let steps = number(field(case, "steps")?)? as usize;
    let lrs = match schedule_from_framework(flavor, spec)? {
        FrameworkSchedule::Stepped(mut s) => (0..steps)
            .map(|_| {
                let lr = s.lr();
                s.step();
                lr
            })
            .collect(),
        FrameworkSchedule::Plateau(mut p) => numbers(field(case, "metrics")?)?
            .into_iter()
            .map(|m| p.observe(m))
            .collect::<fusedopt::Result<_>>()?,
    };
    Ok(Replay {
        name,
        lrs,
        ..Default::default()
    })
}

/// Worst `|got − expected| / (1e-6 + 1e-5·|expected|)` over paired values (≤ 1 means agreement);
/// a NaN where the other side is not NaN, or a differing infinity, counts as infinite.
pub fn worst_error<'a>(pairs: impl IntoIterator<Item = (f64, f64)> + 'a) -> f64 {
    pairs
        .into_iter()
        .map(|(got, exp)| {
            if exp.is_nan() || got.is_nan() {
                if exp.is_nan() && got.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else if exp.is_infinite() || got.is_infinite() {
                if got == exp {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (got - exp).abs() / (1e-6 + 1e-5 * exp.abs())
            }
        })
        .fold(0.0, f64::max)
}

/// Compares a replay with the case's expectations; returns the worst normalised error.
pub fn compare(case: &Value, replay: &Replay) -> Result<f64> {
    let Some(expected) = case.get("expected_params") else {
        let exp = numbers(field(case.as_object().ok_or_else(|| bad("case"))?, "lrs")?)?;
        if exp.len() != replay.lrs.len() {
            return Ok(f64::INFINITY);
        }
        return Ok(worst_error(replay.lrs.iter().copied().zip(exp)));
    };
    let mut worst = trajectory_error(expected, &replay.params)?;
    if let Some(expected) = case.get("expected_eval_params") {
        worst = worst.max(trajectory_error(expected, &replay.eval_params)?);
    }
    if let (Some(exp), Some(got)) = (
        case.get("expected_global_norm").filter(|v| !v.is_null()),
        &replay.global_norm,
    ) {
        worst = worst.max(worst_error(got.iter().copied().zip(numbers(exp)?)));
    }
    Ok(worst)
}

/// The worst normalised error of a replayed `[step][tensor][element]` trajectory against the
/// recorded one.
fn trajectory_error(expected: &Value, got: &[Vec<Vec<f32>>]) -> Result<f64> {
    let steps = expected
        .as_array()
        .ok_or_else(|| bad("expected trajectory"))?;
    if steps.len() != got.len() {
        return Ok(f64::INFINITY);
    }
    let mut worst: f64 = 0.0;
    for (exp_step, got_step) in steps.iter().zip(got) {
        let tensors = exp_step
            .as_array()
            .ok_or_else(|| bad("expected trajectory[t]"))?;
        if tensors.len() != got_step.len() {
            return Ok(f64::INFINITY);
        }
        for (exp, got) in tensors.iter().zip(got_step) {
            let exp = numbers(exp)?;
            if exp.len() != got.len() {
                return Ok(f64::INFINITY);
            }
            worst = worst.max(worst_error(got.iter().map(|&g| g as f64).zip(exp)));
        }
    }
    Ok(worst)
}
