//! AVX2 products of Q8_0/Q4_0/Q4_1/Q5_0 (`tile`) and Q4_K/Q6_K (`tile_k`) weight rows with
//! activations quantized to Q8 blocks (`crate::quant`). Per 32 values: the weights as bytes
//! (nibbles and high bits unpacked once for up to `MR` tokens), `maddubs` + `madd` to eight
//! i32 partial sums (Q6_K's `madd` multiplies by its two i8 scales and its `− 32` is a second
//! `maddubs`), converted and accumulated in f32 with the piece's scale (`fmadd`); the offset
//! term (`c` of `crate::quant::sub_block`) times the activation block's integer sum is added
//! in scalar. One horizontal sum per row and token. The order of operations does not depend
//! on the number of tokens, so a token's result is the same alone and batched.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::quant::{QuantType, BLOCK};

/// Format codes for the const-generic kernels.
pub(super) const Q8_0: u8 = 0;
pub(super) const Q4_0: u8 = 1;
pub(super) const Q4_1: u8 = 2;
pub(super) const Q5_0: u8 = 3;
pub(super) const Q4_K: u8 = 4;
pub(super) const Q6_K: u8 = 5;

pub(super) fn code(t: QuantType) -> u8 {
    match t {
        QuantType::Q8_0 => Q8_0,
        QuantType::Q4_0 => Q4_0,
        QuantType::Q4_1 => Q4_1,
        QuantType::Q5_0 => Q5_0,
        QuantType::Q4_K => Q4_K,
        QuantType::Q6_K => Q6_K,
    }
}

/// Bytes per block of the format with code `t`.
pub(super) const fn block_bytes(t: u8) -> usize {
    match t {
        Q8_0 => QuantType::Q8_0.block_bytes(),
        Q4_0 => QuantType::Q4_0.block_bytes(),
        Q4_1 => QuantType::Q4_1.block_bytes(),
        Q5_0 => QuantType::Q5_0.block_bytes(),
        Q4_K => QuantType::Q4_K.block_bytes(),
        _ => QuantType::Q6_K.block_bytes(),
    }
}

/// Q5_0's fifth bits (`qh`, bit `j` for value `j`) as 32 bytes of 0 or 16.
#[inline(always)]
unsafe fn q5_high_bits(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    // byte j takes byte j / 8 of qh
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, spread), bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

#[inline(always)]
unsafe fn f16_scalar(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// One activation row: its 8-bit values, block scales and `scale · sum` per block.
#[derive(Clone, Copy)]
pub(super) struct XRow {
    pub q: *const i8,
    pub d: *const f32,
    pub ds: *const f32,
}

impl XRow {
    /// Row `i` of `xq`.
    pub fn of(xq: &crate::quant::QuantizedRows, i: usize) -> Self {
        let (q, d, _) = xq.row(i);
        XRow {
            q: q.as_ptr(),
            d: d.as_ptr(),
            ds: xq.row_ds(i).as_ptr(),
        }
    }
}

/// One block of a block-32 format at `blk`: its 32 weights as bytes (unsigned, or signed for
/// Q8_0) and its coefficients `(a, c)` (`crate::quant::sub_block`).
#[inline(always)]
unsafe fn unpack<const T: u8>(blk: *const u8) -> (__m256i, f32, f32) {
    let low4 = _mm_set1_epi8(15);
    let dw = f16_scalar(blk);
    let wv = match T {
        Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
        _ => {
            let at = match T {
                Q4_1 => 4,
                Q5_0 => 6,
                _ => 2,
            };
            let nib = _mm_loadu_si128(blk.add(at) as *const __m128i);
            let lo = _mm_and_si128(nib, low4);
            let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), low4);
            let v = _mm256_set_m128i(hi, lo);
            if T == Q5_0 {
                let qh = u32::from_le_bytes(*(blk.add(2) as *const [u8; 4]));
                _mm256_or_si256(v, q5_high_bits(qh))
            } else {
                v
            }
        }
    };
    let cw = match T {
        Q4_1 => f16_scalar(blk.add(2)),
        Q4_0 => -8.0 * dw,
        Q5_0 => -16.0 * dw,
        _ => 0.0,
    };
    (wv, dw, cw)
}

