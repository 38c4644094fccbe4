//! Lean state on the device (kernels/lean.cu, src/lean/lean.cuh): block quantization of state and
//! its reading back, fp32 masters split into bf16 weights and remainders and joined, stochastic
//! rounding to bf16. Each gives the bits its CPU twin in [`crate::lean`] gives (tests/lean.rs).

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::runtime::{driver_error, CudaRuntime};
use crate::error::{Error, Result};
use crate::lean::QuantMap;

/// Elements per thread block of the element-wise kernels, and the most blocks of one launch
/// (they stride over the rest).
const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 65_535;

fn config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (n as u64).div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Device `ordinal`'s runtime and its kernel `name` of kernels/lean.cu.
fn lean_kernel(ordinal: usize, name: &str) -> Result<(Arc<CudaRuntime>, CudaFunction)> {
    let rt = CudaRuntime::shared(ordinal)?;
    let module = rt.module("lean")?;
    let kernel = rt.function(&module, name)?;
    Ok((rt, kernel))
}

fn upload<T: DeviceRepr>(rt: &CudaRuntime, host: &[T]) -> Result<CudaSlice<T>> {
    let bytes = std::mem::size_of_val(host);
    rt.stream
        .clone_htod(host)
        .map_err(driver_error(rt.device, bytes))
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(rt: &CudaRuntime, n: usize) -> Result<CudaSlice<T>> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    rt.stream
        .alloc_zeros(n)
        .map_err(driver_error(rt.device, bytes))
}

fn download<T: DeviceRepr>(rt: &CudaRuntime, dev: &CudaSlice<T>) -> Result<Vec<T>> {
    rt.stream
        .clone_dtoh(dev)
        .map_err(driver_error(rt.device, 0))
}

