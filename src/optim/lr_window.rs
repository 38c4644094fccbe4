//! The steps ahead of a GPU: their lrs and their rule's host-computed scalars. A step there is
//! only enqueued, and whether it applies is decided on the device, so the host can neither tick a
//! schedule once per applied step as the CPU engine does, nor hand a rule the scalars of the step
//! the device is at (NAdam's running product). Instead it writes the next steps' entries into a
//! ring in device memory that the update indexes by the device's own applied-step count, and
//! synchronises only when the next step could run past them (once every `LR_RING_LEN` steps) or
//! when the schedule's position must be known (a report, a checkpoint, an observed metric,
//! another schedule).

use super::{check_lr, parts_mut, Optimizer, PartsMut};
use crate::cuda::abi::StepEntry;
use crate::cuda::engine::LR_RING_LEN;
use crate::error::{Error, Result};
use crate::rules::{Rule, StepMemo};
use crate::schedule::LrSchedule;
use crate::step::StepState;
use crate::Device;

/// The entries written to the device ring, from the applied-step count `anchor` on. The
/// optimizer's schedule stands at `anchor`; where the device stands is known only after reading
/// its state.
#[derive(Clone, Debug)]
pub(crate) struct LrWindow {
    /// The applied-step count the schedule's position belongs to.
    pub anchor: u64,
    /// `entries[i]`: the lr (each one usable) and rule scalars of the step that applies at count
    /// `anchor + i`.
    pub entries: Vec<StepEntry>,
    /// Steps enqueued since the window was written: their counts lie in
    /// `anchor..anchor + enqueued`, so the next step's is inside the window while
    /// `enqueued < entries.len()`.
    pub enqueued: usize,
    /// `enqueued` when the lrs were last rewritten ([`Optimizer::set_lr`]): steps before it ran
    /// with the old lr, which the entries no longer tell.
    rewritten_at: usize,
    /// The rule's memo before the window, and after each of its steps (rules with scalars only).
    start_memo: StepMemo,
    memos: Vec<StepMemo>,
}

/// Where the lrs of a window come from.
pub(crate) enum LrSource<'a> {
    Schedule(&'a dyn LrSchedule),
    Constant(f64),
}

impl LrWindow {
    /// The next `len` steps from the device's count `anchor`: lrs from `lrs` (a schedule stands
    /// at `anchor`) up to the first one `usable` refuses, and `rule`'s scalars. Refuses, with
    /// `usable`'s error, when the very next lr is unusable.
    pub fn ahead(
        lrs: LrSource<'_>,
        rule: &Rule,
        memo: &mut StepMemo,
        anchor: u64,
        len: usize,
        usable: impl Fn(f64) -> Result<()>,
    ) -> Result<Self> {
        let mut schedule = match lrs {
            LrSource::Schedule(s) => Some(s.boxed_clone()),
            LrSource::Constant(_) => None,
        };
        let constant = match lrs {
            LrSource::Constant(lr) => lr,
            LrSource::Schedule(_) => 0.0,
        };
        let start_memo = *memo;
        let (mut entries, mut memos) = (Vec::with_capacity(len), Vec::new());
        for count in (anchor..).take(len) {
            let lr = schedule.as_ref().map_or(constant, |s| s.lr());
            if let Err(e) = usable(lr) {
                if entries.is_empty() {
                    return Err(e);
                }
                break;
            }
            let mut scalars = [0.0; 3];
            if rule.needs_step_scalars() {
                scalars = rule.step_scalars(count.saturating_add(1), lr, memo);
                memos.push(*memo);
            }
            let momentum = schedule
                .as_ref()
                .and_then(|s| s.momentum())
                .unwrap_or(f64::NAN);
            entries.push(StepEntry {
                lr,
                momentum,
                scalars,
            });
            if let Some(s) = &mut schedule {
                s.step();
            }
        }
        Ok(LrWindow {
            anchor,
            entries,
            enqueued: 0,
            rewritten_at: 0,
            start_memo,
            memos,
        })
    }

    /// What the rule's scalars remembered at the device's count `count` (inside the window or at
    /// its end), so that the next window goes on from there instead of from the first step.
    pub fn memo_at(&self, count: u64) -> Option<StepMemo> {
        match usize::try_from(count.checked_sub(self.anchor)?).ok()? {
            0 => Some(self.start_memo),
            i => self.memos.get(i - 1).copied(),
        }
    }

