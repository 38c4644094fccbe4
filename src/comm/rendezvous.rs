//! A `torchrun`-style rendezvous: processes find each other through rank 0's TCP address and
//! exchange small blobs (the NCCL unique id, layout fingerprints) before any collective exists.
//!
//! Configuration comes from the usual variables: `RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`. Rank 0 listens; the others connect, retrying until rank 0 is up. Every read and
//! write waits at most the timeout, so a rank that never arrives or dies fails the others with an
//! error instead of hanging them.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FUSEDRV1";
/// Larger frames are refused: rendezvous blobs are ids and fingerprints, not tensors.
const MAX_FRAME: u64 = 64 << 20;

fn fail(reason: impl Into<String>) -> Error {
    Error::Rendezvous(reason.into())
}

/// Where rank 0 listens, who this process is, and how long to wait for the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub timeout: Duration,
}

impl RendezvousConfig {
    /// From `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`, as `torchrun` sets them.
    pub fn from_env(timeout: Duration) -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok(), timeout)
    }

    /// From any variable lookup (the environment, a launcher's table, a test).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>, timeout: Duration) -> Result<Self> {
        let var = |k: &str| get(k).ok_or_else(|| fail(format!("{k} is not set")));
        fn number<T: std::str::FromStr>(k: &str, v: String) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| fail(format!("{k}={v:?} is not a valid number")))
        }
        let rank: usize = number("RANK", var("RANK")?)?;
        let world_size: usize = number("WORLD_SIZE", var("WORLD_SIZE")?)?;
        if world_size == 0 || rank >= world_size {
            return Err(fail(format!(
                "RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        Ok(RendezvousConfig {
            rank,
            world_size,
            master_addr: var("MASTER_ADDR")?,
            master_port: number("MASTER_PORT", var("MASTER_PORT")?)?,
            timeout,
        })
    }

    fn address(&self) -> Result<SocketAddr> {
        (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| fail(format!("MASTER_ADDR {}: {e}", self.master_addr)))?
            .next()
            .ok_or_else(|| {
                fail(format!(
                    "MASTER_ADDR {} resolves to nothing",
                    self.master_addr
                ))
            })
    }
}

/// The connected group: rank 0 holds a stream to every other rank, the others one to rank 0.
#[derive(Debug)]
pub struct Rendezvous {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Rank 0: peers[r - 1] is rank r. Others: peers[0] is rank 0.
    peers: Vec<TcpStream>,
}

fn io_fail(what: &str, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => fail(format!(
            "{what}: timed out; a rank failed, stalled or never started"
        )),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => fail(
            format!("{what}: the peer closed the connection (it failed or exited)"),
        ),
        _ => fail(format!("{what}: {e}")),
    }
}

fn write_frame(s: &mut TcpStream, bytes: &[u8], what: &str) -> Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())
        .and_then(|_| s.write_all(bytes))
        .and_then(|_| s.flush())
        .map_err(|e| io_fail(what, e))
}

fn read_frame(s: &mut TcpStream, what: &str) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(|e| io_fail(what, e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(fail(format!(
            "{what}: a {len}-byte frame is not a rendezvous message"
        )));
    }
    let mut out = vec![0u8; len as usize];
    s.read_exact(&mut out).map_err(|e| io_fail(what, e))?;
    Ok(out)
}

fn hello(rank: usize, world_size: usize) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&(rank as u64).to_le_bytes());
    h.extend_from_slice(&(world_size as u64).to_le_bytes());
    h
}

fn parse_hello(h: &[u8]) -> Option<(usize, usize)> {
    if h.len() != 24 || &h[..8] != MAGIC {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default()) as usize;
    Some((word(8), word(16)))
}

impl Rendezvous {
    /// Joins the group; returns once every rank has arrived (or with an error at the timeout).
    pub fn connect(config: &RendezvousConfig) -> Result<Self> {
        let addr = config.address()?;
        let deadline = Instant::now() + config.timeout;
        let peers = if config.rank == 0 {
            Self::accept_all(config, addr, deadline)?
        } else {
            vec![Self::join(config, addr, deadline)?]
        };
        Ok(Rendezvous {
            rank: config.rank,
            world_size: config.world_size,
            timeout: config.timeout,
            peers,
        })
    }

