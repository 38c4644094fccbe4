//! Bad input gets a typed error and changes nothing; non-finite gradients follow the policy.

mod common;

use common::*;
use fusedopt::*;

fn small() -> Optimizer {
    let mut b = ParamSet::builder();
    b.add("w", &[2, 3], &[0.1, -0.2, 0.3, 0.4, -0.5, 0.6])
        .unwrap();
    b.add("b", &[3], &[0.0, 1.0, 2.0]).unwrap();
    let mut opt = Optimizer::with_options(
        b.build(Device::Cpu).unwrap(),
        Adam::preset(Flavor::PyTorch),
        1e-3,
        OptimizerOptions {
            clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
            non_finite: NonFinitePolicy::Skip,
            ..Default::default()
        },
    )
    .unwrap();
    opt.params_mut().set_grad("w", &[0.1; 6]).unwrap();
    opt.params_mut().set_grad("b", &[0.2; 3]).unwrap();
    opt.step().unwrap();
    opt
}

/// Everything observable about an optimizer, for "nothing changed" checks.
fn snapshot(opt: &Optimizer) -> Vec<Vec<f32>> {
    let mut out = vec![vec![opt.step_count().unwrap() as f32]];
    for t in ["w", "b"] {
        out.push(opt.params().param(t).unwrap().to_vec());
        for s in opt.state_names() {
            out.push(opt.state(s, t).unwrap().to_vec());
        }
    }
    out
}

#[test]
fn builder_refuses_bad_tensors() {
    let mut b = ParamSet::builder();
    assert!(matches!(
        b.add("w", &[2, 3], &[0.0; 5]),
        Err(Error::LengthMismatch {
            expected: 6,
            got: 5,
            ..
        })
    ));
    b.add("w", &[2], &[0.0; 2]).unwrap();
    assert!(matches!(
        b.add("w", &[1], &[0.0]),
        Err(Error::DuplicateName(_))
    ));
    assert!(matches!(
        b.add_to("nope", "x", &[1], &[0.0]),
        Err(Error::UnknownGroup(_))
    ));
    assert!(matches!(
        b.add("huge", &[usize::MAX, 2], &[]),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        b.group(
            "g",
            GroupOptions {
                lr_scale: f64::NAN,
                weight_decay: None
            }
        ),
        Err(Error::InvalidHyperparameter(_))
    ));
    assert!(matches!(
        ParamSet::builder().build(Device::Cpu),
        Err(Error::EmptyParamSet)
    ));
}

#[test]
fn empty_and_scalar_tensors_are_fine() {
    let mut b = ParamSet::builder();
    b.add("empty", &[0, 4], &[]).unwrap();
    b.add("scalar", &[], &[2.0]).unwrap();
    let mut opt = Optimizer::new(
        b.build(Device::Cpu).unwrap(),
        Sgd::preset(Flavor::PyTorch),
        1e-3,
    )
    .unwrap();
    opt.params_mut().set_grad("scalar", &[1.0]).unwrap();
    opt.set_lr(0.5).unwrap();
    opt.step().unwrap();
    assert_eq!(opt.params().param("scalar").unwrap(), &[1.5]);
    assert!(opt.params().param("empty").unwrap().is_empty());
}

