//! What a sharded group (`parallel::sharded`) needs of an optimizer beyond its public
//! step: the norm's per-chunk partial sums, and the parameter set back without its engine.

use super::{no_engine, Optimizer};
use crate::error::{Error, Result};
use crate::params::{ParamSet, Storage};

impl Optimizer {
    /// Σ g² of each chunk of this optimizer's plan, in chunk order, when its step needs the norm
    /// (`None` when it does not). The CPU engine only: GPU shards are not built.
    pub(crate) fn chunk_sums_of_squares(&mut self) -> Result<Option<Vec<f64>>> {
        match self.params.storage_mut() {
            Storage::Host(h) => {
                let engine = h.engine.as_deref_mut().ok_or_else(no_engine)?;
                Ok(engine
                    .needs_norm()
                    .then(|| engine.chunk_sums_of_squares(&h.arenas)))
            }
            Storage::Cuda(_) => Err(shards_on_gpu()),
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

/// Sharded state runs on the CPU engine only for now.
pub(crate) fn shards_on_gpu() -> Error {
    Error::Communicator(
        "sharded optimizer state runs on the CPU engine; GPU shards are not built yet".into(),
    )
}
