//! A `torchrun`-style rendezvous: processes find each other through rank 0's TCP address and
//! exchange small blobs (the NCCL unique id, layout fingerprints) before any collective exists.
//!
//! Configuration comes from the usual variables: `RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`. Rank 0 listens; the others connect, retrying until rank 0 is up. Every exchange
//! has a deadline (the timeout from its start) that bounds all its reads and writes together, so a
//! rank that never arrives, dies, or trickles bytes fails the others with an error instead of
//! hanging them. Connections to rank 0's port that do not open with a well-formed hello (an HTTP
//! probe, a port scan, a silent socket) are dropped and otherwise ignored.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FUSEDRV1";
/// A hello: MAGIC, then rank and world size as u64 little-endian.
const HELLO_LEN: usize = 24;
/// Larger frames are refused: rendezvous blobs are ids and fingerprints, not tensors.
const MAX_FRAME: u64 = 64 << 20;
/// Connections rank 0 keeps open while they have not yet said hello.
const MAX_PENDING: usize = 1024;
/// The largest group a rendezvous forms (rank 0 keeps a connection per rank).
pub const MAX_WORLD_SIZE: usize = 1 << 20;

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
        let config = RendezvousConfig {
            rank: number("RANK", var("RANK")?)?,
            world_size: number("WORLD_SIZE", var("WORLD_SIZE")?)?,
            master_addr: var("MASTER_ADDR")?,
            master_port: number("MASTER_PORT", var("MASTER_PORT")?)?,
            timeout,
        };
        config.validate()?;
        Ok(config)
    }

    /// Refuses a rank and world size no group can have.
    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.world_size > MAX_WORLD_SIZE {
            return Err(fail(format!(
                "WORLD_SIZE={} is not in 1..={MAX_WORLD_SIZE}",
                self.world_size
            )));
        }
        if self.rank >= self.world_size {
            return Err(fail(format!(
                "RANK={} is not below WORLD_SIZE={}",
                self.rank, self.world_size
            )));
        }
        Ok(())
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

fn timed_out(what: &str) -> Error {
    fail(format!(
        "{what}: timed out; a rank failed, stalled or never started"
    ))
}

fn io_fail(what: &str, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => timed_out(what),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => fail(
            format!("{what}: the peer closed the connection (it failed or exited)"),
        ),
        _ => fail(format!("{what}: {e}")),
    }
}

/// Time left before `deadline`, or a timeout error.
fn left(deadline: Instant, what: &str) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timed_out(what))
    } else {
        Ok(left)
    }
}

/// Fills `buf` from `s` by `deadline`, however the peer spaces its bytes.
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant, what: &str) -> Result<()> {
    let mut at = 0;
    while at < buf.len() {
        s.set_read_timeout(Some(left(deadline, what)?))
            .map_err(|e| io_fail(what, e))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(io_fail(what, ErrorKind::UnexpectedEof.into())),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_fail(what, e)),
        }
    }
    Ok(())
}

/// Writes all of `bytes` to `s` by `deadline`.
fn write_all_by(s: &mut TcpStream, bytes: &[u8], deadline: Instant, what: &str) -> Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        s.set_write_timeout(Some(left(deadline, what)?))
            .map_err(|e| io_fail(what, e))?;
        match s.write(&bytes[at..]) {
            Ok(0) => return Err(io_fail(what, ErrorKind::WriteZero.into())),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_fail(what, e)),
        }
    }
    Ok(())
}

fn write_frame(s: &mut TcpStream, bytes: &[u8], deadline: Instant, what: &str) -> Result<()> {
    write_all_by(s, &(bytes.len() as u64).to_le_bytes(), deadline, what)?;
    write_all_by(s, bytes, deadline, what)
}

fn read_frame(s: &mut TcpStream, deadline: Instant, what: &str) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    read_exact_by(s, &mut len, deadline, what)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(fail(format!(
            "{what}: a {len}-byte frame is not a rendezvous message"
        )));
    }
    let mut out = vec![0u8; len as usize];
    read_exact_by(s, &mut out, deadline, what)?;
    Ok(out)
}

/// A hello as framed on the wire.
fn hello(rank: usize, world_size: usize) -> Vec<u8> {
    let mut h = (HELLO_LEN as u64).to_le_bytes().to_vec();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&(rank as u64).to_le_bytes());
    h.extend_from_slice(&(world_size as u64).to_le_bytes());
    h
}

/// Rank and world size of a framed hello; `None` for anything else.
fn parse_hello(h: &[u8]) -> Option<(u64, u64)> {
    let word = |i: usize| Some(u64::from_le_bytes(h.get(i..i + 8)?.try_into().ok()?));
    if h.len() != 8 + HELLO_LEN || word(0)? != HELLO_LEN as u64 || &h[8..16] != MAGIC {
        return None;
    }
    Some((word(16)?, word(24)?))
}

/// A connection to rank 0 that has not yet sent a whole hello.
struct Arrival {
    stream: TcpStream,
    bytes: Vec<u8>,
}

impl Arrival {
    /// Reads what has arrived without waiting. `Ok(Some(hello))` once it is complete, `Ok(None)`
    /// while incomplete, `Err(())` when the connection is not a rank (closed, or not a hello).
    fn poll(&mut self) -> std::result::Result<Option<(u64, u64)>, ()> {
        let mut buf = [0u8; 8 + HELLO_LEN];
        let want = buf.len() - self.bytes.len();
        match self.stream.read(&mut buf[..want]) {
            Ok(0) => return Err(()),
            Ok(n) => self.bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => return Err(()),
        }
        // Refuse a stranger as soon as its first bytes show it, not at the end of the hello.
        let expected = hello(0, 0);
        let prefix = self.bytes.len().min(16);
        if self.bytes[..prefix] != expected[..prefix] {
            return Err(());
        }
        if self.bytes.len() < buf.len() {
            return Ok(None);
        }
        parse_hello(&self.bytes).map(Some).ok_or(())
    }
}

