//! AVX-512 VNNI products of quantized weight rows (every format: Q8_0/Q4_0/Q4_1/Q5_0 in
//! `tile`, Q4_K/Q6_K in `tile_k`, rows unpacked for prefill in `tile_unpacked`) with
//! activations quantized to Q8 blocks (`crate::quant`), two pieces of 32 values per 512-bit
//! register.
//!
//! Per pair of pieces: the weights' 64 values as unsigned bytes (nibbles and high bits
//! unpacked once for up to `MR` tokens), one `vpdpbusd` per (row, token) to sixteen i32
//! partial sums (lanes 0-7 the first piece, 8-15 the second), converted and accumulated in f32
//! with a vector holding each lane's weight scale times its block's activation scale.
//! `vpdpbusd` multiplies unsigned by signed bytes, so the formats whose weights have a fixed
//! offset (Q8_0's sign bit flipped: `q + 128`; Q4_0's `q − 8`, Q5_0's `q − 16`, Q6_K's
//! `q − 32`) start each sum at `− offset · Σ q_x`, computed once per token and pair from the
//! activations; the integer sums are then exact (no saturation, unlike AVX2's `maddubs`). Q6_K's
//! i8 scales (one per 16 values, four lanes each) are part of the lane scales. The offset
//! terms of Q4_1 and Q4_K (`c` of `crate::quant::sub_block` times the activation block's
//! `d · Σ q`) enter the same accumulator through lanes 0 and 8 (one more multiply-add). An odd
//! last block is a pair whose second half is zero.
//!
//! The order of operations does not depend on the number of tokens or rows in a tile, and the
//! unpacked kernel performs the packed kernels' operations on the same values, so a token's
//! result is the same alone and batched; it differs from the scalar and AVX2 order (sixteen
//! partial sums reduced at the end), so results agree with theirs to rounding, not bitwise.

// Register tiles index several accumulator arrays in lockstep (see avx2.rs).
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2_quant::{
    block_bytes, k4_scales, Unpacked, XRow, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0,
};
use crate::quant::BLOCK;

/// 32 bytes at `p`, and 32 at `q` when `two` (else zeros), as one register.
#[inline(always)]
unsafe fn two_halves(p: *const u8, q: *const u8, two: bool) -> __m512i {
    let lo = _mm512_castsi256_si512(_mm256_loadu_si256(p as *const __m256i));
    if two {
        _mm512_inserti64x4::<1>(lo, _mm256_loadu_si256(q as *const __m256i))
    } else {
        _mm512_zextsi256_si512(_mm512_castsi512_si256(lo))
    }
}

/// A pair of pieces of one weight row, ready for the products: the 64 weights as unsigned
/// bytes, each lane's weight scale, and (Q4_1, Q4_K) the offset coefficients `c` of the two
/// pieces (in lanes 0-7 and 8-15).
#[derive(Clone, Copy)]
struct Pair {
    w: __m512i,
    a: __m512,
    c: __m512,
}

/// A pair of zeros (all-zero bits are 0 in every lane type; the intrinsics are not `const`).
const EMPTY: Pair = Pair {
    w: unsafe { std::mem::transmute::<[u8; 64], __m512i>([0; 64]) },
    a: unsafe { std::mem::transmute::<[f32; 16], __m512>([0.0; 16]) },
    c: unsafe { std::mem::transmute::<[f32; 16], __m512>([0.0; 16]) },
};

/// The fixed offset of format `T`'s unsigned weight bytes (0: none, an offset term instead).
const fn weight_offset(t: u8) -> i8 {
    match t {
        Q8_0 => -128,
        Q4_0 => 8,
        Q5_0 => 16,
        Q6_K => 32,
        _ => 0,
    }
}

/// `[p[b]; 8] ++ [p[b + 1]; 8]` (zeros for the second unless `two`), with `lanes` the lanes
/// kept (the others zero).
#[inline(always)]
unsafe fn pair_at(p: *const f32, b: usize, two: bool, lanes: __mmask16) -> __m512 {
    let v = if two {
        _mm_castpd_ps(_mm_load_sd(p.add(b) as *const f64))
    } else {
        _mm_load_ss(p.add(b))
    };
    let pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_maskz_permutexvar_ps(lanes, pick, _mm512_castps128_ps512(v))
}

