//! Helpers for tests of data-parallel groups (threads, sharded, MPI processes): one model of
//! awkward tensor sizes, several sharding windows' worth, its optimizer in each configuration,
//! each replica's gradients, and everything an optimizer holds as bits.

use fusedopt::parallel::{DataParallelOptions, Gradients};
use fusedopt::{
    Adam, DType, Device, Flavor, GlobalNormClip, GroupOptions, Masters, Optimizer,
    OptimizerOptions, ParamSet, QuantizedState, Sgd,
};

/// Tensors of awkward sizes, several windows' worth, cut mid-tensor by every rank count here;
/// one large enough to be quantized.
pub const TENSORS: &[(&str, &[usize], bool)] = &[
    ("embed", &[300, 517], false),
    ("embed.bias", &[517], true),
    ("fc1", &[64, 4099], false),
    ("fc1.bias", &[7], true),
    ("fc2", &[1000, 70], false),
    ("scalar", &[], true),
];

/// A small deterministic stream (the values only need to be awkward and reproducible).
pub fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

#[derive(Clone, Copy)]
pub struct Config {
    pub grad_dtype: DType,
    pub model_copy: Option<DType>,
    pub masters: Masters,
    pub quantized: QuantizedState,
    pub sgd: bool,
}

pub const DENSE: Config = Config {
    grad_dtype: DType::F32,
    model_copy: None,
    masters: Masters::F32,
    quantized: QuantizedState::None,
    sgd: false,
};

/// The model's parameter set in configuration `c`.
pub fn param_set(c: Config) -> ParamSet {
    param_set_on(c, Device::Cpu)
}

/// [`param_set`] on `device`.
pub fn param_set_on(c: Config, device: Device) -> ParamSet {
    let mut b = ParamSet::builder();
    b.grad_dtype(c.grad_dtype).masters(c.masters);
    if let Some(d) = c.model_copy {
        b.model_copy(d).unwrap();
    }
    b.group("no_decay", GroupOptions::no_decay()).unwrap();
    for (i, (name, shape, bias)) in TENSORS.iter().enumerate() {
        let n = shape.iter().product();
        let v = values(100 + i as u64, n, 0.2);
        match bias {
            true => b.add_to("no_decay", name, shape, &v).unwrap(),
            false => b.add(name, shape, &v).unwrap(),
        };
    }
    b.build(device).unwrap()
}

pub fn optimizer(c: Config) -> Optimizer {
    optimizer_on(c, Device::Cpu)
}

/// [`optimizer`] on `device`.
pub fn optimizer_on(c: Config, device: Device) -> Optimizer {
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        quantized_state: c.quantized,
        ..Default::default()
    };
    let set = param_set_on(c, device);
    match c.sgd {
        true => Optimizer::with_options(
            set,
            Sgd {
                momentum: 0.9,
                nesterov: true,
                ..Sgd::preset(Flavor::PyTorch)
            },
            0.05,
            options,
        ),
        false => Optimizer::with_options(set, Adam::adamw(Flavor::PyTorch), 3e-3, options),
    }
    .unwrap()
}

/// Replica `rank`'s gradient of tensor `i` (of [`TENSORS`]) at `step`.
pub fn gradient(rank: usize, step: usize, i: usize) -> Vec<f32> {
    let n = TENSORS[i].1.iter().product();
    values((step * 31 + rank * 7 + i) as u64, n, 0.5)
}

/// Replica `rank`'s backward pass at `step`, last tensor first; a NaN at step `nan_at`, on
/// rank 0.
pub fn backward(
    rank: usize,
    step: usize,
    nan_at: Option<usize>,
    g: &Gradients<'_>,
) -> fusedopt::Result<()> {
    for (i, (name, ..)) in TENSORS.iter().enumerate().rev() {
        let mut v = gradient(rank, step, i);
        if nan_at == Some(step) && rank == 0 && i == 2 {
            v[1234] = f32::NAN;
        }
        g.set(name, &v)?;
        g.mark_ready(name)?;
    }
    Ok(())
}

pub fn options() -> DataParallelOptions {
    DataParallelOptions {
        bucket_bytes: 1 << 20,
        first_bucket_bytes: 1 << 18,
        ..Default::default()
    }
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Everything an optimizer holds, as bits: masters, every state buffer of every tensor, step
/// count.
pub fn everything(opt: &Optimizer) -> Vec<(String, Vec<u32>)> {
    let mut out = vec![("step".into(), vec![opt.step_count().unwrap() as u32])];
    for (name, ..) in TENSORS {
        out.push((
            format!("param {name}"),
            bits(&opt.params().read_param(name).unwrap()),
        ));
        for b in opt.state_names() {
            out.push((format!("{b} {name}"), bits(&opt.state(b, name).unwrap())));
        }
    }
    out
}

pub fn assert_same(a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((na, va), (_, vb)) in a.iter().zip(b) {
        assert!(va == vb, "{what}: {na} differs");
    }
}
