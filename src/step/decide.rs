//! The step decision on the host: `decide_step` in decide.cuh, line for line.

use super::{clip_factor, usable_loss_scale, StepParams, StepState, POLICY_PROPAGATE};

/// Decides the step from Σg² of the (scaled) gradients; `have_norm` is false when no norm was
/// needed (no clipping, non-finite values propagate, no dynamic scaling).
pub(crate) fn decide(st: &mut StepState, q: &StepParams, sum_sq: f64, have_norm: bool) {
    st.step_loss_scale = st.loss_scale;
    let inv_scale = 1.0 / st.loss_scale;
    let n = if have_norm {
        sum_sq.sqrt() * inv_scale
    } else {
        0.0
    };
    st.norm = n;
    st.have_norm = have_norm as u32;
    let finite = !have_norm || n.is_finite();
    if !finite && (q.dynamic_scale != 0 || q.policy != POLICY_PROPAGATE) {
        st.skip = 1;
        st.clip_factor = 1.0;
        if q.dynamic_scale != 0 {
            // Back off only while the scale stays usable.
            let backed = st.loss_scale * q.backoff_factor;
            if usable_loss_scale(backed) {
                st.loss_scale = backed;
            }
            st.good_steps = 0;
        }
        return;
    }
    st.skip = 0;
    st.clip_factor = if have_norm { clip_factor(q, n) } else { 1.0 };
    st.grad_scale = st.clip_factor * inv_scale;
    st.step += 1;
    if q.dynamic_scale != 0 {
        st.good_steps += 1;
        if st.good_steps >= q.growth_interval {
            // As GradScaler: grow only while the scale stays finite in f32 (and usable).
            let grown = st.loss_scale * q.growth_factor;
            if usable_loss_scale(grown) {
                st.loss_scale = grown;
            }
            st.good_steps = 0;
        }
    }
}
