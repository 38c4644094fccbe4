//! The CUDA backend: kernels embedded by build.rs, the device runtime, device arenas and the
//! engine that runs a step on the GPU. Raw `unsafe` launches live here and nowhere else. Public
//! here: the device arenas (buffers for the communicators), device timing and copy bandwidth
//! (`runtime`), lean state's device kernels (`lean`), and what was embedded (`kernels`).

pub(crate) mod abi;
pub mod arena;
pub(crate) mod engine;
pub mod lean;
pub(crate) mod masters;
pub(crate) mod norm;
pub(crate) mod nvrtc;
pub(crate) mod quantized;
pub mod runtime;

/// Fatbins and kernel sources embedded at build time.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

    /// How kernels will be obtained on a GPU: the embedded fatbin, or NVRTC from the sources.
    pub fn provenance() -> &'static str {
        if FATBINS.is_empty() {
            "no fatbin embedded (built without nvcc): kernels JIT-compile with NVRTC at first use"
        } else {
            "fatbin embedded by nvcc at build time"
        }
    }
}
