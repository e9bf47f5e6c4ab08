//! Products of bf16 weights with activations rounded to bf16 (`--dtype bfloat16`), the way
//! llama.cpp, SGLang and vLLM multiply bf16 models: on CPUs with AVX-512 BF16 one
//! `vdpbf16ps` does 32 multiply-adds (twice an f32 FMA's) and the activations are half the
//! bytes; elsewhere the same operations in f32 FMAs.
//!
//! Canonical order (every path below and the scalar twin in `mod.rs`, so their results are
//! bit-for-bit the same on every CPU and for every batch): sixteen f32 lanes and two
//! accumulators over blocks of 64 values (the first 32 into the first, the next 32 into the
//! second; a trailing 32-value block into the first). Lane `l` of an accumulator adds, per
//! 32-value block, the product of the values at `2l + 1`, then at `2l` (as `vdpbf16ps` does:
//! the product of two bf16 values is exact in f32, each addition rounds to nearest even).
//! Then the sum of the two accumulators, lanes halved as 8, 4, 2, 1 (`l + 8`, `l + 4`, ...),
//! then the values past the last whole block one by one.

// the canonical total of eight lanes (halves 4, 2, 1), as the f32 kernels take it
use super::avx2::hsum as hsum8;
use super::{OutPtr, STREAM_BATCH_TOKENS, STREAM_MAX_TOKENS};
use std::arch::x86_64::*;

/// One implementation of the 32-value step.
pub(super) trait Pairs {
    type A: Copy;
    unsafe fn zero() -> Self::A;
    /// `acc` plus the products of `x[0..32]` and `w[0..32]` in the canonical order.
    unsafe fn dp(acc: Self::A, x: *const u16, w: *const u16) -> Self::A;
    /// The canonical total of two accumulators.
    unsafe fn sum(a0: Self::A, a1: Self::A) -> f32;
    /// The canonical totals of eight pairs of accumulators (a tile's epilogue).
    #[inline(always)]
    unsafe fn sum8(a0: &[Self::A; 8], a1: &[Self::A; 8]) -> [f32; 8] {
        std::array::from_fn(|j| Self::sum(a0[j], a1[j]))
    }
}

/// AVX-512 BF16: `vdpbf16ps`.
pub(super) struct Native;

/// The 512-bit implementations' accumulators: zero, and the canonical totals.
macro_rules! zmm_sums {
    () => {
        type A = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn sum(a0: __m512, a1: __m512) -> f32 {
            sum16(_mm512_add_ps(a0, a1))
        }
        #[inline(always)]
        unsafe fn sum8(a0: &[__m512; 8], a1: &[__m512; 8]) -> [f32; 8] {
            sum8_512(a0, a1)
        }
    };
}

impl Pairs for Native {
    zmm_sums!();
    #[inline(always)]
    unsafe fn dp(acc: __m512, x: *const u16, w: *const u16) -> __m512 {
        let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x as *const _));
        let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(w as *const _));
        _mm512_dpbf16_ps(acc, xv, wv)
    }
}

