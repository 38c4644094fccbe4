//! Asynchronous SGD with a parameter server (TensorFlow's `ParameterServerStrategy`): one server
//! holds the parameters and the fused optimizer; workers pull the weights, compute gradients and
//! push them without waiting for each other; the server applies each push with one fused step, in
//! the order pushes arrive.
//!
//! Each applied step makes a new version of the weights. A gradient computed from weights `s`
//! versions old has staleness `s`; [`Staleness`] says whether such a gradient is applied, scaled
//! down (by 1/(1+s), as in staleness-aware async SGD, Zhang et al. 2016) or refused (the worker
//! pulls again). Pulls and pushes are serialized by the server: a pull never sees a half-applied
//! step, and a push that fails (a refused gradient, non-finite gradients under
//! [`crate::NonFinitePolicy::Error`]) changes nothing. Workers are threads of this process
//! ([`Worker`]) or, with the cargo feature `mpi`, other processes (`mpi::serve` and
//! `mpi::RemoteWorker`); a worker that fails or stops only stops pushing. The parameters can also
//! be spread over several servers, one window each ([`ShardedParameterServer`], and
//! `mpi::serve_shard` across processes).

#[cfg(feature = "mpi")]
pub mod mpi;
mod sharded;

pub use sharded::{ShardedParameterServer, ShardedWorker};

use std::sync::{Mutex, MutexGuard};

use crate::arena::Arena;
use crate::comm::Buffer;
use crate::error::{Error, Result};
use crate::host::{HostArenas, HostStorage};
use crate::masters::HostMasters;
use crate::optim::Norm;
use crate::params::{ParamSet, Storage};
use crate::Optimizer;

/// What the server does with a gradient computed from old weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staleness {
    /// Every gradient is applied as it is, however old.
    Unbounded,
    /// A gradient more than `max` versions old is refused.
    Bounded { max: u64 },
    /// A gradient `s` versions old is scaled by 1/(1+s); one more than `max` old is refused.
    DownWeighted { max: u64 },
}

impl Staleness {
    /// The factor a gradient of staleness `s` is applied with, or `None` when it is refused.
    pub fn factor(&self, s: u64) -> Option<f32> {
        match *self {
            Staleness::Unbounded => Some(1.0),
            Staleness::Bounded { max } => (s <= max).then_some(1.0),
            Staleness::DownWeighted { max } => (s <= max).then(|| 1.0 / (1.0 + s as f32)),
        }
    }
}

/// What became of one push.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pushed {
    /// Applied with `factor`, making weights version `version`.
    Applied {
        version: u64,
        staleness: u64,
        factor: f32,
    },
    /// Non-finite gradients: the step was skipped (the optimizer's policy), nothing changed.
    Skipped { staleness: u64 },
    /// Too old for the staleness policy: nothing changed; pull and compute again.
    Refused { staleness: u64 },
}

/// Counts of what the server did with its pushes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerStats {
    pub pushes: u64,
    pub applied: u64,
    pub skipped: u64,
    pub refused: u64,
    /// `staleness[s]`: pushes of staleness `s` (the last entry counts every staleness past it).
    pub staleness: Vec<u64>,
    pub max_staleness: u64,
    /// Ranks of workers in other processes that stopped taking the server's answers.
    pub lost_workers: Vec<usize>,
}

impl ServerStats {
    /// Staleness histogram length: the last bucket collects everything from here on.
    const BUCKETS: usize = 33;

    fn count(&mut self, s: u64) {
        if self.staleness.is_empty() {
            self.staleness = vec![0; Self::BUCKETS];
        }
        let i = (s as usize).min(Self::BUCKETS - 1);
        self.staleness[i] += 1;
        self.max_staleness = self.max_staleness.max(s);
        self.pushes += 1;
    }

    /// The mean staleness of all pushes (the histogram's last bucket counted at its bound).
    pub fn mean_staleness(&self) -> f64 {
        let n: u64 = self.staleness.iter().sum();
        let total: u64 = self
            .staleness
            .iter()
            .enumerate()
            .map(|(s, &c)| s as u64 * c)
            .sum();
        total as f64 / n.max(1) as f64
    }
}

#[derive(Debug)]
struct Served {
    optimizer: Optimizer,
    version: u64,
    stats: ServerStats,
}

/// The server: the parameters and their fused optimizer, shared by workers. Workers hold host
/// copies; the server reads and writes its set through the device-agnostic paths, but only the
/// CPU engine is tested as a server so far.
#[derive(Debug)]
pub struct ParameterServer {
    served: Mutex<Served>,
    staleness: Staleness,
}

