//! Quantized optimizer state inside the fused step (`OptimizerOptions::quantized_state`): on the
//! CPU engine bit for bit against a scalar oracle of the published algorithm (torchao's block
//! quantizer around PyTorch's AdamW), close to torchao's own AdamW8bit and AdamW4bit trajectories
//! (recorded by `scripts/record-lean.sh`), every rule that can hold quantized state close to its
//! f32 run, the options around the step (checkpoints, non-finite skip, loss scaling, data
//! parallelism, typed refusals), and the CUDA engine bit for bit like the CPU engine.

mod common;

use common::*;
use fusedopt::lean::QuantMap;
use fusedopt::parallel::DataParallel;
use fusedopt::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sizes that exercise the layout: coded (a whole number of blocks, at least 4096), not a whole
/// number of 8-bit blocks (4-bit coded only), crossing a CPU chunk, small, the threshold itself.
const SIZES: [(&str, usize, &str); 6] = [
    ("w", 8192, "default"),
    ("half_blocks", 4224, "default"),
    ("wide", 33024, "default"),
    ("bias", 100, "nodecay"),
    ("threshold", 4096, "nodecay"),
    ("tiny", 3, "default"),
];

fn tensors(seed: u64) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    SIZES
        .iter()
        .map(|&(name, n, group)| Tensor {
            name: name.into(),
            group,
            values: (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect(),
        })
        .collect()
}

fn options(q: QuantizedState) -> OptimizerOptions {
    OptimizerOptions {
        quantized_state: q,
        ..Default::default()
    }
}

fn block(q: QuantizedState) -> usize {
    match q {
        QuantizedState::Block4 => 128,
        _ => 256,
    }
}

/// torchao's quantizer as its Python reads: the block's largest magnitude (at least 1e-12) as
/// scale, a branchless binary search for the last entry <= x, then the upper code when the
/// residual reaches half the gap.
fn oracle_code(table: &[f32], x: f32) -> u8 {
    let n = table.len();
    let mut code = if x >= table[n / 2] { n / 2 } else { 0 };
    let mut step = n / 4;
    while step >= 1 {
        if x >= table[code + step] {
            code += step;
        }
        step /= 2;
    }
    let up = (code + 1).min(n - 1);
    if x - table[code] >= (table[up] - table[code]) * 0.5 {
        up as u8
    } else {
        code as u8
    }
}

/// One state buffer of one tensor in the oracle: coded blocks, or f32.
enum OracleState {
    Coded {
        table: &'static [f32],
        codes: Vec<u8>,
        scales: Vec<f32>,
    },
    Full(Vec<f32>),
}

impl OracleState {
    fn new(q: QuantizedState, len: usize, map: QuantMap) -> Self {
        let b = block(q);
        if len >= 4096 && len % b == 0 {
            // torchao's zeros(): every code 0 and every scale 0, decoding to zero.
            OracleState::Coded {
                table: map.values(),
                codes: vec![0; len],
                scales: vec![0.0; len / b],
            }
        } else {
            OracleState::Full(vec![0.0; len])
        }
    }

    fn decode(&self, b: usize) -> Vec<f32> {
        match self {
            OracleState::Coded {
                table,
                codes,
                scales,
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| table[c as usize] * scales[i / b])
                .collect(),
            OracleState::Full(v) => v.clone(),
        }
    }

    fn encode(&mut self, b: usize, values: &[f32]) {
        match self {
            OracleState::Coded {
                table,
                codes,
                scales,
            } => {
                for (k, chunk) in values.chunks(b).enumerate() {
                    let amax = chunk.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let scale = amax.max(1e-12);
                    scales[k] = scale;
                    for (i, &x) in chunk.iter().enumerate() {
                        codes[k * b + i] = oracle_code(table, x / scale);
                    }
                }
            }
            OracleState::Full(v) => v.copy_from_slice(values),
        }
    }
}

