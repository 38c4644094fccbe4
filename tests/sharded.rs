//! Sharded optimizer state (ZeRO-1) on CPU threads, on one GPU and over NCCL (the emulated GPU in
//! CI): every configuration steps bit for bit as the unsharded data-parallel group of the same
//! communicator does (itself checked against the f64 oracle and the frameworks'
//! recordings elsewhere), state per replica is the unsharded ÷ N, and sharded checkpoints load
//! into groups of another size and into one optimizer.

mod common;

use common::groups::{
    assert_same, backward, bits, everything, optimizer, optimizer_on, options, Config, DENSE,
    TENSORS,
};
use fusedopt::comm::Communicator;
use fusedopt::parallel::sharded::{load_sharded_checkpoint, SHARD_GRANULE};
use fusedopt::parallel::{DataParallel, ShardedDataParallel};
use fusedopt::{DType, Device, Error, Masters, QuantizedState};

fn unsharded(c: Config, n: usize) -> DataParallel<fusedopt::comm::cpu::CpuCommunicator> {
    DataParallel::cpu((0..n).map(|_| optimizer(c)).collect(), options()).unwrap()
}

fn sharded(c: Config, n: usize) -> ShardedDataParallel<fusedopt::comm::cpu::CpuCommunicator> {
    ShardedDataParallel::cpu((0..n).map(|_| optimizer(c)).collect(), options()).unwrap()
}

/// The sharded group's whole state, through a sharded checkpoint loaded into one optimizer (on
/// the CPU, whatever the group's device).
fn consolidated<C: Communicator>(
    group: &ShardedDataParallel<C>,
    c: Config,
) -> Vec<(String, Vec<u32>)> {
    let dir = tempfile::tempdir().unwrap();
    group.save_checkpoint(dir.path()).unwrap();
    let mut whole = optimizer(c);
    load_sharded_checkpoint(&mut whole, dir.path()).unwrap();
    everything(&whole)
}

fn check_bit_identical(c: Config, n: usize, steps: usize, nan_at: Option<usize>) {
    compare(c, n, steps, nan_at, unsharded(c, n), sharded(c, n));
}

/// Steps `plain` and `group` (of `n` replicas each, configuration `c`) alike and checks that the
/// sharded replicas hold the unsharded weights, reports and (through a checkpoint) state, bit
/// for bit.
fn compare<C: Communicator>(
    c: Config,
    n: usize,
    steps: usize,
    nan_at: Option<usize>,
    mut plain: DataParallel<C>,
    mut group: ShardedDataParallel<C>,
) {
    for step in 0..steps {
        plain.step(|r, g| backward(r, step, nan_at, g)).unwrap();
        group.step(|r, g| backward(r, step, nan_at, g)).unwrap();
        let reference = plain.replicas().next().unwrap();
        for r in group.replicas() {
            for (name, ..) in TENSORS {
                let want = match c.model_copy.is_some() || c.masters != Masters::F32 {
                    true => reference.params().read_model_param(name).unwrap(),
                    false => reference.params().read_param(name).unwrap(),
                };
                let got = r.params().read_param(name).unwrap();
                assert!(
                    bits(&got) == bits(&want),
                    "{n} ranks, step {step}: rank {}'s {name}",
                    r.rank()
                );
            }
            // As text: a skipped step's norm is NaN on both sides.
            let report = |x: fusedopt::StepReport| format!("{x:?}");
            assert_eq!(
                report(r.report().unwrap()),
                report(reference.report().unwrap())
            );
        }
    }
    let reference = plain.replicas().next().unwrap();
    assert_same(
        &consolidated(&group, c),
        &everything(reference),
        &format!("{n} ranks"),
    );
}

#[test]
fn dense_adamw_with_clipping_is_bit_identical_for_every_rank_count() {
    for n in [1, 2, 3, 4] {
        check_bit_identical(DENSE, n, 3, None);
    }
}

#[test]
fn a_non_finite_gradient_skips_the_step_on_every_shard_alike() {
    check_bit_identical(DENSE, 3, 3, Some(1));
}