#[test]
fn bad_access_and_hyperparameters_change_nothing() {
    let mut opt = small();
    let before = snapshot(&opt);
    assert!(matches!(
        opt.params_mut().set_grad("w", &[1.0; 5]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        opt.params_mut().set_grad("nope", &[1.0]),
        Err(Error::UnknownTensor(_))
    ));
    assert!(matches!(
        opt.state("nope", "w"),
        Err(Error::UnknownTensor(_))
    ));
    assert!(matches!(
        opt.set_lr(f64::NAN),
        Err(Error::InvalidHyperparameter(_))
    ));
    assert!(matches!(
        opt.set_lr(-1.0),
        Err(Error::InvalidHyperparameter(_))
    ));
    assert_eq!(snapshot(&opt), before);
    let params = opt.params().try_clone().unwrap();
    let bad_rules: Vec<Rule> = vec![
        Adam {
            beta1: 1.0,
            ..Adam::preset(Flavor::PyTorch)
        }
        .into(),
        Adam {
            eps: -1.0,
            ..Adam::preset(Flavor::PyTorch)
        }
        .into(),
        Sgd {
            nesterov: true,
            ..Sgd::preset(Flavor::PyTorch)
        }
        .into(),
        RmsProp {
            alpha: 1.5,
            ..RmsProp::preset(Flavor::Keras)
        }
        .into(),
        Adagrad {
            lr_decay: -0.1,
            ..Adagrad::preset(Flavor::PyTorch)
        }
        .into(),
    ];
    for rule in bad_rules {
        assert!(
            matches!(
                Optimizer::new(params.try_clone().unwrap(), rule.clone(), 1e-3),
                Err(Error::InvalidHyperparameter(_))
            ),
            "{rule:?} accepted"
        );
    }
    for lr in [f64::INFINITY, -1.0, f64::NAN, 1e300] {
        assert!(
            matches!(
                Optimizer::new(
                    params.try_clone().unwrap(),
                    Sgd::preset(Flavor::PyTorch),
                    lr
                ),
                Err(Error::InvalidHyperparameter(_))
            ),
            "lr {lr} accepted"
        );
    }
    let bad_clip = OptimizerOptions {
        clip: Some(GlobalNormClip::new(0.0, Flavor::Keras)),
        ..Default::default()
    };
    assert!(Optimizer::with_options(params, Adam::preset(Flavor::Keras), 1e-3, bad_clip).is_err());
}

#[test]
fn non_finite_gradients_follow_the_policy() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        // Skip: parameters, state and step count untouched; the report says so.
        let mut opt = small();
        let before = snapshot(&opt);
        opt.params_mut().set_grad("b", &[0.1, bad, 0.3]).unwrap();
        opt.step().unwrap();
        let report = opt.report().unwrap();
        assert!(report.skipped && !report.global_norm.unwrap().is_finite());
        assert_eq!(snapshot(&opt), before);

        // Error: a typed error, nothing changed.
        let mut opt = Optimizer::with_options(
            small().params().try_clone().unwrap(),
            Adam::preset(Flavor::PyTorch),
            1e-3,
            OptimizerOptions {
                clip: None,
                non_finite: NonFinitePolicy::Error,
                ..Default::default()
            },
        )
        .unwrap();
        let before = snapshot(&opt);
        opt.params_mut().set_grad("b", &[0.1, bad, 0.3]).unwrap();
        assert!(matches!(opt.step(), Err(Error::NonFiniteGradient { .. })));
        assert_eq!(snapshot(&opt), before);

        // Propagate with PyTorch clipping: NaN norm → every parameter NaN; ∞ norm → finite
        // gradients become 0 (so Adam's first step leaves those parameters unchanged).
        let mut opt = Optimizer::with_options(
            small().params().try_clone().unwrap(),
            Adam::preset(Flavor::PyTorch),
            1e-3,
            OptimizerOptions {
                clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
                non_finite: NonFinitePolicy::Propagate,
                ..Default::default()
            },
        )
        .unwrap();
        opt.params_mut().set_grad("w", &[0.1; 6]).unwrap();
        opt.params_mut().set_grad("b", &[0.1, bad, 0.3]).unwrap();
        let w0 = opt.params().param("w").unwrap().to_vec();
        opt.step().unwrap();
        let report = opt.report().unwrap();
        assert!(!report.skipped);
        let w = opt.params().param("w").unwrap();
        if bad.is_nan() {
            assert!(w.iter().all(|x| x.is_nan()));
        } else {
            assert_eq!(w, &w0[..]);
            assert!(opt.params().param("b").unwrap()[1].is_nan());
        }
    }
}

#[test]
fn groups_scale_lr_and_override_decay() {
    let tensors = awkward_tensors(9);
    let rule = Sgd::preset(Flavor::PyTorch).with_weight_decay(WeightDecay::L2(0.5));
    let mut opt = Optimizer::new(build(&tensors), rule, 0.1).unwrap();
    for t in &tensors {
        opt.params_mut()
            .set_grad(&t.name, &vec![1.0; t.values.len()])
            .unwrap();
    }
    opt.step().unwrap();
    for t in &tensors {
        let got = opt.params().param(&t.name).unwrap();
        for (&g, &p0) in got.iter().zip(&t.values) {
            let want = if t.group == "nodecay" {
                p0 - 0.1 * NODECAY_LR_SCALE as f32
            } else {
                p0 - 0.1 * (1.0 + 0.5 * p0)
            };
            assert!((g - want).abs() < 1e-6, "{}: {g} vs {want}", t.name);
        }
    }
}

