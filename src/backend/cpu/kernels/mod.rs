//! CPU kernels: matrix products over bf16/f16/f32 weights read in place, RMSNorm, RoPE.
//! (Paged attention is in `attention.rs`.)
//!
//! Matrix products compute `out[m, n] = Σ_k x[m, k] · w[n, k]` (HF weight layout). Each
//! thread takes a contiguous range of weight rows. A register tile of MR tokens × NR weight
//! rows accumulates f32 vectors (8 wide with AVX2, 16 with AVX-512) along k:
//! * few tokens (decode): weights are converted to f32 inside the tile as they stream in, so
//!   every weight byte is read from memory exactly once per step;
//! * many tokens (prefill, large batches): `PANEL_ROWS` weight rows at a time are converted
//!   once into a per-thread f32 panel, and the tile sweeps blocks of tokens small enough to
//!   stay in L2.
//!
//! Every SIMD kernel (`avx2.rs` and `avx512.rs`, generic over the vector width; the quantized
//! products in `avx2_quant.rs` and `avx512_quant.rs`) has a plain scalar twin here
//! (`Isa::Scalar`), used where AVX2/FMA/F16C are missing and in tests as the reference every
//! SIMD path this CPU runs is compared against.

use crate::loader::{bf16_to_f32, Elems};
use crate::quant::{self, QuantType, QuantizedRows, BLOCK};

#[cfg(target_arch = "x86_64")]
mod avx2_quant;
#[cfg(target_arch = "x86_64")]
mod avx512_quant;
pub mod rows16;

/// Instruction set chosen at run time (ordered: each includes the one before).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C: 8-wide f32 tiles, `maddubs` integer products.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Avx2 plus AVX-512 F/BW/VL/DQ and VNNI: 16-wide f32 tiles, `vpdpbusd` over two blocks.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU has, capped by `SGLANG_CPU_ISA` (`scalar`, `avx2`,
    /// `avx512`) to force a narrower path.
    pub fn detect() -> Self {
        let best = Self::best();
        let cap = match std::env::var("SGLANG_CPU_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            #[cfg(target_arch = "x86_64")]
            Ok("avx2") => Isa::Avx2,
            _ => best,
        };
        best.min(cap)
    }

    /// Every instruction set this CPU can run, narrowest first (the tests compare them all).
    pub fn available() -> Vec<Isa> {
        let best = Self::best();
        Self::ALL.iter().copied().filter(|&i| i <= best).collect()
    }

    #[cfg(target_arch = "x86_64")]
    const ALL: &'static [Isa] = &[Isa::Scalar, Isa::Avx2, Isa::Avx512];
    #[cfg(not(target_arch = "x86_64"))]
    const ALL: &'static [Isa] = &[Isa::Scalar];

    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+fma",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether Q4_0/Q4_1/Q5_0/Q8_0/Q4_K weights are repacked for this ISA's kernels (`rows16`).
    pub fn repacks_rows16(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self != Isa::Scalar;
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The integer dot product the quantized products use.
    pub fn quant_name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar int8",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2 int8 maddubs",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512 vnni vpdpbusd",
        }
    }
}

/// Tokens per register tile of the streaming (decode) kernel.
const STREAM_MAX_TOKENS: usize = 4;
/// Up to this many tokens, weights are streamed row by row (decode, small batches); beyond,
/// rows are converted once into f32 panels (prefill, large batches).
const STREAM_BATCH_TOKENS: usize = 16;
/// How far ahead of the streaming kernel the weights are prefetched.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 2048;

/// Weight rows per f32 panel in the many-token path.
#[cfg(target_arch = "x86_64")]
const PANEL_ROWS: usize = 2;

/// Tokens per block in the packed (many-token) path: 48 rows of x at k <= 2048 stay in L2.
const TOKEN_BLOCK: usize = 48;

/// A raw output pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
pub struct OutPtr<T: Copy = f32>(pub *mut T);
// SAFETY: used only to write disjoint regions from different threads (see callers).
unsafe impl<T: Copy> Send for OutPtr<T> {}
unsafe impl<T: Copy> Sync for OutPtr<T> {}

impl<T: Copy> OutPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Computes rows `rows` (of `w`, i.e. output columns) of `out = x · wᵀ` for all `m` tokens.
/// `up` is the second matrix of a SwiGLU pair (same shape as `w`).
///
/// # Safety
/// `out` must be valid for writes at `out[i * ldo + r]` for `i < m`, `r in rows`, and no other
/// thread may write those elements concurrently.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_rows(
    isa: Isa,
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
    debug_assert!(x.len() >= m * k);
    debug_assert!(w.len() >= rows.end * k);
    match isa {
        Isa::Scalar => scalar_rows(x, m, k, w, up, rows, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::rows(x, m, k, w, up, rows, out, ldo, panel),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::rows(x, m, k, w, up, rows, out, ldo, panel),
    }
    let _ = panel;
}

/// Tokens per block of the quantized products: their 8-bit activations (64 × k bytes) stay in
/// L1/L2 while every weight row of the thread's range passes over them.
const QUANT_TOKEN_BLOCK: usize = 64;
/// Tokens sharing one unpacked weight block in the SIMD kernel (prefill), and weight rows
/// sharing one activation block (decode).
const QUANT_MR: usize = 4;
const QUANT_NR: usize = 4;

