//! Test helpers: an f64 scalar oracle written from the update equations (SEMANTICS.md), independent
//! of the engine's coefficient factoring, and random data of awkward sizes.
#![allow(dead_code)]

use fusedopt::{
    AdamEps, AmsGrad, ClipFormula, DType, Device, EpsPlacement, GlobalNormClip, GroupOptions,
    LrPlacement, MomentumInit, ParamSet, Rule, WeightDecay,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Whether `requirement` holds; otherwise says loudly that `test` was skipped and why (a failure
/// when FUSEDOPT_REQUIRE_GPU=1).
pub fn required_or_skip(test: &str, requirement: Result<(), String>) -> bool {
    use std::io::Write;
    match requirement {
        Ok(()) => true,
        Err(why) => {
            let msg = format!("GPU TEST SKIPPED: {test}: {why}");
            if std::env::var("FUSEDOPT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{msg} (FUSEDOPT_REQUIRE_GPU=1)");
            }
            // Straight to the stderr handle: the harness captures eprintln!, and a skip must show.
            let _ = writeln!(std::io::stderr(), "{msg}");
            false
        }
    }
}

/// Whether CUDA device 0 is a real GPU; on the emulated GPU, says loudly that `test` was skipped
/// and why. Only for tests that cannot run on the host (memory the machine does not have): such a
/// skip does not fail under FUSEDOPT_REQUIRE_GPU=1.
pub fn real_gpu_or_skip(test: &str, why: &str) -> bool {
    use std::io::Write;
    if !Device::Cuda(0).is_emulated() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "GPU TEST SKIPPED ON THE EMULATED GPU: {test}: {why}"
    );
    false
}

/// Whether CUDA device 0 is the emulated GPU; otherwise says loudly that `test` was skipped (it
/// needs something only the emulator offers, such as its counters or fault injection).
pub fn emulated_gpu_or_skip(test: &str, why: &str) -> bool {
    use std::io::Write;
    if Device::Cuda(0).is_emulated() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "GPU TEST SKIPPED OFF THE EMULATED GPU: {test}: {why}"
    );
    false
}

/// One of the emulated driver's counters (emulated-gpu/src/driver.cpp: `fusedopt_emu_counter`),
/// read on each call of the returned function.
pub fn emulated_counter(name: &'static str) -> impl Fn() -> i64 {
    // SAFETY: the emulated libcuda.so is already loaded (cudarc opened it by this name, so this
    // is the same library), and the counter function has this C signature there.
    let lib = unsafe { libloading::Library::new("libcuda.so") }.expect("the emulated driver");
    let f: unsafe extern "C" fn(*const std::ffi::c_char) -> i64 =
        // SAFETY: the symbol is the emulated driver's counter function, of this signature.
        *unsafe { lib.get(b"fusedopt_emu_counter") }.expect("the emulated driver's counters");
    std::mem::forget(lib); // keep the function mapped for the process's life
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: the function reads the NUL-terminated name only.
    move || unsafe { f(name.as_ptr()) }
}

/// Whether CUDA device 0 is usable (see [`required_or_skip`]).
pub fn gpu_or_skip(test: &str) -> bool {
    required_or_skip(test, Device::Cuda(0).check().map_err(|e| e.to_string()))
}

/// The repository: where the test was built, unless FUSEDOPT_REPO says otherwise (a test binary
/// carried to another machine, as the GPU bundle does, finds its data there).
pub fn repo_root() -> std::path::PathBuf {
    std::env::var_os("FUSEDOPT_REPO")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// One tensor of test data.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub group: &'static str,
    pub values: Vec<f32>,
}

/// Tensors of the sizes that break chunking and vector loops: empty, one element, odd, a page plus
/// one, a CPU chunk ± 1, in two groups (the second with its own lr scale and no decay).
pub fn awkward_tensors(seed: u64) -> Vec<Tensor> {
    let chunk = fusedopt::plan::CPU_CHUNK_ELEMS;
    let sizes = [0, 1, 3, 4097, chunk - 1, chunk + 1, 17];
    let mut rng = StdRng::seed_from_u64(seed);
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Tensor {
            name: format!("t{i}"),
            group: if i % 3 == 2 { "nodecay" } else { "default" },
            values: (0..n).map(|_| away_from_zero(&mut rng)).collect(),
        })
        .collect()
}

/// A parameter of magnitude in [0.3, 0.6] with random sign: far enough from zero that no test step
/// takes it across (where L1's sign, computed in f32 and f64, could differ).
fn away_from_zero(rng: &mut StdRng) -> f32 {
    let m = rng.gen_range(0.3..0.6);
    if rng.gen_bool(0.5) {
        m
    } else {
        -m
    }
}

/// Many small tensors of random sizes (1..=40).
pub fn many_tensors(seed: u64, count: usize) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let n = rng.gen_range(1..=40);
            Tensor {
                name: format!("m{i}"),
                group: if i % 5 == 0 { "nodecay" } else { "default" },
                values: (0..n).map(|_| away_from_zero(&mut rng)).collect(),
            }
        })
        .collect()
}

