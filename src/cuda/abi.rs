//! Host mirrors of the structs the kernels read, field for field, `#[repr(C)]` and `Pod` (no
//! padding anywhere): the launch plan's segment here; the group config, step state and step
//! params beside their CUDA twins in src/rules and src/step. Every size and field offset is
//! asserted at compile time here and, with the same numbers, by `static_assert`s in the `.cuh`
//! files, so a field added on one side only fails both builds.

use cudarc::driver::DeviceRepr;

use crate::plan::Segment;
pub(crate) use crate::rules::GroupConfig;
pub(crate) use crate::step::{StepParams, StepState};

/// `StepEntry` in rules/common.cuh: one step's lr, the momentum a schedule cycles (NaN: the
/// rule's own) and the rule's host-computed scalars, in the ring the update indexes by the step's
/// applied-step count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepEntry {
    pub lr: f64,
    pub momentum: f64,
    pub scalars: [f64; 3],
}

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

/// `Piece` in kernels/update.cuh: a run of one chunk's elements in one group, all coded or all
/// f32, and where an f32 run's state starts in each buffer's f32 part.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DevicePiece {
    pub start: u64,
    pub full: u64,
    pub len: u32,
    pub group: u32,
    pub coded: u32,
    pub unused: u32,
}

// SAFETY: each type is `#[repr(C)]`, made only of plain integers and floats, and laid out field for
// field like its CUDA counterpart named above; the kernels read them by value or through pointers
// to device copies, so passing their bytes is exactly what the kernels expect.
unsafe impl DeviceRepr for DeviceSegment {}
// SAFETY: as above.
unsafe impl DeviceRepr for DevicePiece {}
// SAFETY: as above.
unsafe impl DeviceRepr for GroupConfig {}
// SAFETY: as above.
unsafe impl DeviceRepr for StepState {}
// SAFETY: as above.
unsafe impl DeviceRepr for StepParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for StepEntry {}

// The same numbers as the static_asserts in kernels/multi_tensor.cuh.
abi_layout!(DeviceSegment, 16, { start: 0, len: 8, group: 12 });
// The same numbers as the static_asserts in kernels/update.cuh.
abi_layout!(DevicePiece, 32, { start: 0, full: 8, len: 16, group: 20, coded: 24 });
// The same numbers as the static_asserts in src/rules/common.cuh.
abi_layout!(StepEntry, 40, { lr: 0, momentum: 8, scalars: 16 });
