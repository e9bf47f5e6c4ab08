//! Block-quantized weight formats of GGUF (ggml), read in place: Q8_0, Q4_0 and Q4_1.
//!
//! Each block holds 32 consecutive values of a row (rows are whole numbers of blocks):
//! * Q8_0, 34 bytes: `d` (f16), then 32 × i8 `q`; value = `d · q`.
//! * Q4_0, 18 bytes: `d` (f16), then 16 bytes of nibbles; byte `j` holds value `j` in its low
//!   nibble and value `j + 16` in its high nibble; value = `d · (q − 8)`.
//! * Q4_1, 20 bytes: `d` (f16), `m` (f16), then the nibbles as in Q4_0; value = `d · q + m`.
//!
//! Products with these weights quantize the activations once per token to Q8 blocks
//! ([`QuantizedRows`](crate::quant::QuantizedRows): 32 × i8 with an f32 scale and the sum
//! of the 32 integers), so that a block's dot product is an integer dot product and one or
//! two multiplications:
//! * Q8_0: `d_w · d_x · Σ q_w q_x`
//! * Q4_0: `d_w · d_x · (Σ q_w q_x − 8 Σ q_x)`
//! * Q4_1: `d_w · d_x · Σ q_w q_x + m_w · d_x · Σ q_x`
//!
//! The integer sums are exact, and each kernel sums the blocks in a fixed order, in f32 (the
//! scalar and AVX2 kernels block by block, the AVX-512 one in pairs): results do not depend
//! on how many tokens are in the batch, and differ between instruction sets only by rounding.

/// Values per block (every format here).
pub const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl QuantType {
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
        }
    }

    /// Every format, in the order of the `--quantization` help.
    pub const ALL: [QuantType; 3] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1];

    /// The 32 values of one block (`b` holds exactly `block_bytes()` bytes).
    pub fn dequantize_block(self, b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        match self {
            QuantType::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                    *o = d * (q as i8) as f32;
                }
            }
            QuantType::Q4_0 | QuantType::Q4_1 => {
                let (m, nib) = match self {
                    QuantType::Q4_1 => (f16_at(b, 2), &b[4..20]),
                    _ => (0.0, &b[2..18]),
                };
                let bias = if self == QuantType::Q4_0 { 8 } else { 0 };
                for (j, &byte) in nib.iter().enumerate() {
                    out[j] = d * ((byte & 15) as i32 - bias) as f32 + m;
                    out[j + 16] = d * ((byte >> 4) as i32 - bias) as f32 + m;
                }
            }
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = String;
    /// `q8_0`, `q4_0`, `q4_1` (any case).
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("{s:?} is not a quantization (q8_0, q4_0, q4_1)"))
    }
}

/// Quantizes `x` (a whole number of blocks) to format `t`, bit for bit as llama.cpp's
/// reference quantizers (`quantize_row_q*_ref`) and gguf-py's do: in f32, with the inverse
/// scale taken from the unrounded f32 scale, the scale stored as f16 (round to nearest even).
/// Q8_0: `d = max|x| / 127`, `q = round(x / d)` (halves away from zero). Q4_0: `d = x_big /
/// -8` (`x_big` the first value of largest magnitude, signed), `q = min(15, trunc(x / d +
/// 8.5))`. Q4_1: `d = (max − min) / 15`, `m = min`, `q = min(15, trunc((x − m) / d + 0.5))`.
pub fn quantize(t: QuantType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / BLOCK * t.block_bytes());
    quantize_into(t, x, &mut out);
    out
}

/// [`quantize`], appending to `out`.
pub fn quantize_into(t: QuantType, x: &[f32], out: &mut Vec<u8>) {
    assert_eq!(x.len() % BLOCK, 0);
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    for xs in x.chunks(BLOCK) {
        match t {
            QuantType::Q8_0 => {
                let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                out.extend(xs.iter().map(|v| (v * inv).round() as i8 as u8));
            }
            QuantType::Q4_0 | QuantType::Q4_1 => {
                let (d, m, half) = if t == QuantType::Q4_0 {
                    let big = xs
                        .iter()
                        .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                    (big / -8.0, 0.0, 8.5)
                } else {
                    let lo = xs.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                    let hi = xs.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    ((hi - lo) / 15.0, lo, 0.5)
                };
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                if t == QuantType::Q4_1 {
                    out.extend(f16(m));
                }
                // `as u8` saturates (a NaN becomes 0), as the C cast to int8 does not: finite
                // values are in 0..16.5 here
                let q = |v: f32| (((v - m) * inv + half).trunc() as u8).min(15);
                out.extend((0..16).map(|j| q(xs[j]) | (q(xs[j + 16]) << 4)));
            }
        }
    }
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Rows of activations quantized to Q8 blocks: for each row, `k / 32` blocks of 32 i8 values,
/// their scale and the sum of their integers.
#[derive(Default)]
pub struct QuantizedRows {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<i32>,
    /// `d · s` per block, in f32 (the Q4 offset terms' factor).
    pub ds: Vec<f32>,
    pub k: usize,
    pub rows: usize,
}

impl QuantizedRows {
    /// Quantizes `rows` rows of `k` values of `x` (k a multiple of 32), reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], rows: usize, k: usize) {
        assert_eq!(k % BLOCK, 0, "row length {k} is not a multiple of {BLOCK}");
        let blocks = rows * k / BLOCK;
        self.q.resize(rows * k, 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0);
        self.ds.resize(blocks, 0.0);
        self.k = k;
        self.rows = rows;
        for b in 0..blocks {
            let xs = &x[b * BLOCK..(b + 1) * BLOCK];
            let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in self.q[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(xs) {
                // round half away from zero, as llama.cpp's reference quantizer does
                let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
                *q = r;
                sum += r as i32;
            }
            self.d[b] = d;
            self.s[b] = sum;
            self.ds[b] = d * sum as f32;
        }
    }

    /// Row `i`: its values, scales and sums.
    #[inline]
    pub fn row(&self, i: usize) -> (&[i8], &[f32], &[i32]) {
        let nb = self.k / BLOCK;
        (
            &self.q[i * self.k..(i + 1) * self.k],
            &self.d[i * nb..(i + 1) * nb],
            &self.s[i * nb..(i + 1) * nb],
        )
    }

    /// Row `i`'s `d · s` per block.
    #[inline]
    pub fn row_ds(&self, i: usize) -> &[f32] {
        let nb = self.k / BLOCK;
        &self.ds[i * nb..(i + 1) * nb]
    }
}

/// The integer dot product of one weight block with 32 activation values (portable), and the
/// block's two float coefficients: the block's contribution is `a · isum + b · s_x`.
#[inline(always)]
pub fn block_terms(t: QuantType, w: &[u8], xq: &[i8]) -> (i32, f32, f32) {
    let d = f16_at(w, 0);
    match t {
        QuantType::Q8_0 => {
            let mut s = 0i32;
            for (&a, &b) in w[2..34].iter().zip(xq) {
                s += (a as i8) as i32 * b as i32;
            }
            (s, d, 0.0)
        }
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let nib = if t == QuantType::Q4_1 {
                &w[4..20]
            } else {
                &w[2..18]
            };
            let mut s = 0i32;
            for (j, &byte) in nib.iter().enumerate() {
                s += (byte & 15) as i32 * xq[j] as i32 + (byte >> 4) as i32 * xq[j + 16] as i32;
            }
            match t {
                QuantType::Q4_0 => (s, d, -8.0 * d),
                _ => (s, d, f16_at(w, 2)),
            }
        }
    }
}