#[test]
fn an_attached_schedule_drives_lr_and_skips_do_not_tick_it() {
    use fusedopt::schedule::{keras::Schedule, Counted};
    let mut opt = small();
    let decay = Schedule::ExponentialDecay {
        initial_learning_rate: 0.1,
        decay_steps: 1.0,
        decay_rate: 0.5,
        staircase: false,
    };
    opt.set_schedule(Some(Box::new(Counted::new(decay))))
        .unwrap();
    opt.step().unwrap();
    assert_eq!(opt.report().unwrap().lr, 0.1);
    opt.step().unwrap();
    assert_eq!(opt.report().unwrap().lr, 0.05);
    opt.params_mut().set_grad("b", &[f32::NAN; 3]).unwrap();
    opt.step().unwrap();
    assert!(opt.report().unwrap().skipped);
    opt.params_mut().set_grad("b", &[0.1; 3]).unwrap();
    opt.step().unwrap();
    assert_eq!(opt.report().unwrap().lr, 0.025);
}

#[test]
fn framework_arguments_are_mapped_or_refused() {
    use fusedopt::porting::rule_from_framework;
    let args = |v: serde_json::Value| v.as_object().unwrap().clone();
    // A key the framework does not have is an error, never ignored.
    for (flavor, kind, a) in [
        (
            Flavor::PyTorch,
            "adam",
            args(serde_json::json!({"lr": 0.1, "bogus": 1})),
        ),
        (
            Flavor::Tf1,
            "adam",
            args(serde_json::json!({"amsgrad": true})),
        ),
        (
            Flavor::Keras,
            "sgd",
            args(serde_json::json!({"dampening": 0.1})),
        ),
        (
            Flavor::Optax,
            "sgd",
            args(serde_json::json!({"weight_decay": 0.1})),
        ),
    ] {
        assert!(
            matches!(
                rule_from_framework(flavor, kind, &a, None),
                Err(Error::FrameworkArgument(_))
            ),
            "{flavor:?} {kind} {a:?}"
        );
    }
    // Names map onto knobs: Keras' rho is RMSProp's decay, and its weight decay is decoupled.
    let rule = rule_from_framework(
        Flavor::Keras,
        "rmsprop",
        &args(serde_json::json!({"rho": 0.8, "weight_decay": 0.1})),
        None,
    )
    .unwrap()
    .rule;
    let Rule::RmsProp(r) = rule else {
        panic!("not RMSProp")
    };
    assert_eq!(
        (r.alpha, r.common.weight_decay),
        (0.8, WeightDecay::Decoupled(0.1))
    );
}

/// ReduceLROnPlateau attaches like any schedule: the optimizer's lr follows the metrics the loop
/// observes, and a checkpoint carries the plateau's position.
#[test]
fn a_plateau_schedule_attaches_and_follows_observed_metrics() {
    use fusedopt::schedule::plateau::ReduceLrOnPlateau;
    let plateau = || {
        let mut p = ReduceLrOnPlateau::pytorch(0.1);
        p.patience = 1;
        p.factor = 0.5;
        Box::new(p)
    };
    let mut opt = small();
    opt.set_schedule(Some(plateau())).unwrap();
    let mut lrs = Vec::new();
    for metric in [1.0, 0.9, 0.95, 0.97, 0.5, 0.6, 0.7] {
        opt.params_mut().set_grad("b", &[0.1; 3]).unwrap();
        opt.step().unwrap();
        lrs.push(opt.report().unwrap().lr);
        opt.observe(metric).unwrap();
    }
    // PyTorch: the cut comes on the (patience + 1)-th epoch without improvement.
    assert_eq!(lrs, vec![0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05]);
    opt.step().unwrap();
    assert_eq!(opt.report().unwrap().lr, 0.025);

    let file = tempfile::NamedTempFile::new().unwrap();
    opt.save_checkpoint(file.path()).unwrap();
    let mut back = small();
    back.set_schedule(Some(plateau())).unwrap();
    back.load_checkpoint(file.path()).unwrap();
    for metric in [0.8, 0.9] {
        opt.observe(metric).unwrap();
        back.observe(metric).unwrap();
    }
    assert_eq!(back.lr(), opt.lr());
    opt.step().unwrap();
    back.params_mut().set_grad("b", &[0.1; 3]).unwrap();
    back.step().unwrap();
    assert_eq!(back.report().unwrap().lr, opt.report().unwrap().lr);
    assert_eq!(back.report().unwrap().lr, 0.0125);
}