    /// A window no step can use: the next step writes a new one (or is refused).
    pub fn empty(anchor: u64, memo: StepMemo) -> Self {
        LrWindow {
            anchor,
            entries: Vec::new(),
            enqueued: 0,
            rewritten_at: 0,
            start_memo: memo,
            memos: Vec::new(),
        }
    }

    /// Whether the next step's count could fall outside the window.
    pub fn exhausted(&self) -> bool {
        self.enqueued >= self.entries.len()
    }

    /// The lr the last step was given, from the step state read after it; `None` when no step
    /// was enqueued since the window (or its lrs) was written.
    pub fn last_lr(&self, st: &StepState) -> Option<f64> {
        if self.enqueued <= self.rewritten_at {
            return None;
        }
        // A skipped step was given the lr of the count it did not reach.
        let count = if st.skip != 0 {
            st.step
        } else {
            st.step.checked_sub(1)?
        };
        let i = usize::try_from(count.checked_sub(self.anchor)?).ok()?;
        self.entries.get(i).map(|e| e.lr)
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

/// The optimizer's side of the window: everything that keeps the device's ring right.
impl Optimizer {
    /// Whether its steps read a window: on a GPU, with a schedule or a rule with step scalars.
    pub(super) fn uses_lr_window(&self) -> bool {
        self.params.device() != Device::Cpu
            && (self.schedule.is_some() || self.rule.needs_step_scalars())
    }

    /// Sets one lr for every later step, without a schedule: the window's entries keep their
    /// rule scalars (no need to know where the device stands) unless those follow the lr, else
    /// the whole ring takes it.
    pub(super) fn write_constant_lr(&mut self, lr: f64) -> Result<()> {
        if self.rule.scalars_follow_lr() && self.uses_lr_window() {
            // The steps ahead have scalars made from the old lr: written again from where the
            // device stands (one wait).
            let st = self.sync_lr()?;
            let memo = self.memo_at(st.step);
            let previous = std::mem::replace(&mut self.lr, lr);
            let written = self.write_lr_window(None, st.step, memo);
            self.lr = previous;
            return written;
        }
        // Steps already enqueued ran with the lr in force so far (one lr: no schedule).
        if self
            .lr_window
            .as_ref()
            .is_some_and(|w| w.enqueued > w.rewritten_at)
        {
            self.step_lr = self.lr;
        }
        let window = self.lr_window.as_ref().map(|w| {
            let mut entries = w.entries.clone();
            entries.iter_mut().for_each(|e| e.lr = lr);
            (w.anchor, entries)
        });
        if let PartsMut::Cuda(_, _, engine) = parts_mut(&mut self.params)? {
            match &window {
                Some((anchor, entries)) => engine.write_lr_window(*anchor, entries)?,
                None => engine.set_lr(lr)?,
            }
        }
        if let (Some(w), Some((_, entries))) = (&mut self.lr_window, window) {
            w.entries = entries;
            w.rewritten_at = w.enqueued;
        }
        Ok(())
    }

    pub(super) fn set_schedule_on_device(
        &mut self,
        schedule: Option<Box<dyn LrSchedule>>,
    ) -> Result<()> {
        if schedule.is_none() && self.lr_window.is_none() {
            return Ok(());
        }
        // The lr the old schedule gave the last step stays, as on the CPU.
        let st = self.sync_lr()?;
        let memo = self.memo_at(st.step);
        if schedule.is_some() || self.rule.needs_step_scalars() {
            return self.write_lr_window(schedule, st.step, memo);
        }
        let lr = self.lr;
        if let PartsMut::Cuda(_, _, engine) = parts_mut(&mut self.params)? {
            engine.set_lr(lr)?;
        }
        self.schedule = None;
        self.lr_window = None;
        Ok(())
    }

    /// [`Optimizer::observe`] on a GPU: the schedule moves to the device's count first.
    pub(super) fn observe_on_device(&mut self, metric: f64) -> Result<()> {
        let st = self.sync_lr()?;
        let mut next = match (&self.schedule, &self.lr_window) {
            (Some(s), Some(w)) => w.advanced(s.as_ref(), st.step)?,
            (Some(s), None) => s.boxed_clone(),
            (None, _) => return Ok(()),
        };
        next.observe(metric)?;
        check_lr(self.params.layout(), next.lr())?;
        let memo = self.memo_at(st.step);
        self.write_lr_window(Some(next), st.step, memo)
    }

    /// Before a step on a GPU: a new window when the next step could run past the one written.
    pub(super) fn refill_lr_window(&mut self) -> Result<()> {
        match &self.lr_window {
            Some(w) if w.exhausted() => {}
            _ => return Ok(()),
        }
        let st = self.sync_lr()?;
        let schedule = match (&self.schedule, &self.lr_window) {
            (Some(s), Some(w)) => Some(w.advanced(s.as_ref(), st.step)?),
            _ => None,
        };
        let memo = self.memo_at(st.step);
        self.write_lr_window(schedule, st.step, memo)
    }

    /// After a checkpoint restore at applied-step count `step`. A restored schedule whose next lr
    /// is unusable refuses the next step: an empty window makes that step try again, and fail as
    /// the CPU engine's would.
    pub(super) fn restore_lr_window(&mut self, step: u64, memo: StepMemo) -> Result<()> {
        let layout = self.params.layout().clone();
        let (memo_before, mut memo) = (memo, memo);
        let lrs = match &self.schedule {
            Some(s) => LrSource::Schedule(s.as_ref()),
            None => LrSource::Constant(self.lr),
        };
        let window = LrWindow::ahead(lrs, &self.rule, &mut memo, step, LR_RING_LEN, |lr| {
            check_lr(&layout, lr)
        })
        .unwrap_or_else(|_| LrWindow::empty(step, memo_before));
        let schedule = self.schedule.take();
        self.install_lr_window(schedule, window)
    }

    /// On a GPU: waits for the device and records the lr its last step was given as the current
    /// one, unless [`Optimizer::set_lr`] set one since, as on the CPU (the schedule keeps standing
    /// at its window's anchor).
    pub(super) fn sync_lr(&mut self) -> Result<StepState> {
        let st = self.step_state()?;
        if let Some(lr) = self.lr_window.as_ref().and_then(|w| w.last_lr(&st)) {
            if !self.lr_set_since_step {
                self.lr = lr;
            }
            self.step_lr = lr;
        }
        Ok(st)
    }

    /// The rule's memo at the device's count, from the current window (or from the first step).
    pub(super) fn memo_at(&self, count: u64) -> StepMemo {
        self.lr_window
            .as_ref()
            .and_then(|w| w.memo_at(count))
            .unwrap_or_default()
    }

    /// On a GPU: attaches `schedule` (or none: the current lr), which stands at the device's
    /// applied-step count `step`, and writes the next steps' entries to the device. Refused,
    /// with nothing changed, when the next lr is unusable.
    pub(super) fn write_lr_window(
        &mut self,
        schedule: Option<Box<dyn LrSchedule>>,
        step: u64,
        mut memo: StepMemo,
    ) -> Result<()> {
        let layout = self.params.layout().clone();
        let lrs = match &schedule {
            Some(s) => LrSource::Schedule(s.as_ref()),
            None => LrSource::Constant(self.lr),
        };
        let window = LrWindow::ahead(lrs, &self.rule, &mut memo, step, LR_RING_LEN, |lr| {
            check_lr(&layout, lr)
        })?;
        self.install_lr_window(schedule, window)
    }

    fn install_lr_window(
        &mut self,
        schedule: Option<Box<dyn LrSchedule>>,
        window: LrWindow,
    ) -> Result<()> {
        if let PartsMut::Cuda(_, _, engine) = parts_mut(&mut self.params)? {
            engine.write_lr_window(window.anchor, &window.entries)?;
        }
        self.schedule = schedule;
        self.lr_window = Some(window);
        Ok(())
    }

    /// The attached schedule at the current step (on a GPU, found from the device's count).
    pub(crate) fn schedule_now(&self) -> Result<Option<Box<dyn LrSchedule>>> {
        match (&self.schedule, &self.lr_window) {
            (None, _) => Ok(None),
            (Some(s), None) => Ok(Some(s.boxed_clone())),
            (Some(s), Some(w)) => Ok(Some(w.advanced(s.as_ref(), self.step_state()?.step)?)),
        }
    }
}