/// PyTorch's AdamW (optionally AMSGrad) over quantized state, one tensor at a time, in f32 with
/// the f64 coefficients PyTorch's fused kernel rounds once.
struct Oracle {
    q: QuantizedState,
    params: Vec<Vec<f32>>,
    /// Per tensor: exp_avg, exp_avg_sq (and max_exp_avg_sq).
    state: Vec<Vec<OracleState>>,
    lr_scale: Vec<f64>,
    decay: Vec<f64>,
    amsgrad: bool,
    step: i32,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const WD: f64 = 0.01;

impl Oracle {
    fn new(q: QuantizedState, tensors: &[Tensor], amsgrad: bool) -> Self {
        let (signed, unsigned) = match q {
            QuantizedState::Block4 => (QuantMap::DynamicSigned4, QuantMap::LinearUnsigned4),
            _ => (QuantMap::DynamicSigned8, QuantMap::DynamicUnsigned8),
        };
        let slots: &[QuantMap] = if amsgrad {
            &[signed, unsigned, unsigned]
        } else {
            &[signed, unsigned]
        };
        Oracle {
            q,
            params: tensors.iter().map(|t| t.values.clone()).collect(),
            state: tensors
                .iter()
                .map(|t| {
                    let n = t.values.len();
                    slots.iter().map(|&m| OracleState::new(q, n, m)).collect()
                })
                .collect(),
            lr_scale: tensors
                .iter()
                .map(|t| {
                    if t.group == "nodecay" {
                        NODECAY_LR_SCALE
                    } else {
                        1.0
                    }
                })
                .collect(),
            decay: tensors
                .iter()
                .map(|t| if t.group == "nodecay" { 0.0 } else { WD })
                .collect(),
            amsgrad,
            step: 0,
        }
    }

    fn step(&mut self, grads: &[Vec<f32>], lr: f64, gscale: f32) {
        self.step += 1;
        let bc1 = 1.0 - BETA1.powi(self.step);
        let bc2 = 1.0 - BETA2.powi(self.step);
        let b = block(self.q);
        for (i, g) in grads.iter().enumerate() {
            let lr = lr * self.lr_scale[i];
            let keep = (1.0 - lr * self.decay[i]) as f32;
            let step_size = (lr / bc1) as f32;
            let v_scale = (1.0 / bc2) as f32;
            let mut s: Vec<Vec<f32>> = self.state[i].iter().map(|x| x.decode(b)).collect();
            for (k, p) in self.params[i].iter_mut().enumerate() {
                let g = g[k] * gscale;
                let p0 = if keep != 1.0 { *p * keep } else { *p };
                s[0][k] += (1.0 - BETA1) as f32 * (g - s[0][k]);
                s[1][k] = BETA2 as f32 * s[1][k] + (1.0 - BETA2) as f32 * g * g;
                let u = if self.amsgrad {
                    s[2][k] = if s[2][k] > s[1][k] { s[2][k] } else { s[1][k] };
                    s[2][k]
                } else {
                    s[1][k]
                };
                let denom = (u * v_scale + 0.0).sqrt() + EPS as f32;
                *p = p0 - step_size * s[0][k] / denom;
            }
            for (slot, values) in self.state[i].iter_mut().zip(&s) {
                slot.encode(b, values);
            }
        }
    }
}

fn adamw(amsgrad: bool) -> Adam {
    Adam {
        amsgrad: if amsgrad {
            AmsGrad::MaxRaw
        } else {
            AmsGrad::Off
        },
        ..Adam::preset(Flavor::PyTorch)
    }
    .with_weight_decay(WeightDecay::Decoupled(WD))
}

fn set_grads(opt: &mut Optimizer, tensors: &[Tensor], grads: &[Vec<f32>]) {
    let mut p = opt.params_mut();
    for (t, g) in tensors.iter().zip(grads) {
        p.set_grad(&t.name, g).unwrap();
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Every parameter and every state buffer (decoded, as `Optimizer::state` exports it) equals the
/// oracle's bit for bit, step after step: 8-bit and 4-bit, with AMSGrad's third buffer, with bf16
/// gradients and a bf16 model copy, over coded, f32 and chunk-crossing tensors in two groups.
#[test]
fn quantized_adamw_equals_the_scalar_oracle_bit_for_bit() {
    let configs = [
        (QuantizedState::Block8, false, DType::F32, None),
        (QuantizedState::Block4, false, DType::F32, None),
        (QuantizedState::Block8, true, DType::BF16, Some(DType::BF16)),
        (QuantizedState::Block4, true, DType::F32, Some(DType::BF16)),
    ];
    for (q, amsgrad, grad_dtype, model) in configs {
        let what = format!("{q:?} amsgrad={amsgrad} grads={grad_dtype} model={model:?}");
        let ts = tensors(7);
        let params = build_with(Device::Cpu, &ts, grad_dtype, model);
        let lr = 3e-3;
        let mut opt = Optimizer::with_options(params, adamw(amsgrad), lr, options(q)).unwrap();
        let mut oracle = Oracle::new(q, &ts, amsgrad);
        let mut rng = StdRng::seed_from_u64(11);
        for step in 1..=6 {
            let scale = [1.0, 1e-3, 30.0][step % 3];
            let mut grads = random_grads(&mut rng, &ts, scale);
            if grad_dtype == DType::BF16 {
                for g in grads.iter_mut().flatten() {
                    *g = half::bf16::from_f32(*g).to_f32();
                }
            }
            set_grads(&mut opt, &ts, &grads);
            opt.step().unwrap();
            assert!(!opt.report().unwrap().skipped);
            oracle.step(&grads, lr, 1.0);
            let names = opt.state_names();
            for (i, t) in ts.iter().enumerate() {
                let got = opt.params().read_param(&t.name).unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&oracle.params[i]),
                    "{what}: step {step}, param {}",
                    t.name
                );
                for (slot, name) in names.iter().enumerate() {
                    let want = oracle.state[i][slot].decode(block(q));
                    let got = opt.state(name, &t.name).unwrap();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{what}: step {step}, {name} of {}",
                        t.name
                    );
                }
                if model.is_some() {
                    let copy = opt.params().read_model_param(&t.name).unwrap();
                    let want: Vec<f32> = oracle.params[i]
                        .iter()
                        .map(|&p| half::bf16::from_f32(p).to_f32())
                        .collect();
                    assert_eq!(bits(&copy), bits(&want), "{what}: model copy of {}", t.name);
                }
            }
        }
    }
}

