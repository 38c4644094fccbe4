//! Custom rules: Adam and Lion written as custom rules step bit for bit like the built-in ones
//! (clipping, bf16 gradients and state, a skipped non-finite step, decay, maximize), checkpoints
//! load only into the same rule, and bad definitions get typed errors.

mod common;
#[path = "../examples/shared/custom_adam.rs"]
mod custom_adam;

use common::*;
use custom_adam::custom_adam;
use fusedopt::parallel::DataParallel;
use fusedopt::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Optax's Lion (sign(NaN) = NaN) as a custom rule.
fn custom_lion(beta1: f64, beta2: f64) -> CustomRule {
    let mut r = CustomRule::builder("lion_custom");
    r.hyperparameter("beta1", beta1)
        .hyperparameter("beta2", beta2)
        .slot("exp_avg", 0.0)
        .coefficient("lr", "lr")
        .coefficient("beta1", "beta1")
        .coefficient("one_minus_beta1", "1 - beta1")
        .coefficient("beta2", "beta2")
        .coefficient("one_minus_beta2", "1 - beta2")
        .cpu(|k, p, g, s| {
            let c = k[1] * s[0] + k[2] * g;
            let sign = if c > 0.0 {
                1.0
            } else if c < 0.0 {
                -1.0
            } else if c.is_nan() {
                c
            } else {
                0.0
            };
            *p -= k[0] * sign;
            s[0] = k[3] * s[0] + k[4] * g;
        })
        .cuda(
            "const float c = k.beta1 * s[0] + k.one_minus_beta1 * g;
             p = p - k.lr * (c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : (c != c ? c : 0.0f)));
             s[0] = k.beta2 * s[0] + k.one_minus_beta2 * g;",
        );
    r.build().unwrap()
}

/// Pairs of (built-in, the same written as a custom rule), each with its lr.
fn pairs() -> Vec<(Rule, Rule, f64)> {
    let adam = Adam {
        beta1: 0.85,
        beta2: 0.995,
        eps: 1e-7,
        ..Adam::preset(Flavor::PyTorch)
    };
    let lion = Lion {
        beta1: 0.8,
        beta2: 0.98,
        ..Lion::preset(Flavor::Optax)
    };
    let decoupled = WeightDecay::Decoupled(0.05);
    vec![
        (
            adam.clone().into(),
            custom_adam(0.85, 0.995, 1e-7).into(),
            0.01,
        ),
        (
            adam.with_weight_decay(WeightDecay::L2(0.1))
                .maximizing(true)
                .into(),
            custom_adam(0.85, 0.995, 1e-7)
                .with_weight_decay(WeightDecay::L2(0.1))
                .maximizing(true)
                .into(),
            0.01,
        ),
        (
            lion.clone().with_weight_decay(decoupled).into(),
            custom_lion(0.8, 0.98).with_weight_decay(decoupled).into(),
            3e-3,
        ),
    ]
}

/// Steps `rule` on `device` 7 times (the fourth with a NaN gradient) with changing lrs, captured
/// in a graph after the first step when `graph`; returns every parameter, model-copy and state
/// value and each step's report.
fn run(device: Device, rule: &Rule, lr: f64, mix: Mix, clip: bool, graph: bool) -> Outcome {
    let (grads, state) = mix;
    let tensors = awkward_tensors(61);
    let model = (grads != DType::F32).then_some(grads);
    let set = build_with(device, &tensors, grads, model);
    let options = OptimizerOptions {
        clip: clip.then(|| GlobalNormClip::new(2.0, Flavor::PyTorch)),
        state_dtype: state,
        ..Default::default()
    };
    let mut opt = Optimizer::with_options(set, rule.clone(), lr, options).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let mut reports = Vec::new();
    for step in 0..7 {
        let mut grads = random_grads(&mut rng, &tensors, 1.0);
        if step == 3 {
            grads[1][0] = f32::NAN;
        }
        for (t, g) in tensors.iter().zip(&grads) {
            opt.params_mut().set_grad(&t.name, g).unwrap();
        }
        opt.set_lr(lr * [1.0, 0.5, 0.5, 0.25][step % 4]).unwrap();
        opt.step().unwrap();
        if graph && step == 0 {
            opt.capture_graph().unwrap();
        }
        let r = opt.report().unwrap();
        reports.push(format!(
            "{} {} {} {:?}",
            r.step, r.skipped, r.lr, r.clip_factor
        ));
    }
    assert!(
        reports.iter().any(|r| r.contains("true")),
        "no skipped step"
    );
    let mut out = Vec::new();
    for t in &tensors {
        out.push(opt.params().read_param(&t.name).unwrap());
        if model.is_some() {
            out.push(opt.params().read_model_param(&t.name).unwrap());
        }
        for s in opt.state_names() {
            out.push(opt.state(s, &t.name).unwrap());
        }
    }
    (out, reports)
}

