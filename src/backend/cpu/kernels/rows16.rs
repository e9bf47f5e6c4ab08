//! Q4_0, Q4_1, Q5_0, Q8_0 and Q4_K weights repacked sixteen rows at a time, for products whose
//! vector lanes are weight rows (the layout llama.cpp's repacking kernels use, written here
//! from that idea): AVX-512 VNNI `vpdpbusd` on all sixteen, or AVX2 `maddubs` + `madd` on
//! eight at a time (the same exact integer sums, the same float operations lane by lane, so
//! the same bits).
//!
//! In the file's own layout a row's 32 values of a block sit side by side, so a 512-bit
//! product covers one or two blocks of one row, and each block's partial sums must be scaled
//! and reduced across lanes: about 23 vector operations per 64 weights in decode. Here 4
//! bytes of block `b` of sixteen rows fill one 512-bit register (row `r` in lane `r`), and one
//! `vpdpbusd` with the activation's matching 4 bytes broadcast adds four products to each
//! row's integer sum. Q4: chunk `c` holds nibble bytes `4c..4c + 4`; masked to their low
//! nibbles they are values `4c..4c + 4`, shifted, values `16 + 4c..`. Q5_0 adds a 64-byte
//! register of the rows' fifth bits, rearranged so that one shift and one mask put the bits
//! of chunk half `h` (`h < 4` the low nibbles of chunk `h`, else the high ones of chunk
//! `h − 4`) at bit 4 of their bytes: bit `h` of byte `j` is that of value `j` of half `h`.
//! Q8_0: chunk `c` holds
//! values `4c..4c + 4`, stored as unsigned bytes `q + 128` (`vpdpbusd` multiplies unsigned by
//! signed). A block of sixteen rows is 8 products, one conversion and one or two
//! multiply-adds with the rows' scales (sixteen f16 values, side by side): about 32
//! operations per 512 weights for Q4, 20 for Q8_0.
//!
//! Group `g` (rows `16g..16g + 16`), block `b` is `group_block` bytes at `(g · nb + b) ·
//! group_block`: the chunks of 64 bytes (four for Q4 and Q5_0, eight for Q8_0), Q5_0's
//! fifth bits (64 bytes), the sixteen rows' `d`
//! (f16), and for Q4_1 their `m` (f16): the file's bytes, so a tensor repacks into a buffer
//! of its own size.
//!
//! Each (row, token) result is, block by block in order, `acc = fma(isum, d_w · d_x, acc)`
//! (Q4_1 then `acc = fma(m_w, d_x · Σ q_x, acc)`), with `isum` the block's exact integer
//! product (Q4_0: `Σ q_w · q_x − 8 · Σ q_x`, Q5_0 the same with 16, Q8_0
//! `Σ (q_w + 128) · q_x − 128 · Σ q_x`).
//! [`dot`] is that in scalar code; the vector kernel performs the same operations, so the two
//! agree bit for bit, alone and batched.

use crate::quant::{QuantType, BLOCK};

/// Weight rows per group.
pub const ROWS: usize = 16;

/// The formats that repack (`Packed::format`).
pub const Q4_0: u8 = 0;
pub const Q4_1: u8 = 1;
pub const Q8_0: u8 = 2;
pub const Q5_0: u8 = 3;
pub const Q4_K: u8 = 4;

/// Bytes of one Q4_K super-block (256 values) of a group: four pairs of pieces of eight
/// chunks of 64 bytes (pair `j`, chunk `c`, lane `r`: row `r`'s nibble bytes `32j + 4c..`, low
/// nibbles piece `2j`, high ones piece `2j + 1`), the rows' `d` and `dmin` (f16), and their
/// 6-bit scales and mins unpacked to bytes (piece `s`, lane `r` at `16s + r`).
const K4_UNIT: usize = 4 * 8 * 64 + 2 * 2 * ROWS + 2 * 8 * ROWS;
const K4_D: usize = 2048;
const K4_DMIN: usize = K4_D + 2 * ROWS;
const K4_SC: usize = K4_DMIN + 2 * ROWS;
const K4_M: usize = K4_SC + 8 * ROWS;

/// A Q4_0, Q4_1, Q5_0, Q8_0 or Q4_K matrix in groups of [`ROWS`] rows.
pub struct Packed {
    format: u8,
    rows: usize,
    nb: usize,
    bytes: Vec<u8>,
}

