//! The optimizer state buffers in host memory: one dense arena per buffer (f32 or bf16), or
//! quantized buffers (codes, block scales and an f32 part) laid out by one [`QuantizedLayout`].

use std::sync::Arc;

use crate::arena::Arena;
use crate::error::Result;
use crate::host::quantized_state::{QuantizedBuffer, QuantizedLayout, StoredTensor};
use crate::layout::{Layout, TensorInfo};
use crate::plan::LaunchPlan;
use crate::rules::{Rule, StateInit};
use crate::step::{OptimizerOptions, QuantizedState};

#[derive(Clone, Debug)]
pub(crate) enum StateBuffers {
    Dense(Vec<Arena>),
    Quantized {
        layout: Arc<QuantizedLayout>,
        buffers: Vec<QuantizedBuffer>,
    },
}

impl StateBuffers {
    /// `rule`'s buffers as they start, over the arenas whose fp32 masters are `masters`.
    pub(crate) fn new(
        layout: &Layout,
        plan: &LaunchPlan,
        rule: &Rule,
        options: &OptimizerOptions,
        masters: &[f32],
    ) -> Result<Self> {
        let len = layout.arena_len();
        let names = rule.state_names();
        if options.quantized_state != QuantizedState::None {
            let q = Arc::new(QuantizedLayout::new(layout, plan, options.quantized_state));
            let buffers = names
                .iter()
                .map(|n| QuantizedBuffer::new(&q, rule, n, len))
                .collect::<Result<_>>()?;
            return Ok(StateBuffers::Quantized { layout: q, buffers });
        }
        let dense = names
            .iter()
            .map(|n| match rule.state_init(n) {
                StateInit::Value(v) => Arena::filled(options.state_dtype, len, v),
                StateInit::Params => {
                    let mut a = Arena::filled(options.state_dtype, len, 0.0)?;
                    a.write_f32(0, masters);
                    Ok(a)
                }
            })
            .collect::<Result<_>>()?;
        Ok(StateBuffers::Dense(dense))
    }

    /// A copy, or a typed error when the memory is not there (never an abort).
    pub(crate) fn try_clone(&self) -> Result<Self> {
        Ok(match self {
            StateBuffers::Dense(a) => {
                StateBuffers::Dense(a.iter().map(Arena::try_clone).collect::<Result<_>>()?)
            }
            StateBuffers::Quantized { layout, buffers } => StateBuffers::Quantized {
                layout: layout.clone(),
                buffers: buffers
                    .iter()
                    .map(QuantizedBuffer::try_clone)
                    .collect::<Result<_>>()?,
            },
        })
    }

    /// Buffer `slot`'s part for tensor `t` (the layout's `index`-th), decoded to f32.
    pub(crate) fn tensor_f32(&self, slot: usize, index: usize, t: &TensorInfo) -> Vec<f32> {
        match self {
            StateBuffers::Dense(a) => a[slot].to_f32(t.range()),
            StateBuffers::Quantized { layout, buffers } => {
                buffers[slot].tensor_f32(layout, index, t)
            }
        }
    }

    /// The number of buffers.
    pub(crate) fn len(&self) -> usize {
        match self {
            StateBuffers::Dense(a) => a.len(),
            StateBuffers::Quantized { buffers, .. } => buffers.len(),
        }
    }

    /// Bytes held, every buffer together.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            StateBuffers::Dense(a) => a.iter().map(|a| a.len() * a.dtype().size_bytes()).sum(),
            StateBuffers::Quantized { buffers, .. } => buffers
                .iter()
                .map(|b| b.codes.len() + 4 * (b.scales.len() + b.full.len()))
                .sum(),
        }
    }

    /// A checksum of everything buffer `slot` stores.
    pub(crate) fn checksum(&self, slot: usize) -> u32 {
        let mut h = crc32fast::Hasher::new();
        match self {
            StateBuffers::Dense(a) => h.update(a[slot].bytes(0..a[slot].len())),
            StateBuffers::Quantized { buffers, .. } => {
                let b = &buffers[slot];
                h.update(&b.codes);
                h.update(bytemuck::cast_slice(&b.scales));
                h.update(bytemuck::cast_slice(&b.full));
            }
        }
        h.finalize()
    }

    /// Buffer `slot`'s part for tensor `t` as stored.
    pub(crate) fn stored(&self, slot: usize, index: usize, t: &TensorInfo) -> Stored<'_> {
        match self {
            StateBuffers::Dense(a) => Stored::Dense(&a[slot]),
            StateBuffers::Quantized { layout, buffers } => {
                Stored::Quantized(buffers[slot].tensor_parts(layout, index, t))
            }
        }
    }
}

impl StateBuffers {
    /// Overwrites buffer `slot`'s part for tensor `t` with bytes as [`StateBuffers::stored`]
    /// gives them (`scales` for a coded tensor's scales); the caller checked their lengths.
    pub(crate) fn write_stored(
        &mut self,
        slot: usize,
        index: usize,
        t: &TensorInfo,
        bytes: &[u8],
        scales: &[u8],
    ) {
        match self {
            StateBuffers::Dense(a) => a[slot].write_bytes(t.offset, bytes),
            StateBuffers::Quantized { layout, buffers } => {
                buffers[slot].write_tensor(layout, index, t, bytes, scales)
            }
        }
    }
}

/// A tensor's part of one buffer as stored.
pub(crate) enum Stored<'a> {
    /// In the dense arena, at the tensor's range.
    Dense(&'a Arena),
    Quantized(StoredTensor<'a>),
}
