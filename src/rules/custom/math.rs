//! A custom rule's CPU half: the user's per-element function, compiled into the engine's loop (it
//! is monomorphised there, not called through a pointer per element), with the gradient scaled
//! (clip factor, loss scale, maximize) and weight decay applied first, and its state widened from
//! and rounded back to the state dtype, as every built-in rule does.

use std::sync::Arc;

use half::{bf16, f16};

use super::{MAX_COEFFICIENTS, MAX_SLOTS};
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
    pub values: CoefficientValues,
}

/// The user's update over a run of elements, for every dtype pair.
pub(crate) trait ElementKernel: Send + Sync {
    fn run(&self, k: &StepArgs, p: &mut [f32], g: Grads<'_>, s: States<'_, '_>);
}

/// The coefficients a user's function reads (in declaration order; the rest 0).
pub type CoefficientValues = [f32; MAX_COEFFICIENTS];
/// The state a user's function updates (in slot order; the rest unused).
pub type SlotValues = [f32; MAX_SLOTS];

/// A user's `Fn(coefficients, &mut param, grad, state)`.
pub(crate) struct Elementwise<F>(pub F);

impl<F> ElementKernel for Elementwise<F>
where
    F: Fn(&CoefficientValues, &mut f32, f32, &mut SlotValues) + Send + Sync,
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

/// One element: scaled gradient, weight decay, the user's function, state rounded back.
#[inline(always)]
fn element<F, S: Element, const N: usize>(f: &F, k: &StepArgs, p: &mut f32, g: f32, s: [&mut S; N])
where
    F: Fn(&CoefficientValues, &mut f32, f32, &mut SlotValues),
{
    let (mut pi, gi) = k.decay.apply(*p, g * k.gscale);
    let mut st: SlotValues = [0.0; MAX_SLOTS];
    for (v, x) in st.iter_mut().zip(&s) {
        *v = x.to_f32();
    }
    f(&k.values, &mut pi, gi, &mut st);
    *p = pi;
    for (x, v) in s.into_iter().zip(st) {
        *x = S::from_f32(v);
    }
}

/// The loop over a run, one zip per slot count (so the compiler sees straight-line code to
/// vectorise, as in the built-in rules), compiled for the same instruction sets as theirs (no FMA
/// contraction: the same bits on every path).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+avx", "x86_64+avx2+avx"))]
fn elementwise<F: Fn(&CoefficientValues, &mut f32, f32, &mut SlotValues), G: Element, S: Element>(
    f: &F,
    k: &StepArgs,
    p: &mut [f32],
    g: &[G],
    s: &mut [&mut [S]],
) {
    let pg = p.iter_mut().zip(g);
    match s {
        [] => pg.for_each(|(p, g)| element::<F, S, 0>(f, k, p, g.to_f32(), [])),
        [a] => pg
            .zip(a.iter_mut())
            .for_each(|((p, g), a)| element(f, k, p, g.to_f32(), [a])),
        [a, b] => pg
            .zip(a.iter_mut())
            .zip(b.iter_mut())
            .for_each(|(((p, g), a), b)| element(f, k, p, g.to_f32(), [a, b])),
        [a, b, c, ..] => pg
            .zip(a.iter_mut())
            .zip(b.iter_mut())
            .zip(c.iter_mut())
            .for_each(|((((p, g), a), b), c)| element(f, k, p, g.to_f32(), [a, b, c])),
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