/// Chunks of 64 bytes per block of a group.
const fn chunks(format: u8) -> usize {
    if format == Q8_0 {
        8
    } else {
        4
    }
}

/// Where a group's block holds its rows' `d` (after the chunks, and Q5_0's fifth bits).
const fn scales_at(format: u8) -> usize {
    64 * chunks(format) + if format == Q5_0 { 64 } else { 0 }
}

/// Bytes of one block of one group.
const fn group_block(format: u8) -> usize {
    scales_at(format) + 2 * ROWS + if format == Q4_1 { 2 * ROWS } else { 0 }
}

/// The value (0..32) of byte `j` of chunk half `h` (`h < 4`: low nibbles of chunk `h`, else
/// high nibbles of chunk `h − 4`).
const fn half_value(h: usize, j: usize) -> usize {
    4 * (h % 4) + j + if h >= 4 { 16 } else { 0 }
}

/// The file's format of a repacked format.
fn quant_type(format: u8) -> QuantType {
    match format {
        Q4_0 => QuantType::Q4_0,
        Q4_1 => QuantType::Q4_1,
        Q5_0 => QuantType::Q5_0,
        Q4_K => QuantType::Q4_K,
        _ => QuantType::Q8_0,
    }
}

/// Q4_K's 12 bytes of 6-bit scales and mins from the eight (scale, min) pairs: the inverse of
/// `crate::quant::k4_scale_min`.
fn k4_pack_scale_min(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    out
}

/// The file's offset of a block's value bytes (after `d`, and Q4_1's `m` or Q5_0's `qh`).
fn qs_at(format: u8) -> usize {
    match format {
        Q4_1 => 4,
        Q5_0 => 6,
        _ => 2,
    }
}

impl Packed {
    /// Whether a matrix of `rows` rows of `k` values in format `t` repacks: Q4_0, Q4_1, Q5_0,
    /// Q8_0 or Q4_K, whole groups of rows.
    pub fn fits(t: QuantType, rows: usize, k: usize) -> bool {
        matches!(
            t,
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q8_0 | QuantType::Q4_K
        ) && rows > 0
            && rows.is_multiple_of(ROWS)
            && k.is_multiple_of(t.block_values())
    }

    /// Bytes of one group.
    fn group_bytes(&self) -> usize {
        match self.format {
            Q4_K => self.nb / 8 * K4_UNIT,
            f => self.nb * group_block(f),
        }
    }

    /// Q4_K's repacking (see [`K4_UNIT`]).
    fn new_k4(w: &[u8], rows: usize, k: usize) -> Packed {
        let (nb, bb) = (k / BLOCK, QuantType::Q4_K.block_bytes());
        let supers = k / crate::quant::SUPER;
        assert!(
            w.len() >= rows * supers * bb,
            "quantized matrix shorter than its shape"
        );
        let mut bytes = vec![0u8; rows / ROWS * supers * K4_UNIT];
        for (g, group) in bytes.chunks_exact_mut(supers * K4_UNIT).enumerate() {
            for (sb, dst) in group.chunks_exact_mut(K4_UNIT).enumerate() {
                for r in 0..ROWS {
                    let src = &w[((g * ROWS + r) * supers + sb) * bb..][..bb];
                    for j in 0..4 {
                        for c in 0..8 {
                            dst[512 * j + 64 * c + 4 * r..][..4]
                                .copy_from_slice(&src[16 + 32 * j + 4 * c..][..4]);
                        }
                    }
                    dst[K4_D + 2 * r..][..2].copy_from_slice(&src[..2]);
                    dst[K4_DMIN + 2 * r..][..2].copy_from_slice(&src[2..4]);
                    for p in 0..8 {
                        let (sc, m) = crate::quant::k4_scale_min(&src[4..16], p);
                        dst[K4_SC + ROWS * p + r] = sc;
                        dst[K4_M + ROWS * p + r] = m;
                    }
                }
            }
        }
        Packed {
            format: Q4_K,
            rows,
            nb,
            bytes,
        }
    }

