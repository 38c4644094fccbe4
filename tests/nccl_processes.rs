//! NCCL across processes: every rank a process of its own, one GPU each, joined through the
//! torchrun-style rendezvous (this test binary re-runs itself as the ranks). On the emulated GPU
//! the stand-in NCCL meets the processes in a directory; on a real machine, NCCL itself. Data
//! parallel and sharded steps across processes are bit for bit those of the same ranks in one
//! process, and a rank that dies fails the others within the timeout.

mod common;

use std::time::{Duration, Instant};

use common::groups::{backward, bits, optimizer_on, options, DENSE, TENSORS};
use common::processes::{launch, result_line};
use fusedopt::comm::nccl::{nccl_available, NcclCommunicator};
use fusedopt::comm::rendezvous::{Rendezvous, RendezvousConfig};
use fusedopt::comm::Communicator;
use fusedopt::parallel::{DataParallel, ShardedDataParallel};
use fusedopt::Device;

const CHILD: &str = "FUSEDOPT_NCCL_CHILD";
const STEPS: usize = 3;

/// The weights' bits, hashed (FNV-1a), as hex.
fn digest(weights: impl Iterator<Item = Vec<f32>>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in weights {
        for b in bits(&w) {
            for byte in b.to_le_bytes() {
                h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    format!("{h:016x}")
}

fn digest_of(set: &fusedopt::ParamSet) -> String {
    digest(
        TENSORS
            .iter()
            .map(|(name, ..)| set.read_param(name).unwrap()),
    )
}

/// `STEPS` steps of a data-parallel group, then of a sharded one, each over its own communicator
/// from `comm`; the digests of rank 0's weights after each.
fn train<C: Communicator>(
    optimizers: impl Fn() -> Vec<fusedopt::Optimizer>,
    mut comm: impl FnMut() -> fusedopt::Result<Vec<C>>,
) -> fusedopt::Result<(String, String)> {
    let mut plain = DataParallel::new(optimizers(), comm()?, options())?;
    for step in 0..STEPS {
        plain.step(|r, g| backward(r, step, None, g))?;
    }
    let mut sharded = ShardedDataParallel::new(optimizers(), comm()?, options())?;
    for step in 0..STEPS {
        sharded.step(|r, g| backward(r, step, None, g))?;
    }
    let plain = digest_of(plain.replicas().next().unwrap().params());
    let sharded = digest_of(sharded.replicas()[0].params());
    Ok((plain, sharded))
}

/// One rank: joins, trains (or, when told to die, rank 1 exits in the middle of its second step's
/// backward pass), prints the digests or the error and how long it took.
#[test]
#[ignore = "run by the other tests as a child process"]
fn nccl_rank_process() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    let started = Instant::now();
    let result = (|| -> fusedopt::Result<String> {
        // The NCCL communicator's timeout is the rendezvous's: short when a rank will die.
        let timeout = Duration::from_secs(if mode == "die" { 10 } else { 60 });
        let config = RendezvousConfig::from_env(timeout)?;
        let rank = config.rank;
        let mut rdzv = Rendezvous::connect(&config)?;
        let comm = NcclCommunicator::from_rendezvous(&mut rdzv, rank)?;
        if mode == "die" {
            let mut dp = DataParallel::new(
                vec![optimizer_on(DENSE, Device::Cuda(rank))],
                vec![comm],
                options(),
            )?;
            for step in 0..STEPS {
                dp.step(|r, g| {
                    if step == 1 && rank == 1 {
                        std::process::exit(3);
                    }
                    backward(r, step, None, g)
                })?;
            }
            return Ok("trained".into());
        }
        let mut first = Some(comm);
        let (plain, sharded) = train(
            || vec![optimizer_on(DENSE, Device::Cuda(rank))],
            || match first.take() {
                Some(c) => Ok(vec![c]),
                None => Ok(vec![NcclCommunicator::from_rendezvous(&mut rdzv, rank)?]),
            },
        )?;
        Ok(format!("{plain} {sharded}"))
    })();
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(s) => println!("RESULT ok {s}"),
        Err(e) => println!("RESULT err after {secs:.1} s: {e}"),
    }
}

/// Whether NCCL ranks on `n` GPUs can run here; otherwise says loudly why not (a failure under
/// FUSEDOPT_REQUIRE_GPU=1, except for a machine with fewer GPUs, which is stated).
fn ranks_or_skip(test: &str, n: usize) -> bool {
    use std::io::Write;
    if !common::gpu_or_skip(test)
        || !common::required_or_skip(test, nccl_available().map_err(|e| e.to_string()))
    {
        return false;
    }
    let gpus = fusedopt::device::cuda_device_count().unwrap_or(0);
    if gpus < n {
        let _ = writeln!(
            std::io::stderr(),
            "GPU TEST SKIPPED: {test}: needs {n} GPUs, this machine has {gpus}"
        );
        return false;
    }
    true
}

#[test]
fn ranks_in_processes_step_as_the_ranks_of_one_process() {
    let test = "ranks_in_processes_step_as_the_ranks_of_one_process";
    if !ranks_or_skip(test, 3) {
        return;
    }
    for world in [2, 3] {
        let ranks: Vec<usize> = (0..world).collect();
        let one_process = train(
            || {
                (0..world)
                    .map(|r| optimizer_on(DENSE, Device::Cuda(r)))
                    .collect()
            },
            || NcclCommunicator::group(&ranks, Duration::from_secs(30)),
        )
        .unwrap();
        let want = format!("ok {} {}", one_process.0, one_process.1);
        for (rank, out) in launch(
            "nccl_rank_process",
            world,
            &ranks,
            &[(CHILD, "train".into())],
        ) {
            assert_eq!(result_line(&out), want, "{world} processes: rank {rank}");
        }
    }
}

#[test]
fn a_rank_process_that_dies_fails_the_others_within_the_timeout() {
    let test = "a_rank_process_that_dies_fails_the_others_within_the_timeout";
    if !ranks_or_skip(test, 2) {
        return;
    }
    let started = Instant::now();
    let outs = launch("nccl_rank_process", 2, &[0, 1], &[(CHILD, "die".into())]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    for (rank, out) in outs {
        match rank {
            1 => assert_eq!(out.status.code(), Some(3), "the dying rank exits"),
            _ => {
                let line = result_line(&out);
                assert!(line.starts_with("err after"), "rank {rank}: {line}");
            }
        }
    }
}
