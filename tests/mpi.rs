//! Data parallelism across processes on MPI (cargo feature `mpi`). Run as a test, this program
//! launches itself under `mpirun -np 2` and `mpirun -np 4`; every rank then checks, against
//! oracles it computes alone:
//! - each collective gives the rank-order f32 sums (and copies) written out here, for f32 and
//!   bf16 buffers of awkward sizes;
//! - ranks that call different collectives, or join with different tensors, fail alike;
//! - a data-parallel group of processes steps bit for bit as the same group of threads
//!   (`DataParallel::cpu`, in this process), and within rounding of one optimizer stepping the
//!   whole batch's mean gradient;
//! - a failing backward pass on one process fails every process's step with nothing changed;
//! - sharded state (ZeRO-1) over MPI steps bit for bit as the unsharded group, and its sharded
//!   checkpoint (one file per process) loads into one optimizer with the same bits;
//! - a parameter server on rank 0 with the other ranks as asynchronous workers ends exactly where
//!   replaying their applied pushes in version order leads, and refuses a worker with other
//!   tensors;
//! - sharded parameter servers (4 ranks: two serve a window each, two work): each window ends
//!   where replaying the pushes its server applied leads.
//!
//! Without `mpirun` it says so loudly and passes, unless FUSEDOPT_REQUIRE_MPI=1.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::groups::{
    assert_same, backward, bits, everything, gradient, optimizer, options, param_set, DENSE,
    TENSORS,
};
use fusedopt::comm::mpi::{Mpi, MpiCommunicator};
use fusedopt::comm::{Buffer, Communicator, HostBuffer, ReduceOp};
use fusedopt::parallel::parameter_server::mpi::{serve, serve_shard, RemoteWorker};
use fusedopt::parallel::parameter_server::Pushed;
use fusedopt::parallel::sharded::load_sharded_checkpoint;
use fusedopt::parallel::{DataParallel, ShardedDataParallel};
use fusedopt::parallel::{ParameterServer, Staleness};
use fusedopt::{Error, Optimizer};
use half::bf16;

const STEPS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rank") {
        return rank_main(&args[i + 1]);
    }
    if args.iter().any(|a| a == "--list") {
        return; // the harness protocol: nothing to list
    }
    match Command::new("mpirun").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            let msg = "MPI TEST SKIPPED: mpirun not found (install openmpi-bin)";
            if std::env::var("FUSEDOPT_REQUIRE_MPI").is_ok_and(|v| v == "1") {
                panic!("{msg} (FUSEDOPT_REQUIRE_MPI=1)");
            }
            let _ = writeln!(std::io::stderr(), "{msg}");
            return;
        }
    }
    for n in [2, 4] {
        launch(n);
    }
}

