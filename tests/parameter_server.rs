//! Asynchronous SGD with a parameter server: one worker steps as the optimizer alone (and as the
//! f64 oracle); scripted interleavings of two workers give the staleness each policy expects
//! and apply, scale or refuse exactly; many worker threads pushing at once leave the server
//! exactly where replaying the applied pushes in version order leads; bad pushes change nothing.
//! Sharded servers (one window each): one worker steps bit for bit as one server, with state per
//! server the whole's ÷ N; concurrent workers leave each window where replaying that server's
//! applied pushes leads.

mod common;

use std::sync::Mutex;

use common::{awkward_tensors, build, random_grads, Oracle, Tensor};
use fusedopt::parallel::parameter_server::{Pushed, ShardedParameterServer, Worker};
use fusedopt::parallel::{ParameterServer, Staleness};
use fusedopt::{
    Adam, Error, Flavor, GlobalNormClip, NonFinitePolicy, Optimizer, OptimizerOptions, ParamSet,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

const LR: f64 = 1e-2;

fn clip() -> Option<GlobalNormClip> {
    Some(GlobalNormClip::new(5.0, Flavor::PyTorch))
}

fn optimizer(tensors: &[Tensor], non_finite: NonFinitePolicy) -> Optimizer {
    let options = OptimizerOptions {
        clip: clip(),
        non_finite,
        ..Default::default()
    };
    Optimizer::with_options(build(tensors), Adam::adamw(Flavor::PyTorch), LR, options).unwrap()
}

fn server(tensors: &[Tensor], staleness: Staleness) -> ParameterServer {
    ParameterServer::new(optimizer(tensors, NonFinitePolicy::Skip), staleness).unwrap()
}

fn bits(set: &ParamSet, tensors: &[Tensor]) -> Vec<Vec<u32>> {
    tensors
        .iter()
        .map(|t| {
            let v = set.read_param(&t.name).unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        })
        .collect()
}

fn server_bits(s: &ParameterServer, tensors: &[Tensor]) -> Vec<Vec<u32>> {
    s.with_optimizer(|o| Ok(bits(o.params(), tensors))).unwrap()
}

fn write(w: &mut Worker<'_>, tensors: &[Tensor], grads: &[Vec<f32>]) {
    for (t, g) in tensors.iter().zip(grads) {
        w.params_mut().set_grad(&t.name, g).unwrap();
    }
}

/// A plain optimizer stepped with `pushes` (gradients, each × its factor in f32).
fn replay(tensors: &[Tensor], pushes: &[(Vec<Vec<f32>>, f32)]) -> Vec<Vec<u32>> {
    let mut o = optimizer(tensors, NonFinitePolicy::Skip);
    for (grads, factor) in pushes {
        for (t, g) in tensors.iter().zip(grads) {
            let scaled: Vec<f32> = g.iter().map(|x| x * factor).collect();
            o.params_mut().set_grad(&t.name, &scaled).unwrap();
        }
        o.step().unwrap();
    }
    bits(o.params(), tensors)
}

#[test]
fn one_worker_steps_as_the_optimizer_alone_and_the_oracle() {
    let tensors = awkward_tensors(7);
    let s = server(&tensors, Staleness::Bounded { max: 0 });
    let mut w = s.worker().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let mut oracle = Oracle::new(Adam::adamw(Flavor::PyTorch).into(), clip(), &tensors);
    let mut pushes = Vec::new();
    for step in 0..6u64 {
        assert_eq!(w.pull().unwrap(), step);
        // The pulled weights are the server's.
        assert_eq!(bits(w.params(), &tensors), server_bits(&s, &tensors));
        let grads = random_grads(&mut rng, &tensors, 2.0);
        write(&mut w, &tensors, &grads);
        assert_eq!(
            w.push().unwrap(),
            Pushed::Applied {
                version: step + 1,
                staleness: 0,
                factor: 1.0
            }
        );
        oracle.step(&grads, LR);
        pushes.push((grads, 1.0));
    }
    assert_eq!(server_bits(&s, &tensors), replay(&tensors, &pushes));
    s.with_optimizer(|o| {
        for (i, t) in tensors.iter().enumerate() {
            common::assert_close(
                &t.name,
                &o.params().read_param(&t.name)?,
                &oracle.params[i],
                1e-6,
                1e-5,
            );
        }
        Ok(())
    })
    .unwrap();
}

/// Two workers pull version 0; the first pushes (applied), then the second pushes a gradient one
/// version old.
fn two_workers(staleness: Staleness) -> (ParameterServer, Vec<Tensor>, [Vec<Vec<f32>>; 2], Pushed) {
    let tensors = awkward_tensors(8);
    let s = server(&tensors, staleness);
    let mut rng = StdRng::seed_from_u64(2);
    let g = [
        random_grads(&mut rng, &tensors, 1.0),
        random_grads(&mut rng, &tensors, 1.0),
    ];
    let second = {
        let (mut a, mut b) = (s.worker().unwrap(), s.worker().unwrap());
        a.pull().unwrap();
        b.pull().unwrap();
        write(&mut a, &tensors, &g[0]);
        write(&mut b, &tensors, &g[1]);
        assert!(matches!(
            a.push().unwrap(),
            Pushed::Applied {
                version: 1,
                staleness: 0,
                ..
            }
        ));
        b.push().unwrap()
    };
    (s, tensors, g, second)
}

#[test]
fn staleness_policies_apply_scale_or_refuse_exactly() {
    let (s, tensors, g, second) = two_workers(Staleness::Unbounded);
    assert_eq!(
        second,
        Pushed::Applied {
            version: 2,
            staleness: 1,
            factor: 1.0
        }
    );
    let want = replay(&tensors, &[(g[0].clone(), 1.0), (g[1].clone(), 1.0)]);
    assert_eq!(server_bits(&s, &tensors), want);

    let (s, tensors, g, second) = two_workers(Staleness::DownWeighted { max: 3 });
    assert_eq!(
        second,
        Pushed::Applied {
            version: 2,
            staleness: 1,
            factor: 0.5
        }
    );
    let want = replay(&tensors, &[(g[0].clone(), 1.0), (g[1].clone(), 0.5)]);
    assert_eq!(server_bits(&s, &tensors), want);

    let (s, tensors, g, second) = two_workers(Staleness::Bounded { max: 0 });
    assert_eq!(second, Pushed::Refused { staleness: 1 });
    assert_eq!(
        server_bits(&s, &tensors),
        replay(&tensors, &[(g[0].clone(), 1.0)])
    );
    assert_eq!(s.version().unwrap(), 1);
    let stats = s.stats().unwrap();
    assert_eq!((stats.pushes, stats.applied, stats.refused), (2, 1, 1));
    assert_eq!(stats.max_staleness, 1);
    assert_eq!(stats.mean_staleness(), 0.5);
}

/// An applied push as its worker saw it: version made, gradients, factor, staleness.
type AppliedPush = (u64, Vec<Vec<f32>>, f32, u64);

#[test]
fn concurrent_workers_end_where_replaying_their_applied_pushes_leads() {
    for staleness in [Staleness::Unbounded, Staleness::Bounded { max: 1 }] {
        let tensors = awkward_tensors(9);
        let s = server(&tensors, staleness);
        let applied: Mutex<Vec<AppliedPush>> = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for worker in 0..4u64 {
                let (s, tensors, applied) = (&s, &tensors, &applied);
                scope.spawn(move || {
                    let mut w = s.worker().unwrap();
                    let mut rng = StdRng::seed_from_u64(100 + worker);
                    for _ in 0..40 {
                        w.pull().unwrap();
                        // A gradient that depends on the pulled weights (toward zero) plus noise.
                        let noise = random_grads(&mut rng, tensors, 0.1);
                        let grads: Vec<Vec<f32>> = tensors
                            .iter()
                            .zip(noise)
                            .map(|(t, n)| {
                                let p = w.params().read_param(&t.name).unwrap();
                                p.iter().zip(n).map(|(x, e)| x + e).collect()
                            })
                            .collect();
                        write(&mut w, tensors, &grads);
                        if let Pushed::Applied {
                            version,
                            factor,
                            staleness,
                        } = w.push().unwrap()
                        {
                            applied
                                .lock()
                                .unwrap()
                                .push((version, grads, factor, staleness));
                        }
                    }
                });
            }
        });
        let mut applied = applied.into_inner().unwrap();
        applied.sort_by_key(|a| a.0);
        let stats = s.stats().unwrap();
        assert_eq!(stats.pushes, 160);
        assert_eq!(stats.applied + stats.refused + stats.skipped, 160);
        assert_eq!(stats.staleness.iter().sum::<u64>(), 160);
        assert_eq!(applied.len() as u64, stats.applied);
        // Versions 1, 2, … in order, each made by one push.
        assert!(applied.iter().enumerate().all(|(i, a)| a.0 == i as u64 + 1));
        if let Staleness::Bounded { max } = staleness {
            assert!(applied.iter().all(|a| a.3 <= max));
        }
        let pushes: Vec<(Vec<Vec<f32>>, f32)> =
            applied.into_iter().map(|(_, g, f, _)| (g, f)).collect();
        assert_eq!(
            server_bits(&s, &tensors),
            replay(&tensors, &pushes),
            "{staleness:?}"
        );
        println!(
            "{staleness:?}: {stats:?}, mean staleness {:.2}",
            stats.mean_staleness()
        );
    }
}

