//! The rendezvous across real processes on loopback: this test binary re-runs itself as the ranks.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::processes::{self, free_port, port_was_taken, result_line};
use fusedopt::comm::rendezvous::{Rendezvous, RendezvousConfig};

const CHILD: &str = "FUSEDOPT_RENDEZVOUS_CHILD";

/// Starts `ranks` of a group of `world` processes, each running `rank_process` below.
fn launch(world: usize, ranks: &[usize], timeout_ms: u64) -> Vec<(usize, Output)> {
    processes::launch(
        "rank_process",
        world,
        ranks,
        &[(CHILD, timeout_ms.to_string())],
    )
}

/// One rank: joins, gathers "rank-N" from everyone, receives rank 2's blob, prints what it got.
#[test]
#[ignore = "run by the other tests as a child process"]
fn rank_process() {
    let Ok(timeout_ms) = std::env::var(CHILD) else {
        return;
    };
    let timeout = Duration::from_millis(timeout_ms.parse().unwrap());
    let result = (|| -> fusedopt::Result<String> {
        let mut r = Rendezvous::connect(&RendezvousConfig::from_env(timeout)?)?;
        let mine = format!("rank-{}", r.rank());
        let all = r.all_gather(mine.as_bytes())?;
        let root = r.broadcast(b"id-from-root", 2.min(r.world_size() - 1))?;
        r.barrier()?;
        let all: Vec<String> = all
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        Ok(format!(
            "{}|{}",
            all.join(","),
            String::from_utf8_lossy(&root)
        ))
    })();
    match result {
        Ok(s) => println!("RESULT ok {s}"),
        Err(e) => println!("RESULT err {e}"),
    }
}

#[test]
fn processes_exchange_blobs_over_loopback() {
    // Started in reverse so that rank 0 is usually last: the others must retry until it listens.
    let outs = launch(4, &[3, 2, 1, 0], 20_000);
    for (rank, out) in outs {
        assert_eq!(
            result_line(&out),
            "ok rank-0,rank-1,rank-2,rank-3|id-from-root",
            "rank {rank}"
        );
    }
}

#[test]
fn a_missing_rank_fails_the_others_within_the_timeout() {
    let start = Instant::now();
    let outs = launch(3, &[0, 1], 1_500);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    for (rank, out) in outs {
        let line = result_line(&out);
        assert!(
            line.starts_with("err rendezvous failed"),
            "rank {rank}: {line}"
        );
    }
    let rank0 = launch(2, &[0], 500);
    assert!(result_line(&rank0[0].1).contains("ranks [1] did not arrive"));
}

#[test]
fn conflicting_world_sizes_are_refused() {
    for _ in 0..5 {
        let port = free_port();
        let config = move |rank, world| RendezvousConfig {
            rank,
            world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(5),
        };
        let joiner = std::thread::spawn(move || Rendezvous::connect(&config(1, 3)).map(|_| ()));
        let e = Rendezvous::connect(&config(0, 2)).unwrap_err();
        let joined = joiner.join().unwrap();
        if port_was_taken(&e.to_string()) {
            continue;
        }
        assert!(e.to_string().contains("WORLD_SIZE=3"), "{e}");
        assert!(joined.is_err());
        return;
    }
    panic!("no free port for the rendezvous in 5 tries");
}