/// A report tells the lr its step was given, whatever was set since.
#[test]
fn a_report_tells_the_lr_its_step_used() {
    let mut opt = small();
    opt.set_lr(0.1).unwrap();
    opt.params_mut().set_grad("b", &[0.1; 3]).unwrap();
    opt.step().unwrap();
    opt.set_lr(0.2).unwrap();
    assert_eq!(opt.report().unwrap().lr, 0.1);
    assert_eq!(opt.lr(), 0.2);
}

/// A schedule that cycles momentum attaches only to a rule that has one to cycle (PyTorch raises
/// for the others); refused, the optimizer keeps its old schedule.
#[test]
fn momentum_cycling_needs_a_momentum() {
    use fusedopt::schedule::torch::{Kind, MomentumRange, OneCycle, Scheduler};
    let one_cycle = |momentum: Option<MomentumRange>| {
        let kind = Kind::OneCycleLR(OneCycle {
            max_lr: 0.1,
            total_steps: 10,
            pct_start: 0.3,
            cosine: true,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
            momentum,
        });
        Box::new(Scheduler::new(kind, 0.1).unwrap())
    };
    let cycling = Some(MomentumRange {
        base: 0.85,
        max: 0.95,
    });
    let build = |rule: Rule| {
        let mut b = ParamSet::builder();
        b.add("w", &[3], &[1.0, 2.0, 3.0]).unwrap();
        Optimizer::new(b.build(Device::Cpu).unwrap(), rule, 1e-3).unwrap()
    };
    for rule in [
        Rule::from(Adagrad::preset(Flavor::PyTorch)),
        Adadelta::preset(Flavor::PyTorch).into(),
        Nadam::preset(Flavor::PyTorch).into(),
        Sgd::preset(Flavor::PyTorch).into(),
    ] {
        let mut opt = build(rule.clone());
        assert!(
            matches!(
                opt.set_schedule(Some(one_cycle(cycling))),
                Err(Error::InvalidHyperparameter(_))
            ),
            "{rule:?}"
        );
        opt.step().unwrap();
        assert_eq!(opt.report().unwrap().lr, 1e-3, "{rule:?}: a schedule stuck");
        // Without cycling the same schedule attaches.
        opt.set_schedule(Some(one_cycle(None))).unwrap();
    }
    let mut adam = build(Adam::preset(Flavor::PyTorch).into());
    adam.set_schedule(Some(one_cycle(cycling))).unwrap();
}

/// A momentum range must lie in (0, 1): at 0 PyTorch skips the momentum buffer, which a rule built
/// with one cannot follow, and β1 = 1 leaves Adam's bias correction at 0.
#[test]
fn a_cycled_momentum_range_lies_in_zero_one() {
    use fusedopt::porting::schedule_from_framework;
    use serde_json::json;
    for (base, max) in [
        (json!(0.0), json!(0.9)),
        (json!(0.85), json!(1.0)),
        (json!(-0.1), json!(0.9)),
        (json!(0.5), json!("NaN")),
    ] {
        let spec = json!({"kind": "OneCycleLR", "max_lr": 0.1, "total_steps": 10,
            "base_momentum": base, "max_momentum": max});
        let got = schedule_from_framework(Flavor::PyTorch, spec.as_object().unwrap());
        assert!(
            matches!(got, Err(Error::InvalidHyperparameter(_))),
            "({base}, {max}): {got:?}"
        );
    }
    let cyclic = json!({"kind": "CyclicLR", "max_lr": 0.1});
    assert!(schedule_from_framework(Flavor::PyTorch, cyclic.as_object().unwrap()).is_err());
}

