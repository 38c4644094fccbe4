//! Hooks for the tests that compare what is written twice (not part of the API).

pub use crate::step::{StepParams, StepState};

/// One case of the step decision: the state before, the params, Σg², whether a norm was
/// computed.
pub type Case = (StepState, StepParams, f64, bool);

/// The host decider (src/step/decide.rs) on every case.
pub fn decide_on_host(cases: &[Case]) -> Vec<StepState> {
    cases
        .iter()
        .map(|&(mut st, q, sum_sq, have)| {
            crate::step::decide(&mut st, &q, sum_sq, have);
            st
        })
        .collect()
}

/// The device decider (src/step/decide.cuh) on every case, on CUDA device `ordinal`.
pub fn decide_on_device(ordinal: usize, cases: &[Case]) -> crate::Result<Vec<StepState>> {
    crate::cuda::norm::decide_cases(ordinal, cases)
}