pub const NODECAY_LR_SCALE: f64 = 0.5;

pub fn build(tensors: &[Tensor]) -> ParamSet {
    build_with(Device::Cpu, tensors, DType::F32, None)
}

/// The test tensors on `device`, in the default group and a "nodecay" group with its own lr scale,
/// with gradients of `grads` and an optional model copy.
pub fn build_with(
    device: Device,
    tensors: &[Tensor],
    grads: DType,
    model: Option<DType>,
) -> ParamSet {
    let mut b = ParamSet::builder();
    b.group(
        "nodecay",
        GroupOptions {
            lr_scale: NODECAY_LR_SCALE,
            weight_decay: Some(0.0),
        },
    )
    .unwrap();
    b.grad_dtype(grads);
    if let Some(m) = model {
        b.model_copy(m).unwrap();
    }
    for t in tensors {
        b.add_to(t.group, &t.name, &[t.values.len()], &t.values)
            .unwrap();
    }
    b.build(device).unwrap()
}

/// Gradients of magnitude in [scale/2, scale] with random sign: bounded away from zero so that no
/// element's update hinges on f32 cancellation against the weight-decay term, which would make the
/// f32 engine and the f64 oracle legitimately disagree.
pub fn random_grads(rng: &mut StdRng, tensors: &[Tensor], scale: f32) -> Vec<Vec<f32>> {
    tensors
        .iter()
        .map(|t| {
            (0..t.values.len())
                .map(|_| {
                    let m = rng.gen_range(scale / 2.0..=scale);
                    if rng.gen_bool(0.5) {
                        m
                    } else {
                        -m
                    }
                })
                .collect()
        })
        .collect()
}

/// The f64 reference: per-element state, updated with the equations as the frameworks write them.
pub struct Oracle {
    pub rule: Rule,
    pub clip: Option<GlobalNormClip>,
    pub params: Vec<Vec<f64>>,
    pub groups: Vec<&'static str>,
    s1: Vec<Vec<f64>>,
    s2: Vec<Vec<f64>>,
    s3: Vec<Vec<f64>>,
    pub t: u64,
    /// Rounds state after every update, as storage in a narrower dtype does.
    pub state_round: fn(f64) -> f64,
}

impl Oracle {
    pub fn new(rule: Rule, clip: Option<GlobalNormClip>, tensors: &[Tensor]) -> Self {
        let zeros =
            || -> Vec<Vec<f64>> { tensors.iter().map(|t| vec![0.0; t.values.len()]).collect() };
        let fill =
            |x: f64| -> Vec<Vec<f64>> { tensors.iter().map(|t| vec![x; t.values.len()]).collect() };
        let s1 = match &rule {
            Rule::RmsProp(r) => fill(r.initial_square_avg),
            Rule::Adagrad(r) => fill(r.initial_accumulator),
            _ => zeros(),
        };
        Oracle {
            params: tensors
                .iter()
                .map(|t| t.values.iter().map(|&x| x as f64).collect())
                .collect(),
            groups: tensors.iter().map(|t| t.group).collect(),
            s1,
            s2: zeros(),
            s3: zeros(),
            t: 0,
            rule,
            clip,
            state_round: |x| x,
        }
    }

    /// One step with `lr` (before group scaling); returns the pre-clip norm. Indexes five parallel
    /// arrays per element, which reads more plainly than five zipped iterators.
    #[allow(clippy::needless_range_loop)]
    pub fn step(&mut self, grads: &[Vec<f32>], lr: f64) -> f64 {
        let norm = grads
            .iter()
            .flatten()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt();
        let factor = match self.clip {
            None => 1.0,
            Some(c) => match c.formula {
                ClipFormula::PyTorch => (c.max_norm / (norm + 1e-6)).min(1.0),
                ClipFormula::Keras => {
                    if norm > c.max_norm {
                        c.max_norm / norm
                    } else {
                        1.0
                    }
                }
                ClipFormula::Optax => {
                    if norm < c.max_norm {
                        1.0
                    } else {
                        c.max_norm / norm
                    }
                }
            },
        };
        self.t += 1;
        let t = self.t as i32;
        for i in 0..self.params.len() {
            let nodecay = self.groups[i] == "nodecay";
            let lr = if nodecay { lr * NODECAY_LR_SCALE } else { lr };
            let wd = if nodecay {
                WeightDecay::L2(0.0)
            } else {
                self.rule_weight_decay()
            };
            for j in 0..self.params[i].len() {
                let mut g = grads[i][j] as f64 * factor;
                let mut p = self.params[i][j];
                if self.maximize() {
                    g = -g;
                }
                match wd {
                    WeightDecay::None => {}
                    WeightDecay::L2(l) => g += l * p,
                    WeightDecay::L1(l) => g += l * (if p == 0.0 { 0.0 } else { p.signum() }),
                    WeightDecay::Decoupled(l) => p -= lr * l * p,
                }
                let (a, b, c) = (&mut self.s1[i][j], &mut self.s2[i][j], &mut self.s3[i][j]);
                self.params[i][j] = update(&self.rule, p, g, lr, t, a, b, c);
                let round = self.state_round;
                for x in [a, b, c] {
                    *x = round(*x);
                }
            }
        }
        norm
    }