/// Gradient and state dtypes.
type Mix = (DType, DType);
const MIXES: [Mix; 3] = [
    (DType::F32, DType::F32),
    (DType::BF16, DType::F32),
    (DType::BF16, DType::BF16),
];
/// Every buffer a run leaves, and its reports.
type Outcome = (Vec<Vec<f32>>, Vec<String>);

/// The same bits everywhere (`nan_payload`: any NaN matches any NaN, as the GPU's conversions
/// make the canonical NaN where the CPU keeps a payload).
fn assert_same(what: &str, got: &Outcome, want: &Outcome, nan_payload: bool) {
    assert_eq!(got.1, want.1, "{what}: reports");
    assert_eq!(got.0.len(), want.0.len(), "{what}");
    for (k, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: buffer {k}");
        let differs = |(a, b): (&f32, &f32)| {
            a.to_bits() != b.to_bits() && !(nan_payload && a.is_nan() && b.is_nan())
        };
        if let Some(i) = g.iter().zip(w).position(differs) {
            panic!("{what}: buffer {k}[{i}]: {:e} against {:e}", g[i], w[i]);
        }
    }
}

#[test]
fn custom_adam_and_lion_step_bit_for_bit_like_the_built_in_rules() {
    for (builtin, custom, lr) in pairs() {
        for mix in MIXES {
            for clip in [false, true] {
                let want = run(Device::Cpu, &builtin, lr, mix, clip, false);
                let got = run(Device::Cpu, &custom, lr, mix, clip, false);
                assert_same(
                    &format!("{custom:?} {mix:?} clip {clip}"),
                    &got,
                    &want,
                    false,
                );
            }
        }
    }
}

/// On the GPU the custom rule's kernels are generated and compiled at run time (NVRTC, or the
/// emulated device's stand-in): they step bit for bit like the built-in rule's, also replayed
/// from a captured graph, and like the CPU engine (without clipping: the GPU sums the norm in
/// another order).
#[test]
fn custom_rules_on_the_gpu_step_bit_for_bit_like_the_built_in_rules() {
    if !gpu_or_skip("custom_rules_on_the_gpu_step_bit_for_bit_like_the_built_in_rules") {
        return;
    }
    let gpu = Device::Cuda(0);
    for (builtin, custom, lr) in pairs() {
        for mix in MIXES {
            for clip in [false, true] {
                let what = format!("{custom:?} {mix:?} clip {clip}");
                let want = run(gpu, &builtin, lr, mix, clip, false);
                let got = run(gpu, &custom, lr, mix, clip, false);
                assert_same(&format!("GPU {what}"), &got, &want, false);
                if !clip {
                    let cpu = run(Device::Cpu, &custom, lr, mix, clip, false);
                    assert_same(&format!("GPU against CPU {what}"), &got, &cpu, true);
                }
            }
        }
        let mix = (DType::BF16, DType::F32);
        let want = run(gpu, &builtin, lr, mix, true, true);
        let got = run(gpu, &custom, lr, mix, true, true);
        assert_same(&format!("graph-replayed {custom:?}"), &got, &want, false);
    }
}

