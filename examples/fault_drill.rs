//! The fault drill: one rank of a group misbehaves in the middle of training, for every way
//! fusedopt joins replicas (threads, sharded threads, replicas on one GPU, NCCL ranks, MPI
//! processes, and a parameter server's workers), and the drill checks what the others see.
//!
//! Synchronous groups (a step then a checkpoint, then the fault in the next step): every other
//! rank must return a typed error within a bound of the timeout, none may apply the step, and the
//! checkpoint taken before the fault must resume bit for bit where an unfaulted group goes. The
//! parameter server: the other workers go on, and the server ends exactly where replaying the
//! pushes it applied leads. Prints the table (markdown) and exits non-zero if any drill ended
//! otherwise.
//!
//! cargo run --release --example fault_drill -- [--out FILE]
//! scripts/emulated-gpu.sh cargo run --release --features mpi --example fault_drill  (every row)

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fusedopt::comm::Communicator;
use fusedopt::parallel::parameter_server::Pushed;
use fusedopt::parallel::{
    DataParallel, DataParallelOptions, Gradients, ParameterServer, Replica, ShardedDataParallel,
    ShardedReplica, Staleness,
};
use fusedopt::{Adam, Device, Error, Flavor, GlobalNormClip, Optimizer, OptimizerOptions};

/// Collectives give up after this long; a stalled rank sleeps three times as long.
const TIMEOUT: Duration = Duration::from_millis(1500);
/// What "within the timeout" allows on a loaded 2-core machine: a hang guard, not a timing claim.
const BOUND: Duration = Duration::from_secs(6);
const TENSORS: &[(&str, usize)] = &[("w", 70_001), ("b", 7)];

/// One drill's line of the table.
struct Row {
    group: String,
    fault: &'static str,
    outcome: String,
    ok: bool,
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn optimizer(device: Device, other_tensors: bool) -> fusedopt::Result<Optimizer> {
    let mut b = fusedopt::ParamSet::builder();
    for (i, &(name, n)) in TENSORS.iter().enumerate() {
        let n = if other_tensors { n + 1 } else { n };
        b.add(name, &[n], &values(10 + i as u64, n))?;
    }
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        ..Default::default()
    };
    Optimizer::with_options(
        b.build(device)?,
        Adam::adamw(Flavor::PyTorch),
        1e-3,
        options,
    )
}

fn honest(rank: usize, step: usize, g: &Gradients<'_>) -> fusedopt::Result<()> {
    for (i, &(name, n)) in TENSORS.iter().enumerate().rev() {
        g.set(name, &values((step * 17 + rank * 5 + i) as u64, n))?;
        g.mark_ready(name)?;
    }
    Ok(())
}