/// Rows `rows` of `out = x · wᵀ` for a block-quantized `w` (format `t`), with `up` the second
/// matrix of a SwiGLU pair, from the step's activations quantized once (`xq`, `m` rows).
///
/// # Safety
/// As [`matmul_rows`]: `out` valid for writes at `out[i * ldo + r]`, those elements written by
/// no other thread.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_rows_quant(
    isa: Isa,
    xq: &QuantizedRows,
    m: usize,
    t: QuantType,
    w: &[u8],
    up: Option<(QuantType, &[u8])>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    let nb = xq.k / BLOCK;
    assert!(xq.k.is_multiple_of(t.block_values()) && w.len() >= rows.end * t.row_bytes(xq.k));
    if let Some((ut, u)) = up {
        assert!(xq.k.is_multiple_of(ut.block_values()) && u.len() >= rows.end * ut.row_bytes(xq.k));
    }
    let mut g = [[0.0f32; QUANT_MR]; QUANT_NR];
    let mut u = [[0.0f32; QUANT_MR]; QUANT_NR];
    // prefill: rows of the formats that unpack are unpacked once per block of tokens
    let mut unpacked = [
        Unpacked::new(isa, t, m, nb),
        Unpacked::new(isa, up.map_or(t, |u| u.0), m, nb),
    ];
    for i0 in (0..m).step_by(QUANT_TOKEN_BLOCK) {
        let i1 = (i0 + QUANT_TOKEN_BLOCK).min(m);
        let mut r = rows.start;
        while r < rows.end {
            let nr = (rows.end - r).min(QUANT_NR);
            unpacked[0].rows(t, w, r, nr);
            if let Some((ut, uw)) = up {
                unpacked[1].rows(ut, uw, r, nr);
            }
            let mut i = i0;
            while i < i1 {
                let n = (i1 - i).min(QUANT_MR);
                unpacked[0].tile(isa, t, w, r, nr, nb, xq, i, n, &mut g);
                if let Some((ut, uw)) = up {
                    unpacked[1].tile(isa, ut, uw, r, nr, nb, xq, i, n, &mut u);
                }
                let mut gs: [f32; 16] = std::array::from_fn(|j| g[j / QUANT_MR][j % QUANT_MR]);
                if up.is_some() {
                    let us: [f32; 16] = std::array::from_fn(|j| u[j / QUANT_MR][j % QUANT_MR]);
                    silu_mul16(isa, &mut gs, &us);
                }
                for rr in 0..nr {
                    for j in 0..n {
                        *out.get().add((i + j) * ldo + r + rr) = gs[rr * QUANT_MR + j];
                    }
                }
                i += n;
            }
            r += nr;
        }
    }
}

/// Rows `rows` of `out = x · wᵀ` for a repacked Q4_0/Q4_1/Q5_0/Q8_0/Q4_K
/// `w`, with `up` the second matrix of a SwiGLU pair (repacked alike), from the step's
/// activations quantized once (`xq`, `m` rows). The AVX-512 or AVX2 kernels, or their scalar
/// twin: the same bits on every path, and for a token alone or batched. A range that
/// starts or ends inside a group of [`rows16::ROWS`] rows computes the whole group and writes
/// its rows in the range (the callers hand out whole groups).
///
/// # Safety
/// As [`matmul_rows`]: `out` valid for writes at `out[i * ldo + r]`, those elements written by
/// no other thread.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_rows_rows16(
    isa: Isa,
    xq: &QuantizedRows,
    m: usize,
    w: &rows16::Packed,
    up: Option<&rows16::Packed>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    const R: usize = rows16::ROWS;
    assert!(xq.k == w.blocks() * BLOCK && xq.rows >= m && rows.end <= w.rows());
    if let Some(u) = up {
        assert!(u.blocks() == w.blocks() && u.rows() == w.rows());
    }
    // one matrix's products of group `g` with the tokens of `xs` (at most QUANT_MR; their
    // indices in `xq` from `i`), into `res`
    let products = |p: &rows16::Packed,
                    g: usize,
                    xs: &[rows16::XRow],
                    i: usize,
                    res: &mut [[f32; R]; QUANT_MR]| {
        let n = xs.len();
        match isa {
            #[cfg(target_arch = "x86_64")]
            isa @ (Isa::Avx2 | Isa::Avx512) => {
                use rows16::{tile, tile_avx2, tile_k4, tile_k4_avx2};
                let (gp, nb) = (p.group(g), p.blocks());
                let wide = isa == Isa::Avx512;
                // $k: a kernel taking (group, blocks, activation rows, out)
                macro_rules! run {
                    ($k:ident, $mr:literal $(, $f:expr)?) => {{
                        let xs: &[rows16::XRow; $mr] = xs.try_into().unwrap();
                        let o: &mut [[f32; R]; $mr] = (&mut res[..$mr]).try_into().unwrap();
                        // SAFETY: Avx2 is chosen only where the CPU has AVX2, FMA and F16C,
                        // Avx512 only where it also has AVX-512 F/BW/VL/DQ/VNNI; the group
                        // holds nb blocks of its format (nb / 8 super-blocks for Q4_K) and the
                        // activation rows exist (asserted above).
                        unsafe { $k::<$({ $f },)? $mr>(gp, nb, xs, o) };
                    }};
                }
                macro_rules! by_tokens {
                    ($k:ident $(, $f:expr)?) => {
                        match n {
                            1 => run!($k, 1 $(, $f)?),
                            2 => run!($k, 2 $(, $f)?),
                            3 => run!($k, 3 $(, $f)?),
                            _ => run!($k, 4 $(, $f)?),
                        }
                    };
                }
                match (wide, p.format()) {
                    (true, rows16::Q4_0) => by_tokens!(tile, rows16::Q4_0),
                    (true, rows16::Q4_1) => by_tokens!(tile, rows16::Q4_1),
                    (true, rows16::Q5_0) => by_tokens!(tile, rows16::Q5_0),
                    (true, rows16::Q4_K) => by_tokens!(tile_k4),
                    (true, _) => by_tokens!(tile, rows16::Q8_0),
                    (false, rows16::Q4_0) => by_tokens!(tile_avx2, rows16::Q4_0),
                    (false, rows16::Q4_1) => by_tokens!(tile_avx2, rows16::Q4_1),
                    (false, rows16::Q5_0) => by_tokens!(tile_avx2, rows16::Q5_0),
                    (false, rows16::Q4_K) => by_tokens!(tile_k4_avx2),
                    (false, _) => by_tokens!(tile_avx2, rows16::Q8_0),
                }
            }
            _ => {
                for (j, o) in res.iter_mut().enumerate().take(n) {
                    let (q, d, s) = xq.row(i + j);
                    let ds = xq.row_ds(i + j);
                    for (r, v) in o.iter_mut().enumerate() {
                        *v = rows16::dot(p, g * R + r, q, d, s, ds);
                    }
                }
            }
        }
    };
    // the activation rows of a block of tokens, found once for all the groups
    let mut xrows = Vec::with_capacity(QUANT_TOKEN_BLOCK.min(m));
    let (mut res, mut us) = ([[0.0f32; R]; QUANT_MR], [[0.0f32; R]; QUANT_MR]);
    for i0 in (0..m).step_by(QUANT_TOKEN_BLOCK) {
        let i1 = (i0 + QUANT_TOKEN_BLOCK).min(m);
        xrows.clear();
        xrows.extend((i0..i1).map(|t| rows16::XRow::of(xq, t)));
        for g in rows.start / R..rows.end.div_ceil(R) {
            let (lo, hi) = (rows.start.max(g * R), rows.end.min(g * R + R));
            let mut i = i0;
            while i < i1 {
                let n = (i1 - i).min(QUANT_MR);
                let xs = &xrows[i - i0..i - i0 + n];
                products(w, g, xs, i, &mut res);
                if let Some(u) = up {
                    products(u, g, xs, i, &mut us);
                    for j in 0..n {
                        silu_mul16(isa, &mut res[j], &us[j]);
                    }
                }
                for (j, r) in res.iter().enumerate().take(n) {
                    // SAFETY: the caller's contract: rows lo..hi of token i + j are ours
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            r[lo - g * R..].as_ptr(),
                            out.get().add((i + j) * ldo + lo),
                            hi - lo,
                        )
                    };
                }
                i += n;
            }
        }
    }
}

