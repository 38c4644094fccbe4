//! The CPU communicator and the data-parallel engine: collectives against direct computation,
//! N replicas against one replica with the whole batch, bit-identical replicas, overlap that does
//! not change results, and failures that end every replica's step with an error and no step.

mod common;

use std::time::{Duration, Instant};

use fusedopt::comm::cpu::CpuCommunicator;
use fusedopt::comm::{Communicator, HostBuffer, ReduceOp};
use fusedopt::parallel::{DataParallel, DataParallelOptions, Gradients};
use fusedopt::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Runs `f(rank, comm)` on one thread per rank and collects the results in rank order.
fn on_ranks<T: Send>(
    comms: Vec<CpuCommunicator>,
    f: impl Fn(usize, &CpuCommunicator) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn data(rank: usize, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(rank as u64);
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

#[test]
fn collectives_compute_the_right_values_identically_on_every_rank() {
    let size = 3;
    let n = 1001;
    let results = on_ranks(
        CpuCommunicator::group(size, Duration::from_secs(10)).unwrap(),
        |r, c| {
            let mut sum = data(r, n);
            c.all_reduce(HostBuffer::F32(&mut sum).into(), ReduceOp::Sum)
                .unwrap();
            let mut avg = data(r, n);
            c.all_reduce(HostBuffer::F32(&mut avg).into(), ReduceOp::Average)
                .unwrap();
            let mut b = data(r, n);
            c.broadcast(HostBuffer::F32(&mut b).into(), 1).unwrap();
            let mut send = data(r, 4);
            let mut all = vec![0.0; 4 * size];
            c.all_gather(
                HostBuffer::F32(&mut send).into(),
                HostBuffer::F32(&mut all).into(),
            )
            .unwrap();
            let mut big = data(r, 6 * size);
            let mut shard = vec![0.0; 6];
            c.reduce_scatter(
                HostBuffer::F32(&mut big).into(),
                HostBuffer::F32(&mut shard).into(),
                ReduceOp::Sum,
            )
            .unwrap();
            (sum, avg, b, all, shard)
        },
    );
    for i in 0..n {
        let want: f64 = (0..size).map(|r| data(r, n)[i] as f64).sum();
        assert!((results[0].0[i] as f64 - want).abs() < 1e-6);
        assert!((results[0].1[i] as f64 - want / size as f64).abs() < 1e-6);
    }
    assert_eq!(results[0].2, data(1, n));
    let gathered: Vec<f32> = (0..size).flat_map(|r| data(r, 4)).collect();
    for (r, res) in results.iter().enumerate() {
        assert_eq!(res.0, results[0].0, "rank {r} sum differs");
        assert_eq!(res.1, results[0].1, "rank {r} average differs");
        assert_eq!(res.2, results[0].2);
        assert_eq!(res.3, gathered);
        for k in 0..6 {
            let want: f64 = (0..size).map(|q| data(q, 6 * size)[r * 6 + k] as f64).sum();
            assert!((res.4[k] as f64 - want).abs() < 1e-6);
        }
    }
}

#[test]
fn mismatched_sizes_fail_on_every_rank() {
    let results = on_ranks(
        CpuCommunicator::group(3, Duration::from_secs(10)).unwrap(),
        |r, c| {
            let mut buf = vec![1.0; if r == 2 { 5 } else { 4 }];
            c.all_reduce(HostBuffer::F32(&mut buf).into(), ReduceOp::Sum)
        },
    );
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(Error::Communicator(_)))),
        "{results:?}"
    );
}

#[test]
fn a_rank_that_never_arrives_does_not_hang_the_others() {
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let results = on_ranks(CpuCommunicator::group(3, timeout).unwrap(), |r, c| {
        if r == 1 {
            std::thread::sleep(timeout * 4); // stalls, then tries too late
        }
        let mut buf = vec![1.0; 8];
        c.all_reduce(HostBuffer::F32(&mut buf).into(), ReduceOp::Sum)
    });
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    // A hang guard, not a performance claim: the group gave up instead of waiting forever.
    assert!(start.elapsed() < timeout * 20);
}