/// The products of pieces `b` and `b + 1` (only `b` unless `two`) of `NR` weight rows (`w`)
/// with `MR` activation rows, added to `acc`. `T`, the weights' format, chooses how their
/// offset enters: at the start of the integer sums, or as an offset term.
#[inline(always)]
unsafe fn step<const T: u8, const NR: usize, const MR: usize>(
    acc: &mut [[__m512; MR]; NR],
    w: &[Pair; NR],
    xs: &[XRow; MR],
    b: usize,
    two: bool,
) {
    let off = weight_offset(T);
    for i in 0..MR {
        let xp = xs[i].q.add(b * BLOCK);
        let x = if two {
            _mm512_loadu_si512(xp as *const _)
        } else {
            _mm512_zextsi256_si512(_mm256_loadu_si256(xp as *const __m256i))
        };
        let dxv = pair_at(xs[i].d, b, two, !0);
        // −offset · Σ q_x per 4-byte group, the start of every row's dot product
        let start = if off != 0 {
            let plus = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(off), x);
            _mm512_sub_epi32(_mm512_setzero_si512(), plus)
        } else {
            _mm512_setzero_si512()
        };
        // otherwise d_x · Σ q_x of each block in lanes 0 and 8, zeros elsewhere
        let dsv = if off == 0 {
            pair_at(xs[i].ds, b, two, 0x0101)
        } else {
            _mm512_setzero_ps()
        };
        for r in 0..NR {
            let isum = _mm512_dpbusd_epi32(start, w[r].w, x);
            acc[r][i] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(isum),
                _mm512_mul_ps(w[r].a, dxv),
                acc[r][i],
            );
            if off == 0 {
                acc[r][i] = _mm512_fmadd_ps(w[r].c, dsv, acc[r][i]);
            }
        }
    }
}

/// `f(b, two)` for every pair of the `nb` pieces in order.
#[inline(always)]
fn pairs(nb: usize, mut f: impl FnMut(usize, bool)) {
    let full = nb / 2 * 2;
    for b in (0..full).step_by(2) {
        f(b, true);
    }
    if full < nb {
        f(full, false);
    }
}

/// The accumulators' horizontal sums.
#[inline(always)]
unsafe fn reduce<const NR: usize, const MR: usize>(acc: &[[__m512; MR]; NR]) -> [[f32; MR]; NR] {
    let mut out = [[0.0f32; MR]; NR];
    for r in 0..NR {
        for i in 0..MR {
            out[r][i] = _mm512_reduce_add_ps(acc[r][i]);
        }
    }
    out
}

/// Blocks `b` and `b + 1` (only `b` unless `two`) of a Q8_0/Q4_0/Q4_1/Q5_0 row at `row`.
#[inline(always)]
unsafe fn block_pair<const T: u8>(row: *const u8, b: usize, two: bool, ahead: usize) -> Pair {
    let bb = block_bytes(T);
    let qs_at = match T {
        Q4_1 => 4,
        Q5_0 => 6,
        _ => 2,
    };
    let b0 = row.add(b * bb);
    let b1 = b0.add(bb);
    _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(ahead) as *const i8);
    // lanes 0-7 from element 0, 8-15 from element 2 (of [d0, m0, d1, m1]), and from 1 and 3
    let pick_d = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    let pick_m = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    // [d0, m0, d1, m1] as f16 (m only in Q4_1), converted at once
    let head = |p: *const u8| {
        if T == Q4_1 {
            (p as *const i32).read_unaligned()
        } else {
            (p as *const u16).read_unaligned() as i32
        }
    };
    let h1 = if two { head(b1) } else { 0 };
    let scales = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, h1, head(b0))));
    let a = _mm512_permutexvar_ps(pick_d, scales);
    if T == Q8_0 {
        // the signed weights as unsigned bytes: q + 128
        let w = two_halves(b0.add(qs_at), b1.add(qs_at), two);
        let w = _mm512_xor_si512(w, _mm512_set1_epi8(-128));
        return Pair { w, a, ..EMPTY };
    }
    let n0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(b0.add(qs_at) as *const _));
    let n1 = if two {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(b1.add(qs_at) as *const _))
    } else {
        _mm256_setzero_si256()
    };
    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(n0), n1);
    // the high nibbles of the second and fourth 128-bit lanes: shift those 64-bit lanes by 4
    let nib_shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    let mut w = _mm512_and_si512(_mm512_srlv_epi64(both, nib_shift), _mm512_set1_epi8(15));
    if T == Q5_0 {
        // byte j of each block is its value j: qh's bit j adds 16
        let qh = |p: *const u8| (p.add(2) as *const u32).read_unaligned() as u64;
        let high = qh(b0) | if two { qh(b1) << 32 } else { 0 };
        w = _mm512_mask_add_epi8(w, high, w, _mm512_set1_epi8(16));
    }
    let c = if T == Q4_1 {
        _mm512_permutexvar_ps(pick_m, scales)
    } else {
        _mm512_setzero_ps()
    };
    Pair { w, a, c }
}

/// Dot products of `NR` Q8_0/Q4_0/Q4_1/Q5_0 weight rows (`nb` blocks of format `T` each) with
/// `MR` activation rows: `out[r][i]`, as `avx2_quant::tile` computes them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn tile<const T: u8, const NR: usize, const MR: usize>(
    w: &[*const u8; NR],
    nb: usize,
    xs: &[XRow; MR],
) -> [[f32; MR]; NR] {
    // the same place in the rows of the next tile (rows are consecutive in memory)
    let ahead = NR * nb * block_bytes(T);
    let mut acc = [[_mm512_setzero_ps(); MR]; NR];
    let mut ws = [EMPTY; NR];
    pairs(nb, |b, two| {
        for r in 0..NR {
            ws[r] = block_pair::<T>(w[r], b, two, ahead);
        }
        step::<T, NR, MR>(&mut acc, &ws, xs, b, two);
    });
    reduce(&acc)
}