/// The tiles of a block of `nr` weight rows (<= QUANT_NR) and `n` tokens (<= QUANT_MR) into
/// `out[row][token]`: 4×1 for one token and four rows (unless `$by_row`), 2×4 and 1×4 for four
/// tokens, 1×1 otherwise. `$run!(NR, MR, rows, xs)` computes one tile from `$row(k)`, the
/// block's k-th weight row, and `$x(j)`, its j-th activation row. Each (row, token) pair has
/// its own accumulator in every kernel, so the shapes do not change the results.
macro_rules! by_tiles {
    ($out:expr, $nr:expr, $n:expr, $by_row:expr, $row:ident, $x:ident, $run:ident) => {{
        let (out, nr, n) = ($out, $nr, $n);
        if n == 1 && nr == QUANT_NR && !$by_row {
            let res = $run!(4, 1, &[$row(0), $row(1), $row(2), $row(3)], &[$x(0)]);
            for (o, v) in out.iter_mut().zip(res) {
                o[0] = v[0];
            }
        } else if n == QUANT_MR {
            let xs = [$x(0), $x(1), $x(2), $x(3)];
            let mut rr = 0;
            while rr + 2 <= nr {
                let res = $run!(2, 4, &[$row(rr), $row(rr + 1)], &xs);
                out[rr] = res[0];
                out[rr + 1] = res[1];
                rr += 2;
            }
            if rr < nr {
                out[rr] = $run!(1, 4, &[$row(rr)], &xs)[0];
            }
        } else {
            for (rr, o) in out.iter_mut().enumerate().take(nr) {
                for (j, v) in o.iter_mut().enumerate().take(n) {
                    *v = $run!(1, 1, &[$row(rr)], &[$x(j)])[0][0];
                }
            }
        }
    }};
}

/// Whether one token's product with format `t` reads its weight rows one at a time rather
/// than four side by side. From memory, four interleaved rows stream at about half the
/// bandwidth of one (Zen 4, `benches/cpu_kernels.rs` "1, from memory": Q8_0 and Q6_K 1.5-1.6x
/// faster row by row, AVX-512 and AVX2 alike); the 4- and 5-bit formats, whose kernels are
/// bound by arithmetic rather than memory, keep the 4-row tile, which shares each token's
/// setup among the rows (Q4_1 1.3x faster with it).
fn by_row(t: QuantType) -> bool {
    // more than 3/4 of a byte per weight: Q8_0, Q6_K
    4 * t.block_bytes() > 3 * t.block_values()
}

/// Prefill with at least this many tokens unpacks the weight rows once per block of tokens.
const UNPACK_MIN_TOKENS: usize = 8;

/// Scratch for weight rows unpacked once for many tokens (`avx2_quant::unpack_row`), when the
/// ISA, the format and the number of tokens call for it; otherwise a pass-through to
/// [`quant_tile`]. Both give the same bits (the unpacked kernel performs the packed one's
/// operations), so a token's result does not depend on the batch.
struct Unpacked {
    on: bool,
    q: Vec<u8>,
    a: Vec<f32>,
    c: Vec<f32>,
}

impl Unpacked {
    fn new(isa: Isa, t: QuantType, m: usize, nb: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        let on = avx2_quant::unpacks(avx2_quant::code(t))
            && match isa {
                Isa::Scalar => false,
                Isa::Avx2 => m >= UNPACK_MIN_TOKENS,
                // the 512-bit kernels unpack nibbles at less cost: two tiles of four tokens
                // do not pay for the pass (measured on Zen 4)
                Isa::Avx512 => m >= 2 * UNPACK_MIN_TOKENS,
            };
        #[cfg(not(target_arch = "x86_64"))]
        let on = {
            let _ = (isa, t, m);
            false
        };
        let n = if on { QUANT_NR * nb } else { 0 };
        Unpacked {
            on,
            q: vec![0; n * BLOCK],
            a: vec![0.0; n],
            c: vec![0.0; n],
        }
    }

    /// Unpacks weight rows `r..r + nr` of `w` (format `t`).
    fn rows(&mut self, t: QuantType, w: &[u8], r: usize, nr: usize) {
        if !self.on {
            return;
        }
        let nb = self.a.len() / QUANT_NR;
        let row_bytes = t.row_bytes(nb * BLOCK);
        #[cfg(target_arch = "x86_64")]
        for rr in 0..nr {
            let row = &w[(r + rr) * row_bytes..(r + rr + 1) * row_bytes];
            let (q, a, c) = (
                &mut self.q[rr * nb * BLOCK..(rr + 1) * nb * BLOCK],
                &mut self.a[rr * nb..(rr + 1) * nb],
                &mut self.c[rr * nb..(rr + 1) * nb],
            );
            use avx2_quant::{unpack_row, Q4_0, Q4_1, Q4_K, Q5_0};
            // SAFETY: `on` only where the CPU has AVX2, FMA and F16C; `row` holds nb pieces
            // of format t, the buffers nb pieces each (unpack_row checks).
            unsafe {
                match avx2_quant::code(t) {
                    Q4_0 => unpack_row::<Q4_0>(row.as_ptr(), nb, q, a, c),
                    Q4_1 => unpack_row::<Q4_1>(row.as_ptr(), nb, q, a, c),
                    Q5_0 => unpack_row::<Q5_0>(row.as_ptr(), nb, q, a, c),
                    Q4_K => unpack_row::<Q4_K>(row.as_ptr(), nb, q, a, c),
                    _ => unreachable!("{t:?} does not unpack"),
                }
            }
        }
    }

