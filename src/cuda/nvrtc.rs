//! NVRTC, the CUDA run-time compiler: the fallback when the build embedded no fatbin (no nvcc at
//! build time), loaded here rather than through cudarc, whose loader never tries the versioned
//! names runtime installs ship (`libnvrtc.so.13`).
//!
//! Where NVRTC is looked for: `FUSEDOPT_NVRTC_LIB`; `libnvrtc.so.{13,12}` or `libnvrtc.so` under
//! `CUDA_HOME`/`CUDA_PATH` (`lib64`, `lib`) and `/usr/local/cuda/lib64`; then the same names on
//! the library path. The CUDA headers the kernels include (`cuda_bf16.h`, `cuda_fp16.h`):
//! `FUSEDOPT_CUDA_INCLUDE`, `CUDA_HOME`/`CUDA_PATH`, the `include` folder beside NVRTC's `lib`
//! (the CUDA toolkit's and the `nvidia-cuda-*` wheels' layout), `/usr/local/cuda/include`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::Error;

type Program = *mut c_void;
type Status = c_int;

/// The NVRTC functions used, resolved once.
struct Nvrtc {
    version: (c_int, c_int),
    /// Architectures this NVRTC compiles for (e.g. 75, 80, 90, 100), ascending.
    archs: Vec<c_int>,
    /// Where the CUDA headers are, if found.
    include: Option<PathBuf>,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Program) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    _libs: Vec<libloading::Library>,
}

fn candidates() -> Vec<PathBuf> {
    let names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
    if let Some(p) = std::env::var_os("FUSEDOPT_NVRTC_LIB") {
        return vec![PathBuf::from(p)];
    }
    let mut dirs: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .flat_map(|h| [Path::new(&h).join("lib64"), Path::new(&h).join("lib")])
        .collect();
    dirs.push("/usr/local/cuda/lib64".into());
    let mut out: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .filter(|p| p.is_file())
        .collect();
    out.extend(names.iter().map(PathBuf::from));
    out
}

fn include_dir(lib: &Path) -> Option<PathBuf> {
    let env = |v: &str| std::env::var_os(v).map(PathBuf::from);
    let beside = lib
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("include"));
    [
        env("FUSEDOPT_CUDA_INCLUDE"),
        env("CUDA_HOME").map(|h| h.join("include")),
        env("CUDA_PATH").map(|h| h.join("include")),
        beside,
        Some("/usr/local/cuda/include".into()),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.join("cuda_bf16.h").is_file())
}

fn nvrtc() -> std::result::Result<&'static Nvrtc, String> {
    static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    NVRTC.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> std::result::Result<Nvrtc, String> {
    let mut tried = Vec::new();
    for path in candidates() {
        let mut libs = Vec::new();
        // NVRTC opens its builtins library by soname at compile time; one installed beside it
        // (the wheels' layout, not on the library path) is loaded first so that it is found.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with("libnvrtc-builtins.so") {
                        // SAFETY: NVRTC's own builtins library; loading it runs no user code.
                        if let Ok(l) = unsafe { libloading::Library::new(e.path()) } {
                            libs.push(l);
                        }
                    }
                }
            }
        }
        // SAFETY: loading NVRTC runs only its own initialisers.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => {
                libs.insert(0, lib);
                return resolve(libs, include_dir(&path));
            }
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    Err(format!("NVRTC not found ({})", tried.join("; ")))
}

fn resolve(
    libs: Vec<libloading::Library>,
    include: Option<PathBuf>,
) -> std::result::Result<Nvrtc, String> {
    // SAFETY (for every `get`): each symbol is declared with its signature in nvrtc.h (stable
    // since CUDA 11.1), so calling through it is calling NVRTC.
    unsafe fn get<T: Copy>(
        lib: &libloading::Library,
        name: &str,
    ) -> std::result::Result<T, String> {
        // SAFETY: the caller names a symbol whose C signature is `T` (see above).
        unsafe { lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("NVRTC lacks {name}: {e}"))
    }
    let lib = &libs[0];
    // SAFETY: every `get` below names an NVRTC symbol with the signature it is given, and each
    // call passes valid out-pointers of the sizes nvrtc.h documents.
    unsafe {
        let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status =
            get(lib, "nvrtcVersion")?;
        let mut version = (0, 0);
        version_fn(&mut version.0, &mut version.1);
        let mut archs = Vec::new();
        let count_fn: std::result::Result<unsafe extern "C" fn(*mut c_int) -> Status, _> =
            get(lib, "nvrtcGetNumSupportedArchs");
        let archs_fn: std::result::Result<unsafe extern "C" fn(*mut c_int) -> Status, _> =
            get(lib, "nvrtcGetSupportedArchs");
        if let (Ok(count_fn), Ok(archs_fn)) = (count_fn, archs_fn) {
            let mut n = 0;
            if count_fn(&mut n) == 0 && n > 0 {
                archs = vec![0; n as usize];
                if archs_fn(archs.as_mut_ptr()) != 0 {
                    archs.clear();
                }
            }
        }
        archs.sort_unstable();
        Ok(Nvrtc {
            version,
            archs,
            include,
            create: get(lib, "nvrtcCreateProgram")?,
            compile: get(lib, "nvrtcCompileProgram")?,
            log_size: get(lib, "nvrtcGetProgramLogSize")?,
            log: get(lib, "nvrtcGetProgramLog")?,
            cubin_size: get(lib, "nvrtcGetCUBINSize")?,
            cubin: get(lib, "nvrtcGetCUBIN")?,
            ptx_size: get(lib, "nvrtcGetPTXSize")?,
            ptx: get(lib, "nvrtcGetPTX")?,
            destroy: get(lib, "nvrtcDestroyProgram")?,
            error_string: get(lib, "nvrtcGetErrorString")?,
            _libs: libs,
        })
    }
}

