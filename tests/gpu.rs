//! GPU checks: the CUDA engine against the CPU engine (itself checked against the oracle and the
//! frameworks) for every rule, option and flavor and every dtype mix, on awkward sizes. Where no
//! usable GPU exists each test says so loudly and passes; with FUSEDOPT_REQUIRE_GPU=1 a skip is a
//! failure.

mod common;
#[path = "../examples/shared/custom_adam.rs"]
mod custom_adam;
mod harness;

use std::io::Write;

use common::*;
use custom_adam::custom_adam;
use fusedopt::cuda::kernels;
use fusedopt::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const FLAVORS: [Flavor; 4] = [Flavor::PyTorch, Flavor::Keras, Flavor::Optax, Flavor::Tf1];

/// Every rule, option and flavor, each with the lr it starts at.
fn all_rules() -> Vec<(Rule, f64)> {
    let mut v: Vec<(Rule, f64)> = Vec::new();
    for f in FLAVORS {
        for wd in [
            WeightDecay::None,
            WeightDecay::L2(0.05),
            WeightDecay::L1(0.01),
            WeightDecay::Decoupled(0.1),
        ] {
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.8, true)] {
                v.push((
                    Sgd {
                        momentum,
                        nesterov,
                        ..Sgd::preset(f)
                    }
                    .with_weight_decay(wd)
                    .into(),
                    0.05,
                ));
            }
            for ams in [AmsGrad::Off, AmsGrad::MaxRaw, AmsGrad::MaxCorrected] {
                v.push((
                    Adam {
                        amsgrad: ams,
                        ..Adam::preset(f)
                    }
                    .with_weight_decay(wd)
                    .into(),
                    0.01,
                ));
            }
            v.push((
                Adagrad {
                    lr_decay: 0.1,
                    ..Adagrad::preset(f)
                }
                .with_weight_decay(wd)
                .into(),
                0.02,
            ));
            v.push((Adamax::preset(f).with_weight_decay(wd).into(), 0.01));
            v.push((Lion::preset(f).with_weight_decay(wd).into(), 0.003));
            v.push((Adadelta::preset(f).with_weight_decay(wd).into(), 0.5));
            // β2 = 0.9: ρ∞ = 19, rectified from the sixth step.
            let radam = Radam {
                beta2: 0.9,
                nesterov: f == Flavor::Optax && wd == WeightDecay::None,
                ..Radam::preset(f)
            };
            v.push((radam.with_weight_decay(wd).into(), 0.01));
        }
        v.push((Adam::nadam_optax().into(), 0.01));
        // Its μ-product comes from the host through the device's ring, step by step.
        v.push((Nadam::preset(f).into(), 0.01));
        let adopt = Adopt {
            nesterov: f == Flavor::Keras,
            clipping: f != Flavor::Tf1,
            ..Adopt::preset(f)
        };
        v.push((adopt.into(), 0.01));
        v.push((Ademamix::preset(f).into(), 0.01));
        // Schedule-free's averaging weights come from the host through the ring; z starts as the
        // parameters.
        for (sf, lr, wd) in [
            (ScheduleFree::sgd(f), 0.05, WeightDecay::L2(0.05)),
            (ScheduleFree::adamw(f), 0.01, WeightDecay::Decoupled(0.1)),
        ] {
            let sf = ScheduleFree {
                warmup_steps: 2,
                ..sf
            };
            v.push((sf.with_weight_decay(wd).into(), lr));
        }
        for centered in [false, true] {
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.5, true)] {
                v.push((
                    RmsProp {
                        centered,
                        momentum,
                        nesterov,
                        bias_correction: f == Flavor::Optax,
                        ..RmsProp::preset(f)
                    }
                    .into(),
                    0.002,
                ));
            }
        }
        v.push((
            Sgd {
                momentum: 0.9,
                dampening: 0.3,
                ..Sgd::preset(f)
            }
            .maximizing(true)
            .into(),
            0.05,
        ));
    }
    // A user-written rule: its kernels generated and compiled at run time.
    v.push((
        custom_adam(0.9, 0.99, 1e-6)
            .with_weight_decay(WeightDecay::Decoupled(0.1))
            .into(),
        0.01,
    ));
    v
}

struct Mix {
    grads: DType,
    state: DType,
    model: Option<DType>,
}

const MIXES: [Mix; 4] = [
    Mix {
        grads: DType::F32,
        state: DType::F32,
        model: None,
    },
    Mix {
        grads: DType::BF16,
        state: DType::F32,
        model: Some(DType::BF16),
    },
    Mix {
        grads: DType::F16,
        state: DType::F32,
        model: Some(DType::F16),
    },
    Mix {
        grads: DType::BF16,
        state: DType::BF16,
        model: Some(DType::BF16),
    },
];

