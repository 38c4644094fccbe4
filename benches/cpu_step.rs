//! One CPU step of SGD-momentum, Adam (built in, and written as a custom rule) and RMSProp over 10M
//! fp32 parameters, laid out as 100 and as
//! 5,000 tensors, in bytes/s by the roofline count (Adam: read p, g, m, v; write p, m, v = 28 B per
//! parameter), beside two same-run rooflines in bytes read + written per second: a parallel copy
//! into a second buffer (which also pays an uncounted read-for-ownership of the destination) and an
//! in-place read-modify-write pass (the access pattern of the step itself).
//!
//! cargo bench --bench cpu_step

#[path = "../examples/shared/custom_adam.rs"]
mod custom_adam;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use custom_adam::custom_adam;
use fusedopt::{Adam, Device, Flavor, Optimizer, ParamSet, RmsProp, Rule, Sgd};
use rayon::prelude::*;

const PARAMS: usize = 10_000_000;

fn param_set(tensors: usize) -> ParamSet {
    let per = PARAMS / tensors;
    let mut b = ParamSet::builder();
    let values: Vec<f32> = (0..per).map(|i| (i % 97) as f32 * 1e-3).collect();
    for t in 0..tensors {
        b.add(&format!("p{t}"), &[per], &values).unwrap();
    }
    let mut set = b.build(Device::Cpu).unwrap();
    let grads = set
        .grads_arena_mut()
        .unwrap()
        .typed_mut::<f32>("gradients")
        .unwrap();
    for (i, g) in grads.iter_mut().enumerate() {
        *g = ((i % 89) as f32 - 44.0) * 1e-3;
    }
    set
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_step");
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(4));

    // Same-run copy: 4 B/param read + 4 B/param written, over 28 B/param worth of data.
    let src = vec![1.0f32; PARAMS * 7 / 2];
    let mut dst = vec![0.0f32; src.len()];
    group.throughput(Throughput::Bytes((src.len() * 8) as u64));
    group.bench_function("copy", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 15)
                .zip(src.par_chunks(1 << 15))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });

    let mut rmw = vec![1.0f32; PARAMS * 7 / 2];
    group.bench_function("read_modify_write", |b| {
        b.iter(|| {
            rmw.par_chunks_mut(1 << 15)
                .for_each(|c| c.iter_mut().for_each(|x| *x = -*x))
        })
    });

    let rules: [(&str, Rule, u64); 4] = [
        (
            "sgd_momentum",
            Sgd {
                momentum: 0.9,
                ..Sgd::preset(Flavor::PyTorch)
            }
            .into(),
            20,
        ),
        ("adam", Adam::preset(Flavor::PyTorch).into(), 28),
        ("adam_custom", custom_adam(0.9, 0.999, 1e-8).into(), 28),
        ("rmsprop", RmsProp::preset(Flavor::PyTorch).into(), 20),
    ];
    for tensors in [100, 5000] {
        for (name, rule, bytes_per_param) in &rules {
            let mut opt = Optimizer::new(param_set(tensors), rule.clone(), 1e-3).unwrap();
            group.throughput(Throughput::Bytes(bytes_per_param * PARAMS as u64));
            group.bench_function(format!("{name}/{tensors}_tensors"), |b| {
                b.iter(|| opt.step().unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