    /// `w`, `rows` rows of `k` values in format `t` as the file stores them, repacked; `None`
    /// unless it [`fits`](Self::fits).
    pub fn new(t: QuantType, w: &[u8], rows: usize, k: usize) -> Option<Packed> {
        if !Self::fits(t, rows, k) {
            return None;
        }
        if t == QuantType::Q4_K {
            return Some(Self::new_k4(w, rows, k));
        }
        let format = match t {
            QuantType::Q4_0 => Q4_0,
            QuantType::Q4_1 => Q4_1,
            QuantType::Q5_0 => Q5_0,
            _ => Q8_0,
        };
        let nb = k / BLOCK;
        let bb = t.block_bytes();
        let qs_at = qs_at(format);
        assert!(
            w.len() >= rows * nb * bb,
            "quantized matrix shorter than its shape"
        );
        let gb = group_block(format);
        let scales = scales_at(format);
        let mut bytes = vec![0u8; rows / ROWS * nb * gb];
        for (g, group) in bytes.chunks_exact_mut(nb * gb).enumerate() {
            for (b, dst) in group.chunks_exact_mut(gb).enumerate() {
                for r in 0..ROWS {
                    let src = &w[((g * ROWS + r) * nb + b) * bb..][..bb];
                    for c in 0..chunks(format) {
                        let to = &mut dst[64 * c + 4 * r..][..4];
                        to.copy_from_slice(&src[qs_at + 4 * c..][..4]);
                        if format == Q8_0 {
                            to.iter_mut().for_each(|v| *v ^= 0x80);
                        }
                    }
                    if format == Q5_0 {
                        let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                        let mut word = 0u32;
                        for h in 0..8 {
                            for j in 0..4 {
                                word |= ((qh >> half_value(h, j)) & 1) << (8 * j + h);
                            }
                        }
                        dst[256 + 4 * r..][..4].copy_from_slice(&word.to_le_bytes());
                    }
                    dst[scales + 2 * r..][..2].copy_from_slice(&src[..2]);
                    if format == Q4_1 {
                        dst[scales + 2 * ROWS + 2 * r..][..2].copy_from_slice(&src[2..4]);
                    }
                }
            }
        }
        Some(Packed {
            format,
            rows,
            nb,
            bytes,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// [`Q4_0`], [`Q4_1`], [`Q5_0`], [`Q8_0`] or [`Q4_K`].
    pub fn format(&self) -> u8 {
        self.format
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.nb
    }

    /// Row `row`'s values, as the file layout's blocks dequantize
    /// (`QuantType::dequantize_block`) to the last bit.
    pub fn row_to_f32(&self, row: usize, dst: &mut [f32]) {
        let (g, r) = (row / ROWS, row % ROWS);
        if self.format == Q4_K {
            let mut block = [0u8; 144];
            let units = dst[..self.nb * BLOCK].chunks_exact_mut(crate::quant::SUPER);
            for (sb, out) in units.enumerate() {
                let u = &self.bytes[g * self.group_bytes() + sb * K4_UNIT..][..K4_UNIT];
                block[..2].copy_from_slice(&u[K4_D + 2 * r..][..2]);
                block[2..4].copy_from_slice(&u[K4_DMIN + 2 * r..][..2]);
                let sc: [u8; 8] = std::array::from_fn(|p| u[K4_SC + ROWS * p + r]);
                let m: [u8; 8] = std::array::from_fn(|p| u[K4_M + ROWS * p + r]);
                block[4..16].copy_from_slice(&k4_pack_scale_min(&sc, &m));
                for j in 0..4 {
                    for c in 0..8 {
                        block[16 + 32 * j + 4 * c..][..4]
                            .copy_from_slice(&u[512 * j + 64 * c + 4 * r..][..4]);
                    }
                }
                QuantType::Q4_K.dequantize_block(&block, out);
            }
            return;
        }
        let (t, gb) = (quant_type(self.format), group_block(self.format));
        let (scales, qs_at) = (scales_at(self.format), qs_at(self.format));
        let mut block = [0u8; 34];
        for (b, out) in dst[..self.nb * BLOCK].chunks_exact_mut(BLOCK).enumerate() {
            let blk = &self.bytes[(g * self.nb + b) * gb..][..gb];
            block[..2].copy_from_slice(&blk[scales + 2 * r..][..2]);
            if self.format == Q4_1 {
                block[2..4].copy_from_slice(&blk[scales + 2 * ROWS + 2 * r..][..2]);
            }
            if self.format == Q5_0 {
                let word = u32::from_le_bytes(blk[256 + 4 * r..][..4].try_into().unwrap());
                let mut qh = 0u32;
                for h in 0..8 {
                    for j in 0..4 {
                        qh |= ((word >> (8 * j + h)) & 1) << half_value(h, j);
                    }
                }
                block[2..6].copy_from_slice(&qh.to_le_bytes());
            }
            for c in 0..chunks(self.format) {
                let to = &mut block[qs_at + 4 * c..][..4];
                to.copy_from_slice(&blk[64 * c + 4 * r..][..4]);
                if self.format == Q8_0 {
                    to.iter_mut().for_each(|v| *v ^= 0x80);
                }
            }
            t.dequantize_block(&block[..t.block_bytes()], out);
        }
    }

    /// The first byte of group `g`.
    pub fn group(&self, g: usize) -> *const u8 {
        self.bytes[g * self.group_bytes()..].as_ptr()
    }
}

/// The scalar twin of the vector kernel: row `row` of `w` with one activation row (`q` its
/// 8-bit values, `d` its block scales, `s` its blocks' integer sums, `ds` their `d · s`).
pub fn dot(w: &Packed, row: usize, q: &[i8], d: &[f32], s: &[i32], ds: &[f32]) -> f32 {
    let (g, r) = (row / ROWS, row % ROWS);
    if w.format == Q4_K {
        // piece by piece: acc = fma(isum, a · d_x, acc), then fma(c, d_x · Σ q_x, acc), with
        // a = d · sc and c = −dmin · m (both exact in f32)
        let mut acc = 0.0f32;
        for b in 0..w.nb {
            let (sb, p) = (b / 8, b % 8);
            let u = &w.bytes[g * w.group_bytes() + sb * K4_UNIT..][..K4_UNIT];
            let x = &q[b * BLOCK..][..BLOCK];
            let mut isum = 0i32;
            for c in 0..8 {
                for j in 0..4 {
                    let byte = u[512 * (p / 2) + 64 * c + 4 * r + j];
                    let v = if p % 2 == 0 { byte & 15 } else { byte >> 4 };
                    isum += v as i32 * x[4 * c + j] as i32;
                }
            }
            let f16 = |at: usize| half::f16::from_le_bytes([u[at], u[at + 1]]).to_f32();
            let a = f16(K4_D + 2 * r) * u[K4_SC + ROWS * p + r] as f32;
            let c = -f16(K4_DMIN + 2 * r) * u[K4_M + ROWS * p + r] as f32;
            acc = (isum as f32).mul_add(a * d[b], acc);
            acc = c.mul_add(ds[b], acc);
        }
        return acc;
    }
    let gb = group_block(w.format);
    let scales = scales_at(w.format);
    let mut acc = 0.0f32;
    for b in 0..w.nb {
        let blk = &w.bytes[(g * w.nb + b) * gb..][..gb];
        let x = &q[b * BLOCK..][..BLOCK];
        let mut isum = match w.format {
            Q4_0 => -8 * s[b],
            Q4_1 => 0,
            Q5_0 => -16 * s[b],
            _ => -128 * s[b],
        };
        // Q5_0's fifth bits (bit h of byte j: byte j of chunk half h)
        let fifth = |h: usize, j: usize| match w.format {
            Q5_0 => ((blk[256 + 4 * r + j] >> h) & 1) as i32 * 16,
            _ => 0,
        };
        for c in 0..chunks(w.format) {
            for j in 0..4 {
                let byte = blk[64 * c + 4 * r + j];
                if w.format == Q8_0 {
                    isum += byte as i32 * x[4 * c + j] as i32;
                } else {
                    isum += ((byte & 15) as i32 + fifth(c, j)) * x[4 * c + j] as i32;
                    isum += ((byte >> 4) as i32 + fifth(4 + c, j)) * x[16 + 4 * c + j] as i32;
                }
            }
        }
        let f16 = |at: usize| half::f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
        acc = (isum as f32).mul_add(f16(scales + 2 * r) * d[b], acc);
        if w.format == Q4_1 {
            acc = f16(scales + 2 * ROWS + 2 * r).mul_add(ds[b], acc);
        }
    }
    acc
}

/// One activation row for [`tile`]: 8-bit values, block scales, block sums and `d · s`.
#[derive(Clone, Copy)]
pub struct XRow {
    pub q: *const i8,
    pub d: *const f32,
    pub s: *const i32,
    pub ds: *const f32,
}

impl XRow {
    /// Row `i` of `xq`.
    pub fn of(xq: &crate::quant::QuantizedRows, i: usize) -> Self {
        let (q, d, s) = xq.row(i);
        XRow {
            q: q.as_ptr(),
            d: d.as_ptr(),
            s: s.as_ptr(),
            ds: xq.row_ds(i).as_ptr(),
        }
    }
}

/// One block's integer products, as floats: `start` plus the sixteen rows' weights `w[c]`
/// times activation bytes `4c..4c + 4` of `x` and `w[4 + c]` times bytes `16 + 4c..`, in two
/// chains (integer sums: the order does not change them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_sum(
    w: &[std::arch::x86_64::__m512i; 8],
    x: *const i32,
    start: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let mut s0 = start;
    let mut s1 = _mm512_setzero_si512();
    for c in 0..4 {
        let x0 = _mm512_set1_epi32(x.add(c).read_unaligned());
        let x1 = _mm512_set1_epi32(x.add(4 + c).read_unaligned());
        s0 = _mm512_dpbusd_epi32(s0, w[c], x0);
        s1 = _mm512_dpbusd_epi32(s1, w[4 + c], x1);
    }
    _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1))
}