/// Runs this program on `n` ranks and checks that every rank passed.
fn launch(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut child = Command::new("mpirun")
        // Root in a container, and more ranks than cores.
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &n.to_string(),
        ])
        .arg(&exe)
        .arg("--rank")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mpirun -np {n} did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    assert!(
        out.status.success(),
        "mpirun -np {n} failed: {}",
        out.status
    );
    let passed = text.lines().filter(|l| l.contains("checks passed")).count();
    assert_eq!(passed, n, "{n} ranks should each report their checks");
    println!(
        "mpirun -np {n}: every rank passed ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// One rank's checks; `dir` is shared by every rank of the job.
fn rank_main(dir: &str) {
    let mpi = Mpi::init().unwrap();
    let (rank, n) = (mpi.rank(), mpi.world_size());
    let group = || mpi.communicator(TIMEOUT).unwrap();
    collectives_are_rank_order_sums(&group());
    different_collectives_fail_alike(&group());
    different_tensors_are_refused(group());
    processes_step_as_threads(group());
    a_failing_backward_pass_fails_every_process(group());
    sharded_state_steps_as_unsharded(group(), std::path::Path::new(dir));
    parameter_server_across_processes(group(), group());
    if n >= 3 {
        sharded_parameter_servers_across_processes(group(), group());
    }
    println!("rank {rank} of {n}: all checks passed");
}

/// `count` values for rank `rank`, different per buffer `seed`.
fn data(rank: usize, seed: usize, count: usize) -> Vec<f32> {
    common::groups::values((rank * 1000 + seed) as u64, count, 4.0)
}

/// Rank order from zero, in f32, each contribution × 1/N first when averaging: what every
/// collective must give.
fn rank_order_sum(n: usize, seed: usize, range: std::ops::Range<usize>, avg: bool) -> Vec<f32> {
    let inv = 1.0 / n as f32;
    let mut acc = vec![0.0f32; range.len()];
    for r in 0..n {
        let theirs = data(r, seed, range.end);
        for (a, &x) in acc.iter_mut().zip(&theirs[range.clone()]) {
            *a += if avg { x * inv } else { x };
        }
    }
    acc
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn collectives_are_rank_order_sums(comm: &MpiCommunicator) {
    let (rank, n) = (comm.rank(), comm.world_size());
    for (seed, len) in [0, 1, 7, 1000, 65_539].into_iter().enumerate() {
        for op in [ReduceOp::Sum, ReduceOp::Average] {
            let avg = op == ReduceOp::Average;
            let want = rank_order_sum(n, seed, 0..len, avg);
            let mut mine = data(rank, seed, len);
            comm.all_reduce(Buffer::from(&mut mine[..]), op).unwrap();
            assert_eq!(bits(&mine), bits(&want), "all_reduce {op:?} of {len}");
            // bf16: widened, summed in f32, rounded once.
            let mut half = to_bf16(&data(rank, seed, len));
            let widened: Vec<Vec<f32>> = (0..n)
                .map(|r| {
                    to_bf16(&data(r, seed, len))
                        .iter()
                        .map(|x| x.to_f32())
                        .collect()
                })
                .collect();
            let inv = 1.0 / n as f32;
            let mut acc = vec![0.0f32; len];
            for w in &widened {
                acc.iter_mut()
                    .zip(w)
                    .for_each(|(a, &x)| *a += if avg { x * inv } else { x });
            }
            comm.all_reduce(HostBuffer::BF16(&mut half).into(), op)
                .unwrap();
            assert_eq!(half, to_bf16(&acc), "bf16 all_reduce {op:?} of {len}");
        }
        // reduce_scatter: this rank's share of the sum.
        let total = len * n;
        let shard = rank * len..(rank + 1) * len;
        let mut send = data(rank, seed + 50, total);
        let mut recv = vec![0.0f32; len];
        comm.reduce_scatter(
            Buffer::from(&mut send[..]),
            Buffer::from(&mut recv[..]),
            ReduceOp::Average,
        )
        .unwrap();
        assert_eq!(
            bits(&recv),
            bits(&rank_order_sum(n, seed + 50, shard, true)),
            "reduce_scatter of {total}"
        );
        // all_gather: every rank's buffer, in rank order.
        let mut send = data(rank, seed + 100, len);
        let mut recv = vec![0.0f32; total];
        comm.all_gather(Buffer::from(&mut send[..]), Buffer::from(&mut recv[..]))
            .unwrap();
        let want: Vec<f32> = (0..n).flat_map(|r| data(r, seed + 100, len)).collect();
        assert_eq!(bits(&recv), bits(&want), "all_gather of {len}");
        // broadcast from the last rank.
        let mut buf = data(rank, seed + 200, len);
        comm.broadcast(Buffer::from(&mut buf[..]), n - 1).unwrap();
        assert_eq!(bits(&buf), bits(&data(n - 1, seed + 200, len)), "broadcast");
    }
    comm.barrier().unwrap();
}

fn different_collectives_fail_alike(comm: &MpiCommunicator) {
    let mut buf = [1.0f32; 10];
    let result = match comm.rank() {
        0 => comm.barrier(),
        _ => comm.all_reduce(Buffer::from(&mut buf[..]), ReduceOp::Sum),
    };
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Communicator(_)), "{err}");
    // Aborted for good.
    assert!(comm.barrier().is_err());
}

fn different_tensors_are_refused(comm: MpiCommunicator) {
    let mut opt = optimizer(DENSE);
    if comm.rank() == comm.world_size() - 1 {
        let mut b = fusedopt::ParamSet::builder();
        b.add("w", &[3], &[1.0, 2.0, 3.0]).unwrap();
        opt = Optimizer::new(
            b.build(fusedopt::Device::Cpu).unwrap(),
            fusedopt::Adam::adamw(fusedopt::Flavor::PyTorch),
            1e-3,
        )
        .unwrap();
    }
    let started = Instant::now();
    let err = DataParallel::new(vec![opt], vec![comm], options()).unwrap_err();
    assert!(
        matches!(err, Error::ReplicasDiffer { .. }),
        "rank joined with other tensors: {err}"
    );
    assert!(started.elapsed() < TIMEOUT);
}

/// The same steps on `n` threads of this process: the oracle of a group of processes.
fn threads(n: usize, steps: usize) -> DataParallel<fusedopt::comm::cpu::CpuCommunicator> {
    let mut plain =
        DataParallel::cpu((0..n).map(|_| optimizer(DENSE)).collect(), options()).unwrap();
    for step in 0..steps {
        plain.step(|r, g| backward(r, step, None, g)).unwrap();
    }
    plain
}

