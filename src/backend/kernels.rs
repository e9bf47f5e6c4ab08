//! The kernels of `csrc/` as typed Rust calls: each kernel's parameter list, block size,
//! grid and shared memory stated once, here. A function per kernel returns a [`Launch`] (the
//! kernel's name, its geometry and its arguments packed as `cuLaunchKernel` takes them); the
//! CUDA backend runs it on its driver (the GPU or the emulator), `tests/kernels.rs` on its
//! test devices, so neither restates an argument list or a block size.
//!
//! Compiled in every build (no CUDA needed): the kernel tests run on the emulator without the
//! `cuda` feature. Building a `Launch` is safe; running one is `unsafe` at the driver, whose
//! caller promises that the addresses are live device buffers of the shapes stated below.

use std::ffi::c_void;

/// A device address (`CUdeviceptr`; the emulator's host address).
pub type DevPtr = u64;

/// Threads per block of the row kernels (norms, embedding, RoPE, gather, elementwise).
pub const ROW_THREADS: u32 = 256;
/// Warps (of 32 threads) per attention block; must match `ATTN_WARPS` in csrc/kernels.cu.
pub const ATTN_WARPS: u32 = 4;
/// Threads per block of `sg_sample` (one block per row).
pub const SAMPLE_THREADS: u32 = 1024;
/// Largest query-head group and head size the attention kernels handle (csrc/kernels.cu).
pub const MAX_GROUP: usize = 8;
pub const MAX_HEAD_DIM: usize = 256;
/// Head sizes with attention kernels specialised at compile time (`sg_attention_d{dim}_g{g}`
/// for every group 1..=MAX_GROUP); other head sizes run the generic `sg_attention`.
pub const FIXED_HEAD_DIMS: [usize; 2] = [64, 128];
/// Most blocks a grid-stride elementwise kernel is launched with.
const MAX_ELEMENTWISE_BLOCKS: u32 = 4096;

/// The specialised attention kernels, `[head size][group - 1]` (`FIXED_HEAD_DIMS` order).
const FIXED_ATTENTION: [[&str; MAX_GROUP]; FIXED_HEAD_DIMS.len()] = [
    [
        "sg_attention_d64_g1",
        "sg_attention_d64_g2",
        "sg_attention_d64_g3",
        "sg_attention_d64_g4",
        "sg_attention_d64_g5",
        "sg_attention_d64_g6",
        "sg_attention_d64_g7",
        "sg_attention_d64_g8",
    ],
    [
        "sg_attention_d128_g1",
        "sg_attention_d128_g2",
        "sg_attention_d128_g3",
        "sg_attention_d128_g4",
        "sg_attention_d128_g5",
        "sg_attention_d128_g6",
        "sg_attention_d128_g7",
        "sg_attention_d128_g8",
    ],
];
/// Most parameters a kernel takes (the attention kernels').
const MAX_PARAMS: usize = 17;

/// Every kernel of the fatbin, by name (the specialised attention instantiations included).
pub fn all_kernel_names() -> Vec<&'static str> {
    let mut names = vec![
        "sg_embedding",
        "sg_rms_norm",
        "sg_add_rms_norm",
        "sg_f32_to_bf16",
        "sg_silu_mul",
        "sg_rope_store_kv",
        "sg_gather_rows",
        "sg_attention",
        "sg_attention_merge",
        "sg_prefill_attention_d64",
        "sg_prefill_attention_d128",
        "sg_sample",
    ];
    names.extend(FIXED_ATTENTION.iter().flatten());
    names
}

/// Dynamic shared memory of an attention block (csrc/kernels.cu): per warp and query head of
/// the group, the running max, the sum and the accumulator.
pub fn attention_smem_bytes(group: usize, head_dim: usize) -> u32 {
    (ATTN_WARPS as usize * group * (head_dim + 2) * 4) as u32
}

/// New tokens per warp of the tensor-core prefill attention (csrc/kernels.cu, PREFILL_ROWS).
pub const PREFILL_ROWS: usize = 16;

/// The tensor-core prefill attention kernel for a head size (None: not instantiated; prefill
/// then runs the decode kernels).
pub fn prefill_attention_kernel_name(head_dim: usize) -> Option<&'static str> {
    match head_dim {
        64 => Some("sg_prefill_attention_d64"),
        128 => Some("sg_prefill_attention_d128"),
        _ => None,
    }
}

