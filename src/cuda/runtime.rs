//! A CUDA device as fusedopt uses it: the primary context, one stream for everything, and the
//! kernels, loaded once per device from the fatbin build.rs embedded, or compiled from the
//! embedded sources with NVRTC once per process and architecture.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use super::{kernels, nvrtc};
use crate::device::{cuda_device_count, Unavailable};
use crate::error::{Error, Result};
use crate::rules::GeneratedFamily;
use crate::Device;

/// Maps a driver error, telling out-of-memory apart.
pub(crate) fn driver_error(device: Device, bytes: usize) -> impl FnOnce(DriverError) -> Error {
    move |e| {
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfDeviceMemory { device, bytes }
        } else {
            Error::Driver {
                device,
                code: e.0 as i32,
                name: format!("{:?}", e.0),
            }
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
    /// Modules loaded on this device, by translation unit: each is loaded once.
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
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
            modules: Mutex::new(HashMap::new()),
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

    /// A translation unit's module, loaded on first use: its fatbin when one was embedded, else
    /// NVRTC's output for this device.
    pub(crate) fn module(&self, unit: &'static str) -> Result<Arc<CudaModule>> {
        self.loaded(unit, || {
            match kernels::FATBINS.iter().find(|(n, _)| *n == unit) {
                Some((_, bytes)) => Ok(bytes.to_vec()),
                None => compiled_by_nvrtc(unit, self.capability, || {
                    inline_headers(&format!("{unit}.cu"))
                })
                .map_err(|f| f.for_built_in(&format!("{unit}.cu"))),
            }
        })
    }

    /// The module of a kernel family the build did not compile (a custom rule's): the update
    /// template with the family's source, compiled by NVRTC at first use (once per process and
    /// architecture) and loaded once per device.
    pub(crate) fn generated_module(&self, g: &GeneratedFamily) -> Result<Arc<CudaModule>> {
        self.loaded(g.family, || {
            compiled_by_nvrtc(g.family, self.capability, || {
                Ok(inline_headers("update.cuh")? + &g.source)
            })
            .map_err(|f| match f {
                nvrtc::Failure::Unusable(why) => g.unusable(&why),
                nvrtc::Failure::Rejected { log, .. } => g.rejected("NVRTC", &log),
            })
        })
    }

    /// `unit`'s module on this device, loading `image()` the first time.
    fn loaded(
        &self,
        unit: &'static str,
        image: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| Error::Cuda("module cache poisoned".into()))?;
        if let Some(m) = modules.get(unit) {
            return Ok(m.clone());
        }
        let module = self
            .ctx
            .load_module(Ptx::from_binary(image()?))
            .map_err(|e| {
                Error::KernelLoad(format!(
                    "{unit} on {} (sm_{}{}): {e:?}; {}",
                    self.device,
                    self.capability.0,
                    self.capability.1,
                    kernels::provenance()
                ))
            })?;
        modules.insert(unit, module.clone());
        Ok(module)
    }

    pub(crate) fn function(&self, module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
        module
            .load_function(name)
            .map_err(|e| Error::KernelLoad(format!("kernel {name}: {e:?}")))
    }
}

/// NVRTC's image of `unit` (whose source is `source()`) for compute capability `cc`: compiled
/// once per process (every device of one architecture, and every runtime opened later, reuses
/// it).
fn compiled_by_nvrtc(
    unit: &str,
    cc: (i32, i32),
    source: impl FnOnce() -> Result<String>,
) -> std::result::Result<Vec<u8>, nvrtc::Failure> {
    type Images = Mutex<HashMap<(String, (i32, i32)), Arc<Vec<u8>>>>;
    static IMAGES: std::sync::OnceLock<Images> = std::sync::OnceLock::new();
    // Held while compiling: threads wanting the same unit wait for one compilation.
    let mut images = IMAGES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| nvrtc::Failure::Unusable("NVRTC image cache poisoned".into()))?;
    let key = (unit.to_string(), cc);
    if let Some(image) = images.get(&key) {
        return Ok(image.to_vec());
    }
    let source = source().map_err(|e| nvrtc::Failure::Unusable(e.to_string()))?;
    let image = Arc::new(nvrtc::compile(&format!("{unit}.cu"), &source, cc)?);
    if let Ok(mut units) = NVRTC_COMPILED.lock() {
        units.push(unit.to_string());
    }
    images.insert(key, image.clone());
    Ok(image.to_vec())
}

/// The units NVRTC compiled in this process, in order.
static NVRTC_COMPILED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The translation units NVRTC has compiled in this process, in order: each appears at most once
/// per architecture, however many optimizers and devices use it (a custom rule's is named
/// `custom_<rule>_<hash>`).
pub fn nvrtc_compiled() -> Vec<String> {
    NVRTC_COMPILED
        .lock()
        .map(|units| units.clone())
        .unwrap_or_default()
}

/// The embedded source of `file` with its `#include "…"` lines replaced by the headers' text, for
/// NVRTC, which sees one string. Each header is inlined once, where it is first included, as
/// `#pragma once` makes nvcc do.
fn inline_headers(file: &str) -> Result<String> {
    let mut out = String::new();
    inline_into(file, &mut Vec::new(), &mut out)?;
    Ok(out)
}

fn inline_into(file: &str, seen: &mut Vec<String>, out: &mut String) -> Result<()> {
    let text = kernels::SOURCES
        .iter()
        .find(|(n, _)| *n == file)
        .map(|(_, t)| *t)
        .ok_or_else(|| Error::KernelLoad(format!("no embedded source '{file}'")))?;
    seen.push(file.to_string());
    for line in text.lines() {
        match line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'))
        {
            Some(header) if seen.iter().any(|s| s == header) => {}
            Some(header) => inline_into(header, seen, out)?,
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(())
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
        // Once each, however many files include them (as #pragma once makes nvcc do).
        assert_eq!(src.matches("struct StepState {").count(), 1);
    }
}
