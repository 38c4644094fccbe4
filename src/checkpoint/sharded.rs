//! Sharded checkpoints (format `fusedopt-sharded-1`): a directory holding one checkpoint file
//! per replica of a sharded group — its window's masters and state, in the usual format, named
//! `step-<step>-rank-<r>-of-<n>.safetensors` — and `manifest.json`, written last (atomically),
//! which names them. A save that fails part-way leaves the previous manifest and the files it
//! names in place; once a manifest is written, the shard files it does not name are removed.
//! A load reads only the files whose windows overlap the target's, checks each like a whole
//! checkpoint (checksum, configuration, the manifest's step), and cuts what the target holds
//! from them: a group of another size, or one unsharded optimizer.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use super::pieces::Pieces;
use super::{bad, io, write_atomically, Checkpoint};
use crate::error::Result;
use crate::layout::Layout;
use crate::optim::{Optimizer, Restore};
use crate::plan::ShardPlan;

const FORMAT: &str = "fusedopt-sharded-1";
const MANIFEST: &str = "manifest.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    format: String,
    step: u64,
    world_size: usize,
    arena_len: usize,
    window_len: usize,
    /// A checksum of the whole set's tensors (names, shapes, offsets).
    tensors: String,
    files: Vec<String>,
}

/// A shard file's name: the save's own number keeps two saves of one step (after a skipped
/// step, or an lr change) from overwriting the files the live manifest names.
fn shard_file(step: u64, save: u64, rank: usize, world: usize) -> String {
    format!("step-{step}-save-{save:016x}-rank-{rank}-of-{world}.safetensors")
}

/// A number for one save of a group (rank 0's is the group's): unlikely to repeat between saves.
pub(crate) fn save_number() -> u64 {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    nanos ^ (u64::from(std::process::id()) << 32) ^ count.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn tensors_checksum(layout: &Layout) -> String {
    let mut h = crc32fast::Hasher::new();
    for t in layout.tensors() {
        h.update(format!("{}{:?}{}|", t.name, t.shape, t.offset).as_bytes());
    }
    format!("{:08x}", h.finalize())
}

/// Saves `shard` (rank `rank`'s window under `plan`) into `dir`.
pub(crate) fn save_shard(
    dir: &Path,
    shard: &Optimizer,
    save: u64,
    rank: usize,
    plan: &ShardPlan,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = shard_file(shard.step_count()?, save, rank, plan.world);
    shard.save_checkpoint(dir.join(name))
}

/// Writes the manifest of the files saved at `step` by a group cut by `plan` over `whole`, then
/// removes shard files it does not name (best effort).
pub(crate) fn write_manifest(
    dir: &Path,
    whole: &Layout,
    plan: &ShardPlan,
    step: u64,
    save: u64,
) -> Result<()> {
    let files: Vec<String> = (0..plan.world)
        .map(|r| shard_file(step, save, r, plan.world))
        .collect();
    let manifest = Manifest {
        format: FORMAT.into(),
        step,
        world_size: plan.world,
        arena_len: plan.arena_len,
        window_len: plan.window_len,
        tensors: tensors_checksum(whole),
        files: files.clone(),
    };
    let path = dir.join(MANIFEST);
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| bad(&path, e.to_string()))?;
    write_atomically(&path, |f| std::io::Write::write_all(f, &text))?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_shard = name.starts_with("step-") && name.ends_with(".safetensors");
            if is_shard && !files.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Checks a checkpoint at `path` (a sharded directory, or a whole file) against `target` (one
/// window of a set laid out as `whole`, or the whole set) and builds everything a load writes
/// into it, changing nothing yet.
pub(crate) fn prepare_sharded_restore(
    path: &Path,
    whole: &Layout,
    target: &Optimizer,
) -> Result<Restore> {
    let names = target.state_names();
    if !path.is_dir() {
        let checkpoint = Checkpoint::read(path)?;
        let schedule = target.check_header(path, &checkpoint.header)?;
        let file = checkpoint.tensors()?;
        let mut pieces = Pieces::default();
        pieces.add(whole, names, |n| file.tensor(n).ok().map(|v| v.data()));
        return pieces
            .restore_for(target, checkpoint.header.optimizer.clone(), schedule)
            .map_err(|e| bad(path, e.to_string()));
    }
    let manifest_path = path.join(MANIFEST);
    let text = std::fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(&manifest_path, e.to_string()))?;
    let refuse = |reason: String| Err(bad(&manifest_path, reason));
    if m.format != FORMAT {
        return refuse(format!("not a {FORMAT} manifest"));
    }
    if m.world_size == 0 || m.world_size != m.files.len() {
        return refuse(format!(
            "{} files for a group of {}",
            m.files.len(),
            m.world_size
        ));
    }
    let plan = ShardPlan::new(m.arena_len, m.world_size);
    if m.arena_len != whole.arena_len() || m.tensors != tensors_checksum(whole) {
        return refuse("saved from a parameter set with other tensors".into());
    }
    if plan.window_len != m.window_len || m.files.len() != plan.world {
        return refuse(format!(
            "{} files of {} elements do not cut {} elements into {} windows",
            m.files.len(),
            m.window_len,
            m.arena_len,
            m.world_size
        ));
    }
    // The windows that overlap the target's.
    let layout = target.params().layout();
    let mine = layout.base()..layout.base() + layout.arena_len();
    let wanted: Vec<usize> = (0..plan.world)
        .filter(|&r| {
            let w = plan.window(r);
            w.start < mine.end && mine.start < w.end && w.start < whole.arena_len()
        })
        .collect();
    // A window of padding only still takes the saved step and schedule, from rank 0's file.
    let wanted = if wanted.is_empty() { vec![0] } else { wanted };
    let mut checkpoints = Vec::with_capacity(wanted.len());
    let mut schedule = None;
    for &r in &wanted {
        let file: PathBuf = path.join(&m.files[r]);
        let checkpoint = Checkpoint::read(&file)?;
        schedule = target.check_header(&file, &checkpoint.header)?;
        if checkpoint.header.optimizer.step != m.step {
            return Err(bad(
                &file,
                format!(
                    "holds step {}, the manifest step {}",
                    checkpoint.header.optimizer.step, m.step
                ),
            ));
        }
        checkpoints.push(checkpoint);
    }
    let Some(first) = checkpoints.first() else {
        return refuse("no shard file overlaps this window".into());
    };
    let saved = first.header.optimizer.clone();
    let files: Vec<SafeTensors<'_>> = checkpoints
        .iter()
        .map(Checkpoint::tensors)
        .collect::<Result<_>>()?;
    let mut pieces = Pieces::default();
    for (&r, file) in wanted.iter().zip(&files) {
        let window = whole.window(plan.window(r));
        pieces.add(&window, names, |n| file.tensor(n).ok().map(|v| v.data()));
    }
    pieces
        .restore_for(target, saved, schedule)
        .map_err(|e| bad(path, e.to_string()))
}

/// Loads a checkpoint saved by a sharded group (a directory; any group size) — or a whole one —
/// into one unsharded `optimizer`, configured as the group's were. On any error nothing
/// changes.
pub fn load_sharded_checkpoint(optimizer: &mut Optimizer, path: impl AsRef<Path>) -> Result<()> {
    let whole = optimizer.params().layout().clone();
    let restore = prepare_sharded_restore(path.as_ref(), &whole, optimizer)?;
    optimizer.restore(restore)
}
