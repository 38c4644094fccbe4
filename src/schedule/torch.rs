//! PyTorch's `torch.optim.lr_scheduler`, reproduced with its recursion: `step()` computes the new
//! lr from the current one exactly as `get_lr()` does, and `SequentialLR` restarts a child with its
//! closed form at epoch 0 as `scheduler.step(0)` does.

use super::{check_tag, py_mod, LrSchedule, MAX_COUNT};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::f64::consts::PI;

/// Which scheduler, with PyTorch's constructor arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Kind {
    StepLR {
        step_size: i64,
        gamma: f64,
    },
    MultiStepLR {
        milestones: Vec<i64>,
        gamma: f64,
    },
    ConstantLR {
        factor: f64,
        total_iters: i64,
    },
    ExponentialLR {
        gamma: f64,
    },
    LinearLR {
        start_factor: f64,
        end_factor: f64,
        total_iters: i64,
    },
    CosineAnnealingLR {
        t_max: i64,
        eta_min: f64,
    },
    PolynomialLR {
        total_iters: i64,
        power: f64,
    },
    CosineAnnealingWarmRestarts {
        t_0: i64,
        t_mult: i64,
        eta_min: f64,
    },
    OneCycleLR(OneCycle),
    CyclicLR(Cyclic),
    SequentialLR {
        schedulers: Vec<Kind>,
        milestones: Vec<i64>,
    },
}

/// `OneCycleLR`'s arguments (closed form of `last_epoch`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneCycle {
    pub max_lr: f64,
    pub total_steps: i64,
    pub pct_start: f64,
    pub cosine: bool,
    pub div_factor: f64,
    pub final_div_factor: f64,
    pub three_phase: bool,
    /// `cycle_momentum` (PyTorch's default): momentum or β1 from `max` down to `base` while the
    /// lr rises, and back.
    #[serde(default)]
    pub momentum: Option<MomentumRange>,
}

/// The momentum (or Adam's β1) a cycling schedule moves between.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MomentumRange {
    pub base: f64,
    pub max: f64,
}

/// `CyclicLR`'s arguments (closed form of `last_epoch`; no custom `scale_fn`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cyclic {
    pub base_lr: f64,
    pub max_lr: f64,
    pub step_size_up: f64,
    pub step_size_down: f64,
    pub mode: CyclicMode,
    pub gamma: f64,
    /// `cycle_momentum`: momentum from `max` to `base` as the lr rises, and back.
    pub momentum: Option<MomentumRange>,
}

/// `CyclicLR`'s `mode`, which also fixes its scale mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CyclicMode {
    /// Scale 1, per cycle.
    Triangular,
    /// Scale 1/2^(cycle − 1), per cycle.
    Triangular2,
    /// Scale γ^iteration, per iteration.
    ExpRange,
}

impl Kind {
    /// `LinearLR` with PyTorch's defaults (1/3 → 1 over 5 iterations).
    pub fn linear_default() -> Kind {
        Kind::LinearLR {
            start_factor: 1.0 / 3.0,
            end_factor: 1.0,
            total_iters: 5,
        }
    }
}

/// One scheduler's state: the epoch counter and, for the children of `SequentialLR`, theirs.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Node {
    kind: Kind,
    last_epoch: i64,
    /// CosineAnnealingWarmRestarts: position in the current cycle and its length.
    t_cur: i64,
    t_i: i64,
    children: Vec<Node>,
}

/// A PyTorch scheduler attached to an lr (as if to one parameter group whose initial lr is
/// `base_lr`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scheduler {
    base_lr: f64,
    lr: f64,
    root: Node,
}

impl Node {
    fn new(kind: Kind) -> Self {
        let children = match &kind {
            Kind::SequentialLR { schedulers, .. } => {
                schedulers.iter().cloned().map(Node::new).collect()
            }
            _ => Vec::new(),
        };
        let t_i = match &kind {
            Kind::CosineAnnealingWarmRestarts { t_0, .. } => *t_0,
            _ => 0,
        };
        Node {
            kind,
            last_epoch: -1,
            t_cur: -1,
            t_i,
            children,
        }
    }