    /// [`quant_tile`] of the rows last unpacked (or of the packed rows when not unpacking).
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        isa: Isa,
        t: QuantType,
        w: &[u8],
        r: usize,
        nr: usize,
        nb: usize,
        xq: &QuantizedRows,
        i: usize,
        n: usize,
        out: &mut [[f32; QUANT_MR]; QUANT_NR],
    ) {
        if !self.on {
            return quant_tile(isa, t, w, r, nr, nb, xq, i, n, out);
        }
        #[cfg(target_arch = "x86_64")]
        {
            use avx2_quant::{Unpacked as U, XRow, Q4_0, Q4_1, Q4_K, Q5_0};
            let x = |j: usize| XRow::of(xq, i + j);
            let u = |rr: usize| U {
                q: self.q[rr * nb * BLOCK..].as_ptr(),
                a: self.a[rr * nb..].as_ptr(),
                c: self.c[rr * nb..].as_ptr(),
            };
            macro_rules! run {
                ($nr:literal, $mr:literal, $rows:expr, $xs:expr) => {
                    // SAFETY: as quant_tile's; the unpacked rows hold nb pieces each.
                    unsafe {
                        use avx512_quant::tile_unpacked as u5;
                        match (isa, avx2_quant::code(t)) {
                            (Isa::Avx512, Q4_0) => u5::<Q4_0, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, Q4_1) => u5::<Q4_1, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, Q5_0) => u5::<Q5_0, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, _) => u5::<Q4_K, $nr, $mr>($rows, nb, $xs),
                            _ => avx2_quant::tile_unpacked::<$nr, $mr>($rows, nb, $xs),
                        }
                    }
                };
            }
            by_tiles!(out, nr, n, false, u, x, run);
        }
    }
}

/// Weight rows `r..r + nr` (`nb · 32` values each) with activation rows `i..i + n` into
/// `out[row][token]` (nr <= QUANT_NR, n <= QUANT_MR; the caller checked `w`'s length and that
/// rows are whole blocks of `t`).
#[allow(clippy::too_many_arguments)]
fn quant_tile(
    isa: Isa,
    t: QuantType,
    w: &[u8],
    r: usize,
    nr: usize,
    nb: usize,
    xq: &QuantizedRows,
    i: usize,
    n: usize,
    out: &mut [[f32; QUANT_MR]; QUANT_NR],
) {
    let row_bytes = t.row_bytes(nb * BLOCK);
    match isa {
        Isa::Scalar => {
            for (rr, o) in out.iter_mut().enumerate().take(nr) {
                let wr = &w[(r + rr) * row_bytes..(r + rr + 1) * row_bytes];
                for (j, v) in o.iter_mut().enumerate().take(n) {
                    let (q, d, s) = xq.row(i + j);
                    *v = quant::dot_row(t, wr, q, d, s);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        isa @ (Isa::Avx2 | Isa::Avx512) => {
            use avx2_quant::{XRow, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0};
            let x = |j: usize| XRow::of(xq, i + j);
            let wp = |rr: usize| w[(r + rr) * row_bytes..].as_ptr();
            macro_rules! run {
                ($nr:literal, $mr:literal, $rows:expr, $xs:expr) => {
                    // SAFETY: Avx2 is chosen only when the CPU has AVX2, FMA and F16C, Avx512
                    // only when it also has AVX-512 F/BW/VL/DQ/VNNI; each weight row holds nb
                    // blocks and each activation row nb blocks of values, scales and
                    // scale-sums (checked by matmul_rows_quant and QuantizedRows).
                    unsafe {
                        use avx2_quant::{tile as t2, tile_k as k2};
                        use avx512_quant::{tile as t5, tile_k as k5};
                        match (isa, avx2_quant::code(t)) {
                            (Isa::Avx512, Q8_0) => t5::<Q8_0, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, Q4_0) => t5::<Q4_0, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, Q4_1) => t5::<Q4_1, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, Q5_0) => t5::<Q5_0, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, Q4_K) => k5::<Q4_K, $nr, $mr>($rows, nb, $xs),
                            (Isa::Avx512, Q6_K) => k5::<Q6_K, $nr, $mr>($rows, nb, $xs),
                            (_, Q8_0) => t2::<Q8_0, $nr, $mr>($rows, nb, $xs),
                            (_, Q4_0) => t2::<Q4_0, $nr, $mr>($rows, nb, $xs),
                            (_, Q4_1) => t2::<Q4_1, $nr, $mr>($rows, nb, $xs),
                            (_, Q5_0) => t2::<Q5_0, $nr, $mr>($rows, nb, $xs),
                            (_, Q4_K) => k2::<Q4_K, $nr, $mr>($rows, nb, $xs),
                            _ => k2::<Q6_K, $nr, $mr>($rows, nb, $xs),
                        }
                    }
                };
            }
            by_tiles!(out, nr, n, by_row(t), wp, x, run);
        }
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `silu(g) * u` as the vector kernels compute it (`avx2::silu_mul8`), in the same operations
/// (fused where they fuse), so every path gives the same bits: e^-g by Cephes' range
/// reduction and polynomial, -g clamped to [-87, 88].
pub fn silu_mul(g: f32, u: f32) -> f32 {
    use super::attention::{EXP_LN2_HI, EXP_LN2_LO, EXP_POLY};
    let x = (0.0 - g).clamp(-87.0, 88.0);
    let fx = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let x = (-fx).mul_add(EXP_LN2_HI, x);
    let x = (-fx).mul_add(EXP_LN2_LO, x);
    let mut y = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        y = y.mul_add(x, *c);
    }
    let y = y.mul_add(x * x, x + 1.0);
    let e = y * f32::from_bits((((fx as i32) + 127) as u32) << 23);
    g / (1.0 + e) * u
}

