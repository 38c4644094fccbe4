//! The CPU engine: the launch plan's chunks spread over the cores of rayon's pool.
//!
//! A step allocates nothing: chunk partial sums live in a buffer sized once, and the per-chunk work
//! is rayon's allocation-free fork-join over zipped `par_chunks`. The norm is the square root of the
//! per-chunk f64 partials summed in chunk order, so it has the same bits on every run and thread
//! count.

use rayon::prelude::*;

use crate::optim::rules::StepCoefficients;
use crate::plan::LaunchPlan;

#[derive(Clone, Debug)]
pub struct CpuEngine {
    plan: LaunchPlan,
    partials: Vec<f64>,
}

impl CpuEngine {
    pub fn new(plan: LaunchPlan) -> Self {
        let partials = vec![0.0; plan.num_chunks()];
        CpuEngine { plan, partials }
    }

    pub fn plan(&self) -> &LaunchPlan {
        &self.plan
    }

    /// Σ g² over the arena in f64, deterministic.
    pub fn sum_of_squares(&mut self, grads: &[f32]) -> f64 {
        let c = self.plan.chunk_elems();
        self.partials
            .par_iter_mut()
            .zip(grads.par_chunks(c))
            .for_each(|(out, g)| *out = chunk_sum_of_squares(g));
        self.partials.iter().sum()
    }

    /// Applies `coeffs[group]` to every segment of the plan.
    pub fn update(
        &self,
        values: &mut [f32],
        grads: &[f32],
        state: &mut [Vec<f32>],
        coeffs: &[StepCoefficients],
    ) {
        let c = self.plan.chunk_elems();
        let plan = &self.plan;
        let run = |chunk: usize, p: &mut [f32], g: &[f32], s: &mut [&mut [f32]]| {
            let base = chunk * c;
            let n = s.len();
            for seg in plan.segments_of(chunk) {
                let r = seg.start - base..seg.start - base + seg.len;
                let mut views: [&mut [f32]; 3] = [&mut [], &mut [], &mut []];
                for (view, buf) in views.iter_mut().zip(s.iter_mut()) {
                    *view = &mut buf[r.clone()];
                }
                update_segment(
                    &coeffs[seg.group],
                    &mut p[r.clone()],
                    &g[r],
                    &mut views[..n],
                );
            }
        };
        let pg = values.par_chunks_mut(c).zip(grads.par_chunks(c));
        match state {
            [] => pg.enumerate().for_each(|(i, (p, g))| run(i, p, g, &mut [])),
            [a] => pg
                .zip(a.par_chunks_mut(c))
                .enumerate()
                .for_each(|(i, ((p, g), a))| run(i, p, g, &mut [a])),
            [a, b] => pg
                .zip(a.par_chunks_mut(c))
                .zip(b.par_chunks_mut(c))
                .enumerate()
                .for_each(|(i, (((p, g), a), b))| run(i, p, g, &mut [a, b])),
            [a, b, d] => pg
                .zip(a.par_chunks_mut(c))
                .zip(b.par_chunks_mut(c))
                .zip(d.par_chunks_mut(c))
                .enumerate()
                .for_each(|(i, ((((p, g), a), b), d))| run(i, p, g, &mut [a, b, d])),
            _ => unreachable!("no rule keeps more than three state buffers"),
        }
    }
}

/// One segment's update, compiled for several instruction sets and dispatched on the running CPU
/// (wider vectors halve the cost of Adam's and RMSProp's square roots and divisions). Only vector
/// width changes: no FMA contraction, so results are the same bits on every path.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+avx", "x86_64+avx2+avx"))]
fn update_segment(c: &StepCoefficients, p: &mut [f32], g: &[f32], state: &mut [&mut [f32]]) {
    c.update(p, g, state)
}

/// Σ g² of one chunk: eight f64 lanes so the loop vectorises and large chunks lose no precision.
fn chunk_sum_of_squares(g: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut it = g.chunks_exact(8);
    for block in &mut it {
        for (acc, &x) in lanes.iter_mut().zip(block) {
            let x = x as f64;
            *acc += x * x;
        }
    }
    let tail: f64 = it
        .remainder()
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    lanes.iter().sum::<f64>() + tail
}
