//! The parameters as one chunk of the CPU step sees them: fp32 masters (and the model copy
//! rewritten from them), bf16 weights with int16 remainders (joined into the fp32 master around
//! the update and split again), or bf16 weights alone (updated in f32, rounded back
//! stochastically). The rule's maths always runs on fp32 masters: [`Weights::update`] stages
//! them through a small buffer on the stack when they are not stored as such.

use std::ops::Range;

use half::{bf16, f16};
use rayon::iter::Either;
use rayon::prelude::*;

use crate::arena::Arena;
use crate::dtype::round_into;
use crate::error::Result;
use crate::lean::remainder::{join_master, split_master};
use crate::lean::stochastic::round_slice_bf16;
use crate::masters::{weights_missing, HostMasters};

/// Elements staged at a time when the masters are not stored as f32 (a quantization block).
const STAGE: usize = 256;

/// One chunk's share of the parameters; indices are relative to its first element.
pub(super) enum Weights<'a> {
    Masters {
        p: &'a mut [f32],
        model: ModelCopy<'a>,
    },
    Remainders {
        w: &'a mut [bf16],
        r: &'a mut [i16],
    },
    Stochastic {
        w: &'a mut [bf16],
        seed: u64,
        step: u64,
        /// The arena index of element 0 (each element's draw depends on it).
        first: u64,
    },
}

/// The low-precision model copy beside fp32 masters, if there is one.
pub(super) enum ModelCopy<'a> {
    None,
    BF16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

fn split<T>(s: &mut [T], at: usize) -> (&mut [T], &mut [T]) {
    s.split_at_mut(at.min(s.len()))
}

impl<'a> Weights<'a> {
    /// The whole arena's parameters, for step `step` (the stochastic stream's counter).
    pub(super) fn of(
        masters: &'a mut HostMasters,
        model: Option<&'a mut Arena>,
        step: u64,
        first: u64,
    ) -> Result<Self> {
        Ok(match (masters, model) {
            (HostMasters::F32(p), m) => Weights::Masters {
                p,
                model: match m {
                    Some(Arena::BF16(m)) => ModelCopy::BF16(m),
                    Some(Arena::F16(m)) => ModelCopy::F16(m),
                    _ => ModelCopy::None,
                },
            },
            (HostMasters::Remainders(r), Some(Arena::BF16(w))) => Weights::Remainders { w, r },
            (HostMasters::Stochastic { seed }, Some(Arena::BF16(w))) => Weights::Stochastic {
                w,
                seed: *seed,
                step,
                first,
            },
            // `HostMasters::new` builds bf16 weights beside every kind but fp32.
            (_, _) => return Err(weights_missing()),
        })
    }

    /// Splits before element `at`.
    pub(super) fn split_at(self, at: usize) -> (Self, Self) {
        match self {
            Weights::Masters { p, model } => {
                let (p0, p1) = split(p, at);
                let (m0, m1) = match model {
                    ModelCopy::None => (ModelCopy::None, ModelCopy::None),
                    ModelCopy::BF16(m) => {
                        let (a, b) = split(m, at);
                        (ModelCopy::BF16(a), ModelCopy::BF16(b))
                    }
                    ModelCopy::F16(m) => {
                        let (a, b) = split(m, at);
                        (ModelCopy::F16(a), ModelCopy::F16(b))
                    }
                };
                (
                    Weights::Masters { p: p0, model: m0 },
                    Weights::Masters { p: p1, model: m1 },
                )
            }
            Weights::Remainders { w, r } => {
                let ((w0, w1), (r0, r1)) = (split(w, at), split(r, at));
                (
                    Weights::Remainders { w: w0, r: r0 },
                    Weights::Remainders { w: w1, r: r1 },
                )
            }
            Weights::Stochastic {
                w,
                seed,
                step,
                first,
            } => {
                let (w0, w1) = split(w, at);
                let at = w0.len() as u64;
                (
                    Weights::Stochastic {
                        w: w0,
                        seed,
                        step,
                        first,
                    },
                    Weights::Stochastic {
                        w: w1,
                        seed,
                        step,
                        first: first + at,
                    },
                )
            }
        }
    }

