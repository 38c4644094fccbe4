//! Device arenas: the device twin of [`crate::arena::Arena`], one allocation per arena.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::runtime::{driver_error, CudaRuntime};
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

/// Reads `range` of `src` back as f32 (synchronises the stream).
pub(crate) fn download<T: Element + DeviceRepr>(
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

/// Elements `range` of `src` in a new allocation, zeros where `range` runs past its end.
pub(crate) fn cut<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<T>,
    range: std::ops::Range<usize>,
    dev: Device,
) -> Result<CudaSlice<T>> {
    let bytes = range.len() * std::mem::size_of::<T>();
    let mut out = stream
        .alloc_zeros::<T>(range.len())
        .map_err(driver_error(dev, bytes))?;
    let have = range.start.min(src.len())..range.end.min(src.len());
    if !have.is_empty() {
        stream
            .memcpy_dtod(&src.slice(have.clone()), &mut out.slice_mut(0..have.len()))
            .map_err(driver_error(dev, 0))?;
    }
    Ok(out)
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

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            DeviceArena::F32(s) => s.len(),
            DeviceArena::BF16(s) => s.len(),
            DeviceArena::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Elements `range` in a new allocation on the device (zeros past the end): a shard's window,
    /// or (from 0) the arena padded.
    pub(crate) fn window(
        &self,
        stream: &Arc<CudaStream>,
        range: std::ops::Range<usize>,
        device: Device,
    ) -> Result<Self> {
        Ok(match self {
            DeviceArena::F32(s) => DeviceArena::F32(cut(stream, s, range, device)?),
            DeviceArena::BF16(s) => DeviceArena::BF16(cut(stream, s, range, device)?),
            DeviceArena::F16(s) => DeviceArena::F16(cut(stream, s, range, device)?),
        })
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

impl DeviceArena {
    /// Consecutive disjoint ranges of the arena, of the given lengths, as buffers collectives can
    /// use at the same time (one per all-reduce bucket).
    pub fn split_buffers<'a>(
        &'a mut self,
        rt: &'a Arc<CudaRuntime>,
        lens: &[usize],
    ) -> Result<Vec<DeviceBuffer<'a>>> {
        let dtype = self.dtype();
        let (base, len) = {
            let stream = &rt.stream;
            match &*self {
                DeviceArena::F32(s) => (s.device_ptr(stream).0, s.len()),
                DeviceArena::BF16(s) => (s.device_ptr(stream).0, s.len()),
                DeviceArena::F16(s) => (s.device_ptr(stream).0, s.len()),
            }
        };
        crate::error::check_len("device buffer split", len, lens.iter().sum())?;
        let mut at = 0;
        Ok(lens
            .iter()
            .map(|&n| {
                let b = DeviceBuffer {
                    ptr: base + (at * dtype.size_bytes()) as u64,
                    len: n,
                    dtype,
                    rt,
                    _arena: PhantomData,
                };
                at += n;
                b
            })
            .collect())
    }
}

/// A range of a device arena, used in the order of its runtime's stream. It is a raw pointer
/// rather than a cudarc view so that several disjoint ranges of one arena can be lent at once;
/// the borrow of the arena keeps it alive and unaliased for `'a`.
#[derive(Debug)]
pub struct DeviceBuffer<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    rt: &'a Arc<CudaRuntime>,
    _arena: PhantomData<&'a mut DeviceArena>,
}

impl<'a> DeviceBuffer<'a> {
    /// All of `s`, as elements of `dtype`: its own, or (for a collective that only moves data,
    /// such as an all-gather, which copies bits) words of another type.
    pub(crate) fn over<T: DeviceRepr>(
        s: &'a mut CudaSlice<T>,
        dtype: DType,
        rt: &'a Arc<CudaRuntime>,
    ) -> Self {
        DeviceBuffer {
            ptr: s.device_ptr(&rt.stream).0,
            len: s.len() * std::mem::size_of::<T>() / dtype.size_bytes(),
            dtype,
            rt,
            _arena: PhantomData,
        }
    }

    /// The first `len` elements.
    pub(crate) fn first(self, len: usize) -> Self {
        DeviceBuffer {
            len: len.min(self.len),
            ..self
        }
    }
}

impl DeviceBuffer<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.rt.device
    }

    /// A shorter-lived handle on the same memory, to pass to one collective and keep using after.
    pub fn reborrow(&mut self) -> DeviceBuffer<'_> {
        DeviceBuffer {
            ptr: self.ptr,
            len: self.len,
            dtype: self.dtype,
            rt: self.rt,
            _arena: PhantomData,
        }
    }

    /// The device address of the first element.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Writes f32 `values` from element `at` on, rounded to the buffer's dtype, in stream order.
    pub fn write_range(&mut self, at: usize, values: &[f32]) -> Result<()> {
        crate::error::check_range("device buffer write", at, values.len(), self.len)?;
        fn put<T: Element>(buf: &DeviceBuffer<'_>, at: usize, values: &[f32]) -> Result<()> {
            let mut host = vec![T::from_f32(0.0); values.len()];
            crate::dtype::round_into(&mut host, values);
            let dst = buf.ptr + (at * std::mem::size_of::<T>()) as u64;
            buf.rt.bind()?;
            // SAFETY: `dst .. dst + values.len()` lies inside this buffer (checked above), which
            // the arena borrow keeps allocated and lent to nobody else. A copy from pageable host
            // memory returns only once the source has been staged, so `host` may then be dropped.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dst, &host, buf.rt.stream.cu_stream())
            }
            .map_err(driver_error(buf.rt.device, 0))
        }
        match self.dtype {
            DType::F32 => put::<f32>(self, at, values),
            DType::BF16 => put::<bf16>(self, at, values),
            DType::F16 => put::<f16>(self, at, values),
        }
    }
}