#[test]
fn bad_pushes_change_nothing() {
    let tensors = awkward_tensors(10);
    let mut rng = StdRng::seed_from_u64(3);
    // Non-finite gradients under the default policy: skipped.
    let s = server(&tensors, Staleness::Unbounded);
    let mut w = s.worker().unwrap();
    let mut grads = random_grads(&mut rng, &tensors, 1.0);
    write(&mut w, &tensors, &grads);
    w.push().unwrap();
    let before = server_bits(&s, &tensors);
    grads[3][17] = f32::NAN;
    write(&mut w, &tensors, &grads);
    assert_eq!(w.push().unwrap(), Pushed::Skipped { staleness: 1 });
    assert_eq!(server_bits(&s, &tensors), before);
    assert_eq!(s.version().unwrap(), 1);
    // Under NonFinitePolicy::Error: a typed error, nothing changed, the next push applies.
    let s = ParameterServer::new(
        optimizer(&tensors, NonFinitePolicy::Error),
        Staleness::Unbounded,
    )
    .unwrap();
    let mut w = s.worker().unwrap();
    let before = server_bits(&s, &tensors);
    write(&mut w, &tensors, &grads);
    assert!(matches!(w.push(), Err(Error::NonFiniteGradient { .. })));
    assert_eq!(server_bits(&s, &tensors), before);
    grads[3][17] = 0.5;
    write(&mut w, &tensors, &grads);
    assert!(matches!(
        w.push().unwrap(),
        Pushed::Applied { version: 1, .. }
    ));
}

