//! Checkpoints round-trip exactly; truncated, corrupt and mismatched files are refused and leave the
//! optimizer untouched.

mod common;

use common::*;
use fusedopt::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn run(opt: &mut Optimizer, tensors: &[Tensor], rng: &mut StdRng, steps: usize) {
    for _ in 0..steps {
        for (t, g) in tensors.iter().zip(random_grads(rng, tensors, 1.0)) {
            opt.params_mut().set_grad(&t.name, &g).unwrap();
        }
        opt.step().unwrap();
    }
}

fn rule() -> Rule {
    Adam::amsgrad(Flavor::PyTorch).into()
}

fn options() -> OptimizerOptions {
    OptimizerOptions {
        clip: Some(GlobalNormClip::new(10.0, Flavor::PyTorch)),
        ..Default::default()
    }
}

fn observable(opt: &Optimizer, tensors: &[Tensor]) -> Vec<Vec<f32>> {
    let mut out = vec![vec![opt.step_count().unwrap() as f32, opt.lr() as f32]];
    for t in tensors {
        out.push(opt.params().param(&t.name).unwrap().to_vec());
        for s in opt.state_names() {
            out.push(opt.state(s, &t.name).unwrap().to_vec());
        }
    }
    out
}

#[test]
fn round_trip_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let tensors = awkward_tensors(21);
    let mut a = Optimizer::with_options(build(&tensors), rule(), 1e-3, options()).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    run(&mut a, &tensors, &mut rng, 3);
    a.set_lr(3e-4).unwrap();
    a.save_checkpoint(&path).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp file left behind"
    );

    // A load restores state into an optimizer configured the same way (the lr is state).
    let mut b = Optimizer::with_options(build(&tensors), rule(), 1e-3, options()).unwrap();
    b.load_checkpoint(&path).unwrap();
    assert_eq!(observable(&a, &tensors), observable(&b, &tensors));
    assert_eq!(b.options(), a.options());
    let mut rng_b = rng.clone();
    run(&mut a, &tensors, &mut rng, 2);
    run(&mut b, &tensors, &mut rng_b, 2);
    assert_eq!(observable(&a, &tensors), observable(&b, &tensors));
}

#[test]
fn bad_checkpoints_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let tensors = many_tensors(5, 50);
    let mut saved = Optimizer::with_options(build(&tensors), rule(), 1e-3, options()).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    run(&mut saved, &tensors, &mut rng, 2);
    saved.save_checkpoint(&path).unwrap();
    let good = std::fs::read(&path).unwrap();

    let mut target = Optimizer::with_options(build(&tensors), rule(), 1e-3, options()).unwrap();
    run(&mut target, &tensors, &mut rng, 1);
    let before = observable(&target, &tensors);

    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 7] ^= 0x10; // a bit inside the last tensor's data
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("garbage", b"not a checkpoint at all".to_vec()),
        ("bit flip", flipped),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let err = target.load_checkpoint(&path).unwrap_err();
        assert!(matches!(err, Error::BadCheckpoint { .. }), "{what}: {err}");
        assert_eq!(
            observable(&target, &tensors),
            before,
            "{what} changed the optimizer"
        );
    }
    assert!(matches!(
        target.load_checkpoint(dir.path().join("missing")),
        Err(Error::Io { .. })
    ));

    // Mismatched layouts and rules.
    std::fs::write(&path, &good).unwrap();
    let other_shapes = many_tensors(6, 50);
    let mut wrong = Optimizer::with_options(build(&other_shapes), rule(), 1e-3, options()).unwrap();
    assert!(matches!(
        wrong.load_checkpoint(&path),
        Err(Error::BadCheckpoint { .. })
    ));
    let mut wrong_rule =
        Optimizer::new(build(&tensors), Sgd::preset(Flavor::PyTorch), 1e-3).unwrap();
    let before_sgd = observable(&wrong_rule, &tensors);
    assert!(matches!(
        wrong_rule.load_checkpoint(&path),
        Err(Error::BadCheckpoint { .. })
    ));
    assert_eq!(observable(&wrong_rule, &tensors), before_sgd);
    assert_eq!(observable(&target, &tensors), before);
}

#[test]
fn bf16_state_and_model_copy_round_trip() {
    use half::bf16;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.safetensors");
    let tensors = awkward_tensors(8);
    let build_mixed = || build_with(Device::Cpu, &tensors, DType::BF16, Some(DType::BF16));
    let options = OptimizerOptions {
        state_dtype: DType::BF16,
        loss_scale: LossScale::dynamic(),
        ..Default::default()
    };
    let mut a = Optimizer::with_options(build_mixed(), rule(), 1e-3, options).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    run(&mut a, &tensors, &mut rng, 3);
    a.save_checkpoint(&path).unwrap();
    let mut b = Optimizer::with_options(build_mixed(), rule(), 1e-3, options).unwrap();
    b.load_checkpoint(&path).unwrap();
    assert_eq!(observable(&a, &tensors), observable(&b, &tensors));
    assert_eq!(a.loss_scale().unwrap(), b.loss_scale().unwrap());
    for t in &tensors {
        let (ca, cb) = (
            a.params().model_param::<bf16>(&t.name).unwrap(),
            b.params().model_param::<bf16>(&t.name).unwrap(),
        );
        assert_eq!(ca, cb, "model copy of {}", t.name);
    }
    // A checkpoint of f32 state does not load into bf16 state.
    let mut f32_state = Optimizer::with_options(build_mixed(), rule(), 1e-3, options).unwrap();
    let f32_path = dir.path().join("f32.safetensors");
    Optimizer::new(build(&tensors), rule(), 1e-3)
        .unwrap()
        .save_checkpoint(&f32_path)
        .unwrap();
    assert!(matches!(
        f32_state.load_checkpoint(&f32_path),
        Err(Error::BadCheckpoint { .. })
    ));
}

/// A checkpoint is device-independent: saved on the GPU, it resumes on the CPU and on another GPU
/// optimizer alike, bit for bit (the saved step, state and loss scale are the device's).
#[test]
fn checkpoints_move_between_devices() {
    if !gpu_or_skip("checkpoints_move_between_devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpu.safetensors");
    let tensors = awkward_tensors(31);
    let options = OptimizerOptions {
        state_dtype: DType::BF16,
        loss_scale: LossScale::dynamic(),
        ..options()
    };
    let on = |device| {
        let set = build_with(device, &tensors, DType::F32, None);
        Optimizer::with_options(set, rule(), 1e-3, options).unwrap()
    };
    let mut gpu = on(Device::Cuda(0));
    let mut rng = StdRng::seed_from_u64(9);
    run(&mut gpu, &tensors, &mut rng, 3);
    gpu.save_checkpoint(&path).unwrap();
    let read = |opt: &Optimizer| -> Vec<Vec<f32>> {
        let mut out = vec![vec![
            opt.step_count().unwrap() as f32,
            opt.loss_scale().unwrap() as f32,
        ]];
        for t in &tensors {
            out.push(opt.params().read_param(&t.name).unwrap());
            for s in opt.state_names() {
                out.push(opt.state(s, &t.name).unwrap());
            }
        }
        out
    };
    for device in [Device::Cpu, Device::Cuda(0)] {
        let mut back = on(device);
        back.load_checkpoint(&path).unwrap();
        assert_eq!(read(&back), read(&gpu), "loaded on {device}");
    }
}
