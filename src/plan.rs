//! The multi-tensor launch plan: the arena cut into fixed-size chunks, each chunk split where parameter
//! groups meet. Built once per parameter set; the CPU engine walks it with one task per chunk and the
//! CUDA engine uploads the same tables and launches one grid over them. A sharded group's
//! [`ShardPlan`] cuts the arena into one window per replica, each a whole number of chunks.

use std::ops::Range;

use crate::layout::Layout;

/// A run of arena elements inside one chunk that all belong to one parameter group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the first element in the arena.
    pub start: usize,
    pub len: usize,
    pub group: usize,
}

/// Chunk table and segment table for one layout.
#[derive(Clone, Debug)]
pub struct LaunchPlan {
    chunk_elems: usize,
    /// `segments[chunk_first[i]..chunk_first[i + 1]]` are the segments of chunk `i`.
    chunk_first: Vec<usize>,
    segments: Vec<Segment>,
}

/// CPU chunk: 32 Ki elements keeps Adam's five streams of one chunk inside a core's L2.
pub const CPU_CHUNK_ELEMS: usize = 1 << 15;

/// GPU chunk size for `total` arena elements on a card with `sm_count` multiprocessors: small
/// enough that the plan has about eight blocks per SM (a small model still fills the card), within
/// 4 Ki..64 Ki elements (each block's share of work stays long enough to amortise its setup).
pub fn cuda_chunk_elems(total: usize, sm_count: usize) -> usize {
    let target = total.div_ceil(sm_count.max(1).saturating_mul(8));
    target.next_power_of_two().clamp(1 << 12, 1 << 16)
}

impl LaunchPlan {
    /// Cuts `layout`'s arena into chunks of `chunk_elems` (a multiple of the layout alignment).
    pub fn new(layout: &Layout, chunk_elems: usize) -> Self {
        let chunk_elems = chunk_elems.max(crate::layout::ALIGN_ELEMS);
        let len = layout.arena_len();
        let n_chunks = len.div_ceil(chunk_elems);
        let mut chunk_first = Vec::with_capacity(n_chunks + 1);
        let mut segments = Vec::with_capacity(n_chunks + layout.groups().len());
        for chunk in 0..n_chunks {
            chunk_first.push(segments.len());
            let (lo, hi) = (chunk * chunk_elems, ((chunk + 1) * chunk_elems).min(len));
            for (group, info) in layout.groups().iter().enumerate() {
                let (start, end) = (info.range.start.max(lo), info.range.end.min(hi));
                if start < end {
                    segments.push(Segment {
                        start,
                        len: end - start,
                        group,
                    });
                }
            }
        }
        chunk_first.push(segments.len());
        LaunchPlan {
            chunk_elems,
            chunk_first,
            segments,
        }
    }

    pub fn chunk_elems(&self) -> usize {
        self.chunk_elems
    }

    pub fn num_chunks(&self) -> usize {
        self.chunk_first.len() - 1
    }

    /// The segments of chunk `chunk`, in arena order.
    pub fn segments_of(&self, chunk: usize) -> &[Segment] {
        &self.segments[self.chunk_first[chunk]..self.chunk_first[chunk + 1]]
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

/// A sharded group's windows start at multiples of this many elements: a whole number of the CPU engine's chunks
/// and of the largest GPU chunk.
pub const SHARD_GRANULE: usize = 1 << 16;

/// How an arena of `arena_len` elements is cut into `world` windows of one length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub world: usize,
    pub arena_len: usize,
    pub window_len: usize,
}

impl ShardPlan {
    pub fn new(arena_len: usize, world: usize) -> Self {
        let world = world.max(1);
        // Saturating: a world no machine has (from a damaged manifest) must not overflow.
        let granules = arena_len
            .div_ceil(world.saturating_mul(SHARD_GRANULE))
            .max(1);
        ShardPlan {
            world,
            arena_len,
            window_len: granules * SHARD_GRANULE,
        }
    }

    /// Rank `rank`'s window of the (padded) arena.
    pub fn window(&self, rank: usize) -> Range<usize> {
        rank * self.window_len..(rank + 1) * self.window_len
    }

    /// The padded arena: `world` windows.
    pub fn padded_len(&self) -> usize {
        self.world * self.window_len
    }
}
