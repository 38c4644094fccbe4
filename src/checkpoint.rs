//! Checkpoints: parameters, optimizer state, step count, loss-scale state, lr and the schedule's
//! position in one safetensors file (format `fusedopt-checkpoint-2`).
//!
//! Tensors are `param/<name>` (the f32 masters) and `state/<buffer>/<name>` (in the state's own
//! dtype). The metadata holds `format`, `header` (JSON: the rule, the options, lr, step count and
//! loss-scale state, the parameter groups, the attached schedule) and `crc32`: CRC-32 (hex) over
//! framed items, each a u64 little-endian length then the bytes: the format, the header, then
//! every tensor's name and data in name order. So the header is checksummed like the data.
//!
//! **A load restores state, never configuration.** It refuses, changing nothing, a file that is
//! not a regular file, truncated, corrupt (checksum), or holds values no constructor would accept;
//! and a checkpoint of a differently configured optimizer: other tensors, shapes, groups or group
//! options, another rule or hyperparameter, other options (clipping, non-finite policy, state dtype,
//! loss scaling), or another schedule (or a schedule on one side only). The error names the first
//! difference. What it restores: masters (and the model copy), state, step count, loss scale and
//! its growth counter, the lr, and the schedule's position.
//!
//! **A save is atomic**: a temp file `.<name>.<random>.<pid>.fusedopt-tmp` beside the target,
//! created exclusively (never through an existing file or link), written, fsynced, renamed over the
//! target, then the directory fsynced. Concurrent saves to one path each succeed, and the target
//! is always one whole checkpoint. A save removes temp files of the same target left by processes
//! that no longer exist (on Linux, where that can be told). A save whose header could exceed
//! safetensors' 100 MB limit (tensor names too long) is refused, since it could never be loaded.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::optim::{check_loss_scale, LossScale, Optimizer, Saved, MAX_STEP};
use crate::params::GroupOptions;
use crate::schedule::LrSchedule;
use crate::DType;

const FORMAT: &str = "fusedopt-checkpoint-2";
/// safetensors refuses to read a header larger than this.
const MAX_HEADER_BYTES: usize = 100_000_000;
const TEMP_SUFFIX: &str = ".fusedopt-tmp";

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadCheckpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The checksum described in the module docs.
fn checksum<'a>(
    format: &str,
    header: &str,
    tensors: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> String {
    let mut h = crc32fast::Hasher::new();
    let mut item = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    item(format.as_bytes());
    item(header.as_bytes());
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by_key(|(n, _)| *n);
    for (name, bytes) in sorted {
        item(name.as_bytes());
        item(bytes);
    }
    format!("{:08x}", h.finalize())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    optimizer: Saved,
    groups: Vec<(String, GroupOptions)>,
    /// The attached schedule's configuration and position ([`LrSchedule::save`]).
    schedule: Option<Value>,
}

fn safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
    }
}

/// An upper bound on the safetensors header a save would write: the metadata and, per tensor, its
/// JSON-escaped name, dtype, shape and offsets.
fn header_bound(metadata: &HashMap<String, String>, tensors: &[(String, TensorView<'_>)]) -> usize {
    let quoted = |s: &str| serde_json::to_string(s).map_or(6 * s.len() + 2, |q| q.len());
    let meta: usize = metadata
        .iter()
        .map(|(k, v)| quoted(k) + quoted(v) + 2)
        .sum();
    let entries: usize = tensors
        .iter()
        .map(|(n, v)| quoted(n) + 64 + 21 * (v.shape().len() + 2))
        .sum();
    32 + meta + entries + 8
}

/// The first place where `a` (the checkpoint's) and `b` (this optimizer's) differ, as a path.
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let null = Value::Null;
                let (va, vb) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
                first_difference(&format!("{path}.{k}"), va, vb)
            })
        }
        _ if a == b => None,
        _ => Some(format!("{path}: {a} in the checkpoint, {b} here")),
    }
}

fn to_json<T: serde::Serialize>(path: &Path, what: &str, x: &T) -> Result<Value> {
    serde_json::to_value(x).map_err(|e| bad(path, format!("{what}: {e}")))
}

/// The rule as JSON without its lr: the lr is state (a schedule moves it), not configuration.
fn rule_config(path: &Path, saved: &Saved) -> Result<Value> {
    let mut rule = to_json(path, "rule", &saved.rule)?;
    if let Value::Object(m) = &mut rule {
        m.remove("lr");
    }
    Ok(rule)
}

