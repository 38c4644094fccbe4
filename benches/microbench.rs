//! The benchmark program: fused optimizer steps against a same-run memory copy, and, given the
//! PyTorch baseline's JSON, against PyTorch on the same device.
//!
//! cargo bench --bench microbench -- [--device cpu|cuda] [--json FILE] [--quick]
//!                                  [--baseline TORCH.json] [--profiles a,b,...] [--rules a,b,...]
//!                                  [--state f32|block8|block4]
//!
//! Bytes moved follow the roofline count: fp32 masters read and written (8 B/param), gradients read
//! once (twice with clipping: the norm pass), each state buffer read and written, the model copy
//! written. Adam fp32 without clipping: 28 B/param. Quantized state (`--state block8|block4`):
//! each buffer's codes read and written, its block scales too.

#[path = "../examples/shared/custom_adam.rs"]
mod custom_adam;

use std::time::Instant;

use custom_adam::custom_adam;
use fusedopt::{
    Adadelta, Adagrad, Adam, Adamax, DType, Device, Flavor, GlobalNormClip, Lion, Nadam, Optimizer,
    OptimizerOptions, ParamSet, QuantizedState, Radam, RmsProp, Rule, Sgd,
};
use serde_json::{json, Value};

struct Args {
    device: Device,
    json: Option<String>,
    quick: bool,
    baseline: Option<String>,
    profiles: Option<Vec<String>>,
    /// Only these rules (by their names in [`rules`]).
    rules: Option<Vec<String>>,
    quantized_state: QuantizedState,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        device: Device::Cpu,
        json: None,
        quick: false,
        baseline: None,
        profiles: None,
        rules: None,
        quantized_state: QuantizedState::None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--device" => {
                a.device = match it.next().as_deref() {
                    Some("cpu") => Device::Cpu,
                    Some("cuda") => Device::Cuda(0),
                    other => return Err(format!("unknown device {other:?}")),
                }
            }
            "--json" => a.json = it.next(),
            "--baseline" => a.baseline = it.next(),
            "--quick" => a.quick = true,
            "--profiles" => {
                a.profiles = it.next().map(|p| p.split(',').map(String::from).collect())
            }
            "--rules" => a.rules = it.next().map(|r| r.split(',').map(String::from).collect()),
            "--state" => {
                a.quantized_state = match it.next().as_deref() {
                    Some("f32") => QuantizedState::None,
                    Some("block8") => QuantizedState::Block8,
                    Some("block4") => QuantizedState::Block4,
                    other => return Err(format!("unknown state {other:?}")),
                }
            }
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Tensor sizes of a profile.
fn profile(name: &str) -> Option<Vec<usize>> {
    Some(match name {
        "64K" => vec![1 << 16], // for checking the program itself (the emulated GPU)
        "1M" => vec![1 << 20],
        "16M" => vec![16 << 20],
        "256M" => vec![256 << 20],
        "10000x4096" => vec![4096; 10_000],
        "10Mx100" => vec![100_000; 100],
        "10Mx5000" => vec![2_000; 5_000],
        "gpt2-medium" => gpt2_medium(),
        _ => return None,
    })
}

/// A GPT-2-medium-like transformer: 24 layers of width 1024, vocabulary 50,257, 1,024 positions
/// (about 355M parameters in 292 tensors).
fn gpt2_medium() -> Vec<usize> {
    let (d, layers, vocab, ctx) = (1024usize, 24, 50_257usize, 1024usize);
    let mut t = vec![vocab * d, ctx * d];
    for _ in 0..layers {
        t.extend([
            d,
            d,
            3 * d * d,
            3 * d,
            d * d,
            d,
            d,
            d,
            4 * d * d,
            4 * d,
            4 * d * d,
            d,
        ]);
    }
    t.extend([d, d]);
    t
}