fn build_on(device: Device, tensors: &[Tensor], mix: &Mix) -> ParamSet {
    build_with(device, tensors, mix.grads, mix.model)
}

/// Everything a step leaves behind, read back as f32.
fn observe(opt: &Optimizer, tensors: &[Tensor], mix: &Mix) -> Vec<Vec<f32>> {
    let mut out = vec![vec![opt.step_count().unwrap() as f32]];
    for t in tensors {
        out.push(opt.params().read_param(&t.name).unwrap());
        if mix.model.is_some() {
            out.push(opt.params().read_model_param(&t.name).unwrap());
        }
        for s in opt.state_names() {
            out.push(opt.state(s, &t.name).unwrap());
        }
        out.push(opt.eval_param(&t.name).unwrap());
    }
    out
}

/// Runs the same steps on `device`; `lrs` changes the lr between steps; `graph` captures after
/// the first step.
fn run(
    device: Device,
    rule: &Rule,
    base: f64,
    options: OptimizerOptions,
    tensors: &[Tensor],
    mix: &Mix,
    graph: bool,
) -> Vec<Vec<f32>> {
    let mut opt =
        Optimizer::with_options(build_on(device, tensors, mix), rule.clone(), base, options)
            .unwrap();
    let mut rng = StdRng::seed_from_u64(17);
    // RAdam rectifies from the sixth step (ρ_t > 5): it runs long enough for both branches.
    let steps = if matches!(rule, Rule::Radam(_)) { 7 } else { 4 };
    let lrs = [base, base, 0.4 * base]
        .into_iter()
        .chain(std::iter::repeat(0.2 * base));
    for (step, lr) in lrs.take(steps).enumerate() {
        for (t, g) in tensors.iter().zip(random_grads(&mut rng, tensors, 1.0)) {
            opt.params_mut().set_grad(&t.name, &g).unwrap();
        }
        opt.set_lr(lr).unwrap();
        opt.step().unwrap();
        if graph && step == 0 {
            opt.capture_graph().unwrap();
        }
    }
    observe(&opt, tensors, mix)
}

/// Without clipping both engines do the same arithmetic in the same order, so they must agree bit
/// for bit (a NaN's payload aside: the GPU's conversions make the canonical NaN); with clipping
/// the norm is summed in another order, and they agree closely.
fn assert_agree(what: &str, gpu: &[Vec<f32>], cpu: &[Vec<f32>], exact: bool) {
    assert_eq!(gpu.len(), cpu.len(), "{what}");
    if exact {
        for (k, (g, c)) in gpu.iter().zip(cpu).enumerate() {
            assert_eq!(g.len(), c.len(), "{what} buffer {k}");
            let differs = |i: &usize| {
                g[*i].to_bits() != c[*i].to_bits() && !(g[*i].is_nan() && c[*i].is_nan())
            };
            if let Some(i) = (0..g.len()).find(differs) {
                panic!("{what} buffer {k}[{i}]: gpu {:e} cpu {:e}", g[i], c[i]);
            }
        }
        return;
    }
    for (k, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let want: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        assert_close(&format!("{what} buffer {k}"), g, &want, 1e-6, 1e-5);
    }
}

#[test]
fn gpu_matches_cpu_for_every_rule_and_dtype_mix() {
    if !gpu_or_skip("gpu_matches_cpu_for_every_rule_and_dtype_mix") {
        return;
    }
    let tensors = awkward_tensors(41);
    for (i, (rule, lr)) in all_rules().iter().enumerate() {
        for mix in &MIXES {
            let clip = [
                None,
                Some(GlobalNormClip::new(
                    20.0,
                    [Flavor::PyTorch, Flavor::Keras, Flavor::Optax][i % 3],
                )),
            ][i % 2];
            let options = OptimizerOptions {
                clip,
                state_dtype: mix.state,
                ..Default::default()
            };
            let what = format!(
                "{rule:?} grads {} state {} clip {clip:?}",
                mix.grads, mix.state
            );
            let cpu = run(Device::Cpu, rule, *lr, options, &tensors, mix, false);
            let gpu = run(Device::Cuda(0), rule, *lr, options, &tensors, mix, false);
            assert_agree(&what, &gpu, &cpu, clip.is_none());
        }
    }
}

