//! Mixed precision on the CPU engine: bf16/f16 gradients, fp32 masters with a bf16/f16 model copy,
//! bf16 optimizer state and loss scaling, against the f64 oracle fed the same rounded inputs.

mod common;

use common::*;
use fusedopt::*;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
    }
}

/// Rules with the lr each runs at.
fn rules() -> Vec<(Rule, f64)> {
    vec![
        (Adam::adamw(Flavor::PyTorch).into(), 0.01),
        (Adam::amsgrad(Flavor::Optax).into(), 0.01),
        (
            Sgd {
                momentum: 0.9,
                nesterov: true,
                ..Sgd::preset(Flavor::Keras)
            }
            .into(),
            0.05,
        ),
        (
            RmsProp {
                centered: true,
                momentum: 0.5,
                ..RmsProp::preset(Flavor::PyTorch)
            }
            .into(),
            0.002,
        ),
        (Adagrad::preset(Flavor::Keras).into(), 0.02),
    ]
}

/// Runs 5 steps with gradients of `grad_dtype` (multiplied by `scale`), state of `state_dtype` and
/// a model copy of `model`, and checks masters against the oracle and the copy bit for bit.
fn check(
    (rule, lr): (Rule, f64),
    grad_dtype: DType,
    state_dtype: DType,
    model: Option<DType>,
    scale: f64,
) {
    let tensors = awkward_tensors(31);
    let set = build_with(Device::Cpu, &tensors, grad_dtype, model);
    let options = OptimizerOptions {
        state_dtype,
        loss_scale: if scale == 1.0 {
            LossScale::None
        } else {
            LossScale::Static(scale)
        },
        ..Default::default()
    };
    let mut opt = Optimizer::with_options(set, rule.clone(), lr, options).unwrap();
    let mut oracle = Oracle::new(rule.clone(), None, &tensors);
    if state_dtype == DType::BF16 {
        oracle.state_round = |x| bf16::from_f64(x).to_f64();
    }
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..5 {
        let grads = random_grads(&mut rng, &tensors, 1.0);
        let mut seen = Vec::new();
        for (t, g) in tensors.iter().zip(&grads) {
            let scaled: Vec<f32> = g.iter().map(|&x| x * scale as f32).collect();
            opt.params_mut().set_grad(&t.name, &scaled).unwrap();
            // What the optimizer sees: the stored (rounded) gradient, unscaled.
            seen.push(
                scaled
                    .iter()
                    .map(|&x| (round(grad_dtype, x) as f64 / scale) as f32)
                    .collect::<Vec<_>>(),
            );
        }
        opt.step().unwrap();
        let report = opt.report().unwrap();
        assert_eq!(report.loss_scale, scale);
        oracle.step(&seen, lr);
    }
    // With bf16 state, f32 (engine) and f64 (oracle) arithmetic may round a state element to
    // neighbouring bf16 values; Keras' lr-inside momentum (|m| up to ~0.2, ulp ~1e-3) adds that ulp
    // straight to the parameter. A wrong formula is off by 1e-2 or more.
    let atol = if state_dtype == DType::BF16 {
        2e-3
    } else {
        2e-6
    };
    for (i, t) in tensors.iter().enumerate() {
        let what = format!(
            "{rule:?} grads {grad_dtype} state {state_dtype} scale {scale} {}",
            t.name
        );
        let master = opt.params().param(&t.name).unwrap();
        assert_close(&what, master, &oracle.params[i], atol, 2e-5);
        match model {
            Some(DType::BF16) => {
                let copy = opt.params().model_param::<bf16>(&t.name).unwrap();
                assert!(
                    copy.iter()
                        .zip(master)
                        .all(|(c, &m)| *c == bf16::from_f32(m)),
                    "{what}: copy"
                );
            }
            Some(DType::F16) => {
                let copy = opt.params().model_param::<f16>(&t.name).unwrap();
                assert!(
                    copy.iter()
                        .zip(master)
                        .all(|(c, &m)| *c == f16::from_f32(m)),
                    "{what}: copy"
                );
            }
            _ => {}
        }
    }
}

