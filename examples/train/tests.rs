//! The example's tests (`cargo test` runs them): 1 vs N replicas, resume, accuracy, every loss
//! and the CNN, refused batches, sharded state, and the finite-difference gradient check.

use clap::Parser;

use crate::cli::{default_lr, Args};
use crate::model::{self, Arch, Loss, Model};
use crate::run::{load, train, Splits};

fn args(extra: &[&str]) -> Args {
    Args::parse_from(["train", "--quiet"].iter().chain(extra))
}

fn digits() -> Splits {
    load(&args(&[])).unwrap()
}

#[test]
fn one_replica_and_n_replicas_agree_after_an_epoch() {
    let splits = digits();
    let one = train(
        &args(&["--epochs", "1", "--replicas", "1"]),
        &splits,
        3e-3,
        0,
        false,
    )
    .unwrap();
    for n in ["2", "4"] {
        let many = train(
            &args(&["--epochs", "1", "--replicas", n]),
            &splits,
            3e-3,
            0,
            false,
        )
        .unwrap();
        assert!(many.replicas_identical, "{n} replicas drifted apart");
        let worst = one
            .params
            .iter()
            .zip(&many.params)
            .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{n} replicas vs one after an epoch: relative difference {worst}"
        );
    }
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    let splits = digits();
    let straight = train(&args(&["--epochs", "4"]), &splits, 3e-3, 0, false).unwrap();
    // Replicated state from one file; sharded state from one file per replica.
    for extra in [&[][..], &["--shard-state"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().to_str().unwrap();
        let with = |more: &[&str]| {
            let all: Vec<&str> = more.iter().chain(extra).copied().collect();
            train(&args(&all), &splits, 3e-3, 0, false).unwrap()
        };
        with(&["--epochs", "4", "--stop-after", "2", "--checkpoint", ck]);
        let resumed = with(&["--epochs", "4", "--checkpoint", ck, "--resume"]);
        assert_eq!(resumed.history.epochs_done, 4);
        assert_eq!(
            resumed.params, straight.params,
            "resume {extra:?} changed the trajectory"
        );
    }
}

#[test]
fn sharded_state_trains_bit_for_bit_as_replicated_state() {
    let splits = digits();
    for n in ["2", "4"] {
        let run = |extra: &[&str]| {
            let all: Vec<&str> = ["--epochs", "2", "--replicas", n]
                .iter()
                .chain(extra)
                .copied()
                .collect();
            train(&args(&all), &splits, 3e-3, 0, false).unwrap()
        };
        let (plain, sharded) = (run(&[]), run(&["--shard-state"]));
        assert!(sharded.replicas_identical);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&plain.params) == bits(&sharded.params),
            "{n} replicas: sharded state changed the trajectory"
        );
    }
}

#[test]
fn one_asynchronous_worker_trains_bit_for_bit_as_one_synchronous_replica() {
    let splits = digits();
    let a = args(&["--epochs", "3", "--replicas", "1"]);
    let sync = train(&a, &splits, 3e-3, 0, false).unwrap();
    let r = crate::asynchronous::train_async(&a, &splits, 3e-3, 0, false).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&sync.params) == bits(&r.run.params));
    assert_eq!(r.stats.max_staleness, 0);
}

#[test]
fn asynchronous_workers_learn_and_every_push_is_counted() {
    let splits = digits();
    let a = args(&["--epochs", "5", "--replicas", "4", "--max-staleness", "2"]);
    let r = crate::asynchronous::train_async(&a, &splits, 3e-3, 0, false).unwrap();
    let pushes = (splits.train.len() / 16 * 5) as u64;
    assert_eq!(r.stats.pushes, pushes);
    assert_eq!(r.stats.applied + r.stats.refused + r.stats.skipped, pushes);
    assert!(r.run.test.accuracy > 0.9, "{}", r.run.test);
}

#[test]
fn the_default_adam_run_reaches_97_percent() {
    let a = args(&[]);
    let run = train(&a, &digits(), default_lr(a.rule), a.seed, false).unwrap();
    assert!(
        run.test.accuracy >= 0.97,
        "test accuracy {}",
        run.test.accuracy
    );
}