impl ParameterServer {
    pub fn new(optimizer: Optimizer, staleness: Staleness) -> Result<Self> {
        let version = optimizer.step_count()?;
        Ok(ParameterServer {
            served: Mutex::new(Served {
                optimizer,
                version,
                stats: ServerStats::default(),
            }),
            staleness,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Served>> {
        self.served
            .lock()
            .map_err(|_| Error::Communicator("parameter server poisoned by a panic".into()))
    }

    /// A worker: a host copy of the weights (fp32) and a gradient arena in the server's
    /// gradient dtype, pulled at the current version.
    pub fn worker(&self) -> Result<Worker<'_>> {
        let served = self.lock()?;
        let set = served.optimizer.params();
        let weights = set.masters_snapshot()?.into_owned();
        Ok(Worker {
            server: self,
            set: worker_set(set.layout().clone(), weights, set.grad_dtype())?,
            version: served.version,
        })
    }

    /// The current version of the weights: the steps applied so far.
    pub fn version(&self) -> Result<u64> {
        Ok(self.lock()?.version)
    }

    pub fn stats(&self) -> Result<ServerStats> {
        Ok(self.lock()?.stats.clone())
    }

    /// Runs `f` on the server's optimizer (to read it, save a checkpoint, set the lr), with
    /// every pull and push waiting meanwhile.
    pub fn with_optimizer<R>(&self, f: impl FnOnce(&mut Optimizer) -> Result<R>) -> Result<R> {
        let mut served = self.lock()?;
        let out = f(&mut served.optimizer);
        // A checkpoint loaded here moves the version to its step count.
        served.version = served.optimizer.step_count()?;
        out
    }

    pub fn into_optimizer(self) -> Result<Optimizer> {
        self.served
            .into_inner()
            .map(|s| s.optimizer)
            .map_err(|_| Error::Communicator("parameter server poisoned by a panic".into()))
    }

    /// Runs `f` on the weights (fp32, borrowed where the server keeps them so) and their
    /// version, with pushes waiting meanwhile.
    fn with_weights<R>(&self, f: impl FnOnce(&[f32], u64) -> Result<R>) -> Result<R> {
        let served = self.lock()?;
        f(
            &served.optimizer.params().masters_snapshot()?,
            served.version,
        )
    }

    /// Applies `grads` (the whole arena, f32), computed from weights version `pulled`; with
    /// `sum_sq`, the step clips by that Σ g² (a sharded server's: the worker's whole gradient's)
    /// times the staleness factor squared instead of its own gradients'.
    fn apply(&self, mut grads: Vec<f32>, pulled: u64, sum_sq: Option<f64>) -> Result<Pushed> {
        let mut served = self.lock()?;
        let staleness = served.version.saturating_sub(pulled);
        let Some(factor) = self.staleness.factor(staleness) else {
            served.stats.count(staleness);
            served.stats.refused += 1;
            return Ok(Pushed::Refused { staleness });
        };
        if factor != 1.0 {
            grads.iter_mut().for_each(|g| *g *= factor);
        }
        let Served {
            optimizer, stats, ..
        } = &mut *served;
        {
            let len = optimizer.params().layout().arena_len();
            crate::error::check_len("pushed gradients", len, grads.len())?;
            let (_, mut pieces) = optimizer.set_mut().grad_buffers_mut(&[len])?;
            let buffer: &mut Buffer<'_> = pieces
                .first_mut()
                .ok_or_else(|| Error::Communicator("no gradient arena".into()))?;
            buffer.write_range(0, &grads)?;
        }
        match sum_sq {
            None => optimizer.step()?,
            Some(s) => {
                optimizer.apply_schedule()?;
                let f = f64::from(factor);
                optimizer.step_at_current_lr(Norm::Given(s * f * f))?;
            }
        }
        let report = optimizer.report()?;
        stats.count(staleness);
        if report.skipped {
            stats.skipped += 1;
            return Ok(Pushed::Skipped { staleness });
        }
        stats.applied += 1;
        served.version = report.step;
        Ok(Pushed::Applied {
            version: report.step,
            staleness,
            factor,
        })
    }
}

/// A worker's parameter set: host memory, fp32 `weights`, gradients in `grad_dtype`.
fn worker_set(
    layout: std::sync::Arc<crate::layout::Layout>,
    weights: Vec<f32>,
    grad_dtype: crate::DType,
) -> Result<ParamSet> {
    let len = layout.arena_len();
    let storage = Storage::Host(HostStorage {
        arenas: HostArenas {
            masters: HostMasters::F32(weights),
            grads: Arena::filled(grad_dtype, len, 0.0)?,
            model: None,
        },
        engine: None,
    });
    Ok(ParamSet::from_parts(layout, storage))
}

/// One worker of a [`ParameterServer`]: its own copy of the weights, as last pulled, and the
/// gradients it writes.
#[derive(Debug)]
pub struct Worker<'s> {
    server: &'s ParameterServer,
    set: ParamSet,
    version: u64,
}

impl Worker<'_> {
    /// The weights as last pulled, and this worker's gradients.
    pub fn params(&self) -> &ParamSet {
        &self.set
    }

    /// To write this worker's gradients ([`ParamSet::set_grad`]).
    pub fn params_mut(&mut self) -> &mut ParamSet {
        &mut self.set
    }

    /// The version of the weights this worker holds.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Copies the server's current weights here; returns their version.
    pub fn pull(&mut self) -> Result<u64> {
        let set = &mut self.set;
        self.version = self.server.with_weights(|weights, version| {
            set.restore_masters(weights)?;
            Ok(version)
        })?;
        Ok(self.version)
    }

    /// Sends this worker's gradients, computed from the weights it holds, to the server.
    pub fn push(&mut self) -> Result<Pushed> {
        let len = self.set.layout().arena_len();
        let grads = self.set.grads_arena()?.to_f32(0..len);
        self.server.apply(grads, self.version, None)
    }
}
