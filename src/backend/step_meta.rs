//! A step's whole input to a device as one array of 32-bit words, so that it travels in one
//! copy: token ids, positions, KV slots, each token's sequence, each sequence's first
//! block-table entry, the rows whose logits are wanted, the sampling rows, then the block
//! tables and the sampling lists.
//!
//! The fixed part's offsets depend only on four counts (tokens, sequences, logits rows,
//! sampling rows), never on context lengths or list sizes: the variable part (the "arena") is
//! reached through offsets stored in the fixed part (`seq_table_start`, each `SampleRow`'s
//! list offsets), and the kernels take the array's base for the block tables and the lists.
//! A captured CUDA graph whose step has the same counts therefore finds everything where it
//! was at capture, whatever the contexts and sampling lists of the step it replays. Kept
//! apart from the CUDA backend so that every build tests it.

use crate::batch::StepBatch;
use crate::sampling::{SampleBatch, SampleRow, MAX_TOP_LOGPROBS};

/// 32-bit words of one [`SampleRow`].
pub const ROW_WORDS: usize = std::mem::size_of::<SampleRow>() / 4;

/// Where each part of a step's metadata lies, in 32-bit words from the array's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLayout {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    /// Per token, its sequence's index.
    pub token_seq: usize,
    /// Per sequence, the word of its first block-table entry (an absolute word offset).
    pub seq_table_start: usize,
    pub logit_rows: usize,
    /// `SampleRow`s (8-byte aligned: a row holds an f64).
    pub sample_rows: usize,
    /// Start of the variable part: the block tables, then the sampling lists.
    pub arena: usize,
    /// Words of this step (what is copied).
    pub words: usize,
}

impl MetaLayout {
    /// The fixed part for a step of `tokens` tokens, `seqs` sequences, `logit_rows` logits
    /// rows and `sample_rows` sampling rows (`words` covers the fixed part only).
    pub fn fixed(tokens: usize, seqs: usize, logit_rows: usize, sample_rows: usize) -> Self {
        let positions = tokens;
        let slots = positions + tokens;
        let token_seq = slots + tokens;
        let seq_table_start = token_seq + tokens;
        let logit_rows_at = seq_table_start + seqs;
        let sample_rows_at = (logit_rows_at + logit_rows).next_multiple_of(2);
        let arena = sample_rows_at + sample_rows * ROW_WORDS;
        Self {
            tokens: 0,
            positions,
            slots,
            token_seq,
            seq_table_start,
            logit_rows: logit_rows_at,
            sample_rows: sample_rows_at,
            arena,
            words: arena,
        }
    }

    /// Tokens of the step (the length of each per-token array).
    pub fn token_count(&self) -> usize {
        self.seq_table_start - self.token_seq
    }

    /// `SampleRow`s of the step.
    pub fn sample_row_count(&self) -> usize {
        (self.arena - self.sample_rows) / ROW_WORDS
    }

    /// Whether a graph captured with `self` reads a step laid out as `other` correctly (the
    /// same fixed part; the arena's contents may differ).
    pub fn same_fixed_part(&self, other: &MetaLayout) -> bool {
        MetaLayout { words: 0, ..*self } == MetaLayout { words: 0, ..*other }
    }
}

/// Packs `batch` and its sampling rows (when the step samples where it runs) into `out`
/// (cleared first); returns the layout. Block-table and list offsets are rebased onto the
/// array (the kernels take its base for both).
pub fn pack(batch: &StepBatch, samples: Option<&SampleBatch>, out: &mut Vec<u32>) -> MetaLayout {
    let t = batch.num_tokens();
    let n_rows = samples.map_or(0, |s| s.len());
    let mut l = MetaLayout::fixed(t, batch.seqs.len(), batch.logit_rows.len(), n_rows);
    out.clear();
    out.extend_from_slice(&batch.tokens);
    out.extend_from_slice(&batch.positions);
    out.extend_from_slice(&batch.slots);
    for (i, s) in batch.seqs.iter().enumerate() {
        out.extend(std::iter::repeat_n(i as u32, s.num_tokens));
    }
    debug_assert_eq!(out.len(), l.seq_table_start, "sequences cover the tokens");
    let tables = l.arena as u32;
    out.extend(
        batch
            .seqs
            .iter()
            .map(|s| tables + s.block_table_start as u32),
    );
    out.extend_from_slice(&batch.logit_rows);
    out.resize(l.sample_rows, 0);
    let lists = l.arena + batch.block_tables.len();
    if let Some(samples) = samples {
        let at = lists as i32;
        for row in &samples.rows {
            let rebased = SampleRow {
                pen_start: row.pen_start + at,
                pen_end: row.pen_end + at,
                ban_start: row.ban_start + at,
                ban_end: row.ban_end + at,
                mask_start: if row.mask_start >= 0 {
                    row.mask_start + at
                } else {
                    -1
                },
                ..*row
            };
            // SAFETY: SampleRow is repr(C), plain numbers, ROW_WORDS * 4 bytes, no padding
            // (checked by the layout test below).
            let words: [u32; ROW_WORDS] = unsafe { std::mem::transmute(rebased) };
            out.extend_from_slice(&words);
        }
    }
    debug_assert_eq!(out.len(), l.arena);
    out.extend_from_slice(&batch.block_tables);
    if let Some(samples) = samples {
        out.extend_from_slice(&samples.lists);
    }
    l.words = out.len();
    l
}

