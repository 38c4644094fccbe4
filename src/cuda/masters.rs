//! The masters in device memory, the twin of [`crate::masters::HostMasters`]: fp32, int16
//! remainders beside the bf16 weights of the model arena, or the bf16 weights alone. Reads and
//! writes convert on the host, through the host's own join and split.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchArgs, PushKernelArg};
use half::bf16;

use super::arena::{cut, DeviceArena};
use super::engine::{push_arena, DeviceArenas};
use super::runtime::driver_error;
use crate::arena::Arena;
use crate::error::Result;
use crate::masters::{weights_missing, HostMasters, Masters};
use crate::Device;

#[derive(Debug)]
pub(crate) enum DeviceMasters {
    F32(CudaSlice<f32>),
    Remainders(CudaSlice<i16>),
    Stochastic {
        seed: u64,
    },
    /// Kept as this kind in the shards of a sharded group (see [`HostMasters::InShards`]): the set
    /// holds the model weights only, and no optimizer steps it.
    InShards(Masters),
}

impl DeviceMasters {
    pub(crate) fn upload(
        stream: &Arc<CudaStream>,
        host: &HostMasters,
        dev: Device,
    ) -> Result<Self> {
        let bytes = host.bytes();
        Ok(match host {
            HostMasters::F32(v) => {
                DeviceMasters::F32(stream.clone_htod(v).map_err(driver_error(dev, bytes))?)
            }
            HostMasters::Remainders(r) => {
                DeviceMasters::Remainders(stream.clone_htod(r).map_err(driver_error(dev, bytes))?)
            }
            HostMasters::Stochastic { seed } => DeviceMasters::Stochastic { seed: *seed },
            HostMasters::InShards(kind) => DeviceMasters::InShards(*kind),
        })
    }

    /// Elements `range` of the masters, copied into a new allocation (zeros past the end).
    pub(crate) fn window(
        &self,
        stream: &Arc<CudaStream>,
        range: Range<usize>,
        dev: Device,
    ) -> Result<Self> {
        Ok(match self {
            DeviceMasters::F32(s) => DeviceMasters::F32(cut(stream, s, range, dev)?),
            DeviceMasters::Remainders(s) => DeviceMasters::Remainders(cut(stream, s, range, dev)?),
            other => other.without_buffers(),
        })
    }

    /// The same kind, for a kind that holds no device buffer.
    fn without_buffers(&self) -> Self {
        match self {
            DeviceMasters::Stochastic { seed } => DeviceMasters::Stochastic { seed: *seed },
            other => DeviceMasters::InShards(other.kind()),
        }
    }

    pub(crate) fn try_clone(&self, stream: &Arc<CudaStream>, dev: Device) -> Result<Self> {
        Ok(match self {
            DeviceMasters::F32(s) => {
                DeviceMasters::F32(stream.clone_dtod(s).map_err(driver_error(dev, 0))?)
            }
            DeviceMasters::Remainders(s) => {
                DeviceMasters::Remainders(stream.clone_dtod(s).map_err(driver_error(dev, 0))?)
            }
            other => other.without_buffers(),
        })
    }

    /// The stochastic stream's seed (0 for the other kinds).
    fn seed(&self) -> u64 {
        match self {
            DeviceMasters::Stochastic { seed } => *seed,
            _ => 0,
        }
    }

    pub(crate) fn kind(&self) -> Masters {
        match self {
            DeviceMasters::F32(_) => Masters::F32,
            DeviceMasters::Remainders(_) => Masters::Bf16Remainders,
            DeviceMasters::Stochastic { seed } => Masters::Bf16Stochastic { seed: *seed },
            DeviceMasters::InShards(kind) => *kind,
        }
    }

    /// Bytes the masters themselves take on the device (the bf16 weights not counted).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            DeviceMasters::F32(s) => s.len() * 4,
            DeviceMasters::Remainders(s) => s.len() * 2,
            DeviceMasters::Stochastic { .. } | DeviceMasters::InShards(_) => 0,
        }
    }
}

impl DeviceArenas {
    /// A sharded group's window `range` (the twin of `HostArenas::window`).
    pub(crate) fn window(
        &self,
        stream: &Arc<CudaStream>,
        range: Range<usize>,
        dev: Device,
    ) -> Result<Self> {
        Ok(DeviceArenas {
            masters: self.masters.window(stream, range.clone(), dev)?,
            grads: DeviceArena::filled(stream, self.grads.dtype(), range.len(), 0.0, dev)?,
            model: self
                .model
                .as_ref()
                .map(|m| m.window(stream, range, dev))
                .transpose()?,
        })
    }

    /// A sharded replica's whole model (the twin of `HostArenas::make_model_side`).
    pub(crate) fn make_model_side(
        &mut self,
        stream: &Arc<CudaStream>,
        len: usize,
        dev: Device,
    ) -> Result<()> {
        self.grads = self.grads.window(stream, 0..len, dev)?;
        match &mut self.model {
            Some(m) => {
                *m = m.window(stream, 0..len, dev)?;
                self.masters = DeviceMasters::InShards(self.masters.kind());
            }
            None => self.masters = self.masters.window(stream, 0..len, dev)?,
        }
        Ok(())
    }

