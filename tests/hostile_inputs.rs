//! Hostile inputs through the public API: every value a caller can pass that no framework accepts,
//! or that would corrupt the step later, is refused up front with a typed error, and nothing
//! panics (this suite also runs in the debug profile, where arithmetic overflow panics).

use std::time::Duration;

use fusedopt::comm::cpu::CpuCommunicator;
use fusedopt::comm::rendezvous::{Rendezvous, RendezvousConfig};
use fusedopt::schedule::{keras, optax, torch, Counted, LrSchedule};
use fusedopt::*;

fn params() -> ParamSet {
    let mut b = ParamSet::builder();
    b.group("scaled", GroupOptions::default()).unwrap();
    b.add("w", &[4], &[0.5, -0.5, 0.25, 1.0]).unwrap();
    b.add_to("scaled", "b", &[2], &[0.1, 0.2]).unwrap();
    b.build(Device::Cpu).unwrap()
}

fn adam() -> Adam {
    Adam::preset(Flavor::PyTorch)
}

fn invalid<T: std::fmt::Debug>(what: &str, r: Result<T>) {
    match r {
        Err(Error::InvalidHyperparameter(_)) => {}
        other => panic!("{what}: expected InvalidHyperparameter, got {other:?}"),
    }
}

/// f64 values that are finite but overflow (or vanish in) the f32 arithmetic of the step.
const BEYOND_F32: f64 = 1e39;

#[test]
fn hyperparameters_beyond_f32_are_refused() {
    invalid("lr 1e39", Optimizer::new(params(), adam(), BEYOND_F32));
    invalid(
        "eps 1e39",
        Optimizer::new(
            params(),
            Adam {
                eps: BEYOND_F32,
                ..adam()
            },
            1e-3,
        ),
    );
    invalid(
        "weight decay 1e39",
        Optimizer::new(
            params(),
            Sgd::preset(Flavor::PyTorch).with_weight_decay(WeightDecay::L2(BEYOND_F32)),
            1e-3,
        ),
    );
    let mut opt = Optimizer::new(params(), adam(), 1e-3).unwrap();
    invalid("set_lr 1e39", opt.set_lr(BEYOND_F32));
    assert_eq!(opt.lr(), 1e-3, "a refused lr changed the optimizer");

    // A group's lr scale times the lr must fit too.
    let mut b = ParamSet::builder();
    b.group(
        "hot",
        GroupOptions {
            lr_scale: 1e30,
            weight_decay: None,
        },
    )
    .unwrap();
    b.add_to("hot", "w", &[3], &[1.0; 3]).unwrap();
    let set = b.build(Device::Cpu).unwrap();
    let mut opt = Optimizer::new(set, Sgd::preset(Flavor::PyTorch), 1e-3).unwrap();
    invalid("lr 1e10 × group scale 1e30", opt.set_lr(1e10));
    invalid(
        "rule lr 1e10 × group scale 1e30",
        Optimizer::new(
            opt.params().try_clone().unwrap(),
            Sgd::preset(Flavor::PyTorch),
            1e10,
        ),
    );
}

#[test]
fn group_weight_decay_overrides_are_validated() {
    for wd in [f64::NAN, -1.0, f64::INFINITY, BEYOND_F32] {
        let mut b = ParamSet::builder();
        let r = b.group(
            "g",
            GroupOptions {
                lr_scale: 1.0,
                weight_decay: Some(wd),
            },
        );
        invalid(&format!("group weight decay {wd}"), r.map(|_| ()));
    }
}

#[test]
fn loss_scales_that_would_corrupt_every_step_are_refused() {
    let with = |loss_scale| {
        Optimizer::with_options(
            params(),
            adam(),
            1e-3,
            OptimizerOptions {
                loss_scale,
                ..Default::default()
            },
        )
    };
    let dynamic = |growth_factor: f64, backoff_factor: f64, init_scale: f64| LossScale::Dynamic {
        init_scale,
        growth_factor,
        backoff_factor,
        growth_interval: 10,
    };
    invalid("growth NaN", with(dynamic(f64::NAN, 0.5, 1024.0)));
    invalid("growth ∞", with(dynamic(f64::INFINITY, 0.5, 1024.0)));
    invalid("backoff NaN", with(dynamic(2.0, f64::NAN, 1024.0)));
    invalid("init NaN", with(dynamic(2.0, 0.5, f64::NAN)));
    invalid("init beyond f32", with(dynamic(2.0, 0.5, BEYOND_F32)));
    invalid(
        "static scale whose reciprocal overflows",
        with(LossScale::Static(1e-320)),
    );
    invalid(
        "static scale whose reciprocal overflows f32",
        with(LossScale::Static(1e-39)),
    );
    invalid(
        "static scale beyond f32",
        with(LossScale::Static(BEYOND_F32)),
    );
    invalid("static NaN", with(LossScale::Static(f64::NAN)));
}

