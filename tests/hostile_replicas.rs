//! Misbehaving replicas and communicator misuse: whatever one replica does, no replica ends a step
//! `Ok` with parameters that differ from another's, a failed step changes nothing anywhere, a
//! benign failure leaves the group usable, and every wait is bounded.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use fusedopt::comm::cpu::CpuCommunicator;
use fusedopt::comm::{Communicator, HostBuffer, ReduceOp};
use fusedopt::parallel::{DataParallel, DataParallelOptions, Gradients};
use fusedopt::schedule::{optax, Counted};
use fusedopt::*;

const N: usize = 40;

fn params() -> ParamSet {
    let mut b = ParamSet::builder();
    b.group("no_decay", GroupOptions::no_decay()).unwrap();
    b.add("w", &[N], &[0.25; N]).unwrap();
    b.add("empty", &[0], &[]).unwrap();
    b.add("v", &[N / 2], &[-0.5; N / 2]).unwrap();
    b.add_to("no_decay", "b", &[3], &[0.0; 3]).unwrap();
    b.build(Device::Cpu).unwrap()
}

/// The replicas' lr.
const LR: f64 = 0.01;

fn adam() -> Adam {
    Adam::adamw(Flavor::PyTorch)
}

fn optimizer() -> Optimizer {
    Optimizer::new(params(), adam(), LR).unwrap()
}

fn options(timeout_ms: u64) -> DataParallelOptions {
    DataParallelOptions {
        bucket_bytes: 64,
        first_bucket_bytes: 16,
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn group(n: usize) -> DataParallel<CpuCommunicator> {
    DataParallel::cpu((0..n).map(|_| optimizer()).collect(), options(5000)).unwrap()
}

fn grad(name: &str, len: usize, rank: usize, step: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i + 3 * rank + 7 * step + name.len()) as f32).sin())
        .collect()
}

/// A well-behaved backward pass: every tensor written and marked once, last first.
fn honest(step: usize) -> impl Fn(usize, &Gradients<'_>) -> Result<()> + Sync {
    move |rank, g| {
        for (name, len) in [("b", 3), ("v", N / 2), ("empty", 0), ("w", N)] {
            g.set(name, &grad(name, len, rank, step))?;
            g.mark_ready(name)?;
        }
        Ok(())
    }
}

fn snapshot(dp: &DataParallel<CpuCommunicator>) -> Vec<(u64, Vec<u32>)> {
    dp.replicas()
        .map(|o| {
            let mut bits = Vec::new();
            for t in ["w", "v", "b"] {
                bits.extend(
                    o.params()
                        .read_param(t)
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits()),
                );
                for s in o.state_names() {
                    bits.extend(o.state(s, t).unwrap().iter().map(|x| x.to_bits()));
                }
            }
            (o.step_count().unwrap(), bits)
        })
        .collect()
}

fn assert_identical(dp: &DataParallel<CpuCommunicator>, what: &str) {
    let s = snapshot(dp);
    for (r, x) in s.iter().enumerate() {
        assert_eq!(x, &s[0], "{what}: replica {r} differs from replica 0");
    }
}