impl Rendezvous {
    /// Joins the group; returns once every rank has arrived (or with an error at the timeout).
    pub fn connect(config: &RendezvousConfig) -> Result<Self> {
        config.validate()?;
        let addr = config.address()?;
        let deadline = crate::comm::deadline(config.timeout);
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

    fn configure(s: &TcpStream) -> Result<()> {
        s.set_nonblocking(false)
            .and_then(|_| s.set_nodelay(true))
            .map_err(|e| io_fail("configuring a rendezvous socket", e))
    }

    /// Rank 0: accepts connections until every rank has said hello, ignoring strangers.
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
        let mut slots: Vec<Option<TcpStream>> = Vec::new();
        slots.resize_with(config.world_size - 1, || None);
        let mut missing = slots.len();
        let mut arrivals: Vec<Arrival> = Vec::new();
        while missing > 0 {
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
            let mut progressed = false;
            match listener.accept() {
                Ok((stream, _)) => {
                    progressed = true;
                    // A socket that cannot be made non-blocking is not worth waiting on; past
                    // a bound on open strangers, the oldest one is dropped.
                    if arrivals.len() >= MAX_PENDING {
                        arrivals.remove(0);
                    }
                    if stream.set_nonblocking(true).is_ok() {
                        arrivals.push(Arrival {
                            stream,
                            bytes: Vec::new(),
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_fail("accepting ranks", e)),
            }
            let mut i = 0;
            while i < arrivals.len() {
                let before = arrivals[i].bytes.len();
                match arrivals[i].poll() {
                    Ok(None) => {
                        progressed |= arrivals[i].bytes.len() > before;
                        i += 1;
                    }
                    Err(()) => {
                        progressed = true;
                        arrivals.swap_remove(i);
                    }
                    Ok(Some((rank, world))) => {
                        progressed = true;
                        let stream = arrivals.swap_remove(i).stream;
                        if world != config.world_size as u64 {
                            return Err(fail(format!(
                                "rank {rank} says WORLD_SIZE={world}, rank 0 says {}",
                                config.world_size
                            )));
                        }
                        let slot = usize::try_from(rank)
                            .ok()
                            .and_then(|r| r.checked_sub(1))
                            .and_then(|i| slots.get_mut(i))
                            .ok_or_else(|| fail(format!("rank {rank} is out of range")))?;
                        if slot.is_some() {
                            return Err(fail(format!("two processes claim RANK={rank}")));
                        }
                        Self::configure(&stream)?;
                        *slot = Some(stream);
                        missing -= 1;
                    }
                }
            }
            if !progressed {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let mut peers: Vec<TcpStream> = slots.into_iter().flatten().collect();
        for p in &mut peers {
            write_frame(p, MAGIC, deadline, "welcoming a rank")?;
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
        Self::configure(&s)?;
        write_all_by(
            &mut s,
            &hello(config.rank, config.world_size),
            deadline,
            "sending hello",
        )?;
        let welcome = read_frame(&mut s, deadline, "waiting for rank 0 to gather every rank")?;
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
        let deadline = crate::comm::deadline(self.timeout);
        if self.rank == 0 {
            let mut all = vec![mine.to_vec()];
            for (i, p) in self.peers.iter_mut().enumerate() {
                let what = format!("all_gather: reading rank {}", i + 1);
                all.push(read_frame(p, deadline, &what)?);
            }
            let mut packed = (all.len() as u64).to_le_bytes().to_vec();
            for blob in &all {
                packed.extend_from_slice(&(blob.len() as u64).to_le_bytes());
                packed.extend_from_slice(blob);
            }
            if packed.len() as u64 > MAX_FRAME {
                return Err(fail(format!(
                    "all_gather: {} bytes from all ranks together, over the {MAX_FRAME} a frame holds",
                    packed.len()
                )));
            }
            for (i, p) in self.peers.iter_mut().enumerate() {
                let what = format!("all_gather: answering rank {}", i + 1);
                write_frame(p, &packed, deadline, &what)?;
            }
            Ok(all)
        } else {
            let p = &mut self.peers[0];
            write_frame(p, mine, deadline, "all_gather: sending to rank 0")?;
            let packed = read_frame(p, deadline, "all_gather: waiting for rank 0")?;
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
    let take = |at: &mut usize, len: usize| -> Result<&[u8]> {
        let end = at.checked_add(len).ok_or_else(bad)?;
        let bytes = packed.get(*at..end).ok_or_else(bad)?;
        *at = end;
        Ok(bytes)
    };
    let word = |at: &mut usize| -> Result<usize> {
        let w = take(at, 8)?;
        usize::try_from(u64::from_le_bytes(w.try_into().map_err(|_| bad())?)).map_err(|_| bad())
    };
    let n = word(&mut at)?;
    if n != world_size {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = word(&mut at)?;
        out.push(take(&mut at, len)?.to_vec());
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
        assert_eq!(parse_hello(&hello(3, 5)), Some((3, 5)));
        // A length that would overflow the reader's offset.
        let mut p = 2u64.to_le_bytes().to_vec();
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(unpack(&p, 2).is_err());
    }
}