#[test]
fn rmsprop_bias_correction_with_alpha_one_is_refused() {
    invalid(
        "alpha 1 with bias correction (1 − αᵗ = 0)",
        Optimizer::new(
            params(),
            RmsProp {
                alpha: 1.0,
                bias_correction: true,
                ..RmsProp::preset(Flavor::Optax)
            },
            1e-3,
        ),
    );
    // Without bias correction α = 1 is legal (the average never moves) and steps fine.
    let mut opt = Optimizer::new(
        params(),
        RmsProp {
            alpha: 1.0,
            ..RmsProp::preset(Flavor::PyTorch)
        },
        1e-3,
    )
    .unwrap();
    opt.params_mut().set_grad("w", &[0.1; 4]).unwrap();
    opt.step().unwrap();
}

/// Schedules whose tables are empty or short, or whose arguments divide by zero: refused when
/// attached, never a panic inside `step()`.
#[test]
fn malformed_schedules_are_refused_when_attached() {
    let bad: Vec<(&str, Box<dyn LrSchedule>)> = vec![
        (
            "keras piecewise, no values",
            Box::new(Counted::new(keras::Schedule::PiecewiseConstantDecay {
                boundaries: vec![],
                values: vec![],
            })),
        ),
        (
            "keras piecewise, values short of boundaries + 1",
            Box::new(Counted::new(keras::Schedule::PiecewiseConstantDecay {
                boundaries: vec![10.0, 20.0],
                values: vec![0.1, 0.01],
            })),
        ),
        (
            "optax piecewise cosine, empty",
            Box::new(Counted::new(optax::Schedule::PiecewiseCosine {
                boundaries: vec![],
                values: vec![],
            })),
        ),
        (
            "optax piecewise cosine, lengths differ",
            Box::new(Counted::new(optax::Schedule::PiecewiseCosine {
                boundaries: vec![0.0, 10.0],
                values: vec![0.1],
            })),
        ),
        (
            "optax join, no schedules",
            Box::new(Counted::new(optax::Schedule::Join {
                schedules: vec![],
                boundaries: vec![],
            })),
        ),
        (
            "optax join, a boundary without its schedule",
            Box::new(Counted::new(optax::Schedule::Join {
                schedules: vec![optax::Schedule::Constant(0.1)],
                boundaries: vec![5.0],
            })),
        ),
    ];
    for (what, schedule) in bad {
        let mut opt = Optimizer::new(params(), adam(), 1e-3).unwrap();
        invalid(what, opt.set_schedule(Some(schedule)));
        // Nothing attached: the optimizer steps with its own lr.
        opt.params_mut().set_grad("w", &[0.1; 4]).unwrap();
        opt.step().unwrap();
        assert_eq!(opt.report().unwrap().lr, 1e-3, "{what}");
    }
    // PyTorch's schedulers check their arguments when constructed, as PyTorch does.
    let torch_bad = [
        torch::Kind::StepLR {
            step_size: 0,
            gamma: 0.5,
        },
        torch::Kind::CosineAnnealingWarmRestarts {
            t_0: 0,
            t_mult: 1,
            eta_min: 0.0,
        },
        torch::Kind::SequentialLR {
            schedulers: vec![],
            milestones: vec![],
        },
    ];
    for kind in torch_bad {
        invalid(
            &format!("{kind:?}"),
            torch::Scheduler::new(kind.clone(), 0.1),
        );
    }
}

/// A schedule that produces an lr the step cannot use (negative, NaN) fails the step with a typed
/// error and changes nothing.
#[test]
fn a_schedule_gone_bad_fails_the_step_and_changes_nothing() {
    let mut opt = Optimizer::new(params(), Sgd::preset(Flavor::PyTorch), 1e-3).unwrap();
    // Linear from 0.1 towards -0.1: negative after the midpoint.
    let falling = optax::Schedule::linear(0.1, -0.1, 4.0, 0.0);
    opt.set_schedule(Some(Box::new(Counted::new(falling))))
        .unwrap();
    opt.params_mut().set_grad("w", &[1.0; 4]).unwrap();
    let mut last = opt.params().read_param("w").unwrap();
    for _ in 0..3 {
        opt.step().unwrap();
        last = opt.params().read_param("w").unwrap();
    }
    let err = opt.step().unwrap_err();
    assert!(
        matches!(err, Error::InvalidHyperparameter(_)),
        "expected a refused lr, got {err}"
    );
    assert_eq!(opt.params().read_param("w").unwrap(), last);
    assert_eq!(opt.step_count().unwrap(), 3);
}

#[test]
fn huge_shapes_and_groups_are_typed_errors_not_panics() {
    let mut b = ParamSet::builder();
    let e = b
        .add("w", &[usize::MAX, usize::MAX, usize::MAX], &[])
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let e = b.add("w", &[1 << 62, 4], &[]).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");

    // A group of 2^40 ranks: a typed error, not an allocation abort.
    let e = CpuCommunicator::group(1 << 40, Duration::from_secs(1)).unwrap_err();
    assert!(
        matches!(e, Error::OutOfHostMemory { .. } | Error::Communicator(_)),
        "{e}"
    );
}

