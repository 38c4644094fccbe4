//! What a sharded group (`parallel::sharded`) needs of an optimizer beyond its public step: the
//! norm's per-chunk partial sums of its window, a step that takes the whole group's norm, and the
//! parameter set back without its engine.

use super::{no_engine, Optimizer};
use crate::comm::DeviceBuffer;
use crate::error::{Error, Result};
use crate::params::{ParamSet, Storage};

/// Where a step's Σ g² comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Norm {
    /// The optimizer's own gradients (an unsharded step).
    Own,
    /// Given by the caller: a sharded group on the CPU engine summed every window's partials.
    Given(f64),
    /// On the device: every window's partials, gathered into the engine
    /// ([`Optimizer::chunk_partials`]).
    Gathered,
}

impl Norm {
    /// The CPU engine's form: Σ g² when the caller gives it.
    pub(crate) fn given(self) -> Result<Option<f64>> {
        match self {
            Norm::Own => Ok(None),
            Norm::Given(s) => Ok(Some(s)),
            Norm::Gathered => Err(Error::Communicator(
                "internal: the CPU engine takes a sharded norm as a number".into(),
            )),
        }
    }

    /// The CUDA engine's form: whether the partials were gathered into it.
    pub(crate) fn gathered(self) -> Result<bool> {
        match self {
            Norm::Own => Ok(false),
            Norm::Gathered => Ok(true),
            Norm::Given(_) => Err(Error::Communicator(
                "internal: the CUDA engine takes a sharded norm as gathered partials".into(),
            )),
        }
    }
}

/// The partials of a window's chunks, on the host or lent on the device for an all-gather.
pub(crate) enum Partials<'a> {
    Host(Vec<f64>),
    /// This window's partials, and the buffer every window's land in (in rank order).
    Device(DeviceBuffer<'a>, DeviceBuffer<'a>),
}

impl Optimizer {
    /// The partial Σ g² of each chunk of this optimizer's plan, in chunk order, when its step
    /// needs the norm (`None` when it does not). On a GPU, they are enqueued and lent with a
    /// buffer for `world` windows' partials.
    pub(crate) fn chunk_partials(&mut self, world: usize) -> Result<Option<Partials<'_>>> {
        match self.params.storage_mut() {
            Storage::Host(h) => {
                let engine = h.engine.as_deref_mut().ok_or_else(no_engine)?;
                Ok(engine
                    .needs_norm()
                    .then(|| Partials::Host(engine.chunk_sums_of_squares(&h.arenas))))
            }
            Storage::Cuda(d) => {
                let d = &mut **d;
                let engine = d.engine.as_deref_mut().ok_or_else(no_engine)?;
                Ok(engine
                    .shard_partials(&d.arenas, world)?
                    .map(|(mine, all)| Partials::Device(mine, all)))
            }
        }
    }

    /// The parameter set, without this optimizer's engine and state (to build another optimizer
    /// over it, or to hand it to a worker of a parameter server).
    pub fn into_params(mut self) -> ParamSet {
        match self.params.storage_mut() {
            Storage::Host(h) => h.engine = None,
            Storage::Cuda(d) => d.engine = None,
        }
        self.params
    }
}
