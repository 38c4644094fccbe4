//! Keras 3 `keras.optimizers.schedules`, evaluated at the optimizer's 0-based iteration count.

use super::{check_table, LrAtStep};
use crate::error::Result;
use std::f64::consts::PI;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Schedule {
    ExponentialDecay {
        initial_learning_rate: f64,
        decay_steps: f64,
        decay_rate: f64,
        staircase: bool,
    },
    /// `values[i]` while `boundaries[i-1] < step <= boundaries[i]`.
    PiecewiseConstantDecay {
        boundaries: Vec<f64>,
        values: Vec<f64>,
    },
    /// Cosine decay clamped at `decay_steps`, after an optional linear warmup to `warmup_target`.
    CosineDecay {
        initial_learning_rate: f64,
        decay_steps: f64,
        alpha: f64,
        warmup_target: Option<f64>,
        warmup_steps: f64,
    },
    CosineDecayRestarts {
        initial_learning_rate: f64,
        first_decay_steps: f64,
        t_mul: f64,
        m_mul: f64,
        alpha: f64,
    },
    PolynomialDecay {
        initial_learning_rate: f64,
        decay_steps: f64,
        end_learning_rate: f64,
        power: f64,
        cycle: bool,
    },
    InverseTimeDecay {
        initial_learning_rate: f64,
        decay_steps: f64,
        decay_rate: f64,
        staircase: bool,
    },
}

/// `step / decay_steps`, floored when `staircase`.
fn progress(step: f64, decay_steps: f64, staircase: bool) -> f64 {
    let p = step / decay_steps;
    if staircase {
        p.floor()
    } else {
        p
    }
}

fn cosine_decay(step: f64, decay_steps: f64, from: f64, alpha: f64) -> f64 {
    let cosine = 0.5 * (1.0 + (PI * step / decay_steps).cos());
    from * ((1.0 - alpha) * cosine + alpha)
}

impl LrAtStep for Schedule {
    const FRAMEWORK: &'static str = "keras";

    fn validate(&self) -> Result<()> {
        match self {
            Schedule::PiecewiseConstantDecay { boundaries, values } => {
                check_table("PiecewiseConstantDecay", boundaries, values.len(), false)
            }
            _ => Ok(()),
        }
    }

    fn lr_at(&self, count: u64) -> f64 {
        let step = count as f64;
        match self {
            Schedule::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => initial_learning_rate * decay_rate.powf(progress(step, *decay_steps, *staircase)),
            Schedule::PiecewiseConstantDecay { boundaries, values } => {
                let i = boundaries.partition_point(|&b| b < step);
                // An unvalidated short table gives NaN, which the optimizer refuses as an lr.
                values.get(i).copied().unwrap_or(f64::NAN)
            }
            Schedule::CosineDecay {
                initial_learning_rate: init,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
            } => match warmup_target {
                None => cosine_decay(step.min(*decay_steps), *decay_steps, *init, *alpha),
                Some(target) => {
                    let step = step.min(decay_steps + warmup_steps);
                    if step < *warmup_steps {
                        (target - init) * (step / warmup_steps) + init
                    } else {
                        cosine_decay(step - warmup_steps, *decay_steps, *target, *alpha)
                    }
                }
            },
            Schedule::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
            } => {
                let fraction = step / first_decay_steps;
                let (i_restart, fraction) = if *t_mul == 1.0 {
                    let i = fraction.floor();
                    (i, fraction - i)
                } else {
                    let i = ((1.0 - fraction * (1.0 - t_mul)).ln() / t_mul.ln()).floor();
                    let sum_r = (1.0 - t_mul.powf(i)) / (1.0 - t_mul);
                    (i, (fraction - sum_r) / t_mul.powf(i))
                };
                let cosine = 0.5 * m_mul.powf(i_restart) * (1.0 + (PI * fraction).cos());
                initial_learning_rate * ((1.0 - alpha) * cosine + alpha)
            }
            Schedule::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                cycle,
            } => {
                let (step, decay_steps) = if *cycle {
                    let mult = if step == 0.0 {
                        1.0
                    } else {
                        (step / decay_steps).ceil()
                    };
                    (step, decay_steps * mult)
                } else {
                    (step.min(*decay_steps), *decay_steps)
                };
                let p = step / decay_steps;
                (initial_learning_rate - end_learning_rate) * (1.0 - p).powf(*power)
                    + end_learning_rate
            }
            Schedule::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => {
                initial_learning_rate
                    / (1.0 + decay_rate * progress(step, *decay_steps, *staircase))
            }
        }
    }
}
