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

#[cfg(feature = "mpi")]
mod mpi;
mod parameter_server;
mod synchronous;

use std::time::{Duration, Instant};

use fusedopt::parallel::{DataParallelOptions, Gradients};
use fusedopt::{Adam, Device, Error, Flavor, GlobalNormClip, Optimizer, OptimizerOptions};

/// Collectives give up after this long; a stalled rank sleeps three times as long.
pub(crate) const TIMEOUT: Duration = Duration::from_millis(1500);
/// What "within the timeout" allows on a loaded 2-core machine: a hang guard, not a timing claim.
pub(crate) const BOUND: Duration = Duration::from_secs(6);
pub(crate) const TENSORS: &[(&str, usize)] = &[("w", 70_001), ("b", 7)];

/// One drill's line of the table.
pub(crate) struct Row {
    pub(crate) group: String,
    pub(crate) fault: &'static str,
    pub(crate) outcome: String,
    pub(crate) ok: bool,
}

pub(crate) fn values(seed: u64, n: usize) -> Vec<f32> {
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

pub(crate) fn optimizer(device: Device, other_tensors: bool) -> fusedopt::Result<Optimizer> {
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

pub(crate) fn honest(rank: usize, step: usize, g: &Gradients<'_>) -> fusedopt::Result<()> {
    for (i, &(name, n)) in TENSORS.iter().enumerate().rev() {
        g.set(name, &values((step * 17 + rank * 5 + i) as u64, n))?;
        g.mark_ready(name)?;
    }
    Ok(())
}

pub(crate) fn options() -> DataParallelOptions {
    DataParallelOptions {
        timeout: TIMEOUT,
        bucket_bytes: 64 << 10,
        first_bucket_bytes: 16 << 10,
    }
}

pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub(crate) fn name_of(e: &Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}

pub(crate) fn skipped(group: &str, why: &str) -> Row {
    Row {
        group: group.to_string(),
        fault: "every fault",
        outcome: format!("not drilled here: {why}"),
        ok: true,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    #[cfg(feature = "mpi")]
    if let Some(i) = args.iter().position(|a| a == "--mpi-rank") {
        mpi::rank_main(&args[i + 1..]);
        return;
    }
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1));
    let started = Instant::now();
    let mut rows = Vec::new();
    synchronous::rows(&mut rows);
    #[cfg(feature = "mpi")]
    mpi::rows(&mut rows);
    #[cfg(not(feature = "mpi"))]
    rows.push(skipped("MPI processes", "built without the mpi feature"));
    parameter_server::rows(&mut rows);
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
