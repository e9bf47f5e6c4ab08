//! The AVX2 + FMA + F16C kernels behind `Isa::Avx2`: register tiles for the matrix
//! products (weights converted to f32 as they stream, or once into a panel), generic over the
//! vector width so that `avx512.rs` reuses them with 16 lanes, and the vector dot product and
//! scaled add of attention. Each has its scalar twin in the
//! parent module, which the tests compare it against.

// Register tiles index several accumulator arrays in lockstep; plain index loops read best
// and unroll fully (the bounds are constants).
#![allow(clippy::needless_range_loop)]

use super::*;
use std::arch::x86_64::*;

/// A vector of `W` f32 lanes and the operations the tiles need: AVX2's 8 lanes here,
/// AVX-512's 16 in `avx512.rs`. The tiles below are generic over it and inlined into the
/// entry point of each instruction set, which enables its features.
pub(super) trait Lanes {
    type V: Copy;
    /// f32 lanes per vector.
    const W: usize;
    /// Tokens per register tile of the panel path (at most 4).
    const PANEL_MR: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
}

/// A weight element type: read one as f32, or `L::W` consecutive ones as a vector.
pub(super) trait Weight: Copy {
    fn scalar(self) -> f32;
}
pub(super) trait LoadW<L: Lanes>: Weight {
    /// # Safety
    /// `p` must be valid for reading `L::W` elements; the lanes' features must be enabled.
    unsafe fn load_w(p: *const Self) -> L::V;
}

#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct Bf16(u16);
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct F16(u16);

impl Weight for Bf16 {
    #[inline(always)]
    fn scalar(self) -> f32 {
        bf16_to_f32(self.0)
    }
}
impl Weight for F16 {
    #[inline(always)]
    fn scalar(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
}
impl Weight for f32 {
    #[inline(always)]
    fn scalar(self) -> f32 {
        self
    }
}

/// AVX2 + FMA + F16C: 8 lanes.
pub(super) struct Avx2;

impl Lanes for Avx2 {
    type V = __m256;
    const W: usize = 8;
    const PANEL_MR: usize = 3;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        hsum(v)
    }
}