/// The attention kernel for a head size and query-head group.
pub fn attention_kernel_name(head_dim: usize, group: usize) -> &'static str {
    match FIXED_HEAD_DIMS.iter().position(|&d| d == head_dim) {
        Some(d) if (1..=MAX_GROUP).contains(&group) => FIXED_ATTENTION[d][group - 1],
        _ => "sg_attention",
    }
}

/// One kernel launch: name, geometry and arguments (each at most 8 bytes, kept in its own
/// 8-byte slot, little-endian, as the kernel reads its parameter's size from the address).
/// Built and run without allocating (a decode step makes about ten per layer).
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared: u32,
    slots: [u64; MAX_PARAMS],
    n: usize,
}

/// A kernel parameter: a device address or a scalar.
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ptr(DevPtr),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Launch {
    fn new(kernel: &'static str, grid: (u32, u32, u32), block: u32) -> Self {
        Self {
            kernel,
            grid,
            block,
            shared: 0,
            slots: [0; MAX_PARAMS],
            n: 0,
        }
    }

    fn rows(kernel: &'static str, rows: usize) -> Self {
        Self::new(kernel, (rows as u32, 1, 1), ROW_THREADS)
    }

    /// A grid-stride kernel over `n` elements.
    fn elementwise(kernel: &'static str, n: usize) -> Self {
        let blocks = (n as u32)
            .div_ceil(ROW_THREADS)
            .clamp(1, MAX_ELEMENTWISE_BLOCKS);
        Self::new(kernel, (blocks, 1, 1), ROW_THREADS)
    }

    fn args(mut self, args: &[Arg]) -> Self {
        for (slot, a) in self.slots.iter_mut().zip(args) {
            *slot = match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::I64(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
            };
        }
        assert!(
            args.len() <= MAX_PARAMS,
            "{}: raise MAX_PARAMS",
            self.kernel
        );
        self.n = args.len();
        self
    }

    /// The same launch with another grid (tests probing a grid-stride kernel's other
    /// geometries).
    pub fn with_grid(mut self, grid: (u32, u32, u32)) -> Self {
        self.grid = grid;
        self
    }

    /// The same launch with another block size (tests that run a block-size-generic kernel
    /// smaller, where the emulator is slow at the backend's size).
    pub fn with_block(mut self, block: u32) -> Self {
        self.block = block;
        self
    }

    /// Calls `f` with `cuLaunchKernel`'s parameter array: one pointer per parameter, into
    /// this launch.
    pub fn with_params<R>(&mut self, f: impl FnOnce(&mut [*mut c_void]) -> R) -> R {
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_PARAMS];
        for (p, s) in params.iter_mut().zip(&mut self.slots) {
            *p = s as *mut u64 as *mut c_void;
        }
        f(&mut params[..self.n])
    }
}

use Arg::{Ptr, F32, I32, I64};

/// `out[t] = table[ids[t] - start]` as f32 (0 where the id is outside `[start, start+rows)`:
/// another rank's vocabulary shard); table bf16 `[rows][hidden]`, one block per token. An id
/// with [`FUTURE_TOKEN`](crate::batch::FUTURE_TOKEN) set is `future[id & !FUTURE_TOKEN]` (the previous step's sampled
/// tokens, still on the device).
#[allow(clippy::too_many_arguments)]
pub fn embedding(
    table: DevPtr,
    ids: DevPtr,
    future: DevPtr,
    out: DevPtr,
    tokens: usize,
    hidden: usize,
    start: usize,
    rows: usize,
) -> Launch {
    Launch::rows("sg_embedding", tokens).args(&[
        Ptr(table),
        Ptr(ids),
        Ptr(future),
        Ptr(out),
        I32(hidden as i32),
        I32(start as i32),
        I32(rows as i32),
    ])
}

/// RMSNorm of `rows` f32 rows of `hidden` with bf16 weights, written as bf16.
pub fn rms_norm(x: DevPtr, w: DevPtr, out: DevPtr, rows: usize, hidden: usize, eps: f32) -> Launch {
    Launch::rows("sg_rms_norm", rows).args(&[
        Ptr(x),
        Ptr(w),
        Ptr(out),
        I32(hidden as i32),
        F32(eps),
    ])
}

