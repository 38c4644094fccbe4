//! Optax schedules, evaluated at the 0-based update count.

use super::{check_table, LrAtStep};
use crate::error::{Error, Result};
use std::f64::consts::PI;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Schedule {
    Constant(f64),
    ExponentialDecay {
        init_value: f64,
        transition_steps: f64,
        decay_rate: f64,
        transition_begin: f64,
        staircase: bool,
        end_value: Option<f64>,
    },
    /// Multiplies by `scale` once `count >= boundary` (Keras switches after it).
    PiecewiseConstant {
        init_value: f64,
        boundaries_and_scales: Vec<(f64, f64)>,
    },
    /// `linear_schedule` is the `power = 1` case.
    Polynomial {
        init_value: f64,
        end_value: f64,
        power: f64,
        transition_steps: f64,
        transition_begin: f64,
    },
    CosineDecay {
        init_value: f64,
        decay_steps: f64,
        alpha: f64,
        exponent: f64,
    },
    /// Cosine interpolation between `values` at `boundaries` (`cosine_onecycle_schedule`).
    PiecewiseCosine {
        boundaries: Vec<f64>,
        values: Vec<f64>,
    },
    /// `join_schedules`: `schedules[i+1]` takes over at `boundaries[i]`, counting from there.
    Join {
        schedules: Vec<Schedule>,
        boundaries: Vec<f64>,
    },
}

impl Schedule {
    pub fn linear(
        init_value: f64,
        end_value: f64,
        transition_steps: f64,
        transition_begin: f64,
    ) -> Self {
        Schedule::Polynomial {
            init_value,
            end_value,
            power: 1.0,
            transition_steps,
            transition_begin,
        }
    }

    /// `warmup_cosine_decay_schedule`: linear warmup, then cosine decay to `end_value`.
    pub fn warmup_cosine_decay(
        init_value: f64,
        peak_value: f64,
        warmup_steps: f64,
        decay_steps: f64,
        end_value: f64,
        exponent: f64,
    ) -> Self {
        Schedule::Join {
            schedules: vec![
                Schedule::linear(init_value, peak_value, warmup_steps, 0.0),
                Schedule::CosineDecay {
                    init_value: peak_value,
                    decay_steps: decay_steps - warmup_steps,
                    alpha: end_value / peak_value,
                    exponent,
                },
            ],
            boundaries: vec![warmup_steps],
        }
    }

    /// `cosine_onecycle_schedule`: up to `peak_value` at `int(pct_start·T)`, then down.
    pub fn cosine_onecycle(
        transition_steps: f64,
        peak_value: f64,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
    ) -> Self {
        let init = peak_value / div_factor;
        Schedule::PiecewiseCosine {
            boundaries: vec![
                0.0,
                (pct_start * transition_steps).trunc(),
                transition_steps.trunc(),
            ],
            values: vec![init, peak_value, init / final_div_factor],
        }
    }
}

impl LrAtStep for Schedule {
    const FRAMEWORK: &'static str = "optax";

    fn validate(&self) -> Result<()> {
        match self {
            Schedule::PiecewiseCosine { boundaries, values } => {
                check_table("piecewise cosine", boundaries, values.len(), true)
            }
            Schedule::Join {
                schedules,
                boundaries,
            } => {
                check_table("join_schedules", boundaries, schedules.len(), false)?;
                schedules.iter().try_for_each(LrAtStep::validate)
            }
            Schedule::PiecewiseConstant {
                boundaries_and_scales,
                ..
            } if boundaries_and_scales
                .iter()
                .any(|(b, s)| b.is_nan() || s.is_nan()) =>
            {
                Err(Error::InvalidHyperparameter(
                    "piecewise constant: NaN boundary or scale".into(),
                ))
            }
            _ => Ok(()),
        }
    }

    fn lr_at(&self, count: u64) -> f64 {
        let count = count as f64;
        match self {
            Schedule::Constant(v) => *v,
            Schedule::ExponentialDecay {
                init_value,
                transition_steps,
                decay_rate,
                transition_begin,
                staircase,
                end_value,
            } => {
                let c = count - transition_begin;
                let p = c / transition_steps;
                let p = if *staircase { p.floor() } else { p };
                let v = if c <= 0.0 {
                    *init_value
                } else {
                    init_value * decay_rate.powf(p)
                };
                match end_value {
                    Some(end) if *decay_rate < 1.0 => v.max(*end),
                    Some(end) => v.min(*end),
                    None => v,
                }
            }
            Schedule::PiecewiseConstant {
                init_value,
                boundaries_and_scales,
            } => boundaries_and_scales
                .iter()
                .filter(|(b, _)| count >= *b)
                .fold(*init_value, |v, (_, s)| v * s),
            Schedule::Polynomial {
                init_value,
                end_value,
                power,
                transition_steps,
                transition_begin,
            } => {
                let c = (count - transition_begin).clamp(0.0, *transition_steps);
                let frac = 1.0 - c / transition_steps;
                (init_value - end_value) * frac.powf(*power) + end_value
            }
            Schedule::CosineDecay {
                init_value,
                decay_steps,
                alpha,
                exponent,
            } => {
                let c = count.min(*decay_steps);
                let cosine = 0.5 * (1.0 + (PI * c / decay_steps).cos());
                init_value * ((1.0 - alpha) * cosine.powf(*exponent) + alpha)
            }
            // Unvalidated tables that are short give NaN, which the optimizer refuses as an lr.
            Schedule::PiecewiseCosine { boundaries, values } => {
                if boundaries.is_empty() || values.len() != boundaries.len() {
                    return f64::NAN;
                }
                let last = boundaries.len() - 1;
                if count >= boundaries[last] || last == 0 {
                    return values[last];
                }
                let i = boundaries.partition_point(|&b| b <= count).max(1) - 1;
                let pct = (count - boundaries[i]) / (boundaries[i + 1] - boundaries[i]);
                let (from, to) = (values[i], values[i + 1]);
                to + (from - to) / 2.0 * ((PI * pct).cos() + 1.0)
            }
            Schedule::Join {
                schedules,
                boundaries,
            } => {
                let i = boundaries.partition_point(|&b| b <= count);
                let start = if i == 0 { 0.0 } else { boundaries[i - 1] };
                schedules
                    .get(i)
                    .map_or(f64::NAN, |s| s.lr_at((count - start) as u64))
            }
        }
    }
}
