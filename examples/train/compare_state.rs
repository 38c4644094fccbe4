//! The state-storage comparison: AdamW with f32, bf16, 8-bit and 4-bit state, and with 8-bit
//! state beside bf16 weights (exact masters from remainders, or stochastic rounding), each trained
//! with several seeds, judged on test accuracy and memory per parameter.

use fusedopt::lean::quantize::quantizes;
use fusedopt::{
    Adam, DType, Device, Flavor, Masters, Optimizer, OptimizerOptions, ParamSet, QuantizedState,
};

use crate::cli::{default_lr, state_options, Args, MastersName, RuleName, StateName};
use crate::compare::{mean, median, spread};
use crate::data::Error;
use crate::run::{model_of, replicas, train, Run, Splits};

pub(crate) fn compare_state(args: &Args, splits: &Splits) -> Result<(), Error> {
    let states = [
        (StateName::F32, MastersName::F32, "f32"),
        (StateName::Bf16, MastersName::F32, "bf16"),
        (
            StateName::Block8,
            MastersName::F32,
            "8-bit blocks (torchao AdamW8bit)",
        ),
        (
            StateName::Block4,
            MastersName::F32,
            "4-bit blocks (torchao AdamW4bit)",
        ),
        (
            StateName::Block8,
            MastersName::Remainders,
            "8-bit blocks, bf16 weights + remainders",
        ),
        (
            StateName::Block8,
            MastersName::Stochastic,
            "8-bit blocks, bf16 weights, stochastic rounding",
        ),
    ];
    let lr = args.lr.unwrap_or(default_lr(RuleName::Adamw));
    let model = model_of(args, splits.train.side);
    std::fs::create_dir_all(&args.out)?;
    let mut rows = Vec::new();
    let mut baseline = None;
    for (state, masters, label) in states {
        let a = Args {
            rule: RuleName::Adamw,
            state,
            masters,
            ..args.clone()
        };
        let opt = replicas(
            &Args {
                replicas: 1,
                ..a.clone()
            },
            &model,
            lr,
            0,
        )?
        .remove(0);
        let layout = opt.params().layout();
        let params = layout.num_params();
        let per_param = opt.state_bytes()? as f64 / params as f64;
        let weights = opt.params().weight_bytes() as f64 / params as f64;
        let coded: usize = match state_options(state).1 {
            QuantizedState::None => 0,
            q => layout
                .tensors()
                .iter()
                .filter(|t| quantizes(t.len, q.block()))
                .map(|t| t.len)
                .sum(),
        };
        let runs: Vec<Run> = (0..args.seeds)
            .map(|s| train(&a, splits, lr, s, false))
            .collect::<Result<_, _>>()?;
        let acc: Vec<f64> = runs.iter().map(|r| r.test.accuracy).collect();
        let secs: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.history.seconds_per_epoch.clone())
            .collect();
        let m = mean(&acc);
        let base = *baseline.get_or_insert(m);
        println!("{label:<48} test accuracy {:.2}%", 100.0 * m);
        rows.push(format!(
            "| {label} | {:.2} ± {:.2} % | {:+.2} | {per_param:.2} | {weights:.2} | {:.0} % | {:.0} \
             ms |",
            100.0 * m,
            100.0 * spread(&acc),
            100.0 * (m - base),
            100.0 * coded as f64 / params as f64,
            1e3 * median(secs)
        ));
    }
    let table = format!(
        "Digits ({} train / {} test), {}, AdamW (wd 0.01) at lr {lr}, batch {} over {} CPU \
         replicas, {} epochs, clip {}, {} seeds. Bytes per parameter as held, padding included: \
         the optimizer state (`Optimizer::state_bytes`) and the weights (`ParamSet::weight_bytes`: \
         fp32 masters, or bf16 weights with or without remainders); coded: the share of \
         parameters in tensors large enough to quantize (at least 4096 elements, whole blocks), \
         the rest kept in f32.\n\n\
         | state | test accuracy (mean ± sd) | vs f32 (points) | state bytes / param | weight \
         bytes / param | coded | time per epoch (median) |\n|---|---:|---:|---:|---:|---:|---:|\n\
         {}\n",
        splits.train.len(),
        splits.test.len(),
        model.describe(),
        args.batch,
        args.replicas,
        args.epochs,
        args.clip,
        args.seeds,
        rows.join("\n")
    );
    let table = format!("{table}\n{}", gpt2_memory()?);
    let path = args.out.join("state.md");
    std::fs::write(&path, &table)?;
    println!("\n{table}\nwrote {}", path.display());
    Ok(())
}

