//! Tests across real processes: the test binary re-runs itself as the ranks of a group, joined
//! by the rendezvous on loopback (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

use std::process::{Command, Output};

/// A port that was free a moment ago. Another process may take it before rank 0 listens on it
/// (tests run in parallel, and other programs run too): [`launch`] retries with another port when
/// rank 0 says it cannot listen.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn port_was_taken(text: &str) -> bool {
    text.contains("cannot listen")
}

/// Starts `ranks` of a group of `world` processes, each running the ignored test `child` of this
/// binary with `env` set; again on a new port when the chosen one was taken before rank 0 could
/// listen.
pub fn launch(
    child: &str,
    world: usize,
    ranks: &[usize],
    env: &[(&str, String)],
) -> Vec<(usize, Output)> {
    for _ in 0..5 {
        let port = free_port().to_string();
        let children: Vec<_> = ranks
            .iter()
            .map(|&rank| {
                let mut cmd = Command::new(std::env::current_exe().unwrap());
                cmd.args(["--exact", child, "--nocapture", "--ignored"])
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                (rank, cmd.spawn().unwrap())
            })
            .collect();
        let outs: Vec<(usize, Output)> = children
            .into_iter()
            .map(|(rank, c)| (rank, c.wait_with_output().unwrap()))
            .collect();
        let taken = outs
            .iter()
            .any(|(_, o)| port_was_taken(&String::from_utf8_lossy(&o.stdout)));
        if !taken {
            return outs;
        }
    }
    panic!("no free port for the rendezvous in 5 tries");
}

/// What a child printed after "RESULT ".
pub fn result_line(out: &Output) -> String {
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