/// `g[i] = silu(g[i]) * u[i]` on a tile's sixteen values (one formula per value, whatever
/// else is in the tile; [`silu_mul`]).
fn silu_mul16(isa: Isa, g: &mut [f32; 16], u: &[f32; 16]) {
    match isa {
        Isa::Scalar => g.iter_mut().zip(u).for_each(|(a, b)| *a = silu_mul(*a, *b)),
        // SAFETY: these instruction sets are chosen only where the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::silu_mul16(g, u) },
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn scalar_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: Elems<'_>,
    up: Option<Elems<'_>>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    let dot = |wm: &Elems<'_>, r: usize, i: usize| -> f32 {
        let xr = &x[i * k..(i + 1) * k];
        let mut s = 0.0f32;
        for (j, &xv) in xr.iter().enumerate() {
            s += xv * wm.get(r * k + j);
        }
        s
    };
    for r in rows {
        for i in 0..m {
            let g = dot(&w, r, i);
            let v = match &up {
                Some(u) => silu(g) * dot(u, r, i),
                None => g,
            };
            *out.0.add(i * ldo + r) = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod bf16x;

/// An activation rounded to bf16 for `--dtype bfloat16`, exactly as `vcvtneps2bf16` rounds:
/// to nearest even, NaN stays NaN (quiet), zero and denormals become a signed zero.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7F80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    crate::loader::f32_to_bf16(x)
}

/// How products of bf16 weights with bf16 activations run (`--dtype bfloat16`). Every
/// implementation performs the same operations in the same order (`bf16x.rs`), so all give
/// the same bits; they differ in speed only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bf16Dot {
    Scalar,
    /// f32 FMAs on the widened values, 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// f32 FMAs on the widened values, 16 lanes (AVX-512 without BF16).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// `vdpbf16ps` (AVX-512 BF16: Cooper Lake, Sapphire Rapids, Zen 4 and later).
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

impl Bf16Dot {
    /// The fastest this CPU has within the float products' instruction set `isa`.
    pub fn for_isa(isa: Isa) -> Self {
        match isa {
            Isa::Scalar => Self::Scalar,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Self::Avx2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if is_x86_feature_detected!("avx512bf16") => Self::Avx512Bf16,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Self::Avx512,
        }
    }

    /// Every implementation this CPU can run (the tests compare them all).
    #[cfg(test)]
    pub fn available() -> Vec<Self> {
        let mut all: Vec<Self> = Isa::available().into_iter().map(Self::for_isa).collect();
        #[cfg(target_arch = "x86_64")]
        if all.contains(&Self::Avx512Bf16) {
            all.push(Self::Avx512);
        }
        all.sort();
        all.dedup();
        all
    }

    /// Whether this multiplies bf16 values as bf16 (rather than widening them to f32 first).
    pub fn is_native(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Self::Avx512Bf16 {
            return true;
        }
        false
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "avx2 fma",
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => "avx512 fma",
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => "avx512_bf16 vdpbf16ps",
        }
    }
}

/// `dst[i] = to_bf16(src[i])`.
pub fn to_bf16_rows(d: Bf16Dot, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    match d {
        // SAFETY: chosen only where the CPU has AVX-512 BF16 (and VL).
        #[cfg(target_arch = "x86_64")]
        Bf16Dot::Avx512Bf16 => unsafe { bf16x::convert_native(src, dst) },
        // SAFETY: chosen only where the CPU has AVX2.
        #[cfg(target_arch = "x86_64")]
        Bf16Dot::Avx2 | Bf16Dot::Avx512 => unsafe { bf16x::convert_avx2(src, dst) },
        Bf16Dot::Scalar => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = to_bf16(s)),
    }
}

/// The canonical dot product of bf16 `x` and `w` (see `bf16x.rs`), one value at a time.
fn dot_bf16x(x: &[u16], w: &[u16]) -> f32 {
    let f = bf16_to_f32;
    let k = x.len();
    let mut a = [[0.0f32; 16]; 2];
    let mut kk = 0;
    let step = |a: &mut [f32; 16], kk: usize| {
        for (l, v) in a.iter_mut().enumerate() {
            let p = kk + 2 * l;
            *v += f(x[p + 1]) * f(w[p + 1]);
            *v += f(x[p]) * f(w[p]);
        }
    };
    while kk + 64 <= k {
        step(&mut a[0], kk);
        step(&mut a[1], kk + 32);
        kk += 64;
    }
    if kk + 32 <= k {
        step(&mut a[0], kk);
        kk += 32;
    }
    let mut s: [f32; 16] = std::array::from_fn(|l| a[0][l] + a[1][l]);
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            s[l] += s[l + half];
        }
    }
    let mut total = s[0];
    for t in kk..k {
        total += f(x[t]) * f(w[t]);
    }
    total
}

/// Rows `rows` of `out = x · wᵀ` for bf16 weights `w` and the activations rounded to bf16
/// (`x`, m × k, from [`to_bf16_rows`]); `up` the second matrix of a SwiGLU pair.
///
/// # Safety
/// As [`matmul_rows`]: `out` valid for writes at `out[i * ldo + r]`, those elements written by
/// no other thread.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_rows_bf16x(
    d: Bf16Dot,
    x: &[u16],
    m: usize,
    k: usize,
    w: &[u16],
    up: Option<&[u16]>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    assert!(x.len() >= m * k && w.len() >= rows.end * k);
    assert!(up.is_none_or(|u| u.len() >= rows.end * k));
    #[cfg(target_arch = "x86_64")]
    {
        let (xp, wp, upp) = (x.as_ptr(), w.as_ptr(), up.map(|u| u.as_ptr()));
        match d {
            Bf16Dot::Avx512Bf16 => return bf16x::rows_native(xp, m, k, wp, upp, rows, out, ldo),
            Bf16Dot::Avx512 => return bf16x::rows_emu512(xp, m, k, wp, upp, rows, out, ldo),
            Bf16Dot::Avx2 => return bf16x::rows_emu256(xp, m, k, wp, upp, rows, out, ldo),
            Bf16Dot::Scalar => {}
        }
    }
    let _ = d;
    for r in rows {
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let g = dot_bf16x(xi, &w[r * k..(r + 1) * k]);
            *out.get().add(i * ldo + r) = match up {
                Some(u) => silu_mul(g, dot_bf16x(xi, &u[r * k..(r + 1) * k])),
                None => g,
            };
        }
    }
}