/// The sixteen rows of group `g` (its first byte, `nb` blocks) with `MR` activation rows:
/// lane `r` of `out[i]` is row `r`'s product with row `i`, as [`dot`] computes it.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/DQ/VNNI, AVX2, FMA and F16C; `g` holds `nb` blocks of a
/// group of format `F`; each `xs[i]` holds `nb` blocks of values, scales and sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")]
pub unsafe fn tile<const F: u8, const MR: usize>(
    g: *const u8,
    nb: usize,
    xs: &[XRow; MR],
    out: &mut [[f32; ROWS]; MR],
) {
    use std::arch::x86_64::*;
    let gb = group_block(F);
    let scales = scales_at(F);
    let low4 = _mm512_set1_epi8(15);
    let bit4 = _mm512_set1_epi8(16);
    let mut acc = [_mm512_setzero_ps(); MR];
    for b in 0..nb {
        let blk = g.add(b * gb);
        // the group is one stream of bytes: ask for the block after next
        for line in 0..gb.div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(2 * gb + 64 * line) as *const i8);
        }
        // the weights for activation bytes 4c..4c + 4, c = 0..8
        let mut w = [_mm512_setzero_si512(); 8];
        for c in 0..chunks(F) {
            let v = _mm512_loadu_si512(blk.add(64 * c) as *const _);
            if F == Q8_0 {
                w[c] = v;
            } else {
                w[c] = _mm512_and_si512(v, low4);
                w[4 + c] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
            }
        }
        if F == Q5_0 {
            // bit h of each byte to bit 4: a shift of the 32-bit lanes by 4 − h (no bit of
            // another byte lands on bit 4), then the mask
            let hb = _mm512_loadu_si512(blk.add(256) as *const _);
            let fifth = |h: usize| {
                let moved = match h {
                    0 => _mm512_slli_epi32::<4>(hb),
                    1 => _mm512_slli_epi32::<3>(hb),
                    2 => _mm512_slli_epi32::<2>(hb),
                    3 => _mm512_slli_epi32::<1>(hb),
                    4 => hb,
                    5 => _mm512_srli_epi32::<1>(hb),
                    6 => _mm512_srli_epi32::<2>(hb),
                    _ => _mm512_srli_epi32::<3>(hb),
                };
                _mm512_and_si512(moved, bit4)
            };
            for (h, wh) in w.iter_mut().enumerate() {
                *wh = _mm512_or_si512(*wh, fifth(h));
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(scales) as *const __m256i));
        let mw = if F == Q4_1 {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                blk.add(scales + 2 * ROWS) as *const __m256i
            ))
        } else {
            _mm512_setzero_ps()
        };
        for i in 0..MR {
            let x = xs[i].q.add(b * BLOCK) as *const i32;
            let start = match F {
                Q4_1 => _mm512_setzero_si512(),
                Q4_0 => _mm512_set1_epi32(-8 * *xs[i].s.add(b)),
                Q5_0 => _mm512_set1_epi32(-16 * *xs[i].s.add(b)),
                _ => _mm512_set1_epi32(-128 * *xs[i].s.add(b)),
            };
            let isum = block_sum(&w, x, start);
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xs[i].d.add(b)));
            acc[i] = _mm512_fmadd_ps(isum, scale, acc[i]);
            if F == Q4_1 {
                acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs[i].ds.add(b)), acc[i]);
            }
        }
    }
    for i in 0..MR {
        _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
}