/// Global-norm clipping folds into the quantized step: the oracle given the clip factor of the
/// f64 norm (PyTorch's formula) agrees bit for bit.
#[test]
fn clipping_folds_into_the_quantized_step() {
    let ts = tensors(8);
    let max_norm = 0.5;
    let o = OptimizerOptions {
        clip: Some(GlobalNormClip::new(max_norm, ClipFormula::PyTorch)),
        ..options(QuantizedState::Block8)
    };
    let mut opt = Optimizer::with_options(build(&ts), adamw(false), 1e-3, o).unwrap();
    let mut oracle = Oracle::new(QuantizedState::Block8, &ts, false);
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..3 {
        let grads = random_grads(&mut rng, &ts, 1.0);
        let norm = grads
            .iter()
            .flatten()
            .map(|&g| g as f64 * g as f64)
            .sum::<f64>()
            .sqrt();
        set_grads(&mut opt, &ts, &grads);
        opt.step().unwrap();
        let report = opt.report().unwrap();
        let factor = (max_norm / (norm + 1e-6)).min(1.0);
        assert!(factor < 1.0 && (report.clip_factor - factor).abs() < 1e-12 * factor);
        oracle.step(&grads, 1e-3, factor as f32);
    }
    for (i, t) in ts.iter().enumerate() {
        let got = opt.params().read_param(&t.name).unwrap();
        assert_eq!(bits(&got), bits(&oracle.params[i]), "param {}", t.name);
    }
}

/// lowbias32, as `scripts/record_lean_trajectory.py` hashes.
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// `n` values in [-1, 1), exact in f32, as the recording script draws them.
fn uniform(seed: u32, n: usize) -> Vec<f32> {
    (0..n as u32)
        .map(|i| (hash32(i.wrapping_add(seed)) >> 8) as f32 * 2f32.powi(-23) - 1.0)
        .collect()
}

/// The recorded model's tensors (name, elements), as the recording script lists them.
const RECORDED: [(&str, usize); 4] = [("w", 8192), ("odd", 4160), ("wide", 33024), ("bias", 100)];

