//! Device arenas: the device twin of [`crate::arena::Arena`], one allocation per arena.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use half::{bf16, f16};

use super::runtime::driver_error;
use crate::arena::Arena;
use crate::error::Result;
use crate::{DType, Device, Element};

#[derive(Debug)]
pub enum DeviceArena {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

fn upload<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    host: &[T],
    device: Device,
) -> Result<CudaSlice<T>> {
    stream
        .clone_htod(host)
        .map_err(driver_error(device, std::mem::size_of_val(host)))
}

fn download<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<T>,
    range: std::ops::Range<usize>,
    device: Device,
) -> Result<Vec<f32>> {
    let v = stream
        .clone_dtoh(&src.slice(range))
        .map_err(driver_error(device, 0))?;
    Ok(v.into_iter().map(Element::to_f32).collect())
}

impl DeviceArena {
    /// Copies a host arena to the device. On out-of-memory nothing stays allocated.
    pub fn upload(stream: &Arc<CudaStream>, host: &Arena, device: Device) -> Result<Self> {
        Ok(match host {
            Arena::F32(v) => DeviceArena::F32(upload(stream, v, device)?),
            Arena::BF16(v) => DeviceArena::BF16(upload(stream, v, device)?),
            Arena::F16(v) => DeviceArena::F16(upload(stream, v, device)?),
        })
    }

    /// `len` elements of `dtype`, all `value`.
    pub fn filled(
        stream: &Arc<CudaStream>,
        dtype: DType,
        len: usize,
        value: f32,
        device: Device,
    ) -> Result<Self> {
        Self::upload(stream, &Arena::filled(dtype, len, value)?, device)
    }

    pub fn dtype(&self) -> DType {
        match self {
            DeviceArena::F32(_) => DType::F32,
            DeviceArena::BF16(_) => DType::BF16,
            DeviceArena::F16(_) => DType::F16,
        }
    }

    /// Reads `range` back as f32 (synchronises the stream).
    pub fn read(
        &self,
        stream: &Arc<CudaStream>,
        range: std::ops::Range<usize>,
        device: Device,
    ) -> Result<Vec<f32>> {
        match self {
            DeviceArena::F32(s) => download(stream, s, range, device),
            DeviceArena::BF16(s) => download(stream, s, range, device),
            DeviceArena::F16(s) => download(stream, s, range, device),
        }
    }

    /// Writes f32 `values` at `start`, rounded to the arena's dtype.
    pub fn write(
        &mut self,
        stream: &Arc<CudaStream>,
        start: usize,
        values: &[f32],
        device: Device,
    ) -> Result<()> {
        fn put<T: Element + DeviceRepr>(
            stream: &Arc<CudaStream>,
            dst: &mut CudaSlice<T>,
            start: usize,
            values: &[f32],
            device: Device,
        ) -> Result<()> {
            let mut host = vec![T::from_f32(0.0); values.len()];
            crate::dtype::round_into(&mut host, values);
            stream
                .memcpy_htod(&host, &mut dst.slice_mut(start..start + values.len()))
                .map_err(driver_error(device, 0))
        }
        match self {
            DeviceArena::F32(s) => put(stream, s, start, values, device),
            DeviceArena::BF16(s) => put(stream, s, start, values, device),
            DeviceArena::F16(s) => put(stream, s, start, values, device),
        }
    }

    /// Sets every element to zero, in stream order.
    pub fn zero(&mut self, stream: &Arc<CudaStream>, device: Device) -> Result<()> {
        let r = match self {
            DeviceArena::F32(s) => stream.memset_zeros(s),
            DeviceArena::BF16(s) => stream.memset_zeros(s),
            DeviceArena::F16(s) => stream.memset_zeros(s),
        };
        r.map_err(driver_error(device, 0))
    }

    /// A copy on the device.
    pub fn try_clone(&self, stream: &Arc<CudaStream>, device: Device) -> Result<Self> {
        Ok(match self {
            DeviceArena::F32(s) => {
                DeviceArena::F32(stream.clone_dtod(s).map_err(driver_error(device, 0))?)
            }
            DeviceArena::BF16(s) => {
                DeviceArena::BF16(stream.clone_dtod(s).map_err(driver_error(device, 0))?)
            }
            DeviceArena::F16(s) => {
                DeviceArena::F16(stream.clone_dtod(s).map_err(driver_error(device, 0))?)
            }
        })
    }
}
