//! The rendezvous across real processes on loopback: this test binary re-runs itself as the ranks.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fusedopt::comm::rendezvous::{Rendezvous, RendezvousConfig};

const CHILD: &str = "FUSEDOPT_RENDEZVOUS_CHILD";

/// A port that was free a moment ago. Another process may take it before rank 0 listens on it
/// (tests run in parallel, and other programs run too): callers retry with another port when rank
/// 0 says it cannot listen ([`port_was_taken`]).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn port_was_taken(text: &str) -> bool {
    text.contains("cannot listen")
}

/// Starts `ranks` of a group of `world` processes, each running `rank_process` below; again on a
/// new port when the chosen one was taken before rank 0 could listen.
fn launch(world: usize, ranks: &[usize], timeout_ms: u64) -> Vec<(usize, Output)> {
    for _ in 0..5 {
        let outs = launch_on(free_port(), world, ranks, timeout_ms);
        let taken = outs
            .iter()
            .any(|(_, o)| port_was_taken(&String::from_utf8_lossy(&o.stdout)));
        if !taken {
            return outs;
        }
    }
    panic!("no free port for the rendezvous in 5 tries");
}

fn launch_on(port: u16, world: usize, ranks: &[usize], timeout_ms: u64) -> Vec<(usize, Output)> {
    let port = port.to_string();
    let children: Vec<_> = ranks
        .iter()
        .map(|&rank| {
            let child = spawn_piped(
                Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "rank_process", "--nocapture", "--ignored"])
                    .env(CHILD, timeout_ms.to_string())
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port),
            );
            (rank, child)
        })
        .collect();
    children
        .into_iter()
        .map(|(rank, c)| (rank, c.wait_with_output().unwrap()))
        .collect()
}

fn spawn_piped(cmd: &mut Command) -> std::process::Child {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn result_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "no result; stdout: {text}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
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
