//! Learning-rate schedules with each framework's own clock and arithmetic.
//!
//! - [`torch`]: PyTorch's schedulers, stateful and *recursive* (each value computed from the previous
//!   one, as `scheduler.step()` does), advanced by the caller per epoch or per iteration.
//! - [`keras`] and [`optax`]: pure functions of the 0-based optimizer step count.
//! - [`plateau`]: ReduceLROnPlateau, driven by a monitored metric, in the PyTorch and Keras variants.
//!
//! Everything implements [`LrSchedule`]: the lr in force now, one tick of the schedule's clock,
//! and an observed metric (for plateau schedules). An [`crate::Optimizer`] can own one, tick it
//! after every applied step and pass it metrics ([`crate::Optimizer::observe`]); changing the lr
//! is a scalar write, nothing is rebuilt. Every schedule saves and restores its position, so
//! checkpoints carry it.

pub mod keras;
pub mod optax;
pub mod plateau;
pub mod torch;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The largest step or epoch count a schedule accepts from a checkpoint (exact in f64).
pub(crate) const MAX_COUNT: u64 = 1 << 53;

/// A learning-rate schedule: the value in force now, and one tick of its clock.
pub trait LrSchedule: Send + Sync + std::fmt::Debug {
    fn lr(&self) -> f64;
    /// One tick of the clock, after every applied step.
    fn step(&mut self);
    /// The momentum (SGD, RMSProp) or β1 (the Adam family, Lion) the schedule sets for the next
    /// step, for schedules that cycle it (PyTorch's `OneCycleLR` and `CyclicLR` with
    /// `cycle_momentum`); `None` leaves the rule's own.
    fn momentum(&self) -> Option<f64> {
        None
    }
    /// A metric the training loop observed (a validation loss, say): ReduceLROnPlateau decides
    /// from it; schedules driven by the step count ignore it.
    fn observe(&mut self, _metric: f64) -> Result<()> {
        Ok(())
    }
    /// A copy behind a new box (lets an optimizer holding a schedule be cloned).
    fn boxed_clone(&self) -> Box<dyn LrSchedule>;
    /// Refuses a schedule that cannot give an lr at every step (empty or short tables).
    fn validate(&self) -> Result<()>;
    /// The schedule's configuration and position, as a checkpoint records them.
    fn save(&self) -> Value;
    /// Moves to the position `saved` (from [`LrSchedule::save`]) records; refuses, changing
    /// nothing, one saved by a schedule of another kind or configuration.
    fn restore(&mut self, saved: &Value) -> Result<()>;
}

/// A schedule that is a pure function of a 0-based step count (Keras, Optax).
pub trait LrAtStep:
    Send + Sync + std::fmt::Debug + Clone + PartialEq + Serialize + DeserializeOwned
{
    /// Whose schedule this is, as checkpoints name it.
    const FRAMEWORK: &'static str;
    fn lr_at(&self, count: u64) -> f64;
    /// Refuses tables and arguments that leave some step without an lr.
    fn validate(&self) -> Result<()>;
}

/// A pure schedule with its step counter, so it can drive an optimizer.
#[derive(Clone, Debug)]
pub struct Counted<S> {
    pub schedule: S,
    pub count: u64,
}

impl<S> Counted<S> {
    pub fn new(schedule: S) -> Self {
        Counted { schedule, count: 0 }
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidHyperparameter(reason.into())
}

/// The `"schedule"` tag of a saved schedule, checked against `expected`.
fn check_tag(saved: &Value, expected: &str) -> Result<()> {
    match saved.get("schedule").and_then(Value::as_str) {
        Some(tag) if tag == expected => Ok(()),
        Some(tag) => Err(invalid(format!(
            "the saved schedule is a {tag} schedule, this one is a {expected} schedule"
        ))),
        None => Err(invalid("the saved schedule has no kind")),
    }
}

impl<S: LrAtStep + 'static> LrSchedule for Counted<S> {
    fn lr(&self) -> f64 {
        self.schedule.lr_at(self.count)
    }
    fn step(&mut self) {
        self.count = self.count.saturating_add(1);
    }
    fn boxed_clone(&self) -> Box<dyn LrSchedule> {
        Box::new(self.clone())
    }
    fn validate(&self) -> Result<()> {
        self.schedule.validate()
    }
    fn save(&self) -> Value {
        json!({"schedule": S::FRAMEWORK, "config": self.schedule, "count": self.count})
    }
    fn restore(&mut self, saved: &Value) -> Result<()> {
        check_tag(saved, S::FRAMEWORK)?;
        let config: S = serde_json::from_value(saved["config"].clone())
            .map_err(|e| invalid(format!("the saved {} schedule: {e}", S::FRAMEWORK)))?;
        if config != self.schedule {
            return Err(invalid(format!(
                "the saved schedule is {config:?}, this one is {:?}",
                self.schedule
            )));
        }
        match saved["count"].as_u64() {
            Some(count) if count <= MAX_COUNT => {
                self.count = count;
                Ok(())
            }
            _ => Err(invalid(format!(
                "the saved step count {} is not in 0..=2^53",
                saved["count"]
            ))),
        }
    }
}

/// Checks a table: `what` needs at least one entry and one more value than boundaries (or as
/// many, when `same_len`), with boundaries in increasing order.
pub(crate) fn check_table(
    what: &str,
    boundaries: &[f64],
    values: usize,
    same_len: bool,
) -> Result<()> {
    let want = if same_len {
        boundaries.len()
    } else {
        boundaries.len() + 1
    };
    if values == 0 || values != want {
        return Err(invalid(format!(
            "{what}: {} boundaries need {want} values, got {values}",
            boundaries.len()
        )));
    }
    if boundaries.iter().any(|b| b.is_nan()) || boundaries.windows(2).any(|w| w[0] > w[1]) {
        return Err(invalid(format!(
            "{what}: boundaries must be increasing, got {boundaries:?}"
        )));
    }
    Ok(())
}

/// Python's `%`: the result has the sign of the divisor.
pub(crate) fn py_mod(a: i64, b: i64) -> i64 {
    a.rem_euclid(b)
}