/// [`tile`] for a Q4_K group (see [`K4_UNIT`]), as [`dot`] computes it.
///
/// # Safety
/// As [`tile`]'s, with `g` holding `nb / 8` Q4_K super-blocks of a group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")]
pub unsafe fn tile_k4<const MR: usize>(
    g: *const u8,
    nb: usize,
    xs: &[XRow; MR],
    out: &mut [[f32; ROWS]; MR],
) {
    use std::arch::x86_64::*;
    let low4 = _mm512_set1_epi8(15);
    let mut acc = [_mm512_setzero_ps(); MR];
    let bytes16 = |p: *const u8| {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)))
    };
    for sb in 0..nb / 8 {
        let u = g.add(sb * K4_UNIT);
        for line in 0..K4_UNIT.div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(u.wrapping_add(K4_UNIT + 64 * line) as *const i8);
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(u.add(K4_D) as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(u.add(K4_DMIN) as *const __m256i));
        let neg_dmin = _mm512_sub_ps(_mm512_setzero_ps(), dmin);
        for j in 0..4 {
            let mut raw = [_mm512_setzero_si512(); 8];
            for (c, v) in raw.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(u.add(512 * j + 64 * c) as *const _);
            }
            for half in 0..2 {
                let p = 2 * j + half;
                let b = sb * 8 + p;
                let w: [__m512i; 8] = std::array::from_fn(|c| {
                    let v = if half == 0 {
                        raw[c]
                    } else {
                        _mm512_srli_epi16::<4>(raw[c])
                    };
                    _mm512_and_si512(v, low4)
                });
                let a = _mm512_mul_ps(d, bytes16(u.add(K4_SC + ROWS * p)));
                let cm = _mm512_mul_ps(neg_dmin, bytes16(u.add(K4_M + ROWS * p)));
                for i in 0..MR {
                    let x = xs[i].q.add(b * BLOCK) as *const i32;
                    let isum = block_sum(&w, x, _mm512_setzero_si512());
                    let scale = _mm512_mul_ps(a, _mm512_set1_ps(*xs[i].d.add(b)));
                    acc[i] = _mm512_fmadd_ps(isum, scale, acc[i]);
                    acc[i] = _mm512_fmadd_ps(cm, _mm512_set1_ps(*xs[i].ds.add(b)), acc[i]);
                }
            }
        }
    }
    for i in 0..MR {
        _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
}

