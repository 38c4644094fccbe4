//! NCCL's C API, loaded at run time.
//!
//! Runtime-only installs (the `nvidia-nccl-cu13` wheel, distribution packages) ship
//! `libnccl.so.2` and often no `libnccl.so`, which is the only name cudarc's loader knows; and
//! cudarc resolves each symbol on first call and panics when one is missing (`ncclGetLastError`
//! exists only from NCCL 2.13). So NCCL is loaded here: `FUSEDOPT_NCCL_LIB` if set, else
//! `libnccl.so.2`, else `libnccl.so`; every symbol used is resolved at load, and the optional ones
//! may be absent.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// `ncclResult_t`, kept as the C integer: an unknown value from the library is not undefined
/// behaviour here.
pub type NcclResult = c_int;
pub const SUCCESS: NcclResult = 0;
pub const IN_PROGRESS: NcclResult = 7;

pub type Comm = *mut c_void;
pub type Stream = *mut c_void;

/// `ncclUniqueId`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

/// `ncclDataType_t` values.
pub const FLOAT16: c_int = 6;
pub const FLOAT32: c_int = 7;
pub const BFLOAT16: c_int = 9;
/// `ncclRedOp_t` values.
pub const SUM: c_int = 0;
pub const AVG: c_int = 4;

type Collective = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    Stream,
) -> NcclResult;

/// The functions fusedopt calls, resolved once.
pub struct Nccl {
    pub get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    pub comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    pub comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    pub comm_get_async_error: unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult,
    pub group_start: unsafe extern "C" fn() -> NcclResult,
    pub group_end: unsafe extern "C" fn() -> NcclResult,
    pub get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    /// NCCL 2.13 and later.
    pub get_last_error: Option<unsafe extern "C" fn(Comm) -> *const c_char>,
    /// (send, recv, count, type, op, comm, stream)
    pub all_reduce: Collective,
    /// (send, recv, count, type, op, comm, stream): `count` is each rank's share.
    pub reduce_scatter: Collective,
    /// (send, recv, count, type, root, comm, stream)
    pub broadcast: Collective,
    pub all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> NcclResult,
    /// Keeps the library mapped for as long as the function pointers above are used (forever).
    _lib: libloading::Library,
}

/// NCCL, loaded on first use, or why it could not be.
pub fn nccl() -> Result<&'static Nccl, String> {
    static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Nccl, String> {
    let names: Vec<std::ffi::OsString> = match std::env::var_os("FUSEDOPT_NCCL_LIB") {
        Some(path) => vec![path],
        None => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    };
    let mut tried = Vec::new();
    for name in &names {
        // SAFETY: loading NCCL runs its initialisers, which only set up the library itself.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return resolve(lib),
            Err(e) => tried.push(format!("{}: {e}", name.to_string_lossy())),
        }
    }
    Err(tried.join("; "))
}

fn resolve(lib: libloading::Library) -> Result<Nccl, String> {
    // SAFETY (for every `get` below): each symbol is declared with the signature NCCL's nccl.h
    // gives it (all of them stable since NCCL 2.7), so calling through it is calling NCCL.
    unsafe fn get<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
        // SAFETY: the caller names a symbol whose C signature is `T` (see above).
        unsafe { lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("NCCL lacks {name}: {e}"))
    }
    // SAFETY: every `get` below names an NCCL symbol with the signature of its field.
    unsafe {
        Ok(Nccl {
            get_unique_id: get(&lib, "ncclGetUniqueId")?,
            comm_init_rank: get(&lib, "ncclCommInitRank")?,
            comm_abort: get(&lib, "ncclCommAbort")?,
            comm_get_async_error: get(&lib, "ncclCommGetAsyncError")?,
            group_start: get(&lib, "ncclGroupStart")?,
            group_end: get(&lib, "ncclGroupEnd")?,
            get_error_string: get(&lib, "ncclGetErrorString")?,
            get_last_error: get(&lib, "ncclGetLastError").ok(),
            all_reduce: get(&lib, "ncclAllReduce")?,
            reduce_scatter: get(&lib, "ncclReduceScatter")?,
            broadcast: get(&lib, "ncclBroadcast")?,
            all_gather: get(&lib, "ncclAllGather")?,
            _lib: lib,
        })
    }
}
