//! Block-quantized weight formats of GGUF (ggml), read in place: Q8_0, Q4_0, Q4_1, Q5_0
//! (blocks of 32 values) and the k-quants Q4_K and Q6_K (super-blocks of 256).
//!
//! Rows are whole numbers of blocks. Byte layouts (all little-endian):
//! * Q8_0, 34 bytes: `d` (f16), then 32 × i8 `q`; value = `d · q`.
//! * Q4_0, 18 bytes: `d` (f16), then 16 bytes of nibbles; byte `j` holds value `j` in its low
//!   nibble and value `j + 16` in its high nibble; value = `d · (q − 8)`.
//! * Q4_1, 20 bytes: `d` (f16), `m` (f16), then the nibbles as in Q4_0; value = `d · q + m`.
//! * Q5_0, 22 bytes: `d` (f16), `qh` (u32: bit `j` is the fifth bit of value `j`), then the
//!   low four bits as Q4_0's nibbles; value = `d · (q − 16)`.
//! * Q4_K, 144 bytes: `d`, `dmin` (f16), 12 bytes holding eight 6-bit scales `sc` and mins
//!   `m` (one per 32 values: for `j < 4` the low 6 bits of bytes `j` and `j + 4`; for `j >= 4`
//!   the nibbles of byte `j + 4` and the top two bits of bytes `j − 4` and `j`), then 128
//!   bytes of nibbles: 32 bytes per 64 values, low nibbles the first 32, high nibbles the
//!   next; value = `d · sc · q − dmin · m`.
//! * Q6_K, 210 bytes: `ql` (128 bytes: low four bits), `qh` (64 bytes: top two bits), sixteen
//!   i8 scales (one per 16 values), `d` (f16). Per half of 128 values (`ql` 64 bytes, `qh` 32):
//!   value `32g + l` (group `g` of four, `l < 32`) takes the low (g < 2) or high (g >= 2)
//!   nibble of `ql[l + 32 (g mod 2)]` and bits `2g..2g+2` of `qh[l]`; value = `d · sc · (q − 32)`.
//!
//! Products with these weights quantize the activations once per token to Q8 blocks of 32
//! ([`QuantizedRows`](crate::quant::QuantizedRows): 32 × i8 with an f32 scale and the sum
//! of the 32 integers), so that each 32 values of a weight row contribute an integer dot
//! product times one or two coefficients ([`sub_block`](crate::quant::sub_block)):
//! `d_x · (a · Σ q_w q_x + c · Σ q_x)`, where the integer weights `q_w` already carry Q6_K's i8 scales (`a = d`), Q4_K's `a` is
//! `d · sc` and `c = −dmin · m`, Q4_0's `c = −8 d`, Q5_0's `c = −16 d`, Q4_1's `c = m`.
//!
//! The integer sums are exact, and each kernel sums the 32-value pieces in a fixed order, in
//! f32 (the scalar and AVX2 kernels piece by piece, the AVX-512 one in pairs): results do not
//! depend on how many tokens are in the batch, and differ between instruction sets only by
//! rounding.

/// Values per block of the activations and of the 32-value formats.
pub const BLOCK: usize = 32;
/// Values per super-block of the k-quants.
pub const SUPER: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q4_K,
    Q6_K,
}

