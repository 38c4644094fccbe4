//! MPI processes: each drill is an `mpirun -np 2` job of this program, since a killed or
//! stalled process leaves its job's MPI unusable. The jobs run with OpenMPI's
//! `orte_abort_on_non_zero_status 0`, so that mpirun leaves the survivors of a killed or exited
//! process running, to report what they saw (by default it ends the whole job at once).

use std::process::Command;

use fusedopt::comm::mpi::Mpi;
use fusedopt::comm::Communicator;

use std::path::Path;
use std::time::{Duration, Instant};

use fusedopt::parallel::{DataParallel, ParameterServer, Staleness};
use fusedopt::{Device, Error};

use crate::synchronous::Group;
use crate::{honest, name_of, optimizer, options, skipped, values, Row, BOUND, TENSORS, TIMEOUT};

const FAULTS: [(&str, &str); 6] = [
    ("error", "backward returns an error"),
    ("panic", "backward panics"),
    ("stall", "stalls past the timeout"),
    ("killed", "killed (the process aborts)"),
    ("exits", "disconnects midway (the process exits)"),
    ("mismatch", "joins with other tensors"),
];

/// How a drill job ended: the first report line any rank printed, and whether the job ended
/// by itself within the bound (the drill kills one that does not, after a minute).
struct Job {
    report: Option<String>,
    ended_in_time: bool,
}

/// Runs this program under mpirun.
fn job(args: &[&str]) -> Job {
    let failed = Job {
        report: None,
        ended_in_time: false,
    };
    let Ok(exe) = std::env::current_exe() else {
        return failed;
    };
    let started = Instant::now();
    let Ok(mut child) = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .args(["--mca", "orte_abort_on_non_zero_status", "0"])
        .arg(exe)
        .arg("--mpi-rank")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return failed;
    };
    let deadline = started + Duration::from_secs(60);
    let mut killed = false;
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Starting the job and its processes takes a while on a loaded machine: slack beyond the
    // drill's own bound.
    let ended_in_time = !killed && started.elapsed() < BOUND + Duration::from_secs(20);
    let Ok(out) = child.wait_with_output() else {
        return failed;
    };
    Job {
        report: String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("DRILL ").map(str::to_string)),
        ended_in_time,
    }
}

pub(super) fn rows(rows: &mut Vec<Row>) {
    let label = "MPI processes";
    if Command::new("mpirun").arg("--version").output().is_err() {
        rows.push(skipped(label, "mpirun not found"));
        return;
    }
    for (fault, name) in FAULTS {
        let Ok(dir) = tempfile::tempdir() else {
            continue;
        };
        let d = dir.path().to_string_lossy().into_owned();
        let Job {
            report,
            ended_in_time,
        } = job(&["fault", fault, &d]);
        let (ok, outcome) = match (fault, report) {
            ("mismatch", Some(r)) => (r.starts_with("refused"), r),
            (_, Some(r)) => (r.starts_with("every other rank failed"), r),
            (_, None) => (false, "NO REPORT (the job hung or died)".into()),
        };
        let (ok, outcome) = match ended_in_time {
            true => (ok, outcome),
            false => (
                false,
                format!("{outcome}; THE JOB HUNG (killed by the drill)"),
            ),
        };
        // The checkpoint from before the fault, in a fresh job.
        let (ok, outcome) = match fault {
            "mismatch" => (ok, outcome),
            _ => {
                let resumed = job(&["resume", "-", &d]).report;
                let resumes = resumed.as_deref() == Some("resumes bit for bit");
                (
                    ok && resumes,
                    format!(
                        "{outcome}; checkpoint {}",
                        resumed.unwrap_or_else(|| "DID NOT RESUME".into())
                    ),
                )
            }
        };
        rows.push(Row {
            group: label.into(),
            fault: name,
            outcome,
            ok,
        });
    }
    for (kind, name, want) in [
        (
            "worker-stalls",
            "a worker stalls past the timeout",
            "the server stopped",
        ),
        (
            "server-stalls",
            "the server stalls past the timeout",
            "the worker stopped",
        ),
    ] {
        let Job {
            report,
            ended_in_time,
        } = job(&["ps", kind, "-"]);
        let ok = ended_in_time && report.as_deref().is_some_and(|r| r.starts_with(want));
        rows.push(Row {
            group: "parameter server, MPI processes".into(),
            fault: name,
            outcome: report.unwrap_or_else(|| "NO REPORT (the job hung or died)".into()),
            ok,
        });
    }
}

