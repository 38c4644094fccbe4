//! fp32 masters kept in 4 bytes (bf16 weights plus int16 remainders) and pure-bf16 weights with
//! stochastic rounding (`ParamSetBuilder::masters`), inside the fused step: on the CPU engine bit
//! for bit against a scalar f32 oracle of PyTorch's AdamW and SGD (the remainder scheme and the
//! rounding written out with the building blocks tests/lean.rs checks against their references),
//! stochastic rounding keeping the updates that nearest rounding loses, the options around the
//! step (quantized state, checkpoints across storages, non-finite skip, data parallelism, typed
//! refusals), and the CUDA engine bit for bit like the CPU engine.

mod common;

use common::*;
use fusedopt::lean::remainder::split_master;
use fusedopt::lean::stochastic::{draw, round_bf16};
use fusedopt::parallel::DataParallel;
use fusedopt::*;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Vectorised bodies, scalar tails, a tensor crossing CPU chunks (32768 elements), a
/// quantizable one, and one too small for anything but the tail, in two groups.
const SIZES: [(&str, usize, &str); 5] = [
    ("w", 8192, "default"),
    ("wide", 33027, "default"),
    ("odd", 1001, "nodecay"),
    ("bias", 10, "nodecay"),
    ("tiny", 3, "default"),
];

const SEED: u64 = 0x5EED;
const WD: f64 = 0.01;

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

fn build_lean(device: Device, ts: &[Tensor], masters: Masters, grads: DType) -> ParamSet {
    let mut b = builder(ts);
    b.grad_dtype(grads).masters(masters);
    b.build(device).unwrap()
}

/// Every tensor's fp32 masters, as bits.
fn masters_bits(opt: &Optimizer, ts: &[Tensor]) -> Vec<Vec<u32>> {
    ts.iter()
        .map(|t| bits(&opt.params().read_param(&t.name).unwrap()))
        .collect()
}

fn adamw() -> Adam {
    Adam::preset(Flavor::PyTorch).with_weight_decay(WeightDecay::Decoupled(WD))
}

fn sgd_momentum() -> Sgd {
    Sgd {
        momentum: 0.9,
        ..Sgd::preset(Flavor::PyTorch)
    }
}

