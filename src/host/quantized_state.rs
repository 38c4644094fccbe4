//! Quantized optimizer state in host memory: which tensors are coded block-wise, where each
//! chunk's f32 fallback lives, and one state buffer's codes, scales and f32 part.
//!
//! A tensor of at least [`MIN_QUANTIZED_SIZE`] elements that is a whole number of blocks is coded
//! (one code per element, 8 or 4 bits, and one f32 scale per block, both indexed by arena
//! position); every other arena element (small tensors, padding) keeps f32 state in `full`,
//! packed in arena order. The layout aligns coded tensors so that no block crosses a chunk, and
//! each chunk's f32 part is one contiguous run of `full`: chunks update independently.

use crate::arena::try_filled;
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorInfo};
use crate::plan::LaunchPlan;
use crate::rules::{Rule, StateInit};
use crate::step::QuantizedState;

use crate::lean::quantize::{
    code_of, dequantize_block, pack_nibbles, quantize_block, quantizes, unpack_nibbles, BLOCK_4BIT,
};
use crate::lean::QuantMap;

/// A run of one chunk's elements in one parameter group, all coded or all f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub start: usize,
    pub len: usize,
    pub group: usize,
    pub quantized: bool,
}

/// Where a quantized state lives: the launch plan refined so that each piece is all coded or all
/// f32, and each chunk's offset into the f32 part.
#[derive(Clone, Debug)]
pub(crate) struct QuantizedLayout {
    pub format: QuantizedState,
    arena_len: usize,
    chunk_elems: usize,
    /// `pieces[chunk_first[i]..chunk_first[i + 1]]` are chunk `i`'s.
    chunk_first: Vec<usize>,
    pieces: Vec<Piece>,
    /// `full[full_first[i]..full_first[i + 1]]` is chunk `i`'s f32 state.
    full_first: Vec<usize>,
    /// Each tensor's offset in `full`, or `None` when it is coded.
    full_offset: Vec<Option<usize>>,
}

impl QuantizedLayout {
    pub(crate) fn new(layout: &Layout, plan: &LaunchPlan, format: QuantizedState) -> Self {
        let block = format.block();
        // Coded ranges, in arena order (the layout places tensors in arena order).
        let coded: Vec<_> = layout
            .tensors()
            .iter()
            .filter(|t| quantizes(t.whole_len, block))
            .map(TensorInfo::range)
            .collect();
        let mut pieces = Vec::with_capacity(plan.segments().len() + 2 * coded.len());
        let mut chunk_first = Vec::with_capacity(plan.num_chunks() + 1);
        let mut full_first = Vec::with_capacity(plan.num_chunks() + 1);
        let mut full = 0usize;
        let mut next = 0; // the first coded range not wholly before the current segment
        for chunk in 0..plan.num_chunks() {
            chunk_first.push(pieces.len());
            full_first.push(full);
            for seg in plan.segments_of(chunk) {
                let end = seg.start + seg.len;
                while next < coded.len() && coded[next].end <= seg.start {
                    next += 1;
                }
                let mut at = seg.start;
                let mut push = |from: usize, to: usize, quantized: bool, full: &mut usize| {
                    if from < to {
                        pieces.push(Piece {
                            start: from,
                            len: to - from,
                            group: seg.group,
                            quantized,
                        });
                        if !quantized {
                            *full += to - from;
                        }
                    }
                };
                let mut k = next;
                while at < end {
                    match coded.get(k).filter(|r| r.start < end) {
                        Some(r) => {
                            push(at, r.start.max(at), false, &mut full);
                            let stop = r.end.min(end);
                            push(r.start.max(at), stop, true, &mut full);
                            at = stop;
                            k += 1;
                        }
                        None => {
                            push(at, end, false, &mut full);
                            at = end;
                        }
                    }
                }
            }
        }
        chunk_first.push(pieces.len());
        full_first.push(full);
        // Each f32 tensor's offset in `full`: the f32 elements before it (tensors and pieces are
        // both in arena order).
        let mut full_offset = Vec::with_capacity(layout.tensors().len());
        let (mut p, mut before) = (0, 0);
        for t in layout.tensors() {
            while p < pieces.len() && pieces[p].start + pieces[p].len <= t.offset {
                before += if pieces[p].quantized {
                    0
                } else {
                    pieces[p].len
                };
                p += 1;
            }
            let inside = pieces
                .get(p)
                .map_or(0, |x| t.offset.saturating_sub(x.start));
            full_offset.push((!quantizes(t.whole_len, block)).then_some(before + inside));
        }
        QuantizedLayout {
            format,
            arena_len: layout.arena_len(),
            chunk_elems: plan.chunk_elems(),
            chunk_first,
            pieces,
            full_first,
            full_offset,
        }
    }

