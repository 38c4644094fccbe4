//! The masters in device memory, the twin of [`crate::masters::HostMasters`]: fp32, int16
//! remainders beside the bf16 weights of the model arena, or the bf16 weights alone. Reads and
//! writes convert on the host, through the host's own join and split.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchArgs, PushKernelArg};
use half::bf16;

use super::arena::DeviceArena;
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
    Stochastic { seed: u64 },
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
            HostMasters::InShards(_) => {
                return Err(crate::error::Error::Cuda(
                    "internal: a sharded group's model-only set is never uploaded".into(),
                ))
            }
        })
    }

    pub(crate) fn try_clone(&self, stream: &Arc<CudaStream>, dev: Device) -> Result<Self> {
        Ok(match self {
            DeviceMasters::F32(s) => {
                DeviceMasters::F32(stream.clone_dtod(s).map_err(driver_error(dev, 0))?)
            }
            DeviceMasters::Remainders(s) => {
                DeviceMasters::Remainders(stream.clone_dtod(s).map_err(driver_error(dev, 0))?)
            }
            DeviceMasters::Stochastic { seed } => DeviceMasters::Stochastic { seed: *seed },
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
        }
    }
}

impl DeviceArenas {
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
/// stochastic stream's seed, and the kind that says which of them are there.
pub(super) struct WeightArgs<'a> {
    masters: Option<&'a CudaSlice<f32>>,
    model: Option<&'a DeviceArena>,
    remainders: Option<&'a CudaSlice<i16>>,
    seed: u64,
    kind: i32,
}

impl<'a> WeightArgs<'a> {
    pub(super) fn of(p: &'a DeviceArenas) -> Self {
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
        };
        WeightArgs {
            masters,
            model: p.model.as_ref(),
            remainders,
            seed: p.masters.seed(),
            kind,
        }
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
        b.arg(&self.seed).arg(&self.kind);
    }
}