fn recorded(file: &str) -> Vec<u8> {
    let path = repo_root().join("tests/data/lean").join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(t: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Our AdamW with torchao's AdamW8bit/AdamW4bit hyperparameters follows torchao's recorded
/// trajectory: the same state tensors coded (and the same kept in f32), after one step nearly every
/// code equal and the rest one code apart, and after ten steps parameters within a small fraction
/// of the distance they travelled. Not bit for bit: torchao's compiled step forms `v` as a lerp
/// and divides by √bc2 apart, PyTorch's fused AdamW (which we follow) does not, and a rounding
/// difference that crosses a code boundary moves that moment by one code.
#[test]
fn quantized_adamw_tracks_torchao() {
    for (q, file) in [
        (QuantizedState::Block8, "torchao-adamw8bit.safetensors"),
        (QuantizedState::Block4, "torchao-adamw4bit.safetensors"),
    ] {
        let bytes = recorded(file);
        let rec = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut b = ParamSet::builder();
        let init: Vec<Vec<f32>> = RECORDED
            .iter()
            .enumerate()
            .map(|(t, &(_, n))| uniform(1_000_003 * (t as u32 + 1), n))
            .map(|v| v.iter().map(|x| x * 0.5).collect())
            .collect();
        for (&(name, n), v) in RECORDED.iter().zip(&init) {
            b.add(name, &[n], v).unwrap();
        }
        let rule = Adam::preset(Flavor::PyTorch).with_weight_decay(WeightDecay::Decoupled(0.01));
        let mut opt =
            Optimizer::with_options(b.build(Device::Cpu).unwrap(), rule, 1e-3, options(q)).unwrap();
        for step in 1..=10u32 {
            let mut p = opt.params_mut();
            for (t, &(name, n)) in RECORDED.iter().enumerate() {
                let scale = 2f32.powi(-(t as i32 + (step % 4) as i32));
                let seed = 7_919 * (t as u32 + 1) + 104_729 * step;
                let g: Vec<f32> = uniform(seed, n).iter().map(|x| x * scale).collect();
                p.set_grad(name, &g).unwrap();
            }
            opt.step().unwrap();
            if step != 1 && step != 10 {
                continue;
            }
            for (t, &(name, n)) in RECORDED.iter().enumerate() {
                let want = f32s(&rec.tensor(&format!("step{step}/param/{name}")).unwrap());
                let got = opt.params().read_param(name).unwrap();
                let travel = init[t]
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                let off = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    off <= 2e-3 * travel,
                    "{q:?} step {step}, {name}: parameters {off:e} from torchao's, which moved {travel:e}"
                );
                for buffer in ["exp_avg", "exp_avg_sq"] {
                    let got = opt.state(buffer, name).unwrap();
                    let Ok(codes) = rec.tensor(&format!("step{step}/codes/{buffer}/{name}")) else {
                        // Kept in f32 by torchao too (not a whole number of blocks, or small).
                        let key = format!("step{step}/state/{buffer}/{name}");
                        let want = f32s(&rec.tensor(&key).unwrap());
                        for (a, b) in got.iter().zip(&want) {
                            assert!((a - b).abs() <= 2e-6 * b.abs(), "{q:?} {key}: {a} vs {b}");
                        }
                        continue;
                    };
                    assert!(quantizes(q, n), "{name} is coded by torchao");
                    let key = format!("step{step}/scale/{buffer}/{name}");
                    let scales = f32s(&rec.tensor(&key).unwrap());
                    let map = q.map(buffer == "exp_avg_sq");
                    let table = map.values();
                    let nbytes = codes.data();
                    let code = |i: usize| match q {
                        QuantizedState::Block4 => (nbytes[i / 2] >> (4 * (1 - i % 2))) & 15,
                        _ => nbytes[i],
                    } as usize;
                    let (mut equal, mut near) = (0, 0);
                    for (i, &a) in got.iter().enumerate() {
                        let (c, s) = (code(i), scales[i / block(q)]);
                        let want = table[c] * s;
                        // The same code (the scales may differ in their last bits).
                        if (a - want).abs() <= 1e-6 * want.abs().max(a.abs()) {
                            equal += 1;
                        } else {
                            // One code apart, on a scale within a few ulps of torchao's.
                            let lo = table[c.saturating_sub(1)] * s;
                            let hi = table[(c + 1).min(table.len() - 1)] * s;
                            let slack = 1e-5 * s;
                            assert!(
                                a >= lo.min(hi) - slack && a <= lo.max(hi) + slack,
                                "{q:?} step {step}, {buffer} of {name}[{i}]: {a} vs code {c} x {s}"
                            );
                            near += 1;
                        }
                    }
                    let share = equal as f64 / n as f64;
                    eprintln!("{q:?} step {step}, {buffer} of {name}: {equal} of {n} the same code, {near} one code apart");
                    assert!(
                        share >= if step == 1 { 1.0 } else { 0.999 },
                        "{q:?} step {step}, {buffer} of {name}: only {equal} of {n} equal"
                    );
                }
            }
        }
    }
}

/// Whether torchao (and we) code a tensor of `n` elements.
fn quantizes(q: QuantizedState, n: usize) -> bool {
    n >= 4096 && n % block(q) == 0
}

/// Mean |a − b| over every tensor of two optimizers, and the mean distance `b` travelled from
/// `start`.
fn mean_gap(a: &Optimizer, b: &Optimizer, start: &[Tensor]) -> (f64, f64) {
    let (mut gap, mut travel, mut n) = (0.0, 0.0, 0.0);
    for t in start {
        let pa = a.params().read_param(&t.name).unwrap();
        let pb = b.params().read_param(&t.name).unwrap();
        for ((x, y), z) in pa.iter().zip(&pb).zip(&t.values) {
            gap += (x - y).abs() as f64;
            travel += (y - z).abs() as f64;
            n += 1.0;
        }
    }
    (gap / n, travel / n)
}

/// Every rule whose state can be quantized runs with 8-bit and 4-bit state and stays close to
/// its own f32 run (mean parameter gap a small share of the mean distance travelled); a rule
/// whose state starts as the parameters is refused with a typed error.
#[test]
fn every_rule_runs_with_quantized_state() {
    let ts = tensors(21);
    let rules: Vec<(Rule, f64)> = vec![
        (adamw(false).into(), 1e-3),
        (
            Sgd {
                momentum: 0.9,
                ..Sgd::preset(Flavor::PyTorch)
            }
            .into(),
            1e-2,
        ),
        (
            RmsProp {
                momentum: 0.5,
                centered: true,
                ..RmsProp::preset(Flavor::PyTorch)
            }
            .into(),
            1e-3,
        ),
        (Adagrad::preset(Flavor::PyTorch).into(), 1e-2),
        (Adamax::preset(Flavor::PyTorch).into(), 1e-3),
        (Lion::preset(Flavor::PyTorch).into(), 1e-4),
        (Radam::preset(Flavor::PyTorch).into(), 1e-3),
        (Adadelta::preset(Flavor::PyTorch).into(), 1.0),
        (Nadam::preset(Flavor::PyTorch).into(), 1e-3),
        (Adopt::preset(Flavor::PyTorch).into(), 1e-3),
        (Ademamix::preset(Flavor::PyTorch).into(), 1e-3),
    ];
    for (rule, lr) in rules {
        for (q, share) in [
            (QuantizedState::Block8, 0.02),
            (QuantizedState::Block4, 0.2),
        ] {
            let run = |o: OptimizerOptions| {
                let mut opt = Optimizer::with_options(build(&ts), rule.clone(), lr, o).unwrap();
                let mut rng = StdRng::seed_from_u64(5);
                for _ in 0..8 {
                    let grads = random_grads(&mut rng, &ts, 0.1);
                    set_grads(&mut opt, &ts, &grads);
                    opt.step().unwrap();
                }
                opt
            };
            let (quantized, dense) = (run(options(q)), run(OptimizerOptions::default()));
            let (gap, travel) = mean_gap(&quantized, &dense, &ts);
            let name = rule.state_names().join("+");
            eprintln!("{name} {q:?}: mean gap {gap:e}, travel {travel:e}");
            assert!(
                travel > 0.0 && gap <= share * travel,
                "{name} {q:?}: gap {gap:e} of {travel:e}"
            );
        }
    }
    let err = Optimizer::with_options(
        build(&ts),
        ScheduleFree::adamw(Flavor::PyTorch),
        1e-3,
        options(QuantizedState::Block8),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidHyperparameter(ref m) if m.contains("'z'")),
        "{err}"
    );
    let bf16 = OptimizerOptions {
        state_dtype: DType::BF16,
        ..options(QuantizedState::Block4)
    };
    let err = Optimizer::with_options(build(&ts), adamw(false), 1e-3, bf16).unwrap_err();
    assert!(matches!(err, Error::InvalidHyperparameter(_)), "{err}");
}