#[test]
fn graph_replay_equals_eager_steps_with_changing_lr() {
    if !gpu_or_skip("graph_replay_equals_eager_steps_with_changing_lr") {
        return;
    }
    let tensors = many_tensors(42, 500);
    for (rule, lr) in [
        (Rule::from(Adam::adamw(Flavor::PyTorch)), 1e-3),
        (
            Sgd {
                momentum: 0.9,
                ..Sgd::preset(Flavor::Keras)
            }
            .into(),
            0.01,
        ),
    ] {
        let options = OptimizerOptions {
            clip: Some(GlobalNormClip::new(5.0, Flavor::PyTorch)),
            loss_scale: LossScale::dynamic(),
            ..Default::default()
        };
        let eager = run(
            Device::Cuda(0),
            &rule,
            lr,
            options,
            &tensors,
            &MIXES[1],
            false,
        );
        let graph = run(
            Device::Cuda(0),
            &rule,
            lr,
            options,
            &tensors,
            &MIXES[1],
            true,
        );
        assert_eq!(
            eager, graph,
            "{rule:?}: graph replay differs from eager steps"
        );
    }
}

#[test]
fn steps_are_deterministic() {
    if !gpu_or_skip("steps_are_deterministic") {
        return;
    }
    let tensors = awkward_tensors(43);
    let rule: Rule = Adam::amsgrad(Flavor::Optax).into();
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(3.0, Flavor::Optax)),
        ..Default::default()
    };
    let a = run(
        Device::Cuda(0),
        &rule,
        1e-3,
        options,
        &tensors,
        &MIXES[0],
        false,
    );
    let b = run(
        Device::Cuda(0),
        &rule,
        1e-3,
        options,
        &tensors,
        &MIXES[0],
        false,
    );
    assert_eq!(a, b, "two runs differ");
}

