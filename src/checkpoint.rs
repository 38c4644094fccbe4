//! Checkpoints: parameters, optimizer state, step count and hyperparameters in one safetensors file.
//!
//! Tensors are `param/<name>` and `state/<buffer>/<name>`; the header metadata holds the rule, the
//! options, the lr, the step count, the parameter groups and a CRC-32 of every tensor's bytes.
//! Writes are atomic (temp file, fsync, rename, fsync of the directory). A load validates the whole
//! file against this optimizer's layout before it changes anything, so a truncated, corrupt or
//! mismatched checkpoint is refused with the in-memory state untouched.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use std::borrow::Cow;

use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::optim::{Optimizer, Saved};
use crate::params::GroupOptions;

const FORMAT: &str = "fusedopt-checkpoint-1";

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

/// CRC-32 over tensor names and bytes, in name order.
fn checksum<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by_key(|(n, _)| *n);
    let mut h = crc32fast::Hasher::new();
    for (name, bytes) in sorted {
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    format!("{:08x}", h.finalize())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    optimizer: Saved,
    groups: Vec<(String, GroupOptions)>,
}

impl Optimizer {
    /// Saves parameters, state, step count and hyperparameters to `path`, atomically.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let layout = self.params().layout();
        // State is saved as f32 whatever its storage dtype (bf16 widens exactly and narrows back
        // to the same bits).
        let all_values = self.params().values_snapshot()?;
        let state = self.state_snapshot()?;
        let mut tensors: Vec<(String, Cow<[f32]>, Vec<usize>)> = Vec::new();
        for t in layout.tensors() {
            let values = &all_values[t.range()];
            tensors.push((
                format!("param/{}", t.name),
                Cow::Borrowed(values),
                t.shape.clone(),
            ));
            for (slot, buffer) in self.state_names().iter().enumerate() {
                let values = state[slot].to_f32(t.range());
                let name = format!("state/{buffer}/{}", t.name);
                tensors.push((name, Cow::Owned(values), t.shape.clone()));
            }
        }
        let header = Header {
            optimizer: self.saved()?,
            groups: layout
                .groups()
                .iter()
                .map(|g| (g.name.clone(), g.options.clone()))
                .collect(),
        };
        let crc = checksum(
            tensors
                .iter()
                .map(|(n, v, _)| (n.as_str(), bytemuck::cast_slice::<f32, u8>(v))),
        );
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "header".to_string(),
                serde_json::to_string(&header).map_err(|e| bad(path, e.to_string()))?,
            ),
            ("crc32".to_string(), crc),
        ]);
        let views = tensors
            .iter()
            .map(|(n, v, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(v))
                    .map(|view| (n.clone(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(path, e.to_string()))?;
        let bytes =
            safetensors::serialize(views, &Some(metadata)).map_err(|e| bad(path, e.to_string()))?;
        write_atomically(path, &bytes)
    }

    /// Restores a checkpoint saved by an optimizer with the same tensors, shapes, groups and state
    /// buffers. On any error nothing in memory changes.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(io(path))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e.to_string()))?;
        let meta = meta
            .metadata()
            .as_ref()
            .ok_or_else(|| bad(path, "no fusedopt metadata"))?;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(path, format!("not a {FORMAT} file")));
        }
        let header: Header = serde_json::from_str(meta.get("header").map_or("", String::as_str))
            .map_err(|e| bad(path, format!("header: {e}")))?;
        let saved = header.optimizer;
        saved.rule.validate()?;

        let layout = self.params().layout().clone();
        let saved_groups: Vec<&str> = header.groups.iter().map(|(n, _)| n.as_str()).collect();
        let groups: Vec<&str> = layout.groups().iter().map(|g| g.name.as_str()).collect();
        if saved_groups != groups {
            return Err(bad(
                path,
                format!("groups {saved_groups:?}, expected {groups:?}"),
            ));
        }
        let names = saved.rule.state_names();
        if saved.options.state_dtype != self.options().state_dtype {
            return Err(bad(
                path,
                "optimizer state dtype differs from this optimizer's",
            ));
        }
        if names != self.state_names() {
            return Err(bad(
                path,
                format!("state buffers {names:?}, expected {:?}", self.state_names()),
            ));
        }
        let expected = layout.tensors().len() * (1 + names.len());
        if file.names().len() != expected {
            return Err(bad(
                path,
                format!("{} tensors, expected {expected}", file.names().len()),
            ));
        }

        // Read everything into fresh buffers first; swap in only when all of it is valid.
        let mut values = self.params().values_snapshot()?.into_owned();
        let mut state: Vec<Arena> = self.state_snapshot()?;
        let mut scratch = Vec::new();
        let mut seen = Vec::with_capacity(expected);
        for t in layout.tensors() {
            for slot in 0..=names.len() {
                let name = match slot {
                    0 => format!("param/{}", t.name),
                    _ => format!("state/{}/{}", names[slot - 1], t.name),
                };
                let view = file
                    .tensor(&name)
                    .map_err(|_| bad(path, format!("missing tensor '{name}'")))?;
                if view.dtype() != Dtype::F32 || view.shape() != t.shape.as_slice() {
                    return Err(bad(
                        path,
                        format!(
                            "'{name}' is {:?} {:?}, expected F32 {:?}",
                            view.dtype(),
                            view.shape(),
                            t.shape
                        ),
                    ));
                }
                scratch.clear();
                scratch.extend(
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
                match slot {
                    0 => values[t.range()].copy_from_slice(&scratch),
                    _ => state[slot - 1].write_f32(t.offset, &scratch),
                }
                seen.push((name, view.data()));
            }
        }
        let crc = checksum(seen.iter().map(|(n, b)| (n.as_str(), *b)));
        if meta.get("crc32") != Some(&crc) {
            return Err(bad(path, "checksum mismatch: the tensor data is corrupt"));
        }
        self.restore(saved, &values, state)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| bad(path, "not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        // Persist the rename itself.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
