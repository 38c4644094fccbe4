//! The CPU engine's step over quantized state: chunks in parallel as the dense step runs them,
//! each block of a coded tensor decoded into f32 scratch, updated by the rule's own element
//! maths, and coded again, all while it is in cache; f32 pieces updated in place.
//!
//! Chunks hold unequal shares of the f32 part, so the buffers cannot be cut by `par_chunks`:
//! they are split at chunk boundaries recursively and the halves run under `rayon::join` (no
//! allocation, every borrow checked).

use super::kernels::update_segment;
use super::weights::Weights;
use crate::arena::Arena;
use crate::host::quantized_state::{code_block, decode_block, QuantizedBuffer, QuantizedLayout};
use crate::lean::quantize::BLOCK_8BIT;
use crate::lean::QuantMap;
use crate::rules::Coefficients;
use crate::Element;

/// One state buffer's share of a run of chunks.
struct SlotParts<'a> {
    codes: &'a mut [u8],
    scales: &'a mut [f32],
    full: &'a mut [f32],
}

/// A run of chunks `first..end` and every buffer's share of it.
struct Chunks<'a, G> {
    first: usize,
    end: usize,
    weights: Weights<'a>,
    g: &'a [G],
    slots: [SlotParts<'a>; 3],
    n: usize,
}

fn split<T>(s: &mut [T], at: usize) -> (&mut [T], &mut [T]) {
    s.split_at_mut(at.min(s.len()))
}

impl<'a, G: Element> Chunks<'a, G> {
    /// Splits before chunk `mid`.
    fn split(self, q: &QuantizedLayout, mid: usize) -> (Self, Self) {
        let e = (mid - self.first) * q.chunk_elems();
        let full = q.full_start(mid) - q.full_start(self.first);
        let code_bytes = q.format.code_bytes(e);
        let blocks = e / q.format.block();
        let (w0, w1) = self.weights.split_at(e);
        let (g0, g1) = self.g.split_at(e.min(self.g.len()));
        let halves = self.slots.map(|s| {
            let (c0, c1) = split(s.codes, code_bytes);
            let (s0, s1) = split(s.scales, blocks);
            let (f0, f1) = split(s.full, full);
            (
                SlotParts {
                    codes: c0,
                    scales: s0,
                    full: f0,
                },
                SlotParts {
                    codes: c1,
                    scales: s1,
                    full: f1,
                },
            )
        });
        let [(a0, a1), (b0, b1), (d0, d1)] = halves;
        let left = Chunks {
            first: self.first,
            end: mid,
            weights: w0,
            g: g0,
            slots: [a0, b0, d0],
            n: self.n,
        };
        let right = Chunks {
            first: mid,
            end: self.end,
            weights: w1,
            g: g1,
            slots: [a1, b1, d1],
            n: self.n,
        };
        (left, right)
    }

    fn run(self, q: &QuantizedLayout, maps: &[QuantMap], coeffs: &[Coefficients]) {
        if self.end - self.first > 1 {
            let mid = self.first + (self.end - self.first) / 2;
            let (left, right) = self.split(q, mid);
            rayon::join(|| left.run(q, maps, coeffs), || right.run(q, maps, coeffs));
        } else if self.end > self.first {
            self.run_chunk(q, maps, coeffs);
        }
    }

    /// Updates the one chunk this run holds.
    fn run_chunk(mut self, q: &QuantizedLayout, maps: &[QuantMap], coeffs: &[Coefficients]) {
        let (format, block) = (q.format, q.format.block());
        let base = self.first * q.chunk_elems();
        let n = self.n;
        let slots = &mut self.slots[..n];
        let mut full_at = 0;
        let mut scratch = [[0.0f32; BLOCK_8BIT]; 3];
        for piece in q.pieces_of(self.first) {
            let r = piece.start - base..piece.start - base + piece.len;
            let c = &coeffs[piece.group];
            let g = self.g;
            if !piece.quantized {
                self.weights.update(r.clone(), |p, sub| {
                    let f = full_at + sub.start - r.start..full_at + sub.end - r.start;
                    let mut views: [&mut [f32]; 3] = [&mut [], &mut [], &mut []];
                    for (v, s) in views.iter_mut().zip(slots.iter_mut()) {
                        *v = &mut s.full[f.clone()];
                    }
                    update_segment::<G, f32>(c, p, &g[sub], &mut views[..n]);
                });
                full_at += piece.len;
                continue;
            }
            for j in r.step_by(block) {
                let bytes = format.code_bytes(j)..format.code_bytes(j + block);
                self.weights.update(j..j + block, |p, _| {
                    for ((s, out), &map) in slots.iter().zip(scratch.iter_mut()).zip(maps) {
                        let (codes, scale) = (&s.codes[bytes.clone()], s.scales[j / block]);
                        decode_block(format, map, codes, scale, &mut out[..block]);
                    }
                    {
                        let [a, b, d] = &mut scratch;
                        let mut views: [&mut [f32]; 3] =
                            [&mut a[..block], &mut b[..block], &mut d[..block]];
                        update_segment::<G, f32>(c, p, &g[j..j + block], &mut views[..n]);
                    }
                    for ((s, values), &map) in slots.iter_mut().zip(&scratch).zip(maps) {
                        let codes = &mut s.codes[bytes.clone()];
                        s.scales[j / block] = code_block(format, map, &values[..block], codes);
                    }
                });
            }
        }
    }
}

/// Applies `coeffs[group]` to every piece of `q`, with the buffers' codes, scales and f32 parts
/// as the rule's state (slot order), and stores the updated masters back.
pub(crate) fn update(
    q: &QuantizedLayout,
    weights: Weights<'_>,
    grads: &Arena,
    buffers: &mut [QuantizedBuffer],
    coeffs: &[Coefficients],
) {
    match grads {
        Arena::F32(g) => update_typed(q, weights, g, buffers, coeffs),
        Arena::BF16(g) => update_typed(q, weights, g, buffers, coeffs),
        Arena::F16(g) => update_typed(q, weights, g, buffers, coeffs),
    }
}

fn update_typed<G: Element>(
    q: &QuantizedLayout,
    weights: Weights<'_>,
    g: &[G],
    buffers: &mut [QuantizedBuffer],
    coeffs: &[Coefficients],
) {
    let mut maps = [QuantMap::DynamicSigned8; 3];
    for (m, b) in maps.iter_mut().zip(buffers.iter()) {
        *m = b.map;
    }
    let n = buffers.len();
    let mut it = buffers.iter_mut();
    let mut next = || match it.next() {
        Some(b) => SlotParts {
            codes: &mut b.codes,
            scales: &mut b.scales,
            full: &mut b.full,
        },
        None => SlotParts {
            codes: &mut [],
            scales: &mut [],
            full: &mut [],
        },
    };
    let slots = [next(), next(), next()];
    Chunks {
        first: 0,
        end: q.num_chunks(),
        weights,
        g,
        slots,
        n,
    }
    .run(q, &maps[..n], coeffs);
}
