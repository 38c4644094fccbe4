//! Optimizer memory per replica with sharded state (`--compare-shard`): AdamW over GPT-2 small's
//! tensors, unsharded and sharded over 2 and 4 replicas (threads), dense and 8-bit state, as
//! each replica holds it ([`fusedopt::parallel::ShardedReplica::memory`]); writes shard.md.

use fusedopt::parallel::{DataParallelOptions, ShardedDataParallel};
use fusedopt::{Adam, Device, Flavor, Optimizer, OptimizerOptions, ParamSet, QuantizedState};

use crate::cli::Args;
use crate::compare_state::gpt2_small;
use crate::data::Error;

fn optimizer(sizes: &[usize], quantized: QuantizedState) -> Result<Optimizer, Error> {
    let mut b = ParamSet::builder();
    for (i, &n) in sizes.iter().enumerate() {
        b.add(&format!("t{i}"), &[n], &vec![0.0; n])?;
    }
    let options = OptimizerOptions {
        quantized_state: quantized,
        ..Default::default()
    };
    Ok(Optimizer::with_options(
        b.build(Device::Cpu)?,
        Adam::adamw(Flavor::PyTorch),
        1e-3,
        options,
    )?)
}

pub(crate) fn compare_shard(args: &Args) -> Result<(), Error> {
    let sizes = gpt2_small();
    let params: usize = sizes.iter().sum();
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let mut rows = Vec::new();
    for (label, q) in [
        ("f32", QuantizedState::None),
        ("8-bit blocks", QuantizedState::Block8),
    ] {
        let whole = optimizer(&sizes, q)?;
        let (state, masters) = (
            whole.state_bytes()?,
            4 * whole.params().layout().arena_len(),
        );
        rows.push(format!(
            "| {label} | 1 (unsharded) | {:.0} MiB | {:.0} MiB | {:.0} MiB | 1.000 |",
            mib(state),
            mib(masters),
            mib(state + masters)
        ));
        drop(whole);
        for n in [2, 4] {
            let replicas = (0..n)
                .map(|_| optimizer(&sizes, q))
                .collect::<Result<Vec<_>, _>>()?;
            let group = ShardedDataParallel::cpu(replicas, DataParallelOptions::default())?;
            let worst = group
                .replicas()
                .iter()
                .map(|r| r.memory())
                .collect::<fusedopt::Result<Vec<_>>>()?
                .into_iter()
                .max_by_key(|m| m.state_bytes + m.masters_bytes)
                .ok_or("no replicas")?;
            let held = worst.state_bytes + worst.masters_bytes;
            rows.push(format!(
                "| {label} | {n} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.3} |",
                mib(worst.state_bytes),
                mib(worst.masters_bytes),
                mib(held),
                held as f64 / (state + masters) as f64
            ));
            println!("{}", rows.last().map(String::as_str).unwrap_or_default());
        }
    }
    let table = format!(
        "AdamW over GPT-2 small's tensors ({params} parameters in {} tensors): optimizer state and \
         fp32 masters per replica, as the most loaded replica of a sharded group on CPU threads \
         holds them (`ShardedReplica::memory`; windows of 64 Ki elements, the arena padded to N \
         of them). Every replica also keeps the whole model's weights and gradients (ZeRO stage \
         1).\n\n\
         | state | replicas | state / replica | masters / replica | both | of unsharded |\n\
         |---|---:|---:|---:|---:|---:|\n{}\n",
        sizes.len(),
        rows.join("\n")
    );
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("shard.md");
    std::fs::write(&path, &table)?;
    println!("\n{table}\nwrote {}", path.display());
    Ok(())
}