/// Eight canonical totals of sixteen lanes at once: the same additions as [`sum16`] on each
/// (halves 8, 4, 2, 1; IEEE addition commutes), with the lanes of different totals shuffled
/// side by side so that each addition serves two, four or eight of them.
#[inline(always)]
unsafe fn sum8_512(a0: &[__m512; 8], a1: &[__m512; 8]) -> [f32; 8] {
    let s: [__m512; 8] = std::array::from_fn(|j| _mm512_add_ps(a0[j], a1[j]));
    // halves of 8: totals j and j + 1 side by side (lanes 0-7 and 8-15)
    let p: [__m512; 4] = std::array::from_fn(|j| {
        let (a, b) = (s[2 * j], s[2 * j + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // halves of 4: one total per 128-bit quarter (totals 0-3, then 4-7)
    let q: [__m512; 2] = std::array::from_fn(|j| {
        let (a, b) = (p[2 * j], p[2 * j + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // halves of 2: quarter j holds total j in lanes 0-1 and total j + 4 in lanes 2-3
    let r = _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(q[0], q[1]),
        _mm512_shuffle_ps::<0xEE>(q[0], q[1]),
    );
    // halves of 1: quarter j lane 0 = total j, lane 1 = total j + 4
    let t = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(r, r),
        _mm512_shuffle_ps::<0xDD>(r, r),
    );
    let mut v = [0.0f32; 16];
    _mm512_storeu_ps(v.as_mut_ptr(), t);
    std::array::from_fn(|j| v[4 * (j % 4) + j / 4])
}

#[inline(always)]
unsafe fn sum16(s: __m512) -> f32 {
    hsum8(_mm256_add_ps(
        _mm512_castps512_ps256(s),
        _mm512_extractf32x8_ps::<1>(s),
    ))
}

/// AVX-512 F without BF16: the odd and even values widened (a mask and a shift) and two FMAs.
pub(super) struct Emu512;

impl Pairs for Emu512 {
    zmm_sums!();
    #[inline(always)]
    unsafe fn dp(acc: __m512, x: *const u16, w: *const u16) -> __m512 {
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let xv = _mm512_loadu_si512(x as *const _);
        let wv = _mm512_loadu_si512(w as *const _);
        let odd = |v: __m512i| _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        let even = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
        let acc = _mm512_fmadd_ps(odd(xv), odd(wv), acc);
        _mm512_fmadd_ps(even(xv), even(wv), acc)
    }
}

/// AVX2 + FMA: sixteen lanes as two 8-lane halves.
pub(super) struct Emu256;

impl Pairs for Emu256 {
    type A = [__m256; 2];
    #[inline(always)]
    unsafe fn zero() -> [__m256; 2] {
        [_mm256_setzero_ps(); 2]
    }
    #[inline(always)]
    unsafe fn dp(acc: [__m256; 2], x: *const u16, w: *const u16) -> [__m256; 2] {
        let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let odd = |v: __m256i| _mm256_castsi256_ps(_mm256_and_si256(v, hi));
        let even = |v: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
        let mut out = acc;
        for (h, o) in out.iter_mut().enumerate() {
            let xv = _mm256_loadu_si256(x.add(16 * h) as *const __m256i);
            let wv = _mm256_loadu_si256(w.add(16 * h) as *const __m256i);
            *o = _mm256_fmadd_ps(odd(xv), odd(wv), *o);
            *o = _mm256_fmadd_ps(even(xv), even(wv), *o);
        }
        out
    }
    #[inline(always)]
    unsafe fn sum(a0: [__m256; 2], a1: [__m256; 2]) -> f32 {
        hsum8(_mm256_add_ps(
            _mm256_add_ps(a0[0], a1[0]),
            _mm256_add_ps(a0[1], a1[1]),
        ))
    }
}

/// The canonical dot product's vector part ends at `kk`; the rest one value at a time.
#[inline(always)]
unsafe fn finish(s: f32, x: *const u16, w: *const u16, kk: usize, k: usize) -> f32 {
    let f = |b: u16| f32::from_bits((b as u32) << 16);
    let mut s = s;
    for t in kk..k {
        s += f(*x.add(t)) * f(*w.add(t));
    }
    s
}

/// How far ahead of the one-row kernel the weights are prefetched.
const PREFETCH_BYTES: usize = 2048;

/// Dot products of one weight row with MR rows of x (decode: each weight byte read once).
#[inline(always)]
unsafe fn stream_row<P: Pairs, const MR: usize>(
    x: *const u16,
    k: usize,
    w: *const u16,
    res: &mut [f32; STREAM_MAX_TOKENS],
) {
    let mut a0 = [P::zero(); MR];
    let mut a1 = [P::zero(); MR];
    let mut kk = 0;
    while kk + 64 <= k {
        let pf = (w.add(kk) as *const i8).add(PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(pf);
        _mm_prefetch::<_MM_HINT_T0>(pf.add(64));
        for i in 0..MR {
            a0[i] = P::dp(a0[i], x.add(i * k + kk), w.add(kk));
            a1[i] = P::dp(a1[i], x.add(i * k + kk + 32), w.add(kk + 32));
        }
        kk += 64;
    }
    if kk + 32 <= k {
        for a in a0.iter_mut().enumerate() {
            *a.1 = P::dp(*a.1, x.add(a.0 * k + kk), w.add(kk));
        }
        kk += 32;
    }
    for i in 0..MR {
        res[i] = finish(P::sum(a0[i], a1[i]), x.add(i * k), w, kk, k);
    }
}

#[inline(always)]
unsafe fn stream_dispatch<P: Pairs>(
    m: usize,
    x: *const u16,
    k: usize,
    w: *const u16,
    res: &mut [f32; STREAM_MAX_TOKENS],
) {
    match m {
        1 => stream_row::<P, 1>(x, k, w, res),
        2 => stream_row::<P, 2>(x, k, w, res),
        3 => stream_row::<P, 3>(x, k, w, res),
        _ => stream_row::<P, 4>(x, k, w, res),
    }
}

/// Weight rows per tile of the many-token kernel, and tokens.
const TILE_NR: usize = 2;
const TILE_MR: usize = 4;
// a tile's SwiGLU and totals take its eight values at once, and `tile_dispatch` goes to 4
const _: () = assert!(TILE_NR * TILE_MR == 8 && TILE_MR == 4);
/// Tokens per block of the many-token kernel: 48 rows of bf16 x at k <= 4096 stay in L2
/// while the thread's weight rows pass over them, each tile's rows from L1.
const TOKEN_BLOCK: usize = 48;

/// Dot products of MR rows of x with NR consecutive weight rows (row stride k), read in
/// place, into `res[i][r]`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // accumulators indexed in lockstep
unsafe fn tile<P: Pairs, const MR: usize, const NR: usize>(
    x: *const u16,
    k: usize,
    w: *const u16,
    res: &mut [[f32; TILE_NR]; TILE_MR],
) {
    let mut a0 = [[P::zero(); NR]; MR];
    let mut a1 = [[P::zero(); NR]; MR];
    let mut kk = 0;
    while kk + 64 <= k {
        for r in 0..NR {
            for i in 0..MR {
                a0[i][r] = P::dp(a0[i][r], x.add(i * k + kk), w.add(r * k + kk));
                a1[i][r] = P::dp(a1[i][r], x.add(i * k + kk + 32), w.add(r * k + kk + 32));
            }
        }
        kk += 64;
    }
    if kk + 32 <= k {
        for r in 0..NR {
            for i in 0..MR {
                a0[i][r] = P::dp(a0[i][r], x.add(i * k + kk), w.add(r * k + kk));
            }
        }
        kk += 32;
    }
    if MR * NR == 8 {
        let flat =
            |a: &[[P::A; NR]; MR]| -> [P::A; 8] { std::array::from_fn(|j| a[j / NR][j % NR]) };
        let s = P::sum8(&flat(&a0), &flat(&a1));
        for i in 0..MR {
            for r in 0..NR {
                res[i][r] = finish(s[i * NR + r], x.add(i * k), w.add(r * k), kk, k);
            }
        }
        return;
    }
    for i in 0..MR {
        for r in 0..NR {
            let s = P::sum(a0[i][r], a1[i][r]);
            res[i][r] = finish(s, x.add(i * k), w.add(r * k), kk, k);
        }
    }
}

#[inline(always)]
unsafe fn tile_dispatch<P: Pairs, const NR: usize>(
    mr: usize,
    x: *const u16,
    k: usize,
    w: *const u16,
    res: &mut [[f32; TILE_NR]; TILE_MR],
) {
    match mr {
        1 => tile::<P, 1, NR>(x, k, w, res),
        2 => tile::<P, 2, NR>(x, k, w, res),
        3 => tile::<P, 3, NR>(x, k, w, res),
        _ => tile::<P, 4, NR>(x, k, w, res),
    }
}

/// `g = silu(g) * u` on eight values, one formula per value (see `silu_mul8`). A function,
/// not a closure: closures do not inherit the caller's `#[target_feature]`.
#[inline(always)]
unsafe fn swiglu8(g: &mut [f32; 8], u: &[f32; 8]) {
    let v = super::avx2::silu_mul8(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
    _mm256_storeu_ps(g.as_mut_ptr(), v);
}

/// Rows `rows` of `out = x · wᵀ` (and SwiGLU with `up`) for bf16 `x` (m × k) and bf16 `w`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_with<P: Pairs>(
    x: *const u16,
    m: usize,
    k: usize,
    w: *const u16,
    up: Option<*const u16>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    let o = out.get();
    let swiglu = up.is_some();
    if m <= STREAM_BATCH_TOKENS {
        for r in rows {
            let mut i0 = 0;
            while i0 < m {
                let mr = STREAM_MAX_TOKENS.min(m - i0);
                let xi = x.add(i0 * k);
                let mut g = [0.0f32; STREAM_MAX_TOKENS];
                let mut u = [0.0f32; STREAM_MAX_TOKENS];
                stream_dispatch::<P>(mr, xi, k, w.add(r * k), &mut g);
                if let Some(up) = up {
                    stream_dispatch::<P>(mr, xi, k, up.add(r * k), &mut u);
                }
                let mut gs = [0.0f32; 8];
                let mut us = [0.0f32; 8];
                gs[..mr].copy_from_slice(&g[..mr]);
                us[..mr].copy_from_slice(&u[..mr]);
                if swiglu {
                    swiglu8(&mut gs, &us);
                }
                for (i, &v) in gs[..mr].iter().enumerate() {
                    *o.add((i0 + i) * ldo + r) = v;
                }
                i0 += mr;
            }
        }
        return;
    }
    let mut m0 = 0;
    while m0 < m {
        let mb = TOKEN_BLOCK.min(m - m0);
        let mut r = rows.start;
        while r < rows.end {
            let nr = if r + TILE_NR <= rows.end { TILE_NR } else { 1 };
            let mut i = m0;
            while i < m0 + mb {
                let mr = TILE_MR.min(m0 + mb - i);
                let xi = x.add(i * k);
                let mut g = [[0.0f32; TILE_NR]; TILE_MR];
                let mut u = [[0.0f32; TILE_NR]; TILE_MR];
                for (mat, res) in std::iter::once(w).chain(up).zip([&mut g, &mut u]) {
                    match nr {
                        TILE_NR => tile_dispatch::<P, TILE_NR>(mr, xi, k, mat.add(r * k), res),
                        _ => tile_dispatch::<P, 1>(mr, xi, k, mat.add(r * k), res),
                    }
                }
                let mut gs: [f32; 8] = std::array::from_fn(|j| g[j / TILE_NR][j % TILE_NR]);
                let us: [f32; 8] = std::array::from_fn(|j| u[j / TILE_NR][j % TILE_NR]);
                if swiglu {
                    swiglu8(&mut gs, &us);
                }
                for ii in 0..mr {
                    for rr in 0..nr {
                        *o.add((i + ii) * ldo + r + rr) = gs[ii * TILE_NR + rr];
                    }
                }
                i += mr;
            }
            r += nr;
        }
        m0 += mb;
    }
}

macro_rules! entry {
    ($name:ident, $p:ty, $features:literal) => {
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $name(
            x: *const u16,
            m: usize,
            k: usize,
            w: *const u16,
            up: Option<*const u16>,
            rows: std::ops::Range<usize>,
            out: OutPtr,
            ldo: usize,
        ) {
            rows_with::<$p>(x, m, k, w, up, rows, out, ldo)
        }
    };
}

entry!(rows_native, Native, "avx512f,avx512bf16,avx512dq,avx2,fma");
entry!(rows_emu512, Emu512, "avx512f,avx512dq,avx2,fma");
entry!(rows_emu256, Emu256, "avx2,fma");

/// f32 -> bf16 as `vcvtneps2bf16` rounds (see `super::to_bf16`), sixteen at a time.
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
pub(super) unsafe fn convert_native(src: &[f32], dst: &mut [u16]) {
    let n = src.len() - src.len() % 16;
    let mut i = 0;
    while i < n {
        let v: __m256i =
            std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i))));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, v);
        i += 16;
    }
    for j in n..src.len() {
        dst[j] = super::to_bf16(src[j]);
    }
}

/// The same rounding in AVX2 integer operations, eight at a time.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn convert_avx2(src: &[f32], dst: &mut [u16]) {
    let n = src.len() - src.len() % 8;
    let exp = _mm256_set1_epi32(0x7F80_0000);
    let abs = _mm256_set1_epi32(0x7FFF_FFFF);
    let one = _mm256_set1_epi32(1);
    let bias = _mm256_set1_epi32(0x7FFF);
    let sign = _mm256_set1_epi32(0x8000_0000u32 as i32);
    let quiet = _mm256_set1_epi32(0x0040_0000);
    let mut i = 0;
    while i < n {
        let b = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
        // round to nearest even
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), one);
        let rounded = _mm256_add_epi32(b, _mm256_add_epi32(bias, lsb));
        // NaN: truncated, quiet bit set; zero or denormal: signed zero
        let nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, abs), exp);
        let tiny = _mm256_cmpeq_epi32(_mm256_and_si256(b, exp), _mm256_setzero_si256());
        let r = _mm256_blendv_epi8(rounded, _mm256_or_si256(b, quiet), nan);
        let r = _mm256_blendv_epi8(r, _mm256_and_si256(b, sign), tiny);
        let r = _mm256_srli_epi32::<16>(r);
        // 8 x u32 -> 8 x u16 (values fit in 16 bits)
        let packed = _mm256_packus_epi32(r, r);
        let lo = _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed));
        _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, lo);
        i += 8;
    }
    for j in n..src.len() {
        dst[j] = super::to_bf16(src[j]);
    }
}