    /// The fp32 masters of `range`, copied out (joined or widened when not stored as f32).
    pub(crate) fn read_masters(
        &self,
        stream: &Arc<CudaStream>,
        range: Range<usize>,
        dev: Device,
    ) -> Result<Vec<f32>> {
        let download_weights = || -> Result<Arena> {
            match &self.model {
                Some(DeviceArena::BF16(w)) => Ok(Arena::BF16(
                    stream
                        .clone_dtoh(&w.slice(range.clone()))
                        .map_err(driver_error(dev, 0))?,
                )),
                _ => Err(weights_missing()),
            }
        };
        let host = match &self.masters {
            DeviceMasters::F32(m) => {
                return stream
                    .clone_dtoh(&m.slice(range))
                    .map_err(driver_error(dev, 0))
            }
            DeviceMasters::Remainders(r) => HostMasters::Remainders(
                stream
                    .clone_dtoh(&r.slice(range.clone()))
                    .map_err(driver_error(dev, 0))?,
            ),
            DeviceMasters::Stochastic { seed } => HostMasters::Stochastic { seed: *seed },
            // The model weights alone, of whatever dtype, widened.
            DeviceMasters::InShards(_) => {
                let model = self.model.as_ref().ok_or_else(weights_missing)?;
                return model.read(stream, range, dev);
            }
        };
        let weights = download_weights()?;
        Ok(host.read(Some(&weights), 0..range.len())?.into_owned())
    }

    /// Writes fp32 masters from `start` on, with the weights or model copy (as the host does).
    pub(crate) fn write_masters(
        &mut self,
        stream: &Arc<CudaStream>,
        start: usize,
        values: &[f32],
        dev: Device,
    ) -> Result<()> {
        let range = start..start + values.len();
        if let DeviceMasters::F32(m) = &mut self.masters {
            stream
                .memcpy_htod(values, &mut m.slice_mut(range))
                .map_err(driver_error(dev, 0))?;
            if let Some(model) = &mut self.model {
                model.write(stream, start, values, dev)?;
            }
            return Ok(());
        }
        if let DeviceMasters::InShards(_) = &self.masters {
            let model = self.model.as_mut().ok_or_else(weights_missing)?;
            return model.write(stream, start, values, dev);
        }
        let Some(DeviceArena::BF16(w)) = &mut self.model else {
            return Err(weights_missing());
        };
        // Split or rounded on the host, by the host's own code, then uploaded.
        let mut host = match &self.masters {
            DeviceMasters::Remainders(_) => {
                HostMasters::Remainders(crate::arena::try_filled(values.len(), 0i16)?)
            }
            kind => HostMasters::Stochastic { seed: kind.seed() },
        };
        let mut weights = Arena::BF16(crate::arena::try_filled(values.len(), bf16::ZERO)?);
        host.write(Some(&mut weights), 0, values)?;
        let Arena::BF16(host_w) = &weights else {
            return Err(weights_missing());
        };
        stream
            .memcpy_htod(host_w, &mut w.slice_mut(range.clone()))
            .map_err(driver_error(dev, 0))?;
        if let (DeviceMasters::Remainders(r), HostMasters::Remainders(host_r)) =
            (&mut self.masters, &host)
        {
            stream
                .memcpy_htod(host_r, &mut r.slice_mut(range))
                .map_err(driver_error(dev, 0))?;
        }
        Ok(())
    }
}

/// How the update kernels find the parameters (`Weights` in kernels/update.cuh): the fp32
/// masters or null, the model arena (copy or bf16 weights) or null, the remainders or null, the
/// stochastic stream's seed and the whole-set index of element 0 (its counter's origin), and the
/// kind that says which of them are there.
pub(super) struct WeightArgs<'a> {
    masters: Option<&'a CudaSlice<f32>>,
    model: Option<&'a DeviceArena>,
    remainders: Option<&'a CudaSlice<i16>>,
    seed: u64,
    first: u64,
    kind: i32,
}

impl<'a> WeightArgs<'a> {
    /// The weights of `p`, whose element 0 is element `first` of the whole set.
    pub(super) fn of(p: &'a DeviceArenas, first: u64) -> Result<Self> {
        // `WeightsKind` in kernels/update.cuh.
        const MASTERS: i32 = 0;
        const MASTERS_BF16_COPY: i32 = 1;
        const MASTERS_F16_COPY: i32 = 2;
        const REMAINDERS: i32 = 3;
        const STOCHASTIC: i32 = 4;
        let (masters, remainders, kind) = match (&p.masters, &p.model) {
            (DeviceMasters::F32(m), None) => (Some(m), None, MASTERS),
            (DeviceMasters::F32(m), Some(DeviceArena::BF16(_))) => {
                (Some(m), None, MASTERS_BF16_COPY)
            }
            (DeviceMasters::F32(m), Some(_)) => (Some(m), None, MASTERS_F16_COPY),
            (DeviceMasters::Remainders(r), _) => (None, Some(r), REMAINDERS),
            (DeviceMasters::Stochastic { .. }, _) => (None, None, STOCHASTIC),
            (DeviceMasters::InShards(_), _) => {
                return Err(crate::error::Error::Cuda(
                    "internal: a sharded group's model side is never stepped".into(),
                ))
            }
        };
        Ok(WeightArgs {
            masters,
            model: p.model.as_ref(),
            remainders,
            seed: p.masters.seed(),
            first,
            kind,
        })
    }

    pub(super) fn push_masters(&self, b: &mut LaunchArgs<'a>, null: &'a u64) {
        match self.masters {
            Some(m) => b.arg(m),
            None => b.arg(null),
        };
    }

    pub(super) fn push_rest(&'a self, b: &mut LaunchArgs<'a>, null: &'a u64) {
        match self.model {
            Some(m) => push_arena(b, m),
            None => {
                b.arg(null);
            }
        }
        match self.remainders {
            Some(r) => b.arg(r),
            None => b.arg(null),
        };
        b.arg(&self.seed).arg(&self.first).arg(&self.kind);
    }
}