fn stepped(q: QuantizedState, steps: usize, seed: u64) -> (Optimizer, Vec<Tensor>, StdRng) {
    let ts = tensors(seed);
    let mut opt = Optimizer::with_options(build(&ts), adamw(false), 1e-3, options(q)).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..steps {
        let grads = random_grads(&mut rng, &ts, 0.1);
        set_grads(&mut opt, &ts, &grads);
        opt.step().unwrap();
    }
    (opt, ts, rng)
}

/// Everything an optimizer's observer sees: parameters and decoded state, as bits.
fn snapshot(opt: &Optimizer, ts: &[Tensor]) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for t in ts {
        out.push(bits(&opt.params().read_param(&t.name).unwrap()));
        for name in opt.state_names() {
            out.push(bits(&opt.state(name, &t.name).unwrap()));
        }
    }
    out
}

/// A checkpoint holds the quantized state as stored (codes and scales): a run resumed from it
/// steps bit for bit like the run that saved it; a dense optimizer, or one of the other width,
/// refuses it; a flipped code is caught by the checksum.
#[test]
fn checkpoints_hold_quantized_state_as_stored() {
    for q in [QuantizedState::Block8, QuantizedState::Block4] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lean.safetensors");
        let (mut a, ts, mut rng) = stepped(q, 3, 31);
        a.save_checkpoint(&path).unwrap();
        let (mut b, _, _) = stepped(q, 1, 31);
        b.load_checkpoint(&path).unwrap();
        assert_eq!(snapshot(&a, &ts), snapshot(&b, &ts), "{q:?}: as loaded");
        for _ in 0..3 {
            let grads = random_grads(&mut rng, &ts, 0.1);
            set_grads(&mut a, &ts, &grads);
            set_grads(&mut b, &ts, &grads);
            a.step().unwrap();
            b.step().unwrap();
        }
        assert_eq!(snapshot(&a, &ts), snapshot(&b, &ts), "{q:?}: resumed");
        let other = match q {
            QuantizedState::Block8 => QuantizedState::Block4,
            _ => QuantizedState::Block8,
        };
        for o in [QuantizedState::None, other] {
            let (mut c, _, _) = stepped(o, 0, 31);
            let before = snapshot(&c, &ts);
            let err = c.load_checkpoint(&path).unwrap_err();
            assert!(matches!(err, Error::BadCheckpoint { .. }), "{err}");
            assert_eq!(snapshot(&c, &ts), before, "a refused load changes nothing");
        }
        // Flip one byte of the file's data (the last tensor's) and the load is refused.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let err = b.load_checkpoint(&path).unwrap_err();
        assert!(matches!(err, Error::BadCheckpoint { .. }), "{err}");
    }
}

