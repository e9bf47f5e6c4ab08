//! How a GPU attention step is split along the sequence (flash-decoding). One block per
//! (token, KV head) leaves most of a GPU idle when a few sequences decode with long contexts
//! (batch 1 of the default model: 3 blocks for 132 SMs); splitting each context into chunks
//! that separate blocks reduce, then merging them, fills it. Kept apart from the CUDA backend
//! so the policy is tested in every build.
//!
//! The number of splits depends on the batch and the GPU alone, never on context lengths: a
//! decode step's grid is then fixed per batch size (a captured CUDA graph replays at any
//! length), and each token's kernel divides its own context among the splits, no split
//! shorter than [`MIN_SPLIT_LEN`] (short contexts leave the later splits empty, which the
//! merge skips).

/// Fewest positions one split covers: below this the merge costs more than it saves.
pub const MIN_SPLIT_LEN: usize = 256;
/// Most splits per (token, KV head); bounds the partial-results workspace.
pub const MAX_SPLITS: usize = 32;

/// Splits for a step of `tokens` new tokens over `kv_heads` KV heads on a GPU with `sms`
/// multiprocessors: enough blocks for about two per multiprocessor. 1 means one pass
/// without merging.
pub fn attention_splits(tokens: usize, kv_heads: usize, sms: usize) -> usize {
    let blocks = (tokens * kv_heads).max(1);
    if blocks >= sms {
        return 1;
    }
    (2 * sms).div_ceil(blocks).clamp(1, MAX_SPLITS)
}

/// Positions `[begin, end)` of split `z` of `splits` for a token whose context holds
/// `context` positions: the kernels' rule (`split_range` in csrc/kernels.cu), for tests.
pub fn split_range(context: usize, splits: usize, z: usize) -> (usize, usize) {
    let len = MIN_SPLIT_LEN.max(context.div_ceil(splits));
    let begin = z * len;
    (begin.min(context), (begin + len).min(context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_and_cover_every_context() {
        for tokens in [1, 2, 8, 64, 512] {
            for kv_heads in [1, 3, 8] {
                let s = attention_splits(tokens, kv_heads, 132);
                assert!((1..=MAX_SPLITS).contains(&s));
                if s > 1 {
                    let filled = tokens * kv_heads * s >= 132;
                    assert!(filled || s == MAX_SPLITS, "{tokens} x {kv_heads} x {s}");
                }
                for ctx in [1, 100, 256, 257, 1000, 4096, 32768, 131072] {
                    // the splits tile the context in order, none longer than needed
                    let mut at = 0;
                    for z in 0..s {
                        let (b, e) = split_range(ctx, s, z);
                        assert_eq!(b, at.min(ctx), "{ctx} split {z}");
                        assert!(e - b <= MIN_SPLIT_LEN.max(ctx.div_ceil(s)));
                        at = e;
                    }
                    assert_eq!(at, ctx, "{ctx} in {s} splits");
                }
            }
        }
        // batch-1 decode of the default model (3 KV heads): 88 splits wanted, capped
        assert_eq!(attention_splits(1, 3, 132), MAX_SPLITS);
        // Llama-3-8B (8 KV heads): 33 wanted, capped; at 4096 tokens 16 of 256 positions
        assert_eq!(attention_splits(1, 8, 132), MAX_SPLITS);
        assert_eq!(split_range(4096, 32, 15), (3840, 4096));
        assert_eq!(split_range(4096, 32, 16), (4096, 4096));
        // batch 8 of Llama-3-8B: 5 splits; enough blocks already (prefill, large batches): one pass
        assert_eq!(attention_splits(8, 8, 132), 5);
        assert_eq!(attention_splits(512, 3, 132), 1);
        assert_eq!(attention_splits(64, 8, 132), 1);
        // a short context uses the first split only
        assert_eq!(split_range(200, 32, 0), (0, 200));
        assert_eq!(split_range(200, 32, 1), (200, 200));
    }
}