/// The same rule in another shape must not pass for it: the test above can fail.
#[test]
fn a_wrong_custom_rule_is_told_apart() {
    let builtin: Rule = Adam::preset(Flavor::PyTorch).into();
    let wrong: Rule = custom_adam(0.9, 0.99, 1e-8).into();
    let mix = (DType::F32, DType::F32);
    let (want, _) = run(Device::Cpu, &builtin, 0.01, mix, false, false);
    let (got, _) = run(Device::Cpu, &wrong, 0.01, mix, false, false);
    assert_ne!(got, want);
}

#[test]
fn checkpoints_load_only_into_the_same_custom_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.safetensors");
    let tensors = awkward_tensors(62);
    let new = |rule: Rule| Optimizer::new(build(&tensors), rule, 0.01).unwrap();
    let mut a = new(custom_adam(0.9, 0.999, 1e-8).into());
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..3 {
        for (t, g) in tensors.iter().zip(random_grads(&mut rng, &tensors, 1.0)) {
            a.params_mut().set_grad(&t.name, &g).unwrap();
        }
        a.step().unwrap();
    }
    a.save_checkpoint(&path).unwrap();
    let mut b = new(custom_adam(0.9, 0.999, 1e-8).into());
    b.load_checkpoint(&path).unwrap();
    for t in &tensors {
        assert_eq!(
            a.params().param(&t.name).unwrap(),
            b.params().param(&t.name).unwrap()
        );
        assert_eq!(
            a.state("exp_avg_sq", &t.name).unwrap(),
            b.state("exp_avg_sq", &t.name).unwrap()
        );
    }
    for other in [
        Rule::from(custom_adam(0.9, 0.99, 1e-8)),
        Adam::preset(Flavor::PyTorch).into(),
        custom_lion(0.9, 0.99).into(),
    ] {
        let mut o = new(other.clone());
        let err = o.load_checkpoint(&path).unwrap_err();
        assert!(
            matches!(err, Error::BadCheckpoint { .. }),
            "{other:?}: {err}"
        );
    }
}

