//! The CPU engine against the f64 oracle, for every rule, option and flavor, on awkward sizes.

mod common;

use common::*;
use fusedopt::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const FLAVORS: [Flavor; 4] = [Flavor::PyTorch, Flavor::Keras, Flavor::Optax, Flavor::Tf1];
const DECAYS: [WeightDecay; 4] = [
    WeightDecay::None,
    WeightDecay::L2(0.05),
    WeightDecay::L1(0.01),
    WeightDecay::Decoupled(0.1),
];

fn sgd_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in FLAVORS {
        for wd in DECAYS {
            for (momentum, dampening, nesterov) in [
                (0.0, 0.0, false),
                (0.9, 0.0, false),
                (0.9, 0.3, false),
                (0.8, 0.0, true),
            ] {
                v.push((
                    Rule::Sgd(
                        Sgd {
                            momentum,
                            dampening,
                            nesterov,
                            ..Sgd::preset(f)
                        }
                        .with_weight_decay(wd)
                        .maximizing(wd == WeightDecay::L1(0.01)),
                    ),
                    0.05,
                ));
            }
        }
    }
    v
}

fn adam_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in FLAVORS {
        for wd in DECAYS {
            for ams in [AmsGrad::Off, AmsGrad::MaxRaw, AmsGrad::MaxCorrected] {
                v.push((
                    Rule::Adam(
                        Adam {
                            amsgrad: ams,
                            eps_root: if f == Flavor::Optax { 1e-8 } else { 0.0 },
                            ..Adam::preset(f)
                        }
                        .with_weight_decay(wd)
                        .maximizing(ams == AmsGrad::MaxRaw && wd == WeightDecay::None),
                    ),
                    0.01,
                ));
            }
        }
        v.push((Rule::Adam(Adam::adamw(f)), 1e-3));
    }
    v
}

fn rmsprop_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in FLAVORS {
        for centered in [false, true] {
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.5, true)] {
                for wd in [
                    WeightDecay::None,
                    WeightDecay::L2(0.05),
                    WeightDecay::Decoupled(0.1),
                ] {
                    v.push((
                        Rule::RmsProp(
                            RmsProp {
                                centered,
                                momentum,
                                nesterov,
                                bias_correction: f == Flavor::Optax && centered,
                                initial_square_avg: if f == Flavor::Optax {
                                    0.3
                                } else {
                                    RmsProp::preset(f).initial_square_avg
                                },
                                ..RmsProp::preset(f)
                            }
                            .with_weight_decay(wd)
                            .maximizing(wd == WeightDecay::L2(0.05) && !centered),
                        ),
                        0.002,
                    ));
                }
            }
        }
    }
    v
}

fn adagrad_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in FLAVORS {
        for wd in DECAYS {
            for lr_decay in [0.0, 0.1] {
                v.push((
                    Rule::Adagrad(
                        Adagrad {
                            lr_decay,
                            eps: if f == Flavor::Tf1 {
                                1e-10
                            } else {
                                Adagrad::preset(f).eps
                            },
                            ..Adagrad::preset(f)
                        }
                        .with_weight_decay(wd)
                        .maximizing(lr_decay > 0.0 && wd == WeightDecay::None),
                    ),
                    0.02,
                ));
            }
        }
    }
    v
}

/// Optax's `adam(nesterov=True)` (its `nadam`), with every decay.
fn nadam_variants() -> Vec<(Rule, f64)> {
    DECAYS
        .iter()
        .map(|&wd| {
            let rule = Adam {
                eps_root: 1e-8,
                ..Adam::nadam_optax()
            }
            .with_weight_decay(wd)
            .maximizing(wd == WeightDecay::L1(0.01));
            (rule.into(), 0.01)
        })
        .collect()
}

/// PyTorch's NAdam and Keras' Nadam (ψ = 4e-3 and 1), with every decay.
fn nadam_pytorch_keras_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in [Flavor::PyTorch, Flavor::Keras] {
        for wd in DECAYS {
            v.push((
                Rule::Nadam(
                    Nadam::preset(f)
                        .with_weight_decay(wd)
                        .maximizing(wd == WeightDecay::L2(0.05)),
                ),
                0.01,
            ));
        }
    }
    v
}

/// ADOPT (clipping on and off, Nesterov) and AdEMAMix, with every decay.
fn adopt_ademamix_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for (k, wd) in DECAYS.into_iter().enumerate() {
        v.push((
            Rule::Adopt(
                Adopt {
                    clipping: k != 1,
                    nesterov: k >= 2,
                    beta2: 0.99,
                    ..Adopt::preset(Flavor::Optax)
                }
                .with_weight_decay(wd)
                .maximizing(k == 3),
            ),
            0.01,
        ));
        v.push((
            Rule::Ademamix(
                Ademamix {
                    beta3: 0.99,
                    eps_root: 1e-8,
                    ..Ademamix::preset(Flavor::Optax)
                }
                .with_weight_decay(wd)
                .maximizing(k == 0),
            ),
            0.01,
        ));
    }
    v
}