#[test]
fn non_finite_gradients_skip_bit_identically() {
    if !gpu_or_skip("non_finite_gradients_skip_bit_identically") {
        return;
    }
    let tensors = awkward_tensors(44);
    let mix = &MIXES[3];
    let mut opt = Optimizer::new(
        build_on(Device::Cuda(0), &tensors, mix),
        Adam::preset(Flavor::PyTorch),
        1e-3,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for (t, g) in tensors.iter().zip(random_grads(&mut rng, &tensors, 1.0)) {
        opt.params_mut().set_grad(&t.name, &g).unwrap();
    }
    opt.step().unwrap();
    let before = observe(&opt, &tensors, mix);
    let mut g = vec![0.5; tensors[3].values.len()];
    g[100] = f32::NAN;
    opt.params_mut().set_grad(&tensors[3].name, &g).unwrap();
    opt.step().unwrap();
    let report = opt.report().unwrap();
    assert!(report.skipped && !report.global_norm.unwrap().is_finite());
    assert_eq!(
        observe(&opt, &tensors, mix),
        before,
        "a skipped step changed something"
    );
}

#[test]
fn ten_thousand_tiny_tensors() {
    if !gpu_or_skip("ten_thousand_tiny_tensors") {
        return;
    }
    let tensors = many_tensors(45, 10_000);
    let rule: Rule = RmsProp {
        centered: true,
        momentum: 0.9,
        ..RmsProp::preset(Flavor::PyTorch)
    }
    .into();
    let cpu = run(
        Device::Cpu,
        &rule,
        1e-2,
        OptimizerOptions::default(),
        &tensors,
        &MIXES[0],
        false,
    );
    let gpu = run(
        Device::Cuda(0),
        &rule,
        1e-2,
        OptimizerOptions::default(),
        &tensors,
        &MIXES[0],
        false,
    );
    assert_agree("10,000 tensors", &gpu, &cpu, true);
}

#[test]
fn a_tensor_beyond_two_to_the_31_elements() {
    if !gpu_or_skip("a_tensor_beyond_two_to_the_31_elements")
        || !real_gpu_or_skip(
            "a_tensor_beyond_two_to_the_31_elements",
            "needs 17 GB of device memory and as much host memory again",
        )
    {
        return;
    }
    // SGD keeps no state: masters + gradients of 2^31 + 17 f32 elements need 17.2 GB.
    let n = (1usize << 31) + 17;
    let mut b = ParamSet::builder();
    b.add("big", &[n], &vec![1.0; n]).unwrap();
    let set = match b.build(Device::Cuda(0)) {
        Ok(s) => s,
        Err(Error::OutOfDeviceMemory { .. }) => {
            let _ = writeln!(
                std::io::stderr(),
                "GPU TEST SKIPPED: not enough device memory for 2^31 elements"
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut opt = Optimizer::new(set, Sgd::preset(Flavor::PyTorch), 0.5).unwrap();
    let mut g = vec![0.0; n];
    g[n - 1] = 2.0;
    g[(1 << 31) - 1] = 4.0;
    opt.params_mut().set_grad("big", &g).unwrap();
    opt.step().unwrap();
    let p = opt.params().read_param("big").unwrap();
    assert_eq!((p[0], p[(1 << 31) - 1], p[n - 1]), (1.0, -1.0, 0.0));
}

#[test]
fn conformance_cases_replay_on_cuda() {
    if !gpu_or_skip("conformance_cases_replay_on_cuda") {
        return;
    }
    let root = repo_root().join("tests/data/conformance/optimizers");
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let replay = harness::replay(&case, Device::Cuda(0)).unwrap();
        let worst = harness::compare(&case, &replay).unwrap();
        assert!(worst <= 1.0, "{}: {worst}", path.display());
    }
}

#[test]
fn kernel_sources_and_fatbins_are_embedded() {
    let names: Vec<&str> = kernels::SOURCES.iter().map(|(n, _)| *n).collect();
    let units = ["update.cu", "norm.cu", "all_reduce.cu", "lean.cu"];
    let headers = [
        "update.cuh",
        "lean/lean.cuh",
        "multi_tensor.cuh",
        "abi.cuh",
        "step/decide.cuh",
        "rules/common.cuh",
        "rules/all.cuh",
        "rules/adam/adam.cuh",
    ];
    for needed in headers.iter().chain(&units) {
        assert!(names.contains(needed), "{needed} not embedded: {names:?}");
    }
    match option_env!("FUSEDOPT_NVCC") {
        Some(nvcc) => {
            assert_eq!(kernels::FATBINS.len(), units.len(), "built with {nvcc}");
            for (name, bytes) in kernels::FATBINS {
                // Fatbin files start with the magic 0xBA55ED50 (little-endian).
                assert_eq!(
                    &bytes[..4],
                    &[0x50, 0xed, 0x55, 0xba],
                    "{name} is not a fatbin"
                );
            }
        }
        // A GPU run must not silently fall back to NVRTC (slow, and headers needed at run time)
        // unless an NVRTC-only build was asked for (FUSEDOPT_NO_FATBIN=1, as CI tests it).
        None if std::env::var("FUSEDOPT_REQUIRE_GPU").is_ok_and(|v| v == "1")
            && !std::env::var("FUSEDOPT_NO_FATBIN").is_ok_and(|v| v == "1") =>
        {
            panic!(
                "built without nvcc under FUSEDOPT_REQUIRE_GPU=1: {}",
                kernels::provenance()
            )
        }
        None => eprintln!("built without nvcc: {}", kernels::provenance()),
    }
}

/// `report()` says the same on both engines: before any step, after an applied step, after a
/// skipped step, and when a NaN norm propagates (it is reported, not mistaken for "no norm").
#[test]
fn reports_agree_with_the_cpu_engine() {
    if !gpu_or_skip("reports_agree_with_the_cpu_engine") {
        return;
    }
    let tensors = awkward_tensors(46);
    let clip = Some(GlobalNormClip::new(1.0, Flavor::PyTorch));
    let cases = [
        (NonFinitePolicy::Skip, LossScale::None),
        (NonFinitePolicy::Propagate, LossScale::None),
        (NonFinitePolicy::Skip, LossScale::dynamic()),
    ];
    for (non_finite, loss_scale) in cases {
        let options = OptimizerOptions {
            clip,
            non_finite,
            loss_scale,
            ..Default::default()
        };
        let reports = |device: Device| {
            let mut opt = Optimizer::with_options(
                build_on(device, &tensors, &MIXES[0]),
                Adam::preset(Flavor::PyTorch),
                1e-3,
                options,
            )
            .unwrap();
            let mut out = vec![opt.report().unwrap()];
            let mut rng = StdRng::seed_from_u64(6);
            for bad in [false, true, false] {
                for (t, mut g) in tensors.iter().zip(random_grads(&mut rng, &tensors, 1.0)) {
                    if bad && !g.is_empty() {
                        g[0] = f32::NAN;
                    }
                    opt.params_mut().set_grad(&t.name, &g).unwrap();
                }
                opt.step().unwrap();
                out.push(opt.report().unwrap());
            }
            out
        };
        let (cpu, gpu) = (reports(Device::Cpu), reports(Device::Cuda(0)));
        for (k, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            let what = format!("{non_finite:?} {loss_scale:?}, report {k}: cpu {c:?}, gpu {g:?}");
            assert_eq!(
                (c.step, c.lr, c.skipped, c.loss_scale),
                (g.step, g.lr, g.skipped, g.loss_scale),
                "{what}"
            );
            match (c.global_norm, g.global_norm) {
                (None, None) => {}
                (Some(a), Some(b)) if a.is_nan() && b.is_nan() => {}
                (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-12 * a.abs(), "{what}"),
                _ => panic!("{what}: only one engine reports a norm"),
            }
            let same_factor = (c.clip_factor.is_nan() && g.clip_factor.is_nan())
                || (c.clip_factor - g.clip_factor).abs() <= 1e-12;
            assert!(same_factor, "{what}");
        }
    }
}

/// A graph is captured while another thread steps another optimizer on the same device (and so on
/// the same working stream): neither disturbs the other, and both end where solo runs end.
#[test]
fn capture_while_other_threads_step() {
    if !gpu_or_skip("capture_while_other_threads_step") {
        return;
    }
    let tensors = awkward_tensors(47);
    let grads = random_grads(&mut StdRng::seed_from_u64(8), &tensors, 1.0);
    let rule: Rule = Adam::preset(Flavor::PyTorch).into();
    let make = |device| {
        let mut opt =
            Optimizer::new(build_on(device, &tensors, &MIXES[0]), rule.clone(), 1e-3).unwrap();
        for (t, g) in tensors.iter().zip(&grads) {
            opt.params_mut().set_grad(&t.name, g).unwrap();
        }
        opt
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let (captured, other, other_steps) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            let mut opt = make(Device::Cuda(0));
            let mut steps = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) || steps < 3 {
                for (t, g) in tensors.iter().zip(&grads) {
                    opt.params_mut().set_grad(&t.name, g).unwrap();
                }
                opt.step().unwrap();
                steps += 1;
            }
            (opt, steps)
        });
        let mut opt = make(Device::Cuda(0));
        for _ in 0..20 {
            opt.step().unwrap();
            opt.capture_graph().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        let (o, steps) = other.join().unwrap();
        (opt, o, steps)
    });
    // Each capture_graph records the step without running it: 20 captures and 20 steps (the
    // first eager, the rest replays) are 20 applied steps.
    let solo = |steps: usize| {
        let mut opt = make(Device::Cpu);
        for _ in 0..steps {
            opt.step().unwrap();
        }
        observe(&opt, &tensors, &MIXES[0])
    };
    assert_agree(
        "captured",
        &observe(&captured, &tensors, &MIXES[0]),
        &solo(20),
        true,
    );
    assert_agree(
        "the other thread's optimizer",
        &observe(&other, &tensors, &MIXES[0]),
        &solo(other_steps),
        true,
    );
}

