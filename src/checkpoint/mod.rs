//! Checkpoints: parameters, optimizer state, step count, loss-scale state, lr and the schedule's
//! position in one safetensors file (format `fusedopt-checkpoint-2`).
//!
//! Tensors are `param/<name>` (the f32 masters) and `state/<buffer>/<name>` (in the state's own
//! dtype; with quantized state, a coded tensor's codes as stored, u8, two per byte at 4 bits,
//! and its block scales, f32, in `scale/<buffer>/<name>`). The metadata holds `format`, `header` (JSON: the rule, the options, lr, step count,
//! loss-scale state and the rule's running step scalars, the parameter groups, the attached
//! schedule) and `crc32`: CRC-32 (hex) over
//! framed items, each a u64 little-endian length then the bytes: the format, the header, then
//! every tensor's name and data in name order. So the header is checksummed like the data.
//!
//! **A load restores state, never configuration.** It refuses, changing nothing, a file that is
//! not a regular file, truncated, corrupt (checksum), or holds values no constructor would accept;
//! and a checkpoint of a differently configured optimizer: other tensors, shapes, groups or group
//! options, another rule or hyperparameter, other options (clipping, non-finite policy, state dtype or
//! quantization, loss scaling), or another schedule (or a schedule on one side only). The error names the first
//! difference. What it restores: masters (and the model copy), state, step count, loss scale and
//! its growth counter, the lr, the rule's running scalars (NAdam's product, schedule-free's
//! weight sum and largest lr), and the schedule's position.
//!
//! **A save is atomic**: a temp file `.<name>.<random>.<host>.<pid>.fusedopt-tmp` beside the
//! target, created exclusively (never through an existing file or link) and written through that
//! handle, fsynced, renamed over the target, then the directory fsynced. Concurrent saves to one
//! path each succeed, and the target is always one whole checkpoint. A save removes temp files of
//! the same target left by processes of this machine that no longer exist (on Linux, where that
//! can be told). A save whose header would pass safetensors' 100 MB limit (tensor names too long)
//! is refused before anything is written, since it could never be loaded.

mod file;
pub(crate) mod pieces;
mod sharded;

pub use sharded::load_sharded_checkpoint;
pub(crate) use sharded::{prepare_sharded_restore, save_number, save_shard, write_manifest};

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::host::quantized_state::StoredTensor;
use crate::host::state::{StateBuffers, Stored};
use crate::layout::TensorInfo;
use crate::optim::{LossScale, Optimizer, Restore, Saved, MAX_STEP};
use crate::params::GroupOptions;
use crate::schedule::LrSchedule;
use crate::step::check_loss_scale;
use crate::DType;
use file::{read_regular_file, write_atomically};

const FORMAT: &str = "fusedopt-checkpoint-2";
/// safetensors refuses to read a header larger than this.
const MAX_HEADER_BYTES: usize = 100_000_000;

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

/// A checkpoint file read whole, its format and checksum verified and its header parsed; not yet
/// checked against any optimizer.
pub(crate) struct Checkpoint {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
    header: Header,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Result<Self> {
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
        Ok(Checkpoint {
            path: path.to_path_buf(),
            bytes,
            header,
        })
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| bad(&self.path, e.to_string()))
    }
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

/// One tensor of a checkpoint's state.
struct Part<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