#[test]
fn rendezvous_configurations_no_group_can_have_are_refused() {
    let lookup = |world: &'static str| {
        move |k: &str| {
            Some(
                match k {
                    "RANK" => "0",
                    "WORLD_SIZE" => world,
                    "MASTER_ADDR" => "127.0.0.1",
                    _ => "1",
                }
                .to_string(),
            )
        }
    };
    let t = Duration::from_millis(200);
    for world in ["0", "1099511627776"] {
        let e = RendezvousConfig::from_lookup(lookup(world), t).unwrap_err();
        assert!(matches!(e, Error::Rendezvous(_)), "WORLD_SIZE={world}: {e}");
    }
    // Built by hand, past from_lookup's checks: connect refuses it, without listening.
    for (rank, world_size) in [(0, 0), (3, 2), (0, 1 << 40)] {
        let config = RendezvousConfig {
            rank,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            timeout: t,
        };
        let e = Rendezvous::connect(&config).unwrap_err();
        assert!(
            e.to_string().contains("WORLD_SIZE") || e.to_string().contains("RANK"),
            "rank {rank} of {world_size}: {e}"
        );
    }
}

/// A dynamic loss scale grows only while it stays finite in f32 (as GradScaler does), so a model
/// that never overflows cannot push it to ∞ and every later step to a zero gradient.
#[test]
fn a_dynamic_loss_scale_never_grows_past_f32() {
    let mut opt = Optimizer::with_options(
        params(),
        Sgd::preset(Flavor::PyTorch),
        1e-3,
        OptimizerOptions {
            loss_scale: LossScale::Dynamic {
                init_scale: 1e30,
                growth_factor: 1e6,
                backoff_factor: 0.5,
                growth_interval: 1,
            },
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..4 {
        opt.step().unwrap();
        let s = opt.loss_scale().unwrap();
        assert!((s as f32).is_finite(), "the loss scale grew to {s}");
    }
    assert_eq!(opt.loss_scale().unwrap(), 1e36);
}

/// Extreme schedule and plan arguments: refused, or computed without overflow (this suite runs
/// in the debug profile too, where an overflow panics).
#[test]
fn extreme_counts_never_overflow() {
    invalid(
        "CosineAnnealingLR with T_max = i64::MAX",
        torch::Scheduler::new(
            torch::Kind::CosineAnnealingLR {
                t_max: i64::MAX,
                eta_min: 0.0,
            },
            0.1,
        ),
    );
    let mut restarts = torch::Scheduler::new(
        torch::Kind::CosineAnnealingWarmRestarts {
            t_0: 1,
            t_mult: 1 << 40,
            eta_min: 0.0,
        },
        0.1,
    )
    .unwrap();
    for _ in 0..10 {
        restarts.step();
        assert!(restarts.lr().is_finite());
    }
    let chunk = fusedopt::plan::cuda_chunk_elems(usize::MAX, usize::MAX);
    assert!(chunk.is_power_of_two());
    let mut b = ParamSet::builder();
    b.add("w", &[5], &[1.0; 5]).unwrap();
    let set = b.build(Device::Cpu).unwrap();
    let plan = fusedopt::plan::LaunchPlan::new(set.layout(), usize::MAX);
    assert_eq!(plan.num_chunks(), 1);
    let huge = fusedopt::parallel::DataParallelOptions {
        bucket_bytes: usize::MAX,
        first_bucket_bytes: usize::MAX,
        timeout: Duration::from_secs(1),
    };
    assert_eq!(
        fusedopt::parallel::buckets(set.layout(), usize::MAX, &huge).len(),
        1
    );
}

/// A dynamic loss scale backs off only while it stays usable: after hundreds of overflowing
/// steps the next finite step still gives finite parameters, and the state saves and loads.
#[test]
fn a_dynamic_loss_scale_never_backs_off_into_an_unusable_scale() {
    let options = OptimizerOptions {
        loss_scale: LossScale::Dynamic {
            init_scale: 1.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 1000,
        },
        ..Default::default()
    };
    let mut opt = Optimizer::with_options(params(), adam(), 1e-3, options).unwrap();
    opt.params_mut().set_grad("w", &[f32::INFINITY; 4]).unwrap();
    for _ in 0..300 {
        opt.step().unwrap();
    }
    let s = opt.loss_scale().unwrap();
    assert!(
        s > 0.0 && ((1.0 / s) as f32).is_finite(),
        "backed off to {s}"
    );
    opt.params_mut().set_grad("w", &[1e-30; 4]).unwrap();
    opt.step().unwrap();
    assert!(!opt.report().unwrap().skipped);
    let w = opt.params().read_param("w").unwrap();
    assert!(w.iter().all(|x| x.is_finite()), "{w:?}");
    let file = tempfile::NamedTempFile::new().unwrap();
    opt.save_checkpoint(file.path()).unwrap();
    let mut back = Optimizer::with_options(params(), adam(), 1e-3, options).unwrap();
    back.load_checkpoint(file.path()).unwrap();
    assert_eq!(back.loss_scale().unwrap(), opt.loss_scale().unwrap());
}