#[test]
fn every_loss_and_the_cnn_learn() {
    let splits = digits();
    for extra in [["--loss", "hinge"], ["--loss", "mse"], ["--model", "cnn"]] {
        let mut e = vec!["--epochs", "12"];
        e.extend(extra);
        let run = train(&args(&e), &splits, 3e-3, 0, false).unwrap();
        assert!(
            run.test.accuracy > 0.85,
            "{extra:?}: test accuracy {}",
            run.test.accuracy
        );
    }
}

/// Parameters held in a map, for the gradient check.
struct Map(std::collections::BTreeMap<String, Vec<f32>>);

impl model::Params for Map {
    fn param(&self, name: &str) -> fusedopt::Result<std::borrow::Cow<'_, [f32]>> {
        self.0
            .get(name)
            .map(|v| std::borrow::Cow::Borrowed(v.as_slice()))
            .ok_or_else(|| fusedopt::Error::UnknownTensor(name.into()))
    }
}

/// Backward against central differences of the loss, for both models and every loss.
#[test]
fn backward_matches_finite_differences() {
    let splits = digits();
    let batch = splits.train.rows(&[3, 141, 592, 653, 589]);
    for arch in [
        Arch::Mlp { hidden: vec![7, 5] },
        Arch::Cnn {
            channels: 3,
            hidden: vec![6],
        },
    ] {
        let m = Model {
            arch: arch.clone(),
            side: 8,
        };
        let mut p = Map(m.init(11).into_iter().map(|(s, v)| (s.name, v)).collect());
        // Non-zero biases, so that every path is exercised.
        for (i, v) in p.0.values_mut().flatten().enumerate() {
            *v += 0.05 * ((i % 7) as f32 - 3.0);
        }
        for loss in [Loss::CrossEntropy, Loss::Hinge, Loss::Mse] {
            let (mut checked, mut kinks) = (0, 0);
            let fwd = m.forward(&p, &batch.x).unwrap();
            let (_, d) = loss.eval(&fwd.logits, &batch.y);
            let mut grads = std::collections::HashMap::new();
            m.backward(&p, &fwd, d, &mut |n, g| {
                grads.insert(n.to_string(), g.to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(
                grads.len(),
                m.specs().len(),
                "{arch:?}: a tensor got no gradient"
            );
            for spec in m.specs() {
                for k in (0..p.0[&spec.name].len()).step_by(5) {
                    let h = 1e-3f32;
                    let mut at = |delta: f32| {
                        p.0.get_mut(&spec.name).unwrap()[k] += delta;
                        let l = loss
                            .eval(&m.forward(&p, &batch.x).unwrap().logits, &batch.y)
                            .0;
                        p.0.get_mut(&spec.name).unwrap()[k] -= delta;
                        f64::from(l)
                    };
                    let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
                    // A ReLU or max-pool kink inside the step makes the difference quotient
                    // depend on the step: such elements are not differentiable there; skip.
                    let finer = (at(h / 4.0) - at(-h / 4.0)) / (0.5 * f64::from(h));
                    checked += 1;
                    if (numeric - finer).abs() > 1e-3 + 1e-2 * numeric.abs() {
                        kinks += 1;
                        continue;
                    }
                    let analytic = f64::from(grads[&spec.name][k]);
                    assert!(
                        (numeric - analytic).abs() <= 2e-3 + 5e-2 * numeric.abs(),
                        "{arch:?} {loss:?} {}[{k}]: backward {analytic}, finite difference {numeric}",
                        spec.name
                    );
                }
            }
            assert!(
                kinks * 10 < checked,
                "{arch:?} {loss:?}: {kinks} of {checked} at kinks"
            );
        }
    }
}

#[test]
fn uneven_batches_are_refused() {
    let e = train(&args(&["--batch", "63"]), &digits(), 3e-3, 0, false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("split evenly"), "{e}");
}