/// The products of [`tile`] with each block's weights and coefficients from `block(b, r)`
/// (`SIGNED`: Q8_0's signed bytes, no offset term).
#[inline(always)]
unsafe fn accumulate<const SIGNED: bool, const NR: usize, const MR: usize>(
    nb: usize,
    xs: &[XRow; MR],
    mut block: impl FnMut(usize, usize) -> (__m256i, f32, f32),
) -> [[f32; MR]; NR] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); MR]; NR];
    let mut offset = [[0.0f32; MR]; NR];
    for b in 0..nb {
        let mut wv = [_mm256_setzero_si256(); NR];
        let mut dw = [0.0f32; NR];
        let mut cw = [0.0f32; NR];
        for r in 0..NR {
            (wv[r], dw[r], cw[r]) = block(b, r);
        }
        let mut dwv = [_mm256_setzero_ps(); NR];
        for r in 0..NR {
            dwv[r] = _mm256_set1_ps(dw[r]);
        }
        for i in 0..MR {
            let x = _mm256_loadu_si256(xs[i].q.add(b * BLOCK) as *const __m256i);
            let dxv = _mm256_broadcast_ss(&*xs[i].d.add(b));
            let dsx = *xs[i].ds.add(b);
            for r in 0..NR {
                let isum = if SIGNED {
                    let aw = _mm256_sign_epi8(wv[r], wv[r]);
                    let sx = _mm256_sign_epi8(x, wv[r]);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones)
                } else {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(wv[r], x), ones)
                };
                acc[r][i] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum),
                    _mm256_mul_ps(dwv[r], dxv),
                    acc[r][i],
                );
                if !SIGNED {
                    offset[r][i] += cw[r] * dsx;
                }
            }
        }
    }
    let mut out = [[0.0f32; MR]; NR];
    for r in 0..NR {
        for i in 0..MR {
            out[r][i] = hsum(acc[r][i]) + offset[r][i];
        }
    }
    out
}

/// Dot products of `NR` weight rows (`nb` blocks of format `T` each) with `MR` activation
/// rows: `out[r][i]`. Each (row, token) pair has its own accumulator and sees the blocks in
/// the same order whatever NR and MR are, so results do not depend on the tiling.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const T: u8, const NR: usize, const MR: usize>(
    w: &[*const u8; NR],
    nb: usize,
    xs: &[XRow; MR],
) -> [[f32; MR]; NR] {
    let bb = block_bytes(T);
    // the same place in the rows of the next tile (rows are consecutive in memory)
    let ahead = NR * nb * bb;
    if T == Q8_0 {
        accumulate::<true, NR, MR>(nb, xs, |b, r| {
            let blk = w[r].add(b * bb);
            _mm_prefetch(blk.wrapping_add(ahead) as *const i8, _MM_HINT_T0);
            unpack::<T>(blk)
        })
    } else {
        accumulate::<false, NR, MR>(nb, xs, |b, r| {
            let blk = w[r].add(b * bb);
            _mm_prefetch(blk.wrapping_add(ahead) as *const i8, _MM_HINT_T0);
            unpack::<T>(blk)
        })
    }
}

/// A weight row unpacked once for many tokens (prefill): per 32 values, the weights as
/// unsigned bytes and the coefficients `(a, c)`; [`tile_unpacked`] then computes exactly
/// what [`tile`] and [`tile_k`] compute from the packed row, bit for bit.
#[derive(Clone, Copy)]
pub(super) struct Unpacked {
    pub q: *const u8,
    pub a: *const f32,
    pub c: *const f32,
}

/// Whether [`unpack_row`] takes format `t` (the formats whose weights are unsigned bytes with
/// one scale per 32 values: not Q8_0, whose bytes are ready as they are, nor Q6_K).
pub(super) fn unpacks(t: u8) -> bool {
    matches!(t, Q4_0 | Q4_1 | Q5_0 | Q4_K)
}

/// Unpacks one weight row of format `T` (`nb` pieces of 32 values) into `q` (`32 nb` bytes),
/// `a` and `c` (`nb` values each).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_row<const T: u8>(
    w: *const u8,
    nb: usize,
    q: &mut [u8],
    a: &mut [f32],
    c: &mut [f32],
) {
    assert!(unpacks(T) && q.len() >= nb * BLOCK && a.len() >= nb && c.len() >= nb);
    let bb = block_bytes(T);
    for p in 0..nb {
        let (v, ap, cp) = if T == Q4_K {
            k4_piece(w.add(p / 8 * bb), p % 8)
        } else {
            unpack::<T>(w.add(p * bb))
        };
        _mm256_storeu_si256(q.as_mut_ptr().add(p * BLOCK) as *mut __m256i, v);
        a[p] = ap;
        c[p] = cp;
    }
}

/// [`tile`] over rows [`unpack_row`] unpacked.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_unpacked<const NR: usize, const MR: usize>(
    w: &[Unpacked; NR],
    nb: usize,
    xs: &[XRow; MR],
) -> [[f32; MR]; NR] {
    accumulate::<false, NR, MR>(nb, xs, |b, r| {
        let u = &w[r];
        (
            _mm256_loadu_si256(u.q.add(b * BLOCK) as *const __m256i),
            *u.a.add(b),
            *u.c.add(b),
        )
    })
}