/// The tensors holding buffer `slot` (named `buffer`) of tensor `t` (the layout's `index`-th):
/// `state/<buffer>/<name>` in its stored dtype and shape, or for a quantized tensor its codes
/// (u8, as stored: two per byte at 4 bits) there and its block scales in `scale/<buffer>/<name>`.
fn state_parts<'a>(
    state: &'a StateBuffers,
    slot: usize,
    buffer: &str,
    index: usize,
    t: &TensorInfo,
) -> Vec<Part<'a>> {
    let name = format!("state/{buffer}/{}", t.name);
    let part = |name, dtype, shape, bytes| Part {
        name,
        dtype,
        shape,
        bytes,
    };
    match state.stored(slot, index, t) {
        Stored::Dense(arena) => vec![part(
            name,
            safetensors_dtype(arena.dtype()),
            t.shape.clone(),
            arena.bytes(t.range()),
        )],
        Stored::Quantized(StoredTensor::Full(f)) => vec![part(
            name,
            Dtype::F32,
            t.shape.clone(),
            bytemuck::cast_slice(f),
        )],
        Stored::Quantized(StoredTensor::Coded { codes, scales }) => vec![
            part(name, Dtype::U8, vec![codes.len()], codes),
            part(
                format!("scale/{buffer}/{}", t.name),
                Dtype::F32,
                vec![scales.len()],
                bytemuck::cast_slice(scales),
            ),
        ],
    }
}

/// A tensor with its bytes withheld: safetensors serializes these to exactly the file's length
/// prefix and header (offsets come from `data_len`), without copying any data.
struct HeaderOnly<'a>(&'a TensorView<'a>);

impl View for HeaderOnly<'_> {
    fn dtype(&self) -> Dtype {
        self.0.dtype()
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.0.data().len()
    }
}

