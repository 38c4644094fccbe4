//! The step decision is written twice, once for each engine (src/step/decide.rs and decide.cuh):
//! random states, options and sums of squares — finite, huge, zero, NaN, ±∞ — go to both, and
//! every field of every resulting state must have the same bits. The device half runs on a GPU or
//! on the emulated one.

mod common;

use fusedopt::testing::{decide_on_device, decide_on_host, Case, StepParams, StepState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A value from a mix of ordinary, extreme and non-finite magnitudes.
fn awkward(rng: &mut StdRng) -> f64 {
    match rng.gen_range(0..10) {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => 0.0,
        3 => f64::MAX,
        4 => f64::MIN_POSITIVE,
        _ => 10f64.powf(rng.gen_range(-8.0..8.0)),
    }
}

fn cases(n: usize, seed: u64) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let loss_scale = match rng.gen_range(0..4) {
                0 => 1.0,
                1 => 65536.0,
                2 => 2f64.powi(rng.gen_range(-140..130)),
                _ => 10f64.powf(rng.gen_range(-3.0..3.0)),
            };
            let interval = rng.gen_range(1..5u64);
            let st = StepState {
                step: rng.gen_range(0..1u64 << 40),
                loss_scale,
                good_steps: rng.gen_range(0..interval),
                norm: awkward(&mut rng),
                grad_scale: awkward(&mut rng),
                clip_factor: awkward(&mut rng),
                step_loss_scale: awkward(&mut rng),
                skip: rng.gen_range(0..2),
                done: 0,
                have_norm: rng.gen_range(0..2),
                pad: 0,
            };
            let q = StepParams {
                max_norm: 10f64.powf(rng.gen_range(-3.0..3.0)),
                growth_factor: [1.0, 2.0, 1e30][rng.gen_range(0..3)],
                backoff_factor: [0.5, 0.25, 1e-30][rng.gen_range(0..3)],
                growth_interval: interval,
                clip: rng.gen_range(0..4),
                policy: rng.gen_range(0..3),
                dynamic_scale: rng.gen_range(0..2),
                pad: 0,
            };
            let sum_sq = match rng.gen_range(0..8) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => 0.0,
                _ => 10f64.powf(rng.gen_range(-20.0..20.0)),
            };
            (st, q, sum_sq, rng.gen_bool(0.8))
        })
        .collect()
}

fn bits(st: &StepState) -> Vec<u64> {
    vec![
        st.step,
        st.loss_scale.to_bits(),
        st.good_steps,
        st.norm.to_bits(),
        st.grad_scale.to_bits(),
        st.clip_factor.to_bits(),
        st.step_loss_scale.to_bits(),
        st.skip as u64,
        st.have_norm as u64,
    ]
}

#[test]
fn the_host_decision_follows_its_rules() {
    // Oracle-style checks of the host twin on its own (the device must then agree bit for bit).
    for (before, q, sum_sq, have) in cases(2000, 1) {
        let after = decide_on_host(&[(before, q, sum_sq, have)])[0];
        let n = if have {
            sum_sq.sqrt() / before.loss_scale
        } else {
            0.0
        };
        let finite = !have || n.is_finite();
        let refuses = !finite && (q.dynamic_scale != 0 || q.policy != 1);
        assert_eq!(after.skip != 0, refuses, "{before:?} {q:?} {sum_sq}");
        assert_eq!(after.step, before.step + u64::from(!refuses));
        assert_eq!(after.step_loss_scale.to_bits(), before.loss_scale.to_bits());
        if refuses {
            assert_eq!(after.clip_factor, 1.0);
            if q.dynamic_scale != 0 {
                assert_eq!(after.good_steps, 0);
                assert!(after.loss_scale <= before.loss_scale);
            }
        } else if q.clip == 0 || !have {
            assert_eq!(after.clip_factor, 1.0);
        }
        // A scale that moved stays one the step can divide by.
        if after.loss_scale != before.loss_scale {
            let s = after.loss_scale;
            assert!(s > 0.0 && ((1.0 / s) as f32).is_finite() && (s as f32).is_finite());
        }
    }
}

#[test]
fn host_and_device_decide_every_case_alike() {
    if !common::gpu_or_skip("host_and_device_decide_every_case_alike") {
        return;
    }
    let cases = cases(5000, 2);
    let host = decide_on_host(&cases);
    let device = decide_on_device(0, &cases).unwrap();
    assert_eq!(host.len(), device.len());
    for (i, (h, d)) in host.iter().zip(&device).enumerate() {
        assert_eq!(
            bits(h),
            bits(d),
            "case {i}: {:?}\nhost   {h:?}\ndevice {d:?}",
            cases[i]
        );
    }
}