/// `values` quantized with `map` in blocks of `block` elements (a multiple of 32, at most 256):
/// one code per element and one scale per block.
pub fn quantize_blocks(
    ordinal: usize,
    map: QuantMap,
    block: usize,
    values: &[f32],
) -> Result<(Vec<u8>, Vec<f32>)> {
    if block == 0 || block % 32 != 0 || block > THREADS as usize {
        return Err(Error::InvalidHyperparameter(format!(
            "a quantization block of {block} elements: the device takes a multiple of 32, at \
             most {THREADS}"
        )));
    }
    if values.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let (rt, kernel) = lean_kernel(ordinal, "lean_quantize_blocks")?;
    let blocks = values.len().div_ceil(block);
    let x = upload(&rt, values)?;
    let table = upload(&rt, map.values())?;
    let mut codes = zeros::<u8>(&rt, values.len())?;
    let mut scales = zeros::<f32>(&rt, blocks)?;
    let (n, block32, len) = (values.len() as u64, block as u32, map.values().len() as u32);
    let mut b = rt.stream.launch_builder(&kernel);
    b.arg(&x)
        .arg(&n)
        .arg(&block32)
        .arg(&table)
        .arg(&len)
        .arg(&mut codes)
        .arg(&mut scales);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (block32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `lean_quantize_blocks(const float*, u64, unsigned, const float*, unsigned,
    // unsigned char*, float*)` in kernels/lean.cu; `x` and `codes` hold `n` elements, `scales`
    // one per CUDA block of the grid, `table` `len` entries; `block` threads each.
    unsafe { b.launch(cfg) }.map_err(driver_error(rt.device, 0))?;
    Ok((download(&rt, &codes)?, download(&rt, &scales)?))
}

/// The values `codes` and their per-block `scales` stand for.
pub fn dequantize_blocks(
    ordinal: usize,
    map: QuantMap,
    block: usize,
    codes: &[u8],
    scales: &[f32],
) -> Result<Vec<f32>> {
    if block == 0 || scales.len() != codes.len().div_ceil(block) {
        return Err(Error::InvalidHyperparameter(format!(
            "{} scales for {} codes in blocks of {block}",
            scales.len(),
            codes.len()
        )));
    }
    if codes.is_empty() {
        return Ok(Vec::new());
    }
    let (rt, kernel) = lean_kernel(ordinal, "lean_dequantize_blocks")?;
    let (codes_dev, scales_dev) = (upload(&rt, codes)?, upload(&rt, scales)?);
    let table = upload(&rt, map.values())?;
    let mut out = zeros::<f32>(&rt, codes.len())?;
    // One block covers every code when it is longer than them (and so fits the kernel's u32).
    let block32 = block.min(codes.len()) as u32;
    let (n, len) = (codes.len() as u64, map.values().len() as u32);
    let mut b = rt.stream.launch_builder(&kernel);
    b.arg(&codes_dev)
        .arg(&scales_dev)
        .arg(&n)
        .arg(&block32)
        .arg(&table)
        .arg(&len)
        .arg(&mut out);
    // SAFETY: matches `lean_dequantize_blocks(const unsigned char*, const float*, u64, unsigned,
    // const float*, unsigned, float*)`; codes and out hold `n`, scales ⌈n / block⌉, table `len`.
    unsafe { b.launch(config(codes.len())) }.map_err(driver_error(rt.device, 0))?;
    download(&rt, &out)
}

/// Each master's bf16 weight (as bits) and remainder.
pub fn split_masters(ordinal: usize, masters: &[f32]) -> Result<(Vec<u16>, Vec<i16>)> {
    if masters.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let (rt, kernel) = lean_kernel(ordinal, "lean_split_masters")?;
    let m = upload(&rt, masters)?;
    let mut weights = zeros::<u16>(&rt, masters.len())?;
    let mut remainders = zeros::<i16>(&rt, masters.len())?;
    let n = masters.len() as u64;
    let mut b = rt.stream.launch_builder(&kernel);
    b.arg(&m).arg(&n).arg(&mut weights).arg(&mut remainders);
    // SAFETY: matches `lean_split_masters(const float*, u64, unsigned short*, short*)`; every
    // array holds `n` elements.
    unsafe { b.launch(config(masters.len())) }.map_err(driver_error(rt.device, 0))?;
    Ok((download(&rt, &weights)?, download(&rt, &remainders)?))
}

/// The masters that `weights` (bf16 bits) and `remainders` make.
pub fn join_masters(ordinal: usize, weights: &[u16], remainders: &[i16]) -> Result<Vec<f32>> {
    if weights.len() != remainders.len() {
        return Err(Error::LengthMismatch {
            what: "remainders".into(),
            expected: weights.len(),
            got: remainders.len(),
        });
    }
    if weights.is_empty() {
        return Ok(Vec::new());
    }
    let (rt, kernel) = lean_kernel(ordinal, "lean_join_masters")?;
    let (w, r) = (upload(&rt, weights)?, upload(&rt, remainders)?);
    let mut out = zeros::<f32>(&rt, weights.len())?;
    let n = weights.len() as u64;
    let mut b = rt.stream.launch_builder(&kernel);
    b.arg(&w).arg(&r).arg(&n).arg(&mut out);
    // SAFETY: matches `lean_join_masters(const unsigned short*, const short*, u64, float*)`;
    // every array holds `n` elements.
    unsafe { b.launch(config(weights.len())) }.map_err(driver_error(rt.device, 0))?;
    download(&rt, &out)
}

/// `values` rounded stochastically to bf16 (as bits) with the draws of (`seed`, `step`).
pub fn stochastic_round(ordinal: usize, values: &[f32], seed: u64, step: u64) -> Result<Vec<u16>> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let (rt, kernel) = lean_kernel(ordinal, "lean_stochastic_round")?;
    let x = upload(&rt, values)?;
    let mut out = zeros::<u16>(&rt, values.len())?;
    let n = values.len() as u64;
    let mut b = rt.stream.launch_builder(&kernel);
    b.arg(&x).arg(&n).arg(&seed).arg(&step).arg(&mut out);
    // SAFETY: matches `lean_stochastic_round(const float*, u64, u64, u64, unsigned short*)`;
    // `x` and `out` hold `n` elements.
    unsafe { b.launch(config(values.len())) }.map_err(driver_error(rt.device, 0))?;
    download(&rt, &out)
}
