//! What replicas must agree on to stay identical, hashed part by part so a mismatch is named.

use crate::error::{Error, Result};
use crate::{Optimizer, StateInit};

/// FNV-1a of `text`.
pub(super) fn fnv1a(text: &[u8]) -> u64 {
    text.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Hashes of everything replicas must agree on to stay identical, each part named: the layout
/// and dtypes, the groups, the rule, the lr, the options, the step count and the rule's running
/// step scalars, the loss-scale state,
/// the schedule and its position, and the optimizer state. (Parameters may differ: rank 0's are
/// broadcast, and before the first step the state copied from them follows.) Each part is hashed from its JSON, so no two different values read alike.
pub(super) fn fingerprint(opt: &Optimizer) -> Result<Vec<(&'static str, u64)>> {
    let json = |v: serde_json::Value| fnv1a(v.to_string().as_bytes());
    let params = opt.params();
    let layout = params.layout();
    let saved = opt.saved()?;
    let rule = serde_json::to_value(&saved.rule)
        .map_err(|e| Error::Communicator(format!("fingerprint: {e}")))?;
    let tensors: Vec<serde_json::Value> = layout
        .tensors()
        .iter()
        .map(|t| serde_json::json!([t.name, t.shape, t.group, t.offset]))
        .collect();
    let groups: Vec<serde_json::Value> = layout
        .groups()
        .iter()
        .map(|g| serde_json::json!([g.name, g.options, [g.range.start, g.range.end]]))
        .collect();
    let dtypes = format!(
        "{:?} {:?} {:?}",
        params.grad_dtype(),
        params.model_dtype(),
        params.masters()
    );
    let state = opt.state_buffers()?;
    // Before the first step a buffer that starts as a copy of the parameters (schedule-free's
    // z) differs as they do; the first step sets it from rank 0's broadcast ones.
    let state: Vec<u32> = (0..state.len())
        .zip(opt.state_names())
        .filter(|(_, n)| saved.step > 0 || opt.rule().state_init(n) != StateInit::Params)
        .map(|(slot, _)| state.checksum(slot))
        .collect();
    Ok(vec![
        (
            "layout",
            json(serde_json::json!([tensors, layout.arena_len(), dtypes])),
        ),
        ("groups", json(serde_json::json!(groups))),
        ("rule", json(rule)),
        ("lr", saved.lr.to_bits()),
        ("options", json(serde_json::json!(saved.options))),
        ("step", saved.step),
        ("step scalars", json(serde_json::json!(saved.memo))),
        (
            "loss scale",
            json(serde_json::json!([
                saved.loss_scale.to_bits(),
                saved.good_steps
            ])),
        ),
        (
            "schedule",
            json(
                opt.schedule_now()?
                    .map_or(serde_json::Value::Null, |s| s.save()),
            ),
        ),
        ("state", json(serde_json::json!(state))),
    ])
}
