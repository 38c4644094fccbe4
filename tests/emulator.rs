//! The emulated GPU catches what it exists to catch. Each case plants one bug in a copy of
//! `kernels/`, builds the emulator from it in the mode meant to catch that class of bug, runs a
//! small clipped Adam step in a child process, and expects the report; the unplanted kernels run
//! clean in the same modes, so a report is the bug's and not the mode's.
//!
//! Slow (sanitizer builds of the kernels, a minute or two each the first time; objects are cached):
//! `cargo test --release --test emulator -- --ignored`. CI runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use fusedopt::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// 3 chunks of the smallest CUDA chunk: the norm pass runs 3 blocks, and the arena ends exactly
/// where the last segment does (so a segment one element too long leaves the allocation).
const ELEMS: usize = 3 * 4096;

/// What the child process runs: two clipped Adam steps on CUDA device 0, checked against the CPU.
#[test]
#[ignore = "run by the planted-bug tests in a child process"]
fn child_step() {
    if std::env::var_os("FUSEDOPT_EMULATOR_CHILD").is_none() {
        return;
    }
    let tensors = vec![Tensor {
        name: "w".into(),
        group: "default",
        values: (0..ELEMS).map(|i| 0.3 + (i % 7) as f32 * 0.05).collect(),
    }];
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        ..Default::default()
    };
    let run = |device| {
        let set = build_with(device, &tensors, DType::F32, None);
        let mut opt =
            Optimizer::with_options(set, Adam::preset(Flavor::PyTorch), 1e-3, options).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2 {
            let g = random_grads(&mut rng, &tensors, 1.0);
            opt.params_mut().set_grad("w", &g[0]).unwrap();
            opt.step().unwrap();
        }
        opt.params().read_param("w").unwrap()
    };
    let (gpu, cpu) = (run(Device::Cuda(0)), run(Device::Cpu));
    assert!(Device::Cuda(0).is_emulated());
    let want: Vec<f64> = cpu.iter().map(|&x| x as f64).collect();
    assert_close("planted-bug child", &gpu, &want, 1e-6, 1e-5);
}

/// A copy of `kernels/` with `from` replaced by `to` in `file` (which must contain it once).
fn planted(file: &str, from: &str, to: &str) -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root.join("kernels")).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        if path.file_name().unwrap() == file {
            assert_eq!(
                text.matches(from).count(),
                1,
                "{file} no longer has `{from}` exactly once: update the planted bug"
            );
            text = text.replace(from, to);
        }
        std::fs::write(dir.path().join(path.file_name().unwrap()), text).unwrap();
    }
    dir
}

/// Runs the child step on the emulator built from `kernels` in `mode`; returns (success, stderr).
fn run_child(mode: &str, kernels: &Path) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out: PathBuf = root.join("target/emulated-gpu/planted").join(format!(
        "{mode}-{}",
        kernels.file_name().unwrap().to_string_lossy()
    ));
    let result = Command::new(root.join("scripts/emulated-gpu.sh"))
        .arg(std::env::current_exe().unwrap())
        .args(["child_step", "--exact", "--ignored", "--nocapture"])
        .env("FUSEDOPT_EMU_MODE", mode)
        .env("FUSEDOPT_EMU_KERNELS", kernels)
        .env("FUSEDOPT_EMU_OUT", &out)
        // The child steps Adam only: the update unit is built with Adam's kernels alone.
        .env("FUSEDOPT_EMU_RULES", "adam")
        .env("FUSEDOPT_EMULATOR_CHILD", "1")
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    (
        result.status.success(),
        String::from_utf8_lossy(&result.stderr).into_owned(),
    )
}

/// The planted bug makes the child fail with every one of `expected` in its report.
fn assert_caught(mode: &str, kernels: &Path, expected: &[&str]) {
    let (ok, stderr) = run_child(mode, kernels);
    let tail: String = stderr
        .chars()
        .rev()
        .take(3000)
        .collect::<String>()
        .chars()
        .rev()
        .collect();
    assert!(!ok, "{mode}: the planted bug went unnoticed:\n{tail}");
    for e in expected {
        assert!(
            stderr.contains(e),
            "{mode}: no `{e}` in the report:\n{tail}"
        );
    }
}