    pub(crate) fn arena_len(&self) -> usize {
        self.arena_len
    }

    pub(crate) fn chunk_elems(&self) -> usize {
        self.chunk_elems
    }

    pub(crate) fn num_chunks(&self) -> usize {
        self.chunk_first.len() - 1
    }

    /// Every piece, in arena order.
    pub(crate) fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    pub(crate) fn pieces_of(&self, chunk: usize) -> &[Piece] {
        &self.pieces[self.chunk_first[chunk]..self.chunk_first[chunk + 1]]
    }

    /// Where chunk `chunk`'s f32 state starts in `full` (`num_chunks()` gives its length).
    pub(crate) fn full_start(&self, chunk: usize) -> usize {
        self.full_first[chunk]
    }

    /// Elements of f32 state, all chunks together.
    pub(crate) fn full_len(&self) -> usize {
        self.full_first[self.num_chunks()]
    }

    /// Tensor `index`'s offset in `full`, or `None` when it is coded.
    pub(crate) fn full_offset(&self, index: usize) -> Option<usize> {
        self.full_offset[index]
    }
}

/// One quantized state buffer: its map, one code per arena element (two per byte at 4 bits; those
/// of f32 elements unused), one scale per block, and the f32 part.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct QuantizedBuffer {
    pub map: QuantMap,
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub full: Vec<f32>,
}

impl QuantizedBuffer {
    /// Buffer `name` of `rule`, as it starts, over an arena of `arena_len` elements.
    pub(crate) fn new(
        q: &QuantizedLayout,
        rule: &Rule,
        name: &str,
        arena_len: usize,
    ) -> Result<Self> {
        let value = match rule.state_init(name) {
            StateInit::Value(v) => v,
            StateInit::Params => {
                return Err(Error::InvalidHyperparameter(format!(
                    "state buffer '{name}' starts as a copy of the parameters, which quantized \
                     state cannot hold: use QuantizedState::None with this rule"
                )))
            }
        };
        let format = q.format;
        let map = format.map(rule.nonnegative_state(name));
        let block = format.block();
        // Every block starts as the value coded: a zero start is scale 0 (every code decodes to
        // 0, as torchao's zero-initialised state does), any other is one block coded.
        let mut start = vec![0u8; block];
        let scale = if value == 0.0 {
            start.fill(code_of(map.values(), 0.0));
            0.0
        } else {
            quantize_block(map, &vec![value; block], &mut start)
        };
        let byte = match format {
            QuantizedState::Block4 => start[0] << 4 | start[0],
            _ => start[0],
        };
        Ok(QuantizedBuffer {
            map,
            codes: try_filled(format.code_bytes(arena_len), byte)?,
            scales: try_filled(arena_len.div_ceil(block), scale)?,
            full: try_filled(q.full_len(), value)?,
        })
    }

    pub(crate) fn try_clone(&self) -> Result<Self> {
        Ok(QuantizedBuffer {
            map: self.map,
            codes: crate::arena::try_to_vec(&self.codes)?,
            scales: crate::arena::try_to_vec(&self.scales)?,
            full: crate::arena::try_to_vec(&self.full)?,
        })
    }