/// Device timing (the benchmark program's) works: events are created with timing enabled.
#[test]
fn device_time_and_copy_bandwidth_are_measured() {
    if !gpu_or_skip("device_time_and_copy_bandwidth_are_measured") {
        return;
    }
    let tensors = awkward_tensors(48);
    let mut opt = Optimizer::new(
        build_on(Device::Cuda(0), &tensors, &MIXES[0]),
        Adam::preset(Flavor::PyTorch),
        1e-3,
    )
    .unwrap();
    let seconds = fusedopt::cuda::runtime::time_on_device(0, || opt.step()).unwrap();
    assert!(seconds.is_finite() && seconds >= 0.0, "{seconds}");
    let bandwidth = fusedopt::cuda::runtime::copy_bandwidth(0, 1 << 20, 3).unwrap();
    assert!(bandwidth.is_finite() && bandwidth > 0.0, "{bandwidth}");
}

/// Kernels are loaded once per device, and NVRTC (when there is no fatbin) compiles each
/// translation unit once per process, however many optimizers are built.
#[test]
fn kernels_load_once() {
    if !gpu_or_skip("kernels_load_once") {
        return;
    }
    let tensors = awkward_tensors(49);
    let build = || {
        Optimizer::new(
            build_on(Device::Cuda(0), &tensors, &MIXES[0]),
            Adam::preset(Flavor::PyTorch),
            1e-3,
        )
        .unwrap()
    };
    // The build's own units (other tests may compile custom rules' meanwhile).
    let compiled = || {
        let units = fusedopt::cuda::runtime::nvrtc_compiled();
        units
            .into_iter()
            .filter(|u| !u.starts_with("custom_"))
            .collect::<Vec<_>>()
    };
    let first = build();
    let compiles = compiled();
    let more: Vec<Optimizer> = (0..5).map(|_| build()).collect();
    drop((first, more));
    let _again = build();
    assert_eq!(compiled(), compiles);
    if kernels::FATBINS.is_empty() {
        // update.cu and norm.cu (others too, if a test used them), each once.
        assert!(compiles.iter().any(|u| u == "update"), "{compiles:?}");
        assert!(compiles.iter().any(|u| u == "norm"), "{compiles:?}");
        let mut unique = compiles.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            compiles.len(),
            "a unit compiled twice: {compiles:?}"
        );
    } else {
        assert!(
            compiles.is_empty(),
            "NVRTC compiled {compiles:?} beside the fatbins"
        );
    }
}

