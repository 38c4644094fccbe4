//! ReduceLROnPlateau: cut the lr when a monitored metric stops improving.

use serde_json::{json, Value};

use super::{check_tag, LrSchedule};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    Min,
    Max,
}

/// Which framework's bookkeeping to follow.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Variant {
    /// `torch.optim.lr_scheduler.ReduceLROnPlateau`: reduce on the (patience+1)-th bad epoch;
    /// improvement is relative (`best·(1 ∓ threshold)`) or absolute; a cut smaller than `eps` is
    /// ignored.
    PyTorch { relative: bool, eps: f64 },
    /// `keras.callbacks.ReduceLROnPlateau`: reduce when `wait >= patience`; improvement beats
    /// `best ∓ min_delta`; no cut once the lr is at `min_lr`.
    Keras,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReduceLrOnPlateau {
    pub mode: Mode,
    pub factor: f64,
    pub patience: u64,
    /// PyTorch `threshold` or Keras `min_delta`.
    pub threshold: f64,
    pub cooldown: u64,
    pub min_lr: f64,
    pub variant: Variant,
    lr: f64,
    best: f64,
    bad: u64,
    cooldown_left: u64,
}

impl ReduceLrOnPlateau {
    /// PyTorch's defaults: min mode, factor 0.1, patience 10, relative threshold 1e-4.
    pub fn pytorch(lr: f64) -> Self {
        Self::new(
            lr,
            Mode::Min,
            0.1,
            10,
            1e-4,
            Variant::PyTorch {
                relative: true,
                eps: 1e-8,
            },
        )
    }

    /// Keras' defaults: min mode, factor 0.1, patience 10, min_delta 1e-4.
    pub fn keras(lr: f64) -> Self {
        Self::new(lr, Mode::Min, 0.1, 10, 1e-4, Variant::Keras)
    }

    fn new(lr: f64, mode: Mode, factor: f64, patience: u64, threshold: f64, v: Variant) -> Self {
        ReduceLrOnPlateau {
            mode,
            factor,
            patience,
            threshold,
            cooldown: 0,
            min_lr: 0.0,
            variant: v,
            lr,
            best: match mode {
                Mode::Min => f64::INFINITY,
                Mode::Max => f64::NEG_INFINITY,
            },
            bad: 0,
            cooldown_left: 0,
        }
    }

    /// Sets the mode and resets the best value to match it.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self.best = match mode {
            Mode::Min => f64::INFINITY,
            Mode::Max => f64::NEG_INFINITY,
        };
        self
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    fn check(&self) -> Result<()> {
        if !(self.factor < 1.0 && self.factor >= 0.0) {
            return Err(Error::InvalidHyperparameter(format!(
                "plateau factor must be in [0, 1), got {}",
                self.factor
            )));
        }
        Ok(())
    }

    fn improves(&self, x: f64) -> bool {
        let (t, best) = (self.threshold, self.best);
        match (self.variant, self.mode) {
            (Variant::PyTorch { relative: true, .. }, Mode::Min) => x < best * (1.0 - t),
            (Variant::PyTorch { relative: true, .. }, Mode::Max) => x > best * (1.0 + t),
            (_, Mode::Min) => x < best - t,
            (_, Mode::Max) => x > best + t,
        }
    }

    /// Feeds the metric of one epoch; returns the lr in force afterwards.
    pub fn observe(&mut self, metric: f64) -> Result<f64> {
        self.check()?;
        match self.variant {
            Variant::PyTorch { eps, .. } => {
                if self.improves(metric) {
                    self.best = metric;
                    self.bad = 0;
                } else {
                    self.bad += 1;
                }
                if self.cooldown_left > 0 {
                    self.cooldown_left -= 1;
                    self.bad = 0;
                }
                if self.bad > self.patience {
                    let new = (self.lr * self.factor).max(self.min_lr);
                    if self.lr - new > eps {
                        self.lr = new;
                    }
                    self.cooldown_left = self.cooldown;
                    self.bad = 0;
                }
            }
            Variant::Keras => {
                let in_cooldown = self.cooldown_left > 0;
                if in_cooldown {
                    self.cooldown_left -= 1;
                    self.bad = 0;
                }
                if self.improves(metric) {
                    self.best = metric;
                    self.bad = 0;
                } else if self.cooldown_left == 0 {
                    self.bad += 1;
                    if self.bad >= self.patience && self.lr > (self.min_lr as f32) as f64 {
                        self.lr = (self.lr * self.factor).max(self.min_lr);
                        self.cooldown_left = self.cooldown;
                        self.bad = 0;
                    }
                }
            }
        }
        Ok(self.lr)
    }
}

/// A float as JSON, non-finite values as strings (JSON numbers cannot be ±∞: `best` starts so).
fn float(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

fn unfloat(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str()?.parse().ok())
}

/// Attached to an optimizer, the plateau rule sets the lr from the metrics the training loop
/// observes ([`crate::Optimizer::observe`]); steps do not move it.
impl LrSchedule for ReduceLrOnPlateau {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn step(&mut self) {}

    fn observe(&mut self, metric: f64) -> Result<()> {
        ReduceLrOnPlateau::observe(self, metric).map(|_| ())
    }

    fn boxed_clone(&self) -> Box<dyn LrSchedule> {
        Box::new(self.clone())
    }

    fn validate(&self) -> Result<()> {
        self.check()
    }

    fn save(&self) -> Value {
        json!({
            "schedule": "plateau",
            "config": {
                "mode": self.mode, "factor": self.factor, "patience": self.patience,
                "threshold": self.threshold, "cooldown": self.cooldown, "min_lr": self.min_lr,
                "variant": self.variant,
            },
            "lr": self.lr, "best": float(self.best), "bad": self.bad,
            "cooldown_left": self.cooldown_left,
        })
    }

    fn restore(&mut self, saved: &Value) -> Result<()> {
        check_tag(saved, "plateau")?;
        let bad =
            |what: &str| Error::InvalidHyperparameter(format!("saved plateau schedule: {what}"));
        let mine = &self.save()["config"];
        if saved["config"] != *mine {
            return Err(bad(&format!(
                "configured as {}, this one as {mine}",
                saved["config"]
            )));
        }
        let lr = saved["lr"].as_f64().filter(|l| l.is_finite() && *l >= 0.0);
        let best = unfloat(&saved["best"]);
        let counts = (saved["bad"].as_u64(), saved["cooldown_left"].as_u64());
        match (lr, best, counts) {
            (Some(lr), Some(best), (Some(b), Some(c))) => {
                self.lr = lr;
                self.best = best;
                self.bad = b;
                self.cooldown_left = c;
                Ok(())
            }
            _ => Err(bad("its position is not a valid one")),
        }
    }
}
