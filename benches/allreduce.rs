//! All-reduce bandwidth in nccl-tests terms: algbw = bytes / time, busbw = algbw · 2(n−1)/n.
//!
//! cargo bench --bench allreduce -- [--device cpu|cuda] [--ranks N] [--max-bytes B] [--json FILE]
//!
//! Measures the in-process CPU communicator (ranks are threads, host buffers) or, with
//! `--device cuda`, the single-device communicator (replicas sharing GPU 0, device buffers), f32
//! sum, sizes from 4 KB doubling to `--max-bytes` (default 1 GB), median of several iterations
//! after a warm-up. Each timed iteration ends with the communicator's barrier, which on a GPU waits
//! for the device, so host barrier latency (tens of µs) is included: small sizes read low.

use std::time::{Duration, Instant};

use fusedopt::comm::cpu::CpuCommunicator;
use fusedopt::comm::single_device::SingleDeviceCommunicator;
use fusedopt::comm::{Buffer, Communicator, HostBuffer, ReduceOp};
use fusedopt::cuda::arena::DeviceArena;
use fusedopt::cuda::runtime::CudaRuntime;
use fusedopt::{DType, Device};
use serde_json::json;

/// Times `iters` all-reduces of `buf` on one rank (fewer when the group failed).
fn time_rank<C: Communicator>(c: &C, mut buf: Buffer<'_>, iters: usize) -> Vec<f64> {
    let mut t = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        if c.barrier().is_err() {
            break;
        }
        let start = Instant::now();
        if c.all_reduce(buf.reborrow(), ReduceOp::Sum).is_err() || c.barrier().is_err() {
            break;
        }
        if i >= 2 {
            t.push(start.elapsed().as_secs_f64());
        }
    }
    t
}

fn main() {
    let mut ranks = 2usize;
    let mut cuda = false;
    let mut max_bytes = 1usize << 30;
    let mut json_path: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ranks" => ranks = args.next().and_then(|v| v.parse().ok()).unwrap_or(ranks),
            "--max-bytes" => {
                max_bytes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(max_bytes)
            }
            "--json" => json_path = args.next(),
            "--device" => cuda = args.next().as_deref() == Some("cuda"),
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}\nusage: allreduce [--device cpu|cuda] [--ranks N] [--max-bytes B] [--json FILE]");
                std::process::exit(2);
            }
        }
    }
    let name = if cuda { "single-device" } else { "cpu" };
    let rt = if cuda {
        match CudaRuntime::shared(0) {
            Ok(rt) => Some(rt),
            Err(e) => {
                eprintln!("--device cuda: {e}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    println!("{name} communicator, {ranks} ranks, f32 sum");
    println!(
        "{:>12} {:>10} {:>12} {:>12}",
        "bytes", "time µs", "algbw GB/s", "busbw GB/s"
    );
    let mut rows = Vec::new();
    let mut bytes = 4096usize;
    while bytes <= max_bytes {
        let n = bytes / 4;
        let iters = (64usize << 20).div_ceil(bytes).clamp(3, 200);
        let timeout = Duration::from_secs(120);
        let times: Vec<Vec<f64>> = match &rt {
            None => {
                let comms = CpuCommunicator::group(ranks, timeout).unwrap_or_else(|e| exit(e));
                on_threads(&comms, |c| {
                    let mut buf = vec![1.0f32; n];
                    time_rank(c, HostBuffer::F32(&mut buf).into(), iters)
                })
            }
            Some(rt) => {
                let comms =
                    SingleDeviceCommunicator::group(0, ranks, timeout).unwrap_or_else(|e| exit(e));
                on_threads(&comms, |c| {
                    let mut arena =
                        DeviceArena::filled(rt.stream(), DType::F32, n, 1.0, Device::Cuda(0))
                            .unwrap_or_else(|e| exit(e));
                    let mut bufs = arena.split_buffers(rt, &[n]).unwrap_or_else(|e| exit(e));
                    time_rank(c, bufs.remove(0).into(), iters)
                })
            }
        };
        // A collective ends when its slowest rank does: the per-iteration maximum, then the median.
        let mut per_iter: Vec<f64> = (0..iters)
            .map(|i| {
                times
                    .iter()
                    .filter_map(|t| t.get(i))
                    .fold(0.0, |a: f64, &b| a.max(b))
            })
            .collect();
        per_iter.sort_by(f64::total_cmp);
        let t = per_iter[per_iter.len() / 2];
        let algbw = bytes as f64 / t / 1e9;
        let busbw = algbw * 2.0 * (ranks as f64 - 1.0) / ranks as f64;
        println!("{bytes:>12} {:>10.1} {algbw:>12.2} {busbw:>12.2}", t * 1e6);
        rows.push(
            json!({"bytes": bytes, "time_us": t * 1e6, "algbw_gbps": algbw, "busbw_gbps": busbw}),
        );
        bytes *= 2;
    }
    if let Some(path) = json_path {
        let report = json!({"communicator": name, "ranks": ranks, "dtype": "f32", "op": "sum", "results": rows});
        if let Err(e) = std::fs::write(
            &path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        ) {
            eprintln!("cannot write {path}: {e}");
        }
    }
}

fn exit(e: fusedopt::Error) -> ! {
    eprintln!("{e}");
    std::process::exit(1)
}

/// Runs `f` for every rank on its own thread; a rank whose thread panicked reports no times.
fn on_threads<C: Communicator>(comms: &[C], f: impl Fn(&C) -> Vec<f64> + Sync) -> Vec<Vec<f64>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    })
}