    /// Each chunk of `c` elements, in order, as rayon's parallel iterator.
    pub(super) fn par_chunks(self, c: usize) -> impl IndexedParallelIterator<Item = Weights<'a>> {
        match self {
            Weights::Masters { p, model } => Either::Left(match model {
                ModelCopy::None => Either::Left(p.par_chunks_mut(c).map(|p| Weights::Masters {
                    p,
                    model: ModelCopy::None,
                })),
                ModelCopy::BF16(m) => Either::Right(Either::Left(
                    p.par_chunks_mut(c)
                        .zip(m.par_chunks_mut(c))
                        .map(|(p, m)| Weights::Masters {
                            p,
                            model: ModelCopy::BF16(m),
                        }),
                )),
                ModelCopy::F16(m) => Either::Right(Either::Right(
                    p.par_chunks_mut(c)
                        .zip(m.par_chunks_mut(c))
                        .map(|(p, m)| Weights::Masters {
                            p,
                            model: ModelCopy::F16(m),
                        }),
                )),
            }),
            Weights::Remainders { w, r } => Either::Right(Either::Left(
                w.par_chunks_mut(c)
                    .zip(r.par_chunks_mut(c))
                    .map(|(w, r)| Weights::Remainders { w, r }),
            )),
            Weights::Stochastic {
                w,
                seed,
                step,
                first,
            } => Either::Right(Either::Right(w.par_chunks_mut(c).enumerate().map(
                move |(i, w)| Weights::Stochastic {
                    w,
                    seed,
                    step,
                    first: first + (i * c) as u64,
                },
            ))),
        }
    }

    /// Runs `f` on the fp32 masters of `range`, given with the range they cover (all of it for
    /// fp32 masters, a stage at a time otherwise), and stores the result back: the model copy
    /// rounded to nearest, the weights and remainders split, or the weights rounded
    /// stochastically.
    #[inline]
    pub(super) fn update(
        &mut self,
        range: Range<usize>,
        mut f: impl FnMut(&mut [f32], Range<usize>),
    ) {
        match self {
            Weights::Masters { p, model } => {
                f(&mut p[range.clone()], range.clone());
                let p = &p[range.clone()];
                match model {
                    ModelCopy::None => {}
                    ModelCopy::BF16(m) => round_into(&mut m[range], p),
                    ModelCopy::F16(m) => round_into(&mut m[range], p),
                }
            }
            Weights::Remainders { w, r } => {
                let mut stage = [0.0f32; STAGE];
                for at in range.clone().step_by(STAGE) {
                    let sub = at..(at + STAGE).min(range.end);
                    let x = &mut stage[..sub.len()];
                    for ((x, &w), &r) in x.iter_mut().zip(&w[sub.clone()]).zip(&r[sub.clone()]) {
                        *x = join_master(w, r);
                    }
                    f(x, sub.clone());
                    for ((&x, w), r) in x.iter().zip(&mut w[sub.clone()]).zip(&mut r[sub]) {
                        (*w, *r) = split_master(x);
                    }
                }
            }
            Weights::Stochastic {
                w,
                seed,
                step,
                first,
            } => {
                let mut stage = [0.0f32; STAGE];
                for at in range.clone().step_by(STAGE) {
                    let sub = at..(at + STAGE).min(range.end);
                    let x = &mut stage[..sub.len()];
                    for (x, &w) in x.iter_mut().zip(&w[sub.clone()]) {
                        *x = w.to_f32();
                    }
                    f(x, sub.clone());
                    round_slice_bf16(x, &mut w[sub], *seed, *step, *first + at as u64);
                }
            }
        }
    }
}
