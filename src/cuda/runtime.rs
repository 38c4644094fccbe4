//! A CUDA device as fusedopt uses it: the primary context, one stream for everything, and the
//! kernels, loaded from the fatbin build.rs embedded or JIT-compiled from the embedded sources
//! with NVRTC.

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::kernels;
use crate::device::{cuda_device_count, Unavailable};
use crate::error::{Error, Result};
use crate::Device;

/// Maps a driver error, telling out-of-memory apart.
pub(crate) fn driver_error(device: Device, bytes: usize) -> impl FnOnce(DriverError) -> Error {
    move |e| {
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfDeviceMemory { device, bytes }
        } else {
            Error::Cuda(format!("{device}: {e:?}"))
        }
    }
}

#[derive(Debug)]
pub struct CudaRuntime {
    pub(crate) device: Device,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) sm_count: usize,
    pub(crate) capability: (i32, i32),
}

/// One runtime per device, shared by every parameter set on it: all work on a device goes through
/// one stream, in order (so rotated benchmark sets do not overlap, and events time exactly it).
static RUNTIMES: std::sync::Mutex<Vec<std::sync::Weak<CudaRuntime>>> =
    std::sync::Mutex::new(Vec::new());

impl CudaRuntime {
    /// The runtime of device `ordinal`, opened on first use.
    pub fn shared(ordinal: usize) -> Result<Arc<Self>> {
        let mut all = RUNTIMES
            .lock()
            .map_err(|_| Error::Cuda("runtime registry poisoned".into()))?;
        if let Some(rt) = all
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|r| r.device == Device::Cuda(ordinal))
        {
            return Ok(rt);
        }
        let rt = Self::new(ordinal)?;
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&rt));
        Ok(rt)
    }

    /// Opens device `ordinal` after probing that the driver and the device exist (cudarc panics
    /// when the driver library is missing, so nothing is called before the probe).
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        let device = Device::Cuda(ordinal);
        let count = cuda_device_count()?;
        if ordinal >= count {
            return Err(Unavailable::NoSuchDevice { ordinal, count }.into());
        }
        let err = driver_error(device, 0);
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        // SAFETY: every buffer of this runtime is used on its one stream only, so the stream order
        // already orders all accesses; cudarc's cross-stream event tracking would add nothing but
        // per-launch event records (which must not end up inside a captured graph).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_error(device, 0))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_error(device, 0))? as usize;
        let capability = ctx.compute_capability().map_err(driver_error(device, 0))?;
        Ok(Arc::new(CudaRuntime {
            device,
            ctx,
            stream,
            sm_count,
            capability,
        }))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Makes this device's context current on the calling thread: raw driver calls need it, and
    /// they may come from any thread (a data-parallel backward pass runs one per replica).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_error(self.device, 0))
    }

    /// The stream all work on this device is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Loads a translation unit's module: its fatbin when one was embedded, else NVRTC.
    pub(crate) fn module(&self, unit: &str) -> Result<Arc<CudaModule>> {
        let image = kernels::FATBINS.iter().find(|(n, _)| *n == unit);
        let ptx = match image {
            Some((_, bytes)) => Ptx::from_binary(bytes.to_vec()),
            None => self.jit(unit)?,
        };
        self.ctx.load_module(ptx).map_err(|e| {
            Error::KernelLoad(format!(
                "{unit} on {} (sm_{}{}): {e:?}; {}",
                self.device,
                self.capability.0,
                self.capability.1,
                kernels::provenance()
            ))
        })
    }

    /// Compiles `unit.cu` with NVRTC for this device, headers inlined.
    fn jit(&self, unit: &str) -> Result<Ptx> {
        // SAFETY: only tries to dlopen NVRTC by its usual names; nothing runs when it is absent.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::KernelLoad(format!(
                "no fatbin was embedded for '{unit}' (built without nvcc) and NVRTC is not installed"
            )));
        }
        let source = inline_headers(&format!("{unit}.cu"))?;
        let arch: &'static str = match self.capability {
            (9, _) => "sm_90",
            (8, 9) => "sm_89",
            (8, 6) => "sm_86",
            (8, _) => "sm_80",
            _ => "sm_75",
        };
        let options = CompileOptions {
            fmad: Some(false),
            arch: Some(arch),
            options: vec!["-std=c++17".into()],
            name: Some(format!("{unit}.cu")),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(source, options)
            .map_err(|e| Error::KernelLoad(format!("NVRTC failed on {unit}.cu: {e:?}")))
    }

    pub(crate) fn function(&self, module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
        module
            .load_function(name)
            .map_err(|e| Error::KernelLoad(format!("kernel {name}: {e:?}")))
    }
}

/// The embedded source of `file` with its `#include "…"` lines replaced by the headers' text, for
/// NVRTC, which sees one string.
fn inline_headers(file: &str) -> Result<String> {
    let text = kernels::SOURCES
        .iter()
        .find(|(n, _)| *n == file)
        .map(|(_, t)| *t)
        .ok_or_else(|| Error::KernelLoad(format!("no embedded source '{file}'")))?;
    let mut out = String::new();
    for line in text.lines() {
        match line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'))
        {
            Some(header) => out.push_str(&inline_headers(header)?),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

/// An event that can be timed (cudarc's default event has timing disabled, and timing it fails).
fn timing_event(rt: &CudaRuntime) -> Result<cudarc::driver::CudaEvent> {
    rt.ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver_error(rt.device, 0))
}

/// Device time of the work `f` enqueues on device `ordinal`'s stream, in seconds, measured with
/// events recorded before and after it.
pub fn time_on_device(ordinal: usize, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let rt = CudaRuntime::shared(ordinal)?;
    let dev = rt.device;
    let start = timing_event(&rt)?;
    let end = timing_event(&rt)?;
    start.record(&rt.stream).map_err(driver_error(dev, 0))?;
    f()?;
    end.record(&rt.stream).map_err(driver_error(dev, 0))?;
    end.synchronize().map_err(driver_error(dev, 0))?;
    Ok(start.elapsed_ms(&end).map_err(driver_error(dev, 0))? as f64 / 1e3)
}

/// Device-to-device copy bandwidth of CUDA device `ordinal`, in bytes read + written per second:
/// the median of `reps` copies of `bytes / 2` bytes, timed with events on one stream.
pub fn copy_bandwidth(ordinal: usize, bytes: usize, reps: usize) -> Result<f64> {
    let rt = CudaRuntime::shared(ordinal)?;
    let dev = rt.device;
    let n = (bytes / 2 / 4).max(1);
    let src = rt
        .stream
        .alloc_zeros::<f32>(n)
        .map_err(driver_error(dev, n * 4))?;
    let mut dst = rt
        .stream
        .alloc_zeros::<f32>(n)
        .map_err(driver_error(dev, n * 4))?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) + 2 {
        let start = timing_event(&rt)?;
        let end = timing_event(&rt)?;
        start.record(&rt.stream).map_err(driver_error(dev, 0))?;
        rt.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(driver_error(dev, 0))?;
        end.record(&rt.stream).map_err(driver_error(dev, 0))?;
        end.synchronize().map_err(driver_error(dev, 0))?;
        times.push(start.elapsed_ms(&end).map_err(driver_error(dev, 0))? as f64 / 1e3);
    }
    times.drain(..2);
    times.sort_by(f64::total_cmp);
    Ok((2 * n * 4) as f64 / times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    #[test]
    fn headers_are_inlined_for_nvrtc() {
        let src = super::inline_headers("update.cu").unwrap();
        assert!(!src.contains("#include \""));
        assert!(src.contains("struct GroupConfig") && src.contains("struct StepState"));
    }
}