#[test]
fn quantized_state_bf16_gradients_and_remainders_are_bit_identical() {
    let c = Config {
        grad_dtype: DType::BF16,
        masters: Masters::Bf16Remainders,
        quantized: QuantizedState::Block8,
        ..DENSE
    };
    check_bit_identical(c, 3, 3, None);
    let c = Config {
        quantized: QuantizedState::Block4,
        masters: Masters::Bf16Stochastic { seed: 7 },
        ..c
    };
    check_bit_identical(c, 2, 3, None);
}

#[test]
fn sgd_with_a_bf16_model_copy_is_bit_identical() {
    let c = Config {
        model_copy: Some(DType::BF16),
        sgd: true,
        ..DENSE
    };
    check_bit_identical(c, 4, 3, None);
}

#[test]
fn state_per_replica_is_the_unsharded_state_divided_by_the_rank_count() {
    let whole = optimizer(DENSE);
    let whole_state = whole.state_bytes().unwrap();
    let arena = whole.params().layout().arena_len();
    for n in [2, 4] {
        let group = sharded(DENSE, n);
        for r in group.replicas() {
            let m = r.memory().unwrap();
            // Adam: two f32 moments and the f32 masters per element of the window.
            assert_eq!(m.state_bytes, 8 * m.window_len);
            assert_eq!(m.masters_bytes, 4 * m.window_len);
            assert!(m.window_len <= arena.div_ceil(n) + SHARD_GRANULE);
            println!(
                "{n} ranks: rank {} holds {} B of state ({:.3} of the unsharded {whole_state} B)",
                r.rank(),
                m.state_bytes,
                m.state_bytes as f64 / whole_state as f64
            );
        }
    }
}

#[test]
fn a_sharded_checkpoint_resumes_in_a_group_of_another_size() {
    let dir = tempfile::tempdir().unwrap();
    let whole_file = dir.path().join("whole.safetensors");
    let shards = dir.path().join("shards");
    // Three steps on two ranks, sharded and not; both saved.
    let mut plain = unsharded(DENSE, 2);
    let mut group = sharded(DENSE, 2);
    for step in 0..3 {
        plain.step(|r, g| backward(r, step, None, g)).unwrap();
        group.step(|r, g| backward(r, step, None, g)).unwrap();
    }
    plain.save_checkpoint(&whole_file).unwrap();
    group.save_checkpoint(&shards).unwrap();
    // Resumed on three ranks: from the shards, from the whole file, and unsharded.
    let mut from_shards = sharded(DENSE, 3);
    from_shards.load_checkpoint(&shards).unwrap();
    let mut from_whole = sharded(DENSE, 3);
    from_whole.load_checkpoint(&whole_file).unwrap();
    let mut plain3 = unsharded(DENSE, 3);
    plain3.load_checkpoint(&whole_file).unwrap();
    for step in 3..5 {
        plain3.step(|r, g| backward(r, step, None, g)).unwrap();
        from_shards.step(|r, g| backward(r, step, None, g)).unwrap();
        from_whole.step(|r, g| backward(r, step, None, g)).unwrap();
    }
    let reference = everything(plain3.replicas().next().unwrap());
    assert_same(
        &consolidated(&from_shards, DENSE),
        &reference,
        "resumed from shards",
    );
    assert_same(
        &consolidated(&from_whole, DENSE),
        &reference,
        "resumed from a whole file",
    );
}

#[test]
fn windows_of_padding_only_save_and_resume() {
    // Nine windows of 64 Ki elements pad the arena past the end of its tensors: the last
    // window holds padding only, but still the step count and the schedule.
    let n = 9;
    let dir = tempfile::tempdir().unwrap();
    let mut plain = unsharded(DENSE, n);
    let mut group = sharded(DENSE, n);
    let last = group.replicas()[n - 1].plan().window(n - 1);
    assert!(last.start >= group.replicas()[0].whole_layout().arena_len());
    plain.step(|r, g| backward(r, 0, None, g)).unwrap();
    group.step(|r, g| backward(r, 0, None, g)).unwrap();
    group.save_checkpoint(dir.path()).unwrap();
    let mut resumed = sharded(DENSE, n);
    resumed.load_checkpoint(dir.path()).unwrap();
    assert_eq!(resumed.replicas()[n - 1].step_count().unwrap(), 1);
    plain.step(|r, g| backward(r, 1, None, g)).unwrap();
    resumed.step(|r, g| backward(r, 1, None, g)).unwrap();
    assert_same(
        &consolidated(&resumed, DENSE),
        &everything(plain.replicas().next().unwrap()),
        "nine windows, resumed",
    );
}