fn rules() -> Vec<(&'static str, Rule)> {
    let f = Flavor::PyTorch;
    vec![
        (
            "sgd_momentum",
            Sgd {
                momentum: 0.9,
                ..Sgd::preset(f)
            }
            .into(),
        ),
        ("adam", Adam::preset(f).into()),
        ("adamw", Adam::adamw(f).into()),
        ("rmsprop", RmsProp::preset(f).into()),
        (
            "rmsprop_centered",
            RmsProp {
                centered: true,
                ..RmsProp::preset(f)
            }
            .into(),
        ),
        ("adagrad", Adagrad::preset(f).into()),
        ("nadam", Nadam::preset(f).into()),
        ("radam", Radam::preset(f).into()),
        ("adamax", Adamax::preset(f).into()),
        ("adadelta", Adadelta::preset(f).into()),
        ("lion", Lion::preset(f).into()),
        // Adam written as a custom rule: its kernels generated and compiled at run time.
        ("adam_custom", custom_adam(0.9, 0.999, 1e-8).into()),
    ]
}

/// Roofline bytes per parameter (fractional with quantized state).
fn bytes_per_param(
    rule: &Rule,
    grads: DType,
    model: Option<DType>,
    clip: bool,
    q: QuantizedState,
) -> f64 {
    let g = grads.size_bytes();
    let state = match q {
        QuantizedState::None => 4.0,
        q => {
            (q.block() as f64
                * if q == QuantizedState::Block4 {
                    0.5
                } else {
                    1.0
                }
                + 4.0)
                / q.block() as f64
        }
    };
    (8 + g * if clip { 2 } else { 1 } + model.map_or(0, DType::size_bytes)) as f64
        + rule.state_names().len() as f64 * 2.0 * state
}