#[test]
fn bad_definitions_get_typed_errors() {
    let base = || {
        let mut r = CustomRule::builder("ok");
        r.hyperparameter("beta", 0.9)
            .slot("m", 0.0)
            .coefficient("beta", "beta")
            .cpu(|_, _, _, _| {})
            .cuda("s[0] = k.beta * s[0] + g;");
        r
    };
    base().build().unwrap();
    type Edit = Box<dyn Fn(&mut CustomRuleBuilder)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "declared twice",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.hyperparameter("beta", 0.5);
            }),
        ),
        (
            "lr, t and sqrt are taken",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.hyperparameter("lr", 0.1);
            }),
        ),
        (
            "C++'s keywords and reserved names are taken",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.coefficient("float", "beta");
            }),
        ),
        (
            "C++'s keywords and reserved names are taken",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.coefficient("or", "beta");
            }),
        ),
        (
            "C++'s keywords and reserved names are taken",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.coefficient("_Beta", "beta");
            }),
        ),
        (
            "NUL character",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.cuda("s[0] = g; \0");
            }),
        ),
        (
            "at most 3",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.slot("a", 0.0).slot("b", 0.0).slot("c", 0.0);
            }),
        ),
        (
            "is not a hyperparameter",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.coefficient("x", "gamma * lr");
            }),
        ),
        (
            "must be t or a whole number",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.coefficient("x", "beta ^ 0.5");
            }),
        ),
        (
            "'k.bet' is not a coefficient",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.cuda("p = k.bet * g; // β");
            }),
        ),
        (
            "'s[1]' is not one of the 1 slots",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.cuda("// β\ns[1] = g;");
            }),
        ),
        (
            "no CUDA body",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.cuda("  ");
            }),
        ),
        (
            "hyperparameter 'x' is NaN",
            Box::new(|r: &mut CustomRuleBuilder| {
                r.hyperparameter("x", f64::NAN);
            }),
        ),
    ];
    for (why, edit) in cases {
        let mut r = base();
        edit(&mut r);
        match r.build() {
            Err(Error::CustomRule { reason, .. }) => {
                assert!(reason.contains(why), "expected '{why}', got '{reason}'")
            }
            other => panic!("{why}: {other:?}"),
        }
    }
    let mut bad_name = CustomRule::builder("2fast");
    bad_name.cpu(|_, _, _, _| {}).cuda("p = g;");
    match bad_name.build() {
        Err(Error::CustomRule { reason, .. }) => {
            assert!(reason.contains("C identifier"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let mut no_cpu = CustomRule::builder("no_cpu");
    no_cpu.cuda("p = g;");
    assert!(matches!(no_cpu.build(), Err(Error::CustomRule { .. })));
}

/// Replicas of a custom rule stay identical on CPU threads, and a replica with another custom
/// rule is refused.
#[test]
fn custom_rules_run_data_parallel() {
    let tensors = awkward_tensors(63);
    let new = |rule: Rule| Optimizer::new(build(&tensors), rule, 0.003).unwrap();
    let opts = vec![
        new(custom_lion(0.9, 0.99).into()),
        new(custom_lion(0.9, 0.99).into()),
    ];
    let mut dp = DataParallel::cpu(opts, Default::default()).unwrap();
    for step in 0..3 {
        dp.step(|rank, grads| {
            for t in &tensors {
                let g: Vec<f32> = (0..t.values.len())
                    .map(|i| ((i + 7 * rank + 3 * step) as f32).sin())
                    .collect();
                grads.set(&t.name, &g)?;
            }
            Ok(())
        })
        .unwrap();
    }
    let params: Vec<Vec<f32>> = dp
        .replicas()
        .map(|o| o.params().read_param(&tensors[1].name).unwrap())
        .collect();
    assert_eq!(params[0], params[1]);
    let mixed = vec![
        new(custom_lion(0.9, 0.99).into()),
        new(custom_lion(0.8, 0.99).into()),
    ];
    let err = DataParallel::cpu(mixed, Default::default()).unwrap_err();
    assert!(matches!(err, Error::ReplicasDiffer { .. }), "{err}");
}

/// A body the compiler refuses is a typed error when the optimizer is built on the GPU, carrying
/// the compiler's log and the line of the body it points at; the same rule still runs on the CPU.
#[test]
fn a_cuda_body_that_does_not_compile_says_where() {
    if !gpu_or_skip("a_cuda_body_that_does_not_compile_says_where") {
        return;
    }
    let mut r = CustomRule::builder("broken_sign");
    r.hyperparameter("beta", 0.9)
        .slot("m", 0.0)
        .coefficient("beta", "beta")
        .cpu(|k, p, g, s| {
            s[0] = k[0] * s[0] + g;
            *p -= s[0].signum();
        })
        .cuda("s[0] = k.beta * s[0] + g;\n    p = p - sgn(s[0]);\n");
    let rule: Rule = r.build().unwrap().into();
    let tensors = awkward_tensors(64);
    let set = build_with(Device::Cuda(0), &tensors, DType::F32, None);
    let err = Optimizer::new(set, rule.clone(), 0.01).unwrap_err();
    let text = err.to_string();
    match err {
        Error::CustomRuleCompile {
            rule,
            line,
            code,
            log,
            ..
        } => {
            assert_eq!(rule, "broken_sign");
            assert_eq!(line, Some(2), "{log}");
            assert_eq!(code.as_deref(), Some("p = p - sgn(s[0]);"));
            assert!(log.contains("sgn"), "{log}");
        }
        other => panic!("{other:?}"),
    }
    assert!(text.contains("at line 2: `p = p - sgn(s[0]);`"), "{text}");
    Optimizer::new(build(&tensors), rule, 0.01).unwrap();
}

/// A custom rule is compiled once per process and architecture, however many optimizers use it;
/// another rule of the same name but another body gets kernels of its own.
#[test]
fn custom_kernels_are_compiled_once_and_never_mixed_up() {
    if !gpu_or_skip("custom_kernels_are_compiled_once_and_never_mixed_up") {
        return;
    }
    let sign = |body: &str| {
        let mut r = CustomRule::builder("signs");
        r.slot("unused", 0.0)
            .coefficient("lr", "lr")
            .cpu(|_, _, _, _| {})
            .cuda(body);
        Rule::from(r.build().unwrap())
    };
    let down = sign("p = p - k.lr * (g > 0.0f ? 1.0f : -1.0f);");
    let up = sign("p = p + k.lr * (g > 0.0f ? 1.0f : -1.0f);");
    let tensors = vec![Tensor {
        name: "w".into(),
        group: "default",
        values: vec![1.0; 37],
    }];
    let step = |rule: &Rule| {
        let set = build_with(Device::Cuda(0), &tensors, DType::F32, None);
        let mut opt = Optimizer::new(set, rule.clone(), 0.25).unwrap();
        opt.params_mut().set_grad("w", &[1.0; 37]).unwrap();
        opt.step().unwrap();
        opt.params().read_param("w").unwrap()[0]
    };
    let compiled = || {
        let units = fusedopt::cuda::runtime::nvrtc_compiled();
        units
            .into_iter()
            .filter(|u| u.starts_with("custom_signs_"))
            .collect::<Vec<_>>()
    };
    assert_eq!(step(&down), 0.75);
    assert_eq!(step(&down), 0.75);
    assert_eq!(compiled().len(), 1, "{:?}", compiled());
    assert_eq!(step(&up), 1.25);
    assert_eq!(step(&down), 0.75);
    assert_eq!(compiled().len(), 2, "{:?}", compiled());
    // The same text with the hyperparameters declared in another order reads them elsewhere:
    // it compiles kernels of its own.
    let ordered = |names: [(&str, f64); 2]| {
        let mut r = CustomRule::builder("signs");
        r.hyperparameter(names[0].0, names[0].1)
            .hyperparameter(names[1].0, names[1].1)
            .slot("unused", 0.0)
            .coefficient("step", "lr * up")
            .cpu(|_, _, _, _| {})
            .cuda("p = p - k.step;");
        Rule::from(r.build().unwrap())
    };
    assert_eq!(step(&ordered([("up", 1.0), ("down", -1.0)])), 0.75);
    assert_eq!(step(&ordered([("down", -1.0), ("up", 1.0)])), 0.75);
    assert_eq!(compiled().len(), 4, "{:?}", compiled());
}

/// Without NVRTC a custom rule on the GPU is a typed error naming what is missing, when the
/// optimizer is built (run in a child process: NVRTC is looked for once per process).
#[test]
fn without_nvrtc_a_custom_rule_on_the_gpu_is_a_typed_error() {
    const CHILD: &str = "FUSEDOPT_TEST_WITHOUT_NVRTC";
    if std::env::var_os(CHILD).is_none() {
        if !gpu_or_skip("without_nvrtc_a_custom_rule_on_the_gpu_is_a_typed_error") {
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "without_nvrtc_a_custom_rule_on_the_gpu_is_a_typed_error",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("FUSEDOPT_NVRTC_LIB", "/nonexistent/libnvrtc.so.13")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the child failed:\n{text}");
        assert!(text.contains("1 passed"), "{text}");
        return;
    }
    let tensors = awkward_tensors(65);
    let set = build_with(Device::Cuda(0), &tensors, DType::F32, None);
    match Optimizer::new(set, custom_lion(0.9, 0.99), 1e-3) {
        Err(Error::CustomRule { rule, reason }) => {
            assert_eq!(rule, "lion_custom");
            assert!(reason.contains("NVRTC"), "{reason}");
            assert!(reason.contains("/nonexistent/libnvrtc.so.13"), "{reason}");
        }
        Err(other) => panic!("expected a typed refusal, got {other}"),
        Ok(_) => panic!("a custom rule was built on a GPU without NVRTC"),
    }
    // The built-in rules need no NVRTC where their fatbin is embedded.
    if !fusedopt::cuda::kernels::FATBINS.is_empty() {
        let set = build_with(Device::Cuda(0), &tensors, DType::F32, None);
        Optimizer::new(set, Lion::preset(Flavor::Optax), 1e-3).unwrap();
    }
}