/// A parameter server on rank 0 and a worker on rank 1, one of which stalls.
fn parameter_server_job(mpi: &Mpi, kind: &str) {
    use fusedopt::parallel::parameter_server::mpi::{serve, RemoteWorker};
    let rank = mpi.rank();
    let Ok(comm) = mpi.communicator(TIMEOUT) else {
        return;
    };
    let started = Instant::now();
    let outcome = (|| -> fusedopt::Result<()> {
        let optimizer = optimizer(Device::Cpu, false)?;
        if rank == 0 {
            if kind == "server-stalls" {
                std::thread::sleep(TIMEOUT * 3);
                return Ok(());
            }
            let server = ParameterServer::new(optimizer, Staleness::Unbounded)?;
            serve(&server, &comm).map(|_| ())
        } else {
            let mut w = RemoteWorker::new(&comm, optimizer.into_params())?;
            for k in 0..4 {
                if k == 2 && kind == "worker-stalls" {
                    std::thread::sleep(TIMEOUT * 3);
                    return Ok(());
                }
                w.pull()?;
                for (i, &(t, n)) in TENSORS.iter().enumerate() {
                    w.params_mut()
                        .set_grad(t, &values((10 * k + i) as u64, n))?;
                }
                w.push()?;
            }
            w.finish()
        }
    })();
    let who = if rank == 0 { "server" } else { "worker" };
    if let Err(e) = outcome {
        println!(
            "DRILL the {who} stopped: {} in {:.1} s ({e})",
            name_of(&e),
            started.elapsed().as_secs_f64()
        );
    }
    // The stalled peer may never finalize MPI: leave without waiting for it.
    std::process::exit(0);
}

/// One rank of a drill job: `fault KIND DIR` or `resume - DIR`.
pub(super) fn rank_main(args: &[String]) {
    let (Some(mode), Some(kind), Some(dir)) = (args.first(), args.get(1), args.get(2)) else {
        return;
    };
    let dir = Path::new(dir);
    let Ok(mpi) = Mpi::init() else {
        return;
    };
    let rank = mpi.rank();
    if mode == "ps" {
        return parameter_server_job(&mpi, kind);
    }
    let group = |other: bool| -> fusedopt::Result<DataParallel<_>> {
        let comm = mpi.communicator(TIMEOUT)?;
        DataParallel::new(vec![optimizer(Device::Cpu, other)?], vec![comm], options())
    };
    let report = |line: String| {
        if rank == 0 {
            println!("DRILL {line}");
        }
    };
    if mode == "resume" {
        let outcome = (|| -> fusedopt::Result<bool> {
            let mut g = group(false)?;
            g.load_checkpoint(dir.join("group.safetensors"))?;
            g.step(|r, grads| honest(r, 1, grads))?;
            // The same two steps on two threads of this process.
            let o = vec![
                optimizer(Device::Cpu, false)?,
                optimizer(Device::Cpu, false)?,
            ];
            let mut reference = DataParallel::cpu(o, options())?;
            reference.step_all(0)?;
            reference.step_all(1)?;
            Ok(Group::weights(&g) == Group::weights(&reference))
        })();
        report(match outcome {
            Ok(true) => "resumes bit for bit".into(),
            Ok(false) => "RESUMES ELSEWHERE".into(),
            Err(e) => format!("FAILED TO RESUME: {e}"),
        });
        return;
    }
    if kind == "mismatch" {
        let started = Instant::now();
        match group(rank == 1) {
            Err(e @ Error::ReplicasDiffer { .. }) => report(format!(
                "refused at setup: {} in {:.1} s",
                name_of(&e),
                started.elapsed().as_secs_f64()
            )),
            Err(e) => report(format!("REFUSED WITH ANOTHER ERROR: {e}")),
            Ok(_) => report("ACCEPTED".into()),
        }
        return;
    }
    let Ok(mut g) = group(false) else {
        report("COULD NOT START".into());
        return;
    };
    let prepared = g
        .step(|r, grads| honest(r, 0, grads))
        .and_then(|()| match rank {
            0 => g.save_checkpoint(dir.join("group.safetensors")),
            _ => Ok(()),
        });
    // Nobody faults before the checkpoint is on disk.
    let comm = mpi.communicator(TIMEOUT);
    if prepared.is_err() || comm.and_then(|c| c.barrier()).is_err() {
        report("COULD NOT PREPARE".into());
        return;
    }
    let before = Group::weights(&g);
    if rank == 1 && kind == "killed" {
        std::process::abort();
    }
    if rank == 1 && kind == "exits" {
        std::process::exit(3);
    }
    let started = Instant::now();
    let result = g.step(|r, grads| {
        if r == 1 {
            match kind.as_str() {
                "error" => return Err(Error::InvalidHyperparameter("drill".into())),
                "panic" => panic!("drill: the backward pass panicked"),
                "stall" => std::thread::sleep(TIMEOUT * 3),
                _ => {}
            }
        }
        honest(r, 1, grads)
    });
    let elapsed = started.elapsed();
    let unchanged = Group::weights(&g) == before;
    match &result {
        Err(e) => report(format!(
            "{}: {} in {:.1} s; {}",
            if elapsed < BOUND {
                "every other rank failed"
            } else {
                "A RANK WAITED TOO LONG"
            },
            name_of(e),
            elapsed.as_secs_f64(),
            if unchanged {
                "nothing applied"
            } else {
                "A STEP WAS APPLIED"
            }
        )),
        Ok(()) => report("A RANK SUCCEEDED".into()),
    }
    // A stalled peer may never come back to finalize MPI: leave without waiting for it.
    if kind == "stall" {
        std::process::exit(0);
    }
}