/// [`block_sum`] on eight rows with AVX2: `maddubs` and `madd` give each lane the same exact
/// integer sum as `vpdpbusd`. Q8_0's bytes (`q + 128`) go back to signed and multiply by sign
/// (`|q| · sign(q) x`), so that no pair of products saturates the 16-bit sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_sum8(
    w: &[std::arch::x86_64::__m256i; 8],
    x: *const i32,
    start: std::arch::x86_64::__m256i,
    q8: bool,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut s0 = start;
    let mut s1 = _mm256_setzero_si256();
    for (c, &wc) in w.iter().enumerate() {
        let xc = _mm256_set1_epi32(x.add(c).read_unaligned());
        let pairs = if q8 {
            let ws = _mm256_xor_si256(wc, _mm256_set1_epi8(-128));
            _mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(xc, ws))
        } else {
            _mm256_maddubs_epi16(wc, xc)
        };
        let quads = _mm256_madd_epi16(pairs, ones);
        if c % 2 == 0 {
            s0 = _mm256_add_epi32(s0, quads);
        } else {
            s1 = _mm256_add_epi32(s1, quads);
        }
    }
    _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1))
}

/// [`tile`] with AVX2, eight rows (half `h` of the group's lanes) at a time: the same
/// operations lane by lane, so the same bits.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; otherwise as [`tile`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<const F: u8, const MR: usize>(
    g: *const u8,
    nb: usize,
    xs: &[XRow; MR],
    out: &mut [[f32; ROWS]; MR],
) {
    use std::arch::x86_64::*;
    let (gb, scales) = (group_block(F), scales_at(F));
    let low4 = _mm256_set1_epi8(15);
    let bit4 = _mm256_set1_epi8(16);
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); MR];
        for b in 0..nb {
            let blk = g.add(b * gb);
            if h == 0 {
                for line in 0..gb.div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(2 * gb + 64 * line) as *const i8);
                }
            }
            let mut w = [_mm256_setzero_si256(); 8];
            for c in 0..chunks(F) {
                let v = _mm256_loadu_si256(blk.add(64 * c + 32 * h) as *const __m256i);
                if F == Q8_0 {
                    w[c] = v;
                } else {
                    w[c] = _mm256_and_si256(v, low4);
                    w[4 + c] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4);
                }
            }
            if F == Q5_0 {
                let hb = _mm256_loadu_si256(blk.add(256 + 32 * h) as *const __m256i);
                let moved = [
                    _mm256_slli_epi32::<4>(hb),
                    _mm256_slli_epi32::<3>(hb),
                    _mm256_slli_epi32::<2>(hb),
                    _mm256_slli_epi32::<1>(hb),
                    hb,
                    _mm256_srli_epi32::<1>(hb),
                    _mm256_srli_epi32::<2>(hb),
                    _mm256_srli_epi32::<3>(hb),
                ];
                for (wh, m) in w.iter_mut().zip(moved) {
                    *wh = _mm256_or_si256(*wh, _mm256_and_si256(m, bit4));
                }
            }
            let f16x8 = |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(at) as *const __m128i));
            let dw = f16x8(scales + 16 * h);
            let mw = if F == Q4_1 {
                f16x8(scales + 2 * ROWS + 16 * h)
            } else {
                _mm256_setzero_ps()
            };
            for i in 0..MR {
                let x = xs[i].q.add(b * BLOCK) as *const i32;
                // Q8_0 multiplies signed weights here: no offset to take back
                let start = match F {
                    Q4_0 => -8 * *xs[i].s.add(b),
                    Q5_0 => -16 * *xs[i].s.add(b),
                    _ => 0,
                };
                let isum = block_sum8(&w, x, _mm256_set1_epi32(start), F == Q8_0);
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xs[i].d.add(b)));
                acc[i] = _mm256_fmadd_ps(isum, scale, acc[i]);
                if F == Q4_1 {
                    acc[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs[i].ds.add(b)), acc[i]);
                }
            }
        }
        for i in 0..MR {
            _mm256_storeu_ps(out[i][8 * h..].as_mut_ptr(), acc[i]);
        }
    }
}