/// The norm pass with more chunks than its last block has threads (each thread then adds several
/// partials): the norm, the clipped step and the report agree with the CPU engine.
#[test]
fn norm_over_more_chunks_than_threads() {
    if !gpu_or_skip("norm_over_more_chunks_than_threads") {
        return;
    }
    let mut tensors = awkward_tensors(50);
    let mut rng = StdRng::seed_from_u64(51);
    tensors.push(Tensor {
        name: "big".into(),
        group: "default",
        values: (0..300 * 4096 + 17)
            .map(|_| rand::Rng::gen_range(&mut rng, 0.3f32..0.6))
            .collect(),
    });
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        ..Default::default()
    };
    let steps = |device: Device| {
        let mut opt = Optimizer::with_options(
            build_on(device, &tensors, &MIXES[0]),
            Adam::preset(Flavor::PyTorch),
            1e-3,
            options,
        )
        .unwrap();
        let mut rng = StdRng::seed_from_u64(52);
        let mut norms = Vec::new();
        for _ in 0..2 {
            for (t, g) in tensors.iter().zip(random_grads(&mut rng, &tensors, 1.0)) {
                opt.params_mut().set_grad(&t.name, &g).unwrap();
            }
            opt.step().unwrap();
            norms.push(opt.report().unwrap().global_norm.unwrap());
        }
        (observe(&opt, &tensors, &MIXES[0]), norms)
    };
    let (cpu, cpu_norms) = steps(Device::Cpu);
    let (gpu, gpu_norms) = steps(Device::Cuda(0));
    for (c, g) in cpu_norms.iter().zip(&gpu_norms) {
        assert!((c - g).abs() <= 1e-12 * c, "norm: cpu {c} gpu {g}");
    }
    assert_agree("clipped step over many chunks", &gpu, &cpu, false);
}

/// A step, with a new lr each time, eager or replayed, never waits for the device (counted by the
/// emulated driver; a real driver cannot be asked, so this runs on the emulated GPU only).
#[test]
fn steps_do_not_synchronise_with_the_host() {
    if !gpu_or_skip("steps_do_not_synchronise_with_the_host")
        || !emulated_gpu_or_skip(
            "steps_do_not_synchronise_with_the_host",
            "counts synchronisations in the emulated driver",
        )
    {
        return;
    }
    let syncs = emulated_counter("stream_syncs");
    let tensors = awkward_tensors(53);
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        loss_scale: LossScale::dynamic(),
        ..Default::default()
    };
    let mut opt = Optimizer::with_options(
        build_on(Device::Cuda(0), &tensors, &MIXES[1]),
        Adam::preset(Flavor::PyTorch),
        1e-3,
        options,
    )
    .unwrap();
    opt.step().unwrap();
    opt.synchronize().unwrap();
    for graph in [false, true] {
        if graph {
            opt.capture_graph().unwrap();
        }
        let before = syncs();
        for k in 0..5 {
            opt.set_lr(1e-3 / (k + 1) as f64).unwrap();
            opt.step().unwrap();
        }
        assert_eq!(
            syncs(),
            before,
            "graph {graph}: a step waited for the device"
        );
    }
    // The counter does count: waiting for the device shows.
    let before = syncs();
    opt.synchronize().unwrap();
    assert!(syncs() > before, "the driver's counter does not count");
}

