//! How a parameter set keeps its fp32 master weights: as fp32 (beside an optional low-precision
//! model copy), as the bf16 model weights plus a 16-bit remainder each (the exact fp32 master in
//! 4 bytes, TransformerEngine's `store_param_remainders`), or not at all (pure bf16 weights,
//! updated in f32 and stochastically rounded back, torchao's `bf16_stochastic_round`).
//!
//! Without fp32 masters the bf16 weights live in the model-copy arena and the step reads and
//! writes them there; `ParamSet::read_param` and `write_param` still speak fp32 (joined or
//! widened, split or rounded), and checkpoints store fp32 masters whatever the storage, so a
//! checkpoint loads into a set that keeps its masters differently.

use std::borrow::Cow;
use std::ops::Range;

use half::bf16;

use crate::arena::{self, Arena};
use crate::error::{Error, Result};
use crate::lean::remainder::{join_master, split_master};
use crate::DType;

/// How the fp32 master weights are stored (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Masters {
    /// fp32 masters, 4 bytes per parameter, plus the model copy when one is asked for.
    #[default]
    F32,
    /// The bf16 weights and an int16 remainder: the fp32 master exactly, in 4 bytes per parameter
    /// in all. The weight is the master rounded to the nearest bf16 (ties away from zero).
    Bf16Remainders,
    /// The bf16 weights alone, 2 bytes per parameter: each step updates them in f32 and rounds
    /// the result to bf16 stochastically, from a counter-based stream of `seed` that gives every
    /// element its own draw at every step (the same bits on every engine and run).
    Bf16Stochastic { seed: u64 },
}

impl Masters {
    /// The dtype of the model weights this storage needs, if it needs one.
    pub(crate) fn weights_dtype(self) -> Option<DType> {
        match self {
            Masters::F32 => None,
            _ => Some(DType::BF16),
        }
    }

    /// Bytes per parameter of the masters themselves (the bf16 weights not counted).
    pub fn bytes_per_param(self) -> usize {
        match self {
            Masters::F32 => 4,
            Masters::Bf16Remainders => 2,
            Masters::Bf16Stochastic { .. } => 0,
        }
    }
}

/// The masters in host memory; without fp32 masters the bf16 weights are the model-copy arena.
#[derive(Clone, Debug)]
pub(crate) enum HostMasters {
    F32(Vec<f32>),
    Remainders(Vec<i16>),
    Stochastic {
        seed: u64,
    },
    /// Kept as this kind in the shards of a sharded group: the set holds the model weights only
    /// (read widened, written rounded to nearest even), and no optimizer steps it.
    InShards(Masters),
}

/// The masters in host memory beside the model arena that holds their bf16 weights (if any).
pub(crate) type HostWeights<'a> = (&'a HostMasters, Option<&'a Arena>);

/// Masters kept without fp32 always come with bf16 weights ([`HostMasters::new`] builds them
/// together); their absence is a bug in fusedopt.
pub(crate) fn weights_missing() -> Error {
    Error::Cuda("internal: bf16 weights missing beside the masters".into())
}

impl HostMasters {
    /// The masters of `values` stored as `kind`, and the model arena (`model_dtype` for fp32
    /// masters, the bf16 weights otherwise).
    pub(crate) fn new(
        kind: Masters,
        values: Vec<f32>,
        model_dtype: Option<DType>,
    ) -> Result<(Self, Option<Arena>)> {
        let len = values.len();
        let mut model = match kind.weights_dtype().or(model_dtype) {
            Some(dtype) => Some(Arena::filled(dtype, len, 0.0)?),
            None => None,
        };
        let mut masters = match kind {
            Masters::F32 => {
                if let Some(m) = &mut model {
                    m.write_f32(0, &values);
                }
                return Ok((HostMasters::F32(values), model));
            }
            Masters::Bf16Remainders => HostMasters::Remainders(arena::try_filled(len, 0i16)?),
            Masters::Bf16Stochastic { seed } => HostMasters::Stochastic { seed },
        };
        masters.write(model.as_mut(), 0, &values)?;
        Ok((masters, model))
    }

    pub(crate) fn kind(&self) -> Masters {
        match self {
            HostMasters::F32(_) => Masters::F32,
            HostMasters::Remainders(_) => Masters::Bf16Remainders,
            HostMasters::Stochastic { seed } => Masters::Bf16Stochastic { seed: *seed },
            HostMasters::InShards(kind) => *kind,
        }
    }