/// A step that must fail everywhere and change nothing, after which the group still trains.
fn fails_cleanly(
    dp: &mut DataParallel<CpuCommunicator>,
    what: &str,
    backward: impl Fn(usize, &Gradients<'_>) -> Result<()> + Sync,
) -> Error {
    let before = snapshot(dp);
    let err = dp.step(backward).expect_err(what);
    assert_eq!(snapshot(dp), before, "{what}: a replica changed");
    dp.step(honest(99))
        .unwrap_or_else(|e| panic!("{what}: the group did not recover: {e}"));
    assert_identical(dp, what);
    assert_eq!(snapshot(dp)[0].0, before[0].0 + 1, "{what}");
    err
}

#[test]
fn marking_a_tensor_ready_twice_or_writing_after_marking_fails_the_step_everywhere() {
    let mut dp = group(3);
    dp.step(honest(0)).unwrap();
    let err = fails_cleanly(&mut dp, "marked three times", |rank, g| {
        if rank == 1 {
            g.set("b", &grad("b", 3, rank, 1))?;
            for _ in 0..3 {
                g.mark_ready("b")?;
            }
        }
        honest(1)(rank, g)
    });
    assert!(err.to_string().contains("'b'"), "{err}");
    fails_cleanly(&mut dp, "written after marking", |rank, g| {
        honest(2)(rank, g)?;
        if rank == 2 {
            g.set("w", &[9.0; N])?;
        }
        Ok(())
    });
}

#[test]
fn a_benign_failure_on_one_replica_fails_the_step_everywhere_and_the_group_recovers() {
    let mut dp = group(3);
    dp.step(honest(0)).unwrap();
    let err = fails_cleanly(&mut dp, "an error in backward", |rank, g| {
        if rank == 2 {
            return Err(Error::InvalidHyperparameter("my data loader broke".into()));
        }
        honest(1)(rank, g)
    });
    assert!(err.to_string().contains("data loader"), "{err}");
    fails_cleanly(&mut dp, "a panic in backward", |rank, g| {
        if rank == 0 {
            panic!("replica 0 crashed");
        }
        honest(2)(rank, g)
    });
}

#[test]
fn non_finite_policy_error_fails_every_replica_alike_and_the_group_recovers() {
    let opts = (0..2)
        .map(|_| {
            Optimizer::with_options(
                params(),
                adam(),
                1e-3,
                OptimizerOptions {
                    non_finite: NonFinitePolicy::Error,
                    ..Default::default()
                },
            )
            .unwrap()
        })
        .collect();
    let mut dp = DataParallel::cpu(opts, options(5000)).unwrap();
    dp.step(honest(0)).unwrap();
    let err = fails_cleanly(&mut dp, "a NaN gradient on one replica", |rank, g| {
        for (name, len) in [("b", 3), ("v", N / 2), ("empty", 0), ("w", N)] {
            let mut v = grad(name, len, rank, 1);
            if rank == 1 && name == "w" {
                v[5] = f32::NAN;
            }
            g.set(name, &v)?;
            g.mark_ready(name)?;
        }
        Ok(())
    });
    assert!(matches!(err, Error::NonFiniteGradient { .. }), "{err}");
}

/// A step that cannot be applied on one replica (its schedule produces a negative lr) is applied
/// on none: replicas never end a step at different step counts.
#[test]
fn a_step_that_one_replica_cannot_take_is_taken_by_none() {
    let mut opts: Vec<Optimizer> = (0..3).map(|_| optimizer()).collect();
    for o in &mut opts {
        o.set_schedule(Some(Box::new(Counted::new(optax::Schedule::linear(
            0.01, -0.01, 4.0, 0.0,
        )))))
        .unwrap();
    }
    let mut dp = DataParallel::cpu(opts, options(5000)).unwrap();
    let mut stepped = 0;
    for s in 0..4 {
        match dp.step(honest(s)) {
            Ok(()) => stepped += 1,
            Err(e) => {
                assert!(matches!(e, Error::InvalidHyperparameter(_)), "{e}");
                break;
            }
        }
    }
    assert_eq!(stepped, 3);
    assert_identical(&dp, "after a refused lr");
    assert!(snapshot(&dp).iter().all(|(step, _)| *step == 3));
}

#[test]
fn replicas_that_would_diverge_are_refused_at_setup_and_the_reason_is_named() {
    let base = || optimizer();
    let with_rule = |rule: Rule| Optimizer::new(params(), rule, LR).unwrap();
    let with_options =
        |o: OptimizerOptions| Optimizer::with_options(params(), adam(), LR, o).unwrap();
    let stepped = || {
        let mut o = base();
        o.params_mut().set_grad("w", &[0.1; N]).unwrap();
        o.step().unwrap();
        o
    };
    let cases: Vec<(&str, Optimizer)> = vec![
        ("lr", {
            let mut o = base();
            o.set_lr(0.02).unwrap();
            o
        }),
        (
            "rule",
            with_rule(
                Adam {
                    beta1: 0.8,
                    ..adam()
                }
                .into(),
            ),
        ),
        ("rule", with_rule(Adam::adamw(Flavor::Keras).into())),
        (
            "rule",
            with_rule(adam().with_weight_decay(WeightDecay::Decoupled(0.1)).into()),
        ),
        (
            "options",
            with_options(OptimizerOptions {
                clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
                ..Default::default()
            }),
        ),
        (
            "options",
            with_options(OptimizerOptions {
                state_dtype: DType::BF16,
                ..Default::default()
            }),
        ),
        (
            "options",
            with_options(OptimizerOptions {
                loss_scale: LossScale::Static(128.0),
                ..Default::default()
            }),
        ),
        ("step", stepped()),
    ];
    for (what, odd) in cases {
        let err = DataParallel::cpu(vec![base(), odd], options(5000)).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    // Same step count, different moments.
    let stepped_with = |g: f32| {
        let mut o = base();
        o.params_mut().set_grad("w", &[g; N]).unwrap();
        o.step().unwrap();
        o
    };
    let err =
        DataParallel::cpu(vec![stepped_with(0.1), stepped_with(0.7)], options(5000)).unwrap_err();
    assert!(err.to_string().contains("state"), "{err}");
    // Different starting parameters are fine: rank 0's are broadcast.
    let mut other = base();
    other.params_mut().param_mut("w").unwrap()[0] = 9.0;
    let dp = DataParallel::cpu(vec![base(), other], options(5000)).unwrap();
    assert_identical(&dp, "after the broadcast");
}

/// A zero-size tensor just before another must not move the real tensor into a wrong bucket.
#[test]
fn zero_size_tensors_do_not_shift_buckets() {
    let mut dp = group(2);
    assert!(dp.buckets().len() >= 3, "{:?}", dp.buckets());
    for b in dp.buckets() {
        let layout = dp.replicas().next().unwrap().params().layout().clone();
        for &t in &b.tensors {
            let r = layout.tensors()[t].range();
            assert!(
                b.range.start <= r.start && r.end <= b.range.end,
                "tensor {} ({r:?}) outside its bucket {:?}",
                layout.tensors()[t].name,
                b.range
            );
        }
    }
    for s in 0..3 {
        dp.step(honest(s)).unwrap();
    }
    assert_identical(&dp, "with an empty tensor");
}

/// Each replica driven from a thread of its own: one that never returns from its backward pass
/// makes every other replica's step fail within the timeout, and nobody steps.
#[test]
fn a_replica_that_never_returns_fails_the_others_within_the_timeout() {
    let timeout = Duration::from_millis(400);
    let opts = (0..3).map(|_| optimizer()).collect();
    let dp = DataParallel::cpu(opts, options(400)).unwrap();
    let (release, stalled) = mpsc::channel::<()>();
    let stalled = std::sync::Mutex::new(stalled);
    let start = Instant::now();
    let results: Vec<(usize, Result<()>, Duration, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = dp
            .into_replicas()
            .into_iter()
            .map(|mut replica| {
                let stalled = &stalled;
                s.spawn(move || {
                    let rank = replica.rank();
                    let r = replica.step(|g| {
                        if rank == 1 {
                            // Blocks until the test has seen the others fail.
                            let _ = stalled.lock().unwrap().recv();
                        }
                        honest(0)(rank, g)
                    });
                    let steps = replica.optimizer().step_count().unwrap();
                    (rank, r, start.elapsed(), steps)
                })
            })
            .collect();
        let mut done = Vec::new();
        for h in handles {
            if done.len() == 1 {
                // Ranks 0 and 2 are done (joined in rank order, rank 1 is next): release it.
                let _ = release.send(());
            }
            done.push(h.join().unwrap());
        }
        done
    });
    for (rank, r, at, steps) in &results {
        assert!(r.is_err(), "rank {rank} stepped Ok");
        assert_eq!(*steps, 0, "rank {rank} applied the step");
        if *rank != 1 {
            // A hang guard, not a performance claim.
            assert!(*at < timeout * 10, "rank {rank} waited {at:?}");
        }
    }
}

/// The all-in-one `step` waits for every backward pass (they borrow the caller's data), but a slow
/// replica still fails the step everywhere rather than letting anyone step.
#[test]
fn a_replica_slower_than_the_timeout_fails_the_step_everywhere() {
    let opts = (0..2).map(|_| optimizer()).collect();
    let mut dp = DataParallel::cpu(opts, options(300)).unwrap();
    let err = dp
        .step(|rank, g| {
            if rank == 0 {
                std::thread::sleep(Duration::from_millis(1200));
            }
            honest(0)(rank, g)
        })
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(snapshot(&dp).iter().all(|(step, _)| *step == 0));
}

/// Collectives misused on one rank end in an error on every rank, and the group is aborted: the
/// ranks' next collectives can never pair up wrongly and return wrong data.
#[test]
fn communicator_misuse_on_one_rank_aborts_the_group_on_every_rank() {
    type Misuse = fn(usize, &CpuCommunicator) -> Result<()>;
    let misuses: Vec<(&str, Misuse)> = vec![
        ("all_gather with a short recv on rank 1", |r, c| {
            let mut send = [1.0f32; 2];
            let mut recv = vec![0.0f32; if r == 1 { 3 } else { 4 }];
            c.all_gather(
                HostBuffer::F32(&mut send).into(),
                HostBuffer::F32(&mut recv).into(),
            )
        }),
        ("broadcast from a root out of range on rank 0", |r, c| {
            let mut buf = [1.0f32; 2];
            c.broadcast(HostBuffer::F32(&mut buf).into(), if r == 0 { 9 } else { 0 })
        }),
        ("different collectives on different ranks", |r, c| {
            let mut buf = [1.0f32; 2];
            if r == 0 {
                c.all_reduce(HostBuffer::F32(&mut buf).into(), ReduceOp::Sum)
            } else {
                c.broadcast(HostBuffer::F32(&mut buf).into(), 0)
            }
        }),
    ];
    for (what, misuse) in misuses {
        let comms = CpuCommunicator::group(2, Duration::from_secs(5)).unwrap();
        let start = Instant::now();
        let results: Vec<(Result<()>, Result<()>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn(move || {
                        let first = misuse(r, c);
                        // An honest collective afterwards must not succeed with wrong data.
                        let mut buf = [r as f32 + 1.0; 2];
                        let second = c.all_reduce(HostBuffer::F32(&mut buf).into(), ReduceOp::Sum);
                        (first, second)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (first, second)) in results.iter().enumerate() {
            assert!(first.is_err(), "{what}: rank {r}'s misuse succeeded");
            assert!(
                second.is_err(),
                "{what}: rank {r} kept going after the misuse"
            );
        }
        // Well before the 5 s timeout: the ranks learn of the misuse, they do not wait it out.
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{what}: {:?}",
            start.elapsed()
        );
    }
}

/// A replica changed behind the group's back (its lr set through `replicas_mut`) is caught by
/// the comparison after the step: every replica gets `ReplicasDiverged`, never `Ok`, and the
/// group is aborted.
#[test]
fn a_replica_changed_behind_the_groups_back_is_reported_as_diverged() {
    let mut dp = group(3);
    dp.step(honest(0)).unwrap();
    dp.replicas_mut().nth(1).unwrap().set_lr(0.5).unwrap();
    let err = dp.step(honest(1)).unwrap_err();
    assert!(matches!(err, Error::ReplicasDiverged(_)), "{err}");
    assert!(
        dp.step(honest(2)).is_err(),
        "the group stepped on after diverging"
    );
}

/// "Wait forever" is a timeout too: `Duration::MAX` must not overflow a deadline.
#[test]
fn a_timeout_of_duration_max_waits_rather_than_panics() {
    let comms = CpuCommunicator::group(2, Duration::MAX).unwrap();
    let sums: Vec<f32> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                s.spawn(move || {
                    if r == 1 {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let mut buf = [r as f32 + 1.0];
                    c.all_reduce(HostBuffer::F32(&mut buf).into(), ReduceOp::Sum)
                        .unwrap();
                    buf[0]
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sums, vec![3.0, 3.0]);
    let opts = (0..2).map(|_| optimizer()).collect();
    let mut dp = DataParallel::cpu(
        opts,
        DataParallelOptions {
            timeout: Duration::MAX,
            ..DataParallelOptions::default()
        },
    )
    .unwrap();
    dp.step(honest(0)).unwrap();
}
