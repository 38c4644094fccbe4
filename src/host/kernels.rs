//! The CPU engine: the launch plan's chunks spread over the cores of rayon's pool.
//!
//! A step allocates nothing: chunk partial sums live in a buffer sized once, and the per-chunk work
//! is rayon's fork-join over zipped `par_chunks`. Every arena is chunked as bytes, so one zip serves
//! every dtype; each segment then views its bytes as the arena's element type. The norm is the
//! square root of the per-chunk f64 partials summed in chunk order: the same bits on every run and
//! thread count.

use half::{bf16, f16};
use rayon::prelude::*;

use super::weights::Weights;
use crate::arena::Arena;
use crate::plan::LaunchPlan;
use crate::rules::Coefficients;
use crate::{DType, Element};

#[derive(Clone, Debug)]
pub struct CpuEngine {
    plan: LaunchPlan,
    partials: Vec<f64>,
}

/// An arena's bytes, for chunking independently of its dtype.
fn bytes(arena: &Arena) -> &[u8] {
    match arena {
        Arena::F32(v) => bytemuck::cast_slice(v),
        Arena::BF16(v) => bytemuck::cast_slice(v),
        Arena::F16(v) => bytemuck::cast_slice(v),
    }
}

fn bytes_mut(arena: &mut Arena) -> &mut [u8] {
    match arena {
        Arena::F32(v) => bytemuck::cast_slice_mut(v),
        Arena::BF16(v) => bytemuck::cast_slice_mut(v),
        Arena::F16(v) => bytemuck::cast_slice_mut(v),
    }
}

/// The elements of `T` in `range` of a chunk's bytes. Chunks start at multiples of the chunk size
/// in an arena of `T`, so the bytes are always aligned for `T`.
fn view<T: Element>(chunk: &[u8], range: std::ops::Range<usize>) -> &[T] {
    &bytemuck::cast_slice::<u8, T>(chunk)[range]
}

fn view_mut<T: Element>(chunk: &mut [u8], range: std::ops::Range<usize>) -> &mut [T] {
    &mut bytemuck::cast_slice_mut::<u8, T>(chunk)[range]
}

impl CpuEngine {
    pub fn new(plan: LaunchPlan) -> Self {
        let partials = vec![0.0; plan.num_chunks()];
        CpuEngine { plan, partials }
    }

    pub fn plan(&self) -> &LaunchPlan {
        &self.plan
    }

    /// Each chunk's Σ g² from the last [`CpuEngine::sum_of_squares`].
    pub fn partials(&self) -> &[f64] {
        &self.partials
    }

    /// Σ g² over the arena in f64, deterministic.
    pub fn sum_of_squares(&mut self, grads: &Arena) -> f64 {
        match grads {
            Arena::F32(g) => self.sum_of_squares_typed(g),
            Arena::BF16(g) => self.sum_of_squares_typed(g),
            Arena::F16(g) => self.sum_of_squares_typed(g),
        }
    }

    fn sum_of_squares_typed<G: Element>(&mut self, grads: &[G]) -> f64 {
        let c = self.plan.chunk_elems();
        self.partials
            .par_iter_mut()
            .zip(grads.par_chunks(c))
            .for_each(|(out, g)| *out = chunk_sum_of_squares(g));
        self.partials.iter().sum()
    }

    /// Applies `coeffs[group]` to every segment of the plan, storing the updated masters back
    /// (and the model copy with them) while each chunk is still in cache. All state arenas share
    /// one dtype.
    pub(super) fn update(
        &self,
        weights: Weights<'_>,
        grads: &Arena,
        state: &mut [Arena],
        coeffs: &[Coefficients],
    ) {
        let state_dtype = state.first().map_or(DType::F32, Arena::dtype);
        match (grads.dtype(), state_dtype) {
            (DType::F32, DType::F32) => {
                self.update_typed::<f32, f32>(weights, grads, state, coeffs)
            }
            (DType::BF16, DType::F32) => {
                self.update_typed::<bf16, f32>(weights, grads, state, coeffs)
            }
            (DType::F16, DType::F32) => {
                self.update_typed::<f16, f32>(weights, grads, state, coeffs)
            }
            (DType::F32, DType::BF16) => {
                self.update_typed::<f32, bf16>(weights, grads, state, coeffs)
            }
            (DType::BF16, DType::BF16) => {
                self.update_typed::<bf16, bf16>(weights, grads, state, coeffs)
            }
            (DType::F16, DType::BF16) => {
                self.update_typed::<f16, bf16>(weights, grads, state, coeffs)
            }
            (DType::F32, DType::F16) => {
                self.update_typed::<f32, f16>(weights, grads, state, coeffs)
            }
            (DType::BF16, DType::F16) => {
                self.update_typed::<bf16, f16>(weights, grads, state, coeffs)
            }
            (DType::F16, DType::F16) => {
                self.update_typed::<f16, f16>(weights, grads, state, coeffs)
            }
        }
    }