/// Dot products of `NR` Q4_K or Q6_K weight rows (`nb / 8` super-blocks each) with `MR`
/// activation rows (`nb` blocks of 32): `out[r][i]`, the pieces of 32 in order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn tile_k<const T: u8, const NR: usize, const MR: usize>(
    w: &[*const u8; NR],
    nb: usize,
    xs: &[XRow; MR],
) -> [[f32; MR]; NR] {
    const SUBS: usize = 8;
    let bb = block_bytes(T);
    let low4 = _mm512_set1_epi8(15);
    let three = _mm512_set1_epi8(3);
    // Q4_K: the second piece of a pair is the high nibbles of the same 32 bytes
    let nib_shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    // Q6_K: four lanes per i8 scale
    let by_four = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let mut acc = [[_mm512_setzero_ps(); MR]; NR];
    // the same place in the rows of the next tile (rows are consecutive in memory)
    let ahead = NR * nb / SUBS * bb;
    let mut ws = [EMPTY; NR];
    for sb in 0..nb / SUBS {
        // Q4_K: per row the pieces' d · sc and −dmin · m
        let mut a = [[0.0f32; SUBS]; NR];
        let mut c = [[0.0f32; SUBS]; NR];
        if T == Q4_K {
            for r in 0..NR {
                (a[r], c[r]) = k4_scales(w[r].add(sb * bb));
            }
        }
        for q in 0..SUBS / 2 {
            for r in 0..NR {
                let blk = w[r].add(sb * bb);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(ahead + 64 * q) as *const i8);
                ws[r] = if T == Q4_K {
                    let bytes = _mm256_loadu_si256(blk.add(16 + 32 * q) as *const __m256i);
                    let both = _mm512_broadcast_i64x4(bytes);
                    Pair {
                        w: _mm512_and_si512(_mm512_srlv_epi64(both, nib_shift), low4),
                        a: pair_at(a[r].as_ptr(), 2 * q, true, !0),
                        c: pair_at(c[r].as_ptr(), 2 * q, true, !0),
                    }
                } else {
                    // pieces 2q and 2q + 1: half n = q / 2 of the block, groups g and g + 1
                    let (n, g) = (q / 2, 2 * (q % 2));
                    let ql = _mm512_loadu_si512(blk.add(64 * n) as *const _);
                    let ql = if g == 0 {
                        ql
                    } else {
                        _mm512_srli_epi16::<4>(ql)
                    };
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                    let g = g as i64;
                    let qh_shift = _mm512_set_epi64(
                        2 * g + 2,
                        2 * g + 2,
                        2 * g + 2,
                        2 * g + 2,
                        2 * g,
                        2 * g,
                        2 * g,
                        2 * g,
                    );
                    let qh = _mm512_srlv_epi64(_mm512_broadcast_i64x4(qh), qh_shift);
                    let hi = _mm512_slli_epi16::<4>(_mm512_and_si512(qh, three));
                    let sc = (blk.add(192 + 4 * q) as *const i32).read_unaligned();
                    let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_cvtsi32_si128(sc)));
                    let d = _mm512_set1_ps(f16_scalar(blk.add(208)));
                    Pair {
                        w: _mm512_or_si512(_mm512_and_si512(ql, low4), hi),
                        a: _mm512_mul_ps(_mm512_permutexvar_ps(by_four, sc), d),
                        ..EMPTY
                    }
                };
            }
            step::<T, NR, MR>(&mut acc, &ws, xs, sb * SUBS + 2 * q, true);
        }
    }
    reduce(&acc)
}

/// [`tile`] and [`tile_k`] over rows of format `T` (Q4_0/Q4_1/Q5_0/Q4_K) that
/// `avx2_quant::unpack_row` unpacked: the same operations on the same values, so the same bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn tile_unpacked<const T: u8, const NR: usize, const MR: usize>(
    w: &[Unpacked; NR],
    nb: usize,
    xs: &[XRow; MR],
) -> [[f32; MR]; NR] {
    let mut acc = [[_mm512_setzero_ps(); MR]; NR];
    let mut ws = [EMPTY; NR];
    pairs(nb, |b, two| {
        for r in 0..NR {
            let u = &w[r];
            ws[r] = Pair {
                w: two_halves(u.q.add(b * BLOCK), u.q.add((b + 1) * BLOCK), two),
                a: pair_at(u.a, b, two, !0),
                c: if weight_offset(T) == 0 {
                    pair_at(u.c, b, two, !0)
                } else {
                    _mm512_setzero_ps()
                },
            };
        }
        step::<T, NR, MR>(&mut acc, &ws, xs, b, two);
    });
    reduce(&acc)
}

#[inline(always)]
unsafe fn f16_scalar(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        (p as *const u16).read_unaligned() as i32,
    )))
}
