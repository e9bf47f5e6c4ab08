//! The description of one forward step, shared by the scheduler (which writes it) and the
//! backends and model (which read it): a flat list of new tokens from several sequences
//! (prefill chunks and single decode tokens mixed), each sequence bringing its block table
//! into the paged KV cache, and the rows whose logits are wanted.
//!
//! It depends on nothing else in the crate, so the scheduler needs only this and the KV pool.

/// Set in a token id of a [`StepBatch`]: the token is not known to the host yet; the rest of
/// the id is the row of the previous step's sampling that holds it on the device (the overlap
/// scheduler queues a decode step before reading the tokens of the step it follows). Only
/// backends that sample on the device see such ids.
pub const FUTURE_TOKEN: u32 = 1 << 31;

/// One sequence's part of a [`StepBatch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqSlice {
    /// Index of this sequence's first new token in `StepBatch::tokens`.
    pub token_start: usize,
    /// New tokens of this sequence in this step (a prefill chunk, or 1 for decode).
    pub num_tokens: usize,
    /// Tokens in the KV cache after this step (cached prefix + new tokens).
    pub context_len: usize,
    /// Range of this sequence's pages in `StepBatch::block_tables`.
    pub block_table_start: usize,
    pub block_table_len: usize,
}

/// Everything a forward step needs to know about its tokens. Reused across steps (cleared,
/// not reallocated) so the decode loop does not allocate.
#[derive(Debug, Clone, Default)]
pub struct StepBatch {
    /// New token ids, sequence after sequence.
    pub tokens: Vec<u32>,
    /// Position of each new token in its sequence.
    pub positions: Vec<u32>,
    /// KV slot (page * page_size + offset) each new token's K and V are written to.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Pages of all sequences, concatenated (see `SeqSlice::block_table_start`).
    pub block_tables: Vec<u32>,
    /// Indices into `tokens` whose logits are wanted, in output order.
    pub logit_rows: Vec<u32>,
    pub page_size: usize,
}

impl StepBatch {
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.positions.clear();
        self.slots.clear();
        self.seqs.clear();
        self.block_tables.clear();
        self.logit_rows.clear();
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn block_table(&self, seq: &SeqSlice) -> &[u32] {
        &self.block_tables[seq.block_table_start..seq.block_table_start + seq.block_table_len]
    }

    /// Appends one sequence's new tokens. `cached` tokens are already in the KV cache; the new
    /// tokens take positions `cached..cached + tokens.len()` and the slots that the block table
    /// gives those positions. `want_logits`: `None`, `Some(false)` the last token only,
    /// `Some(true)` every new token.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        cached: usize,
        block_table: &[u32],
        logits: LogitsWanted,
    ) {
        let page_size = self.page_size;
        debug_assert!(page_size > 0);
        debug_assert!(block_table.len() * page_size >= cached + tokens.len());
        let token_start = self.tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = cached + i;
            self.tokens.push(t);
            self.positions.push(pos as u32);
            let page = block_table[pos / page_size];
            self.slots
                .push(page * page_size as u32 + (pos % page_size) as u32);
        }
        match logits {
            LogitsWanted::None => {}
            LogitsWanted::Last => {
                if !tokens.is_empty() {
                    self.logit_rows
                        .push((token_start + tokens.len() - 1) as u32)
                }
            }
            LogitsWanted::All => {
                self.logit_rows
                    .extend((token_start..token_start + tokens.len()).map(|i| i as u32));
            }
        }
        let block_table_start = self.block_tables.len();
        self.block_tables.extend_from_slice(block_table);
        self.seqs.push(SeqSlice {
            token_start,
            num_tokens: tokens.len(),
            context_len: cached + tokens.len(),
            block_table_start,
            block_table_len: block_table.len(),
        });
    }
}

/// Which of a sequence's new tokens need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// A middle prefill chunk: nothing is sampled.
    None,
    /// The next token is sampled from the last position.
    Last,
    /// Every position (prompt logprobs).
    All,
}
