//! A schedule's lrs ahead of a GPU. A step there is only enqueued, and whether it applies is
//! decided on the device, so the host cannot tick a schedule once per applied step as the CPU
//! engine does. Instead it writes the schedule's next lrs into a ring in device memory that the
//! update indexes by the device's own applied-step count, and synchronises only when the next
//! step could run past them (once every `LR_RING_LEN` steps) or when the schedule's position must
//! be known (a report, a checkpoint, an observed metric, another schedule).

use crate::error::{Error, Result};
use crate::schedule::LrSchedule;
use crate::step::StepState;

/// The lrs written to the device ring, from the applied-step count `anchor` on. The optimizer's
/// schedule stands at `anchor`; where the device stands is known only after reading its state.
#[derive(Clone, Debug)]
pub(crate) struct LrWindow {
    /// The applied-step count the schedule's position belongs to.
    pub anchor: u64,
    /// `lrs[i]`: the lr of the step that applies at count `anchor + i` (each one usable).
    pub lrs: Vec<f64>,
    /// Steps enqueued since the window was written: their counts lie in
    /// `anchor..anchor + enqueued`, so the next step's is inside the window while
    /// `enqueued < lrs.len()`.
    pub enqueued: usize,
}

impl LrWindow {
    /// The schedule's next `len` lrs from its current position, which is the device's count
    /// `anchor`, up to the first one `usable` refuses. Refuses, with `usable`'s error, when that
    /// is the very next one.
    pub fn ahead(
        schedule: &dyn LrSchedule,
        anchor: u64,
        len: usize,
        usable: impl Fn(f64) -> Result<()>,
    ) -> Result<Self> {
        let mut probe = schedule.boxed_clone();
        let mut lrs = Vec::with_capacity(len);
        while lrs.len() < len {
            let lr = probe.lr();
            if let Err(e) = usable(lr) {
                if lrs.is_empty() {
                    return Err(e);
                }
                break;
            }
            lrs.push(lr);
            probe.step();
        }
        Ok(LrWindow {
            anchor,
            lrs,
            enqueued: 0,
        })
    }

    /// A window no step can use: the next step writes a new one (or is refused).
    pub fn empty(anchor: u64) -> Self {
        LrWindow {
            anchor,
            lrs: Vec::new(),
            enqueued: 0,
        }
    }

    /// Whether the next step's count could fall outside the window.
    pub fn exhausted(&self) -> bool {
        self.enqueued >= self.lrs.len()
    }

    /// The lr the last step was given, from the step state read after it; `None` when no step
    /// was enqueued since the window was written.
    pub fn last_lr(&self, st: &StepState) -> Option<f64> {
        if self.enqueued == 0 {
            return None;
        }
        // A skipped step was given the lr of the count it did not reach.
        let count = if st.skip != 0 {
            st.step
        } else {
            st.step.checked_sub(1)?
        };
        let i = usize::try_from(count.checked_sub(self.anchor)?).ok()?;
        self.lrs.get(i).copied()
    }

    /// `schedule`, which stands at `anchor`, moved to the device's count `step`.
    pub fn advanced(&self, schedule: &dyn LrSchedule, step: u64) -> Result<Box<dyn LrSchedule>> {
        let ticks = step
            .checked_sub(self.anchor)
            .filter(|&t| t <= self.enqueued as u64)
            .ok_or_else(|| {
                Error::Cuda(format!(
                    "internal: the device stands at step {step}, outside the lr window written at \
                     {} for {} steps",
                    self.anchor, self.enqueued
                ))
            })?;
        let mut moved = schedule.boxed_clone();
        for _ in 0..ticks {
            moved.step();
        }
        Ok(moved)
    }
}