impl QuantType {
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q4_K => 144,
            QuantType::Q6_K => 210,
        }
    }

    /// Values per block: 32, or 256 for the k-quants.
    pub const fn block_values(self) -> usize {
        match self {
            QuantType::Q4_K | QuantType::Q6_K => SUPER,
            _ => BLOCK,
        }
    }

    /// Bytes of a row of `k` values (`k` a multiple of [`Self::block_values`]).
    pub const fn row_bytes(self, k: usize) -> usize {
        k / self.block_values() * self.block_bytes()
    }

    /// The format llama.cpp's quantizer falls back to for rows that are not whole
    /// super-blocks (SmolLM2's 576-wide rows, for instance): Q4_K → Q5_0, Q6_K → Q8_0.
    pub const fn fallback(self) -> Option<QuantType> {
        match self {
            QuantType::Q4_K => Some(QuantType::Q5_0),
            QuantType::Q6_K => Some(QuantType::Q8_0),
            _ => None,
        }
    }

    /// The format a row of `k` values is quantized to when `self` is asked for: `self`, or its
    /// fallback when `k` is not whole blocks of `self` (None: not even the fallback's).
    pub fn for_row(self, k: usize) -> Option<QuantType> {
        if k.is_multiple_of(self.block_values()) {
            Some(self)
        } else {
            self.fallback().and_then(|f| f.for_row(k))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// Every format, in the order of the `--quantization` help.
    pub const ALL: [QuantType; 6] = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
    ];

    /// The values of one block (`b` holds exactly `block_bytes()` bytes, `out` at least
    /// `block_values()` values).
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
            QuantType::Q5_0 | QuantType::Q4_K | QuantType::Q6_K => {
                let mut q = [0i32; BLOCK];
                for (s, o) in out[..self.block_values()].chunks_mut(BLOCK).enumerate() {
                    let (a, c) = sub_block(self, b, s, &mut q);
                    for (o, &q) in o.iter_mut().zip(&q) {
                        *o = a * q as f32 + c;
                    }
                }
            }
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = String;
    /// `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q4_k`, `q6_k` (any case).
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("{s:?} is not a quantization (q8_0, q4_0, q4_1, q5_0, q4_k, q6_k)")
            })
    }
}

/// Q4_K's scale and min of sub-block `j` (0..8) from the 12 packed bytes.
#[inline(always)]
pub fn k4_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}

/// The 32 integer weights of 32-value piece `s` of a block (`s < block_values() / 32`) into
/// `q`, and the piece's coefficients `(a, c)`: value `l` is `a · q[l] + c`. Q6_K's integers
/// carry their i8 scale (`sc · (q − 32)`, so that `a = d`).
#[inline(always)]
pub fn sub_block(t: QuantType, b: &[u8], s: usize, q: &mut [i32; BLOCK]) -> (f32, f32) {
    let d = f16_at(b, 0);
    match t {
        QuantType::Q8_0 => {
            for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                *q = (v as i8) as i32;
            }
            (d, 0.0)
        }
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let nib = if t == QuantType::Q4_1 {
                &b[4..20]
            } else {
                &b[2..18]
            };
            for (j, &byte) in nib.iter().enumerate() {
                q[j] = (byte & 15) as i32;
                q[j + 16] = (byte >> 4) as i32;
            }
            (
                d,
                if t == QuantType::Q4_1 {
                    f16_at(b, 2)
                } else {
                    -8.0 * d
                },
            )
        }
        QuantType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for (j, &byte) in b[6..22].iter().enumerate() {
                q[j] = ((byte & 15) as u32 | ((qh >> j) & 1) << 4) as i32;
                q[j + 16] = ((byte >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32;
            }
            (d, -16.0 * d)
        }
        QuantType::Q4_K => {
            let (sc, m) = k4_scale_min(&b[4..16], s);
            let qs = &b[16 + 32 * (s / 2)..16 + 32 * (s / 2) + 32];
            let shift = 4 * (s % 2);
            for (q, &byte) in q.iter_mut().zip(qs) {
                *q = ((byte >> shift) & 15) as i32;
            }
            (d * sc as f32, -f16_at(b, 2) * m as f32)
        }
        QuantType::Q6_K => {
            let d = f16_at(b, 208);
            let (n, g) = (s / 4, s % 4);
            let ql = &b[64 * n + 32 * (g % 2)..][..32];
            let qh = &b[128 + 32 * n..][..32];
            let scales = [b[192 + 2 * s] as i8 as i32, b[193 + 2 * s] as i8 as i32];
            for (l, q) in q.iter_mut().enumerate() {
                let lo = (ql[l] >> (4 * (g / 2))) & 15;
                let hi = (qh[l] >> (2 * g)) & 3;
                *q = scales[l / 16] * ((lo | (hi << 4)) as i32 - 32);
            }
            (d, 0.0)
        }
    }
}

