//! Sharded parameter servers: several servers, each holding one window of the parameters (the
//! windows of a sharded group, [`ShardPlan`]) with its optimizer state, so each server's memory
//! and work are the whole's ÷ N. A worker pulls every window and pushes each window's part of its
//! gradients to that window's server.
//!
//! Each server decides on its own part of a push, its staleness counted against its own version,
//! as TensorFlow's parameter servers do: under a bounded policy one server may refuse what another
//! applies. A push carries Σ g² of the worker's whole gradient, added as the CPU engine adds it, so
//! every server clips by the global norm (times its own down-weighting factor squared): with one
//! worker, or any policy that does not scale, the servers together step bit for bit as one
//! server would.

use std::ops::Range;
use std::sync::Arc;

use super::{worker_set, ParameterServer, Pushed, ServerStats, Staleness};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::parallel::sharded::cut_shard;
use crate::params::ParamSet;
use crate::plan::{ShardPlan, CPU_CHUNK_ELEMS};
use crate::Optimizer;

impl ParameterServer {
    /// The server of window `index` of `servers` over `optimizer`'s parameters and state (cut as
    /// a sharded group cuts them): one of a [`ShardedParameterServer`]'s, or what rank `index`
    /// serves across processes (`mpi::serve_shard`).
    pub fn window(
        optimizer: &Optimizer,
        servers: usize,
        index: usize,
        staleness: Staleness,
    ) -> Result<Self> {
        if index >= servers {
            return Err(Error::Communicator(format!(
                "window {index} of {servers} does not exist"
            )));
        }
        let plan = ShardPlan::new(optimizer.params().layout().arena_len(), servers);
        ParameterServer::new(cut_shard(optimizer, &plan, index)?, staleness)
    }
}

/// The servers of one set of parameters, one window each.
#[derive(Debug)]
pub struct ShardedParameterServer {
    servers: Vec<ParameterServer>,
    plan: ShardPlan,
    whole: Arc<Layout>,
    grad_dtype: crate::DType,
}

impl ShardedParameterServer {
    /// `servers` servers over `optimizer`'s parameters and state, cut into windows.
    pub fn new(optimizer: Optimizer, servers: usize, staleness: Staleness) -> Result<Self> {
        if servers == 0 {
            return Err(Error::Communicator(
                "a sharded parameter server needs a server".into(),
            ));
        }
        let whole = optimizer.params().layout().clone();
        let grad_dtype = optimizer.params().grad_dtype();
        let plan = ShardPlan::new(whole.arena_len(), servers);
        let servers = (0..servers)
            .map(|r| ParameterServer::window(&optimizer, servers, r, staleness))
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardedParameterServer {
            servers,
            plan,
            whole,
            grad_dtype,
        })
    }

    /// The servers, in window order (each a [`ParameterServer`] over its window).
    pub fn servers(&self) -> &[ParameterServer] {
        &self.servers
    }

    pub fn plan(&self) -> ShardPlan {
        self.plan
    }

    /// Every server's counts, in window order.
    pub fn stats(&self) -> Result<Vec<ServerStats>> {
        self.servers.iter().map(ParameterServer::stats).collect()
    }

    /// A worker with the whole set's weights, pulled from every server.
    pub fn worker(&self) -> Result<ShardedWorker<'_>> {
        let len = self.whole.arena_len();
        let weights = crate::arena::try_filled(len, 0.0f32)?;
        let mut w = ShardedWorker {
            server: self,
            set: worker_set(self.whole.clone(), weights, self.grad_dtype)?,
            versions: vec![0; self.servers.len()],
        };
        w.pull()?;
        Ok(w)
    }

    /// Window `r`'s part of the whole arena (empty for a window of padding only).
    fn part(&self, r: usize) -> Range<usize> {
        let w = self.plan.window(r);
        let len = self.whole.arena_len();
        w.start.min(len)..w.end.min(len)
    }
}

/// One worker of a [`ShardedParameterServer`]: the whole set's weights as last pulled from each
/// server, and the gradients it writes.
#[derive(Debug)]
pub struct ShardedWorker<'s> {
    server: &'s ShardedParameterServer,
    set: ParamSet,
    versions: Vec<u64>,
}

impl ShardedWorker<'_> {
    pub fn params(&self) -> &ParamSet {
        &self.set
    }

    /// To write this worker's gradients ([`ParamSet::set_grad`]).
    pub fn params_mut(&mut self) -> &mut ParamSet {
        &mut self.set
    }

    /// The version of each window this worker holds, in window order.
    pub fn versions(&self) -> &[u64] {
        &self.versions
    }

    /// Copies every server's current window here, one server at a time.
    pub fn pull(&mut self) -> Result<()> {
        for (r, server) in self.server.servers.iter().enumerate() {
            let part = self.server.part(r);
            let set = &mut self.set;
            self.versions[r] = server.with_weights(|weights, version| {
                set.write_masters(part.start, &weights[..part.len()])?;
                Ok(version)
            })?;
        }
        Ok(())
    }

    /// Sends each window's part of this worker's gradients to its server, with Σ g² of the
    /// whole; what became of the push at each server, in window order.
    pub fn push(&mut self) -> Result<Vec<Pushed>> {
        let len = self.set.layout().arena_len();
        let grads = self.set.grads_arena()?.to_f32(0..len);
        let sum_sq = crate::host::kernels::sum_of_squares_in_chunks(&grads, CPU_CHUNK_ELEMS);
        let window_len = self.server.plan.window_len;
        (0..self.server.servers.len())
            .map(|r| {
                let part = self.server.part(r);
                let mut mine = crate::arena::try_filled(window_len, 0.0f32)?;
                mine[..part.len()].copy_from_slice(&grads[part.clone()]);
                self.server.servers[r].apply(mine, self.versions[r], Some(sum_sq))
            })
            .collect()
    }
}
