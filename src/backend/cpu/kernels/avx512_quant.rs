//! AVX-512 VNNI products of Q8_0/Q4_0/Q4_1 weight rows with activations quantized to Q8
//! blocks (`crate::quant`), two blocks per 512-bit register.
//!
//! Per pair of blocks: the weights' 64 values as bytes (Q4 nibbles unpacked once for up to
//! `MR` tokens), one `vpdpbusd` per (row, token) to sixteen i32 partial sums (lanes 0-7 the
//! first block, 8-15 the second), converted and accumulated in f32 with a vector holding each
//! block's scale product in its eight lanes (the scales of both blocks converted from f16 in
//! one instruction). `vpdpbusd` multiplies unsigned by signed bytes:
//! Q4 nibbles are unsigned already; for Q8_0 the activations are offset by 128 (an XOR of the
//! sign bit) and the weights' `128 · Σ q_w`, computed once per row and block pair, is the
//! starting value the products are added to. The integer sums are exact (no saturation, unlike
//! AVX2's `maddubs`). The Q4 offset terms (`-8 d` or `m` times the activation block's
//! `d · Σ q`) enter the same accumulator through lanes 0 and 8 (one more multiply-add). An odd
//! last block is a pair whose second half is zero. The order of operations does not depend on
//! the number of tokens or rows in a tile, so a token's result is the same alone and batched;
//! it differs from the scalar and AVX2 order (sixteen partial sums reduced at the end), so
//! results agree with theirs to rounding, not bitwise.

// Register tiles index several accumulator arrays in lockstep (see avx2.rs).
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2_quant::{block_bytes, XRow, Q4_1, Q8_0};
use crate::quant::BLOCK;

/// `[a; 8] ++ [b; 8]`.
#[inline(always)]
unsafe fn halves(a: f32, b: f32) -> __m512 {
    _mm512_insertf32x8::<1>(_mm512_set1_ps(a), _mm256_set1_ps(b))
}

/// Dot products of `NR` weight rows (`nb` blocks of format `T` each) with `MR` activation
/// rows: `out[r][i]`, as `avx2_quant::tile` computes them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn tile<const T: u8, const NR: usize, const MR: usize>(
    w: &[*const u8; NR],
    nb: usize,
    xs: &[XRow; MR],
) -> [[f32; MR]; NR] {
    let bb = block_bytes(T);
    let qs_at = if T == Q4_1 { 4 } else { 2 };
    let low4 = _mm512_set1_epi8(15);
    // the high nibbles of the second and fourth 128-bit lanes: shift those 64-bit lanes by 4
    let nib_shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    let sign = _mm512_set1_epi8(-128);
    // lanes 0-7 from element 0, 8-15 from element 2 (of [d0, m0, d1, m1]), and from 1 and 3
    let pick_d = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    let pick_m = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    // the Q4 offset terms enter each accumulator through lanes 0 and 8 only
    let first_lanes: __mmask16 = 0x0101;
    let mut acc = [[_mm512_setzero_ps(); MR]; NR];
    let mut b = 0;
    while b < nb {
        let two = b + 1 < nb;
        // weights: 64 bytes (or 32 and zeros), their scales, and the Q4 offset coefficients
        let mut wv = [_mm512_setzero_si512(); NR];
        let mut start = [_mm512_setzero_si512(); NR];
        let mut dwv = [_mm512_setzero_ps(); NR];
        let mut cwv = [_mm512_setzero_ps(); NR];
        for r in 0..NR {
            let b0 = w[r].add(b * bb);
            let b1 = b0.add(bb);
            _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(8 * bb) as *const i8);
            // [d0, m0, d1, m1] as f16 (m only in Q4_1), converted at once
            let head = |p: *const u8| {
                if T == Q4_1 {
                    (p as *const i32).read_unaligned()
                } else {
                    (p as *const u16).read_unaligned() as i32
                }
            };
            let h1 = if two { head(b1) } else { 0 };
            let scales = _mm_cvtph_ps(_mm_set_epi32(0, 0, h1, head(b0)));
            let scales = _mm512_castps128_ps512(scales);
            dwv[r] = _mm512_permutexvar_ps(pick_d, scales);
            if T == Q8_0 {
                let lo = _mm256_loadu_si256(b0.add(qs_at) as *const __m256i);
                let hi = if two {
                    _mm256_loadu_si256(b1.add(qs_at) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                wv[r] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                // -128 · Σ q_w per 4-byte group, the start of every token's dot product
                let plus = _mm512_dpbusd_epi32(_mm512_setzero_si512(), sign, wv[r]);
                start[r] = _mm512_sub_epi32(_mm512_setzero_si512(), plus);
            } else {
                let n0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(b0.add(qs_at) as *const _));
                let n1 = if two {
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(b1.add(qs_at) as *const _))
                } else {
                    _mm256_setzero_si256()
                };
                let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(n0), n1);
                wv[r] = _mm512_and_si512(_mm512_srlv_epi64(both, nib_shift), low4);
                cwv[r] = if T == Q4_1 {
                    _mm512_permutexvar_ps(pick_m, scales)
                } else {
                    _mm512_mul_ps(dwv[r], _mm512_set1_ps(-8.0))
                };
            }
        }
        for i in 0..MR {
            let xp = xs[i].q.add(b * BLOCK);
            let x = if two {
                _mm512_loadu_si512(xp as *const _)
            } else {
                _mm512_zextsi256_si512(_mm256_loadu_si256(xp as *const __m256i))
            };
            let dx0 = *xs[i].d.add(b);
            let dx1 = if two { *xs[i].d.add(b + 1) } else { 0.0 };
            let dxv = halves(dx0, dx1);
            let xu = if T == Q8_0 {
                _mm512_xor_si512(x, sign)
            } else {
                x
            };
            // d_x · Σ q_x of each block in lanes 0 and 8, zeros elsewhere
            let dsv = if T == Q8_0 {
                _mm512_setzero_ps()
            } else {
                let s1 = if two { *xs[i].ds.add(b + 1) } else { 0.0 };
                _mm512_maskz_mov_ps(first_lanes, halves(*xs[i].ds.add(b), s1))
            };
            for r in 0..NR {
                let isum = if T == Q8_0 {
                    _mm512_dpbusd_epi32(start[r], xu, wv[r])
                } else {
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], x)
                };
                acc[r][i] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(dwv[r], dxv),
                    acc[r][i],
                );
                if T != Q8_0 {
                    acc[r][i] = _mm512_fmadd_ps(cwv[r], dsv, acc[r][i]);
                }
            }
        }
        b += 2;
    }
    let mut out = [[0.0f32; MR]; NR];
    for r in 0..NR {
        for i in 0..MR {
            out[r][i] = _mm512_reduce_add_ps(acc[r][i]);
        }
    }
    out
}
