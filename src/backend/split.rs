//! How a GPU attention step is split along the sequence (flash-decoding). One block per
//! (token, KV head) leaves most of a GPU idle when a few sequences decode with long contexts
//! (batch 1 of the default model: 3 blocks for 132 SMs); splitting each context into chunks
//! that separate blocks reduce, then merging them, fills it. Kept apart from the CUDA backend
//! so the policy is tested in every build.

/// Fewest positions one split covers: below this the merge costs more than it saves.
pub const MIN_SPLIT_LEN: usize = 256;
/// Most splits per (token, KV head); bounds the partial-results workspace.
pub const MAX_SPLITS: usize = 32;

/// `(splits, split_len)` for a step of `tokens` new tokens over `kv_heads` KV heads whose
/// longest context is `max_context` positions, on a GPU with `sms` multiprocessors.
/// `splits == 1` means one pass without merging.
pub fn attention_splits(
    tokens: usize,
    kv_heads: usize,
    max_context: usize,
    sms: usize,
) -> (usize, usize) {
    let blocks = (tokens * kv_heads).max(1);
    if blocks >= sms || max_context <= MIN_SPLIT_LEN {
        return (1, max_context.max(1));
    }
    let want = (2 * sms).div_ceil(blocks);
    let splits = want
        .min(max_context.div_ceil(MIN_SPLIT_LEN))
        .clamp(1, MAX_SPLITS);
    let split_len = max_context.div_ceil(splits);
    (max_context.div_ceil(split_len), split_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_context_and_respect_the_bounds() {
        for tokens in [1, 2, 8, 64, 512] {
            for kv_heads in [1, 3, 8] {
                for ctx in [1, 100, 256, 257, 1000, 4096, 32768, 131072] {
                    let (s, len) = attention_splits(tokens, kv_heads, ctx, 132);
                    assert!((1..=MAX_SPLITS).contains(&s));
                    assert!(
                        s * len >= ctx && (s - 1) * len < ctx,
                        "{s} x {len} vs {ctx}"
                    );
                    if s > 1 {
                        assert!(len >= MIN_SPLIT_LEN / 2, "{len}");
                    }
                }
            }
        }
        // batch-1 decode of the default model (3 KV heads) at 4096 tokens: 16 splits
        assert_eq!(attention_splits(1, 3, 4096, 132), (16, 256));
        // enough blocks already (prefill, large batches): one pass
        assert_eq!(attention_splits(512, 3, 4096, 132).0, 1);
        assert_eq!(attention_splits(64, 8, 4096, 132).0, 1);
        // short contexts: one pass
        assert_eq!(attention_splits(1, 3, 200, 132).0, 1);
        // the cap
        assert_eq!(attention_splits(1, 1, 131072, 132).0, MAX_SPLITS);
    }
}