    /// Tensor `t` (the layout's `index`-th) decoded to f32.
    pub(crate) fn tensor_f32(&self, q: &QuantizedLayout, index: usize, t: &TensorInfo) -> Vec<f32> {
        if let Some(at) = q.full_offset(index) {
            return self.full[at..at + t.len].to_vec();
        }
        let (format, block) = (q.format, q.format.block());
        let mut out = vec![0.0; t.len];
        for (b, values) in out.chunks_mut(block).enumerate() {
            let start = t.offset + b * block;
            let codes = &self.codes[format.code_bytes(start)..format.code_bytes(start + block)];
            decode_block(format, self.map, codes, self.scales[start / block], values);
        }
        out
    }

    /// Tensor `t`'s stored parts, as a checkpoint holds them: its codes (bytes as stored) and
    /// scales when coded, else its f32 state.
    pub(crate) fn tensor_parts(
        &self,
        q: &QuantizedLayout,
        index: usize,
        t: &TensorInfo,
    ) -> StoredTensor<'_> {
        match q.full_offset(index) {
            Some(at) => StoredTensor::Full(&self.full[at..at + t.len]),
            None => {
                let block = q.format.block();
                let codes = q.format.code_bytes(t.offset)..q.format.code_bytes(t.offset + t.len);
                let scales = t.offset / block..(t.offset + t.len) / block;
                StoredTensor::Coded {
                    codes: &self.codes[codes],
                    scales: &self.scales[scales],
                }
            }
        }
    }

    /// Overwrites tensor `t`'s stored parts (as [`QuantizedBuffer::tensor_parts`] gives them; the
    /// caller checked their lengths).
    pub(crate) fn write_tensor(
        &mut self,
        q: &QuantizedLayout,
        index: usize,
        t: &TensorInfo,
        codes_or_full: &[u8],
        scales: &[u8],
    ) {
        match q.full_offset(index) {
            Some(at) => bytemuck::cast_slice_mut::<f32, u8>(&mut self.full[at..at + t.len])
                .copy_from_slice(codes_or_full),
            None => {
                let block = q.format.block();
                let codes = q.format.code_bytes(t.offset)..q.format.code_bytes(t.offset + t.len);
                self.codes[codes].copy_from_slice(codes_or_full);
                let s = t.offset / block..(t.offset + t.len) / block;
                bytemuck::cast_slice_mut::<f32, u8>(&mut self.scales[s]).copy_from_slice(scales);
            }
        }
    }
}

/// One tensor of a quantized buffer as stored.
pub(crate) enum StoredTensor<'a> {
    Coded { codes: &'a [u8], scales: &'a [f32] },
    Full(&'a [f32]),
}

/// Codes a block of f32 `values` into `codes` (packed two per byte at 4 bits); returns its scale.
pub(crate) fn code_block(
    format: QuantizedState,
    map: QuantMap,
    values: &[f32],
    codes: &mut [u8],
) -> f32 {
    match format {
        QuantizedState::Block4 => {
            let mut one = [0u8; BLOCK_4BIT];
            let scale = quantize_block(map, values, &mut one[..values.len()]);
            pack_nibbles(&one[..values.len()], codes);
            scale
        }
        _ => quantize_block(map, values, codes),
    }
}

/// Decodes a block's `codes` (packed at 4 bits) with `scale` into `out`.
pub(crate) fn decode_block(
    format: QuantizedState,
    map: QuantMap,
    codes: &[u8],
    scale: f32,
    out: &mut [f32],
) {
    match format {
        QuantizedState::Block4 => {
            let mut one = [0u8; BLOCK_4BIT];
            unpack_nibbles(codes, &mut one[..out.len()]);
            dequantize_block(map, &one[..out.len()], scale, out);
        }
        _ => dequantize_block(map, codes, scale, out),
    }
}