// ---------------------------------------------------------------- data-parallel training

const DIM: usize = 37;

/// Linear least squares: loss = mean over the batch of ½(w·x + b − y)².
struct Problem {
    x: Vec<Vec<f32>>,
    y: Vec<f32>,
}

impl Problem {
    fn new(n: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(7);
        let truth: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let x: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..DIM).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let y = x
            .iter()
            .map(|xi| xi.iter().zip(&truth).map(|(a, b)| a * b).sum::<f32>() + 0.3)
            .collect();
        Problem { x, y }
    }

    /// Mean gradient over `rows` for parameters `w`, `b`, computed in f64.
    fn grad(&self, w: &[f32], b: f32, rows: std::ops::Range<usize>) -> (Vec<f32>, f32) {
        let n = rows.len() as f64;
        let (mut gw, mut gb) = (vec![0.0f64; DIM], 0.0f64);
        for i in rows {
            let pred: f64 = self.x[i]
                .iter()
                .zip(w)
                .map(|(&a, &c)| a as f64 * c as f64)
                .sum::<f64>()
                + b as f64;
            let err = pred - self.y[i] as f64;
            gw.iter_mut()
                .zip(&self.x[i])
                .for_each(|(g, &a)| *g += err * a as f64);
            gb += err;
        }
        (gw.iter().map(|g| (g / n) as f32).collect(), (gb / n) as f32)
    }
}

fn optimizer(seed: u64) -> Optimizer {
    optimizer_on(seed, Device::Cpu)
}

fn optimizer_on(seed: u64, device: Device) -> Optimizer {
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-0.5..0.5)).collect();
    let mut b = ParamSet::builder();
    b.group("no_decay", GroupOptions::no_decay()).unwrap();
    b.add("w", &[DIM], &w).unwrap();
    b.add_to("no_decay", "b", &[1], &[0.0]).unwrap();
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(0.5, Flavor::PyTorch)),
        ..Default::default()
    };
    Optimizer::with_options(
        b.build(device).unwrap(),
        Adam::adamw(Flavor::PyTorch),
        0.05,
        options,
    )
    .unwrap()
}

fn small_buckets() -> DataParallelOptions {
    DataParallelOptions {
        bucket_bytes: 64,
        first_bucket_bytes: 16,
        timeout: Duration::from_secs(10),
    }
}

/// Replica `rank`'s backward pass over its share of `batch`: reads its parameters, writes the
/// mean gradient of its rows, last tensor first, marking each ready as soon as it is written when
/// `overlap` (else the engine reduces everything after the pass).
fn backward<'p>(
    problem: &'p Problem,
    batch: std::ops::Range<usize>,
    replicas: usize,
    overlap: bool,
) -> impl Fn(usize, &Gradients<'_>) -> Result<()> + Sync + 'p {
    move |rank, grads| {
        let share = batch.len() / replicas;
        let rows = batch.start + rank * share..batch.start + (rank + 1) * share;
        let (gw, gb) = problem.grad(grads.param("w")?, grads.param("b")?[0], rows);
        grads.set("b", &[gb])?;
        if overlap {
            grads.mark_ready("b")?;
        }
        grads.set("w", &gw)?;
        if overlap {
            grads.mark_ready("w")?;
        }
        Ok(())
    }
}

fn params_of(opt: &Optimizer) -> Vec<f32> {
    let mut p = opt.params().read_param("w").unwrap();
    p.extend(opt.params().read_param("b").unwrap());
    p
}

/// Trains `replicas` replicas for `steps` steps on batches of 24 rows.
fn train(replicas: usize, steps: usize, overlap: bool) -> Vec<Vec<f32>> {
    let problem = Problem::new(24 * steps);
    // Every replica starts from its own random parameters: the engine broadcasts rank 0's.
    let opts = (0..replicas).map(|r| optimizer(100 + r as u64)).collect();
    let mut dp = DataParallel::cpu(opts, small_buckets()).unwrap();
    assert!(dp.buckets().len() >= 2, "the test needs several buckets");
    for s in 0..steps {
        dp.step(backward(&problem, 24 * s..24 * (s + 1), replicas, overlap))
            .unwrap();
    }
    dp.replicas().map(params_of).collect()
}

#[test]
fn n_replicas_match_one_replica_and_stay_bit_identical() {
    let single = train(1, 6, true);
    for n in [2, 3, 4] {
        let many = train(n, 6, true);
        for (r, p) in many.iter().enumerate() {
            assert_eq!(
                p, &many[0],
                "{n} replicas: replica {r} differs from replica 0"
            );
        }
        for (a, b) in many[0].iter().zip(&single[0]) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{n} replicas vs one: {a} vs {b}"
            );
        }
    }
}