    fn rule_weight_decay(&self) -> WeightDecay {
        self.rule.weight_decay()
    }

    fn maximize(&self) -> bool {
        self.rule.maximize()
    }
}

/// The textbook update of one element; `a`, `b`, `c` are the rule's state in slot order.
#[allow(clippy::too_many_arguments)]
fn update(
    rule: &Rule,
    p: f64,
    g: f64,
    lr: f64,
    t: i32,
    a: &mut f64,
    b: &mut f64,
    c: &mut f64,
) -> f64 {
    match rule {
        Rule::Sgd(r) => {
            if r.momentum == 0.0 {
                return p - lr * g;
            }
            let mu = r.momentum;
            match r.lr_placement {
                LrPlacement::Outside => {
                    // PyTorch: first buffer is a copy of g; Optax/TF1: zero-initialised trace.
                    *a = if t == 1 && r.momentum_init == MomentumInit::CopyGrad {
                        g
                    } else {
                        mu * *a + (1.0 - r.dampening) * g
                    };
                    let d = if r.nesterov { g + mu * *a } else { *a };
                    p - lr * d
                }
                LrPlacement::Inside => {
                    // Keras: m = μm − lr·g (dampening scales g).
                    *a = mu * *a - lr * (1.0 - r.dampening) * g;
                    if r.nesterov {
                        p + mu * *a - lr * g
                    } else {
                        p + *a
                    }
                }
            }
        }
        Rule::Adam(r) => {
            let (b1, b2) = (r.beta1, r.beta2);
            *a = b1 * *a + (1.0 - b1) * g;
            *b = b2 * *b + (1.0 - b2) * g * g;
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            match (r.eps_scale, r.amsgrad) {
                (AdamEps::Raw, ams) => {
                    let v = match ams {
                        AmsGrad::Off => *b,
                        AmsGrad::MaxRaw => {
                            *c = c.max(*b);
                            *c
                        }
                        AmsGrad::MaxCorrected => {
                            *c = c.max(*b / bc2);
                            *c * bc2
                        }
                    };
                    let alpha = lr * bc2.sqrt() / bc1;
                    p - alpha * *a / ((v + r.eps_root).sqrt() + r.eps)
                }
                (AdamEps::BiasCorrected, ams) => {
                    let m_hat = *a / bc1;
                    let v_hat = match ams {
                        AmsGrad::Off => *b / bc2,
                        AmsGrad::MaxRaw => {
                            *c = c.max(*b);
                            *c / bc2
                        }
                        AmsGrad::MaxCorrected => {
                            *c = c.max(*b / bc2);
                            *c
                        }
                    };
                    p - lr * m_hat / ((v_hat + r.eps_root).sqrt() + r.eps)
                }
            }
        }
        Rule::RmsProp(r) => {
            let al = r.alpha;
            *a = al * *a + (1.0 - al) * g * g;
            let corr = if r.bias_correction {
                1.0 - al.powi(t)
            } else {
                1.0
            };
            let mut var = *a / corr;
            let (gavg, buf) = if r.centered { (b, c) } else { (c, b) };
            if r.centered {
                *gavg = al * *gavg + (1.0 - al) * g;
                var -= (*gavg / corr).powi(2);
            }
            let denom = match r.eps_placement {
                EpsPlacement::OutsideSqrt => var.sqrt() + r.eps,
                EpsPlacement::InsideSqrt => (var + r.eps).sqrt(),
            };
            if r.momentum == 0.0 {
                return p - lr * g / denom;
            }
            match r.lr_placement {
                LrPlacement::Outside => {
                    *buf = r.momentum * *buf + g / denom;
                    if r.nesterov {
                        p - lr * (g / denom + r.momentum * *buf)
                    } else {
                        p - lr * *buf
                    }
                }
                LrPlacement::Inside => {
                    let u = lr * g / denom;
                    *buf = r.momentum * *buf + u;
                    if r.nesterov {
                        p - (u + r.momentum * *buf)
                    } else {
                        p - *buf
                    }
                }
            }
        }
        Rule::Adagrad(r) => {
            *a += g * g;
            let clr = lr / (1.0 + (t - 1) as f64 * r.lr_decay);
            if r.zero_where_empty && *a <= 0.0 {
                return p;
            }
            let denom = match r.eps_placement {
                EpsPlacement::OutsideSqrt => a.sqrt() + r.eps,
                EpsPlacement::InsideSqrt => (*a + r.eps).sqrt(),
            };
            p - clr * g / denom
        }
    }
}

/// Asserts `got` (f32) is within `atol + rtol·|want|` of the oracle's f64 values.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        // NaN agrees with NaN, and an infinity with the same infinity (the error is NaN there).
        if (g.is_nan() && w.is_nan()) || (w.is_infinite() && g as f64 == w) {
            continue;
        }
        let err = (g as f64 - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}[{k}]: got {g}, oracle {w} (error {err:e})"
        );
    }
}
