//! The parameter server across processes (cargo feature `mpi`): rank 0 serves ([`serve`]), every
//! other rank is a worker ([`RemoteWorker`]); pulls and pushes are point-to-point messages. Or
//! sharded servers: ranks 0..S each serve one window of the parameters ([`serve_shard`], the
//! windows of a sharded group), and a worker ([`RemoteWorker::sharded`]) pulls every window and
//! pushes each window's part to its server, with Σ g² of its whole gradient so that every server
//! clips by the global norm (see `ShardedParameterServer`, the same on threads).
//!
//! Messages (the MPI tag says which): a pull carries the worker's layout fingerprint and is
//! answered with the version and the fp32 weights; a push carries the fingerprint, the version
//! it was computed from, the whole gradient's Σ g² when the servers are sharded, and the
//! gradient arena in its dtype, and is answered with what became of it; a worker that is done
//! says so. A worker whose tensors or gradient dtype differ from the
//! server's is refused ([`Error::ReplicasDiffer`]) and changes nothing, as does a push the server
//! cannot apply (the worker gets the server's error as [`Error::Communicator`]). The server serves
//! until every worker rank is done; a worker that no longer takes its answers is counted lost
//! ([`ServerStats::lost_workers`]) and the others are served on; when no message comes within the
//! communicator's timeout while some are not done, it returns [`Error::Timeout`] naming them.

use crate::arena::Arena;
use crate::comm::mpi::MpiCommunicator;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::params::ParamSet;
use crate::plan::{ShardPlan, CPU_CHUNK_ELEMS};
use crate::DType;

use super::{ParameterServer, Pushed, ServerStats};

const PULL: i32 = 1;
const WEIGHTS: i32 = 2;
const PUSH: i32 = 3;
const PUSHED: i32 = 4;
const DONE: i32 = 5;
const REFUSED: i32 = 6;
const FAILED: i32 = 7;

/// A hash of what a worker's set (or window of it) must share with the server's: tensors, offsets,
/// arena length, gradient dtype.
fn layout_fingerprint(layout: &Layout, grad_dtype: DType) -> u64 {
    let mut text = format!("{} {:?}", layout.arena_len(), grad_dtype);
    for t in layout.tensors() {
        text.push_str(&format!("|{} {:?} {}", t.name, t.shape, t.offset));
    }
    crate::parallel::fingerprint::fnv1a(text.as_bytes())
}

fn malformed(what: &str) -> Error {
    Error::Communicator(format!("malformed parameter-server message: {what}"))
}