/// [`tile_k4`] with AVX2, eight rows at a time (see [`tile_avx2`]).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; otherwise as [`tile_k4`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_k4_avx2<const MR: usize>(
    g: *const u8,
    nb: usize,
    xs: &[XRow; MR],
    out: &mut [[f32; ROWS]; MR],
) {
    use std::arch::x86_64::*;
    let low4 = _mm256_set1_epi8(15);
    let bytes8 = |p: *const u8| {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    };
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); MR];
        for sb in 0..nb / 8 {
            let u = g.add(sb * K4_UNIT);
            let f16x8 = |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(u.add(at) as *const __m128i));
            let d = f16x8(K4_D + 16 * h);
            let neg_dmin = _mm256_sub_ps(_mm256_setzero_ps(), f16x8(K4_DMIN + 16 * h));
            for j in 0..4 {
                for half in 0..2 {
                    let p = 2 * j + half;
                    let b = sb * 8 + p;
                    let w: [__m256i; 8] = std::array::from_fn(|c| {
                        let v = _mm256_loadu_si256(u.add(512 * j + 64 * c + 32 * h) as *const _);
                        let v = if half == 0 {
                            v
                        } else {
                            _mm256_srli_epi16::<4>(v)
                        };
                        _mm256_and_si256(v, low4)
                    });
                    let a = _mm256_mul_ps(d, bytes8(u.add(K4_SC + ROWS * p + 8 * h)));
                    let cm = _mm256_mul_ps(neg_dmin, bytes8(u.add(K4_M + ROWS * p + 8 * h)));
                    for i in 0..MR {
                        let x = xs[i].q.add(b * BLOCK) as *const i32;
                        let isum = block_sum8(&w, x, _mm256_setzero_si256(), false);
                        let scale = _mm256_mul_ps(a, _mm256_set1_ps(*xs[i].d.add(b)));
                        acc[i] = _mm256_fmadd_ps(isum, scale, acc[i]);
                        acc[i] = _mm256_fmadd_ps(cm, _mm256_set1_ps(*xs[i].ds.add(b)), acc[i]);
                    }
                }
            }
        }
        for i in 0..MR {
            _mm256_storeu_ps(out[i][8 * h..].as_mut_ptr(), acc[i]);
        }
    }
}
