//! Checkpoint files on disk: read whole (regular files only), and written atomically through a
//! temp file beside the target (see the module docs of `checkpoint`).

use std::io::Read;
use std::path::Path;

use super::{bad, io};
use crate::error::{Error, Result};

const TEMP_SUFFIX: &str = ".fusedopt-tmp";

/// Reads `path` whole, refusing anything but a regular file (a FIFO would block the open), and
/// with a typed error when the memory is not there.
pub(super) fn read_regular_file(path: &Path) -> Result<Vec<u8>> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer appears; non-blocking, it does not.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let mut file = options.open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let len = usize::try_from(meta.len()).map_err(|_| bad(path, "too large for this machine"))?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len)
        .map_err(|_| Error::OutOfHostMemory { bytes: len })?;
    file.read_to_end(&mut bytes).map_err(io(path))?;
    Ok(bytes)
}

/// This machine's name, as temp file names carry it: letters, digits, `-` and `_` only.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "host".into()
    } else {
        name
    }
}

/// Writes a file at `path` through `write(temp_file)`, atomically (see the module docs).
pub(super) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| bad(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let host = host_name();
    remove_stale_temps(dir, &file_name, &host);
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(&format!(".{host}.{}{TEMP_SUFFIX}", std::process::id()))
        .tempfile_in(dir)
        .map_err(io(dir))?;
    // On any error below, dropping `tmp` removes the temp file.
    write(tmp.as_file_mut()).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    tmp.persist(path).map_err(|e| io(path)(e.error))?;
    // Persist the rename itself.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Removes temp files of saves to `file_name` made on this machine by processes that no longer
/// exist. Best effort: a failure here never fails the save.
fn remove_stale_temps(dir: &Path, file_name: &str, host: &str) {
    if !cfg!(target_os = "linux") {
        return; // no portable way to tell whether a process exists without unsafe code
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{file_name}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(middle) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
        else {
            continue;
        };
        // Exactly `<random>.<host>.<pid>`: a temp of another target (say `name.1`) has more.
        let parts: Vec<&str> = middle.split('.').collect();
        let [_, their_host, pid] = parts.as_slice() else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if *their_host == host && !alive && is_file {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