#[test]
fn two_saves_of_one_step_keep_their_own_files() {
    // The second save (same step, another lr) writes files of its own, and the manifest names
    // them: the first save's files are never overwritten while its manifest is live.
    let dir = tempfile::tempdir().unwrap();
    let mut group = sharded(DENSE, 2);
    group.step(|r, g| backward(r, 0, None, g)).unwrap();
    group.save_checkpoint(dir.path()).unwrap();
    let first: Vec<_> = shard_files(dir.path());
    group.set_lr(1e-4).unwrap();
    group.save_checkpoint(dir.path()).unwrap();
    let second: Vec<_> = shard_files(dir.path());
    assert_eq!(first.len(), 2);
    assert_eq!(second.len(), 2);
    assert!(
        first.iter().all(|f| !second.contains(f)),
        "{first:?} {second:?}"
    );
    let mut resumed = sharded(DENSE, 2);
    resumed.load_checkpoint(dir.path()).unwrap();
    assert_eq!(resumed.replicas()[1].lr(), 1e-4);
}

/// The shard files in `dir`, by name.
fn shard_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_damaged_sharded_checkpoint_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = sharded(DENSE, 2);
    group.step(|r, g| backward(r, 0, None, g)).unwrap();
    group.save_checkpoint(dir.path()).unwrap();
    let mut fresh = sharded(DENSE, 3);
    let before = consolidated(&fresh, DENSE);
    // A shard file cut short.
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains("rank-1"))
        .unwrap()
        .path();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let err = fresh.load_checkpoint(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadCheckpoint { .. } | Error::ReplicaFailed { .. }
        ),
        "{err}"
    );
    assert_same(
        &consolidated(&fresh, DENSE),
        &before,
        "after a refused load",
    );
    // No manifest.
    std::fs::remove_file(dir.path().join("manifest.json")).unwrap();
    assert!(fresh.load_checkpoint(dir.path()).is_err());
    // A checkpoint of a differently configured optimizer.
    let other = tempfile::tempdir().unwrap();
    let sgd = Config { sgd: true, ..DENSE };
    sharded(sgd, 2).save_checkpoint(other.path()).unwrap();
    assert!(fresh.load_checkpoint(other.path()).is_err());
    assert_same(&consolidated(&fresh, DENSE), &before, "after refused loads");
}

#[test]
fn a_failing_backward_pass_fails_every_replica_and_nobody_steps() {
    let mut group = sharded(DENSE, 3);
    group.step(|r, g| backward(r, 0, None, g)).unwrap();
    let before = consolidated(&group, DENSE);
    let err = group
        .step(|r, g| {
            if r == 1 {
                return Err(Error::InvalidHyperparameter("the model blew up".into()));
            }
            backward(r, 1, None, g)
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidHyperparameter(_)), "{err}");
    assert_same(&consolidated(&group, DENSE), &before, "after a failed step");
    // The group is still in step.
    group.step(|r, g| backward(r, 1, None, g)).unwrap();
    let mut plain = unsharded(DENSE, 3);
    plain.step(|r, g| backward(r, 0, None, g)).unwrap();
    plain.step(|r, g| backward(r, 1, None, g)).unwrap();
    assert_same(
        &consolidated(&group, DENSE),
        &everything(plain.replicas().next().unwrap()),
        "after recovering",
    );
}

/// The configurations the GPU groups are checked in: (configuration, ranks, NaN at step).
fn gpu_cases() -> Vec<(Config, usize, Option<usize>)> {
    let lean = Config {
        grad_dtype: DType::BF16,
        masters: Masters::Bf16Remainders,
        quantized: QuantizedState::Block8,
        ..DENSE
    };
    vec![
        (DENSE, 1, None),
        (DENSE, 3, Some(1)),
        (lean, 2, None),
        (
            Config {
                quantized: QuantizedState::Block4,
                masters: Masters::Bf16Stochastic { seed: 7 },
                ..lean
            },
            3,
            None,
        ),
        (
            Config {
                model_copy: Some(DType::BF16),
                sgd: true,
                ..DENSE
            },
            4,
            None,
        ),
    ]
}