impl Optimizer {
    /// Saves parameters, state, step count, loss-scale state, lr and the schedule's position to
    /// `path`, atomically (see the module docs).
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let layout = self.params().layout();
        let values = self.params().values_snapshot()?;
        let state = self.state_arenas()?;
        let names = self.state_names();
        let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
        let view = |dtype: DType, shape: &[usize], bytes| {
            TensorView::new(safetensors_dtype(dtype), shape.to_vec(), bytes)
                .map_err(|e| bad(path, e.to_string()))
        };
        for t in layout.tensors() {
            let bytes = bytemuck::cast_slice(&values[t.range()]);
            tensors.push((
                format!("param/{}", t.name),
                view(DType::F32, &t.shape, bytes)?,
            ));
            for (slot, buffer) in names.iter().enumerate() {
                let arena = &state[slot];
                let v = view(arena.dtype(), &t.shape, arena.bytes(t.range()))?;
                tensors.push((format!("state/{buffer}/{}", t.name), v));
            }
        }
        let header = Header {
            optimizer: self.saved()?,
            groups: layout
                .groups()
                .iter()
                .map(|g| (g.name.clone(), g.options.clone()))
                .collect(),
            schedule: self.schedule().map(|s| s.save()),
        };
        let header = serde_json::to_string(&header).map_err(|e| bad(path, e.to_string()))?;
        let crc = checksum(
            FORMAT,
            &header,
            tensors.iter().map(|(n, v)| (n.as_str(), v.data())),
        );
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("header".to_string(), header),
            ("crc32".to_string(), crc),
        ]);
        let bound = header_bound(&metadata, &tensors);
        if bound > MAX_HEADER_BYTES {
            return Err(bad(
                path,
                format!(
                    "the safetensors header would take up to {bound} bytes, over the {MAX_HEADER_BYTES} \
                     a reader accepts (tensor names too long): nothing was written"
                ),
            ));
        }
        let metadata = Some(metadata);
        write_atomically(path, |tmp| {
            safetensors::serialize_to_file(tensors, &metadata, tmp)
                .map_err(|e| bad(path, e.to_string()))
        })
    }

    /// Restores a checkpoint saved by an identically configured optimizer (see the module docs
    /// for what is checked and what is restored). On any error nothing in memory changes.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = read_regular_file(path)?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e.to_string()))?;
        let meta = meta
            .metadata()
            .as_ref()
            .ok_or_else(|| bad(path, "no fusedopt metadata"))?;
        match meta.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some("fusedopt-checkpoint-1") => {
                return Err(bad(
                    path,
                    "written by an older fusedopt whose header is not checksummed; not loaded",
                ))
            }
            _ => return Err(bad(path, format!("not a {FORMAT} file"))),
        }
        let header_text = meta.get("header").ok_or_else(|| bad(path, "no header"))?;
        let crc = checksum(FORMAT, header_text, file.iter().map(|(n, v)| (n, v.data())));
        if meta.get("crc32") != Some(&crc) {
            return Err(bad(path, "checksum mismatch: the file is corrupt"));
        }
        let header: Header =
            serde_json::from_str(header_text).map_err(|e| bad(path, format!("header: {e}")))?;
        let schedule = self.check_header(path, &header)?;
        let saved = header.optimizer;

        let layout = self.params().layout().clone();
        let names = self.state_names();
        let expected = layout.tensors().len() * (1 + names.len());
        if file.len() != expected {
            return Err(bad(
                path,
                format!("{} tensors, expected {expected}", file.len()),
            ));
        }
        // Read everything into fresh buffers first; swap in only when all of it is valid.
        // Copies that fail with OutOfHostMemory rather than abort.
        let mut values = crate::arena::try_to_vec(&self.params().values_snapshot()?)?;
        let mut state: Vec<Arena> = self
            .state_arenas()?
            .iter()
            .map(Arena::try_clone)
            .collect::<Result<_>>()?;
        for t in layout.tensors() {
            for slot in 0..=names.len() {
                let (name, dtype) = match slot {
                    0 => (format!("param/{}", t.name), DType::F32),
                    _ => (
                        format!("state/{}/{}", names[slot - 1], t.name),
                        state[slot - 1].dtype(),
                    ),
                };
                let view = file
                    .tensor(&name)
                    .map_err(|_| bad(path, format!("missing tensor '{name}'")))?;
                if view.dtype() != safetensors_dtype(dtype) || view.shape() != t.shape.as_slice() {
                    return Err(bad(
                        path,
                        format!(
                            "'{name}' is {:?} {:?}, expected {dtype} {:?}",
                            view.dtype(),
                            view.shape(),
                            t.shape
                        ),
                    ));
                }
                match slot {
                    0 => bytemuck::cast_slice_mut::<f32, u8>(&mut values[t.range()])
                        .copy_from_slice(view.data()),
                    _ => state[slot - 1].write_bytes(t.offset, view.data()),
                }
            }
        }
        self.restore(saved, &values, state, schedule)
    }

    /// Validates a checkpoint's header as the constructors validate their arguments, and against
    /// this optimizer's configuration. Returns the schedule to attach, moved to the saved position.
    fn check_header(&self, path: &Path, header: &Header) -> Result<Option<Box<dyn LrSchedule>>> {
        let saved = &header.optimizer;
        let refuse = |e: Error| bad(path, e.to_string());
        saved.rule.validate().map_err(refuse)?;
        saved.options.validate().map_err(refuse)?;
        for (name, options) in &header.groups {
            options.validate(name).map_err(refuse)?;
        }
        if saved.step > MAX_STEP {
            return Err(bad(path, format!("step count {} is past 2^53", saved.step)));
        }
        // A dynamic scale moves (within f32: it never grows past it); the others never move.
        check_loss_scale("the saved loss scale", saved.loss_scale).map_err(refuse)?;
        let loss_scale_consistent = match saved.options.loss_scale {
            LossScale::None => saved.loss_scale == 1.0 && saved.good_steps == 0,
            LossScale::Static(s) => saved.loss_scale == s && saved.good_steps == 0,
            LossScale::Dynamic {
                growth_interval, ..
            } => saved.good_steps < growth_interval,
        };
        if !loss_scale_consistent {
            return Err(bad(
                path,
                format!(
                    "loss scale {} after {} good steps cannot come from {:?}",
                    saved.loss_scale, saved.good_steps, saved.options.loss_scale
                ),
            ));
        }

        // The same configuration as this optimizer's.
        let mine = self.saved()?;
        let groups = |g: &[(String, GroupOptions)]| -> Result<Value> {
            let named: serde_json::Map<String, Value> = g
                .iter()
                .map(|(n, o)| Ok((n.clone(), to_json(path, "group", o)?)))
                .collect::<Result<_>>()?;
            Ok(Value::Object(named))
        };
        let my_groups: Vec<(String, GroupOptions)> = self
            .params()
            .layout()
            .groups()
            .iter()
            .map(|g| (g.name.clone(), g.options.clone()))
            .collect();
        let saved_names: Vec<&str> = header.groups.iter().map(|(n, _)| n.as_str()).collect();
        let my_names: Vec<&str> = my_groups.iter().map(|(n, _)| n.as_str()).collect();
        if saved_names != my_names {
            return Err(bad(
                path,
                format!("groups {saved_names:?} in the checkpoint, {my_names:?} here"),
            ));
        }
        let configuration = |s: &Saved, g: &[(String, GroupOptions)]| -> Result<Value> {
            Ok(serde_json::json!({
                "rule": rule_config(path, s)?,
                "options": to_json(path, "options", &s.options)?,
                "groups": groups(g)?,
            }))
        };
        if let Some(d) = first_difference(
            "configuration",
            &configuration(saved, &header.groups)?,
            &configuration(&mine, &my_groups)?,
        ) {
            return Err(bad(
                path,
                format!("saved by a differently configured optimizer: {d}"),
            ));
        }
        crate::optim::check_lr(self.params().layout(), saved.lr).map_err(refuse)?;

        match (self.schedule(), &header.schedule) {
            (None, None) => Ok(None),
            (Some(mine), Some(theirs)) => {
                let mut schedule = mine.boxed_clone();
                schedule
                    .restore(theirs)
                    .map_err(|e| bad(path, format!("schedule: {e}")))?;
                Ok(Some(schedule))
            }
            (None, Some(_)) => Err(bad(
                path,
                "saved with a schedule: attach the same schedule before loading",
            )),
            (Some(_), None) => Err(bad(
                path,
                "saved without a schedule, but this optimizer has one",
            )),
        }
    }
}

/// Reads `path` whole, refusing anything but a regular file (a FIFO would block the open), and
/// with a typed error when the memory is not there.
fn read_regular_file(path: &Path) -> Result<Vec<u8>> {
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

/// Writes a file at `path` through `write(temp_path)`, atomically (see the module docs).
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| bad(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    remove_stale_temps(dir, &file_name);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(&format!(".{}{TEMP_SUFFIX}", std::process::id()))
        .tempfile_in(dir)
        .map_err(io(dir))?;
    // On any error below, dropping `tmp` removes the temp file.
    write(tmp.path())?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    tmp.persist(path).map_err(|e| io(path)(e.error))?;
    // Persist the rename itself.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Removes temp files of saves to `file_name` whose process no longer exists. Best effort: a
/// failure here never fails the save.
fn remove_stale_temps(dir: &Path, file_name: &str) {
    if !cfg!(target_os = "linux") {
        return; // no portable way to tell whether a process exists without unsafe code
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{file_name}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
            .and_then(|rest| rest.rsplit('.').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !alive && is_file {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
