//! Replays recorded framework trajectories through fusedopt (docs/FORMAT.md's replay program).
//!
//! cargo run --release --example replay -- [--device cpu|cuda] --out DIR CASE.json...

use std::path::PathBuf;
use std::process::ExitCode;

// The conformance harness the tests use (tests/harness/), compiled into this program too.
#[path = "../tests/harness/mod.rs"]
mod harness;

use fusedopt::Device;
use harness::{compare, replay};

fn main() -> ExitCode {
    let mut device = Device::Cpu;
    let mut out: Option<PathBuf> = None;
    let mut cases = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" => match args.next().as_deref() {
                Some("cpu") => device = Device::Cpu,
                Some("cuda") => device = Device::Cuda(0),
                other => return usage(&format!("unknown device {other:?}")),
            },
            "--out" => out = args.next().map(PathBuf::from),
            "-h" | "--help" => return usage(""),
            _ => cases.push(PathBuf::from(a)),
        }
    }
    let Some(out) = out else {
        return usage("--out DIR is required");
    };
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("cannot create {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    match device.name() {
        Ok(name) => println!("device: {device} ({name})"),
        Err(e) => println!("device: {device} (unusable: {e})"),
    }
    let (mut failed, mut disagree) = (0, 0);
    for path in &cases {
        match run_one(path, device, &out) {
            Ok((name, worst)) => {
                let verdict = if worst <= 1.0 { "ok" } else { "DISAGREES" };
                if worst > 1.0 {
                    disagree += 1;
                }
                println!("{name}: worst error {worst:.3} of tolerance ({verdict})");
            }
            Err(e) => {
                failed += 1;
                println!("{}: could not run: {e}", path.display());
            }
        }
    }
    println!(
        "{} cases: {} agree, {disagree} disagree, {failed} could not run",
        cases.len(),
        cases.len() - disagree - failed
    );
    if failed + disagree > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run_one(
    path: &PathBuf,
    device: Device,
    out: &std::path::Path,
) -> harness::Result<(String, f64)> {
    let case: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let result = replay(&case, device)?;
    std::fs::write(
        out.join(format!("{}.json", result.name)),
        serde_json::to_string(&result.to_json())?,
    )?;
    // Agreement is judged only after the output is written from the replay alone.
    Ok((result.name.clone(), compare(&case, &result)?))
}

fn usage(msg: &str) -> ExitCode {
    if !msg.is_empty() {
        eprintln!("{msg}");
    }
    eprintln!("usage: replay [--device cpu|cuda] --out DIR CASE.json...");
    ExitCode::from(2)
}