#[test]
#[ignore = "builds the emulator in every mode (minutes): cargo test --release --test emulator -- --ignored"]
fn unplanted_kernels_run_clean_in_every_mode() {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for mode in ["plain", "asan", "tsan"] {
        let (ok, stderr) = run_child(mode, &kernels);
        assert!(ok, "{mode}: the real kernels fail:\n{stderr}");
    }
}

/// A thread that leaves before a barrier the others wait at: the GPU may hang; the emulator stops
/// with the kernel's name and the line.
#[test]
#[ignore = "builds the emulator from planted kernels (minutes)"]
fn an_exit_before_a_barrier_is_caught() {
    let k = planted(
        "norm.cu",
        "    chunk_sum_of_squares<G>(g, len, chunk_elems, partials, warp_sums);\n",
        "    chunk_sum_of_squares<G>(g, len, chunk_elems, partials, warp_sums);\n    if (threadIdx.x == 33) return;\n",
    );
    assert_caught(
        "plain",
        k.path(),
        &[
            "kernel 'norm_f32'",
            "norm.cu",
            "after 1 of 256 threads exited",
        ],
    );
}

/// Threads of one block waiting at two different barriers (one thread left a function early and
/// reached the caller's barrier): caught as divergence, with both lines.
#[test]
#[ignore = "builds the emulator from planted kernels (minutes)"]
fn barrier_divergence_is_caught() {
    let k = planted(
        "norm.cu",
        "    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;\n    __syncthreads();",
        "    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;\n    if (threadIdx.x == 33) return 0.0;\n    __syncthreads();",
    );
    assert_caught(
        "plain",
        k.path(),
        &["kernel 'norm_f32'", "barrier divergence", "norm.cu"],
    );
}

/// A segment one element too long: the plain build's guard catches the write past the arena,
/// AddressSanitizer the read, at the source line.
#[test]
#[ignore = "builds the emulator from planted kernels (minutes)"]
fn a_segment_one_element_too_long_is_caught() {
    let k = planted(
        "multi_tensor.cuh",
        "for (unsigned int i = 4 * vec + threadIdx.x; i < s.len; i += blockDim.x)",
        "for (unsigned int i = 4 * vec + threadIdx.x; i <= s.len; i += blockDim.x)",
    );
    assert_caught(
        "plain",
        k.path(),
        &["kernel 'update_adam_f32_f32'", "past the end"],
    );
    assert_caught(
        "asan",
        k.path(),
        &[
            "AddressSanitizer",
            "heap-buffer-overflow",
            "multi_tensor.cuh",
        ],
    );
}

/// A 16-byte vector load from an address that is only 4-byte aligned: UndefinedBehaviorSanitizer
/// reports it at the line (on a GPU: a misaligned-address fault, or garbage).
#[test]
#[ignore = "builds the emulator from planted kernels (minutes)"]
fn a_misaligned_vector_load_is_caught() {
    let k = planted(
        "multi_tensor.cuh",
        "return *reinterpret_cast<const float4*>(p);",
        "return *reinterpret_cast<const float4*>(p + (threadIdx.x == 5));",
    );
    assert_caught(
        "asan",
        k.path(),
        &["misaligned address", "multi_tensor.cuh"],
    );
}

/// The norm pass without the barrier between writing the warps' sums and adding them: a race
/// between the threads of a block, which ThreadSanitizer reports.
#[test]
#[ignore = "builds the emulator from planted kernels (minutes)"]
fn a_missing_barrier_is_caught() {
    let k = planted(
        "norm.cu",
        "    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;\n    __syncthreads();",
        "    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;",
    );
    assert_caught("tsan", k.path(), &["ThreadSanitizer: data race", "norm.cu"]);
}

/// The norm pass's block counter incremented without an atomic: a race between blocks, which a
/// sequential emulator cannot see and the TSan build (blocks on several OS threads) reports.
#[test]
#[ignore = "builds the emulator from planted kernels (minutes)"]
fn a_non_atomic_block_counter_is_caught() {
    let k = planted(
        "norm.cu",
        "last = atomicAdd(&st->done, 1u) == gridDim.x - 1;",
        "last = st->done++ == gridDim.x - 1;",
    );
    assert_caught("tsan", k.path(), &["ThreadSanitizer: data race", "norm.cu"]);
}