/// The eight pieces' coefficients `(d · sc, −dmin · m)` of the Q4_K super-block at `blk`, as
/// [`k4_piece`] computes them one by one.
#[inline(always)]
pub(super) unsafe fn k4_scales(blk: *const u8) -> ([f32; 8], [f32; 8]) {
    let (d, dmin) = (f16_scalar(blk), f16_scalar(blk.add(2)));
    let scales = &*(blk.add(4) as *const [u8; 12]);
    let (mut a, mut c) = ([0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let (sc, m) = crate::quant::k4_scale_min(scales, j);
        a[j] = d * sc as f32;
        c[j] = -dmin * m as f32;
    }
    (a, c)
}

/// Piece `s` (0..8) of the Q4_K super-block at `blk`: its 32 weights and `(d · sc, −dmin · m)`.
#[inline(always)]
unsafe fn k4_piece(blk: *const u8, s: usize) -> (__m256i, f32, f32) {
    let (d, dmin) = (f16_scalar(blk), f16_scalar(blk.add(2)));
    let (sc, m) = crate::quant::k4_scale_min(&*(blk.add(4) as *const [u8; 12]), s);
    (k4_nibbles(blk, s), d * sc as f32, -dmin * m as f32)
}

/// The 32 weights (0..=15) of piece `s` of the Q4_K super-block at `blk`: the low nibbles of
/// its 32-byte group `s / 2` for even `s`, the high ones for odd.
#[inline(always)]
unsafe fn k4_nibbles(blk: *const u8, s: usize) -> __m256i {
    let q = _mm256_loadu_si256(blk.add(16 + 32 * (s / 2)) as *const __m256i);
    let q = if s.is_multiple_of(2) {
        q
    } else {
        _mm256_srli_epi16(q, 4)
    };
    _mm256_and_si256(q, _mm256_set1_epi8(15))
}

/// Dot products of `NR` Q4_K or Q6_K weight rows (`nb / 8` super-blocks each) with `MR`
/// activation rows (`nb` blocks of 32): `out[r][i]`, the pieces of 32 in order, as
/// [`tile`] does.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_k<const T: u8, const NR: usize, const MR: usize>(
    w: &[*const u8; NR],
    nb: usize,
    xs: &[XRow; MR],
) -> [[f32; MR]; NR] {
    const SUBS: usize = 8;
    let bb = block_bytes(T);
    let ones = _mm256_set1_epi16(1);
    let low4 = _mm256_set1_epi8(15);
    let m32 = _mm256_set1_epi8(32);
    let mut acc = [[_mm256_setzero_ps(); MR]; NR];
    let mut offset = [[0.0f32; MR]; NR];
    // the same place in the rows of the next tile (rows are consecutive in memory)
    let ahead = NR * nb / SUBS * bb;
    for sb in 0..nb / SUBS {
        // per row: the pieces' scales (Q4_K: d·sc and −dmin·m; Q6_K: d and the i8 scales)
        let mut a = [[0.0f32; SUBS]; NR];
        let mut c = [[0.0f32; SUBS]; NR];
        let mut sc6 = [[0i16; 16]; NR];
        for r in 0..NR {
            let blk = w[r].add(sb * bb);
            if T == Q4_K {
                (a[r], c[r]) = k4_scales(blk);
            } else {
                a[r] = [f16_scalar(blk.add(208)); SUBS];
                for (o, &v) in sc6[r].iter_mut().zip(&*(blk.add(192) as *const [i8; 16])) {
                    *o = v as i16;
                }
            }
        }
        for s in 0..SUBS {
            let p = sb * SUBS + s;
            let mut wv = [_mm256_setzero_si256(); NR];
            let mut scv = [_mm256_setzero_si256(); NR];
            for r in 0..NR {
                let blk = w[r].add(sb * bb);
                _mm_prefetch(blk.wrapping_add(ahead + 32 * s) as *const i8, _MM_HINT_T0);
                if T == Q4_K {
                    wv[r] = k4_nibbles(blk, s);
                } else {
                    let (n, g) = (s / 4, s % 4);
                    let ql = _mm256_loadu_si256(blk.add(64 * n + 32 * (g % 2)) as *const __m256i);
                    let ql = if g < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                    let qh = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g as i32));
                    let hi = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(3)), 4);
                    wv[r] = _mm256_or_si256(_mm256_and_si256(ql, low4), hi);
                    scv[r] = _mm256_set_m128i(
                        _mm_set1_epi16(sc6[r][2 * s + 1]),
                        _mm_set1_epi16(sc6[r][2 * s]),
                    );
                }
            }
            for i in 0..MR {
                let x = _mm256_loadu_si256(xs[i].q.add(p * BLOCK) as *const __m256i);
                let dx = *xs[i].d.add(p);
                let dsx = *xs[i].ds.add(p);
                let x32 = if T == Q6_K {
                    _mm256_maddubs_epi16(m32, x)
                } else {
                    _mm256_setzero_si256()
                };
                for r in 0..NR {
                    let prod = _mm256_maddubs_epi16(wv[r], x);
                    let isum = if T == Q4_K {
                        _mm256_madd_epi16(prod, ones)
                    } else {
                        _mm256_madd_epi16(_mm256_sub_epi16(prod, x32), scv[r])
                    };
                    acc[r][i] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_set1_ps(a[r][s] * dx),
                        acc[r][i],
                    );
                    if T == Q4_K {
                        offset[r][i] += c[r][s] * dsx;
                    }
                }
            }
        }
    }
    let mut out = [[0.0f32; MR]; NR];
    for r in 0..NR {
        for i in 0..MR {
            out[r][i] = hsum(acc[r][i]) + offset[r][i];
        }
    }
    out
}
