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
    pub const fn block_bytes(self) -> usize {
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

/// One block of activations to Q8: `d = max|x| / 127`, `q = x / d` rounded to nearest, ties
/// to even (as llama.cpp's SIMD quantizers round; its scalar reference rounds ties away from
/// zero, which differs only on exact ties). Written so that the compiler vectorizes it on any
/// x86-64 (no call to `roundf`): the rounding adds and subtracts 1.5 · 2^23, exact for the
/// |values| <= 127 here, and bitwise equal to `round_ties_even`. Returns `d` and `Σ q`.
#[inline]
fn quantize_block_q8(xs: &[f32; BLOCK], qs: &mut [i8; BLOCK]) -> (f32, i32) {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let mut amax = 0.0f32;
    for &v in xs {
        let a = v.abs();
        amax = if a > amax { a } else { amax };
    }
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut r = [0.0f32; BLOCK];
    for (r, &v) in r.iter_mut().zip(xs) {
        // NaN or infinite activations: clamp keeps the integers in range (the result is
        // garbage either way, as in f32)
        *r = ((v * inv).clamp(-127.0, 127.0) + ROUND) - ROUND;
    }
    let mut sum = 0i32;
    for (q, &r) in qs.iter_mut().zip(&r) {
        *q = r as i8;
        sum += r as i32;
    }
    (d, sum)
}

/// The activation quantizer in AVX2: the same operations on 8 lanes (max is exact in any
/// order, and `round_ps` to nearest is ties to even), so bitwise the scalar twin's result
/// for finite activations.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block_q8(xs: &[f32; BLOCK], qs: &mut [i8; BLOCK]) -> (f32, i32) {
        let p = xs.as_ptr();
        let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
        let abs = |x: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let amax = _mm_cvtss_f32(m);
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let q = v.map(|x| {
            let x = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), lo), hi);
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(x))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        // i32 -> i8 (values are in -127..=127): packs interleave 128-bit lanes, a permute
        // restores the order
        let w16a = _mm256_packs_epi32(q[0], q[1]);
        let w16b = _mm256_packs_epi32(q[2], q[3]);
        let w8 = _mm256_packs_epi16(w16a, w16b);
        let w8 = _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, w8);
        (d, _mm_cvtsi128_si32(s))
    }
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
        let blocks_in = x[..blocks * BLOCK].chunks_exact(BLOCK);
        let blocks_out = self.q.chunks_exact_mut(BLOCK);
        #[cfg(target_arch = "x86_64")]
        let simd = is_x86_feature_detected!("avx2");
        for (b, (xs, qs)) in blocks_in.zip(blocks_out).enumerate() {
            let (xs, qs) = (xs.try_into().unwrap(), qs.try_into().unwrap());
            // SAFETY: the CPU has AVX2 (checked above).
            #[cfg(target_arch = "x86_64")]
            let (d, sum) = if simd {
                unsafe { avx2::quantize_block_q8(xs, qs) }
            } else {
                quantize_block_q8(xs, qs)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (d, sum) = quantize_block_q8(xs, qs);
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

    /// The activation quantizer's add-and-subtract rounding is `round_ties_even`, bit for
    /// bit, on exact ties (max 127: the scale is 1) and on many ordinary values.
    #[test]
    fn activation_rounding_is_ties_to_even() {
        let mut x = [0.0f32; BLOCK];
        let ties = [2.5f32, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5];
        x[..ties.len()].copy_from_slice(&ties);
        x[BLOCK - 1] = 127.0;
        let mut q = [0i8; BLOCK];
        let (d, sum) = super::quantize_block_q8(&x, &mut q);
        assert_eq!(d, 1.0);
        assert_eq!(&q[..ties.len()], &[2, -4, 0, 0, 2, 126, -126]);
        assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>());
        let mut seed = 7u64;
        for _ in 0..200 {
            for v in x.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *v = ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 9.0;
            }
            let (d, sum) = super::quantize_block_q8(&x, &mut q);
            for (&v, &q) in x.iter().zip(&q) {
                assert_eq!(q as f32, (v * (1.0 / d)).round_ties_even(), "{v} / {d}");
            }
            // the AVX2 twin: bitwise the same
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                let mut q2 = [0i8; BLOCK];
                // SAFETY: the CPU has AVX2.
                let (d2, sum2) = unsafe { super::avx2::quantize_block_q8(&x, &mut q2) };
                assert_eq!((d2.to_bits(), sum2, q2), (d.to_bits(), sum, q));
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