#[test]
fn on_one_gpu_sharded_steps_are_bit_identical_to_unsharded() {
    if !common::gpu_or_skip("on_one_gpu_sharded_steps_are_bit_identical_to_unsharded") {
        return;
    }
    let on_gpu = |c: Config, n: usize| (0..n).map(|_| optimizer_on(c, Device::Cuda(0))).collect();
    for (c, n, nan_at) in gpu_cases() {
        let plain = DataParallel::single_device(on_gpu(c, n), options()).unwrap();
        let group = ShardedDataParallel::single_device(on_gpu(c, n), options()).unwrap();
        compare(c, n, 3, nan_at, plain, group);
    }
}

#[test]
fn over_nccl_sharded_steps_are_bit_identical_to_unsharded() {
    let test = "over_nccl_sharded_steps_are_bit_identical_to_unsharded";
    if !common::gpu_or_skip(test)
        || !common::required_or_skip(
            test,
            fusedopt::comm::nccl::nccl_available().map_err(|e| e.to_string()),
        )
    {
        return;
    }
    let gpus = fusedopt::device::cuda_device_count().unwrap_or(0);
    let ranks = |c: Config, n: usize| (0..n).map(|r| optimizer_on(c, Device::Cuda(r))).collect();
    for (c, n, nan_at) in gpu_cases() {
        if n > gpus {
            // Stated, not silent: a machine with fewer GPUs runs the smaller groups only.
            use std::io::Write;
            let msg =
                format!("GPU TEST PART SKIPPED: {test}: {n} ranks need {n} GPUs, {gpus} here");
            let _ = writeln!(std::io::stderr(), "{msg}");
            continue;
        }
        let plain = DataParallel::nccl(ranks(c, n), options()).unwrap();
        let group = ShardedDataParallel::nccl(ranks(c, n), options()).unwrap();
        compare(c, n, 3, nan_at, plain, group);
    }
}

#[test]
fn on_a_gpu_state_per_replica_is_divided_by_the_rank_count() {
    if !common::gpu_or_skip("on_a_gpu_state_per_replica_is_divided_by_the_rank_count") {
        return;
    }
    let on_gpu = |n: usize| {
        (0..n)
            .map(|_| optimizer_on(DENSE, Device::Cuda(0)))
            .collect()
    };
    for n in [2, 4] {
        let group = ShardedDataParallel::single_device(on_gpu(n), options()).unwrap();
        for r in group.replicas() {
            let m = r.memory().unwrap();
            assert_eq!(m.state_bytes, 8 * m.window_len);
            assert_eq!(m.masters_bytes, 4 * m.window_len);
        }
    }
}

#[test]
fn on_a_gpu_a_sharded_checkpoint_resumes_in_a_group_of_another_size() {
    if !common::gpu_or_skip("on_a_gpu_a_sharded_checkpoint_resumes_in_a_group_of_another_size") {
        return;
    }
    let c = Config {
        grad_dtype: DType::BF16,
        masters: Masters::Bf16Remainders,
        quantized: QuantizedState::Block8,
        ..DENSE
    };
    let on_gpu = |n: usize| (0..n).map(|_| optimizer_on(c, Device::Cuda(0))).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut group = ShardedDataParallel::single_device(on_gpu(2), options()).unwrap();
    for step in 0..3 {
        group.step(|r, g| backward(r, step, None, g)).unwrap();
    }
    group.save_checkpoint(dir.path()).unwrap();
    // Resumed on three ranks, sharded and (every replica from the shards) not.
    let mut resumed = ShardedDataParallel::single_device(on_gpu(3), options()).unwrap();
    resumed.load_checkpoint(dir.path()).unwrap();
    let mut plain = DataParallel::single_device(on_gpu(3), options()).unwrap();
    for o in plain.replicas_mut() {
        load_sharded_checkpoint(o, dir.path()).unwrap();
    }
    for step in 3..5 {
        plain.step(|r, g| backward(r, step, None, g)).unwrap();
        resumed.step(|r, g| backward(r, step, None, g)).unwrap();
    }
    assert_same(
        &consolidated(&resumed, c),
        &everything(plain.replicas().next().unwrap()),
        "resumed on a GPU from shards",
    );
}