/// The first bytes of the file a save writes (length prefix and header), and the order in which
/// the tensors' data follow them. Refuses a header no reader would accept (tensor names too
/// long) before anything is written.
fn file_head(
    path: &Path,
    tensors: &[(String, TensorView<'_>)],
    metadata: HashMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let views = tensors.iter().map(|(n, v)| (n.as_str(), HeaderOnly(v)));
    let head =
        safetensors::serialize(views, &Some(metadata)).map_err(|e| bad(path, e.to_string()))?;
    let n = head
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| bad(path, "safetensors wrote no header"))?;
    if n > MAX_HEADER_BYTES as u64 {
        return Err(bad(
            path,
            format!(
                "the safetensors header would be {n} bytes, over the {MAX_HEADER_BYTES} a reader \
                 accepts (tensor names too long): nothing was written"
            ),
        ));
    }
    if head.len() as u64 != 8 + n {
        return Err(bad(path, "safetensors wrote tensor data into the header"));
    }
    // safetensors orders the data by dtype, then name: read that order back from the offsets.
    let entries: serde_json::Map<String, Value> =
        serde_json::from_slice(&head[8..]).map_err(|e| bad(path, e.to_string()))?;
    let start = |name: &str| -> Result<u64> {
        entries
            .get(name)
            .and_then(|e| e.get("data_offsets")?.get(0)?.as_u64())
            .ok_or_else(|| bad(path, format!("no offsets for '{name}' in the header")))
    };
    let mut order: Vec<(u64, usize)> = tensors
        .iter()
        .enumerate()
        .map(|(i, (name, _))| Ok((start(name)?, i)))
        .collect::<Result<_>>()?;
    // Ties are empty tensors, which write nothing.
    order.sort_unstable();
    Ok((head, order.into_iter().map(|(_, i)| i).collect()))
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

impl Optimizer {
    /// Saves parameters, state, step count, loss-scale state, lr and the schedule's position to
    /// `path`, atomically (see the module docs).
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let layout = self.params().layout();
        let values = self.params().masters_snapshot()?;
        let state = self.state_buffers()?;
        let names = self.state_names();
        let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
        let view = |dtype: Dtype, shape: Vec<usize>, bytes| {
            TensorView::new(dtype, shape, bytes).map_err(|e| bad(path, e.to_string()))
        };
        for (index, t) in layout.tensors().iter().enumerate() {
            let bytes = bytemuck::cast_slice(&values[t.range()]);
            tensors.push((
                format!("param/{}", t.name),
                view(Dtype::F32, t.shape.clone(), bytes)?,
            ));
            for (slot, buffer) in names.iter().enumerate() {
                for part in state_parts(&state, slot, buffer, index, t) {
                    tensors.push((part.name, view(part.dtype, part.shape, part.bytes)?));
                }
            }
        }
        let header = Header {
            optimizer: self.saved()?,
            groups: layout
                .groups()
                .iter()
                .map(|g| (g.name.clone(), g.options.clone()))
                .collect(),
            schedule: self.schedule_now()?.map(|s| s.save()),
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
        let (head, order) = file_head(path, &tensors, metadata)?;
        write_atomically(path, |file| {
            let mut w = std::io::BufWriter::new(file);
            w.write_all(&head)?;
            for i in order {
                w.write_all(tensors[i].1.data())?;
            }
            w.flush()
        })
    }

    /// Restores a checkpoint saved by an identically configured optimizer (see the module docs
    /// for what is checked and what is restored). On any error nothing in memory changes.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let checkpoint = Checkpoint::read(path.as_ref())?;
        let restore = self.prepare_restore(&checkpoint)?;
        self.restore(restore)
    }

    /// Checks `checkpoint` against this optimizer and builds everything a load writes, changing
    /// nothing yet.
    pub(crate) fn prepare_restore(&self, checkpoint: &Checkpoint) -> Result<Restore> {
        let path = checkpoint.path.as_path();
        let header = &checkpoint.header;
        let schedule = self.check_header(path, header)?;
        let file = checkpoint.tensors()?;
        let layout = self.params().layout().clone();
        let names = self.state_names();
        // Fresh buffers (copies that fail with OutOfHostMemory rather than abort), padding kept.
        let mut values = crate::arena::try_to_vec(&self.params().masters_snapshot()?)?;
        let mut state = self.state_buffers()?.try_clone()?;
        let read = |name: &str, dtype: Dtype, shape: &[usize]| {
            let view = file
                .tensor(name)
                .map_err(|_| bad(path, format!("missing tensor '{name}'")))?;
            if view.dtype() != dtype || view.shape() != shape {
                return Err(bad(
                    path,
                    format!(
                        "'{name}' is {:?} {:?}, expected {dtype:?} {shape:?}",
                        view.dtype(),
                        view.shape(),
                    ),
                ));
            }
            Ok(view)
        };
        let mut expected = 0;
        for (index, t) in layout.tensors().iter().enumerate() {
            let view = read(&format!("param/{}", t.name), Dtype::F32, &t.shape)?;
            bytemuck::cast_slice_mut::<f32, u8>(&mut values[t.range()])
                .copy_from_slice(view.data());
            expected += 1;
            for (slot, buffer) in names.iter().enumerate() {
                let parts: Vec<_> = state_parts(&state, slot, buffer, index, t)
                    .into_iter()
                    .map(|p| read(&p.name, p.dtype, &p.shape))
                    .collect::<Result<_>>()?;
                expected += parts.len();
                let scales = parts.get(1).map_or(&[][..], |v| v.data());
                state.write_stored(slot, index, t, parts[0].data(), scales);
            }
        }
        if file.len() != expected {
            return Err(bad(
                path,
                format!("{} tensors, expected {expected}", file.len()),
            ));
        }
        Ok(Restore {
            saved: header.optimizer.clone(),
            masters: values,
            state,
            schedule,
        })
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
        // The rule's running scalars belong to the saved step (for NAdam's product any earlier
        // one will do: it is recomputed from there).
        let m = &saved.memo;
        let memo_step_ok = if saved.rule.memo_is_history() {
            m.t == saved.step
        } else {
            m.t <= saved.step
        };
        let memo_values_ok = [m.product, m.weight_sum, m.max_lr]
            .iter()
            .all(|x| x.is_finite() && *x >= 0.0);
        if !memo_step_ok || !memo_values_ok {
            return Err(bad(
                path,
                format!(
                    "the rule's running scalars {m:?} cannot belong to step {}",
                    saved.step
                ),
            ));
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
                "rule": to_json(path, "rule", &s.rule)?,
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