    /// `scheduler.step()`: advances the epoch and returns the new lr from the current one.
    fn step(&mut self, lr: f64, base: f64) -> f64 {
        if let Kind::SequentialLR { milestones, .. } = &self.kind {
            self.last_epoch += 1;
            let idx = milestones.partition_point(|&m| m <= self.last_epoch);
            let restart = idx > 0 && milestones[idx - 1] == self.last_epoch;
            let child = &mut self.children[idx];
            return if restart {
                child.last_epoch = 0;
                child.closed_form_at_zero(lr, base)
            } else {
                child.step(lr, base)
            };
        }
        if let Kind::CosineAnnealingWarmRestarts { t_0, t_mult, .. } = self.kind {
            if self.last_epoch < 0 {
                self.t_i = t_0;
                self.t_cur = 0;
            } else {
                self.t_cur += 1;
                if self.t_cur >= self.t_i {
                    self.t_cur -= self.t_i;
                    self.t_i = self.t_i.saturating_mul(t_mult);
                }
            }
        }
        self.last_epoch += 1;
        self.get_lr(lr, base)
    }

    /// `get_lr()` at `self.last_epoch`, recursive on the current `lr`.
    fn get_lr(&self, lr: f64, base: f64) -> f64 {
        let e = self.last_epoch;
        match &self.kind {
            Kind::StepLR { step_size, gamma } => {
                if e == 0 || e % step_size != 0 {
                    lr
                } else {
                    lr * gamma
                }
            }
            Kind::MultiStepLR { milestones, gamma } => {
                let hits = milestones.iter().filter(|&&m| m == e).count() as i32;
                lr * gamma.powi(hits)
            }
            Kind::ConstantLR {
                factor,
                total_iters,
            } => {
                if e == 0 {
                    lr * factor
                } else if e != *total_iters {
                    lr
                } else {
                    lr * (1.0 / factor)
                }
            }
            Kind::ExponentialLR { gamma } => {
                if e == 0 {
                    lr
                } else {
                    lr * gamma
                }
            }
            Kind::LinearLR {
                start_factor: s,
                end_factor: f,
                total_iters: n,
            } => {
                if e == 0 {
                    lr * s
                } else if e > *n {
                    lr
                } else {
                    lr * (1.0 + (f - s) / (*n as f64 * s + (e - 1) as f64 * (f - s)))
                }
            }
            Kind::CosineAnnealingLR { t_max, eta_min } => {
                let (t, eta) = (*t_max as f64, *eta_min);
                if e == 0 {
                    lr
                } else if py_mod(e - 1 - t_max, 2 * t_max) == 0 {
                    lr + (base - eta) * (1.0 - (PI / t).cos()) / 2.0
                } else {
                    (1.0 + (PI * e as f64 / t).cos()) / (1.0 + (PI * (e - 1) as f64 / t).cos())
                        * (lr - eta)
                        + eta
                }
            }
            Kind::PolynomialLR { total_iters, power } => {
                if e == 0 || e > *total_iters {
                    lr
                } else {
                    let n = *total_iters as f64;
                    let ratio = (1.0 - e as f64 / n) / (1.0 - (e - 1) as f64 / n);
                    lr * ratio.powf(*power)
                }
            }
            Kind::CosineAnnealingWarmRestarts { eta_min, .. } => {
                eta_min
                    + (base - eta_min) * (1.0 + (PI * self.t_cur as f64 / self.t_i as f64).cos())
                        / 2.0
            }
            Kind::OneCycleLR(c) => c.lr_at(e),
            Kind::CyclicLR(c) => c.at(e).0,
            Kind::SequentialLR { .. } => lr,
        }
    }

    /// `scheduler.step(0)`: the closed form at epoch 0 where one exists, else `get_lr()`.
    fn closed_form_at_zero(&self, lr: f64, base: f64) -> f64 {
        match &self.kind {
            Kind::ConstantLR { factor, .. } => base * factor,
            Kind::LinearLR { start_factor, .. } => base * start_factor,
            Kind::StepLR { .. }
            | Kind::MultiStepLR { .. }
            | Kind::ExponentialLR { .. }
            | Kind::CosineAnnealingLR { .. }
            | Kind::PolynomialLR { .. } => base,
            _ => self.get_lr(lr, base),
        }
    }
}

impl OneCycle {
    pub fn initial_lr(&self) -> f64 {
        self.max_lr / self.div_factor
    }

    fn lr_at(&self, step: i64) -> f64 {
        self.at(step).0
    }