fn adamax_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in FLAVORS {
        for wd in DECAYS {
            v.push((
                Rule::Adamax(
                    Adamax::preset(f)
                        .with_weight_decay(wd)
                        .maximizing(wd == WeightDecay::None),
                ),
                0.01,
            ));
        }
    }
    v
}

/// Lion in every flavor and decay. Its step is ±lr by the sign of `c = β1·m + (1−β1)·g`: an
/// element whose `c` is within f32 rounding of 0 could take the other sign than the f64 oracle
/// (a 2·lr difference); these seeds have none (β1 = 1, where `c` is the slowly moving `m`, had).
fn lion_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in FLAVORS {
        for wd in DECAYS {
            v.push((
                Rule::Lion(
                    Lion {
                        beta1: if wd == WeightDecay::L1(0.01) {
                            0.8
                        } else {
                            0.9
                        },
                        ..Lion::preset(f)
                    }
                    .with_weight_decay(wd)
                    .maximizing(wd == WeightDecay::L2(0.05)),
                ),
                0.003,
            ));
        }
    }
    v
}

/// RAdam in both flavors, Optax's Nesterov variant too; β2 = 0.9, 0.95 and 0.999 cross the
/// threshold at steps 6, 6 and 6 (and Optax's inclusive 4.5 at 5, 5, 5), within the nine steps.
fn radam_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in [Flavor::PyTorch, Flavor::Optax] {
        for (k, wd) in DECAYS.into_iter().enumerate() {
            for beta2 in [0.9, 0.95, 0.999] {
                v.push((
                    Rule::Radam(
                        Radam {
                            beta2,
                            eps_root: if f == Flavor::Optax { 1e-8 } else { 0.0 },
                            nesterov: f == Flavor::Optax && k % 2 == 1,
                            threshold: if f == Flavor::Optax && k >= 2 {
                                4.5
                            } else {
                                5.0
                            },
                            ..Radam::preset(f)
                        }
                        .with_weight_decay(wd)
                        .maximizing(beta2 == 0.95 && k == 0),
                    ),
                    0.01,
                ));
            }
        }
    }
    v
}

fn adadelta_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in FLAVORS {
        for wd in DECAYS {
            v.push((
                Rule::Adadelta(
                    Adadelta::preset(f)
                        .with_weight_decay(wd)
                        .maximizing(wd == WeightDecay::Decoupled(0.1)),
                ),
                0.5,
            ));
        }
    }
    v
}

/// Schedule-free SGD and AdamW in both forms and every decay (SGD's is coupled), with warmup,
/// the reference's `r` and other weight powers and β1.
fn schedule_free_variants() -> Vec<(Rule, f64)> {
    let mut v = Vec::new();
    for f in [Flavor::PyTorch, Flavor::Optax] {
        for (k, wd) in DECAYS.into_iter().enumerate() {
            for adamw in [false, true] {
                if !adamw && matches!(wd, WeightDecay::Decoupled(_)) {
                    continue;
                }
                let (d, lr) = if adamw {
                    (ScheduleFree::adamw(f), 0.01)
                } else {
                    (ScheduleFree::sgd(f), 0.05)
                };
                v.push((
                    Rule::ScheduleFree(
                        ScheduleFree {
                            warmup_steps: [0, 3, 1, 7][k],
                            r: if f == Flavor::PyTorch && k % 2 == 1 {
                                0.5
                            } else {
                                0.0
                            },
                            weight_lr_power: if k == 2 { 1.0 } else { 2.0 },
                            beta1: if k == 3 { 0.8 } else { 0.9 },
                            ..d
                        }
                        .with_weight_decay(wd)
                        .maximizing(k == 1),
                    ),
                    lr,
                ));
            }
        }
    }
    v
}