    /// A copy of elements `range` (zeros where it passes the end).
    pub(crate) fn window(&self, range: Range<usize>) -> Result<Self> {
        fn cut<T: Copy + Default>(v: &[T], range: Range<usize>) -> Result<Vec<T>> {
            let mut out = arena::try_filled(range.len(), T::default())?;
            let have = &v[range.start.min(v.len())..range.end.min(v.len())];
            out[..have.len()].copy_from_slice(have);
            Ok(out)
        }
        Ok(match self {
            HostMasters::F32(v) => HostMasters::F32(cut(v, range)?),
            HostMasters::Remainders(r) => HostMasters::Remainders(cut(r, range)?),
            other => other.clone(),
        })
    }

    /// Pads the masters with zeros to `len` elements.
    pub(crate) fn pad_to(&mut self, len: usize) -> Result<()> {
        fn pad<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> Result<()> {
            let more = len.saturating_sub(v.len());
            v.try_reserve_exact(more)
                .map_err(|_| Error::OutOfHostMemory {
                    bytes: more.saturating_mul(std::mem::size_of::<T>()),
                })?;
            v.resize(v.len() + more, T::default());
            Ok(())
        }
        match self {
            HostMasters::F32(v) => pad(v, len),
            HostMasters::Remainders(r) => pad(r, len),
            _ => Ok(()),
        }
    }

    /// The fp32 masters in place, when they are stored as such.
    pub(crate) fn as_f32(&self) -> Result<&[f32]> {
        match self {
            HostMasters::F32(v) => Ok(v),
            _ => Err(Error::MastersNotF32(self.kind())),
        }
    }

    pub(crate) fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        match self {
            HostMasters::F32(v) => Ok(v),
            _ => Err(Error::MastersNotF32(self.kind())),
        }
    }

    /// The fp32 masters of `range`: borrowed when stored as f32, else joined or widened from the
    /// bf16 weights in `model`.
    pub(crate) fn read<'a>(
        &'a self,
        model: Option<&'a Arena>,
        range: Range<usize>,
    ) -> Result<Cow<'a, [f32]>> {
        let weights = || model.ok_or_else(weights_missing);
        match self {
            HostMasters::F32(v) => Ok(Cow::Borrowed(&v[range])),
            HostMasters::Remainders(r) => {
                let w = weights()?.typed::<bf16>("weights")?;
                let mut out = arena::try_filled(range.len(), 0.0f32)?;
                for ((o, &w), &r) in out.iter_mut().zip(&w[range.clone()]).zip(&r[range]) {
                    *o = join_master(w, r);
                }
                Ok(Cow::Owned(out))
            }
            HostMasters::Stochastic { .. } | HostMasters::InShards(_) => {
                Ok(Cow::Owned(weights()?.to_f32(range)))
            }
        }
    }

    /// Writes fp32 masters from element `start` on, and the weights or model copy with them:
    /// split (exactly) into weight and remainder, or rounded to the nearest bf16.
    pub(crate) fn write(
        &mut self,
        model: Option<&mut Arena>,
        start: usize,
        values: &[f32],
    ) -> Result<()> {
        let range = start..start + values.len();
        if let HostMasters::F32(v) = self {
            v[range].copy_from_slice(values);
            if let Some(m) = model {
                m.write_f32(start, values);
            }
            return Ok(());
        }
        let model = model.ok_or_else(weights_missing)?;
        if let HostMasters::InShards(_) = self {
            model.write_f32(start, values);
            return Ok(());
        }
        let w = model.typed_mut::<bf16>("weights")?;
        match self {
            HostMasters::Remainders(r) => {
                for ((w, r), &v) in w[range.clone()].iter_mut().zip(&mut r[range]).zip(values) {
                    (*w, *r) = split_master(v);
                }
            }
            _ => w[range]
                .iter_mut()
                .zip(values)
                .for_each(|(w, &v)| *w = bf16::from_f32(v)),
        }
        Ok(())
    }

    /// Bytes the masters themselves take (the bf16 weights not counted).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            HostMasters::F32(v) => std::mem::size_of_val(&v[..]),
            HostMasters::Remainders(r) => std::mem::size_of_val(&r[..]),
            HostMasters::Stochastic { .. } | HostMasters::InShards(_) => 0,
        }
    }
}
