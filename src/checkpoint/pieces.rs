//! A parameter set's tensors gathered from wherever they are stored — an optimizer in memory, a
//! whole checkpoint, or the files of a sharded one, each holding a piece of every tensor — and cut
//! again into the pieces another optimizer holds (one shard of any rank count, or the whole set).
//! Quantized state is cut as stored (codes and block scales): shards start on block boundaries.

use std::collections::HashMap;
use std::ops::Range;

use super::{state_parts, Part};
use crate::arena::try_to_vec;
use crate::error::{Error, Result};
use crate::host::state::StateBuffers;
use crate::layout::Layout;
use crate::optim::{Optimizer, Restore, Saved};
use crate::schedule::LrSchedule;

/// `len` elements of a whole tensor from element `start` on, as `bytes`.
struct Piece<'a> {
    start: usize,
    len: usize,
    bytes: &'a [u8],
}

/// Every stored part (`param/<name>`, `state/<buffer>/<name>`, `scale/<buffer>/<name>`) of a
/// parameter set, each as the pieces its sources hold.
#[derive(Default)]
pub(crate) struct Pieces<'a> {
    by_name: HashMap<String, Vec<Piece<'a>>>,
}

impl<'a> Pieces<'a> {
    /// Adds the parts of a set laid out as `layout` (whole, or one shard's window), found by
    /// `lookup`; a part `lookup` does not know is skipped (the read that needs it fails).
    pub(crate) fn add(
        &mut self,
        layout: &Layout,
        buffers: &[&str],
        lookup: impl Fn(&str) -> Option<&'a [u8]>,
    ) {
        for t in layout.tensors().iter().filter(|t| t.len > 0) {
            let mut names = vec![format!("param/{}", t.name)];
            for b in buffers {
                names.push(format!("state/{b}/{}", t.name));
                names.push(format!("scale/{b}/{}", t.name));
            }
            for name in names {
                if let Some(bytes) = lookup(&name) {
                    self.by_name.entry(name).or_default().push(Piece {
                        start: t.part_start,
                        len: t.len,
                        bytes,
                    });
                }
            }
        }
    }

    /// The bytes of elements `range` of the whole tensor part `name`, `expected` of them, put
    /// together from the pieces that hold them.
    fn read(&self, name: &str, range: Range<usize>, expected: usize) -> Result<Vec<u8>> {
        let missing = || Error::Communicator(format!("no stored piece holds '{name}' {range:?}"));
        let pieces = self.by_name.get(name).ok_or_else(missing)?;
        let mut out = Vec::new();
        out.try_reserve_exact(expected)
            .map_err(|_| Error::OutOfHostMemory { bytes: expected })?;
        let mut at = range.start;
        while at < range.end {
            let p = pieces
                .iter()
                .find(|p| p.start <= at && at < p.start + p.len)
                .ok_or_else(missing)?;
            let stop = range.end.min(p.start + p.len);
            // Bytes per element as the piece stores them (codes: a half or one; scales: one
            // f32 per block); pieces start and end on block boundaries.
            // In u128: elements × bytes overflows usize for pieces past a few billion elements.
            let scaled = |e: usize| (e - p.start) as u128 * p.bytes.len() as u128;
            let byte = |e: usize| (scaled(e) / p.len as u128) as usize;
            let exact = |e: usize| scaled(e) % p.len as u128 == 0;
            if !exact(at) || !exact(stop) {
                return Err(Error::Communicator(format!(
                    "'{name}': elements {at}..{stop} do not start and end on a stored block"
                )));
            }
            out.extend_from_slice(&p.bytes[byte(at)..byte(stop)]);
            at = stop;
        }
        if out.len() != expected {
            return Err(Error::Communicator(format!(
                "'{name}' {range:?}: {} bytes stored, {expected} expected",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Everything a load writes into `target`, cut from these pieces: its masters and state
    /// (each of its tensors' pieces, wherever they are stored), and the given scalar state.
    pub(crate) fn restore_for(
        &self,
        target: &Optimizer,
        saved: Saved,
        schedule: Option<Box<dyn LrSchedule>>,
    ) -> Result<Restore> {
        let layout = target.params().layout().clone();
        let names = target.state_names();
        let mut values = try_to_vec(&target.params().masters_snapshot()?)?;
        let mut state: StateBuffers = target.state_buffers()?.try_clone()?;
        for (index, t) in layout
            .tensors()
            .iter()
            .enumerate()
            .filter(|(_, t)| t.len > 0)
        {
            let whole = t.part_start..t.part_start + t.len;
            let bytes = self.read(&format!("param/{}", t.name), whole.clone(), 4 * t.len)?;
            bytemuck::cast_slice_mut::<f32, u8>(&mut values[t.range()]).copy_from_slice(&bytes);
            for (slot, buffer) in names.iter().enumerate() {
                let wanted: Vec<(String, usize)> = state_parts(&state, slot, buffer, index, t)
                    .into_iter()
                    .map(|p: Part<'_>| (p.name, p.bytes.len()))
                    .collect();
                let parts = wanted
                    .iter()
                    .map(|(name, len)| self.read(name, whole.clone(), *len))
                    .collect::<Result<Vec<_>>>()?;
                let scales = parts.get(1).map_or(&[][..], Vec::as_slice);
                state.write_stored(slot, index, t, &parts[0], scales);
            }
        }
        Ok(Restore {
            saved,
            masters: values,
            state,
            schedule,
        })
    }
}

/// The pieces an optimizer in memory holds, borrowed from `values` (its masters) and `state`.
pub(crate) fn of_optimizer<'a>(
    layout: &Layout,
    buffers: &[&str],
    values: &'a [f32],
    state: &'a StateBuffers,
) -> Pieces<'a> {
    let mut stored: HashMap<String, &'a [u8]> = HashMap::new();
    for (index, t) in layout.tensors().iter().enumerate() {
        stored.insert(
            format!("param/{}", t.name),
            bytemuck::cast_slice(&values[t.range()]),
        );
        for (slot, buffer) in buffers.iter().enumerate() {
            for p in state_parts(state, slot, buffer, index, t) {
                stored.insert(p.name, p.bytes);
            }
        }
    }
    let mut pieces = Pieces::default();
    pieces.add(layout, buffers, |name| stored.get(name).copied());
    pieces
}