/// Runs `rule` on the engine and the oracle for 5 steps with a changing lr; optional clipping.
fn check(rule: Rule, base: f64, clip: Option<GlobalNormClip>, tensors: &[Tensor], seed: u64) {
    let options = OptimizerOptions {
        clip,
        non_finite: NonFinitePolicy::Skip,
        ..Default::default()
    };
    let mut opt = Optimizer::with_options(build(tensors), rule.clone(), base, options).unwrap();
    let mut oracle = Oracle::new(rule.clone(), clip, tensors);
    let mut rng = StdRng::seed_from_u64(seed);
    // RAdam rectifies from the sixth step at the earliest (ρ_t > 5): it runs on to the ninth.
    let steps = if matches!(rule, Rule::Radam(_)) { 9 } else { 5 };
    let lrs = [base, base, 0.4 * base, 0.4 * base]
        .into_iter()
        .chain(std::iter::repeat(0.2 * base));
    for (step, lr) in lrs.take(steps).enumerate() {
        let grads = random_grads(&mut rng, tensors, 1.0);
        for (t, g) in tensors.iter().zip(&grads) {
            opt.params_mut().set_grad(&t.name, g).unwrap();
        }
        opt.set_lr(lr).unwrap();
        opt.step().unwrap();
        let report = opt.report().unwrap();
        let norm = oracle.step(&grads, lr);
        let got = report.global_norm.unwrap();
        assert!(
            (got - norm).abs() <= 1e-9 * norm.max(1.0),
            "norm {got} vs {norm}"
        );
        for (i, t) in tensors.iter().enumerate() {
            assert_close(
                &format!("{rule:?} clip={clip:?} step {step} tensor {}", t.name),
                opt.params().param(&t.name).unwrap(),
                &oracle.params[i],
                2e-6,
                2e-5,
            );
            assert_close(
                &format!("{rule:?} clip={clip:?} step {step} eval params {}", t.name),
                &opt.eval_param(&t.name).unwrap(),
                &oracle.eval_params(i),
                2e-6,
                2e-5,
            );
        }
    }
}

/// A max norm about 2/3 of the gradients' norm (rms ≈ 0.76): clipping really scales, and the scaled
/// gradients still dominate the decay terms.
fn clip_below_norm(tensors: &[Tensor], formula: ClipFormula) -> Option<GlobalNormClip> {
    let n: usize = tensors.iter().map(|t| t.values.len()).sum();
    Some(GlobalNormClip::new(0.5 * (n as f64).sqrt(), formula))
}

fn check_all(rules: Vec<(Rule, f64)>) {
    let awkward = awkward_tensors(1);
    let many = many_tensors(2, 300);
    assert!(!rules.is_empty());
    for (i, (rule, lr)) in rules.into_iter().enumerate() {
        let formula = [ClipFormula::PyTorch, ClipFormula::Keras, ClipFormula::Optax][i % 3];
        check(rule.clone(), lr, None, &awkward, i as u64);
        check(
            rule.clone(),
            lr,
            clip_below_norm(&awkward, formula),
            &awkward,
            i as u64 + 7,
        );
        check(
            rule,
            lr,
            clip_below_norm(&many, formula),
            &many,
            i as u64 + 11,
        );
    }
}

#[test]
fn sgd_matches_oracle() {
    check_all(sgd_variants());
}

#[test]
fn adam_matches_oracle() {
    check_all(adam_variants());
}

#[test]
fn rmsprop_matches_oracle() {
    check_all(rmsprop_variants());
}

#[test]
fn adagrad_matches_oracle() {
    check_all(adagrad_variants());
}

#[test]
fn nadam_matches_oracle() {
    check_all(nadam_variants());
}

#[test]
fn nadam_pytorch_keras_matches_oracle() {
    check_all(nadam_pytorch_keras_variants());
}

#[test]
fn adopt_and_ademamix_match_oracle() {
    check_all(adopt_ademamix_variants());
}

#[test]
fn adamax_matches_oracle() {
    check_all(adamax_variants());
}

#[test]
fn lion_matches_oracle() {
    check_all(lion_variants());
}

#[test]
fn radam_matches_oracle() {
    check_all(radam_variants());
}

#[test]
fn adadelta_matches_oracle() {
    check_all(adadelta_variants());
}

#[test]
fn schedule_free_matches_oracle() {
    check_all(schedule_free_variants());
}

#[test]
fn oracle_detects_a_wrong_knob() {
    // The oracle must tell flavors apart: Keras' lr-inside momentum differs from PyTorch's once the
    // lr changes, so checking one against the other's oracle has to fail.
    let tensors = awkward_tensors(3);
    let keras = Rule::Sgd(Sgd {
        momentum: 0.9,
        ..Sgd::preset(Flavor::Keras)
    });
    let pytorch = Rule::Sgd(Sgd {
        momentum: 0.9,
        ..Sgd::preset(Flavor::PyTorch)
    });
    let mut opt = Optimizer::new(build(&tensors), keras, 0.05).unwrap();
    let mut oracle = Oracle::new(pytorch, None, &tensors);
    let mut rng = StdRng::seed_from_u64(5);
    let mut worst: f64 = 0.0;
    for lr in [0.05, 0.01, 0.01] {
        let grads = random_grads(&mut rng, &tensors, 1.0);
        for (t, g) in tensors.iter().zip(&grads) {
            opt.params_mut().set_grad(&t.name, g).unwrap();
        }
        opt.set_lr(lr).unwrap();
        opt.step().unwrap();
        oracle.step(&grads, lr);
    }
    for (i, t) in tensors.iter().enumerate() {
        for (&g, &w) in opt
            .params()
            .param(&t.name)
            .unwrap()
            .iter()
            .zip(&oracle.params[i])
        {
            worst = worst.max((g as f64 - w).abs());
        }
    }
    assert!(worst > 1e-3, "flavors indistinguishable: {worst}");
}