    fn configure(s: &TcpStream, timeout: Duration) -> Result<()> {
        s.set_nonblocking(false)
            .and_then(|_| s.set_nodelay(true))
            .and_then(|_| s.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))))
            .and_then(|_| s.set_write_timeout(Some(timeout.max(Duration::from_millis(1)))))
            .map_err(|e| io_fail("configuring a rendezvous socket", e))
    }

    fn accept_all(
        config: &RendezvousConfig,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<Vec<TcpStream>> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| fail(format!("rank 0 cannot listen on {addr}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_fail("listening", e))?;
        let mut slots: Vec<Option<TcpStream>> = (1..config.world_size).map(|_| None).collect();
        let mut missing = slots.len();
        while missing > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    Self::configure(&s, config.timeout)?;
                    let h = read_frame(&mut s, "reading a rank's hello")?;
                    let (rank, world) = parse_hello(&h)
                        .ok_or_else(|| fail("a connection that is not a fusedopt rank"))?;
                    if world != config.world_size {
                        return Err(fail(format!(
                            "rank {rank} says WORLD_SIZE={world}, rank 0 says {}",
                            config.world_size
                        )));
                    }
                    let slot = rank
                        .checked_sub(1)
                        .and_then(|i| slots.get_mut(i))
                        .ok_or_else(|| fail(format!("rank {rank} is out of range")))?;
                    if slot.is_some() {
                        return Err(fail(format!("two processes claim RANK={rank}")));
                    }
                    *slot = Some(s);
                    missing -= 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let absent: Vec<usize> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| i + 1)
                            .collect();
                        return Err(fail(format!(
                            "ranks {absent:?} did not arrive within {:?}",
                            config.timeout
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io_fail("accepting ranks", e)),
            }
        }
        let mut peers: Vec<TcpStream> = slots.into_iter().flatten().collect();
        for p in &mut peers {
            write_frame(p, MAGIC, "welcoming a rank")?;
        }
        Ok(peers)
    }

    fn join(config: &RendezvousConfig, addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
        let mut s = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(fail(format!(
                    "rank {} could not reach rank 0 at {addr} within {:?}",
                    config.rank, config.timeout
                )));
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => break s,
                // Rank 0 may not be listening yet.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Self::configure(&s, config.timeout)?;
        write_frame(
            &mut s,
            &hello(config.rank, config.world_size),
            "sending hello",
        )?;
        let welcome = read_frame(&mut s, "waiting for rank 0 to gather every rank")?;
        if welcome != MAGIC {
            return Err(fail("rank 0 answered with something that is not a welcome"));
        }
        Ok(s)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Every rank's blob, in rank order, on every rank.
    pub fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.rank == 0 {
            let mut all = vec![mine.to_vec()];
            for (i, p) in self.peers.iter_mut().enumerate() {
                all.push(read_frame(
                    p,
                    &format!("all_gather: reading rank {}", i + 1),
                )?);
            }
            let mut packed = (all.len() as u64).to_le_bytes().to_vec();
            for blob in &all {
                packed.extend_from_slice(&(blob.len() as u64).to_le_bytes());
                packed.extend_from_slice(blob);
            }
            for (i, p) in self.peers.iter_mut().enumerate() {
                write_frame(p, &packed, &format!("all_gather: answering rank {}", i + 1))?;
            }
            Ok(all)
        } else {
            let p = &mut self.peers[0];
            write_frame(p, mine, "all_gather: sending to rank 0")?;
            let packed = read_frame(p, "all_gather: waiting for rank 0")?;
            unpack(&packed, self.world_size)
        }
    }

    /// Rank `root`'s blob on every rank.
    pub fn broadcast(&mut self, mine: &[u8], root: usize) -> Result<Vec<u8>> {
        let mut all = self.all_gather(if self.rank == root { mine } else { &[] })?;
        if root >= all.len() {
            return Err(fail(format!("broadcast root {root} out of {}", all.len())));
        }
        Ok(all.swap_remove(root))
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
}

fn unpack(packed: &[u8], world_size: usize) -> Result<Vec<Vec<u8>>> {
    let bad = || fail("rank 0 sent a malformed all_gather answer");
    let mut at = 0usize;
    let word = |at: &mut usize| -> Result<usize> {
        let w = packed.get(*at..*at + 8).ok_or_else(bad)?;
        *at += 8;
        Ok(u64::from_le_bytes(w.try_into().map_err(|_| bad())?) as usize)
    };
    let n = word(&mut at)?;
    if n != world_size {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = word(&mut at)?;
        out.push(packed.get(at..at + len).ok_or_else(bad)?.to_vec());
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn config_reads_torchrun_variables_and_names_what_is_wrong() {
        let t = Duration::from_secs(1);
        let ok = [
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let c = RendezvousConfig::from_lookup(lookup(&ok), t).unwrap();
        assert_eq!((c.rank, c.world_size, c.master_port), (2, 4, 29500));

        let missing = RendezvousConfig::from_lookup(lookup(&ok[..3]), t).unwrap_err();
        assert!(
            missing.to_string().contains("MASTER_PORT is not set"),
            "{missing}"
        );
        let mut bad_rank = ok;
        bad_rank[0] = ("RANK", "4");
        let e = RendezvousConfig::from_lookup(lookup(&bad_rank), t).unwrap_err();
        assert!(e.to_string().contains("not below WORLD_SIZE"), "{e}");
        let mut bad_port = ok;
        bad_port[3] = ("MASTER_PORT", "http");
        let e = RendezvousConfig::from_lookup(lookup(&bad_port), t).unwrap_err();
        assert!(e.to_string().contains("not a valid number"), "{e}");
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(unpack(&[1, 2, 3], 2).is_err());
        let mut p = 2u64.to_le_bytes().to_vec();
        p.extend_from_slice(&100u64.to_le_bytes());
        assert!(unpack(&p, 2).is_err());
        assert!(parse_hello(b"not a hello").is_none());
    }
}