/// What NVRTC builds for a device of compute capability `cc`: SASS for its own architecture when
/// NVRTC knows it, else PTX for the newest architecture NVRTC knows that the device can run
/// (the driver compiles it on load).
fn target(n: &Nvrtc, cc: (i32, i32)) -> (String, bool) {
    let arch = cc.0 * 10 + cc.1;
    if n.archs.is_empty() || n.archs.contains(&arch) {
        return (format!("sm_{arch}"), true);
    }
    let below = n.archs.iter().copied().filter(|&a| a <= arch).max();
    (format!("compute_{}", below.unwrap_or(arch)), false)
}

/// Why NVRTC gave no image.
#[derive(Debug)]
pub(crate) enum Failure {
    /// NVRTC or the CUDA headers were not found, or NVRTC failed before compiling.
    Unusable(String),
    /// NVRTC compiled the source and refused it, saying why in its log.
    Rejected { arch: String, log: String },
}

impl Failure {
    /// The error for a unit of the build's own kernels, which only NVRTC could give.
    pub fn for_built_in(self, name: &str) -> Error {
        match self {
            Failure::Unusable(why) => Error::KernelLoad(format!(
                "no fatbin was embedded for '{name}' (built without nvcc) and {why}"
            )),
            Failure::Rejected { arch, log } => {
                Error::KernelLoad(format!("NVRTC failed on {name} for {arch}:\n{log}"))
            }
        }
    }
}

/// Compiles one translation unit (headers already inlined) for a device of compute capability
/// `cc`: a cubin, or PTX when NVRTC does not know the device's architecture. The options match
/// build.rs's nvcc ones (no FMA contraction, so the GPU rounds like the CPU engine).
pub(crate) fn compile(
    name: &str,
    source: &str,
    cc: (i32, i32),
) -> std::result::Result<Vec<u8>, Failure> {
    let n = nvrtc().map_err(Failure::Unusable)?;
    let include = n.include.as_ref().ok_or_else(|| {
        Failure::Unusable(format!(
            "NVRTC {}.{} was found, but not the CUDA headers (cuda_bf16.h): set \
             FUSEDOPT_CUDA_INCLUDE or CUDA_HOME",
            n.version.0, n.version.1
        ))
    })?;
    let (arch, sass) = target(n, cc);
    let fail = |what: &str, status: Status| {
        // SAFETY: nvrtcGetErrorString returns a static string for any status.
        let text = unsafe { CStr::from_ptr((n.error_string)(status)) };
        Failure::Unusable(format!(
            "NVRTC {what} on {name}: {}",
            text.to_string_lossy()
        ))
    };
    let c =
        |s: &str| CString::new(s).map_err(|_| Failure::Unusable("NUL in a kernel source".into()));
    let (c_source, c_name) = (c(source)?, c(name)?);
    let options: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=false".into(),
        format!("--include-path={}", include.display()),
    ]
    .iter()
    .map(|o| c(o))
    .collect::<std::result::Result<_, _>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let mut program: Program = std::ptr::null_mut();
    // SAFETY: every pointer is a live NUL-terminated string for the duration of the calls; the
    // program is destroyed below on every path after a successful creation.
    unsafe {
        let status = (n.create)(
            &mut program,
            c_source.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if status != 0 {
            return Err(fail("could not create a program", status));
        }
        let compiled = (n.compile)(program, option_ptrs.len() as c_int, option_ptrs.as_ptr());
        let read =
            |size_fn: unsafe extern "C" fn(Program, *mut usize) -> Status,
             get_fn: unsafe extern "C" fn(Program, *mut c_char) -> Status| {
                let mut len = 0usize;
                if size_fn(program, &mut len) != 0 {
                    return Vec::new();
                }
                let mut buf = vec![0u8; len];
                if get_fn(program, buf.as_mut_ptr().cast()) != 0 {
                    buf.clear();
                }
                buf
            };
        // NVRTC_ERROR_COMPILATION: the source was refused, its log says why; any other failure
        // is NVRTC's own (options, memory).
        let result = if compiled == 6 {
            let log = read(n.log_size, n.log);
            Err(Failure::Rejected {
                arch: arch.clone(),
                log: String::from_utf8_lossy(&log)
                    .trim_end_matches('\0')
                    .to_string(),
            })
        } else if compiled != 0 {
            Err(fail("failed", compiled))
        } else if sass {
            Ok(read(n.cubin_size, n.cubin))
        } else {
            Ok(read(n.ptx_size, n.ptx))
        };
        (n.destroy)(&mut program);
        match result {
            Ok(image) if image.is_empty() => Err(fail("returned no image", compiled)),
            other => other,
        }
    }
}