/// Schedule-free's knobs are validated up front, Optax's form takes no schedule (it would need
/// two lrs per step), and its framework arguments are mapped or refused.
#[test]
fn schedule_free_refusals_are_typed_and_change_nothing() {
    use fusedopt::porting::rule_from_framework;
    use fusedopt::schedule::{optax, Counted};
    let params = || small().params().try_clone().unwrap();
    let bad = [
        ScheduleFree {
            beta1: 1.0,
            ..ScheduleFree::sgd(Flavor::PyTorch)
        },
        ScheduleFree {
            r: 0.5,
            ..ScheduleFree::adamw(Flavor::Optax)
        },
        ScheduleFree::sgd(Flavor::PyTorch).with_weight_decay(WeightDecay::Decoupled(0.1)),
    ];
    for rule in bad {
        let err = Optimizer::new(params(), rule.clone(), 1e-3).unwrap_err();
        assert!(
            matches!(err, Error::InvalidHyperparameter(_)),
            "{rule:?}: {err}"
        );
    }
    let mut opt = Optimizer::new(params(), ScheduleFree::adamw(Flavor::Optax), 1e-3).unwrap();
    let before = snapshot(&opt);
    let warmup = optax::Schedule::warmup_cosine_decay(0.0, 1e-2, 5.0, 50.0, 0.0, 1.0);
    let err = opt
        .set_schedule(Some(Box::new(Counted::new(warmup))))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidHyperparameter(_)), "{err}");
    assert_eq!(snapshot(&opt), before);
    // The reference form takes schedules, as its lr is read every step.
    let mut reference =
        Optimizer::new(params(), ScheduleFree::adamw(Flavor::PyTorch), 1e-3).unwrap();
    let warmup = optax::Schedule::warmup_cosine_decay(0.0, 1e-2, 5.0, 50.0, 0.0, 1.0);
    reference
        .set_schedule(Some(Box::new(Counted::new(warmup))))
        .unwrap();

    let args = |json: &str| serde_json::from_str::<serde_json::Map<_, _>>(json).unwrap();
    for (flavor, json) in [
        (Flavor::Optax, r#"{"state_dtype": "bfloat16"}"#),
        (Flavor::Optax, r#"{"warmup_steps": 2.5}"#),
        (Flavor::Optax, r#"{"r": 0.5}"#),
        (Flavor::PyTorch, r#"{"momentum": 0.0}"#),
    ] {
        assert!(
            rule_from_framework(flavor, "schedule_free_sgd", &args(json), None).is_err(),
            "{flavor:?} {json}"
        );
    }
    let rule = rule_from_framework(
        Flavor::PyTorch,
        "schedule_free_adamw",
        &args(r#"{"lr": 0.01, "betas": [0.8, 0.99], "weight_decay": 0.1, "warmup_steps": 3, "foreach": false}"#),
        None,
    )
    .unwrap()
    .rule;
    let Rule::ScheduleFree(sf) = rule else {
        panic!("{rule:?}")
    };
    assert_eq!(
        (
            sf.beta1,
            sf.beta2,
            sf.warmup_steps,
            sf.form,
            sf.common.weight_decay
        ),
        (
            0.8,
            0.99,
            3,
            ScheduleFreeForm::InPlace,
            WeightDecay::Decoupled(0.1)
        )
    );
}

/// Parameters written after the optimizer was built (pretrained weights loaded into its arena)
/// are where schedule-free starts: z takes them at the first step, as the reference's lazy
/// `z = clone(p)` and Optax's `init(params)` do.
#[test]
fn schedule_free_starts_from_parameters_written_before_the_first_step() {
    use rand::SeedableRng;
    let tensors = awkward_tensors(12);
    let pretrained: Vec<Tensor> = tensors
        .iter()
        .map(|t| Tensor {
            name: t.name.clone(),
            group: t.group,
            values: t.values.iter().map(|x| 0.5 - x).collect(),
        })
        .collect();
    for rule in [
        ScheduleFree::adamw(Flavor::PyTorch),
        ScheduleFree::sgd(Flavor::Optax),
    ] {
        let mut written = Optimizer::new(build(&tensors), rule.clone(), 0.01).unwrap();
        for t in &pretrained {
            let mut params = written.params_mut();
            params
                .param_mut(&t.name)
                .unwrap()
                .copy_from_slice(&t.values);
        }
        let mut direct = Optimizer::new(build(&pretrained), rule.clone(), 0.01).unwrap();
        for t in &pretrained {
            let x = written.eval_param(&t.name).unwrap();
            assert_eq!(x, t.values, "before the first step");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..3 {
            let grads = random_grads(&mut rng, &tensors, 1.0);
            for opt in [&mut written, &mut direct] {
                for (t, g) in tensors.iter().zip(&grads) {
                    opt.params_mut().set_grad(&t.name, g).unwrap();
                }
                opt.step().unwrap();
            }
        }
        for t in &tensors {
            let (a, b) = (written.params(), direct.params());
            assert_eq!(
                a.param(&t.name).unwrap(),
                b.param(&t.name).unwrap(),
                "{rule:?}"
            );
            let (x, y) = (written.eval_param(&t.name), direct.eval_param(&t.name));
            assert_eq!(x.unwrap(), y.unwrap(), "{rule:?}");
        }
    }
}