#[test]
fn overlap_does_not_change_results() {
    assert_eq!(train(3, 4, true), train(3, 4, false));
}

#[test]
fn a_failing_or_panicking_replica_fails_every_replica_and_nobody_steps() {
    let problem = Problem::new(48);
    for panic in [false, true] {
        let opts = (0..3).map(optimizer).collect();
        let mut dp = DataParallel::cpu(opts, small_buckets()).unwrap();
        dp.step(backward(&problem, 0..24, 3, true)).unwrap();
        let before: Vec<Vec<f32>> = dp.replicas().map(params_of).collect();
        let ok = backward(&problem, 24..48, 3, true);
        let result = dp.step(|rank, grads| {
            if rank == 1 {
                grads.set("b", &[1.0])?;
                grads.mark_ready("b")?;
                if panic {
                    panic!("replica 1 crashed");
                }
                return Err(Error::InvalidHyperparameter("replica 1 failed".into()));
            }
            ok(rank, grads)
        });
        assert!(result.is_err(), "panic={panic}: the step succeeded");
        let after: Vec<Vec<f32>> = dp.replicas().map(params_of).collect();
        assert_eq!(after, before, "panic={panic}: a replica stepped");
        for opt in dp.replicas() {
            assert_eq!(opt.step_count().unwrap(), 1);
        }
    }
}

/// Schedule-free's z starts as the parameters: replicas from different random starts take rank
/// 0's parameters and their z with them, and stay identical, z and evaluation parameters too.
#[test]
fn schedule_free_replicas_take_rank_zeros_start_and_stay_identical() {
    let problem = Problem::new(24 * 4);
    let rule = ScheduleFree::adamw(Flavor::PyTorch);
    let opts = (0..3)
        .map(|r| {
            let params = optimizer(100 + r).params().try_clone().unwrap();
            Optimizer::new(params, rule.clone(), 0.05).unwrap()
        })
        .collect();
    let mut dp = DataParallel::cpu(opts, small_buckets()).unwrap();
    for s in 0..4 {
        dp.step(backward(&problem, 24 * s..24 * (s + 1), 3, true))
            .unwrap();
    }
    let seen = |opt: &Optimizer| {
        (
            opt.params().read_param("w").unwrap(),
            opt.state("z", "w").unwrap(),
            opt.eval_param("w").unwrap(),
            params_of(opt),
        )
    };
    let replicas: Vec<_> = dp.replicas().map(seen).collect();
    assert_ne!(replicas[0].0, replicas[0].2, "x and y should differ");
    for (r, seen) in replicas.iter().enumerate() {
        assert_eq!(seen, &replicas[0], "replica {r} differs from replica 0");
    }
}

#[test]
fn mismatched_replicas_are_refused_at_setup() {
    let mut b = ParamSet::builder();
    b.add("w", &[DIM + 1], &[0.0; DIM + 1]).unwrap();
    b.add("b", &[1], &[0.0]).unwrap();
    let other = Optimizer::new(
        b.build(Device::Cpu).unwrap(),
        Adam::adamw(Flavor::PyTorch),
        1e-3,
    )
    .unwrap();
    let err = DataParallel::cpu(vec![optimizer(1), other], small_buckets()).unwrap_err();
    assert!(matches!(err, Error::ReplicasDiffer { .. }), "{err}");
    let sgd = Optimizer::new(
        optimizer(2).params().try_clone().unwrap(),
        Sgd::preset(Flavor::PyTorch),
        1e-3,
    )
    .unwrap();
    assert!(DataParallel::cpu(vec![optimizer(1), sgd], small_buckets()).is_err());
}