/// `residual += delta` (f32, in place), then RMSNorm of the sum into `out` (bf16).
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    residual: DevPtr,
    delta: DevPtr,
    w: DevPtr,
    out: DevPtr,
    rows: usize,
    hidden: usize,
    eps: f32,
) -> Launch {
    Launch::rows("sg_add_rms_norm", rows).args(&[
        Ptr(residual),
        Ptr(delta),
        Ptr(w),
        Ptr(out),
        I32(hidden as i32),
        F32(eps),
    ])
}

/// `n` f32 values as bf16 (round to nearest even).
pub fn f32_to_bf16(x: DevPtr, out: DevPtr, n: usize) -> Launch {
    Launch::elementwise("sg_f32_to_bf16", n).args(&[Ptr(x), Ptr(out), I64(n as i64)])
}

/// `out = silu(gate) * up` (bf16) from rows `[gate | up]` of `2 * width` f32, `n` outputs.
pub fn silu_mul(gate_up: DevPtr, out: DevPtr, width: usize, n: usize) -> Launch {
    Launch::elementwise("sg_silu_mul", n).args(&[
        Ptr(gate_up),
        Ptr(out),
        I32(width as i32),
        I64(n as i64),
    ])
}

/// RoPE on q and k of each token's `[q | k | v]` row (cos/sin tables on the device, by
/// position), then k and v stored as bf16 into the paged caches at the token's slot.
#[allow(clippy::too_many_arguments)]
pub fn rope_store_kv(
    q: DevPtr,
    cos: DevPtr,
    sin: DevPtr,
    positions: DevPtr,
    slots: DevPtr,
    k_cache: DevPtr,
    v_cache: DevPtr,
    tokens: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Launch {
    Launch::rows("sg_rope_store_kv", tokens).args(&[
        Ptr(q),
        Ptr(cos),
        Ptr(sin),
        Ptr(positions),
        Ptr(slots),
        Ptr(k_cache),
        Ptr(v_cache),
        I32(q_heads as i32),
        I32(kv_heads as i32),
        I32(head_dim as i32),
    ])
}

/// `out[i] = x[idx[i]]` for `rows` bf16 rows of `width`.
pub fn gather_rows(x: DevPtr, idx: DevPtr, out: DevPtr, rows: usize, width: usize) -> Launch {
    Launch::rows("sg_gather_rows", rows).args(&[Ptr(x), Ptr(idx), Ptr(out), I32(width as i32)])
}

/// One attention step over the paged KV cache: its buffers and shape.
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    /// q rows `[q | k | v]` (f32) `q_stride` floats apart; the K and V caches (bf16); the
    /// output (bf16 `[tokens][q_heads * head_dim]`)
    pub q: DevPtr,
    pub q_stride: usize,
    pub k_cache: DevPtr,
    pub v_cache: DevPtr,
    pub out: DevPtr,
    /// per token: position and sequence; per sequence: first block-table entry; the tables
    pub positions: DevPtr,
    pub token_seq: DevPtr,
    pub seq_table_start: DevPtr,
    pub block_tables: DevPtr,
    pub tokens: usize,
    pub page_size: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// splits along the sequence (`backend::split`), none shorter than `min_split_len`; with
    /// more than one, partial results go to `ml` (max and sum) and `acc` and a merge follows
    pub splits: usize,
    pub min_split_len: usize,
    pub ml: DevPtr,
    pub acc: DevPtr,
}

impl Attention {
    /// The attention kernel for this shape (specialised on head size and group where one
    /// exists), then, when split, the merge of its partial results.
    pub fn launches(&self) -> Vec<Launch> {
        let group = self.q_heads / self.kv_heads.max(1);
        let mut attention = Launch::new(
            attention_kernel_name(self.head_dim, group),
            (self.tokens as u32, self.kv_heads as u32, self.splits as u32),
            ATTN_WARPS * 32,
        )
        .args(&self.with_step_args(&[
            I32(self.page_size as i32),
            I32(self.q_heads as i32),
            I32(self.kv_heads as i32),
            I32(self.head_dim as i32),
            F32(1.0 / (self.head_dim as f32).sqrt()),
            I32(self.min_split_len as i32),
            Ptr(self.ml),
            Ptr(self.acc),
        ]));
        attention.shared = attention_smem_bytes(group, self.head_dim);
        let mut out = vec![attention];
        if self.splits > 1 {
            out.push(
                Launch::new(
                    "sg_attention_merge",
                    ((self.tokens * self.q_heads) as u32, 1, 1),
                    (self.head_dim as u32).next_multiple_of(32).min(ROW_THREADS),
                )
                .args(&[
                    Ptr(self.ml),
                    Ptr(self.acc),
                    Ptr(self.out),
                    I32(self.splits as i32),
                    I32(self.head_dim as i32),
                ]),
            );
        }
        out
    }