#[test]
fn a_checkpoint_of_the_server_restores_its_version() {
    let tensors = awkward_tensors(11);
    let s = server(&tensors, Staleness::Unbounded);
    let mut w = s.worker().unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.safetensors");
    for step in 0..4 {
        if step == 2 {
            s.with_optimizer(|o| o.save_checkpoint(&path)).unwrap();
        }
        w.pull().unwrap();
        write(&mut w, &tensors, &random_grads(&mut rng, &tensors, 1.0));
        w.push().unwrap();
    }
    assert_eq!(s.version().unwrap(), 4);
    s.with_optimizer(|o| o.load_checkpoint(&path)).unwrap();
    assert_eq!(s.version().unwrap(), 2);
    // A worker that pulled before the restore now pushes a gradient from the future: it counts
    // as fresh (staleness 0), never negative.
    write(&mut w, &tensors, &random_grads(&mut rng, &tensors, 1.0));
    assert!(matches!(
        w.push().unwrap(),
        Pushed::Applied {
            version: 3,
            staleness: 0,
            ..
        }
    ));
}

/// The masters of a whole set, as bits.
fn arena_bits(set: &ParamSet) -> Vec<u32> {
    let v = set.read_masters_arena().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn sharded_servers_with_one_worker_step_bit_for_bit_as_one_server() {
    use common::groups::{gradient, DENSE, TENSORS};
    let one = ParameterServer::new(common::groups::optimizer(DENSE), Staleness::Unbounded).unwrap();
    let three =
        ShardedParameterServer::new(common::groups::optimizer(DENSE), 3, Staleness::Unbounded)
            .unwrap();
    let (mut w1, mut w3) = (one.worker().unwrap(), three.worker().unwrap());
    for k in 0..4 {
        w1.pull().unwrap();
        w3.pull().unwrap();
        for (i, (name, ..)) in TENSORS.iter().enumerate() {
            let g = gradient(0, k, i);
            w1.params_mut().set_grad(name, &g).unwrap();
            w3.params_mut().set_grad(name, &g).unwrap();
        }
        assert!(matches!(w1.push().unwrap(), Pushed::Applied { .. }));
        for p in w3.push().unwrap() {
            assert!(
                matches!(p, Pushed::Applied { version, .. } if version == k as u64 + 1),
                "push {k}: {p:?}"
            );
        }
    }
    w1.pull().unwrap();
    w3.pull().unwrap();
    assert_eq!(w3.versions(), &[4, 4, 4]);
    // Clipping is active (the gradients' norm is far above 1): the servers clipped by the
    // global norm, as one server does.
    assert!(arena_bits(w1.params()) == arena_bits(w3.params()));
    // Each server holds one window's state: Adam's two f32 moments per element.
    let window = three.plan().window_len;
    for s in three.servers() {
        assert_eq!(s.with_optimizer(|o| o.state_bytes()).unwrap(), 8 * window);
    }
    let whole = one.with_optimizer(|o| o.state_bytes()).unwrap();
    assert!(3 * 8 * window < whole + 3 * 8 * fusedopt::parallel::sharded::SHARD_GRANULE);
}

#[test]
fn concurrent_workers_on_sharded_servers_end_where_replaying_each_servers_pushes_leads() {
    use common::groups::{gradient, DENSE, TENSORS};
    const WORKERS: usize = 3;
    const PUSHES: usize = 4;
    let servers =
        ShardedParameterServer::new(common::groups::optimizer(DENSE), 2, Staleness::Unbounded)
            .unwrap();
    // made[w][k][r]: the version push k of worker w made at server r.
    let made: Vec<Vec<Vec<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|wk| {
                let servers = &servers;
                s.spawn(move || {
                    let mut w = servers.worker().unwrap();
                    (0..PUSHES)
                        .map(|k| {
                            w.pull().unwrap();
                            for (i, (name, ..)) in TENSORS.iter().enumerate() {
                                w.params_mut().set_grad(name, &gradient(wk, k, i)).unwrap();
                            }
                            let pushed = w.push().unwrap();
                            pushed
                                .into_iter()
                                .map(|p| match p {
                                    Pushed::Applied { version, .. } => version,
                                    other => panic!("worker {wk}, push {k}: {other:?}"),
                                })
                                .collect()
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let got = servers
        .worker()
        .unwrap()
        .params()
        .read_masters_arena()
        .unwrap();
    let len = got.len();
    let to_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (r, server) in servers.servers().iter().enumerate() {
        assert_eq!(server.version().unwrap(), (WORKERS * PUSHES) as u64);
        // Gradients do not depend on the weights: the order server r applied them in is all a
        // replay of its window needs (the whole optimizer clips by the same global norm).
        let mut replay = common::groups::optimizer(DENSE);
        for version in 1..=(WORKERS * PUSHES) as u64 {
            let (wk, k) = (0..WORKERS * PUSHES)
                .map(|i| (i / PUSHES, i % PUSHES))
                .find(|&(wk, k)| made[wk][k][r] == version)
                .unwrap();
            for (i, (name, ..)) in TENSORS.iter().enumerate() {
                replay
                    .params_mut()
                    .set_grad(name, &gradient(wk, k, i))
                    .unwrap();
            }
            replay.step().unwrap();
        }
        let want = replay.params().read_masters_arena().unwrap();
        let w = servers.plan().window(r);
        let part = w.start.min(len)..w.end.min(len);
        assert!(!part.is_empty());
        assert!(
            to_bits(&got[part.clone()]) == to_bits(&want[part]),
            "server {r} against a replay of the pushes it applied"
        );
    }
}