// ---------------------------------------------------------------- GPU communicators

#[test]
fn without_nccl_every_entry_point_says_so() {
    use fusedopt::comm::nccl::{nccl_available, NcclCommunicator, NcclId};
    if nccl_available().is_ok() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "NCCL is installed: its absence cannot be tested here (nccl_with_one_rank_reduces_and_steps runs it)"
        );
        return;
    }
    let is_no_nccl = |e: Error| matches!(e, Error::DeviceUnavailable(Unavailable::NoNccl));
    assert!(is_no_nccl(NcclId::new().unwrap_err()));
    let id = NcclId::from_bytes(&[0; 128]).unwrap();
    let e = NcclCommunicator::new(0, 0, 1, &id, Duration::from_secs(1)).unwrap_err();
    assert!(is_no_nccl(e));
    assert!(NcclId::from_bytes(&[0; 12]).is_err());
}

/// Every replica on CUDA device 0.
const ON_GPU_0: fn(usize) -> Device = |_| Device::Cuda(0);

/// Trains `replicas` replicas on CUDA devices (replica r on `device(r)`; one data-parallel engine
/// made by `make`) and returns each replica's parameters and averaged gradients at the end.
fn train_on_gpu<C: Communicator>(
    replicas: usize,
    steps: usize,
    device: impl Fn(usize) -> Device,
    make: impl Fn(Vec<Optimizer>) -> Result<DataParallel<C>>,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let problem = Problem::new(24 * steps);
    let opts = (0..replicas)
        .map(|r| optimizer_on(100 + r as u64, device(r)))
        .collect();
    let mut dp = make(opts).unwrap();
    let mut out = Vec::new();
    for s in 0..steps {
        // GPU parameters are not host memory: the backward pass reads a snapshot of replica 0's.
        let first = dp.replicas().next().unwrap();
        let (w, b) = (
            first.params().read_param("w").unwrap(),
            first.params().read_param("b").unwrap()[0],
        );
        let batch = 24 * s..24 * (s + 1);
        dp.step(|rank, grads| {
            let share = batch.len() / replicas;
            let rows = batch.start + rank * share..batch.start + (rank + 1) * share;
            let (gw, gb) = problem.grad(&w, b, rows);
            grads.set("b", &[gb])?;
            grads.mark_ready("b")?;
            grads.set("w", &gw)?;
            grads.mark_ready("w")
        })
        .unwrap();
    }
    for opt in dp.replicas() {
        let mut g = opt.params().read_grad("w").unwrap();
        g.extend(opt.params().read_grad("b").unwrap());
        out.push((params_of(opt), g));
    }
    out
}

#[test]
fn single_device_replicas_average_like_the_cpu_communicator() {
    if !common::gpu_or_skip("single_device_replicas_average_like_the_cpu_communicator") {
        return;
    }
    let cpu_grads = |n: usize| {
        let problem = Problem::new(24);
        let opts = (0..n).map(|r| optimizer(100 + r as u64)).collect();
        let mut dp = DataParallel::cpu(opts, small_buckets()).unwrap();
        dp.step(backward(&problem, 0..24, n, true)).unwrap();
        let opt = dp.replicas().next().unwrap();
        let mut g = opt.params().read_grad("w").unwrap();
        g.extend(opt.params().read_grad("b").unwrap());
        g
    };
    let single = train_on_gpu(1, 5, ON_GPU_0, |o| {
        DataParallel::single_device(o, small_buckets())
    });
    for n in [2, 3, 4] {
        let many = train_on_gpu(n, 5, ON_GPU_0, |o| {
            DataParallel::single_device(o, small_buckets())
        });
        for (r, p) in many.iter().enumerate() {
            assert_eq!(
                p, &many[0],
                "{n} GPU replicas: replica {r} differs from replica 0"
            );
        }
        for (a, b) in many[0].0.iter().zip(&single[0].0) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{n} replicas vs one: {a} vs {b}"
            );
        }
        // One step from the same start: the kernel's average is the CPU communicator's, bit for bit.
        let gpu_first = train_on_gpu(n, 1, ON_GPU_0, |o| {
            DataParallel::single_device(o, small_buckets())
        });
        assert_eq!(
            gpu_first[0].1,
            cpu_grads(n),
            "{n} replicas: averaged gradients differ"
        );
    }
}