/// `Σ a[i] * b[i]`.
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        // SAFETY: Avx2 and Avx512 are only chosen when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::dot(a, b) },
        Isa::Scalar => a.iter().zip(b).map(|(x, y)| x * y).sum(),
    }
}

/// `acc = acc * scale + p * v`.
#[inline]
pub fn scale_axpy(isa: Isa, acc: &mut [f32], scale: f32, p: f32, v: &[f32]) {
    match isa {
        // SAFETY: Avx2 and Avx512 are only chosen when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::scale_axpy(acc, scale, p, v) },
        Isa::Scalar => acc
            .iter_mut()
            .zip(v)
            .for_each(|(a, &x)| *a = *a * scale + p * x),
    }
}

/// `out = x / sqrt(mean(x²) + eps) * w` for one row.
pub fn rms_norm_row(x: &[f32], w: Elems<'_>, eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    match w {
        Elems::BF16(w) => {
            for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
                *o = xv * inv * bf16_to_f32(wv);
            }
        }
        Elems::F32(w) => {
            for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
                *o = xv * inv * wv;
            }
        }
        Elems::F16(_) | Elems::Quant(..) => {
            for (j, (o, &xv)) in out.iter_mut().zip(x).enumerate() {
                *o = xv * inv * w.get(j);
            }
        }
    }
}

