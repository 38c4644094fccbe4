//! Synchronous groups: threads, sharded threads, replicas on one GPU, NCCL ranks. A step, a
//! checkpoint, then one rank's fault in the next step.

use std::path::Path;
use std::time::{Duration, Instant};

use fusedopt::comm::Communicator;
use fusedopt::parallel::{DataParallel, Gradients, Replica, ShardedDataParallel, ShardedReplica};
use fusedopt::{Device, Error};

use crate::{bits, honest, name_of, optimizer, options, skipped, Row, BOUND, TENSORS, TIMEOUT};

/// One replica, stepped from a thread of its own.
pub(crate) trait Stepper: Send {
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
pub(crate) trait Group {
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
pub(crate) enum Fault {
    Error,
    Panic,
    Stall,
    /// Its thread ends without stepping: the replica and its communicator are dropped.
    Killed,
    /// An injected NCCL fault (the stand-in NCCL's control) after `after` collectives.
    Nccl(&'static str, u64),
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
pub(crate) fn nccl_fault_injection() -> Option<impl Fn(i32, u64, &str)> {
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

pub(crate) fn rows(rows: &mut Vec<Row>) {
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
    let one_gpu_sharded = |other: bool| -> fusedopt::Result<Box<dyn Group>> {
        let o = vec![
            optimizer(Device::Cuda(0), false)?,
            optimizer(Device::Cuda(0), other)?,
        ];
        Ok(Box::new(ShardedDataParallel::single_device(o, options())?))
    };
    let nccl_sharded = |other: bool| -> fusedopt::Result<Box<dyn Group>> {
        let o = vec![
            optimizer(Device::Cuda(0), false)?,
            optimizer(Device::Cuda(1), other)?,
        ];
        Ok(Box::new(ShardedDataParallel::nccl(o, options())?))
    };
    let gpus = fusedopt::device::cuda_device_count().unwrap_or(0);
    let no_nccl = gpus < 2 || fusedopt::comm::nccl::nccl_available().is_err();
    let needs_nccl = || "needs 2 GPUs and NCCL (run under scripts/emulated-gpu.sh)".to_string();
    let no_gpu = || "no GPU (run under scripts/emulated-gpu.sh)".to_string();
    let groups: [(&str, Make<'_>, Option<String>); 6] = [
        ("CPU threads", &threads, None),
        ("CPU threads, sharded state", &sharded, None),
        ("replicas on one GPU", &one_gpu, (gpus < 1).then(no_gpu)),
        (
            "replicas on one GPU, sharded state",
            &one_gpu_sharded,
            (gpus < 1).then(no_gpu),
        ),
        ("NCCL ranks, one process", &nccl, no_nccl.then(needs_nccl)),
        (
            "NCCL ranks, sharded state",
            &nccl_sharded,
            no_nccl.then(needs_nccl),
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