/// An attached schedule ticks once per *applied* step on the GPU as on the CPU: the device picks
/// each step's lr (and NAdam its μ-product) by its own step count from entries written ahead. Skipped steps (NaN gradients under
/// dynamic loss scaling) are interleaved over several refills of the device's lr ring, eagerly
/// and under a replayed graph; parameters, state and reports equal the CPU engine's bit for bit,
/// and on the emulated device the steps wait for it only once per ring.
#[test]
fn schedules_follow_applied_steps_on_the_device() {
    use fusedopt::schedule::{optax, torch, Counted, LrSchedule};
    if !gpu_or_skip("schedules_follow_applied_steps_on_the_device") {
        return;
    }
    let tensors = many_tensors(54, 30);
    let mix = &MIXES[1];
    type Schedule = Option<fn() -> Box<dyn LrSchedule>>;
    let torch_cosine: Schedule = Some(|| {
        let kind = torch::Kind::CosineAnnealingLR {
            t_max: 97,
            eta_min: 1e-4,
        };
        Box::new(torch::Scheduler::new(kind, 1e-2).unwrap())
    });
    let optax_warmup: Schedule = Some(|| {
        let s = optax::Schedule::warmup_cosine_decay(0.0, 1e-2, 40.0, 700.0, 1e-5, 1.0);
        Box::new(Counted::new(s))
    });
    // Cycling momentum (or β1) reaches the device through the same ring.
    let cyclic: Schedule = Some(|| {
        let kind = torch::Kind::CyclicLR(torch::Cyclic {
            base_lr: 1e-3,
            max_lr: 1e-2,
            step_size_up: 37.0,
            step_size_down: 23.0,
            mode: torch::CyclicMode::Triangular2,
            gamma: 1.0,
            momentum: Some(torch::MomentumRange {
                base: 0.8,
                max: 0.95,
            }),
        });
        Box::new(torch::Scheduler::new(kind, 1e-3).unwrap())
    });
    let sgd = Sgd {
        momentum: 0.9,
        ..Sgd::preset(Flavor::PyTorch)
    };
    // NAdam's μ-product reaches the device through the same ring, with or without a schedule.
    // Schedule-free's averaging weights follow each applied step's lr.
    let schedule_free = ScheduleFree {
        warmup_steps: 50,
        ..ScheduleFree::adamw(Flavor::PyTorch)
    };
    let cases: [(Rule, f64, Schedule); 8] = [
        (Adam::adamw(Flavor::PyTorch).into(), 1e-3, torch_cosine),
        (Adam::adamw(Flavor::PyTorch).into(), 1e-3, optax_warmup),
        (Nadam::preset(Flavor::PyTorch).into(), 2e-3, None),
        (Nadam::preset(Flavor::Keras).into(), 1e-3, optax_warmup),
        (sgd.into(), 1e-3, cyclic),
        (Adam::preset(Flavor::PyTorch).into(), 1e-3, cyclic),
        (schedule_free.into(), 2.5e-3, torch_cosine),
        (ScheduleFree::sgd(Flavor::Optax).into(), 0.01, None),
    ];
    const STEPS: usize = 700;
    let run = |device: Device, rule: &Rule, lr: f64, schedule: Schedule, graph: bool| {
        let options = OptimizerOptions {
            loss_scale: LossScale::dynamic(),
            ..Default::default()
        };
        let params = build_on(device, &tensors, mix);
        let mut opt = Optimizer::with_options(params, rule.clone(), lr, options).unwrap();
        if let Some(schedule) = schedule {
            opt.set_schedule(Some(schedule())).unwrap();
        }
        let syncs = (device != Device::Cpu && Device::Cuda(0).is_emulated())
            .then(|| emulated_counter("stream_syncs"));
        let (mut step_syncs, mut reports) = (0, Vec::new());
        let mut rng = StdRng::seed_from_u64(8);
        for k in 0..STEPS {
            for (i, (t, mut g)) in tensors
                .iter()
                .zip(random_grads(&mut rng, &tensors, 1.0))
                .enumerate()
            {
                if i == 0 && (k % 7 == 3 || k == 300) {
                    g[0] = f32::NAN;
                }
                opt.params_mut().set_grad(&t.name, &g).unwrap();
            }
            let before = syncs.as_ref().map_or(0, |s| s());
            opt.step().unwrap();
            step_syncs += syncs.as_ref().map_or(0, |s| s() - before);
            if graph && k == 0 {
                opt.capture_graph().unwrap();
            }
            if k % 37 == 3 || k + 1 == STEPS {
                reports.push(opt.report().unwrap());
            }
        }
        let state = observe(&opt, &tensors, mix);
        (state, reports, step_syncs)
    };
    for (rule, lr, schedule) in &cases {
        let (cpu, cpu_reports, _) = run(Device::Cpu, rule, *lr, *schedule, false);
        assert!(cpu_reports.iter().any(|r| r.skipped));
        for graph in [false, true] {
            let (gpu, gpu_reports, syncs) = run(Device::Cuda(0), rule, *lr, *schedule, graph);
            let what = format!("{rule:?}, {:?}, graph {graph}", schedule.map(|s| s()));
            let key = |r: &StepReport| (r.step, r.lr, r.skipped, r.loss_scale);
            let (g, c): (Vec<_>, Vec<_>) = (
                gpu_reports.iter().map(key).collect(),
                cpu_reports.iter().map(key).collect(),
            );
            assert_eq!(g, c, "{what}: reports differ");
            assert_agree(&what, &gpu, &cpu, true);
            if Device::Cuda(0).is_emulated() {
                // One wait per ring of 256 lrs (the first one was written when attaching).
                assert!(
                    syncs <= STEPS as i64 / 256,
                    "{what}: {syncs} waits in {STEPS} steps"
                );
            }
        }
    }
}

