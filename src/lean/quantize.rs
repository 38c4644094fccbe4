//! Block-wise quantization of optimizer state, as torchao's 8-bit and 4-bit optimizers do it: a
//! block's scale is its largest magnitude (at least 1e-12), each value divided by it is coded as
//! the nearest entry of a [`QuantMap`] (exactly halfway: the upper code), and a code decodes to
//! its entry times the scale. bitsandbytes' blockwise 8-bit optimizers use the same maps and block
//! size and the nearest code too, except exactly halfway (its CUDA kernel takes the even code).

use super::QuantMap;

/// Elements per block of 8-bit state (bitsandbytes' and torchao's).
pub const BLOCK_8BIT: usize = 256;
/// Elements per block of 4-bit state (torchao's).
pub const BLOCK_4BIT: usize = 128;
/// Tensors smaller than this keep 32-bit state (bitsandbytes' `min_8bit_size`; torchao's
/// threshold too, which also keeps a tensor whose size is not a multiple of the block).
pub const MIN_QUANTIZED_SIZE: usize = 4096;

/// Whether a tensor of `len` elements is stored quantized in blocks of `block` (torchao's rule:
/// large enough, and a whole number of blocks).
pub fn quantizes(len: usize, block: usize) -> bool {
    len >= MIN_QUANTIZED_SIZE && len % block == 0
}

/// The smallest scale: an all-zero block codes to zero instead of dividing by zero.
const MIN_SCALE: f32 = 1e-12;

/// A block's scale: its largest magnitude (NaN if it holds one, as `amax` gives), at least 1e-12.
pub fn block_scale(values: &[f32]) -> f32 {
    let mut m = 0.0f32;
    for v in values {
        let a = v.abs();
        if a > m || a.is_nan() {
            m = a;
        }
    }
    if m.is_nan() {
        m
    } else {
        m.max(MIN_SCALE)
    }
}

/// The code of `x` (a value already divided by its block's scale): the nearest entry of
/// `table`, the upper one exactly halfway, the first below the table and the last above it.
/// The comparisons are f32, in torchao's order.
pub fn code_of(table: &[f32], x: f32) -> u8 {
    // The largest k with table[k] <= x (0 below the table).
    let k = table.partition_point(|&q| q <= x).saturating_sub(1);
    if k + 1 >= table.len() {
        return k as u8;
    }
    let up = x - table[k] >= (table[k + 1] - table[k]) * 0.5;
    (k + usize::from(up)) as u8
}

/// Mantissa bits of the key into [`CodeIndex`]: 2^(1 + 8 + 4) keys of one byte per map.
const INDEX_MANTISSA_BITS: u32 = 4;

/// [`code_of`] without its binary search: for every range of f32 bit patterns sharing sign,
/// exponent and the top mantissa bits, the largest entry at or below the range's smallest
/// value. A lookup then steps up past the few entries inside the range (none, mostly), so it
/// finds the very `k` of the search, and rounds as [`code_of`] does.
struct CodeIndex {
    first: Vec<u8>,
}

impl CodeIndex {
    const SHIFT: u32 = 23 - INDEX_MANTISSA_BITS;

    fn new(table: &[f32]) -> Self {
        let keys = 1usize << (32 - Self::SHIFT);
        let first = (0..keys)
            .map(|key| {
                let low = (key as u32) << Self::SHIFT;
                let span = (1u32 << Self::SHIFT) - 1;
                // The range's smallest value: its lowest pattern when positive, highest when
                // negative (non-finite ranges are never looked up).
                let smallest = f32::from_bits(if low >> 31 == 0 { low } else { low | span });
                let k = table.partition_point(|&q| q <= smallest).saturating_sub(1);
                k as u8
            })
            .collect();
        CodeIndex { first }
    }

    #[inline(always)]
    fn code(&self, table: &[f32], x: f32) -> u8 {
        let bits = x.to_bits();
        if bits & 0x7F80_0000 == 0x7F80_0000 {
            return code_of(table, x); // NaN or ±∞
        }
        let mut k = usize::from(self.first[(bits >> Self::SHIFT) as usize]);
        while k + 1 < table.len() && table[k + 1] <= x {
            k += 1;
        }
        if k + 1 >= table.len() {
            return k as u8;
        }
        let up = x - table[k] >= (table[k + 1] - table[k]) * 0.5;
        (k + usize::from(up)) as u8
    }
}

fn index(map: QuantMap) -> &'static CodeIndex {
    static INDEXES: [std::sync::OnceLock<CodeIndex>; 4] = [
        std::sync::OnceLock::new(),
        std::sync::OnceLock::new(),
        std::sync::OnceLock::new(),
        std::sync::OnceLock::new(),
    ];
    let slot = match map {
        QuantMap::DynamicSigned8 => 0,
        QuantMap::DynamicUnsigned8 => 1,
        QuantMap::DynamicSigned4 => 2,
        QuantMap::LinearUnsigned4 => 3,
    };
    INDEXES[slot].get_or_init(|| CodeIndex::new(map.values()))
}

/// [`code_of`] on `map`'s table, through its lookup index (the same code for every `x`).
pub fn code_in(map: QuantMap, x: f32) -> u8 {
    index(map).code(map.values(), x)
}

/// Quantizes one block into `codes` (one code per byte; as many as both hold); returns its
/// scale.
pub fn quantize_block(map: QuantMap, values: &[f32], codes: &mut [u8]) -> f32 {
    let (table, index) = (map.values(), index(map));
    let scale = block_scale(values);
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = index.code(table, v / scale);
    }
    scale
}

/// Decodes one block: `out[i] = map[codes[i]] · scale`.
pub fn dequantize_block(map: QuantMap, codes: &[u8], scale: f32, out: &mut [f32]) {
    let table = map.values();
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = table[usize::from(c) & (table.len() - 1)] * scale;
    }
}

/// Two 4-bit codes per byte, the even element in the high nibble (torchao's packing); an odd
/// last code leaves the low nibble 0. `packed` holds `codes.len().div_ceil(2)` bytes.
pub fn pack_nibbles(codes: &[u8], packed: &mut [u8]) {
    for (byte, pair) in packed.iter_mut().zip(codes.chunks(2)) {
        let low = pair.get(1).copied().unwrap_or(0);
        *byte = (pair[0] & 0x0F) << 4 | (low & 0x0F);
    }
}

/// The codes [`pack_nibbles`] packed: as many as `codes` holds, or as `packed` holds (two per
/// byte), whichever is fewer.
pub fn unpack_nibbles(packed: &[u8], codes: &mut [u8]) {
    for (pair, byte) in codes.chunks_mut(2).zip(packed) {
        pair[0] = byte >> 4;
        if let Some(low) = pair.get_mut(1) {
            *low = byte & 0x0F;
        }
    }
}