#[test]
fn low_precision_gradients_and_model_copies() {
    for rule in rules() {
        for grad in [DType::BF16, DType::F16] {
            check(rule.clone(), grad, DType::F32, Some(grad), 1.0);
        }
        check(rule.clone(), DType::F32, DType::F32, Some(DType::BF16), 1.0);
    }
}

#[test]
fn bf16_state() {
    for rule in rules() {
        check(
            rule.clone(),
            DType::BF16,
            DType::BF16,
            Some(DType::BF16),
            1.0,
        );
        check(rule, DType::F32, DType::BF16, None, 1.0);
    }
}

#[test]
fn static_loss_scale_is_divided_out() {
    for rule in rules() {
        check(rule, DType::F16, DType::F32, Some(DType::F16), 1024.0);
    }
}

#[test]
fn dynamic_loss_scale_backs_off_and_grows() {
    let mut b = ParamSet::builder();
    b.grad_dtype(DType::F16).model_copy(DType::F16).unwrap();
    b.add("w", &[4], &[0.5, -0.5, 0.25, 1.0]).unwrap();
    let options = OptimizerOptions {
        loss_scale: LossScale::Dynamic {
            init_scale: 1024.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 3,
        },
        ..Default::default()
    };
    let mut opt = Optimizer::with_options(
        b.build(Device::Cpu).unwrap(),
        Adam::preset(Flavor::PyTorch),
        1e-3,
        options,
    )
    .unwrap();
    // 100 × 1024 overflows f16 (max 65504): the step is skipped and the scale halves.
    opt.params_mut()
        .set_grad("w", &[100.0 * 1024.0, 0.0, 0.0, 0.0])
        .unwrap();
    let before = opt.params().param("w").unwrap().to_vec();
    opt.step().unwrap();
    let r = opt.report().unwrap();
    assert!(r.skipped && r.loss_scale == 1024.0);
    assert_eq!(opt.params().param("w").unwrap(), &before[..]);
    assert_eq!(
        (opt.loss_scale().unwrap(), opt.step_count().unwrap()),
        (512.0, 0)
    );
    // Three good steps grow it back.
    for _ in 0..3 {
        opt.params_mut().set_grad("w", &[0.1 * 512.0; 4]).unwrap();
        opt.step().unwrap();
        assert!(!opt.report().unwrap().skipped);
    }
    assert_eq!(
        (opt.loss_scale().unwrap(), opt.step_count().unwrap()),
        (1024.0, 3)
    );
    // The unscaled gradient was 0.1 everywhere: Adam moved every weight by about 3·lr.
    for (w, w0) in opt.params().param("w").unwrap().iter().zip(&before) {
        assert!((w0 - w - 3e-3).abs() < 1e-5, "{w0} -> {w}");
    }
}

#[test]
fn dtype_misuse_is_a_typed_error() {
    let mut b = ParamSet::builder();
    b.grad_dtype(DType::BF16).model_copy(DType::BF16).unwrap();
    b.add("w", &[2], &[1.0, 2.0]).unwrap();
    let mut set = b.build(Device::Cpu).unwrap();
    assert!(matches!(
        set.grad_mut::<f32>("w"),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(matches!(
        set.model_param::<f16>("w"),
        Err(Error::DTypeMismatch { .. })
    ));
    assert_eq!(set.grad_mut::<bf16>("w").unwrap().len(), 2);
    assert!(ParamSet::builder().model_copy(DType::F32).is_err());
    let f16_state = OptimizerOptions {
        state_dtype: DType::F16,
        ..Default::default()
    };
    assert!(Optimizer::with_options(
        set.try_clone().unwrap(),
        Adam::preset(Flavor::Keras),
        1e-3,
        f16_state
    )
    .is_err());
    let dynamic_propagate = OptimizerOptions {
        loss_scale: LossScale::dynamic(),
        non_finite: NonFinitePolicy::Propagate,
        ..Default::default()
    };
    assert!(
        Optimizer::with_options(set, Adam::preset(Flavor::Keras), 1e-3, dynamic_propagate).is_err()
    );
}