#[test]
fn nccl_with_one_rank_reduces_and_steps() {
    use fusedopt::comm::nccl::nccl_available;
    let test = "nccl_with_one_rank_reduces_and_steps";
    if !common::gpu_or_skip(test)
        || !common::required_or_skip(test, nccl_available().map_err(|e| e.to_string()))
    {
        return;
    }
    let nccl = train_on_gpu(1, 3, ON_GPU_0, |o| DataParallel::nccl(o, small_buckets()));
    let alone = train_on_gpu(1, 3, ON_GPU_0, |o| {
        DataParallel::single_device(o, small_buckets())
    });
    assert_eq!(
        nccl, alone,
        "NCCL with one rank must leave the gradients as they are"
    );
}

/// The number of CUDA devices when there are at least `n`; otherwise says loudly that `test` was
/// skipped (a machine with fewer GPUs cannot run it; the emulated GPU has four).
fn gpus_or_skip(test: &str, n: usize) -> bool {
    use std::io::Write;
    let count = fusedopt::device::cuda_device_count().unwrap_or(0);
    if count >= n {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "GPU TEST SKIPPED: {test}: needs {n} GPUs, this machine has {count}"
    );
    false
}

fn nccl_or_skip(test: &str) -> bool {
    use fusedopt::comm::nccl::nccl_available;
    common::gpu_or_skip(test)
        && common::required_or_skip(test, nccl_available().map_err(|e| e.to_string()))
}

#[test]
fn nccl_ranks_on_several_gpus_match_one_replica_and_stay_bit_identical() {
    let test = "nccl_ranks_on_several_gpus_match_one_replica_and_stay_bit_identical";
    if !nccl_or_skip(test) || !gpus_or_skip(test, 2) {
        return;
    }
    let count = fusedopt::device::cuda_device_count().unwrap();
    let single = train_on_gpu(1, 5, ON_GPU_0, |o| {
        DataParallel::single_device(o, small_buckets())
    });
    for n in (2..=count.min(4)).collect::<Vec<_>>() {
        let many = train_on_gpu(n, 5, Device::Cuda, |o| {
            DataParallel::nccl(o, small_buckets())
        });
        for (r, p) in many.iter().enumerate() {
            assert_eq!(p, &many[0], "{n} NCCL ranks: rank {r} differs from rank 0");
        }
        for (a, b) in many[0].0.iter().zip(&single[0].0) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{n} ranks vs one replica: {a} vs {b}"
            );
        }
    }
}

/// NCCL refuses two ranks on one GPU; the communicator says so instead of hanging or panicking.
#[test]
fn two_nccl_ranks_on_one_gpu_are_refused() {
    let test = "two_nccl_ranks_on_one_gpu_are_refused";
    if !nccl_or_skip(test) {
        return;
    }
    let opts = (0..2)
        .map(|r| optimizer_on(100 + r, Device::Cuda(0)))
        .collect();
    match DataParallel::nccl(opts, small_buckets()) {
        Err(Error::Nccl { .. }) => {}
        other => panic!("expected an NCCL error, got {:?}", other.map(|_| ())),
    }
}

/// One data-parallel step of GPU replicas over `rows` (split evenly), from a snapshot of replica
/// 0's parameters (GPU parameters are not host memory).
fn gpu_step<C: Communicator>(
    dp: &mut DataParallel<C>,
    problem: &Problem,
    rows: std::ops::Range<usize>,
) -> Result<()> {
    let first = dp.replicas().next().unwrap();
    let (w, b) = (
        first.params().read_param("w").unwrap(),
        first.params().read_param("b").unwrap()[0],
    );
    let share = rows.len() / dp.replicas().count();
    dp.step(|rank, grads| {
        let mine = rows.start + rank * share..rows.start + (rank + 1) * share;
        let (gw, gb) = problem.grad(&w, b, mine);
        grads.set("b", &[gb])?;
        grads.mark_ready("b")?;
        grads.set("w", &gw)?;
        grads.mark_ready("w")
    })
}

