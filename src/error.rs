//! One error type for the whole crate, with variants a caller can act on.

use crate::DType;

/// Everything that can go wrong in fusedopt. Every fallible call leaves parameters and optimizer state
/// exactly as they were when it returns one of these. New variants may come: match with a `_`
/// arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("length mismatch for {what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        what: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("dtype mismatch for {what}: expected {expected}, got {got}")]
    DTypeMismatch {
        what: String,
        expected: DType,
        got: DType,
    },
    #[error("unknown tensor '{0}'")]
    UnknownTensor(String),
    #[error("unknown parameter group '{0}'")]
    UnknownGroup(String),
    #[error("duplicate name '{0}'")]
    DuplicateName(String),
    #[error("the parameter set is empty: add at least one tensor")]
    EmptyParamSet,
    #[error("tensor '{name}' is too large: {elements} elements overflow the address space")]
    TooLarge { name: String, elements: u128 },
    #[error("out of host memory: could not allocate {bytes} bytes")]
    OutOfHostMemory { bytes: usize },
    #[error("invalid hyperparameter: {0}")]
    InvalidHyperparameter(String),
    #[error("custom rule '{rule}': {reason}")]
    CustomRule { rule: String, reason: String },
    /// The compiler refused a custom rule's CUDA body: its log, and the line of the body it
    /// points at (1-based, as the user wrote it) when it points at one.
    #[error(
        "custom rule '{rule}': {compiler} refused its CUDA body{}\n{log}",
        at_line(*.line, .code.as_deref())
    )]
    CustomRuleCompile {
        rule: String,
        compiler: String,
        line: Option<usize>,
        code: Option<String>,
        log: String,
    },
    #[error("non-finite gradients (global norm {norm}); the step was refused and nothing changed")]
    NonFiniteGradient { norm: f64 },
    #[error("device unavailable: {0}")]
    DeviceUnavailable(#[from] crate::device::Unavailable),
    #[error("this operation needs host memory, but the data lives on {0}")]
    NotHostMemory(crate::Device),
    /// An fp32 slice of masters asked of a parameter set that keeps them otherwise.
    #[error(
        "this parameter set keeps its masters as {0:?}, not as fp32: read_param and write_param \
         convert, model_param reads the bf16 weights"
    )]
    MastersNotF32(crate::Masters),
    #[error("out of device memory: asked for {bytes} bytes on {device}")]
    OutOfDeviceMemory { device: crate::Device, bytes: usize },
    /// A CUDA driver call failed: its `CUresult` code and name, as the driver gave them.
    #[error("CUDA driver error on {device}: {name} ({code})")]
    Driver {
        device: crate::Device,
        code: i32,
        name: String,
    },
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// The operation needs the parameter set on a CUDA device.
    #[error("{0} needs a parameter set on a CUDA device")]
    NeedsGpu(&'static str),
    #[error("kernel load failed: {0}")]
    KernelLoad(String),
    #[error("bad checkpoint {path}: {reason}")]
    BadCheckpoint { path: String, reason: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("framework argument not understood: {0}")]
    FrameworkArgument(String),
    #[error("communicator failure: {0}")]
    Communicator(String),
    /// Other ranks did not arrive within the timeout (a rank failed, stalled or never started);
    /// the group is aborted.
    #[error("timed out: {0}")]
    Timeout(String),
    #[error(
        "the gradient of '{0}' was already marked ready in this step (its bucket may be reduced): \
         write each gradient, then mark it ready, once per step"
    )]
    GradientAlreadyReady(String),
    #[error("replica {rank} failed in this step (its own error says why); no replica applied it")]
    ReplicaFailed { rank: usize },
    #[error("replicas differ in {what}, so they would not stay identical")]
    ReplicasDiffer { what: String },
    #[error(
        "replicas diverged: {0}; restore every replica from one checkpoint and rebuild the group"
    )]
    ReplicasDiverged(String),
    #[error("a panic in {0}")]
    Panicked(String),
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    #[error("NCCL error {code} ({name}): {message}")]
    Nccl {
        code: i32,
        name: &'static str,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that `got` has the `expected` length, naming `what` in the error.
pub(crate) fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what: what.to_string(),
            expected,
            got,
        })
    }
}

/// Checks that `got` elements written from element `at` fit in `len`, naming `what` in the error.
pub(crate) fn check_range(what: &str, at: usize, got: usize, len: usize) -> Result<()> {
    if at.checked_add(got).is_some_and(|end| end <= len) {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what: format!("{what} at element {at}"),
            expected: len.saturating_sub(at),
            got,
        })
    }
}

/// " at line N: `code`", where a compile error points into the user's body.
fn at_line(line: Option<usize>, code: Option<&str>) -> String {
    match (line, code) {
        (Some(n), Some(code)) => format!(" at line {n}: `{code}`"),
        _ => String::new(),
    }
}
