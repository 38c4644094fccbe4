//! Porting a model: the rule and the schedule a framework computes, built from that framework's
//! own constructor arguments ([`rule_from_framework`], [`schedule_from_framework`]), so a model
//! ported from PyTorch, Keras 3, Optax or TensorFlow 1 trains the same way. A key the mapping
//! does not understand is an error ([`Error::FrameworkArgument`]), never ignored.
//!
//! Argument objects are JSON, as `docs/FORMAT.md` (the conformance case format) writes them;
//! `docs/SEMANTICS.md` says what each framework computes.

mod rules;
mod schedules;

pub use rules::{rule_from_framework, Ported};
pub use schedules::{schedule_from_framework, FrameworkSchedule};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::optim::Flavor;

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

    /// A whole number of steps, `default` when absent.
    fn steps(&mut self, key: &str, default: u64) -> Result<u64> {
        match self.opt_f64(key)? {
            None => Ok(default),
            Some(x) if x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(31) => Ok(x as u64),
            Some(x) => Err(bad(format!(
                "{}: '{key}' must be a whole number of steps, got {x}",
                self.what
            ))),
        }
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