    /// The lr and (with `cycle_momentum`) the momentum at `step`, as `get_lr()` computes them:
    /// each phase anneals both from its start to its end values.
    fn at(&self, step: i64) -> (f64, Option<f64>) {
        let initial = self.initial_lr();
        let min = initial / self.final_div_factor;
        let pct_end = self.pct_start * self.total_steps as f64;
        let last = (self.total_steps - 1) as f64;
        let (lo, hi) = self.momentum.map_or((0.0, 0.0), |m| (m.base, m.max));
        // (end step, lr from, lr to, momentum from, momentum to)
        let phases: &[(f64, f64, f64, f64, f64)] = if self.three_phase {
            &[
                (pct_end - 1.0, initial, self.max_lr, hi, lo),
                (2.0 * pct_end - 2.0, self.max_lr, initial, lo, hi),
                (last, initial, min, hi, hi),
            ]
        } else {
            &[
                (pct_end - 1.0, initial, self.max_lr, hi, lo),
                (last, self.max_lr, min, lo, hi),
            ]
        };
        let anneal = |from: f64, to: f64, pct: f64| {
            if self.cosine {
                to + (from - to) / 2.0 * ((PI * pct).cos() + 1.0)
            } else {
                (to - from) * pct + from
            }
        };
        let mut start_step = 0.0;
        let step = step as f64;
        for (i, &(end_step, from, to, m_from, m_to)) in phases.iter().enumerate() {
            if step <= end_step || i == phases.len() - 1 {
                let pct = (step - start_step) / (end_step - start_step);
                let momentum = self.momentum.map(|_| anneal(m_from, m_to, pct));
                return (anneal(from, to, pct), momentum);
            }
            start_step = end_step;
        }
        (min, None) // not reached: the last phase always answers
    }
}

impl Cyclic {
    /// The lr and (with `cycle_momentum`) the momentum at `epoch`, as `get_lr()` computes them.
    fn at(&self, epoch: i64) -> (f64, Option<f64>) {
        let total = self.step_size_up + self.step_size_down;
        let ratio = self.step_size_up / total;
        let e = epoch as f64;
        let cycle = (1.0 + e / total).floor();
        let x = 1.0 + e / total - cycle;
        let factor = if x <= ratio {
            x / ratio
        } else {
            (x - 1.0) / (ratio - 1.0)
        };
        let scale = match self.mode {
            CyclicMode::Triangular => 1.0,
            CyclicMode::Triangular2 => 1.0 / 2f64.powf(cycle - 1.0),
            CyclicMode::ExpRange => self.gamma.powf(e),
        };
        let lr = self.base_lr + (self.max_lr - self.base_lr) * factor * scale;
        let momentum = self
            .momentum
            .map(|m| m.max - (m.max - m.base) * factor * scale);
        (lr, momentum)
    }
}

impl Scheduler {
    /// Attaches a scheduler to an lr starting at `base_lr`, performing PyTorch's initial step.
    pub fn new(kind: Kind, base_lr: f64) -> Result<Self> {
        validate(&kind)?;
        let lr = match &kind {
            Kind::OneCycleLR(c) => c.initial_lr(),
            // CyclicLR sets the optimizer's lr to its base_lr.
            Kind::CyclicLR(c) => c.base_lr,
            _ => base_lr,
        };
        let base = lr;
        let mut root = Node::new(kind);
        // Each child was constructed (and took its initial step) before SequentialLR undid them all
        // and re-ran the first one's; only the first one's effect remains.
        let lr = if let Kind::SequentialLR { .. } = root.kind {
            root.last_epoch = 0;
            root.children[0].step(lr, base)
        } else {
            root.step(lr, base)
        };
        Ok(Scheduler {
            base_lr: base,
            lr,
            root,
        })
    }

    /// The epoch counter (`last_epoch`).
    pub fn last_epoch(&self) -> i64 {
        self.root.last_epoch
    }
}

impl LrSchedule for Scheduler {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn step(&mut self) {
        self.lr = self.root.step(self.lr, self.base_lr);
    }

    fn momentum(&self) -> Option<f64> {
        match &self.root.kind {
            Kind::OneCycleLR(c) => c.at(self.root.last_epoch).1,
            Kind::CyclicLR(c) => c.at(self.root.last_epoch).1,
            _ => None,
        }
    }

    fn boxed_clone(&self) -> Box<dyn LrSchedule> {
        Box::new(self.clone())
    }

    /// Checked when constructed ([`Scheduler::new`]).
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn save(&self) -> Value {
        json!({"schedule": "torch", "state": self})
    }

    fn restore(&mut self, saved: &Value) -> Result<()> {
        check_tag(saved, "torch")?;
        let bad = |m: String| Error::InvalidHyperparameter(m);
        let other: Scheduler = serde_json::from_value(saved["state"].clone())
            .map_err(|e| bad(format!("the saved torch scheduler: {e}")))?;
        if other.root.kind != self.root.kind || other.base_lr.to_bits() != self.base_lr.to_bits() {
            return Err(bad(format!(
                "the saved scheduler is {:?} from lr {}, this one is {:?} from lr {}",
                other.root.kind, other.base_lr, self.root.kind, self.base_lr
            )));
        }
        other.root.check_position()?;
        *self = other;
        Ok(())
    }
}