    /// Prefill attention on tensor cores (`sg_prefill_attention_d{64,128}`) for the tokens
    /// from `first` on (those before are decode tokens, for [`Attention::launches`] with
    /// `tokens: first`): one warp per [`PREFILL_ROWS`] tokens and query head, ATTN_WARPS
    /// warps per block, no split (the split fields are not read). None for other head sizes.
    pub fn prefill_launch(&self, first: usize) -> Option<Launch> {
        let kernel = prefill_attention_kernel_name(self.head_dim)?;
        let tiles =
            (self.tokens - first.min(self.tokens)).div_ceil(PREFILL_ROWS * ATTN_WARPS as usize);
        Some(
            Launch::new(
                kernel,
                (tiles.max(1) as u32, self.q_heads as u32, 1),
                ATTN_WARPS * 32,
            )
            .args(&self.with_step_args(&[
                I32(first as i32),
                I32(self.tokens as i32),
                I32(self.page_size as i32),
                I32(self.q_heads as i32),
                I32(self.kv_heads as i32),
                F32(1.0 / (self.head_dim as f32).sqrt()),
            ])),
        )
    }

    /// The arguments every attention kernel starts with (q and its stride, the caches, the
    /// output, the step's positions, sequences and block tables), then `rest`.
    fn with_step_args(&self, rest: &[Arg]) -> Vec<Arg> {
        let mut args = vec![
            Ptr(self.q),
            I32(self.q_stride as i32),
            Ptr(self.k_cache),
            Ptr(self.v_cache),
            Ptr(self.out),
            Ptr(self.positions),
            Ptr(self.token_seq),
            Ptr(self.seq_table_start),
            Ptr(self.block_tables),
        ];
        args.extend_from_slice(rest);
        args
    }
}

/// Device sampling of `rows` logits rows of `vocab` (csrc/sampling.cu): `rows_params` holds
/// one `SampleRow` per row, `work` `device_work_words(vocab)` words per row, `lists` the
/// rows' lists as `SampleBatch::lists` lays them out (at least one element).
pub struct Sample {
    pub logits: DevPtr,
    pub work: DevPtr,
    pub rows_params: DevPtr,
    pub lists: DevPtr,
    pub rows: usize,
    pub vocab: usize,
    pub max_top: usize,
    /// out: token and its logprob per row; the top logprobs `[rows][max_top]`
    pub token: DevPtr,
    pub logprob: DevPtr,
    pub top_ids: DevPtr,
    pub top_logprobs: DevPtr,
}

impl Sample {
    pub fn launch(&self) -> Launch {
        Launch::new("sg_sample", (self.rows as u32, 1, 1), SAMPLE_THREADS).args(&[
            Ptr(self.logits),
            Ptr(self.work),
            Ptr(self.rows_params),
            Ptr(self.lists),
            I32(self.vocab as i32),
            I32(self.max_top as i32),
            Ptr(self.token),
            Ptr(self.logprob),
            Ptr(self.top_ids),
            Ptr(self.top_logprobs),
        ])
    }
}