/// Quantizes `x` (a whole number of blocks) to format `t`. Q8_0, Q4_0, Q4_1 and Q5_0 bit for
/// bit as llama.cpp's reference quantizers (`quantize_row_q*_ref`) and gguf-py's do: in f32,
/// with the inverse scale taken from the unrounded f32 scale, the scale stored as f16 (round
/// to nearest even). Q8_0: `d = max|x| / 127`, `q = round(x / d)` (halves away from zero).
/// Q4_0 (Q5_0): `d = x_big / -8` (`/ -16`; `x_big` the first value of largest magnitude,
/// signed), `q = min(15, trunc(x / d + 8.5))` (`min(31, trunc(x / d + 16.5))`). Q4_1: `d =
/// (max − min) / 15`, `m = min`, `q = min(15, trunc((x − m) / d + 0.5))`. The k-quants by a
/// simpler rule than llama.cpp's (which searches each scale): see [`quantize_q4_k`] and
/// [`quantize_q6_k`].
pub fn quantize(t: QuantType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.row_bytes(x.len()));
    quantize_into(t, x, &mut out);
    out
}

/// [`quantize`], appending to `out`.
pub fn quantize_into(t: QuantType, x: &[f32], out: &mut Vec<u8>) {
    assert_eq!(x.len() % t.block_values(), 0);
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    for xs in x.chunks(t.block_values()) {
        match t {
            QuantType::Q8_0 => {
                let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                out.extend(xs.iter().map(|v| (v * inv).round() as i8 as u8));
            }
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 => {
                let (d, m, half, top) = if t == QuantType::Q4_1 {
                    let lo = xs.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                    let hi = xs.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    ((hi - lo) / 15.0, lo, 0.5, 15)
                } else {
                    let big = xs
                        .iter()
                        .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                    if t == QuantType::Q4_0 {
                        (big / -8.0, 0.0, 8.5, 15)
                    } else {
                        (big / -16.0, 0.0, 16.5, 31)
                    }
                };
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                if t == QuantType::Q4_1 {
                    out.extend(f16(m));
                }
                // `as u8` saturates (a NaN becomes 0), as the C cast to int8 does not: finite
                // values are in 0..top + 1.5 here
                let q = |v: f32| (((v - m) * inv + half).trunc() as u8).min(top);
                if t == QuantType::Q5_0 {
                    let qh = (0..32).fold(0u32, |h, j| h | (((q(xs[j]) >> 4) as u32) << j));
                    out.extend(qh.to_le_bytes());
                }
                out.extend((0..16).map(|j| (q(xs[j]) & 15) | ((q(xs[j + 16]) & 15) << 4)));
            }
            QuantType::Q4_K => quantize_q4_k(xs.try_into().unwrap(), out),
            QuantType::Q6_K => quantize_q6_k(xs.try_into().unwrap(), out),
        }
    }
}