fn options() -> DataParallelOptions {
    DataParallelOptions {
        timeout: TIMEOUT,
        bucket_bytes: 64 << 10,
        first_bucket_bytes: 16 << 10,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// One replica, stepped from a thread of its own.
trait Stepper: Send {
    fn step(
        &mut self,
        backward: &(dyn Fn(&Gradients<'_>) -> fusedopt::Result<()> + Sync),
    ) -> fusedopt::Result<()>;
    /// The weights, as bits.
    fn weights(&self) -> Vec<u32>;
}

impl<C: Communicator> Stepper for Replica<C> {
    fn step(
        &mut self,
        backward: &(dyn Fn(&Gradients<'_>) -> fusedopt::Result<()> + Sync),
    ) -> fusedopt::Result<()> {
        Replica::step(self, backward)
    }
    fn weights(&self) -> Vec<u32> {
        bits(
            &self
                .optimizer()
                .params()
                .read_masters_arena()
                .unwrap_or_default(),
        )
    }
}

impl<C: Communicator> Stepper for ShardedReplica<C> {
    fn step(
        &mut self,
        backward: &(dyn Fn(&Gradients<'_>) -> fusedopt::Result<()> + Sync),
    ) -> fusedopt::Result<()> {
        ShardedReplica::step(self, backward)
    }
    fn weights(&self) -> Vec<u32> {
        let read = |name| self.params().read_param(name).unwrap_or_default();
        TENSORS.iter().flat_map(|&(n, _)| bits(&read(n))).collect()
    }
}

/// A synchronous group before it is handed out to threads.
trait Group {
    fn step_all(&mut self, step: usize) -> fusedopt::Result<()>;
    fn save(&self, dir: &Path) -> fusedopt::Result<()>;
    fn load(&mut self, dir: &Path) -> fusedopt::Result<()>;
    fn weights(&self) -> Vec<u32>;
    fn into_steppers(self: Box<Self>) -> Vec<Box<dyn Stepper>>;
}

impl<C: Communicator + 'static> Group for DataParallel<C> {
    fn step_all(&mut self, step: usize) -> fusedopt::Result<()> {
        self.step(|r, g| honest(r, step, g))
    }
    fn save(&self, dir: &Path) -> fusedopt::Result<()> {
        self.save_checkpoint(dir.join("group.safetensors"))
    }
    fn load(&mut self, dir: &Path) -> fusedopt::Result<()> {
        self.load_checkpoint(dir.join("group.safetensors"))
    }
    fn weights(&self) -> Vec<u32> {
        let first = self
            .replicas()
            .next()
            .map(|o| o.params().read_masters_arena());
        bits(&first.and_then(Result::ok).unwrap_or_default())
    }
    fn into_steppers(self: Box<Self>) -> Vec<Box<dyn Stepper>> {
        self.into_replicas()
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn Stepper>)
            .collect()
    }
}

impl<C: Communicator + 'static> Group for ShardedDataParallel<C> {
    fn step_all(&mut self, step: usize) -> fusedopt::Result<()> {
        self.step(|r, g| honest(r, step, g))
    }
    fn save(&self, dir: &Path) -> fusedopt::Result<()> {
        self.save_checkpoint(dir.join("shards"))
    }
    fn load(&mut self, dir: &Path) -> fusedopt::Result<()> {
        self.load_checkpoint(dir.join("shards"))
    }
    fn weights(&self) -> Vec<u32> {
        self.replicas()
            .first()
            .map(Stepper::weights)
            .unwrap_or_default()
    }
    fn into_steppers(self: Box<Self>) -> Vec<Box<dyn Stepper>> {
        self.into_replicas()
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn Stepper>)
            .collect()
    }
}

/// Builds a group of two replicas (the second with other tensors when asked).
type Make<'a> = &'a dyn Fn(bool) -> fusedopt::Result<Box<dyn Group>>;

/// The faulty rank's part in the faulted step.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Error,
    Panic,
    Stall,
    /// Its thread ends without stepping: the replica and its communicator are dropped.
    Killed,
    /// An injected NCCL fault (the stand-in NCCL's control) after `after` collectives.
    Nccl(&'static str, u64),
}

fn name_of(e: &Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}

/// What a rank's faulted step returned, when, and its weights after.
type Outcome = (fusedopt::Result<()>, Duration, Vec<u32>);

/// One synchronous drill: a step, a checkpoint, then `fault` on rank 1 in the next step.
fn drill_sync(label: &str, fault_name: &'static str, make: Make<'_>, fault: Fault) -> Row {
    let row = |ok: bool, outcome: String| Row {
        group: label.to_string(),
        fault: fault_name,
        outcome,
        ok,
    };
    let run = || -> fusedopt::Result<(bool, String)> {
        let dir = tempfile::tempdir().map_err(|e| Error::Communicator(e.to_string()))?;
        let mut group = make(false)?;
        group.step_all(0)?;
        group.save(dir.path())?;
        let before = group.weights();
        let inject = nccl_fault_injection();
        if let (Fault::Nccl(kind, after), Some(inject)) = (fault, &inject) {
            inject(1, after, kind);
        }
        let started = Instant::now();
        let outcomes: Vec<(usize, Option<Outcome>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_steppers()
                .into_iter()
                .enumerate()
                .map(|(rank, mut replica)| {
                    s.spawn(move || {
                        if rank == 1 && fault == Fault::Killed {
                            drop(replica);
                            return (rank, None);
                        }
                        let backward = |g: &Gradients<'_>| {
                            if rank == 1 {
                                match fault {
                                    Fault::Error => {
                                        return Err(Error::InvalidHyperparameter(
                                            "drill: the backward pass failed".into(),
                                        ))
                                    }
                                    Fault::Panic => panic!("drill: the backward pass panicked"),
                                    Fault::Stall => std::thread::sleep(TIMEOUT * 3),
                                    _ => {}
                                }
                            }
                            honest(rank, 1, g)
                        };
                        let result = replica.step(&backward);
                        (rank, Some((result, started.elapsed(), replica.weights())))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or((usize::MAX, None)))
                .collect()
        });
        if let Some(inject) = &inject {
            inject(1, 0, "none");
        }
        let survivors: Vec<_> = outcomes
            .iter()
            .filter(|(rank, _)| *rank != 1)
            .filter_map(|(_, o)| o.as_ref())
            .collect();
        let typed = survivors.iter().all(|(r, ..)| r.is_err());
        let in_time = survivors.iter().all(|(_, t, _)| *t < BOUND);
        let unchanged = survivors.iter().all(|(.., w)| *w == before);
        let mut errors: Vec<String> = survivors
            .iter()
            .filter_map(|(r, ..)| r.as_ref().err().map(name_of))
            .collect();
        errors.dedup();
        let slowest = survivors
            .iter()
            .map(|(_, t, _)| *t)
            .max()
            .unwrap_or_default();
        // The checkpoint from before the fault, in a fresh group, against an unfaulted group.
        let mut resumed = make(false)?;
        resumed.load(dir.path())?;
        resumed.step_all(1)?;
        let mut reference = make(false)?;
        reference.step_all(0)?;
        reference.step_all(1)?;
        let resumes = resumed.weights() == reference.weights();
        let ok = typed && in_time && unchanged && resumes;
        Ok((
            ok,
            format!(
                "{}: {} in {:.1} s; {}; checkpoint {}",
                if typed {
                    "every other rank failed"
                } else {
                    "A RANK SUCCEEDED"
                },
                errors.join(", "),
                slowest.as_secs_f64(),
                if unchanged {
                    "nothing applied"
                } else {
                    "A STEP WAS APPLIED"
                },
                if resumes {
                    "resumes bit for bit"
                } else {
                    "DOES NOT RESUME"
                }
            ),
        ))
    };
    match run() {
        Ok((ok, outcome)) => row(ok, outcome),
        Err(e) => row(false, format!("THE DRILL FAILED: {e}")),
    }
}

/// A group of two built with other tensors on rank 1: refused, typed, within the bound.
fn drill_mismatch(label: &str, make: Make<'_>) -> Row {
    let started = Instant::now();
    let result = make(true);
    let elapsed = started.elapsed();
    let ok = matches!(result, Err(Error::ReplicasDiffer { .. })) && elapsed < BOUND;
    Row {
        group: label.to_string(),
        fault: "joins with other tensors",
        outcome: match result {
            Err(e) => format!(
                "refused at setup: {} in {:.1} s",
                name_of(&e),
                elapsed.as_secs_f64()
            ),
            Ok(_) => "ACCEPTED".into(),
        },
        ok,
    }
}

/// The stand-in NCCL's fault control (emulated-gpu/src/nccl.cpp), when it is the NCCL loaded.
fn nccl_fault_injection() -> Option<impl Fn(i32, u64, &str)> {
    if !Device::Cuda(0).is_emulated() {
        return None;
    }
    fusedopt::comm::nccl::nccl_available().ok()?;
    // SAFETY: opening the soname finds the NCCL fusedopt loaded; nothing runs at load time.
    let lib = unsafe { libloading::Library::new("libnccl.so.2") }.ok()?;
    let f: libloading::Symbol<unsafe extern "C" fn(i32, u64, *const std::ffi::c_char) -> i32> =
        // SAFETY: the symbol is the stand-in NCCL's fault control, of this signature.
        unsafe { lib.get(b"fusedopt_emu_nccl_fault") }.ok()?;
    let f = *f;
    std::mem::forget(lib);
    Some(move |rank: i32, after: u64, kind: &str| {
        let Ok(kind) = std::ffi::CString::new(kind) else {
            return;
        };
        // SAFETY: the function copies what it needs from the NUL-terminated string.
        unsafe { f(rank, after, kind.as_ptr()) };
    })
}

fn skipped(group: &str, why: &str) -> Row {
    Row {
        group: group.to_string(),
        fault: "every fault",
        outcome: format!("not drilled here: {why}"),
        ok: true,
    }
}

fn synchronous_rows(rows: &mut Vec<Row>) {
    let faults: [(&'static str, Fault); 4] = [
        ("backward returns an error", Fault::Error),
        ("backward panics", Fault::Panic),
        ("stalls past the timeout", Fault::Stall),
        (
            "killed (its thread ends, dropping the replica)",
            Fault::Killed,
        ),
    ];
    let threads = |other: bool| -> fusedopt::Result<Box<dyn Group>> {
        let o = vec![
            optimizer(Device::Cpu, false)?,
            optimizer(Device::Cpu, other)?,
        ];
        Ok(Box::new(DataParallel::cpu(o, options())?))
    };
    let sharded = |other: bool| -> fusedopt::Result<Box<dyn Group>> {
        let o = vec![
            optimizer(Device::Cpu, false)?,
            optimizer(Device::Cpu, other)?,
        ];
        Ok(Box::new(ShardedDataParallel::cpu(o, options())?))
    };
    let one_gpu = |other: bool| -> fusedopt::Result<Box<dyn Group>> {
        let o = vec![
            optimizer(Device::Cuda(0), false)?,
            optimizer(Device::Cuda(0), other)?,
        ];
        Ok(Box::new(DataParallel::single_device(o, options())?))
    };
    let nccl = |other: bool| -> fusedopt::Result<Box<dyn Group>> {
        let o = vec![
            optimizer(Device::Cuda(0), false)?,
            optimizer(Device::Cuda(1), other)?,
        ];
        Ok(Box::new(DataParallel::nccl(o, options())?))
    };
    let gpus = fusedopt::device::cuda_device_count().unwrap_or(0);
    let groups: [(&str, Make<'_>, Option<String>); 4] = [
        ("CPU threads", &threads, None),
        ("CPU threads, sharded state", &sharded, None),
        (
            "replicas on one GPU",
            &one_gpu,
            (gpus < 1).then(|| "no GPU (run under scripts/emulated-gpu.sh)".to_string()),
        ),
        (
            "NCCL ranks, one process",
            &nccl,
            (gpus < 2 || fusedopt::comm::nccl::nccl_available().is_err())
                .then(|| "needs 2 GPUs and NCCL (run under scripts/emulated-gpu.sh)".to_string()),
        ),
    ];
    for (label, make, skip) in groups {
        if let Some(why) = skip {
            rows.push(skipped(label, &why));
            continue;
        }
        for (name, fault) in faults {
            rows.push(drill_sync(label, name, make, fault));
        }
        if label.starts_with("NCCL") {
            if nccl_fault_injection().is_none() {
                rows.push(skipped(
                    label,
                    "NCCL faults are injected by the stand-in NCCL only",
                ));
            } else {
                for (name, kind) in [
                    ("its NCCL call fails midway", "error"),
                    ("its NCCL call stalls midway", "stall"),
                    ("disconnects midway (its NCCL dies)", "die"),
                ] {
                    rows.push(drill_sync(label, name, make, Fault::Nccl(kind, 1)));
                }
            }
        }
        rows.push(drill_mismatch(label, make));
    }
}

/// The parameter server with three worker threads, one of which misbehaves after two pushes.
fn parameter_server_rows(rows: &mut Vec<Row>) {
    let faults: [(&'static str, Fault); 4] = [
        ("a worker's backward returns an error", Fault::Error),
        ("a worker panics", Fault::Panic),
        ("a worker stalls", Fault::Stall),
        ("a worker is killed (its thread ends)", Fault::Killed),
    ];
    for (name, fault) in faults {
        let run = || -> fusedopt::Result<(bool, String)> {
            let server =
                ParameterServer::new(optimizer(Device::Cpu, false)?, Staleness::Unbounded)?;
            let applied: Mutex<Vec<(u64, usize, usize)>> = Mutex::new(Vec::new());
            let pushes_each = 6;
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..3usize)
                    .map(|worker| {
                        let (server, applied) = (&server, &applied);
                        s.spawn(move || -> fusedopt::Result<()> {
                            let mut w = server.worker()?;
                            for k in 0..pushes_each {
                                if worker == 1 && k == 2 {
                                    match fault {
                                        Fault::Error => {
                                            return Err(Error::Communicator("drill".into()))
                                        }
                                        Fault::Panic => panic!("drill: a worker panicked"),
                                        Fault::Stall => std::thread::sleep(TIMEOUT),
                                        Fault::Killed => return Ok(()),
                                        Fault::Nccl(..) => {}
                                    }
                                }
                                w.pull()?;
                                for (i, &(t, n)) in TENSORS.iter().enumerate() {
                                    let g = values((1000 * worker + 10 * k + i) as u64, n);
                                    w.params_mut().set_grad(t, &g)?;
                                }
                                if let Pushed::Applied { version, .. } = w.push()? {
                                    if let Ok(mut a) = applied.lock() {
                                        a.push((version, worker, k));
                                    }
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                // The faulty worker's error or panic ends only that worker.
                for h in handles {
                    let _ = h.join();
                }
            });
            let mut applied = applied.into_inner().unwrap_or_default();
            applied.sort();
            let stats = server.stats()?;
            let others_done = [0, 2]
                .iter()
                .all(|w| applied.iter().filter(|a| a.1 == *w).count() == pushes_each);
            let mut replay = optimizer(Device::Cpu, false)?;
            for &(_, worker, k) in &applied {
                for (i, &(t, n)) in TENSORS.iter().enumerate() {
                    replay
                        .params_mut()
                        .set_grad(t, &values((1000 * worker + 10 * k + i) as u64, n))?;
                }
                replay.step()?;
            }
            let served = server.into_optimizer()?;
            let consistent =
                served.params().read_masters_arena()? == replay.params().read_masters_arena()?;
            Ok((
                others_done && consistent,
                format!(
                    "{}; {} pushes applied; the server {} a replay of them",
                    if others_done {
                        "the other workers finished"
                    } else {
                        "THE OTHERS STOPPED"
                    },
                    stats.applied,
                    if consistent { "equals" } else { "DIFFERS FROM" }
                ),
            ))
        };
        let (ok, outcome) = run().unwrap_or_else(|e| (false, format!("THE DRILL FAILED: {e}")));
        rows.push(Row {
            group: "parameter server, worker threads".into(),
            fault: name,
            outcome,
            ok,
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    #[cfg(feature = "mpi")]
    if let Some(i) = args.iter().position(|a| a == "--mpi-rank") {
        mpi_drill::rank_main(&args[i + 1..]);
        return;
    }
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1));
    let started = Instant::now();
    let mut rows = Vec::new();
    synchronous_rows(&mut rows);
    #[cfg(feature = "mpi")]
    mpi_drill::rows(&mut rows);
    #[cfg(not(feature = "mpi"))]
    rows.push(skipped("MPI processes", "built without the mpi feature"));
    parameter_server_rows(&mut rows);
    let drilled = rows
        .iter()
        .filter(|r| !r.outcome.starts_with("not drilled"))
        .count();
    let failed = rows.iter().filter(|r| !r.ok).count();
    let mut table = format!(
        "{drilled} drills, {} as they should, {failed} not (`cargo run --release --features mpi \
         --example fault_drill` under `scripts/emulated-gpu.sh`; timeout {:.1} s, two ranks, \
         rank 1 at fault; {:.0} s in all).\n\n| group | fault | what the others saw | as it should |\n\
         |---|---|---|---|\n",
        drilled - failed,
        TIMEOUT.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.group,
            r.fault,
            r.outcome,
            if r.ok { "yes" } else { "**NO**" }
        ));
    }
    print!("{table}");
    if let Some(path) = out {
        if let Err(e) = std::fs::write(path, &table) {
            eprintln!("cannot write {path}: {e}");
            std::process::exit(2);
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}

/// MPI processes: each drill is an `mpirun -np 2` job of this program, since a killed or
/// stalled process leaves its job's MPI unusable.
#[cfg(feature = "mpi")]
mod mpi_drill {
    use std::process::Command;

    use fusedopt::comm::mpi::Mpi;

    use super::*;

    const FAULTS: [(&str, &str); 6] = [
        ("error", "backward returns an error"),
        ("panic", "backward panics"),
        ("stall", "stalls past the timeout"),
        ("killed", "killed (the process aborts)"),
        ("exits", "disconnects midway (the process exits)"),
        ("mismatch", "joins with other tensors"),
    ];

    /// Runs this program under mpirun; its rank 0's report line, if any.
    fn job(args: &[&str]) -> Option<String> {
        let exe = std::env::current_exe().ok()?;
        let mut child = Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
            .arg(exe)
            .arg("--mpi-rank")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().ok()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("DRILL ").map(str::to_string))
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
            let report = job(&["fault", fault, &d]);
            let (ok, outcome) = match (fault, report) {
                ("mismatch", Some(r)) => (r.starts_with("refused"), r),
                ("killed" | "exits", None) => (
                    true,
                    "mpirun ended the job (no survivor to report)".to_string(),
                ),
                (_, Some(r)) => (r.starts_with("every other rank failed"), r),
                (_, None) => (false, "NO REPORT (the job hung or died)".into()),
            };
            // The checkpoint from before the fault, in a fresh job.
            let (ok, outcome) = match fault {
                "mismatch" => (ok, outcome),
                _ => {
                    let resumed = job(&["resume", "-", &d]);
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
            let report = job(&["ps", kind, "-"]);
            let ok = report.as_deref().is_some_and(|r| r.starts_with(want));
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
}
