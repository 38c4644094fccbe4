//! The command line: every option of the training example.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use fusedopt::{DType, Flavor, Masters, QuantizedState};

use crate::model::Loss;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub(crate) enum RuleName {
    Adam,
    Adamw,
    Sgd,
    Rmsprop,
    Adagrad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum FlavorName {
    Pytorch,
    Keras,
    Optax,
    Tf1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ScheduleName {
    Constant,
    /// Linear warmup over the first epoch, then cosine decay to 1% (Optax's warmup_cosine_decay).
    WarmupCosine,
    /// ReduceLROnPlateau on the validation loss (PyTorch's rule, patience 2, factor 0.5).
    Plateau,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ModelName {
    Mlp,
    Cnn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum GradDType {
    F32,
    /// bf16 gradients and model copy, fp32 master weights and state.
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum StateName {
    F32,
    Bf16,
    /// Block-wise 8-bit (torchao's AdamW8bit maps).
    Block8,
    /// Block-wise 4-bit (torchao's AdamW4bit maps).
    Block4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum MastersName {
    /// fp32 master weights (and a bf16 model copy with --grad-dtype bf16).
    F32,
    /// bf16 weights plus int16 remainders: the exact fp32 masters in 4 bytes.
    Remainders,
    /// bf16 weights alone, updated with stochastic rounding.
    Stochastic,
}

#[derive(Parser, Clone, Debug)]
#[command(about = "Data-parallel digit classifier trained with fusedopt's fused optimizers")]
pub(crate) struct Args {
    /// Read MNIST IDX files (train-images-idx3-ubyte[.gz], …) from this folder instead of the
    /// embedded 8×8 digits.
    #[arg(long)]
    pub(crate) mnist: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "mlp")]
    pub(crate) model: ModelName,
    /// Hidden layer widths, comma-separated (the dense part of the CNN too).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub(crate) hidden: Vec<usize>,
    /// Filters of the CNN's convolution.
    #[arg(long, default_value_t = 8)]
    pub(crate) channels: usize,
    #[arg(long, value_enum, default_value = "cross-entropy")]
    pub(crate) loss: Loss,
    #[arg(long, value_enum, default_value = "adam")]
    pub(crate) rule: RuleName,
    #[arg(long, value_enum, default_value = "pytorch")]
    pub(crate) flavor: FlavorName,
    /// Peak learning rate (default: 3e-3 Adam/AdamW, 0.05 SGD, 1e-3 RMSProp, 0.05 Adagrad).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Momentum of SGD and RMSProp.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) momentum: f64,
    /// L2 for Adam/SGD/RMSProp/Adagrad, decoupled for AdamW (default: 0, AdamW 0.01).
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    #[arg(long, value_enum, default_value = "warmup-cosine")]
    pub(crate) schedule: ScheduleName,
    /// Global-norm clipping threshold (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) clip: f64,
    /// Gradient dtype (bf16: mixed precision with fp32 masters).
    #[arg(long, value_enum, default_value = "f32")]
    pub(crate) grad_dtype: GradDType,
    /// How the optimizer stores its state (moments).
    #[arg(long, value_enum, default_value = "f32")]
    pub(crate) state: StateName,
    /// How the parameters keep their fp32 master weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub(crate) masters: MastersName,
    #[arg(long, default_value_t = 20)]
    pub(crate) epochs: usize,
    /// Global batch, split evenly between replicas.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch: usize,
    /// Data-parallel replicas (CPU threads; under --mpi, the processes of the job).
    #[arg(long, default_value_t = 2)]
    pub(crate) replicas: usize,
    /// Shard the optimizer state between the replicas (ZeRO-1): each keeps the masters and
    /// state of its window of the parameters only.
    #[arg(long)]
    pub(crate) shard_state: bool,
    /// Asynchronous SGD: --replicas worker threads push their gradients to a parameter server
    /// without waiting for each other.
    #[arg(long = "async")]
    pub(crate) asynchronous: bool,
    /// With --async: refuse a gradient more than this many versions of the weights old.
    #[arg(long)]
    pub(crate) max_staleness: Option<u64>,
    /// With --async: scale a gradient s versions old by 1/(1+s).
    #[arg(long)]
    pub(crate) down_weight: bool,
    /// Train synchronously and asynchronously over several seeds and write async.md to --out.
    #[arg(long)]
    pub(crate) compare_async: bool,
    /// Measure optimizer memory per replica with sharded state (GPT-2 small's tensors, 1, 2 and 4
    /// replicas) and write shard.md to --out.
    #[arg(long)]
    pub(crate) compare_shard: bool,
    /// One replica per MPI process: run as `mpirun -np N target/release/examples/train --mpi`
    /// (built with `--features mpi`).
    #[cfg(feature = "mpi")]
    #[arg(long)]
    pub(crate) mpi: bool,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Save a checkpoint here after every epoch.
    #[arg(long)]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint.
    #[arg(long, requires = "checkpoint")]
    pub(crate) resume: bool,
    /// Stop after this epoch, as if interrupted (the schedule still spans --epochs).
    #[arg(long)]
    pub(crate) stop_after: Option<usize>,
    /// Run the optimizer comparison (Adam, AdamW, SGD+momentum, RMSProp; lr grid on the validation
    /// split; several seeds) and write table.md and loss.svg to --out.
    #[arg(long)]
    pub(crate) compare: bool,
    /// Train AdamW with each state storage (f32, bf16, 8-bit, 4-bit) over several seeds and write
    /// state.md to --out: test accuracy and optimizer memory per parameter.
    #[arg(long)]
    pub(crate) compare_state: bool,
    #[arg(long, default_value = "compare-out")]
    pub(crate) out: PathBuf,
    /// Seeds per optimizer in --compare.
    #[arg(long, default_value_t = 5)]
    pub(crate) seeds: u64,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

pub(crate) fn flavor(f: FlavorName) -> Flavor {
    match f {
        FlavorName::Pytorch => Flavor::PyTorch,
        FlavorName::Keras => Flavor::Keras,
        FlavorName::Optax => Flavor::Optax,
        FlavorName::Tf1 => Flavor::Tf1,
    }
}

pub(crate) fn state_options(s: StateName) -> (DType, QuantizedState) {
    match s {
        StateName::F32 => (DType::F32, QuantizedState::None),
        StateName::Bf16 => (DType::BF16, QuantizedState::None),
        StateName::Block8 => (DType::F32, QuantizedState::Block8),
        StateName::Block4 => (DType::F32, QuantizedState::Block4),
    }
}

/// The storage of `m`; the stochastic stream is seeded by the run's seed.
pub(crate) fn masters_of(m: MastersName, seed: u64) -> Masters {
    match m {
        MastersName::F32 => Masters::F32,
        MastersName::Remainders => Masters::Bf16Remainders,
        MastersName::Stochastic => Masters::Bf16Stochastic { seed },
    }
}

pub(crate) fn default_lr(rule: RuleName) -> f64 {
    match rule {
        RuleName::Adam | RuleName::Adamw => 3e-3,
        RuleName::Sgd | RuleName::Adagrad => 0.05,
        RuleName::Rmsprop => 1e-3,
    }
}