    fn update_typed<G: Element, S: Element>(
        &self,
        weights: Weights<'_>,
        grads: &Arena,
        state: &mut [Arena],
        coeffs: &[Coefficients],
    ) {
        let c = self.plan.chunk_elems();
        let plan = &self.plan;
        let run = |chunk: usize, mut w: Weights<'_>, g: &[u8], s: &mut [&mut [u8]]| {
            let base = chunk * c;
            let n = s.len();
            for seg in plan.segments_of(chunk) {
                let r = seg.start - base..seg.start - base + seg.len;
                w.update(r, |p, r| {
                    let mut views: [&mut [S]; 3] = [&mut [], &mut [], &mut []];
                    for (v, buf) in views.iter_mut().zip(s.iter_mut()) {
                        *v = view_mut::<S>(buf, r.clone());
                    }
                    update_segment::<G, S>(&coeffs[seg.group], p, view::<G>(g, r), &mut views[..n]);
                });
            }
        };
        let pg = weights
            .par_chunks(c)
            .zip(bytes(grads).par_chunks(c * G::DTYPE.size_bytes()));
        let sw = c * S::DTYPE.size_bytes();
        match state {
            [] => pg.enumerate().for_each(|(i, (w, g))| run(i, w, g, &mut [])),
            [a] => pg
                .zip(bytes_mut(a).par_chunks_mut(sw))
                .enumerate()
                .for_each(|(i, ((w, g), a))| run(i, w, g, &mut [a])),
            [a, b] => pg
                .zip(bytes_mut(a).par_chunks_mut(sw))
                .zip(bytes_mut(b).par_chunks_mut(sw))
                .enumerate()
                .for_each(|(i, (((w, g), a), b))| run(i, w, g, &mut [a, b])),
            [a, b, d] => pg
                .zip(bytes_mut(a).par_chunks_mut(sw))
                .zip(bytes_mut(b).par_chunks_mut(sw))
                .zip(bytes_mut(d).par_chunks_mut(sw))
                .enumerate()
                .for_each(|(i, ((((w, g), a), b), d))| run(i, w, g, &mut [a, b, d])),
            _ => unreachable!("no rule keeps more than three state buffers"),
        }
    }
}

/// One segment's update, compiled for several instruction sets and dispatched on the running CPU
/// (wider vectors halve the cost of Adam's and RMSProp's square roots and divisions). Only vector
/// width changes: no FMA contraction, so results are the same bits on every path.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+avx", "x86_64+avx2+avx"))]
pub(super) fn update_segment<G: Element, S: Element>(
    c: &Coefficients,
    p: &mut [f32],
    g: &[G],
    state: &mut [&mut [S]],
) {
    c.update(p, g, state)
}

/// Σ g² of `grads` as the CPU engine's norm pass adds it: chunk by chunk of `chunk` elements,
/// the chunks' sums in order (a sharded parameter server's worker sends it with its push).
pub(crate) fn sum_of_squares_in_chunks(grads: &[f32], chunk: usize) -> f64 {
    let partials: Vec<f64> = grads
        .par_chunks(chunk.max(1))
        .map(chunk_sum_of_squares)
        .collect();
    partials.iter().sum()
}

/// Σ g² of one chunk: eight f64 lanes so the loop vectorises and large chunks lose no precision.
fn chunk_sum_of_squares<G: Element>(g: &[G]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut it = g.chunks_exact(8);
    for block in &mut it {
        for (acc, &x) in lanes.iter_mut().zip(block) {
            let x = x.to_f32() as f64;
            *acc += x * x;
        }
    }
    let tail: f64 = it
        .remainder()
        .iter()
        .map(|&x| (x.to_f32() as f64) * (x.to_f32() as f64))
        .sum();
    lanes.iter().sum::<f64>() + tail
}