/// A schedule's whole life on the device, against the CPU engine's, event for event: attached
/// after some constant-lr steps; a checkpoint saved mid-window resumes on the device; the step
/// whose scheduled lr overflows f32 is refused at the same count on both, changing nothing; a
/// plateau schedule replaces it and cuts the lr on observed metrics; an lr set before removing it
/// stays; a new lr set without a schedule leaves the report of the step before it alone.
#[test]
fn a_schedules_life_on_the_device_matches_the_cpu() {
    use fusedopt::schedule::plateau::ReduceLrOnPlateau;
    use fusedopt::schedule::{optax, Counted, LrSchedule};
    if !gpu_or_skip("a_schedules_life_on_the_device_matches_the_cpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tensors = many_tensors(55, 20);
    let mix = &MIXES[0];
    let piecewise = || -> Box<dyn LrSchedule> {
        Box::new(Counted::new(optax::Schedule::PiecewiseConstant {
            init_value: 1e-3,
            boundaries_and_scales: vec![(100.0, 0.5), (290.0, 1e42)],
        }))
    };
    let scenario = |device: Device, rule: &Rule| {
        let path = dir.path().join(format!("{device}.safetensors"));
        let new = || {
            let params = build_on(device, &tensors, mix);
            Optimizer::new(params, rule.clone(), 1e-3).unwrap()
        };
        let mut opt = new();
        let mut log = Vec::new();
        // Step k's gradients, the same for every optimizer that takes step k.
        let grads = |k: usize| {
            let mut g = random_grads(&mut StdRng::seed_from_u64(k as u64), &tensors, 1.0);
            if k % 11 == 5 {
                g[1][0] = f32::INFINITY;
            }
            g
        };
        let step = |opt: &mut Optimizer, k: usize, log: &mut Vec<String>| {
            for (t, g) in tensors.iter().zip(grads(k)) {
                opt.params_mut().set_grad(&t.name, &g).unwrap();
            }
            match opt.step() {
                Ok(()) if k % 13 == 0 => {
                    let r = opt.report().unwrap();
                    log.push(format!("{k}: {} {} {}", r.step, r.lr, r.skipped));
                }
                Ok(()) => {}
                Err(e) => log.push(format!("{k}: {e:?}")),
            }
        };
        opt.set_lr(3e-3).unwrap();
        for k in 0..10 {
            step(&mut opt, k, &mut log);
            if k == 6 {
                // A new lr: the report still tells the one the last step used.
                opt.set_lr(2e-3).unwrap();
                log.push(format!("set: lr {} {}", opt.lr(), opt.report().unwrap().lr));
            }
        }
        opt.set_schedule(Some(piecewise())).unwrap();
        for k in 10..150 {
            step(&mut opt, k, &mut log);
        }
        opt.save_checkpoint(&path).unwrap();
        let mut resumed = new();
        resumed.set_schedule(Some(piecewise())).unwrap();
        resumed.load_checkpoint(&path).unwrap();
        for k in 150..340 {
            step(&mut opt, k, &mut log);
            step(&mut resumed, k, &mut Vec::new());
        }
        let same = observe(&resumed, &tensors, mix) == observe(&opt, &tensors, mix);
        assert!(same, "{device}: resumed from a checkpoint, the run differs");
        let mut plateau = ReduceLrOnPlateau::pytorch(2e-3);
        plateau.patience = 2;
        opt.set_schedule(Some(Box::new(plateau))).unwrap();
        for (k, metric) in (340..350).zip([5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0]) {
            step(&mut opt, k, &mut log);
            opt.observe(metric).unwrap();
            log.push(format!("{k}: observed, lr {}", opt.report().unwrap().lr));
        }
        // An lr set while a schedule is attached is overridden at the next step; removed first,
        // the set lr stays.
        step(&mut opt, 350, &mut log);
        opt.set_lr(7e-4).unwrap();
        opt.set_schedule(None).unwrap();
        log.push(format!("removed: lr {}", opt.lr()));
        for k in 351..360 {
            step(&mut opt, k, &mut log);
        }
        let r = opt.report().unwrap();
        log.push(format!("end: {} {} {}", r.step, r.lr, r.skipped));
        (log, observe(&opt, &tensors, mix))
    };
    // NAdam also carries its μ-product through the checkpoint (recomputed from the step count),
    // schedule-free its running weights (which need every earlier lr), and each lr set on it
    // rewrites the steps ahead.
    for rule in [
        Adam::preset(Flavor::Optax).into(),
        Nadam::preset(Flavor::PyTorch).into(),
        ScheduleFree::adamw(Flavor::PyTorch).into(),
    ] {
        let (cpu_log, cpu) = scenario(Device::Cpu, &rule);
        let refusals = cpu_log
            .iter()
            .filter(|l| l.contains("InvalidHyperparameter"));
        assert!(refusals.count() > 0, "{cpu_log:#?}");
        let (gpu_log, gpu) = scenario(Device::Cuda(0), &rule);
        for (c, g) in cpu_log.iter().zip(&gpu_log) {
            assert_eq!(g, c, "{rule:?}: the GPU's events differ from the CPU's");
        }
        assert_eq!(gpu_log.len(), cpu_log.len());
        assert_agree(&format!("{rule:?} after the scenario"), &gpu, &cpu, true);
    }
}
