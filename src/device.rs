//! Where a step runs: the CPU engine or a CUDA device, and why a GPU was not used.
//!
//! Probing never panics: cudarc panics when the driver library is missing, so its presence is checked
//! before any driver call.

use std::fmt;

/// The device a parameter set and its optimizer live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU engine, using every core of the global thread pool.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Why a CUDA device could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no CUDA driver library (libcuda) could be loaded")]
    NoDriver,
    #[error("the CUDA driver failed to initialise: {0}")]
    DriverInit(String),
    #[error("the CUDA driver reports no devices")]
    NoDevices,
    #[error("CUDA device {ordinal} does not exist ({count} present)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("no NCCL library (libnccl.so.2) could be loaded; install NCCL to reduce across GPUs")]
    NoNccl,
    #[error("FUSEDOPT_DEVICE=cpu asks for the CPU engine")]
    DisabledByEnvironment,
}

/// The outcome of automatic selection: the device chosen and, when it is the CPU, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub device: Device,
    pub gpu_unavailable: Option<Unavailable>,
}

impl Device {
    /// Picks the best usable device: CUDA device 0 when a driver and a device are present, else the
    /// CPU with the reason. `FUSEDOPT_DEVICE=cpu` forces the CPU.
    pub fn auto() -> Selection {
        let gpu = if std::env::var("FUSEDOPT_DEVICE").is_ok_and(|v| v.eq_ignore_ascii_case("cpu")) {
            Err(Unavailable::DisabledByEnvironment)
        } else {
            Device::Cuda(0).check()
        };
        match gpu {
            Ok(()) => Selection {
                device: Device::Cuda(0),
                gpu_unavailable: None,
            },
            Err(reason) => Selection {
                device: Device::Cpu,
                gpu_unavailable: Some(reason),
            },
        }
    }

    /// The device's name as its driver reports it ("cpu" for the CPU engine). The emulated GPU
    /// (`emulated-gpu/`, used to test the CUDA path without a GPU) names itself as one.
    pub fn name(self) -> Result<String, Unavailable> {
        match self {
            Device::Cpu => Ok("cpu".into()),
            Device::Cuda(ordinal) => {
                self.check()?;
                let driver =
                    |e: cudarc::driver::DriverError| Unavailable::DriverInit(format!("{e:?}"));
                let dev = cudarc::driver::result::device::get(ordinal as i32).map_err(driver)?;
                cudarc::driver::result::device::get_name(dev).map_err(driver)
            }
        }
    }

    /// Whether this is the emulated GPU, which runs the CUDA path on the host to test its logic:
    /// correct results there say nothing of a GPU's speed.
    pub fn is_emulated(self) -> bool {
        self.name().is_ok_and(|n| n.contains("emulated GPU"))
    }

    /// Checks that this device can run steps, without panicking whatever is installed.
    pub fn check(self) -> Result<(), Unavailable> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => {
                let count = cuda_device_count()?;
                match count {
                    0 => Err(Unavailable::NoDevices),
                    _ if ordinal >= count => Err(Unavailable::NoSuchDevice { ordinal, count }),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Number of CUDA devices the driver reports, or why none can be used.
pub fn cuda_device_count() -> Result<usize, Unavailable> {
    // SAFETY: this only tries to dlopen the driver library by its usual names; it runs no driver code
    // and leaves nothing behind when the library is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Unavailable::NoDriver);
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Unavailable::DriverInit(format!("{e:?}")))?;
    Ok(usize::try_from(count).unwrap_or(0))
}