impl LoadW<Avx2> for Bf16 {
    #[inline(always)]
    unsafe fn load_w(p: *const Self) -> __m256 {
        let v = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }
}
impl LoadW<Avx2> for F16 {
    #[inline(always)]
    unsafe fn load_w(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}
impl LoadW<Avx2> for f32 {
    #[inline(always)]
    unsafe fn load_w(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

/// The sum of eight lanes: halves 4, 2, 1 (every f32 kernel's and the bf16-activation
/// kernels' canonical order).
#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

// Every dot product of x and a weight row, in every path below, is summed in one canonical
// order per lane width W: two W-lane accumulators over 2W-element blocks (lanes 0..W into the
// first, W..2W into the second), a trailing W-element block into the first, then
// hsum(first + second), then the scalar tail. The result for a token therefore does not
// depend on how many tokens share the step, which path ran, or how rows were split between
// threads: batching, chunking and the prefix cache leave the logits bit-for-bit unchanged.

/// Finishes a canonical dot product: `x` and `w` are the row starts, `kk` where the
/// vector part stopped.
#[inline(always)]
unsafe fn finish<L: Lanes, T: Weight>(
    a0: L::V,
    a1: L::V,
    x: *const f32,
    w: *const T,
    kk: usize,
    k: usize,
) -> f32 {
    let mut s = L::hsum(L::add(a0, a1));
    for t in kk..k {
        s += *x.add(t) * (*w.add(t)).scalar();
    }
    s
}

/// Dot products of one weight row with MR rows of x (row stride k), reading the row front
/// to back with a software prefetch ahead of it (the hardware prefetcher alone leaves
/// bandwidth unused). Used for decode: each weight byte is read once per step.
#[inline(always)]
unsafe fn stream_row<L: Lanes, T: LoadW<L>, const MR: usize>(
    x: *const f32,
    k: usize,
    w: *const T,
    res: &mut [f32; STREAM_MAX_TOKENS],
) {
    let wd = L::W;
    let mut a0 = [L::zero(); MR];
    let mut a1 = [L::zero(); MR];
    let lines = (2 * wd * std::mem::size_of::<T>()).div_ceil(64);
    let mut kk = 0;
    while kk + 2 * wd <= k {
        let pf = (w.add(kk) as *const i8).add(PREFETCH_BYTES);
        for l in 0..lines {
            _mm_prefetch::<_MM_HINT_T0>(pf.add(64 * l));
        }
        let w0 = T::load_w(w.add(kk));
        let w1 = T::load_w(w.add(kk + wd));
        for i in 0..MR {
            a0[i] = L::fmadd(w0, L::load(x.add(i * k + kk)), a0[i]);
            a1[i] = L::fmadd(w1, L::load(x.add(i * k + kk + wd)), a1[i]);
        }
        kk += 2 * wd;
    }
    if kk + wd <= k {
        let w0 = T::load_w(w.add(kk));
        for i in 0..MR {
            a0[i] = L::fmadd(w0, L::load(x.add(i * k + kk)), a0[i]);
        }
        kk += wd;
    }
    for i in 0..MR {
        res[i] = finish::<L, T>(a0[i], a1[i], x.add(i * k), w, kk, k);
    }
}

#[inline(always)]
unsafe fn stream_row_dispatch<L: Lanes, T: LoadW<L>>(
    m: usize,
    x: *const f32,
    k: usize,
    w: *const T,
    res: &mut [f32; STREAM_MAX_TOKENS],
) {
    match m {
        1 => stream_row::<L, T, 1>(x, k, w, res),
        2 => stream_row::<L, T, 2>(x, k, w, res),
        3 => stream_row::<L, T, 3>(x, k, w, res),
        _ => stream_row::<L, T, 4>(x, k, w, res),
    }
}

/// Dot products of MR rows of x with NR consecutive rows of an f32 panel (row stride k),
/// into `res[i][r]`. Register tile: MR x NR x 2 accumulators.
#[inline(always)]
unsafe fn panel_tile<L: Lanes, const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    res: &mut [[f32; 2]; 4],
) {
    let wd = L::W;
    let mut a0 = [[L::zero(); NR]; MR];
    let mut a1 = [[L::zero(); NR]; MR];
    let mut kk = 0;
    while kk + 2 * wd <= k {
        for r in 0..NR {
            let w0 = L::load(w.add(r * k + kk));
            let w1 = L::load(w.add(r * k + kk + wd));
            for i in 0..MR {
                a0[i][r] = L::fmadd(w0, L::load(x.add(i * k + kk)), a0[i][r]);
                a1[i][r] = L::fmadd(w1, L::load(x.add(i * k + kk + wd)), a1[i][r]);
            }
        }
        kk += 2 * wd;
    }
    if kk + wd <= k {
        for r in 0..NR {
            let w0 = L::load(w.add(r * k + kk));
            for i in 0..MR {
                a0[i][r] = L::fmadd(w0, L::load(x.add(i * k + kk)), a0[i][r]);
            }
        }
        kk += wd;
    }
    for i in 0..MR {
        for r in 0..NR {
            res[i][r] = finish::<L, f32>(a0[i][r], a1[i][r], x.add(i * k), w.add(r * k), kk, k);
        }
    }
}

/// One tile (runtime MR in 1..=L::PANEL_MR) of one or two (SwiGLU) panels, written to `out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn panel_tile_dispatch<L: Lanes, const NR: usize>(
    mr: usize,
    x: *const f32,
    k: usize,
    gate: *const f32,
    up: Option<*const f32>,
    out: *mut f32,
    ldo: usize,
) {
    let mut g = [[0.0f32; 2]; 4];
    let mut u = [[0.0f32; 2]; 4];
    // (a plain match, not a closure: closures do not inherit #[target_feature])
    match mr {
        1 => panel_tile::<L, 1, NR>(x, k, gate, &mut g),
        2 => panel_tile::<L, 2, NR>(x, k, gate, &mut g),
        3 => panel_tile::<L, 3, NR>(x, k, gate, &mut g),
        _ => panel_tile::<L, 4, NR>(x, k, gate, &mut g),
    }
    if let Some(up) = up {
        match mr {
            1 => panel_tile::<L, 1, NR>(x, k, up, &mut u),
            2 => panel_tile::<L, 2, NR>(x, k, up, &mut u),
            3 => panel_tile::<L, 3, NR>(x, k, up, &mut u),
            _ => panel_tile::<L, 4, NR>(x, k, up, &mut u),
        }
    }
    for i in 0..mr {
        for r in 0..NR {
            let v = if up.is_some() {
                silu(g[i][r]) * u[i][r]
            } else {
                g[i][r]
            };
            *out.add(i * ldo + r) = v;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_typed<L: Lanes, T: LoadW<L>>(
    x: &[f32],
    m: usize,
    k: usize,
    w: *const T,
    up: Option<*const T>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
    panel: &mut Vec<f32>,
) {
    let xp = x.as_ptr();
    if m <= STREAM_BATCH_TOKENS {
        // Decode: stream the weights once, row after row, converting inside the kernel;
        // groups of up to STREAM_MAX_TOKENS tokens re-read the row from L1.
        for r in rows {
            let mut i0 = 0;
            while i0 < m {
                let mr = STREAM_MAX_TOKENS.min(m - i0);
                let xi = xp.add(i0 * k);
                let mut g = [0.0f32; STREAM_MAX_TOKENS];
                let mut u = [0.0f32; STREAM_MAX_TOKENS];
                stream_row_dispatch::<L, T>(mr, xi, k, w.add(r * k), &mut g);
                if let Some(up) = up {
                    stream_row_dispatch::<L, T>(mr, xi, k, up.add(r * k), &mut u);
                }
                for i in 0..mr {
                    let v = if up.is_some() {
                        silu(g[i]) * u[i]
                    } else {
                        g[i]
                    };
                    *out.0.add((i0 + i) * ldo + r) = v;
                }
                i0 += mr;
            }
        }
        return;
    }
    // Many tokens: convert PANEL_ROWS rows (of each matrix) to an f32 panel once per token
    // block, and sweep the block's tokens with register tiles.
    let panel_len = 2 * PANEL_ROWS * k;
    if panel.len() < panel_len {
        panel.resize(panel_len, 0.0);
    }
    let (pg, pu) = panel.split_at_mut(PANEL_ROWS * k);
    let mut m0 = 0;
    while m0 < m {
        let mb = TOKEN_BLOCK.min(m - m0);
        let mut r = rows.start;
        while r < rows.end {
            let nr = if r + PANEL_ROWS <= rows.end {
                PANEL_ROWS
            } else {
                1
            };
            convert::<L, T>(w.add(r * k), nr * k, pg.as_mut_ptr());
            if let Some(u) = up {
                convert::<L, T>(u.add(r * k), nr * k, pu.as_mut_ptr());
            }
            let upp = up.map(|_| pu.as_ptr());
            let mut i = m0;
            while i < m0 + mb {
                let mr = L::PANEL_MR.min(m0 + mb - i);
                let xi = xp.add(i * k);
                let o = out.0.add(i * ldo + r);
                if nr == PANEL_ROWS {
                    panel_tile_dispatch::<L, PANEL_ROWS>(mr, xi, k, pg.as_ptr(), upp, o, ldo);
                } else {
                    panel_tile_dispatch::<L, 1>(mr, xi, k, pg.as_ptr(), upp, o, ldo);
                }
                i += mr;
            }
            r += nr;
        }
        m0 += mb;
    }
}

#[inline(always)]
unsafe fn convert<L: Lanes, T: LoadW<L>>(src: *const T, n: usize, dst: *mut f32) {
    let nv = n - n % L::W;
    let mut i = 0;
    while i < nv {
        L::store(dst.add(i), T::load_w(src.add(i)));
        i += L::W;
    }
    for j in nv..n {
        *dst.add(j) = (*src.add(j)).scalar();
    }
}

/// The products of one instruction set's lanes over every weight dtype: inlined into that
/// set's `rows` entry point, whose `#[target_feature]` the kernels then run under.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows_with<L: Lanes>(
    x: &[f32],
    m: usize,
    k: usize,
    w: Elems<'_>,
    up: Option<Elems<'_>>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
    panel: &mut Vec<f32>,
) where
    Bf16: LoadW<L>,
    F16: LoadW<L>,
    f32: LoadW<L>,
{
    let bf = |s: &[u16]| s.as_ptr() as *const Bf16;
    let hf = |s: &[u16]| s.as_ptr() as *const F16;
    match (w, up) {
        (Elems::BF16(w), None) => {
            rows_typed::<L, Bf16>(x, m, k, bf(w), None, rows, out, ldo, panel)
        }
        (Elems::BF16(w), Some(Elems::BF16(u))) => {
            rows_typed::<L, Bf16>(x, m, k, bf(w), Some(bf(u)), rows, out, ldo, panel)
        }
        (Elems::F16(w), None) => rows_typed::<L, F16>(x, m, k, hf(w), None, rows, out, ldo, panel),
        (Elems::F16(w), Some(Elems::F16(u))) => {
            rows_typed::<L, F16>(x, m, k, hf(w), Some(hf(u)), rows, out, ldo, panel)
        }
        (Elems::F32(w), None) => {
            rows_typed::<L, f32>(x, m, k, w.as_ptr(), None, rows, out, ldo, panel)
        }
        (Elems::F32(w), Some(Elems::F32(u))) => {
            rows_typed::<L, f32>(x, m, k, w.as_ptr(), Some(u.as_ptr()), rows, out, ldo, panel)
        }
        // gate and up of different dtypes: rare; the scalar path handles any mix.
        (w, up) => scalar_rows(x, m, k, w, up, rows, out, ldo),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
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
    rows_with::<Avx2>(x, m, k, w, up, rows, out, ldo, panel)
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let n16 = n & !15;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut s0 = _mm256_setzero_ps();
    let mut s1 = _mm256_setzero_ps();
    let mut i = 0;
    while i < n16 {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            s1,
        );
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(s0, s1));
    for j in n16..n {
        s += a[j] * b[j];
    }
    s
}

/// `acc = acc * scale + p * v`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scale_axpy(acc: &mut [f32], scale: f32, p: f32, v: &[f32]) {
    let n = acc.len().min(v.len());
    let n8 = n & !7;
    let (pa, pv) = (acc.as_mut_ptr(), v.as_ptr());
    let sc = _mm256_set1_ps(scale);
    let pp = _mm256_set1_ps(p);
    let mut i = 0;
    while i < n8 {
        let a = _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), sc);
        _mm256_storeu_ps(
            pa.add(i),
            _mm256_fmadd_ps(pp, _mm256_loadu_ps(pv.add(i)), a),
        );
        i += 8;
    }
    for j in n8..n {
        acc[j] = acc[j] * scale + p * v[j];
    }
}

/// `silu(g) * u` on eight lanes: one formula per lane, so a value's result does not depend on
/// the others computed with it.
#[inline(always)]
pub(super) unsafe fn silu_mul8(g: __m256, u: __m256) -> __m256 {
    let e = crate::backend::cpu::attention::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u)
}

/// `g[i] = silu(g[i]) * u[i]` for all sixteen values (see [`silu_mul8`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul16(g: &mut [f32; 16], u: &[f32; 16]) {
    for h in 0..2 {
        let (gp, up) = (g.as_mut_ptr().add(8 * h), u.as_ptr().add(8 * h));
        _mm256_storeu_ps(gp, silu_mul8(_mm256_loadu_ps(gp), _mm256_loadu_ps(up)));
    }
}