/// GPT-2 small's tensor sizes: 12 layers of width 768, vocabulary 50,257, 1,024 positions
/// (124M parameters in 148 tensors).
pub(crate) fn gpt2_small() -> Vec<usize> {
    let (d, layers, vocab, ctx) = (768usize, 12, 50_257usize, 1024usize);
    let mut t = vec![vocab * d, ctx * d];
    for _ in 0..layers {
        // ln_1, attention qkv and projection, ln_2, MLP in and out (weights and biases).
        t.extend([
            d,
            d,
            3 * d * d,
            3 * d,
            d * d,
            d,
            d,
            d,
            4 * d * d,
            4 * d,
            4 * d * d,
            d,
        ]);
    }
    t.extend([d, d]);
    t
}

/// Bytes per parameter of AdamW over GPT-2 small's tensors, per state and weight storage, as
/// the optimizer and the parameter set hold them.
fn gpt2_memory() -> Result<String, Error> {
    let sizes = gpt2_small();
    let mut rows = Vec::new();
    let fp32 = "fp32 masters + bf16 copy";
    let remainders = "bf16 + remainders";
    for (label, dtype, q, weights, masters) in [
        ("f32", DType::F32, QuantizedState::None, fp32, Masters::F32),
        (
            "bf16",
            DType::BF16,
            QuantizedState::None,
            fp32,
            Masters::F32,
        ),
        (
            "8-bit blocks",
            DType::F32,
            QuantizedState::Block8,
            fp32,
            Masters::F32,
        ),
        (
            "4-bit blocks",
            DType::F32,
            QuantizedState::Block4,
            fp32,
            Masters::F32,
        ),
        (
            "8-bit blocks",
            DType::F32,
            QuantizedState::Block8,
            remainders,
            Masters::Bf16Remainders,
        ),
        (
            "4-bit blocks",
            DType::F32,
            QuantizedState::Block4,
            remainders,
            Masters::Bf16Remainders,
        ),
        (
            "8-bit blocks",
            DType::F32,
            QuantizedState::Block8,
            "bf16, stochastic rounding",
            Masters::Bf16Stochastic { seed: 0 },
        ),
    ] {
        let mut b = ParamSet::builder();
        b.masters(masters);
        if masters == Masters::F32 {
            b.model_copy(DType::BF16)?;
        }
        for (i, &n) in sizes.iter().enumerate() {
            b.add(&format!("t{i}"), &[n], &vec![0.0; n])?;
        }
        let options = OptimizerOptions {
            state_dtype: dtype,
            quantized_state: q,
            ..Default::default()
        };
        let opt = Optimizer::with_options(
            b.build(Device::Cpu)?,
            Adam::adamw(Flavor::PyTorch),
            1e-3,
            options,
        )?;
        let params = opt.params().layout().num_params() as f64;
        let state = opt.state_bytes()? as f64;
        let weights_bytes = opt.params().weight_bytes() as f64;
        rows.push(format!(
            "| {label} | {weights} | {:.3} | {:.3} | {:.3} | {:.0} MiB |",
            state / params,
            weights_bytes / params,
            (state + weights_bytes) / params,
            (state + weights_bytes) / (1u64 << 20) as f64,
        ));
    }
    Ok(format!(
        "AdamW over GPT-2 small's tensors ({} parameters in {} tensors): optimizer state \
         (`Optimizer::state_bytes`) and weights (`ParamSet::weight_bytes`) as held; gradients not \
         counted.\n\n\
         | state | weights | state bytes / param | weight bytes / param | in all / param | in all |\n\
         |---|---|---:|---:|---:|---:|\n{}\n",
        sizes.iter().sum::<usize>(),
        sizes.len(),
        rows.join("\n")
    ))
}
