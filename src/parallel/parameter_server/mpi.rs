//! The parameter server across processes (cargo feature `mpi`): rank 0 serves ([`serve`]), every
//! other rank is a worker ([`RemoteWorker`]); pulls and pushes are point-to-point messages.
//!
//! Messages (the MPI tag says which): a pull carries the worker's layout fingerprint and is
//! answered with the version and the fp32 weights; a push carries the fingerprint, the version
//! it was computed from and the gradient arena in its dtype, and is answered with what became of
//! it; a worker that is done says so. A worker whose tensors or gradient dtype differ from the
//! server's is refused ([`Error::ReplicasDiffer`]) and changes nothing, as does a push the server
//! cannot apply (the worker gets the server's error as [`Error::Communicator`]). The server serves
//! until every worker rank is done; a worker that no longer takes its answers is counted lost
//! ([`ServerStats::lost_workers`]) and the others are served on; when no message comes within the
//! communicator's timeout while some are not done, it returns [`Error::Timeout`] naming them.

use crate::arena::Arena;
use crate::comm::mpi::MpiCommunicator;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::params::ParamSet;

use super::{ParameterServer, Pushed, ServerStats};

const PULL: i32 = 1;
const WEIGHTS: i32 = 2;
const PUSH: i32 = 3;
const PUSHED: i32 = 4;
const DONE: i32 = 5;
const REFUSED: i32 = 6;
const FAILED: i32 = 7;

/// The rank that serves.
const SERVER: usize = 0;

/// A hash of what a worker's set must share with the server's: tensors, offsets, arena length,
/// gradient dtype.
fn layout_fingerprint(set: &ParamSet) -> u64 {
    let layout = set.layout();
    let mut text = format!("{} {:?}", layout.arena_len(), set.grad_dtype());
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
    if comm.rank() != SERVER {
        return Err(Error::Communicator(format!(
            "rank {} cannot serve: rank {SERVER} serves",
            comm.rank()
        )));
    }
    let fingerprint = server.with_optimizer(|o| Ok(layout_fingerprint(o.params())))?;
    let (grad_dtype, len) = server.with_optimizer(|o| {
        let p = o.params();
        Ok((p.grad_dtype(), p.layout().arena_len()))
    })?;
    let mut done = vec![false; comm.world_size()];
    done[SERVER] = true;
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
            PUSH => match push_of(&bytes, grad_dtype, len).and_then(|(g, v)| server.apply(g, v)) {
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

/// A push's gradients (widened to f32) and the version they were computed from.
fn push_of(bytes: &[u8], dtype: crate::DType, len: usize) -> Result<(Vec<f32>, u64)> {
    let pulled = word(bytes, 1)?;
    let payload = &bytes[16.min(bytes.len())..];
    if payload.len() != len * dtype.size_bytes() {
        return Err(malformed("gradients of the wrong size"));
    }
    let mut arena = Arena::filled(dtype, len, 0.0)?;
    arena.write_bytes(0, payload);
    Ok((arena.to_f32(0..len), pulled))
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

/// A worker in another process than the server: its own parameter set (host memory, built like
/// the server's), pulled and pushed over MPI.
#[derive(Debug)]
pub struct RemoteWorker<'c> {
    comm: &'c MpiCommunicator,
    set: ParamSet,
    version: u64,
    fingerprint: u64,
}

impl<'c> RemoteWorker<'c> {
    /// A worker over `set` (the same tensors and gradient dtype as the server's, checked at
    /// every message), not yet pulled.
    pub fn new(comm: &'c MpiCommunicator, set: ParamSet) -> Result<Self> {
        if comm.rank() == SERVER {
            return Err(Error::Communicator(format!(
                "rank {SERVER} serves; workers are the other ranks"
            )));
        }
        // The server tells workers apart by rank: one worker per communicator at a time.
        if !comm.claim_worker() {
            return Err(Error::Communicator(
                "this communicator already has a parameter-server worker".into(),
            ));
        }
        let fingerprint = layout_fingerprint(&set);
        Ok(RemoteWorker {
            comm,
            set,
            version: 0,
            fingerprint,
        })
    }

    pub fn params(&self) -> &ParamSet {
        &self.set
    }

    pub fn params_mut(&mut self) -> &mut ParamSet {
        &mut self.set
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The server's answer of kind `want`, or its refusal as an error.
    fn answer(&self, want: i32) -> Result<Vec<u8>> {
        let (_, tag, bytes) = self.comm.receive(Some(SERVER))?;
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

    /// Copies the server's current weights here; returns their version.
    pub fn pull(&mut self) -> Result<u64> {
        self.comm
            .send(SERVER, PULL, self.fingerprint.to_le_bytes().to_vec())?;
        let bytes = self.answer(WEIGHTS)?;
        let version = word(&bytes, 0)?;
        let weights: Vec<f32> = bytes[8..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        self.set.restore_masters(&weights)?;
        self.version = version;
        Ok(version)
    }

    /// Sends this worker's gradients, computed from the weights it holds, to the server.
    pub fn push(&mut self) -> Result<Pushed> {
        let len = self.set.layout().arena_len();
        let mut message = self.fingerprint.to_le_bytes().to_vec();
        message.extend(self.version.to_le_bytes());
        message.extend_from_slice(self.set.grads_arena()?.bytes(0..len));
        self.comm.send(SERVER, PUSH, message)?;
        decode(&self.answer(PUSHED)?)
    }

    /// Tells the server this worker is done; the server returns once every worker has.
    pub fn finish(self) -> Result<()> {
        self.comm.send(SERVER, DONE, Vec::new())
    }
}

impl Drop for RemoteWorker<'_> {
    fn drop(&mut self) {
        self.comm.release_worker();
    }
}
