//! Typed arenas: one contiguous buffer of one element type, laid out by a [`crate::Layout`].
//! Parameters (fp32 masters), gradients, optimizer state and the low-precision model copy are each
//! one arena, in the dtype the user chose for them.

use half::{bf16, f16};

use crate::dtype::round_into;
use crate::error::{Error, Result};
use crate::{DType, Element};

/// A host arena of one dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Arena {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A copy of `items`, or a typed error when the memory is not there (never an abort).
pub(crate) fn try_to_vec<T: Clone>(items: &[T]) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(items.len())
        .map_err(|_| Error::OutOfHostMemory {
            bytes: std::mem::size_of_val(items),
        })?;
    v.extend_from_slice(items);
    Ok(v)
}

/// A vector of `len` copies of `value` rounded to `T`, or a typed error when the memory is not
/// there (never an abort).
pub(crate) fn filled<T: Element>(len: usize, value: f32) -> Result<Vec<T>> {
    try_filled(len, T::from_f32(value))
}

/// A vector of `len` copies of `value`, or a typed error when the memory is not there (never an
/// abort).
pub(crate) fn try_filled<T: Clone>(len: usize, value: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::OutOfHostMemory {
            bytes: len.saturating_mul(std::mem::size_of::<T>()),
        })?;
    v.resize(len, value);
    Ok(v)
}

impl Arena {
    /// `len` elements of `dtype`, all `value` (rounded to nearest even); a typed error when the
    /// memory is not there, never an abort.
    pub fn filled(dtype: DType, len: usize, value: f32) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Arena::F32(filled(len, value)?),
            DType::BF16 => Arena::BF16(filled(len, value)?),
            DType::F16 => Arena::F16(filled(len, value)?),
        })
    }

    /// A copy, or a typed error when the memory is not there (never an abort).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(match self {
            Arena::F32(v) => Arena::F32(try_to_vec(v)?),
            Arena::BF16(v) => Arena::BF16(try_to_vec(v)?),
            Arena::F16(v) => Arena::F16(try_to_vec(v)?),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Arena::F32(_) => DType::F32,
            Arena::BF16(_) => DType::BF16,
            Arena::F16(_) => DType::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Arena::F32(v) => v.len(),
            Arena::BF16(v) => v.len(),
            Arena::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The little-endian bytes of elements `range`, as stored.
    pub(crate) fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        match self {
            Arena::F32(v) => bytemuck::cast_slice(&v[range]),
            Arena::BF16(v) => bytemuck::cast_slice(&v[range]),
            Arena::F16(v) => bytemuck::cast_slice(&v[range]),
        }
    }

    /// Overwrites elements from `start` on with `bytes` of this arena's dtype, as stored.
    pub(crate) fn write_bytes(&mut self, start: usize, bytes: &[u8]) {
        fn copy<T: bytemuck::Pod>(dst: &mut [T], bytes: &[u8]) {
            bytemuck::cast_slice_mut::<T, u8>(dst).copy_from_slice(bytes);
        }
        let n = bytes.len() / self.dtype().size_bytes();
        match self {
            Arena::F32(v) => copy(&mut v[start..start + n], bytes),
            Arena::BF16(v) => copy(&mut v[start..start + n], bytes),
            Arena::F16(v) => copy(&mut v[start..start + n], bytes),
        }
    }

    /// The elements as `T`, or a dtype mismatch naming `what`.
    pub fn typed<T: Element>(&self, what: &str) -> Result<&[T]> {
        if self.dtype() != T::DTYPE {
            return Err(self.mismatch::<T>(what));
        }
        // The same element type: the cast only renames it.
        Ok(bytemuck::cast_slice(self.bytes(0..self.len())))
    }

    pub fn typed_mut<T: Element>(&mut self, what: &str) -> Result<&mut [T]> {
        if self.dtype() != T::DTYPE {
            return Err(self.mismatch::<T>(what));
        }
        Ok(match self {
            Arena::F32(v) => bytemuck::cast_slice_mut(v),
            Arena::BF16(v) => bytemuck::cast_slice_mut(v),
            Arena::F16(v) => bytemuck::cast_slice_mut(v),
        })
    }

    fn mismatch<T: Element>(&self, what: &str) -> Error {
        Error::DTypeMismatch {
            what: what.to_string(),
            expected: self.dtype(),
            got: T::DTYPE,
        }
    }

    /// Reads `range` as f32.
    pub fn to_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            Arena::F32(v) => v[range].to_vec(),
            Arena::BF16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            Arena::F16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Writes f32 `values` into `range`, rounding to nearest even.
    pub fn write_f32(&mut self, start: usize, values: &[f32]) {
        let end = start + values.len();
        match self {
            Arena::F32(v) => round_into(&mut v[start..end], values),
            Arena::BF16(v) => round_into(&mut v[start..end], values),
            Arena::F16(v) => round_into(&mut v[start..end], values),
        }
    }

    /// A copy of elements `range` (zeros where it passes the end).
    pub(crate) fn window(&self, range: std::ops::Range<usize>) -> Result<Self> {
        let mut out = Arena::filled(self.dtype(), range.len(), 0.0)?;
        let len = self.len();
        out.write_bytes(0, self.bytes(range.start.min(len)..range.end.min(len)));
        Ok(out)
    }

    /// Pads with zeros to `len` elements.
    pub(crate) fn pad_to(&mut self, len: usize) -> Result<()> {
        if len > self.len() {
            let mut longer = self.window(0..len)?;
            std::mem::swap(self, &mut longer);
        }
        Ok(())
    }

    /// Sets every element to `value` (rounded to the dtype).
    pub fn fill(&mut self, value: f32) {
        match self {
            Arena::F32(v) => v.fill(value),
            Arena::BF16(v) => v.fill(bf16::from_f32(value)),
            Arena::F16(v) => v.fill(f16::from_f32(value)),
        }
    }
}
