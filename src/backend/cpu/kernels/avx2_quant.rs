//! AVX2 products of Q8_0/Q4_0/Q4_1 weight rows with activations quantized to Q8 blocks
//! (`crate::quant`). Per block: the weight's 32 values as bytes (nibbles unpacked once for up
//! to `MR` tokens), `maddubs` + `madd` to eight i32 partial sums, converted and accumulated in
//! f32 with the block's scale (`fmadd`); the Q4 offset term (`-8 d` or `m`) times the
//! activation block's integer sum is added in scalar. One horizontal sum per row and token.
//! The order of operations does not depend on the number of tokens, so a token's result is the
//! same alone and batched.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::quant::{QuantType, BLOCK};

/// Format codes for the const-generic kernels.
pub(super) const Q8_0: u8 = 0;
pub(super) const Q4_0: u8 = 1;
pub(super) const Q4_1: u8 = 2;

pub(super) fn code(t: QuantType) -> u8 {
    match t {
        QuantType::Q8_0 => Q8_0,
        QuantType::Q4_0 => Q4_0,
        QuantType::Q4_1 => Q4_1,
    }
}

/// Bytes per block of the format with code `t`.
pub(super) const fn block_bytes(t: u8) -> usize {
    match t {
        Q8_0 => QuantType::Q8_0.block_bytes(),
        Q4_0 => QuantType::Q4_0.block_bytes(),
        _ => QuantType::Q4_1.block_bytes(),
    }
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
    let ones = _mm256_set1_epi16(1);
    let low4 = _mm_set1_epi8(15);
    let mut acc = [[_mm256_setzero_ps(); MR]; NR];
    let mut offset = [[0.0f32; MR]; NR];
    for b in 0..nb {
        let mut wv = [_mm256_setzero_si256(); NR];
        let mut dw = [0.0f32; NR];
        let mut cw = [0.0f32; NR];
        for r in 0..NR {
            let blk = w[r].add(b * bb);
            _mm_prefetch(blk.wrapping_add(8 * bb) as *const i8, _MM_HINT_T0);
            dw[r] = f16_scalar(blk);
            wv[r] = match T {
                Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
                _ => {
                    let nib =
                        _mm_loadu_si128(blk.add(if T == Q4_1 { 4 } else { 2 }) as *const __m128i);
                    let lo = _mm_and_si128(nib, low4);
                    let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), low4);
                    _mm256_set_m128i(hi, lo)
                }
            };
            cw[r] = match T {
                Q4_1 => f16_scalar(blk.add(2)),
                Q4_0 => -8.0 * dw[r],
                _ => 0.0,
            };
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
                let isum = if T == Q8_0 {
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
                if T != Q8_0 {
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