/// A step with a non-finite gradient is skipped with quantized state untouched; a power-of-two
/// loss scale divides out exactly, as without quantization.
#[test]
fn skip_and_loss_scaling_leave_quantized_state_exact() {
    let (mut opt, ts, mut rng) = stepped(QuantizedState::Block8, 2, 41);
    let before = snapshot(&opt, &ts);
    let mut grads = random_grads(&mut rng, &ts, 0.1);
    grads[2][33000] = f32::NAN;
    set_grads(&mut opt, &ts, &grads);
    opt.step().unwrap();
    assert!(opt.report().unwrap().skipped);
    assert_eq!(
        snapshot(&opt, &ts),
        before,
        "a skipped step changes nothing"
    );

    let scaled = OptimizerOptions {
        loss_scale: LossScale::Static(1024.0),
        ..options(QuantizedState::Block4)
    };
    let mut a = Optimizer::with_options(build(&ts), adamw(false), 1e-3, scaled).unwrap();
    let mut b = Optimizer::with_options(
        build(&ts),
        adamw(false),
        1e-3,
        options(QuantizedState::Block4),
    )
    .unwrap();
    for _ in 0..3 {
        let grads = random_grads(&mut rng, &ts, 0.1);
        let times: Vec<Vec<f32>> = grads
            .iter()
            .map(|g| g.iter().map(|x| x * 1024.0).collect())
            .collect();
        set_grads(&mut a, &ts, &times);
        set_grads(&mut b, &ts, &grads);
        a.step().unwrap();
        b.step().unwrap();
    }
    assert_eq!(snapshot(&a, &ts), snapshot(&b, &ts));
}