fn build(
    device: Device,
    sizes: &[usize],
    grads: DType,
    model: Option<DType>,
) -> fusedopt::Result<ParamSet> {
    let mut b = ParamSet::builder();
    b.grad_dtype(grads);
    if let Some(m) = model {
        b.model_copy(m)?;
    }
    for (i, &n) in sizes.iter().enumerate() {
        let values: Vec<f32> = (0..n).map(|k| ((k % 251) as f32 - 125.0) * 1e-3).collect();
        b.add(&format!("t{i}"), &[n], &values)?;
    }
    let mut set = b.build(device)?;
    for (i, &n) in sizes.iter().enumerate() {
        let g: Vec<f32> = (0..n).map(|k| ((k % 241) as f32 - 120.0) * 1e-4).collect();
        set.set_grad(&format!("t{i}"), &g)?;
    }
    Ok(set)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Same-run copy bandwidth (bytes read + written per second) over `bytes` of data.
fn copy_gbps(device: Device, bytes: usize) -> f64 {
    match device {
        Device::Cpu => {
            use rayon::prelude::*;
            let n = bytes / 8;
            let src = vec![1.0f32; n];
            let mut dst = vec![0.0f32; n];
            let times: Vec<f64> = (0..7)
                .map(|_| {
                    let t = Instant::now();
                    dst.par_chunks_mut(1 << 15)
                        .zip(src.par_chunks(1 << 15))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                    t.elapsed().as_secs_f64()
                })
                .collect();
            (2 * n * 4) as f64 / median(times[2..].to_vec()) / 1e9
        }
        Device::Cuda(i) => fusedopt::cuda::runtime::copy_bandwidth(i, bytes, 10)
            .map(|b| b / 1e9)
            .unwrap_or(f64::NAN),
    }
}

struct Measured {
    step_ms: f64,
    host_us: f64,
}

/// Device time per step (median over batches of steps: events on the device's one stream on a GPU,
/// the wall clock on the CPU) and host time per `step()` call. Several optimizers are stepped in
/// turn when one set is small, so caches do not flatter.
fn measure(opts: &mut [Optimizer], quick: bool) -> fusedopt::Result<Measured> {
    let (warm, batches, per_batch) = if quick { (2, 3, 3) } else { (5, 7, 10) };
    for _ in 0..warm {
        for o in opts.iter_mut() {
            o.step()?;
        }
    }
    opts.iter().try_for_each(Optimizer::synchronize)?;
    let (mut step, mut host) = (Vec::new(), Vec::new());
    let device = opts[0].device();
    for _ in 0..batches {
        let start = Instant::now();
        let mut calls = 0.0;
        let mut run = || -> fusedopt::Result<()> {
            for _ in 0..per_batch {
                for o in opts.iter_mut() {
                    let t = Instant::now();
                    o.step()?;
                    calls += t.elapsed().as_secs_f64();
                }
            }
            Ok(())
        };
        let seconds = match device {
            Device::Cuda(i) => fusedopt::cuda::runtime::time_on_device(i, run)?,
            Device::Cpu => {
                run()?;
                start.elapsed().as_secs_f64()
            }
        };
        let n = (per_batch * opts.len()) as f64;
        step.push(seconds / n);
        host.push(calls / n);
    }
    Ok(Measured {
        step_ms: median(step) * 1e3,
        host_us: median(host) * 1e6,
    })
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\nusage: microbench [--device cpu|cuda] [--json FILE] [--quick] [--baseline FILE] [--profiles a,b]");
            std::process::exit(2);
        }
    };
    if let Err(why) = args.device.check() {
        eprintln!("device {} unavailable: {why}", args.device);
        std::process::exit(1);
    }
    let gpu = matches!(args.device, Device::Cuda(_));
    let default: &[&str] = match (gpu, args.quick) {
        (true, false) => &["1M", "16M", "256M", "10000x4096", "gpt2-medium"],
        (true, true) => &["1M", "16M", "10000x4096"],
        (false, false) => &["1M", "16M", "10Mx100", "10Mx5000", "10000x4096"],
        (false, true) => &["1M", "10Mx100", "10Mx5000"],
    };
    let profiles: Vec<String> = args
        .profiles
        .clone()
        .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
    let copy = copy_gbps(args.device, 512 << 20);
    let device_name = match args.device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        d => d.to_string(),
    };
    println!("device: {device_name}; same-run copy: {copy:.1} GB/s (read + written)");
    println!(
        "{:<18} {:<12} {:<12} {:>5} {:>5} {:>10} {:>9} {:>8} {:>7}",
        "rule", "dtypes", "profile", "clip", "graph", "step ms", "host µs", "GB/s", "÷copy"
    );
    let mixes: [(&str, DType, Option<DType>); 2] = [
        ("fp32", DType::F32, None),
        ("bf16+fp32master", DType::BF16, Some(DType::BF16)),
    ];
    let mut results = Vec::new();
    for pname in &profiles {
        let Some(sizes) = profile(pname) else {
            eprintln!("unknown profile {pname}");
            std::process::exit(2);
        };
        let params: usize = sizes.iter().sum();
        let wanted = |name: &str| !matches!(&args.rules, Some(r) if !r.iter().any(|w| w == name));
        for (rname, rule) in rules().into_iter().filter(|(n, _)| wanted(n)) {
            for (mname, grads, model) in mixes {
                for clip in [false, true] {
                    let per_param =
                        bytes_per_param(&rule, grads, model, clip, args.quantized_state);
                    let bytes = (params as f64 * per_param) as usize;
                    // Enough sets that one round exceeds the last-level cache several times over.
                    let sets = (256usize << 20).div_ceil(bytes).clamp(1, 8);
                    let options = OptimizerOptions {
                        clip: clip.then(|| GlobalNormClip::new(1.0, Flavor::PyTorch)),
                        quantized_state: args.quantized_state,
                        ..Default::default()
                    };
                    let mut opts = Vec::new();
                    for _ in 0..sets {
                        match build(args.device, &sizes, grads, model)
                            .and_then(|p| Optimizer::with_options(p, rule.clone(), 1e-3, options))
                        {
                            Ok(o) => opts.push(o),
                            Err(e) => {
                                eprintln!("{rname} {mname} {pname}: {e}");
                                break;
                            }
                        }
                    }
                    if opts.is_empty() {
                        continue;
                    }
                    for graph in if gpu { vec![false, true] } else { vec![false] } {
                        if graph
                            && opts
                                .iter_mut()
                                .try_for_each(Optimizer::capture_graph)
                                .is_err()
                        {
                            continue;
                        }
                        let m = match measure(&mut opts, args.quick) {
                            Ok(m) => m,
                            Err(e) => {
                                eprintln!("{rname} {mname} {pname}: {e}");
                                continue;
                            }
                        };
                        let gbps = bytes as f64 / (m.step_ms / 1e3) / 1e9;
                        println!(
                            "{rname:<18} {mname:<12} {pname:<12} {:>5} {:>5} {:>10.3} {:>9.1} {gbps:>8.1} {:>7.2}",
                            clip, graph, m.step_ms, m.host_us, gbps / copy
                        );
                        results.push(json!({
                            "impl": "fusedopt", "rule": rname, "dtypes": mname, "profile": pname,
                            "params": params, "tensors": sizes.len(), "clip": clip, "graph": graph,
                            "state": format!("{:?}", args.quantized_state),
                            "step_ms": m.step_ms, "host_us": m.host_us, "gbps": gbps,
                            "frac_of_copy": gbps / copy,
                        }));
                    }
                }
            }
        }
    }
    let report = json!({
        "device": device_name,
        "driver": if gpu { "cuda" } else { "none" },
        "git_commit": git_commit(),
        "copy_gbps": copy,
        "results": results,
    });
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        ) {
            eprintln!("cannot write {path}: {e}");
        }
    }
    if let Some(path) = &args.baseline {
        compare_with_baseline(&report, path);
    }
}