fn processes_step_as_threads(comm: MpiCommunicator) {
    let n = comm.world_size();
    let mut group = DataParallel::new(vec![optimizer(DENSE)], vec![comm], options()).unwrap();
    for step in 0..STEPS {
        group.step(|r, g| backward(r, step, None, g)).unwrap();
    }
    let mine = everything(group.replicas().next().unwrap());
    let oracle = threads(n, STEPS);
    assert_same(
        &mine,
        &everything(oracle.replicas().next().unwrap()),
        "a group of processes against the same group of threads",
    );
    // One optimizer stepping the whole batch's mean gradient (computed in f64).
    let mut whole = optimizer(DENSE);
    for step in 0..STEPS {
        for (i, (name, ..)) in TENSORS.iter().enumerate() {
            let per_rank: Vec<Vec<f32>> = (0..n).map(|r| gradient(r, step, i)).collect();
            let mean: Vec<f32> = (0..per_rank[0].len())
                .map(|k| {
                    let s: f64 = per_rank.iter().map(|g| f64::from(g[k])).sum();
                    (s / n as f64) as f32
                })
                .collect();
            whole.params_mut().set_grad(name, &mean).unwrap();
        }
        whole.step().unwrap();
    }
    let got = group.replicas().next().unwrap();
    for (name, ..) in TENSORS {
        let a = got.params().read_param(name).unwrap();
        let b = whole.params().read_param(name).unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "{name}: {worst} from one optimizer on the whole batch"
        );
    }
}

fn a_failing_backward_pass_fails_every_process(comm: MpiCommunicator) {
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut group = DataParallel::new(vec![optimizer(DENSE)], vec![comm], options()).unwrap();
    group.step(|r, g| backward(r, 0, None, g)).unwrap();
    let before = everything(group.replicas().next().unwrap());
    let err = group
        .step(|r, g| {
            if r == 1 {
                return Err(Error::InvalidHyperparameter("the model blew up".into()));
            }
            backward(r, 1, None, g)
        })
        .unwrap_err();
    match rank {
        1 => assert!(matches!(err, Error::InvalidHyperparameter(_)), "{err}"),
        _ => assert!(matches!(err, Error::ReplicaFailed { rank: 1 }), "{err}"),
    }
    assert_same(
        &everything(group.replicas().next().unwrap()),
        &before,
        "after a failed step",
    );
    // Still in step: the next call steps as if the failed one had not happened.
    group.step(|r, g| backward(r, 1, None, g)).unwrap();
    assert_same(
        &everything(group.replicas().next().unwrap()),
        &everything(threads(n, 2).replicas().next().unwrap()),
        "after recovering",
    );
}

fn sharded_state_steps_as_unsharded(comm: MpiCommunicator, dir: &std::path::Path) {
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut group =
        ShardedDataParallel::new(vec![optimizer(DENSE)], vec![comm], options()).unwrap();
    for step in 0..STEPS {
        group.step(|r, g| backward(r, step, None, g)).unwrap();
    }
    let oracle = threads(n, STEPS);
    let reference = oracle.replicas().next().unwrap();
    let mine = &group.replicas()[0];
    for (name, ..) in TENSORS {
        assert_eq!(
            bits(&mine.params().read_param(name).unwrap()),
            bits(&reference.params().read_param(name).unwrap()),
            "rank {rank}'s {name}, sharded over MPI"
        );
    }
    let memory = mine.memory().unwrap();
    println!(
        "rank {rank} of {n}: sharded state {} B ({:.3} of the unsharded {} B)",
        memory.state_bytes,
        memory.state_bytes as f64 / reference.state_bytes().unwrap() as f64,
        reference.state_bytes().unwrap()
    );
    let shards = dir.join("sharded");
    group.save_checkpoint(&shards).unwrap();
    let mut whole = optimizer(DENSE);
    load_sharded_checkpoint(&mut whole, &shards).unwrap();
    assert_same(
        &everything(&whole),
        &everything(reference),
        "the sharded checkpoint of processes, loaded into one optimizer",
    );
}

/// Pushes per worker in the parameter-server check.
const PUSHES: usize = 5;

