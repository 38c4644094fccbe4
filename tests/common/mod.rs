//! Test helpers: an f64 scalar oracle written from the update equations (SEMANTICS.md), independent
//! of the engine's coefficient factoring, and random data of awkward sizes.
#![allow(dead_code)]

pub mod groups;
mod oracle;
pub mod processes;

#[allow(unused_imports)] // not every test binary uses the oracle
pub use oracle::Oracle;

use fusedopt::{DType, Device, GroupOptions, ParamSet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Whether `requirement` holds; otherwise says loudly that `test` was skipped and why (a failure
/// when FUSEDOPT_REQUIRE_GPU=1).
pub fn required_or_skip(test: &str, requirement: Result<(), String>) -> bool {
    use std::io::Write;
    match requirement {
        Ok(()) => true,
        Err(why) => {
            let msg = format!("GPU TEST SKIPPED: {test}: {why}");
            if std::env::var("FUSEDOPT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{msg} (FUSEDOPT_REQUIRE_GPU=1)");
            }
            // Straight to the stderr handle: the harness captures eprintln!, and a skip must show.
            let _ = writeln!(std::io::stderr(), "{msg}");
            false
        }
    }
}

/// Whether CUDA device 0 is a real GPU; on the emulated GPU, says loudly that `test` was skipped
/// and why. Only for tests that cannot run on the host (memory the machine does not have): such a
/// skip does not fail under FUSEDOPT_REQUIRE_GPU=1.
pub fn real_gpu_or_skip(test: &str, why: &str) -> bool {
    use std::io::Write;
    if !Device::Cuda(0).is_emulated() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "GPU TEST SKIPPED ON THE EMULATED GPU: {test}: {why}"
    );
    false
}

/// Whether CUDA device 0 is the emulated GPU; otherwise says loudly that `test` was skipped (it
/// needs something only the emulator offers, such as its counters or fault injection).
pub fn emulated_gpu_or_skip(test: &str, why: &str) -> bool {
    use std::io::Write;
    if Device::Cuda(0).is_emulated() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "GPU TEST SKIPPED OFF THE EMULATED GPU: {test}: {why}"
    );
    false
}

/// One of the emulated driver's counters (emulated-gpu/src/driver.cpp: `fusedopt_emu_counter`),
/// read on each call of the returned function.
pub fn emulated_counter(name: &'static str) -> impl Fn() -> i64 {
    // SAFETY: the emulated libcuda.so is already loaded (cudarc opened it by this name, so this
    // is the same library), and the counter function has this C signature there.
    let lib = unsafe { libloading::Library::new("libcuda.so") }.expect("the emulated driver");
    let f: unsafe extern "C" fn(*const std::ffi::c_char) -> i64 =
        // SAFETY: the symbol is the emulated driver's counter function, of this signature.
        *unsafe { lib.get(b"fusedopt_emu_counter") }.expect("the emulated driver's counters");
    std::mem::forget(lib); // keep the function mapped for the process's life
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: the function reads the NUL-terminated name only.
    move || unsafe { f(name.as_ptr()) }
}

/// Whether CUDA device 0 is usable (see [`required_or_skip`]).
pub fn gpu_or_skip(test: &str) -> bool {
    required_or_skip(test, Device::Cuda(0).check().map_err(|e| e.to_string()))
}

/// The repository: where the test was built, unless FUSEDOPT_REPO says otherwise (a test binary
/// carried to another machine, as the GPU bundle does, finds its data there).
pub fn repo_root() -> std::path::PathBuf {
    std::env::var_os("FUSEDOPT_REPO")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// One tensor of test data.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub group: &'static str,
    pub values: Vec<f32>,
}

/// Tensors of the sizes that break chunking and vector loops: empty, one element, odd, a page plus
/// one, a CPU chunk ± 1, in two groups (the second with its own lr scale and no decay).
pub fn awkward_tensors(seed: u64) -> Vec<Tensor> {
    let chunk = fusedopt::plan::CPU_CHUNK_ELEMS;
    let sizes = [0, 1, 3, 4097, chunk - 1, chunk + 1, 17];
    let mut rng = StdRng::seed_from_u64(seed);
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Tensor {
            name: format!("t{i}"),
            group: if i % 3 == 2 { "nodecay" } else { "default" },
            values: (0..n).map(|_| away_from_zero(&mut rng)).collect(),
        })
        .collect()
}

/// A parameter of magnitude in [0.3, 0.6] with random sign: far enough from zero that no test step
/// takes it across (where L1's sign, computed in f32 and f64, could differ).
fn away_from_zero(rng: &mut StdRng) -> f32 {
    let m = rng.gen_range(0.3..0.6);
    if rng.gen_bool(0.5) {
        m
    } else {
        -m
    }
}

/// Many small tensors of random sizes (1..=40).
pub fn many_tensors(seed: u64, count: usize) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let n = rng.gen_range(1..=40);
            Tensor {
                name: format!("m{i}"),
                group: if i % 5 == 0 { "nodecay" } else { "default" },
                values: (0..n).map(|_| away_from_zero(&mut rng)).collect(),
            }
        })
        .collect()
}

pub const NODECAY_LR_SCALE: f64 = 0.5;

pub fn build(tensors: &[Tensor]) -> ParamSet {
    build_with(Device::Cpu, tensors, DType::F32, None)
}

/// The test tensors on `device`, in the default group and a "nodecay" group with its own lr scale,
/// with gradients of `grads` and an optional model copy.
pub fn build_with(
    device: Device,
    tensors: &[Tensor],
    grads: DType,
    model: Option<DType>,
) -> ParamSet {
    let mut b = builder(tensors);
    b.grad_dtype(grads);
    if let Some(m) = model {
        b.model_copy(m).unwrap();
    }
    b.build(device).unwrap()
}

/// A builder holding the test tensors, in the default group and a "nodecay" group with its own
/// lr scale, for the caller to set the rest.
pub fn builder(tensors: &[Tensor]) -> fusedopt::ParamSetBuilder {
    let mut b = ParamSet::builder();
    b.group(
        "nodecay",
        GroupOptions {
            lr_scale: NODECAY_LR_SCALE,
            weight_decay: Some(0.0),
        },
    )
    .unwrap();
    for t in tensors {
        b.add_to(t.group, &t.name, &[t.values.len()], &t.values)
            .unwrap();
    }
    b
}

/// Gradients of magnitude in [scale/2, scale] with random sign: bounded away from zero so that no
/// element's update hinges on f32 cancellation against the weight-decay term, which would make the
/// f32 engine and the f64 oracle legitimately disagree.
pub fn random_grads(rng: &mut StdRng, tensors: &[Tensor], scale: f32) -> Vec<Vec<f32>> {
    tensors
        .iter()
        .map(|t| {
            (0..t.values.len())
                .map(|_| {
                    let m = rng.gen_range(scale / 2.0..=scale);
                    if rng.gen_bool(0.5) {
                        m
                    } else {
                        -m
                    }
                })
                .collect()
        })
        .collect()
}

/// Asserts `got` (f32) is within `atol + rtol·|want|` of the oracle's f64 values.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        // NaN agrees with NaN, and an infinity with the same infinity (the error is NaN there).
        if (g.is_nan() && w.is_nan()) || (w.is_infinite() && g as f64 == w) {
            continue;
        }
        let err = (g as f64 - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}[{k}]: got {g}, oracle {w} (error {err:e})"
        );
    }
}
