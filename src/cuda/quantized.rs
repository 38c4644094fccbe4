//! Quantized optimizer state in device memory: each buffer's codes, block scales, f32 part and
//! code table, laid out by the same [`QuantizedLayout`] as on the host (built over the CUDA
//! plan), and the piece table the quantized update launches one block per piece over. Buffers
//! start from the host's initial state and travel whole to and from the host for checkpoints and
//! reads, so both engines hold the same bytes.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::abi::DevicePiece;
use super::runtime::driver_error;
use crate::error::Result;
use crate::host::quantized_state::{QuantizedBuffer, QuantizedLayout};
use crate::lean::QuantMap;
use crate::Device;

/// One quantized buffer on the device.
pub(super) struct DeviceBuffer {
    map: QuantMap,
    pub(super) codes: CudaSlice<u8>,
    pub(super) scales: CudaSlice<f32>,
    pub(super) full: CudaSlice<f32>,
    pub(super) table: CudaSlice<f32>,
}

/// Every quantized buffer of one optimizer on the device, and its piece table.
pub(crate) struct DeviceQuantized {
    pub layout: Arc<QuantizedLayout>,
    pub(super) pieces: CudaSlice<DevicePiece>,
    pub(super) buffers: Vec<DeviceBuffer>,
}

/// A host slice on the device; CUDA refuses zero-length allocations, so an empty one holds one
/// element (never read).
fn upload<T: cudarc::driver::DeviceRepr + Default + Clone>(
    stream: &Arc<CudaStream>,
    host: &[T],
    device: Device,
) -> Result<CudaSlice<T>> {
    let one = [T::default()];
    let host = if host.is_empty() { &one[..] } else { host };
    stream
        .clone_htod(host)
        .map_err(driver_error(device, std::mem::size_of_val(host)))
}

impl DeviceQuantized {
    /// `buffers` (the initial state, built on the host over `layout`) copied to the device.
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        layout: Arc<QuantizedLayout>,
        buffers: &[QuantizedBuffer],
        device: Device,
    ) -> Result<Self> {
        let mut full = 0u64;
        let pieces: Vec<DevicePiece> = layout
            .pieces()
            .iter()
            .map(|p| {
                let d = DevicePiece {
                    start: p.start as u64,
                    full,
                    // A piece lies inside one chunk (at most 2^16 elements on a GPU).
                    len: p.len as u32,
                    group: p.group as u32,
                    coded: p.quantized as u32,
                    unused: 0,
                };
                if !p.quantized {
                    full += p.len as u64;
                }
                d
            })
            .collect();
        let pieces = upload(stream, &pieces, device)?;
        let buffers = buffers
            .iter()
            .map(|b| {
                Ok(DeviceBuffer {
                    map: b.map,
                    codes: upload(stream, &b.codes, device)?,
                    scales: upload(stream, &b.scales, device)?,
                    full: upload(stream, &b.full, device)?,
                    table: upload(stream, b.map.values(), device)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(DeviceQuantized {
            layout,
            pieces,
            buffers,
        })
    }

    /// Pieces to launch one block over.
    pub(crate) fn num_pieces(&self) -> usize {
        self.layout.pieces().len()
    }

    /// Bytes of device memory the buffers hold.
    pub(crate) fn bytes(&self) -> usize {
        self.buffers
            .iter()
            .map(|b| b.codes.len() + 4 * (b.scales.len() + b.full.len()))
            .sum()
    }

    /// The buffers copied to the host (synchronises the stream).
    pub(crate) fn download(
        &self,
        stream: &Arc<CudaStream>,
        device: Device,
    ) -> Result<Vec<QuantizedBuffer>> {
        let err = |n| driver_error(device, n);
        self.buffers
            .iter()
            .map(|d| {
                let mut codes = stream.clone_dtoh(&d.codes).map_err(err(0))?;
                let mut scales = stream.clone_dtoh(&d.scales).map_err(err(0))?;
                let mut full = stream.clone_dtoh(&d.full).map_err(err(0))?;
                // Undo `upload`'s placeholder element of an empty part.
                codes.truncate(self.layout_len(Part::Codes));
                scales.truncate(self.layout_len(Part::Scales));
                full.truncate(self.layout.full_len());
                Ok(QuantizedBuffer {
                    map: d.map,
                    codes,
                    scales,
                    full,
                })
            })
            .collect()
    }

    /// Overwrites the buffers with `host` ones of the same layout, in stream order.
    pub(crate) fn upload_from(
        &mut self,
        stream: &Arc<CudaStream>,
        host: &[QuantizedBuffer],
        device: Device,
    ) -> Result<()> {
        let err = |n| driver_error(device, n);
        for (d, h) in self.buffers.iter_mut().zip(host) {
            if !h.codes.is_empty() {
                stream.memcpy_htod(&h.codes, &mut d.codes).map_err(err(0))?;
            }
            if !h.scales.is_empty() {
                stream
                    .memcpy_htod(&h.scales, &mut d.scales)
                    .map_err(err(0))?;
            }
            if !h.full.is_empty() {
                stream.memcpy_htod(&h.full, &mut d.full).map_err(err(0))?;
            }
        }
        Ok(())
    }

    fn layout_len(&self, part: Part) -> usize {
        let arena = self.layout.arena_len();
        match part {
            Part::Codes => self.layout.format.code_bytes(arena),
            Part::Scales => arena.div_ceil(self.layout.format.block()),
        }
    }
}

enum Part {
    Codes,
    Scales,
}