/// Prints fusedopt ÷ PyTorch per matching (rule, dtypes, profile, clip): PyTorch's step time over
/// ours (above 1: we are faster), for each PyTorch implementation in the baseline file.
fn compare_with_baseline(ours: &Value, path: &str) {
    let base: Value = match std::fs::read_to_string(path).map(|t| serde_json::from_str(&t)) {
        Ok(Ok(v)) => v,
        _ => {
            eprintln!("cannot read baseline {path}");
            return;
        }
    };
    println!(
        "\nfusedopt vs PyTorch (same device; speedup = PyTorch step time ÷ fusedopt step time; ours copy {:.1} GB/s, theirs {:.1} GB/s)",
        ours["copy_gbps"].as_f64().unwrap_or(f64::NAN),
        base["copy_gbps"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "{:<18} {:<16} {:<12} {:>5} {:<26} {:>10} {:>10} {:>8}",
        "rule", "dtypes", "profile", "clip", "pytorch impl", "torch ms", "ours ms", "speedup"
    );
    let key = |r: &Value| {
        (
            r["rule"].as_str().unwrap_or_default().to_string(),
            r["dtypes"].as_str().unwrap_or_default().to_string(),
            r["profile"].as_str().unwrap_or_default().to_string(),
            r["clip"].as_bool().unwrap_or(false),
        )
    };
    let empty = vec![];
    let ours_rows = ours["results"].as_array().unwrap_or(&empty);
    for t in base["results"].as_array().unwrap_or(&empty) {
        let k = key(t);
        let best = ours_rows
            .iter()
            .filter(|r| key(r) == k)
            .filter_map(|r| r["step_ms"].as_f64())
            .fold(f64::INFINITY, f64::min);
        let theirs = t["step_ms"].as_f64().unwrap_or(f64::NAN);
        if best.is_finite() {
            println!(
                "{:<18} {:<16} {:<12} {:>5} {:<26} {:>10.3} {:>10.3} {:>8.2}",
                k.0,
                k.1,
                k.2,
                k.3,
                t["impl"].as_str().unwrap_or_default(),
                theirs,
                best,
                theirs / best
            );
        }
    }
}
