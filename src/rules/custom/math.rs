//! A custom rule's CPU half: the user's per-element function, compiled into the engine's loop (it
//! is monomorphised there, not called through a pointer per element), with the gradient scaled
//! (clip factor, loss scale, maximize) and weight decay applied first, and its state widened from
//! and rounded back to the state dtype, as every built-in rule does.

use std::sync::Arc;

use half::{bf16, f16};

use super::MAX_COEFFICIENTS;
use crate::rules::{Decay, Update};
use crate::{DType, Element};

/// A gradient run in its dtype.
pub(crate) enum Grads<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

/// The state buffers' runs in their (common) dtype.
pub(crate) enum States<'a, 'b> {
    F32(&'a mut [&'b mut [f32]]),
    BF16(&'a mut [&'b mut [bf16]]),
    F16(&'a mut [&'b mut [f16]]),
}

/// What one step gives every element of a group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct StepArgs {
    pub gscale: f32,
    pub decay: Decay,
    pub values: [f32; MAX_COEFFICIENTS],
    pub len: usize,
}

/// The user's update over a run of elements, for every dtype pair.
pub(crate) trait ElementKernel: Send + Sync {
    fn run(&self, k: &StepArgs, p: &mut [f32], g: Grads<'_>, s: States<'_, '_>);
}

/// A user's `Fn(coefficients, &mut param, grad, state)`.
pub(crate) struct Elementwise<F>(pub F);

impl<F> ElementKernel for Elementwise<F>
where
    F: Fn(&[f32], &mut f32, f32, &mut [f32]) + Send + Sync,
{
    fn run(&self, k: &StepArgs, p: &mut [f32], g: Grads<'_>, s: States<'_, '_>) {
        let f = &self.0;
        match (g, s) {
            (Grads::F32(g), States::F32(s)) => elementwise(f, k, p, g, s),
            (Grads::F32(g), States::BF16(s)) => elementwise(f, k, p, g, s),
            (Grads::F32(g), States::F16(s)) => elementwise(f, k, p, g, s),
            (Grads::BF16(g), States::F32(s)) => elementwise(f, k, p, g, s),
            (Grads::BF16(g), States::BF16(s)) => elementwise(f, k, p, g, s),
            (Grads::BF16(g), States::F16(s)) => elementwise(f, k, p, g, s),
            (Grads::F16(g), States::F32(s)) => elementwise(f, k, p, g, s),
            (Grads::F16(g), States::BF16(s)) => elementwise(f, k, p, g, s),
            (Grads::F16(g), States::F16(s)) => elementwise(f, k, p, g, s),
        }
    }
}

/// The loop, compiled for the same instruction sets as the built-in rules' (no FMA contraction:
/// the same bits on every path).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+avx", "x86_64+avx2+avx"))]
fn elementwise<F: Fn(&[f32], &mut f32, f32, &mut [f32]), G: Element, S: Element>(
    f: &F,
    k: &StepArgs,
    p: &mut [f32],
    g: &[G],
    s: &mut [&mut [S]],
) {
    let values = &k.values[..k.len];
    let n = s.len();
    for i in 0..p.len() {
        let (mut pi, gi) = k.decay.apply(p[i], g[i].to_f32() * k.gscale);
        let mut st = [0.0f32; 3];
        for j in 0..n {
            st[j] = s[j][i].to_f32();
        }
        f(values, &mut pi, gi, &mut st[..n]);
        p[i] = pi;
        for j in 0..n {
            s[j][i] = S::from_f32(st[j]);
        }
    }
}

/// One step's coefficients of a custom rule for one group, and its update.
#[derive(Clone)]
pub(crate) struct CustomCoefficients {
    pub args: StepArgs,
    pub kernel: Arc<dyn ElementKernel>,
}

impl std::fmt::Debug for CustomCoefficients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomCoefficients")
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl PartialEq for CustomCoefficients {
    fn eq(&self, other: &Self) -> bool {
        self.args == other.args && Arc::ptr_eq(&self.kernel, &other.kernel)
    }
}

/// `&[T]` as the f32/bf16/f16 slice it is (a no-op view: `T` is that type).
fn typed<T: Element, U: Element>(x: &[T]) -> &[U] {
    bytemuck::cast_slice(x)
}

impl Update for CustomCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        let g = match G::DTYPE {
            DType::F32 => Grads::F32(typed(g)),
            DType::BF16 => Grads::BF16(typed(g)),
            DType::F16 => Grads::F16(typed(g)),
        };
        macro_rules! states {
            ($t:ty, $variant:ident) => {{
                let mut views: [&mut [$t]; 3] = [&mut [], &mut [], &mut []];
                let n = state.len();
                for (v, s) in views.iter_mut().zip(state.iter_mut()) {
                    *v = bytemuck::cast_slice_mut(&mut **s);
                }
                self.kernel
                    .run(&self.args, p, g, States::$variant(&mut views[..n]));
            }};
        }
        match S::DTYPE {
            DType::F32 => states!(f32, F32),
            DType::BF16 => states!(bf16, BF16),
            DType::F16 => states!(f16, F16),
        }
    }
}

/// Stands in for the CPU function of a rule read back from a checkpoint (which holds none): the
/// optimizer refuses such a rule before any step (`runnable_on`), so this never runs.
pub(crate) struct Unrunnable;

impl ElementKernel for Unrunnable {
    fn run(&self, _: &StepArgs, _: &mut [f32], _: Grads<'_>, _: States<'_, '_>) {}
}