/// Replicas with quantized state stay bit-identical on CPU threads; a replica with another state
/// format is refused.
#[test]
fn quantized_replicas_stay_identical() {
    let ts = tensors(51);
    let new = |q| Optimizer::with_options(build(&ts), adamw(false), 1e-3, options(q)).unwrap();
    let replicas = vec![new(QuantizedState::Block8), new(QuantizedState::Block8)];
    let mut dp = DataParallel::cpu(replicas, Default::default()).unwrap();
    for step in 0..3 {
        dp.step(|rank, grads| {
            for t in &ts {
                let g: Vec<f32> = (0..t.values.len())
                    .map(|i| ((i * 7 + 13 * rank + 5 * step) as f32).sin() * 0.1)
                    .collect();
                grads.set(&t.name, &g)?;
            }
            Ok(())
        })
        .unwrap();
    }
    let snaps: Vec<_> = dp.replicas().map(|o| snapshot(o, &ts)).collect();
    assert_eq!(snaps[0], snaps[1]);
    let fresh = snapshot(&new(QuantizedState::Block8), &ts);
    assert_ne!(snaps[0], fresh, "the replicas stepped");
    let mixed = vec![new(QuantizedState::Block8), new(QuantizedState::Block4)];
    let err = DataParallel::cpu(mixed, Default::default()).unwrap_err();
    assert!(matches!(err, Error::ReplicasDiffer { .. }), "{err}");
}

/// The CUDA engine steps quantized state as the CPU engine does, bit for bit (parameters, model
/// copy, every decoded moment): 8-bit and 4-bit, AMSGrad's third buffer, bf16 gradients and model
/// copy, clipping, eager and replayed from a captured graph; a checkpoint saved on the GPU resumes
/// on the CPU bit for bit, and one saved on the CPU on the GPU.
#[test]
fn the_gpu_steps_quantized_state_as_the_cpu_does() {
    if !gpu_or_skip("the_gpu_steps_quantized_state_as_the_cpu_does") {
        return;
    }
    use QuantizedState::{Block4, Block8};
    let configs = [
        (Block8, false, DType::F32, None, false, false),
        (Block4, true, DType::BF16, Some(DType::BF16), true, false),
        (Block8, true, DType::BF16, Some(DType::BF16), true, true),
        (Block4, false, DType::F32, None, false, true),
    ];
    for (q, amsgrad, grads, model, clip, graph) in configs {
        let what = format!("{q:?} amsgrad={amsgrad} grads={grads} clip={clip} graph={graph}");
        let ts = tensors(71);
        let o = OptimizerOptions {
            clip: clip.then(|| GlobalNormClip::new(0.5, ClipFormula::PyTorch)),
            ..options(q)
        };
        let on = |device| {
            let params = build_with(device, &ts, grads, model);
            Optimizer::with_options(params, adamw(amsgrad), 1e-3, o).unwrap()
        };
        let (mut cpu, mut gpu) = (on(Device::Cpu), on(Device::Cuda(0)));
        if graph {
            gpu.capture_graph().unwrap();
        }
        let mut rng = StdRng::seed_from_u64(72);
        for _ in 0..4 {
            let g = random_grads(&mut rng, &ts, 0.3);
            set_grads(&mut cpu, &ts, &g);
            set_grads(&mut gpu, &ts, &g);
            cpu.step().unwrap();
            gpu.step().unwrap();
        }
        assert_eq!(snapshot(&cpu, &ts), snapshot(&gpu, &ts), "{what}");
        if model.is_some() {
            for t in &ts {
                let a = cpu.params().read_model_param(&t.name).unwrap();
                let b = gpu.params().read_model_param(&t.name).unwrap();
                assert_eq!(bits(&a), bits(&b), "{what}: model copy of {}", t.name);
            }
        }
        assert_eq!(
            cpu.state_bytes().unwrap(),
            gpu.state_bytes().unwrap(),
            "{what}"
        );
        // Checkpoints cross between the engines.
        let dir = tempfile::tempdir().unwrap();
        let (from_gpu, from_cpu) = (dir.path().join("gpu"), dir.path().join("cpu"));
        gpu.save_checkpoint(&from_gpu).unwrap();
        cpu.save_checkpoint(&from_cpu).unwrap();
        let (mut cpu2, mut gpu2) = (on(Device::Cpu), on(Device::Cuda(0)));
        cpu2.load_checkpoint(&from_gpu).unwrap();
        gpu2.load_checkpoint(&from_cpu).unwrap();
        let g = random_grads(&mut rng, &ts, 0.3);
        for opt in [&mut cpu, &mut cpu2, &mut gpu2] {
            set_grads(opt, &ts, &g);
            opt.step().unwrap();
        }
        assert_eq!(
            snapshot(&cpu, &ts),
            snapshot(&cpu2, &ts),
            "{what}: GPU checkpoint on the CPU"
        );
        assert_eq!(
            snapshot(&cpu, &ts),
            snapshot(&gpu2, &ts),
            "{what}: CPU checkpoint on the GPU"
        );
    }
}