fn parameter_server_across_processes(comm: MpiCommunicator, gather: MpiCommunicator) {
    let (rank, n) = (comm.rank(), comm.world_size());
    // Which version each of this worker's pushes made. Worker r's k-th gradient does not depend
    // on the weights, so the order the server applied them in is all a replay needs.
    let mut made = [0.0f32; PUSHES];
    let mut served = None;
    if rank == 0 {
        let server = ParameterServer::new(optimizer(DENSE), Staleness::Unbounded).unwrap();
        let stats = serve(&server, &comm).unwrap();
        assert_eq!(stats.pushes, ((n - 1) * PUSHES) as u64);
        assert_eq!(stats.applied, stats.pushes);
        served = Some(server.into_optimizer().unwrap());
    } else {
        if rank == n - 1 {
            let mut b = fusedopt::ParamSet::builder();
            b.add("w", &[3], &[1.0, 2.0, 3.0]).unwrap();
            let other = b.build(fusedopt::Device::Cpu).unwrap();
            let mut stranger = RemoteWorker::new(&comm, other).unwrap();
            let err = stranger.pull().unwrap_err();
            assert!(matches!(err, Error::ReplicasDiffer { .. }), "{err}");
        }
        let mut w = RemoteWorker::new(&comm, param_set(DENSE)).unwrap();
        for (k, slot) in made.iter_mut().enumerate() {
            w.pull().unwrap();
            for (i, (name, ..)) in TENSORS.iter().enumerate() {
                w.params_mut()
                    .set_grad(name, &gradient(rank, 100 + k, i))
                    .unwrap();
            }
            match w.push().unwrap() {
                Pushed::Applied { version, .. } => *slot = version as f32,
                other => panic!("push {k} of rank {rank}: {other:?}"),
            }
        }
        w.finish().unwrap();
    }
    let mut all = vec![0.0f32; PUSHES * n];
    gather
        .all_gather(Buffer::from(&mut made[..]), Buffer::from(&mut all[..]))
        .unwrap();
    if let Some(served) = served {
        let mut replay = optimizer(DENSE);
        for version in 1..=((n - 1) * PUSHES) {
            let at = all.iter().position(|&v| v == version as f32).unwrap();
            let (r, k) = (at / PUSHES, at % PUSHES);
            for (i, (name, ..)) in TENSORS.iter().enumerate() {
                replay
                    .params_mut()
                    .set_grad(name, &gradient(r, 100 + k, i))
                    .unwrap();
            }
            replay.step().unwrap();
        }
        assert_same(
            &everything(&served),
            &everything(&replay),
            "the parameter server against a replay of its applied pushes",
        );
    }
}

/// Sharded servers (np 4: ranks 0 and 1 serve a window each, 2 and 3 work): each server's window
/// ends where replaying the pushes it applied, in its order, with the whole optimizer leads.
fn sharded_parameter_servers_across_processes(comm: MpiCommunicator, gather: MpiCommunicator) {
    let (rank, n) = (comm.rank(), comm.world_size());
    let servers = n / 2;
    // made[k * servers + r]: the version this worker's push k made at server r.
    let mut made = vec![0.0f32; PUSHES * servers];
    let mut served = None;
    if rank < servers {
        let server =
            ParameterServer::window(&optimizer(DENSE), servers, rank, Staleness::Unbounded)
                .unwrap();
        let stats = serve_shard(&server, &comm, servers).unwrap();
        assert_eq!(stats.applied, ((n - servers) * PUSHES) as u64);
        served = Some(server.into_optimizer().unwrap());
    } else {
        let mut w = RemoteWorker::sharded(&comm, param_set(DENSE), servers).unwrap();
        for k in 0..PUSHES {
            w.pull().unwrap();
            for (i, (name, ..)) in TENSORS.iter().enumerate() {
                w.params_mut()
                    .set_grad(name, &gradient(rank, 200 + k, i))
                    .unwrap();
            }
            for (r, p) in w.push_shards().unwrap().into_iter().enumerate() {
                match p {
                    Pushed::Applied { version, .. } => made[k * servers + r] = version as f32,
                    other => panic!("push {k} of rank {rank} at server {r}: {other:?}"),
                }
            }
        }
        w.finish().unwrap();
    }
    let per = made.len();
    let mut all = vec![0.0f32; per * n];
    gather
        .all_gather(Buffer::from(&mut made[..]), Buffer::from(&mut all[..]))
        .unwrap();
    if let Some(served) = served {
        let mut replay = optimizer(DENSE);
        for version in 1..=((n - servers) * PUSHES) {
            let (from, k) = (0..n * PUSHES)
                .map(|i| (i / PUSHES, i % PUSHES))
                .find(|&(from, k)| all[from * per + k * servers + rank] == version as f32)
                .unwrap();
            for (i, (name, ..)) in TENSORS.iter().enumerate() {
                replay
                    .params_mut()
                    .set_grad(name, &gradient(from, 200 + k, i))
                    .unwrap();
            }
            replay.step().unwrap();
        }
        let whole = replay.params().read_masters_arena().unwrap();
        let window = fusedopt::parallel::ShardPlan::new(whole.len(), servers).window(rank);
        let part = window.start.min(whole.len())..window.end.min(whole.len());
        let mine = served.params().read_masters_arena().unwrap();
        assert!(
            bits(&mine[..part.len()]) == bits(&whole[part]),
            "server {rank} against a replay of the pushes it applied"
        );
    }
}