/// `Σ_blocks` of one weight row with one quantized activation row, blocks in order (the
/// scalar kernel; the SIMD kernels compute the same integer sums and the same f32 sums).
pub fn dot_row(t: QuantType, w: &[u8], xq: &[i8], xd: &[f32], xs: &[i32]) -> f32 {
    let bb = t.block_bytes();
    let mut acc = 0.0f32;
    for (b, (&d_x, &s_x)) in xd.iter().zip(xs).enumerate() {
        let (isum, a, c) =
            block_terms(t, &w[b * bb..(b + 1) * bb], &xq[b * BLOCK..(b + 1) * BLOCK]);
        acc += d_x * (a * isum as f32 + c * s_x as f32);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn blocks_dequantize_as_the_format_says() {
        let mut b = vec![];
        b.extend(f16b(0.5));
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0.0f32; 32];
        QuantType::Q8_0.dequantize_block(&b, &mut out);
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);

        let mut b = vec![];
        b.extend(f16b(2.0));
        b.extend(f16b(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        QuantType::Q4_1.dequantize_block(&b, &mut out);
        assert_eq!(out[3], 2.0 * 3.0 - 1.0);
        assert_eq!(out[16 + 3], 2.0 * 12.0 - 1.0);

        let mut b4 = b[..2].to_vec();
        b4.extend(&b[4..]);
        QuantType::Q4_0.dequantize_block(&b4, &mut out);
        assert_eq!(out[0], 2.0 * (0.0 - 8.0));
        assert_eq!(out[16], 2.0 * (15.0 - 8.0));
    }

    #[test]
    fn quantize_then_dequantize_is_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 64) as f32 / 10.0 - 3.0)
            .collect();
        for t in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let b = quantize(t, &x);
            assert_eq!(b.len(), 2 * t.block_bytes());
            let mut y = vec![0.0f32; 64];
            for (o, blk) in y.chunks_mut(BLOCK).zip(b.chunks(t.block_bytes())) {
                t.dequantize_block(blk, o);
            }
            let step = match t {
                QuantType::Q8_0 => 3.2 / 127.0,
                _ => 6.4 / 15.0,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= step * 0.51 + 1e-3, "{t:?}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn the_quantized_dot_is_close_to_the_float_dot() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let k = 256;
        let x: Vec<f32> = (0..k).map(|_| rnd()).collect();
        let mut xq = QuantizedRows::default();
        xq.quantize(&x, 1, k);
        let (q, d, s) = xq.row(0);
        for t in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let w: Vec<u8> = (0..k / BLOCK * t.block_bytes())
                .map(|i| {
                    // keep the f16 scales small and finite
                    let r = i % t.block_bytes();
                    if r < 4 && (t == QuantType::Q4_1 || r < 2) {
                        f16b(0.01 + (i % 7) as f32 * 0.003)[r % 2]
                    } else {
                        (rnd() * 255.0) as i32 as u8
                    }
                })
                .collect();
            let mut wf = vec![0.0f32; k];
            for b in 0..k / BLOCK {
                let bb = t.block_bytes();
                t.dequantize_block(
                    &w[b * bb..(b + 1) * bb],
                    &mut wf[b * BLOCK..(b + 1) * BLOCK],
                );
            }
            let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
            let norm: f32 = wf.iter().map(|a| a.abs()).sum::<f32>() * 0.5 / 127.0;
            let got = dot_row(t, &w, q, d, s);
            assert!(
                (got - exact).abs() <= norm,
                "{t:?}: {got} vs {exact} (bound {norm})"
            );
        }
    }
}
