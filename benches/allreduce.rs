//! All-reduce bandwidth in nccl-tests terms: algbw = bytes / time, busbw = algbw · 2(n−1)/n.
//!
//! cargo bench --bench allreduce -- [--ranks N] [--max-bytes B] [--json FILE]
//!
//! Measures the in-process CPU communicator (ranks are threads), f32 sum, sizes from 4 KB doubling
//! to `--max-bytes` (default 1 GB), median of several iterations after a warm-up.

use std::time::{Duration, Instant};

use fusedopt::comm::cpu::CpuCommunicator;
use fusedopt::comm::{Communicator, HostBuffer, ReduceOp};
use serde_json::json;

fn main() {
    let mut ranks = 2usize;
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
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}\nusage: allreduce [--ranks N] [--max-bytes B] [--json FILE]");
                std::process::exit(2);
            }
        }
    }
    println!("in-process CPU communicator, {ranks} ranks, f32 sum");
    println!(
        "{:>12} {:>10} {:>12} {:>12}",
        "bytes", "time µs", "algbw GB/s", "busbw GB/s"
    );
    let mut rows = Vec::new();
    let mut bytes = 4096usize;
    while bytes <= max_bytes {
        let n = bytes / 4;
        let iters = (64usize << 20).div_ceil(bytes).clamp(3, 200);
        let comms = match CpuCommunicator::group(ranks, Duration::from_secs(120)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let times: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut buf = vec![1.0f32; n];
                        let mut t = Vec::with_capacity(iters);
                        for i in 0..iters + 2 {
                            let _ = c.barrier();
                            let start = Instant::now();
                            if c.all_reduce(HostBuffer::F32(&mut buf), ReduceOp::Sum)
                                .is_err()
                            {
                                break;
                            }
                            if i >= 2 {
                                t.push(start.elapsed().as_secs_f64());
                            }
                        }
                        t
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
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
        let report = json!({"communicator": "cpu", "ranks": ranks, "dtype": "f32", "op": "sum", "results": rows});
        if let Err(e) = std::fs::write(
            &path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        ) {
            eprintln!("cannot write {path}: {e}");
        }
    }
}