fn set_grads(opt: &mut Optimizer, ts: &[Tensor], grads: &[Vec<f32>]) {
    let mut p = opt.params_mut();
    for (t, g) in ts.iter().zip(grads) {
        p.set_grad(&t.name, g).unwrap();
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// How the oracle stores a weight after each update.
#[derive(Clone, Copy)]
enum Storage {
    /// The exact f32 master (the remainder scheme keeps it).
    Exact,
    /// bf16, rounded by element `index`'s draw at the step.
    Stochastic,
}

/// PyTorch's AdamW (`_single_tensor_adamw`) or SGD with momentum, in f32, per element, in the
/// order PyTorch evaluates it; parameters stored as `storage` says.
struct Oracle {
    adam: bool,
    storage: Storage,
    params: Vec<Vec<f32>>,
    offsets: Vec<u64>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    lr_scale: Vec<f64>,
    decay: Vec<f64>,
    step: i32,
}

impl Oracle {
    fn new(adam: bool, storage: Storage, ts: &[Tensor], layout: &Layout) -> Self {
        let nodecay = |t: &Tensor| t.group == "nodecay";
        let start = |v: f32| match storage {
            Storage::Exact => v,
            Storage::Stochastic => bf16::from_f32(v).to_f32(),
        };
        Oracle {
            adam,
            storage,
            params: ts
                .iter()
                .map(|t| t.values.iter().map(|&v| start(v)).collect())
                .collect(),
            offsets: ts
                .iter()
                .map(|t| layout.tensor(&t.name).unwrap().offset as u64)
                .collect(),
            m: ts.iter().map(|t| vec![0.0; t.values.len()]).collect(),
            v: ts.iter().map(|t| vec![0.0; t.values.len()]).collect(),
            lr_scale: ts
                .iter()
                .map(|t| if nodecay(t) { NODECAY_LR_SCALE } else { 1.0 })
                .collect(),
            decay: ts
                .iter()
                .map(|t| if nodecay(t) { 0.0 } else { WD })
                .collect(),
            step: 0,
        }
    }

    fn step(&mut self, grads: &[Vec<f32>], lr: f64) {
        self.step += 1;
        let step = self.step;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f32);
        for (i, g) in grads.iter().enumerate() {
            let lr = lr * self.lr_scale[i];
            let keep = (1.0 - lr * self.decay[i]) as f32;
            let step_size = (lr / (1.0 - b1.powi(step))) as f32;
            let v_scale = (1.0 / (1.0 - b2.powi(step))) as f32;
            for (k, p) in self.params[i].iter_mut().enumerate() {
                let g = g[k];
                let (m, v) = (&mut self.m[i][k], &mut self.v[i][k]);
                let next = if self.adam {
                    let p0 = if keep != 1.0 { *p * keep } else { *p };
                    *m += (1.0 - b1) as f32 * (g - *m);
                    *v = b2 as f32 * *v + (1.0 - b2) as f32 * g * g;
                    let denom = (*v * v_scale + 0.0).sqrt() + eps;
                    p0 - step_size * *m / denom
                } else {
                    // torch.optim.SGD: buf = g on the first step, then momentum·buf + g.
                    *m = if step == 1 { g } else { 0.9 * *m + g };
                    *p - lr as f32 * *m
                };
                *p = match self.storage {
                    Storage::Exact => next,
                    Storage::Stochastic => {
                        let index = self.offsets[i] + k as u64;
                        round_bf16(next, draw(SEED, step as u64, index)).to_f32()
                    }
                };
            }
        }
    }
}

/// Both storages follow the oracle bit for bit over several steps: the remainder scheme's joined
/// masters equal the exact f32 masters and its weights are their bf16 halves; the stochastic
/// weights equal the oracle's draw by draw. AdamW and SGD with momentum, f32 and bf16 gradients.
#[test]
fn lean_masters_follow_the_scalar_oracle_bit_for_bit() {
    for (masters, storage) in [
        (Masters::Bf16Remainders, Storage::Exact),
        (Masters::Bf16Stochastic { seed: SEED }, Storage::Stochastic),
    ] {
        for (adam, grad_dtype) in [
            (true, DType::F32),
            (false, DType::BF16),
            (true, DType::BF16),
        ] {
            let what = format!("{masters:?} adam={adam} grads={grad_dtype}");
            let ts = tensors(3);
            let params = build_lean(Device::Cpu, &ts, masters, grad_dtype);
            assert_eq!(params.model_dtype(), Some(DType::BF16), "{what}");
            let lr = 3e-3;
            let rule: Rule = if adam {
                adamw().into()
            } else {
                sgd_momentum().into()
            };
            let mut oracle = Oracle::new(adam, storage, &ts, params.layout());
            let mut opt = Optimizer::new(params, rule, lr).unwrap();
            let mut rng = StdRng::seed_from_u64(4);
            for step in 1..=5 {
                let mut grads = random_grads(&mut rng, &ts, [1.0, 1e-3, 30.0][step % 3]);
                if grad_dtype == DType::BF16 {
                    for g in grads.iter_mut().flatten() {
                        *g = bf16::from_f32(*g).to_f32();
                    }
                }
                set_grads(&mut opt, &ts, &grads);
                opt.step().unwrap();
                oracle.step(&grads, lr);
                for (i, t) in ts.iter().enumerate() {
                    let got = opt.params().read_param(&t.name).unwrap();
                    let want = &oracle.params[i];
                    assert_eq!(bits(&got), bits(want), "{what}: step {step}, {}", t.name);
                    let weights = opt.params().model_param::<bf16>(&t.name).unwrap();
                    let split: Vec<bf16> = want.iter().map(|&p| split_master(p).0).collect();
                    assert_eq!(weights, &split[..], "{what}: weights of {}", t.name);
                }
            }
        }
    }
}

/// Quantized moments and 4-byte masters together: the masters equal those of fp32 masters
/// with the same quantized state (itself checked against its oracle in tests/lean_step.rs).
#[test]
fn remainder_masters_with_quantized_state_equal_fp32_masters() {
    for q in [QuantizedState::Block8, QuantizedState::Block4] {
        let ts = tensors(5);
        let o = OptimizerOptions {
            quantized_state: q,
            clip: Some(GlobalNormClip::new(0.5, ClipFormula::PyTorch)),
            ..Default::default()
        };
        let lean = build_lean(Device::Cpu, &ts, Masters::Bf16Remainders, DType::BF16);
        let full = build_with(Device::Cpu, &ts, DType::BF16, None);
        let mut a = Optimizer::with_options(lean, adamw(), 1e-3, o).unwrap();
        let mut b = Optimizer::with_options(full, adamw(), 1e-3, o).unwrap();
        let mut rng = StdRng::seed_from_u64(6);
        for _ in 0..4 {
            let g = random_grads(&mut rng, &ts, 0.3);
            set_grads(&mut a, &ts, &g);
            set_grads(&mut b, &ts, &g);
            a.step().unwrap();
            b.step().unwrap();
        }
        for t in &ts {
            let (x, y) = (
                a.params().read_param(&t.name).unwrap(),
                b.params().read_param(&t.name).unwrap(),
            );
            assert_eq!(bits(&x), bits(&y), "{q:?}: {}", t.name);
            for name in a.state_names() {
                let (x, y) = (
                    a.state(name, &t.name).unwrap(),
                    b.state(name, &t.name).unwrap(),
                );
                assert_eq!(bits(&x), bits(&y), "{q:?}: {name} of {}", t.name);
            }
        }
    }
}

/// Updates far below half a bf16 ulp: stochastic rounding keeps them on average (the mean weight
/// follows the exact trajectory within 5 standard errors), where rounding to nearest would leave
/// every weight where it started.
#[test]
fn stochastic_rounding_keeps_updates_below_half_an_ulp() {
    let n = 8192;
    let ts = vec![Tensor {
        name: "w".into(),
        group: "default",
        values: vec![0.75; n],
    }];
    let params = build_lean(
        Device::Cpu,
        &ts,
        Masters::Bf16Stochastic { seed: 9 },
        DType::F32,
    );
    let mut opt = Optimizer::new(params, Sgd::preset(Flavor::PyTorch), 1e-4).unwrap();
    opt.params_mut().set_grad("w", &vec![1.0; n]).unwrap();
    let steps = 300;
    for _ in 0..steps {
        opt.step().unwrap();
    }
    let w = opt.params().read_param("w").unwrap();
    let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let exact = 0.75 - 1e-4 * steps as f64;
    // Each weight's rounding error is at most one ulp (2⁻⁸ here) per step, unbiased: its spread
    // after `steps` steps is below 2⁻⁸·√steps, the mean's below that over √n.
    let se = 2f64.powi(-8) * (steps as f64).sqrt() / (n as f64).sqrt();
    assert!(
        (mean - exact).abs() < 5.0 * se,
        "mean {mean}, exact {exact}, se {se}"
    );
    assert_eq!(
        bf16::from_f32(0.75 - 1e-4).to_f32(),
        0.75,
        "nearest loses the step"
    );
    // Element by element the draws differ: the weights spread.
    assert!(w.iter().any(|&x| x != w[0]));
}

/// The masters round trip through checkpoints whatever the storage: a checkpoint of 4-byte
/// masters resumes bit for bit, loads into fp32 masters exactly, and an fp32 checkpoint loads
/// into 4-byte masters exactly; a stochastic run resumes draw for draw.
#[test]
fn checkpoints_carry_lean_masters() {
    let ts = tensors(21);
    let dir = tempfile::tempdir().unwrap();
    let grads = |seed| random_grads(&mut StdRng::seed_from_u64(seed), &ts, 0.2);
    let stochastic = Masters::Bf16Stochastic { seed: 3 };
    for masters in [Masters::Bf16Remainders, stochastic] {
        let new = |m| Optimizer::new(build_lean(Device::Cpu, &ts, m, DType::F32), adamw(), 1e-3);
        let mut a = new(masters).unwrap();
        for s in 0..3 {
            set_grads(&mut a, &ts, &grads(s));
            a.step().unwrap();
        }
        let path = dir.path().join(format!("{masters:?}"));
        a.save_checkpoint(&path).unwrap();
        let mut b = new(masters).unwrap();
        b.load_checkpoint(&path).unwrap();
        let mut f = new(Masters::F32).unwrap();
        f.load_checkpoint(&path).unwrap();
        assert_eq!(
            masters_bits(&f, &ts),
            masters_bits(&a, &ts),
            "{masters:?} into fp32"
        );
        for opt in [&mut a, &mut b] {
            set_grads(opt, &ts, &grads(9));
            opt.step().unwrap();
        }
        assert_eq!(
            masters_bits(&a, &ts),
            masters_bits(&b, &ts),
            "{masters:?}: resumed"
        );
        // fp32 masters into 4-byte ones: exact.
        if masters == Masters::Bf16Remainders {
            let path = dir.path().join("f32");
            f.save_checkpoint(&path).unwrap();
            let mut r = new(Masters::Bf16Remainders).unwrap();
            r.load_checkpoint(&path).unwrap();
            assert_eq!(
                masters_bits(&f, &ts),
                masters_bits(&r, &ts),
                "fp32 checkpoint into remainders"
            );
        }
    }
}

/// A skipped step (non-finite gradients) leaves weights and remainders as they were; writing
/// parameters splits them exactly; fp32 views are refused with a typed error, as is a model copy
/// of another dtype beside bf16 weights.
#[test]
fn lean_masters_skip_write_and_refuse() {
    let ts = tensors(31);
    let params = build_lean(Device::Cpu, &ts, Masters::Bf16Remainders, DType::F32);
    let mut opt = Optimizer::new(params, adamw(), 1e-3).unwrap();
    let before = masters_bits(&opt, &ts);
    let mut g = random_grads(&mut StdRng::seed_from_u64(1), &ts, 0.1);
    g[1][7] = f32::NAN;
    set_grads(&mut opt, &ts, &g);
    opt.step().unwrap();
    assert!(opt.report().unwrap().skipped);
    assert_eq!(masters_bits(&opt, &ts), before);
    // Every kind of f32 value, written and read back exactly.
    let odd = [1.0f32 + f32::EPSILON, -3.3e-39, f32::MAX, -0.0, 1e-45, 0.1];
    let values: Vec<f32> = (0..10).map(|i| odd[i % odd.len()]).collect();
    opt.params_mut().write_param("bias", &values).unwrap();
    assert_eq!(
        bits(&opt.params().read_param("bias").unwrap()),
        bits(&values)
    );
    assert!(matches!(
        opt.params().param("w"),
        Err(Error::MastersNotF32(Masters::Bf16Remainders))
    ));
    assert!(matches!(
        opt.params_mut().param_mut("w"),
        Err(Error::MastersNotF32(_))
    ));
    assert!(matches!(
        opt.params().masters_arena(),
        Err(Error::MastersNotF32(_))
    ));
    let mut b = ParamSet::builder();
    b.masters(Masters::Bf16Remainders)
        .model_copy(DType::F16)
        .unwrap()
        .add("w", &[2], &[1.0, 2.0])
        .unwrap();
    assert!(matches!(
        b.build(Device::Cpu),
        Err(Error::InvalidHyperparameter(_))
    ));
    // Memory: 4 bytes per parameter for exact masters, 2 for bf16 alone, 4 for fp32 masters
    // and 6 with a bf16 copy beside them.
    let per_param = |p: ParamSet| p.weight_bytes() as f64 / p.layout().arena_len() as f64;
    let lean = |m| per_param(build_lean(Device::Cpu, &ts, m, DType::F32));
    assert_eq!(lean(Masters::Bf16Remainders), 4.0);
    assert_eq!(lean(Masters::Bf16Stochastic { seed: 0 }), 2.0);
    assert_eq!(lean(Masters::F32), 4.0);
    let with_copy = build_with(Device::Cpu, &ts, DType::F32, Some(DType::BF16));
    assert_eq!(per_param(with_copy), 6.0);
}

/// Data-parallel replicas keep identical weights with either storage (the draws depend on the
/// seed, step and element only); replicas whose storages differ are refused.
#[test]
fn lean_replicas_stay_identical() {
    let ts = tensors(41);
    for masters in [Masters::Bf16Remainders, Masters::Bf16Stochastic { seed: 8 }] {
        let new =
            |m| Optimizer::new(build_lean(Device::Cpu, &ts, m, DType::F32), adamw(), 1e-3).unwrap();
        let mut dp =
            DataParallel::cpu(vec![new(masters), new(masters)], Default::default()).unwrap();
        for step in 0..3 {
            dp.step(|rank, grads| {
                // The forward pass reads the masters, converted: no fp32 slice to lend.
                assert_eq!(grads.read_param("bias")?.len(), 10);
                assert!(matches!(grads.param("bias"), Err(Error::MastersNotF32(_))));
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
        let weights: Vec<_> = dp.replicas().map(|o| masters_bits(o, &ts)).collect();
        assert_eq!(weights[0], weights[1], "{masters:?}");
        let mixed = vec![new(masters), new(Masters::F32)];
        let err = DataParallel::cpu(mixed, Default::default()).unwrap_err();
        assert!(matches!(err, Error::ReplicasDiffer { .. }), "{err}");
    }
}

/// The CUDA engine steps both storages as the CPU engine does, bit for bit (joined masters and
/// bf16 weights): dense and quantized state, bf16 gradients, clipping, eager and replayed from a
/// captured graph; checkpoints cross between the engines.
#[test]
fn the_gpu_steps_lean_masters_as_the_cpu_does() {
    if !gpu_or_skip("the_gpu_steps_lean_masters_as_the_cpu_does") {
        return;
    }
    let stochastic = Masters::Bf16Stochastic { seed: 77 };
    let configs = [
        (
            Masters::Bf16Remainders,
            QuantizedState::None,
            DType::F32,
            false,
        ),
        (stochastic, QuantizedState::None, DType::BF16, true),
        (
            Masters::Bf16Remainders,
            QuantizedState::Block8,
            DType::BF16,
            true,
        ),
        (stochastic, QuantizedState::Block4, DType::F32, false),
    ];
    for (masters, q, grads, graph) in configs {
        let what = format!("{masters:?} {q:?} grads={grads} graph={graph}");
        let ts = tensors(61);
        let o = OptimizerOptions {
            quantized_state: q,
            clip: Some(GlobalNormClip::new(0.5, ClipFormula::PyTorch)),
            ..Default::default()
        };
        let on = |device| {
            let params = build_lean(device, &ts, masters, grads);
            Optimizer::with_options(params, adamw(), 1e-3, o).unwrap()
        };
        let (mut cpu, mut gpu) = (on(Device::Cpu), on(Device::Cuda(0)));
        if graph {
            gpu.capture_graph().unwrap();
        }
        let read = |opt: &Optimizer| -> Vec<(Vec<u32>, Vec<u32>)> {
            ts.iter()
                .map(|t| {
                    let p = opt.params();
                    (
                        bits(&p.read_param(&t.name).unwrap()),
                        bits(&p.read_model_param(&t.name).unwrap()),
                    )
                })
                .collect()
        };
        let mut rng = StdRng::seed_from_u64(62);
        for _ in 0..4 {
            let g = random_grads(&mut rng, &ts, 0.3);
            set_grads(&mut cpu, &ts, &g);
            set_grads(&mut gpu, &ts, &g);
            cpu.step().unwrap();
            gpu.step().unwrap();
        }
        assert_eq!(read(&cpu), read(&gpu), "{what}");
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
        assert_eq!(read(&cpu), read(&cpu2), "{what}: GPU checkpoint on the CPU");
        assert_eq!(read(&cpu), read(&gpu2), "{what}: CPU checkpoint on the GPU");
    }
}