/// One Q4_K super-block. Per 32 values: `min = min(0, min x)`, `scale = (max x − min) / 15`;
/// `d` and `dmin` are the largest scale and −min over 63, rounded to f16; the 6-bit scale and
/// min are `round(scale / d)` and `round(−min / dmin)`, and each value `round((x + dmin · m) /
/// (d · sc))` clamped to 0..=15. (llama.cpp's `make_qkx2_quants` also searches each scale to
/// minimise the weighted error; this one does not, so its error is somewhat larger.)
pub fn quantize_q4_k(x: &[f32; SUPER], out: &mut Vec<u8>) {
    let mut scale = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for (j, xs) in x.chunks(BLOCK).enumerate() {
        let lo = xs.iter().fold(0.0f32, |a, &v| a.min(v));
        let hi = xs.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        scale[j] = (hi - lo) / 15.0;
        mins[j] = -lo;
    }
    let to16 = |v: f32| half::f16::from_f32(v);
    let d = to16(scale.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let dmin = to16(mins.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let six = |v: f32, unit: f32| {
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let sc = scale.map(|s| six(s, d.to_f32()));
    let m = mins.map(|v| six(v, dmin.to_f32()));
    out.extend(d.to_bits().to_le_bytes());
    out.extend(dmin.to_bits().to_le_bytes());
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    out.extend(packed);
    let q = |j: usize, v: f32| {
        let step = d.to_f32() * sc[j] as f32;
        if step > 0.0 {
            ((v + dmin.to_f32() * m[j] as f32) / step)
                .round()
                .clamp(0.0, 15.0) as u8
        } else {
            0
        }
    };
    for c in 0..4 {
        out.extend((0..32).map(|l| {
            let (a, b) = (64 * c + l, 64 * c + 32 + l);
            q(2 * c, x[a]) | (q(2 * c + 1, x[b]) << 4)
        }));
    }
}

/// One Q6_K super-block. Per 16 values: `scale = x_big / −32` or `x_big / −31`, whichever
/// fits the 16 values better (`x_big` the value of largest magnitude, signed); the i8 scales are `−128 · scale / scale_big` rounded away from zero
/// (clamped to 127)
/// with `d = −scale_big / 128` rounded to f16; each value `round(x / (d · sc))` clamped to
/// −32..=31, stored plus 32.
pub fn quantize_q6_k(x: &[f32; SUPER], out: &mut Vec<u8>) {
    let mut scale = [0.0f32; 16];
    for (g, xs) in x.chunks(16).enumerate() {
        let big = xs
            .iter()
            .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        // the value of largest magnitude maps to −32; where the opposite extreme would then
        // clamp at 31, a scale of big / −31 may fit the piece better: the one with the smaller
        // squared error (before the scale's own rounding) is kept
        let err = |sc: f32| -> f32 {
            xs.iter()
                .map(|&v| {
                    let q = (v / sc).round().clamp(-32.0, 31.0);
                    (v - q * sc) * (v - q * sc)
                })
                .sum()
        };
        let (a, b) = (big / -32.0, big / -31.0);
        scale[g] = if big != 0.0 && err(b) < err(a) { b } else { a };
    }
    let big = scale
        .iter()
        .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let (d, sc) = if big != 0.0 {
        let inv = -128.0 / big;
        // rounded away from zero, so that each piece's extreme value stays in range
        let sc = scale.map(|s| {
            let v = inv * s;
            (v.abs().ceil().copysign(v)).clamp(-128.0, 127.0) as i8
        });
        (half::f16::from_f32(1.0 / inv), sc)
    } else {
        (half::f16::ZERO, [0i8; 16])
    };
    let q = |i: usize| {
        let step = d.to_f32() * sc[i / 16] as f32;
        let v = if step != 0.0 {
            (x[i] / step).round().clamp(-32.0, 31.0) as i32
        } else {
            0
        };
        (v + 32) as u8
    };
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for n in 0..2 {
        for l in 0..32 {
            let base = 128 * n + l;
            let [q0, q1, q2, q3] = [0, 32, 64, 96].map(|o| q(base + o));
            ql[64 * n + l] = (q0 & 15) | ((q2 & 15) << 4);
            ql[64 * n + 32 + l] = (q1 & 15) | ((q3 & 15) << 4);
            qh[32 * n + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|s| s as u8));
    out.extend(d.to_bits().to_le_bytes());
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

/// `Σ` over 32-value pieces of one weight row with one quantized activation row, pieces in
/// order (the scalar kernel; the SIMD kernels compute the same integer sums and the same f32
/// sums up to rounding).
pub fn dot_row(t: QuantType, w: &[u8], xq: &[i8], xd: &[f32], xs: &[i32]) -> f32 {
    let (bb, subs) = (t.block_bytes(), t.block_values() / BLOCK);
    let mut acc = 0.0f32;
    let mut q = [0i32; BLOCK];
    for (p, (&d_x, &s_x)) in xd.iter().zip(xs).enumerate() {
        let (b, s) = (p / subs, p % subs);
        let (a, c) = sub_block(t, &w[b * bb..(b + 1) * bb], s, &mut q);
        let isum: i32 = q
            .iter()
            .zip(&xq[p * BLOCK..(p + 1) * BLOCK])
            .map(|(&w, &x)| w * x as i32)
            .sum();
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
        for t in [
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
        ] {
            let b = quantize(t, &x);
            assert_eq!(b.len(), 2 * t.block_bytes());
            let mut y = vec![0.0f32; 64];
            for (o, blk) in y.chunks_mut(BLOCK).zip(b.chunks(t.block_bytes())) {
                t.dequantize_block(blk, o);
            }
            let step = match t {
                QuantType::Q8_0 => 3.2 / 127.0,
                QuantType::Q5_0 => 6.4 / 31.0,
                _ => 6.4 / 15.0,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= step * 0.51 + 1e-3, "{t:?}: {a} -> {b}");
            }
        }
    }

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut seed = seed;
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// The k-quants: every piece's values come back within a fraction of the piece's range
    /// (Q4_K: 15 steps per 32 values plus the 6-bit scale and min; Q6_K: 63 steps per 16
    /// values plus the 8-bit scale), on values of different magnitude per piece; and all-zero
    /// blocks are zeros.
    #[test]
    fn k_quants_round_trip() {
        let mut x = rand_vec(2 * SUPER, 11);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= 1.0 + (i / 32 % 5) as f32; // pieces of different ranges
        }
        for (t, steps, piece) in [(QuantType::Q4_K, 15.0, 32), (QuantType::Q6_K, 63.0, 16)] {
            let b = quantize(t, &x);
            assert_eq!(b.len(), 2 * t.block_bytes());
            let mut y = vec![0.0f32; x.len()];
            for (o, blk) in y.chunks_mut(SUPER).zip(b.chunks(t.block_bytes())) {
                t.dequantize_block(blk, o);
            }
            for (xs, ys) in x.chunks(piece).zip(y.chunks(piece)) {
                let range = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) * 2.0;
                for (a, b) in xs.iter().zip(ys) {
                    // half a step, plus the 6-bit (8-bit) scale's rounding
                    assert!((a - b).abs() <= range / steps * 0.75, "{t:?}: {a} -> {b}");
                }
            }
            let z = quantize(t, &[0.0; SUPER]);
            let mut y = [1.0f32; SUPER];
            t.dequantize_block(&z, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{t:?}");
        }
    }

    /// The Q4_K scale packing: all 64 × 64 pairs of 6-bit values come back.
    #[test]
    fn q4_k_scales_unpack_as_packed() {
        for a in 0..64u8 {
            for b in 0..64u8 {
                let sc = [a, b, a ^ 21, b ^ 42, b, a, 63 - a, 63 - b];
                let m = [b, a, 63 - b, a ^ 7, a, b ^ 1, b, 63 - a];
                let mut p = [0u8; 12];
                for j in 0..4 {
                    p[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                    p[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
                    p[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
                }
                for j in 0..8 {
                    assert_eq!(k4_scale_min(&p, j), (sc[j], m[j]));
                }
            }
        }
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        assert_eq!(QuantType::Q4_K.for_row(576), Some(QuantType::Q5_0));
        assert_eq!(QuantType::Q4_K.for_row(1536), Some(QuantType::Q4_K));
        assert_eq!(QuantType::Q6_K.for_row(576), Some(QuantType::Q8_0));
        assert_eq!(QuantType::Q4_K.for_row(48), None);
        assert_eq!("q4_k".parse::<QuantType>(), Ok(QuantType::Q4_K));
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
        let k = 512;
        let x = rand_vec(k, 7);
        let mut xq = QuantizedRows::default();
        xq.quantize(&x, 1, k);
        let (q, d, s) = xq.row(0);
        for t in QuantType::ALL {
            let w = quantize(t, &rand_vec(k, 9 + t as u64));
            let mut wf = vec![0.0f32; k];
            let bv = t.block_values();
            for (o, blk) in wf.chunks_mut(bv).zip(w.chunks(t.block_bytes())) {
                t.dequantize_block(blk, o);
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
