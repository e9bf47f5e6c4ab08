//! The float matrix products behind `Isa::Avx512`: the register tiles of `avx2.rs` with
//! 16-lane vectors (twice the multiply-adds per instruction for prefill, half the loop
//! overhead for decode). Same canonical summation order at width 16, so a token's result is
//! the same alone and batched; it differs from the 8-lane order only by f32 rounding.

use super::avx2::{rows_with, Bf16, Lanes, LoadW, F16};
use super::{Elems, OutPtr};
use std::arch::x86_64::*;

/// AVX-512 F: 16 lanes.
pub(super) struct Avx512;

impl Lanes for Avx512 {
    type V = __m512;
    const W: usize = 16;
    const PANEL_MR: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
}

impl LoadW<Avx512> for Bf16 {
    #[inline(always)]
    unsafe fn load_w(p: *const Self) -> __m512 {
        let v = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }
}
impl LoadW<Avx512> for F16 {
    #[inline(always)]
    unsafe fn load_w(p: *const Self) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}
impl LoadW<Avx512> for f32 {
    #[inline(always)]
    unsafe fn load_w(p: *const Self) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: Elems<'_>,
    up: Option<Elems<'_>>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
    panel: &mut Vec<f32>,
) {
    rows_with::<Avx512>(x, m, k, w, up, rows, out, ldo, panel)
}