impl Node {
    /// Refuses counters a run cannot reach (a checkpoint edited by hand, say).
    fn check_position(&self) -> Result<()> {
        let max = MAX_COUNT as i64;
        let expected_children = match &self.kind {
            Kind::SequentialLR { schedulers, .. } => schedulers.len(),
            _ => 0,
        };
        if !(-1..=max).contains(&self.last_epoch)
            || !(-1..=max).contains(&self.t_cur)
            || self.t_i < 0
            || self.children.len() != expected_children
        {
            return Err(Error::InvalidHyperparameter(format!(
                "the saved scheduler position is impossible: {self:?}"
            )));
        }
        self.children.iter().try_for_each(Node::check_position)
    }
}

fn validate(kind: &Kind) -> Result<()> {
    let bad = |m: &str| Err(Error::InvalidHyperparameter(m.to_string()));
    // Epoch arithmetic (2·T_max, T_i·T_mult, milestone comparisons) stays exact and in range.
    let counts: Vec<i64> = match kind {
        Kind::StepLR { step_size, .. } => vec![*step_size],
        Kind::MultiStepLR { milestones, .. } => milestones.clone(),
        Kind::ConstantLR { total_iters, .. }
        | Kind::LinearLR { total_iters, .. }
        | Kind::PolynomialLR { total_iters, .. } => vec![*total_iters],
        Kind::CosineAnnealingLR { t_max, .. } => vec![*t_max],
        Kind::CosineAnnealingWarmRestarts { t_0, t_mult, .. } => vec![*t_0, *t_mult],
        Kind::OneCycleLR(c) => vec![c.total_steps],
        Kind::CyclicLR(c) => vec![c.step_size_up as i64, c.step_size_down as i64],
        Kind::SequentialLR { milestones, .. } => milestones.clone(),
        Kind::ExponentialLR { .. } => vec![],
    };
    if counts.iter().any(|c| c.unsigned_abs() > MAX_COUNT) {
        return bad("epoch counts and milestones must be within ±2^53");
    }
    match kind {
        Kind::StepLR { step_size, .. } if *step_size <= 0 => bad("StepLR step_size must be > 0"),
        Kind::ConstantLR { factor, .. } if !(0.0..=1.0).contains(factor) || *factor == 0.0 => {
            bad("ConstantLR factor must be in (0, 1]")
        }
        Kind::LinearLR { start_factor, .. } if *start_factor <= 0.0 || *start_factor > 1.0 => {
            bad("LinearLR start_factor must be in (0, 1]")
        }
        Kind::CosineAnnealingLR { t_max, .. } if *t_max <= 0 => bad("T_max must be > 0"),
        Kind::PolynomialLR { total_iters, .. } if *total_iters <= 0 => {
            bad("PolynomialLR total_iters must be > 0")
        }
        Kind::CosineAnnealingWarmRestarts { t_0, t_mult, .. } if *t_0 <= 0 || *t_mult < 1 => {
            bad("T_0 must be > 0 and T_mult >= 1")
        }
        Kind::OneCycleLR(c) if c.total_steps <= 0 || !(0.0..=1.0).contains(&c.pct_start) => {
            bad("OneCycleLR needs total_steps > 0 and pct_start in [0, 1]")
        }
        // PyTorch skips the momentum buffer at a momentum of 0, which a rule built with one
        // cannot follow; β1 must stay below 1.
        Kind::OneCycleLR(OneCycle {
            momentum: Some(m), ..
        })
        | Kind::CyclicLR(Cyclic {
            momentum: Some(m), ..
        }) if !(m.base > 0.0 && m.base < 1.0 && m.max > 0.0 && m.max < 1.0) => {
            bad("base_momentum and max_momentum must be in (0, 1)")
        }
        Kind::CyclicLR(c)
            if ![c.step_size_up, c.step_size_down]
                .iter()
                .all(|s| *s > 0.0 && s.is_finite()) =>
        {
            bad("CyclicLR needs step sizes > 0")
        }
        Kind::SequentialLR {
            schedulers,
            milestones,
        } => {
            if schedulers.len() != milestones.len() + 1 {
                return bad("SequentialLR needs one more scheduler than milestones");
            }
            let cycles = |k: &Kind| match k {
                Kind::OneCycleLR(c) => c.momentum.is_some(),
                Kind::CyclicLR(c) => c.momentum.is_some(),
                _ => false,
            };
            if schedulers.iter().any(cycles) {
                return bad(
                    "a momentum-cycling OneCycleLR or CyclicLR inside SequentialLR: turn off \
                     cycle_momentum there",
                );
            }
            schedulers.iter().try_for_each(validate)
        }
        _ => Ok(()),
    }
}