/// The emulated NCCL's fault injection (emulated-gpu/src/nccl.cpp), or None on a real GPU.
fn nccl_fault_injection() -> Option<impl Fn(i32, u64, &str)> {
    if !Device::Cuda(0).is_emulated() {
        return None;
    }
    // fusedopt loads NCCL first (from FUSEDOPT_NCCL_LIB when set); opening the soname then finds
    // that same library. The control function has this C signature there.
    fusedopt::comm::nccl::nccl_available().ok()?;
    // SAFETY: see above.
    let lib = unsafe { libloading::Library::new("libnccl.so.2") }.ok()?;
    let f: libloading::Symbol<unsafe extern "C" fn(i32, u64, *const std::ffi::c_char) -> i32> =
        // SAFETY: the symbol is the stand-in NCCL's fault control, of this signature.
        unsafe { lib.get(b"fusedopt_emu_nccl_fault") }.ok()?;
    let f = *f;
    std::mem::forget(lib); // keep the function mapped for the process's life
    Some(move |rank: i32, after: u64, kind: &str| {
        let kind = std::ffi::CString::new(kind).unwrap();
        // SAFETY: the function copies what it needs from the NUL-terminated string.
        unsafe { f(rank, after, kind.as_ptr()) };
    })
}

/// A rank that fails, stalls or dies in the middle of a step: every replica's step returns an
/// error within the timeout, and no replica applies the step.
#[test]
fn a_failing_stalling_or_dying_nccl_rank_fails_every_replica_and_nobody_steps() {
    let test = "a_failing_stalling_or_dying_nccl_rank_fails_every_replica_and_nobody_steps";
    if !nccl_or_skip(test) || !gpus_or_skip(test, 2) {
        return;
    }
    let Some(inject) = nccl_fault_injection() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "GPU TEST SKIPPED: {test}: faults are injected by the emulated NCCL only"
        );
        return;
    };
    let problem = Problem::new(48);
    let options = DataParallelOptions {
        timeout: Duration::from_secs(2),
        ..small_buckets()
    };
    // Rank 1 makes one collective per bucket, then one to agree that every replica can step
    // (and, after the step, one to compare outcomes: a fault there cannot undo the step, and is
    // ReplicasDiverged rather than a clean failure).
    let collectives = {
        let opts = (0..2)
            .map(|r| optimizer_on(100 + r as u64, Device::Cuda(r)))
            .collect();
        DataParallel::nccl(opts, options).unwrap().buckets().len() + 1
    };
    for kind in ["error", "stall", "die"] {
        for after in [0, collectives / 2, collectives - 1] {
            let opts = (0..2)
                .map(|r| optimizer_on(100 + r as u64, Device::Cuda(r)))
                .collect();
            let mut dp = DataParallel::nccl(opts, options).unwrap();
            gpu_step(&mut dp, &problem, 0..24).unwrap();
            let before: Vec<_> = dp.replicas().map(params_of).collect();
            inject(1, after as u64, kind);
            let started = std::time::Instant::now();
            let outcome = gpu_step(&mut dp, &problem, 24..48);
            inject(1, 0, "none");
            let what = format!("rank 1 {kind} after {after} collectives");
            assert!(outcome.is_err(), "{what}: the step succeeded");
            // A hang guard (the group gives up instead of waiting forever), generous for a loaded
            // machine: not a timing claim.
            assert!(
                started.elapsed() < options.timeout * 10,
                "{what}: took {:?}",
                started.elapsed()
            );
            let after_step: Vec<_> = dp.replicas().map(params_of).collect();
            assert_eq!(
                after_step, before,
                "{what}: a replica applied the failed step"
            );
        }
        // A fault in the comparison after the step cannot undo it: never Ok, never a plain
        // failure that would claim nothing changed.
        let opts = (0..2)
            .map(|r| optimizer_on(100 + r as u64, Device::Cuda(r)))
            .collect();
        let mut dp = DataParallel::nccl(opts, options).unwrap();
        inject(1, collectives as u64, kind);
        let outcome = gpu_step(&mut dp, &problem, 0..24);
        inject(1, 0, "none");
        assert!(
            matches!(outcome, Err(Error::ReplicasDiverged(_))),
            "rank 1 {kind} while comparing outcomes: {outcome:?}"
        );
    }
}