/// HF "half rotation" RoPE on one head: pairs `(x[i], x[i + d/2])` rotate by angle `i`.
#[inline]
pub fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (xorshift), for the kernel tests of this backend.
    pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-30)).sqrt()
    }

    /// The chosen ISA against the scalar twin, every dtype, decode and prefill shapes.
    #[test]
    fn matmul_simd_matches_scalar() {
        Isa::available().into_iter().for_each(matmul_matches_scalar);
    }

    fn matmul_matches_scalar(isa: Isa) {
        for &(m, n, k) in &[
            (1, 9, 24),
            (2, 13, 40),
            (3, 8, 64),
            (5, 11, 33),
            (50, 21, 72),
            (97, 6, 16),
        ] {
            let x = rand_vec(m * k, 1);
            let wf = rand_vec(n * k, 2);
            let wu = rand_vec(n * k, 3);
            let bf: Vec<u16> = wf.iter().map(|&v| crate::loader::f32_to_bf16(v)).collect();
            let bu: Vec<u16> = wu.iter().map(|&v| crate::loader::f32_to_bf16(v)).collect();
            let hf: Vec<u16> = wf
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let cases: Vec<(Elems, Option<Elems>)> = vec![
                (Elems::F32(&wf), None),
                (Elems::BF16(&bf), None),
                (Elems::F16(&hf), None),
                (Elems::BF16(&bf), Some(Elems::BF16(&bu))),
                (Elems::F32(&wf), Some(Elems::F32(&wu))),
            ];
            for (w, up) in cases {
                let mut want = vec![0.0; m * n];
                let mut got = vec![0.0; m * n];
                let mut panel = Vec::new();
                unsafe {
                    matmul_rows(
                        Isa::Scalar,
                        &x,
                        m,
                        k,
                        w,
                        up,
                        0..n,
                        OutPtr(want.as_mut_ptr()),
                        n,
                        &mut panel,
                    );
                    // two ranges, as two threads would
                    for rows in [0..n / 2, n / 2..n] {
                        matmul_rows(
                            isa,
                            &x,
                            m,
                            k,
                            w,
                            up,
                            rows,
                            OutPtr(got.as_mut_ptr()),
                            n,
                            &mut panel,
                        );
                    }
                }
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "{isa:?} m={m} n={n} k={k} rel err {e}");
            }
        }
    }

    /// A token's result is bit-for-bit the same whatever else shares the step (decode path,
    /// panel path, tails): batching and prefix caching cannot change the output.
    #[test]
    fn matmul_is_batch_invariant() {
        Isa::available().into_iter().for_each(batch_invariant);
    }

    fn batch_invariant(isa: Isa) {
        for &(n, k) in &[(9usize, 40usize), (13, 72), (6, 576)] {
            let m = 53;
            let x = rand_vec(m * k, 11);
            let w: Vec<u16> = rand_vec(n * k, 12)
                .iter()
                .map(|&v| crate::loader::f32_to_bf16(v))
                .collect();
            let u: Vec<u16> = rand_vec(n * k, 13)
                .iter()
                .map(|&v| crate::loader::f32_to_bf16(v))
                .collect();
            for up in [None, Some(Elems::BF16(&u))] {
                let mut panel = Vec::new();
                let mut all = vec![0.0; m * n];
                unsafe {
                    matmul_rows(
                        isa,
                        &x,
                        m,
                        k,
                        Elems::BF16(&w),
                        up,
                        0..n,
                        OutPtr(all.as_mut_ptr()),
                        n,
                        &mut panel,
                    )
                };
                for group in [1usize, 2, 3, 4, 5, 9, 16, 17] {
                    for start in (0..m - group).step_by(7) {
                        let mut part = vec![0.0; group * n];
                        let xs = &x[start * k..(start + group) * k];
                        for rows in [0..n / 2, n / 2..n] {
                            unsafe {
                                matmul_rows(
                                    isa,
                                    xs,
                                    group,
                                    k,
                                    Elems::BF16(&w),
                                    up,
                                    rows,
                                    OutPtr(part.as_mut_ptr()),
                                    n,
                                    &mut panel,
                                );
                            }
                        }
                        let want = &all[start * n..(start + group) * n];
                        assert!(
                            part.iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} n={n} k={k} group={group} start={start}"
                        );
                    }
                }
            }
        }
    }

    /// `--dtype bfloat16`: every implementation gives the scalar twin's bits (same operations,
    /// same order), each token's result is the same alone and batched, the rounding of the
    /// activations matches `vcvtneps2bf16`'s, and the twin is a dot product of the rounded
    /// values (against f64).
    #[test]
    fn bf16_activation_products_match_bitwise_and_are_batch_invariant() {
        let specials = [
            0.0f32,
            -0.0,
            1e-39,
            -1e-39,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x0080_0000),
            -1.5,
        ];
        let want_specials = [
            0x0000u16, 0x8000, 0x0000, 0x8000, 0x3f80, 0x3f82, 0x7f80, 0x7f80, 0x7fc0, 0x7fc0,
            0x0080, 0xbfc0,
        ];
        let mut xs = rand_vec(1000, 21);
        xs.extend(specials.iter().cycle().take(37));
        let mut want = vec![0u16; xs.len()];
        to_bf16_rows(Bf16Dot::Scalar, &xs, &mut want);
        for (v, w) in specials.iter().zip(want_specials) {
            assert_eq!(to_bf16(*v), w, "{v:e}");
        }
        let bf = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| to_bf16(x)).collect() };
        for d in Bf16Dot::available() {
            let mut got = vec![0u16; xs.len()];
            to_bf16_rows(d, &xs, &mut got);
            assert_eq!(got, want, "{d:?} rounding");
            for &(m, n, k) in &[
                (1, 9, 24),
                (2, 13, 40),
                (3, 8, 96),
                (5, 11, 33),
                (53, 7, 576),
            ] {
                let x = bf(&rand_vec(m * k, 1));
                let w = bf(&rand_vec(n * k, 2));
                let u = bf(&rand_vec(n * k, 3));
                for up in [None, Some(&u[..])] {
                    let run = |d: Bf16Dot, x: &[u16], m: usize| {
                        let mut out = vec![0.0f32; m * n];
                        for rows in [0..n / 2, n / 2..n] {
                            // SAFETY: out holds m * n values; the two ranges are disjoint.
                            unsafe {
                                matmul_rows_bf16x(
                                    d,
                                    x,
                                    m,
                                    k,
                                    &w,
                                    up,
                                    rows,
                                    OutPtr(out.as_mut_ptr()),
                                    n,
                                )
                            };
                        }
                        out
                    };
                    let all = run(d, &x, m);
                    let twin = run(Bf16Dot::Scalar, &x, m);
                    let same = |a: &[f32], b: &[f32]| {
                        a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
                    };
                    assert!(
                        same(&all, &twin),
                        "{d:?} m={m} n={n} k={k} up={}",
                        up.is_some()
                    );
                    for group in [1usize, 2, 3, 4, 5, 17] {
                        for start in (0..m.saturating_sub(group) + 1).step_by(11) {
                            let part = run(
                                d,
                                &x[start * k..(start + group).min(m) * k],
                                group.min(m - start),
                            );
                            let g = group.min(m - start);
                            assert!(
                                same(&part, &all[start * n..(start + g) * n]),
                                "{d:?} k={k} group={group} start={start}"
                            );
                        }
                    }
                    if up.is_none() && d == Bf16Dot::Scalar {
                        let f = |b: u16| bf16_to_f32(b) as f64;
                        for i in 0..m {
                            for r in 0..n {
                                let exact: f64 =
                                    (0..k).map(|j| f(x[i * k + j]) * f(w[r * k + j])).sum();
                                let e = (all[i * n + r] as f64 - exact).abs();
                                assert!(e < 1e-5 * (k as f64).sqrt(), "twin m={m} k={k}: {e}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The SwiGLU of the vector kernels: the same bits on every path, within a few ulp of
    /// `silu(g) * u` from libm's exp, and the limits right (large |g|).
    #[test]
    fn silu_mul_is_one_formula_and_close_to_libm() {
        let mut gs: Vec<f32> = rand_vec(4000, 31).iter().map(|v| v * 30.0).collect();
        gs.extend([
            0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 88.5, -88.5, 100.0, -100.0, 1e4, -1e4,
        ]);
        let us: Vec<f32> = rand_vec(gs.len(), 32).iter().map(|v| v + 1.5).collect();
        for (g, u) in gs.chunks(16).zip(us.chunks(16)) {
            let mut tile = [0.0f32; 16];
            let mut up = [0.0f32; 16];
            tile[..g.len()].copy_from_slice(g);
            up[..u.len()].copy_from_slice(u);
            let want: Vec<f32> = tile
                .iter()
                .zip(&up)
                .map(|(&a, &b)| silu_mul(a, b))
                .collect();
            for isa in Isa::available() {
                let mut got = tile;
                silu_mul16(isa, &mut got, &up);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} {g:?}"
                );
            }
            for (j, (&a, &b)) in tile.iter().zip(&up).enumerate() {
                let exact = (a as f64 / (1.0 + (-(a as f64)).exp())) * b as f64;
                let err = (want[j] as f64 - exact).abs();
                // (below g = -88, e^-g is held at e^88: the result is ~1e-34 instead of ~0)
                assert!(
                    err <= 1e-6 * exact.abs() + 1e-30,
                    "g={a} u={b}: {} vs {exact}",
                    want[j]
                );
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rope_head(&mut x, &[0.0, 1.0], &[1.0, 0.0]);
        // pair (x0, x2) rotated by 90 degrees, pair (x1, x3) unchanged
        assert_eq!(x, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    /// Random whole blocks of format `t` with small finite scales (`rows` rows of `k`).
    fn rand_quant(t: QuantType, rows: usize, k: usize, seed: u64) -> Vec<u8> {
        let bb = t.block_bytes();
        let vals = rand_vec(rows * t.row_bytes(k), seed);
        let mut out: Vec<u8> = vals.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        for (b, blk) in out.chunks_mut(bb).enumerate() {
            let d = f16(0.002 + (b % 5) as f32 * 0.001);
            match t {
                QuantType::Q6_K => blk[208..].copy_from_slice(&f16(0.0001 * (1 + b % 3) as f32)),
                QuantType::Q4_K => {
                    blk[..2].copy_from_slice(&f16(0.0003 * (1 + b % 3) as f32));
                    blk[2..4].copy_from_slice(&f16(0.0005 * (b % 4) as f32));
                }
                QuantType::Q4_1 => {
                    blk[..2].copy_from_slice(&d);
                    blk[2..4].copy_from_slice(&f16(-0.01 * (b % 3) as f32));
                }
                _ => blk[..2].copy_from_slice(&d),
            }
        }
        out
    }

    /// The quantized products: the chosen ISA against the scalar twin and against the
    /// dequantized weights in f32 (the error int8 activations add), with and without SwiGLU,
    /// and each token's result the same alone as in any batch (bitwise).
    #[test]
    fn quantized_matmul_matches_scalar_and_is_batch_invariant() {
        Isa::available().into_iter().for_each(quantized_matmul);
    }

    fn quantized_matmul(isa: Isa) {
        let n = 19;
        for t in QuantType::ALL {
            // an odd number of blocks (of super-blocks for the k-quants)
            let k = if t.block_values() == BLOCK { 160 } else { 768 };
            let w = rand_quant(t, n, k, 3);
            let u = rand_quant(t, n, k, 4);
            for m in [1, 3, 4, 5, 9, 70] {
                let x = rand_vec(m * k, 5 + m as u64);
                let mut xq = QuantizedRows::default();
                xq.quantize(&x, m, k);
                for up in [None, Some((t, &u[..]))] {
                    let run = |isa: Isa, xq: &QuantizedRows, m: usize| {
                        let mut out = vec![0.0f32; m * n];
                        // SAFETY: out holds m * n values; one thread writes them all.
                        unsafe {
                            matmul_rows_quant(
                                isa,
                                xq,
                                m,
                                t,
                                &w,
                                up,
                                0..n,
                                OutPtr(out.as_mut_ptr()),
                                n,
                            )
                        };
                        out
                    };
                    let got = run(isa, &xq, m);
                    let want = run(Isa::Scalar, &xq, m);
                    assert!(
                        rel_err(&got, &want) < 1e-5,
                        "{isa:?} {t:?} m={m} up={}",
                        up.is_some()
                    );
                    // against f32 products with the dequantized weights
                    let deq = |b: &[u8]| {
                        let mut f = vec![0.0f32; n * k];
                        Elems::Quant(t, b).to_f32(&mut f);
                        f
                    };
                    let (wf, uf) = (deq(&w), deq(&u));
                    let mut exact = vec![0.0f32; m * n];
                    for i in 0..m {
                        for r in 0..n {
                            let dot = |f: &[f32]| -> f32 {
                                (0..k).map(|j| x[i * k + j] * f[r * k + j]).sum()
                            };
                            exact[i * n + r] = match up {
                                Some(_) => silu(dot(&wf)) * dot(&uf),
                                None => dot(&wf),
                            };
                        }
                    }
                    let e = rel_err(&got, &exact);
                    assert!(e < 0.02, "{t:?} m={m}: {e} from the f32 product");
                    // batch invariance: token i alone gives the same bits
                    for i in [0, m - 1] {
                        let mut one = QuantizedRows::default();
                        one.quantize(&x[i * k..(i + 1) * k], 1, k);
                        let alone = run(isa, &one, 1);
                        assert_eq!(
                            alone[..],
                            got[i * n..(i + 1) * n],
                            "{isa:?} {t:?} m={m} token {i}"
                        );
                    }
                }
            }
        }
    }

    /// The repacked Q4_0/Q4_1/Q5_0/Q8_0/Q4_K products (`rows16`): the vector kernel gives its scalar twin's
    /// bits, every token the same alone as batched, any row range (whole groups or not) the
    /// same rows as the whole matrix; and they agree with the file-layout kernels to rounding.
    #[test]
    fn repacked_products_match_their_twin_bitwise_and_are_batch_invariant() {
        let n = 48;
        for t in [
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
            QuantType::Q8_0,
            QuantType::Q4_K,
        ] {
            // an odd number of blocks (of super-blocks for Q4_K)
            let k = if t == QuantType::Q4_K { 768 } else { 160 };
            let w = rand_quant(t, n, k, 6);
            let u = rand_quant(t, n, k, 7);
            let (pw, pu) = (
                rows16::Packed::new(t, &w, n, k).unwrap(),
                rows16::Packed::new(t, &u, n, k).unwrap(),
            );
            assert!(rows16::Packed::new(t, &w[..(n - 1) * t.row_bytes(k)], n - 1, k).is_none());
            // rows read back (the embedding's lookup) as the file layout dequantizes them
            let mut want = vec![0.0f32; n * k];
            Elems::Quant(t, &w).to_f32(&mut want);
            for (r, want) in want.chunks_exact(k).enumerate() {
                let mut got = vec![0.0f32; k];
                pw.row_to_f32(r, &mut got);
                assert_eq!(got, want, "{t:?} row {r}");
            }
            for m in [1, 2, 3, 4, 5, 9, 70] {
                let x = rand_vec(m * k, 8 + m as u64);
                let mut xq = QuantizedRows::default();
                xq.quantize(&x, m, k);
                for up in [false, true] {
                    let run =
                        |isa: Isa, xq: &QuantizedRows, m: usize, rows: std::ops::Range<usize>| {
                            let mut out = vec![0.0f32; m * n];
                            // SAFETY: out holds m * n values; one thread writes them all.
                            unsafe {
                                matmul_rows_rows16(
                                    isa,
                                    xq,
                                    m,
                                    &pw,
                                    up.then_some(&pu),
                                    rows,
                                    OutPtr(out.as_mut_ptr()),
                                    n,
                                )
                            };
                            out
                        };
                    let want = run(Isa::Scalar, &xq, m, 0..n);
                    let file = {
                        let mut out = vec![0.0f32; m * n];
                        // SAFETY: as above
                        unsafe {
                            matmul_rows_quant(
                                Isa::Scalar,
                                &xq,
                                m,
                                t,
                                &w,
                                up.then_some((t, &u[..])),
                                0..n,
                                OutPtr(out.as_mut_ptr()),
                                n,
                            )
                        };
                        out
                    };
                    assert!(rel_err(&want, &file) < 1e-5, "{t:?} m={m} up={up}");
                    for isa in Isa::available() {
                        let got = run(isa, &xq, m, 0..n);
                        assert_eq!(got, want, "{isa:?} {t:?} m={m} up={up}");
                        // rows 5..37: parts of the first and third groups, all of the second
                        let part = run(isa, &xq, m, 5..37);
                        for i in 0..m {
                            let row = i * n;
                            assert_eq!(part[row + 5..row + 37], got[row + 5..row + 37]);
                            assert!(part[row..row + 5].iter().all(|&v| v == 0.0));
                        }
                        for i in [0, m - 1] {
                            let mut one = QuantizedRows::default();
                            one.quantize(&x[i * k..(i + 1) * k], 1, k);
                            let alone = run(isa, &one, 1, 0..n);
                            assert_eq!(
                                alone[..],
                                got[i * n..(i + 1) * n],
                                "{isa:?} {t:?} token {i}"
                            );
                        }
                    }
                }
            }
        }
    }
}
