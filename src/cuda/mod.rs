//! The CUDA side: the kernels build.rs embedded. The device runtime (context, streams, module
//! loading, launches) builds on these.

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
