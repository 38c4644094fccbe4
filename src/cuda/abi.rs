//! Host mirrors of the structs the kernels read (kernels/multi_tensor.cuh, rules.cuh; the step
//! state and params are src/step's),
//! field for field, `#[repr(C)]` and `Pod` (no padding anywhere). Every size and field offset is
//! asserted at compile time here and, with the same numbers, by `static_assert`s in the `.cuh`
//! files, so a field added on one side only fails both builds.

use cudarc::driver::DeviceRepr;

use crate::optim::{AdamEps, AmsGrad, EpsPlacement, LrPlacement, MomentumInit, Rule, WeightDecay};
use crate::params::GroupOptions;
use crate::plan::Segment;
pub(crate) use crate::step::{StepParams, StepState};

/// `Segment` in multi_tensor.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DeviceSegment {
    pub start: u64,
    pub len: u32,
    pub group: u32,
}

impl From<&Segment> for DeviceSegment {
    fn from(s: &Segment) -> Self {
        // Segments are at most one chunk long and groups are few: both fit in u32 (the plan is
        // built with chunks of at most 2^20 elements).
        DeviceSegment {
            start: s.start as u64,
            len: s.len as u32,
            group: s.group as u32,
        }
    }
}

pub const NESTEROV: u32 = 1 << 0;
pub const COPY_FIRST: u32 = 1 << 1;
pub const LR_INSIDE: u32 = 1 << 2;
pub const EPS_RAW: u32 = 1 << 3;
pub const AMS_CORRECTED: u32 = 1 << 4;
pub const EPS_INSIDE: u32 = 1 << 5;
pub const CENTERED: u32 = 1 << 6;
pub const BIAS_CORRECTION: u32 = 1 << 7;
pub const ZERO_WHERE_EMPTY: u32 = 1 << 8;

/// `GroupConfig` in rules.cuh: one parameter group's rule, uploaded once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GroupConfig {
    pub lr_scale: f64,
    pub decay: f64,
    pub sign: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub eps_root: f64,
    pub alpha: f64,
    pub lr_decay: f64,
    pub decay_kind: u32,
    pub flags: u32,
}

impl GroupConfig {
    pub fn new(rule: &Rule, group: &GroupOptions) -> Self {
        let wd = rule.weight_decay();
        let wd = group.weight_decay.map_or(wd, |l| wd.with_coefficient(l));
        let mut c = GroupConfig {
            lr_scale: group.lr_scale,
            decay: wd.coefficient(),
            decay_kind: match wd {
                WeightDecay::None => 0,
                WeightDecay::L2(_) => 1,
                WeightDecay::L1(_) => 2,
                WeightDecay::Decoupled(_) => 3,
            },
            sign: 1.0,
            ..Default::default()
        };
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        match rule {
            Rule::Sgd(r) => {
                c.sign = if r.maximize { -1.0 } else { 1.0 };
                c.momentum = r.momentum;
                c.dampening = r.dampening;
                c.flags = flag(r.nesterov, NESTEROV)
                    | flag(r.momentum_init == MomentumInit::CopyGrad, COPY_FIRST)
                    | flag(r.lr_placement == LrPlacement::Inside, LR_INSIDE);
            }
            Rule::Adam(r) => {
                c.sign = if r.maximize { -1.0 } else { 1.0 };
                c.beta1 = r.beta1;
                c.beta2 = r.beta2;
                c.eps = r.eps;
                c.eps_root = r.eps_root;
                c.flags = flag(r.eps_scale == AdamEps::Raw, EPS_RAW)
                    | flag(r.amsgrad == AmsGrad::MaxCorrected, AMS_CORRECTED);
            }
            Rule::RmsProp(r) => {
                c.sign = if r.maximize { -1.0 } else { 1.0 };
                c.alpha = r.alpha;
                c.eps = r.eps;
                c.momentum = r.momentum;
                c.flags = flag(r.nesterov, NESTEROV)
                    | flag(r.lr_placement == LrPlacement::Inside, LR_INSIDE)
                    | flag(r.eps_placement == EpsPlacement::InsideSqrt, EPS_INSIDE)
                    | flag(r.centered, CENTERED)
                    | flag(r.bias_correction, BIAS_CORRECTION);
            }
            Rule::Adagrad(r) => {
                c.sign = if r.maximize { -1.0 } else { 1.0 };
                c.eps = r.eps;
                c.lr_decay = r.lr_decay;
                c.flags = flag(r.eps_placement == EpsPlacement::InsideSqrt, EPS_INSIDE)
                    | flag(r.zero_where_empty, ZERO_WHERE_EMPTY);
            }
        }
        c
    }
}

// SAFETY: each type is `#[repr(C)]`, made only of plain integers and floats, and laid out field for
// field like its CUDA counterpart named above; the kernels read them by value or through pointers
// to device copies, so passing their bytes is exactly what the kernels expect.
unsafe impl DeviceRepr for DeviceSegment {}
// SAFETY: as above.
unsafe impl DeviceRepr for GroupConfig {}
// SAFETY: as above.
unsafe impl DeviceRepr for StepState {}
// SAFETY: as above.
unsafe impl DeviceRepr for StepParams {}

use crate::step::abi_layout;

// The same numbers as the static_asserts in kernels/multi_tensor.cuh and rules.cuh.
abi_layout!(DeviceSegment, 16, { start: 0, len: 8, group: 12 });
abi_layout!(GroupConfig, 96, {
    lr_scale: 0, decay: 8, sign: 16, momentum: 24, dampening: 32, beta1: 40, beta2: 48, eps: 56,
    eps_root: 64, alpha: 72, lr_decay: 80, decay_kind: 88, flags: 92,
});