/// Every kernel as the backend launches it at the anchor shape (Llama-3-8B: hidden 4096, 32
/// query and 8 KV heads of 128, vocabulary 128,256; one token; a split attention so that the
/// merge appears; each specialised attention kernel at its own head size and group), with
/// null addresses: the geometry the static report (`cuda::report`) evaluates.
pub fn anchor_launches() -> Vec<Launch> {
    let (hidden, heads, kv_heads, dim) = (4096, 32, 8, 128);
    let attention = |head_dim: usize, group: usize| Attention {
        q: 0,
        q_stride: (group + 2) * kv_heads * head_dim,
        k_cache: 0,
        v_cache: 0,
        out: 0,
        positions: 0,
        token_seq: 0,
        seq_table_start: 0,
        block_tables: 0,
        tokens: 1,
        page_size: 16,
        q_heads: group * kv_heads,
        kv_heads,
        head_dim,
        splits: 2,
        min_split_len: 256,
        ml: 0,
        acc: 0,
    };
    let mut out = vec![
        embedding(0, 0, 0, 0, 1, hidden, 0, 128_256),
        rms_norm(0, 0, 0, 1, hidden, 1e-5),
        add_rms_norm(0, 0, 0, 0, 1, hidden, 1e-5),
        f32_to_bf16(0, 0, hidden),
        silu_mul(0, 0, 14_336, 14_336),
        rope_store_kv(0, 0, 0, 0, 0, 0, 0, 1, heads, kv_heads, dim),
        gather_rows(0, 0, 0, 1, hidden),
    ];
    // the generic kernel at the anchor's own shape (whose instantiation exists), the merge
    let mut generic = attention(dim, heads / kv_heads).launches();
    generic[0].kernel = "sg_attention";
    out.extend(generic);
    for d in FIXED_HEAD_DIMS {
        out.extend((1..=MAX_GROUP).map(|g| attention(d, g).launches().remove(0)));
        // the tensor-core prefill, at a 512-token chunk
        let prefill = Attention {
            tokens: 512,
            ..attention(d, heads / kv_heads)
        };
        out.extend(prefill.prefill_launch(0));
    }
    out.push(
        Sample {
            logits: 0,
            work: 0,
            rows_params: 0,
            lists: 0,
            rows: 1,
            vocab: 128_256,
            max_top: 20,
            token: 0,
            logprob: 0,
            top_ids: 0,
            top_logprobs: 0,
        }
        .launch(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_sit_in_the_low_bytes_of_their_slots() {
        let mut l = rms_norm(0x1000, 0x2000, 0x3000, 3, 576, 1e-5);
        assert_eq!(l.kernel, "sg_rms_norm");
        assert_eq!((l.grid, l.block, l.shared), ((3, 1, 1), ROW_THREADS, 0));
        l.with_params(|p| {
            assert_eq!(p.len(), 5);
            // SAFETY: each pointer addresses a live 8-byte slot of `l`.
            unsafe {
                assert_eq!(*(p[0] as *const u64), 0x1000);
                assert_eq!(*(p[3] as *const i32), 576);
                assert_eq!(*(p[4] as *const f32), 1e-5);
            }
        });
    }

    #[test]
    fn attention_picks_its_instantiation_and_merges_only_when_split() {
        let mut a = Attention {
            q: 1,
            q_stride: 48 * 128,
            k_cache: 2,
            v_cache: 3,
            out: 4,
            positions: 5,
            token_seq: 6,
            seq_table_start: 7,
            block_tables: 8,
            tokens: 2,
            page_size: 16,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            splits: 1,
            min_split_len: 256,
            ml: 0,
            acc: 0,
        };
        let one = a.launches();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].kernel, "sg_attention_d128_g4");
        assert_eq!(one[0].grid, (2, 8, 1));
        assert_eq!(one[0].shared, attention_smem_bytes(4, 128));
        a.splits = 5;
        a.head_dim = 80;
        let two = a.launches();
        assert_eq!(two[0].kernel, "sg_attention");
        assert_eq!(two[1].kernel, "sg_attention_merge");
        assert_eq!(two[1].grid, (64, 1, 1));
        assert_eq!(two[1].block, 96);
        assert_eq!(all_kernel_names().len(), 12 + 16);
        // the tensor-core prefill: tokens from `first` on, 64 per block, one block row per
        // query head; none for a head size without its instantiation
        a.head_dim = 128;
        a.tokens = 2 + 130;
        let p = a.prefill_launch(2).expect("d128");
        assert_eq!(p.kernel, "sg_prefill_attention_d128");
        assert_eq!(p.grid, (3, 32, 1));
        assert_eq!(p.block, ATTN_WARPS * 32);
        a.head_dim = 80;
        assert!(a.prefill_launch(0).is_none());
    }

    #[test]
    fn attention_names_follow_the_instantiations_in_csrc() {
        for d in FIXED_HEAD_DIMS {
            for g in 1..=MAX_GROUP {
                assert_eq!(
                    attention_kernel_name(d, g),
                    format!("sg_attention_d{d}_g{g}")
                );
            }
            assert_eq!(attention_kernel_name(d, MAX_GROUP + 1), "sg_attention");
        }
        assert_eq!(attention_kernel_name(80, 2), "sg_attention");
    }

    #[test]
    fn the_anchor_shape_launches_every_kernel_once() {
        let mut launched: Vec<&str> = anchor_launches().into_iter().map(|l| l.kernel).collect();
        let mut all = all_kernel_names();
        launched.sort();
        all.sort();
        assert_eq!(launched, all);
    }
}