/// Where device sampling leaves its results for `rows` rows, in 32-bit words: the tokens,
/// their logprobs, then the top logprobs' ids and values (`[rows][MAX_TOP_LOGPROBS]`) - one
/// array, so the step reads back once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutLayout {
    pub rows: usize,
    pub token: usize,
    pub logprob: usize,
    pub top_ids: usize,
    pub top_logprobs: usize,
    pub words: usize,
}

impl OutLayout {
    /// The layout for `rows` rows. The tokens come first, whatever the row count: a
    /// [`FUTURE_TOKEN`](crate::batch::FUTURE_TOKEN) id of the next step indexes the array's
    /// start.
    pub fn new(rows: usize) -> Self {
        let top = rows * MAX_TOP_LOGPROBS;
        Self {
            rows,
            token: 0,
            logprob: rows,
            top_ids: 2 * rows,
            top_logprobs: 2 * rows + top,
            words: 2 * rows + 2 * top,
        }
    }

    /// Words to read back: the tokens and logprobs, and the top logprobs when a row wants
    /// them.
    pub fn words_to_read(&self, wants_top: bool) -> usize {
        if wants_top {
            self.words
        } else {
            self.top_ids
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::LogitsWanted;

    #[test]
    fn sample_row_is_whole_words() {
        assert_eq!(std::mem::size_of::<SampleRow>(), 64);
        assert_eq!(ROW_WORDS, 16);
    }

    #[test]
    fn the_fixed_part_depends_on_the_counts_alone() {
        let mut a = StepBatch {
            page_size: 4,
            ..Default::default()
        };
        a.push_seq(&[5], 7, &[2, 3], LogitsWanted::Last);
        a.push_seq(&[9], 0, &[6], LogitsWanted::Last);
        let mut b = StepBatch {
            page_size: 4,
            ..Default::default()
        };
        b.push_seq(&[1], 30, &[1, 2, 3, 4, 5, 6, 7, 8], LogitsWanted::Last);
        b.push_seq(&[2], 2, &[9], LogitsWanted::Last);
        let mut s = SampleBatch::default();
        s.push_unused();
        s.push_unused();
        s.lists.extend_from_slice(&[3, 1, 1]);
        s.rows[1].pen_end += 3;
        let (mut wa, mut wb) = (Vec::new(), Vec::new());
        let la = pack(&a, Some(&s), &mut wa);
        let lb = pack(&b, Some(&SampleBatch::default()), &mut wb);
        let lb2 = pack(&b, Some(&s), &mut wb);
        assert!(la.same_fixed_part(&lb2));
        assert!(
            !la.same_fixed_part(&lb),
            "sampling rows are part of the fixed part"
        );
        assert_eq!(la.words, wa.len());
        assert_eq!((la.token_count(), la.sample_row_count()), (2, 2));
        // a: tokens, positions, slots, token_seq, seq_table_start, logit_rows
        assert_eq!(&wa[..4], &[5, 9, 7, 0]);
        assert_eq!(wa[la.slots], 3 * 4 + 3, "position 7 is in page 3");
        assert_eq!(&wa[la.token_seq..la.token_seq + 2], &[0, 1]);
        let st = la.seq_table_start;
        assert_eq!(wa[wa[st] as usize], 2, "first sequence's first page");
        assert_eq!(wa[wa[st + 1] as usize], 6, "second sequence's first page");
        assert_eq!(&wa[la.logit_rows..la.logit_rows + 2], &[0, 1]);
        assert_eq!(la.sample_rows % 2, 0, "rows are 8-byte aligned");
        // the second row's penalty triple, rebased onto the array
        let row1 = la.sample_rows + ROW_WORDS;
        let pen_start = wa[row1 + 10] as usize; // SampleRow::pen_start (after 8 + 2 words)
        assert_eq!(&wa[pen_start..pen_start + 3], &[3, 1, 1]);
        assert_eq!(wa[row1 + 11] as usize, pen_start + 3);
    }

    #[test]
    fn out_layout_reads_the_top_logprobs_only_when_wanted() {
        let o = OutLayout::new(3);
        assert_eq!(o.words_to_read(false), 6);
        assert_eq!(o.words_to_read(true), 6 + 2 * 3 * MAX_TOP_LOGPROBS);
        assert_eq!(o.top_logprobs, o.top_ids + 3 * MAX_TOP_LOGPROBS);
    }
}
