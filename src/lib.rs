//! fusedopt: the optimizer step of neural-network training as one fused pass over every parameter
//! tensor, on CUDA or on a fast CPU engine that computes the same thing, faithful to PyTorch, Keras 3,
//! Optax and TensorFlow 1.
//!
//! ```
//! use fusedopt::{Adam, Device, Flavor, Optimizer, ParamSet};
//!
//! let mut b = ParamSet::builder();
//! b.add("w", &[2, 3], &[0.1, -0.2, 0.3, 0.4, -0.5, 0.6])?;
//! b.add("b", &[3], &[0.0; 3])?;
//! let mut opt = Optimizer::new(b.build(Device::Cpu)?, Adam::preset(Flavor::PyTorch), 1e-3)?;
//! opt.params_mut().set_grad("w", &[0.01, 0.02, 0.03, 0.0, -0.3, 2.5])?;
//! opt.step()?;
//! assert!(!opt.report()?.skipped && opt.params().read_param("w")?[0] < 0.1);
//! # Ok::<(), fusedopt::Error>(())
//! ```

// A condition a caller can cause is a typed error, never a panic: no unwrap or expect outside
// tests (Cargo.toml's [lints] cannot tell library code from tests, so this lives here).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// Asserts, at compile time, the size of a struct the kernels read and the offset of each named
/// field: the same numbers as the `static_assert`s beside its CUDA twin.
macro_rules! abi_layout {
    ($t:ty, $size:expr, { $($field:ident: $offset:expr),* $(,)? }) => {
        const _: () = assert!(std::mem::size_of::<$t>() == $size);
        $(const _: () = assert!(std::mem::offset_of!($t, $field) == $offset);)*
    };
}

pub(crate) mod arena;
pub(crate) mod checkpoint;
pub mod comm;
pub mod cuda;
pub mod device;
pub(crate) mod dtype;
pub(crate) mod error;
pub(crate) mod host;
pub(crate) mod layout;
pub mod lean;
pub(crate) mod masters;
pub(crate) mod optim;
pub mod parallel;
pub mod params;
pub mod plan;
pub mod porting;
pub(crate) mod rules;
pub mod schedule;
pub(crate) mod step;
#[doc(hidden)]
pub mod testing;

pub use arena::Arena;
pub use device::{Device, Selection, Unavailable};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use masters::Masters;
pub use optim::{
    Adadelta, Adagrad, Adam, AdamEps, Adamax, AdamaxEps, Ademamix, Adopt, AmsGrad,
    CoefficientValues, Common, CustomRule, CustomRuleBuilder, EpsPlacement, Flavor, Lion,
    LossScale, LrPlacement, MomentForm, MomentumInit, Nadam, NanSign, NonFinitePolicy, Optimizer,
    OptimizerOptions, QuantizedState, Radam, RmsProp, Rule, ScheduleFree, ScheduleFreeBase,
    ScheduleFreeForm, Sgd, SlotValues, StateInit, StepReport, WeightDecay,
};
pub use params::{
    GroupInfo, GroupOptions, Layout, ParamSet, ParamSetBuilder, ParamsMut, TensorInfo,
};
pub use step::{ClipFormula, GlobalNormClip, MAX_STEP};
