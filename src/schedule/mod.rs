//! Learning-rate schedules with each framework's own clock and arithmetic.
//!
//! - [`torch`]: PyTorch's schedulers, stateful and *recursive* (each value computed from the previous
//!   one, as `scheduler.step()` does), advanced by the caller per epoch or per iteration.
//! - [`keras`] and [`optax`]: pure functions of the 0-based optimizer step count.
//! - [`plateau`]: ReduceLROnPlateau, driven by a monitored metric, in the PyTorch and Keras variants.
//!
//! Everything implements [`LrSchedule`]: the lr in force now and one tick of the schedule's clock.
//! An [`crate::Optimizer`] can own one and tick it after every applied step; changing the lr is a
//! scalar write, nothing is rebuilt.

pub mod keras;
pub mod optax;
pub mod plateau;
pub mod torch;

/// A learning-rate schedule: the value in force now, and one tick of its clock.
pub trait LrSchedule: Send + Sync + std::fmt::Debug {
    fn lr(&self) -> f64;
    fn step(&mut self);
    /// A copy behind a new box (lets an optimizer holding a schedule be cloned).
    fn boxed_clone(&self) -> Box<dyn LrSchedule>;
}

/// A schedule that is a pure function of a 0-based step count (Keras, Optax).
pub trait LrAtStep: Send + Sync + std::fmt::Debug {
    fn lr_at(&self, count: u64) -> f64;
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

impl<S: LrAtStep + Clone + 'static> LrSchedule for Counted<S> {
    fn lr(&self) -> f64 {
        self.schedule.lr_at(self.count)
    }
    fn step(&mut self) {
        self.count += 1;
    }
    fn boxed_clone(&self) -> Box<dyn LrSchedule> {
        Box::new(self.clone())
    }
}

/// Python's `%`: the result has the sign of the divisor.
pub(crate) fn py_mod(a: i64, b: i64) -> i64 {
    a.rem_euclid(b)
}
