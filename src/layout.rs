//! The shape of a parameter set: named tensors of any shape laid out in one arena, group by
//! group, each at a 64-byte aligned offset. Gradients and every optimizer state buffer use the
//! same layout, so one offset addresses a tensor in all of them, and a range of the arena is a
//! range of every buffer (all-reduce buckets rely on this). A tensor that quantized state may
//! code block-wise starts at a multiple of [`QUANTIZED_ALIGN_ELEMS`], so its blocks never cross
//! an engine's chunk. Padding elements are zero and stay zero.

use std::collections::HashMap;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::DType;

/// Alignment of every tensor in the arena, in elements (64 bytes of f32).
pub const ALIGN_ELEMS: usize = 16;

/// Alignment of a tensor whose state can be quantized (a whole number of 8-bit blocks, and of
/// 4-bit ones): every engine's chunk is a multiple of it.
pub const QUANTIZED_ALIGN_ELEMS: usize = crate::lean::quantize::BLOCK_8BIT;

/// Where in the arena a tensor of `len` elements may start: a multiple of this.
pub(crate) fn tensor_alignment(len: usize) -> usize {
    use crate::lean::quantize::{quantizes, BLOCK_4BIT};
    if quantizes(len, BLOCK_4BIT) {
        QUANTIZED_ALIGN_ELEMS
    } else {
        ALIGN_ELEMS
    }
}

/// Per-group hyperparameters that override the optimizer's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupOptions {
    /// Multiplies the optimizer's (scheduled) learning rate for this group.
    pub lr_scale: f64,
    /// Replaces the rule's weight-decay coefficient for this group (its style stays the rule's);
    /// `Some(0.0)` is the usual choice for biases and norms.
    pub weight_decay: Option<f64>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            lr_scale: 1.0,
            weight_decay: None,
        }
    }
}

impl GroupOptions {
    /// Refuses options the f32 step cannot use (group `name` is named in the error).
    pub(crate) fn validate(&self, name: &str) -> Result<()> {
        let bad = |what: &str, x: f64| {
            Err(Error::InvalidHyperparameter(format!(
                "group '{name}': {what} must be finite (in f32 too) and >= 0, got {x}"
            )))
        };
        let ok = |x: f64| x >= 0.0 && (x as f32).is_finite();
        if !ok(self.lr_scale) {
            return bad("lr_scale", self.lr_scale);
        }
        match self.weight_decay {
            Some(wd) if !ok(wd) => bad("weight_decay", wd),
            _ => Ok(()),
        }
    }

    /// No weight decay in this group (biases, norm scales).
    pub fn no_decay() -> Self {
        GroupOptions {
            weight_decay: Some(0.0),
            ..Default::default()
        }
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub group: usize,
    /// Offset of the first element in the arena.
    pub offset: usize,
    /// Number of elements (the product of `shape`; 1 for a scalar, 0 when a dimension is 0).
    pub len: usize,
    /// Where these elements start in the whole tensor, and its length: all of it, except in the
    /// layout of one shard of a sharded group ([`Layout::window`]), which holds a piece.
    pub(crate) part_start: usize,
    pub(crate) whole_len: usize,
}

impl TensorInfo {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// A parameter group: its options and the arena range it owns (its padding included).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupInfo {
    pub name: String,
    pub options: GroupOptions,
    pub range: Range<usize>,
}

/// The shape of a parameter set: names, shapes, groups and offsets. Shared by the parameters, the
/// gradients and the optimizer state, on every device.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    groups: Vec<GroupInfo>,
    arena_len: usize,
    /// Where element 0 of this arena sits in the whole set's arena (0, except for a shard).
    base: usize,
    /// The whole set's arena length (the engines size their chunks by it, so that a shard's
    /// chunks are the whole set's).
    whole_arena_len: usize,
}

impl Layout {
    /// The layout of `tensors` (offsets assigned) in `groups`, `arena_len` elements in all.
    pub(crate) fn new(tensors: Vec<TensorInfo>, groups: Vec<GroupInfo>, arena_len: usize) -> Self {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Layout {
            tensors,
            by_name,
            groups,
            arena_len,
            base: 0,
            whole_arena_len: arena_len,
        }
    }

    /// The layout of arena elements `range` alone (one shard of a sharded group): the pieces of
    /// the tensors inside it, shifted to start at 0, in every group (groups outside it are
    /// empty), `range.len()` elements in all; positions past the arena are padding.
    pub(crate) fn window(&self, range: Range<usize>) -> Layout {
        let (lo, hi) = (range.start, range.end);
        let clip = |r: &Range<usize>| r.start.clamp(lo, hi) - lo..r.end.clamp(lo, hi) - lo;
        let tensors = self
            .tensors
            .iter()
            .filter(|t| t.len > 0 && t.offset < hi && t.offset + t.len > lo)
            .map(|t| {
                let piece = clip(&t.range());
                TensorInfo {
                    shape: vec![piece.len()],
                    offset: piece.start,
                    len: piece.len(),
                    part_start: t.part_start + (piece.start + lo - t.offset),
                    ..t.clone()
                }
            })
            .collect();
        let groups = self
            .groups
            .iter()
            .map(|g| GroupInfo {
                range: clip(&g.range),
                ..g.clone()
            })
            .collect();
        Layout {
            base: self.base + lo,
            whole_arena_len: self.whole_arena_len,
            ..Layout::new(tensors, groups, range.len())
        }
    }

    /// The same layout in a longer arena (padding at the end).
    pub(crate) fn padded_to(&self, arena_len: usize) -> Layout {
        Layout {
            arena_len: arena_len.max(self.arena_len),
            ..self.clone()
        }
    }

    /// Where element 0 of this arena sits in the whole set's arena: 0, except in a shard's
    /// layout. Streams indexed by arena position (stochastic rounding) start here.
    pub fn base(&self) -> usize {
        self.base
    }

    /// The whole set's arena length: [`Layout::arena_len`], except in a shard's layout.
    pub fn whole_arena_len(&self) -> usize {
        self.whole_arena_len
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn groups(&self) -> &[GroupInfo] {
        &self.groups
    }

    /// Elements in the arena, padding included.
    pub fn arena_len(&self) -> usize {
        self.arena_len
    }

    /// Elements that belong to tensors (padding excluded).
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.len).sum()
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))
    }

    /// Position of a tensor in [`Layout::tensors`].
    pub fn tensor_index(&self, name: &str) -> Result<usize> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))
    }

    pub fn group_index(&self, name: &str) -> Result<usize> {
        self.groups
            .iter()
            .position(|g| g.name == name)
            .ok_or_else(|| Error::UnknownGroup(name.to_string()))
    }
}