/// NCCL before 2.13 has no ncclGetLastError: its errors are still reported, without a panic.
#[test]
fn nccl_without_get_last_error_reports_errors() {
    let test = "nccl_without_get_last_error_reports_errors";
    if std::env::var_os("FUSEDOPT_NCCL_LIB").is_some() {
        // The child run below: a rank fails on NCCL 2.12.
        let inject = nccl_fault_injection().expect("the emulated NCCL");
        let opts = (0..2)
            .map(|r| optimizer_on(100 + r as u64, Device::Cuda(r)))
            .collect();
        let mut dp = DataParallel::nccl(opts, small_buckets()).unwrap();
        inject(1, 0, "error");
        let e = gpu_step(&mut dp, &Problem::new(24), 0..24).unwrap_err();
        assert!(
            e.to_string().contains("NCCL") || e.to_string().contains("rank"),
            "{e}"
        );
        return;
    }
    if !nccl_or_skip(test) || !gpus_or_skip(test, 2) {
        return;
    }
    let Some(dir) = std::env::var_os("FUSEDOPT_EMULATED_GPU_DIR") else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "GPU TEST SKIPPED: {test}: needs the emulated NCCL 2.12 (scripts/emulated-gpu.sh)"
        );
        return;
    };
    let lib = std::path::Path::new(&dir).join("nccl-2.12/libnccl.so.2");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("FUSEDOPT_NCCL_LIB", &lib)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The group is driven as one: an lr, a schedule and a checkpoint reach every replica alike, and
/// a run resumed from the group's checkpoint continues bit for bit.
#[test]
fn the_group_sets_lr_schedules_and_checkpoints_as_one() {
    use fusedopt::schedule::{keras, Counted};
    let problem = Problem::new(24 * 6);
    let schedule = || -> Box<dyn fusedopt::schedule::LrSchedule> {
        Box::new(Counted::new(keras::Schedule::ExponentialDecay {
            initial_learning_rate: 0.05,
            decay_steps: 2.0,
            decay_rate: 0.5,
            staircase: false,
        }))
    };
    let group = || {
        let opts = (0..3).map(|r| optimizer(40 + r as u64)).collect();
        let mut dp = DataParallel::cpu(opts, small_buckets()).unwrap();
        dp.set_schedule(Some(schedule())).unwrap();
        dp
    };
    let mut whole = group();
    for s in 0..6 {
        whole
            .step(backward(&problem, 24 * s..24 * (s + 1), 3, true))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.safetensors");
    let mut first = group();
    for s in 0..3 {
        first
            .step(backward(&problem, 24 * s..24 * (s + 1), 3, true))
            .unwrap();
    }
    first.save_checkpoint(&path).unwrap();
    let mut resumed = group();
    resumed.load_checkpoint(&path).unwrap();
    for s in 3..6 {
        resumed
            .step(backward(&problem, 24 * s..24 * (s + 1), 3, true))
            .unwrap();
    }
    let want: Vec<Vec<f32>> = whole.replicas().map(params_of).collect();
    let got: Vec<Vec<f32>> = resumed.replicas().map(params_of).collect();
    assert_eq!(got, want);
    assert!(resumed.replicas().all(|o| o.step_count().unwrap() == 6));
    // An lr no replica can use changes none of them.
    let lr = resumed.lr();
    assert!(resumed.set_lr(f64::NAN).is_err());
    assert!(resumed.replicas().all(|o| o.lr() == lr));
    resumed.set_schedule(None).unwrap();
    resumed.set_lr(0.001).unwrap();
    assert!(resumed.replicas().all(|o| o.lr() == 0.001));
}