/// The `n`-th u64 of `bytes` (little-endian).
fn word(bytes: &[u8], n: usize) -> Result<u64> {
    bytes
        .get(8 * n..8 * n + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| malformed("too short"))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serves `server` to every other rank of `comm` until each has said it is done; returns what
/// the server did. Call on rank 0.
pub fn serve(server: &ParameterServer, comm: &MpiCommunicator) -> Result<ServerStats> {
    serve_shard(server, comm, 1)
}

/// Serves one window of sharded servers: ranks 0..`servers` serve, rank r the server of window r
/// ([`ParameterServer::window`]); the other ranks are workers ([`RemoteWorker::sharded`]).
/// Returns once every worker is done.
pub fn serve_shard(
    server: &ParameterServer,
    comm: &MpiCommunicator,
    servers: usize,
) -> Result<ServerStats> {
    if comm.rank() >= servers || servers >= comm.world_size() {
        return Err(Error::Communicator(format!(
            "rank {} cannot serve one of {servers} windows to {} ranks: ranks 0..{servers} serve, \
             the others work",
            comm.rank(),
            comm.world_size()
        )));
    }
    let (fingerprint, grad_dtype, len) = server.with_optimizer(|o| {
        let p = o.params();
        Ok((
            layout_fingerprint(p.layout(), p.grad_dtype()),
            p.grad_dtype(),
            p.layout().arena_len(),
        ))
    })?;
    let mut done = vec![false; comm.world_size()];
    done[..servers].iter_mut().for_each(|d| *d = true);
    let mut lost = Vec::new();
    while done.iter().any(|d| !d) {
        let (from, tag, bytes) = comm.receive(None).map_err(|e| match e {
            Error::Timeout(why) => {
                let silent: Vec<usize> = (0..done.len()).filter(|&r| !done[r]).collect();
                Error::Timeout(format!("workers {silent:?} went silent: {why}"))
            }
            e => e,
        })?;
        if from >= done.len() {
            continue;
        }
        if tag == DONE {
            done[from] = true;
            continue;
        }
        if word(&bytes, 0).ok() != Some(fingerprint) {
            let why = "the worker's tensors or gradient dtype differ from the server's";
            if comm.send(from, REFUSED, why.as_bytes().to_vec()).is_err() {
                done[from] = true;
                lost.push(from);
            }
            continue;
        }
        let (reply_tag, reply) = match tag {
            PULL => {
                let reply = server.with_weights(|weights, version| {
                    let mut reply = version.to_le_bytes().to_vec();
                    reply.extend(f32_bytes(weights));
                    Ok(reply)
                })?;
                (WEIGHTS, reply)
            }
            PUSH => match push_of(&bytes, grad_dtype, len)
                .and_then(|(g, v, sum_sq)| server.apply(g, v, sum_sq))
            {
                Ok(pushed) => (PUSHED, encode(pushed)),
                Err(e) => (FAILED, e.to_string().into_bytes()),
            },
            _ => (REFUSED, format!("unknown message {tag}").into_bytes()),
        };
        // A worker that no longer takes its answer is gone: the others are served on.
        if comm.send(from, reply_tag, reply).is_err() {
            done[from] = true;
            lost.push(from);
        }
    }
    let mut stats = server.stats()?;
    stats.lost_workers = lost;
    Ok(stats)
}

/// A push's gradients (widened to f32), the version they were computed from, and the whole
/// gradient's Σ g² when the worker sent it.
fn push_of(bytes: &[u8], dtype: DType, len: usize) -> Result<(Vec<f32>, u64, Option<f64>)> {
    let pulled = word(bytes, 1)?;
    let sum_sq = match word(bytes, 2)? {
        0 => None,
        _ => Some(f64::from_bits(word(bytes, 3)?)),
    };
    let payload = &bytes[32.min(bytes.len())..];
    if payload.len() != len * dtype.size_bytes() {
        return Err(malformed("gradients of the wrong size"));
    }
    let mut arena = Arena::filled(dtype, len, 0.0)?;
    arena.write_bytes(0, payload);
    Ok((arena.to_f32(0..len), pulled, sum_sq))
}

fn encode(p: Pushed) -> Vec<u8> {
    let (kind, version, staleness, factor) = match p {
        Pushed::Applied {
            version,
            staleness,
            factor,
        } => (0u64, version, staleness, factor),
        Pushed::Skipped { staleness } => (1, 0, staleness, 0.0),
        Pushed::Refused { staleness } => (2, 0, staleness, 0.0),
    };
    let mut out = Vec::with_capacity(36);
    for w in [kind, version, staleness] {
        out.extend(w.to_le_bytes());
    }
    out.extend(factor.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Result<Pushed> {
    let (kind, version, staleness) = (word(bytes, 0)?, word(bytes, 1)?, word(bytes, 2)?);
    let factor = bytes
        .get(24..28)
        .and_then(|b| b.try_into().ok())
        .map(f32::from_le_bytes)
        .ok_or_else(|| malformed("no factor"))?;
    match kind {
        0 => Ok(Pushed::Applied {
            version,
            staleness,
            factor,
        }),
        1 => Ok(Pushed::Skipped { staleness }),
        2 => Ok(Pushed::Refused { staleness }),
        _ => Err(malformed("unknown outcome")),
    }
}

/// A worker in another process than the server(s): its own parameter set (host memory, built
/// like the server's), pulled and pushed over MPI.
#[derive(Debug)]
pub struct RemoteWorker<'c> {
    comm: &'c MpiCommunicator,
    set: ParamSet,
    /// One per server rank (0, 1, ...): the part of the arena its window holds, that window's
    /// length and fingerprint, and the version last pulled from it.
    servers: Vec<Link>,
}

#[derive(Debug)]
struct Link {
    part: std::ops::Range<usize>,
    window_len: usize,
    fingerprint: u64,
    version: u64,
}

impl<'c> RemoteWorker<'c> {
    /// A worker of the one server on rank 0, over `set` (the same tensors and gradient dtype as
    /// the server's, checked at every message), not yet pulled.
    pub fn new(comm: &'c MpiCommunicator, set: ParamSet) -> Result<Self> {
        Self::sharded(comm, set, 1)
    }

    /// A worker of sharded servers on ranks 0..`servers` ([`serve_shard`]), not yet pulled.
    pub fn sharded(comm: &'c MpiCommunicator, set: ParamSet, servers: usize) -> Result<Self> {
        if servers == 0 || comm.rank() < servers || comm.rank() >= comm.world_size() {
            return Err(Error::Communicator(format!(
                "ranks 0..{servers} serve; workers are the other ranks, not rank {}",
                comm.rank()
            )));
        }
        // The servers tell workers apart by rank: one worker per communicator at a time.
        if !comm.claim_worker() {
            return Err(Error::Communicator(
                "this communicator already has a parameter-server worker".into(),
            ));
        }
        let (layout, dtype) = (set.layout().clone(), set.grad_dtype());
        let len = layout.arena_len();
        let links = match servers {
            1 => vec![Link {
                part: 0..len,
                window_len: len,
                fingerprint: layout_fingerprint(&layout, dtype),
                version: 0,
            }],
            _ => {
                let plan = ShardPlan::new(len, servers);
                (0..servers)
                    .map(|r| {
                        let w = plan.window(r);
                        Link {
                            part: w.start.min(len)..w.end.min(len),
                            window_len: w.len(),
                            fingerprint: layout_fingerprint(&layout.window(w), dtype),
                            version: 0,
                        }
                    })
                    .collect()
            }
        };
        Ok(RemoteWorker {
            comm,
            set,
            servers: links,
        })
    }

    pub fn params(&self) -> &ParamSet {
        &self.set
    }

    pub fn params_mut(&mut self) -> &mut ParamSet {
        &mut self.set
    }

    /// The version of the weights this worker holds (with sharded servers, the oldest window's).
    pub fn version(&self) -> u64 {
        self.servers.iter().map(|l| l.version).min().unwrap_or(0)
    }

    /// The version of each window this worker holds, by server rank.
    pub fn versions(&self) -> Vec<u64> {
        self.servers.iter().map(|l| l.version).collect()
    }

    /// Server `server`'s answer of kind `want`, or its refusal as an error.
    fn answer(&self, server: usize, want: i32) -> Result<Vec<u8>> {
        let (_, tag, bytes) = self.comm.receive(Some(server))?;
        match tag {
            t if t == want => Ok(bytes),
            REFUSED => Err(Error::ReplicasDiffer {
                what: format!(
                    "the parameter server refused: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            }),
            FAILED => Err(Error::Communicator(format!(
                "the parameter server could not apply the push (nothing changed): {}",
                String::from_utf8_lossy(&bytes)
            ))),
            t => Err(malformed(&format!("answer {t} to request {want}"))),
        }
    }

    /// Copies the servers' current weights here (every request sent, then every answer read);
    /// returns [`RemoteWorker::version`].
    pub fn pull(&mut self) -> Result<u64> {
        for (r, link) in self.servers.iter().enumerate() {
            self.comm
                .send(r, PULL, link.fingerprint.to_le_bytes().to_vec())?;
        }
        for r in 0..self.servers.len() {
            let bytes = self.answer(r, WEIGHTS)?;
            let version = word(&bytes, 0)?;
            let link = &mut self.servers[r];
            let weights: Vec<f32> = bytes[8..]
                .chunks_exact(4)
                .take(link.part.len())
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if weights.len() != link.part.len() {
                return Err(malformed("too few weights"));
            }
            self.set.write_masters(link.part.start, &weights)?;
            link.version = version;
        }
        Ok(self.version())
    }

    /// Sends this worker's gradients, computed from the weights it holds, to the server; what
    /// became of them. With sharded servers: applied only if every server applied its part (at
    /// the oldest new version), else the first refusal or skip.
    pub fn push(&mut self) -> Result<Pushed> {
        let all = self.push_shards()?;
        let applied = all.iter().all(|p| matches!(p, Pushed::Applied { .. }));
        Ok(match applied {
            true => all
                .iter()
                .copied()
                .min_by_key(|p| match p {
                    Pushed::Applied { version, .. } => *version,
                    _ => u64::MAX,
                })
                .unwrap_or(Pushed::Refused { staleness: 0 }),
            false => all
                .iter()
                .copied()
                .find(|p| !matches!(p, Pushed::Applied { .. }))
                .unwrap_or(Pushed::Refused { staleness: 0 }),
        })
    }

    /// [`RemoteWorker::push`], with what became of it at each server, by server rank.
    pub fn push_shards(&mut self) -> Result<Vec<Pushed>> {
        let len = self.set.layout().arena_len();
        let grads = self.set.grads_arena()?;
        let size = grads.dtype().size_bytes();
        let sum_sq = (self.servers.len() > 1).then(|| {
            crate::host::kernels::sum_of_squares_in_chunks(&grads.to_f32(0..len), CPU_CHUNK_ELEMS)
        });
        for (r, link) in self.servers.iter().enumerate() {
            let mut message = link.fingerprint.to_le_bytes().to_vec();
            message.extend(link.version.to_le_bytes());
            message.extend(u64::from(sum_sq.is_some()).to_le_bytes());
            message.extend(sum_sq.unwrap_or(0.0).to_bits().to_le_bytes());
            message.extend_from_slice(grads.bytes(link.part.clone()));
            // A window past the arena's end is padding: zeros.
            message.resize(
                message.len() + (link.window_len - link.part.len()) * size,
                0,
            );
            self.comm.send(r, PUSH, message)?;
        }
        (0..self.servers.len())
            .map(|r| decode(&self.answer(r, PUSHED)?))
            .collect()
    }

    /// Tells the servers this worker is done; each returns once every worker has.
    pub fn finish(self) -> Result<()> {
        (0..self.servers.len()).try_for_each(|r| self.comm.send(r, DONE, Vec::new()))
    }
}

impl Drop for RemoteWorker<'_> {
    fn drop(&mut self) {
        self.comm.release_worker();
    }
}
