//! CUDA graphs of the decode step: the step (all layers and the sampling) captured once per
//! padded batch size and replayed, so that a decode step costs the host one copy of its input,
//! one graph launch and one copy back with the step's only wait.
//!
//! Decode batches pad up to the next captured size: each padding row is a sequence of one
//! token at position 0 whose only page is the backend's padding page (one page beyond the KV
//! pool, see `Backend::captures_graphs`), sampled greedily and dropped. Prefill, mixed steps,
//! steps wanting whole logits rows and batches above the largest size run eagerly. The sizes
//! are SGLang's: 1, 2, 4, 8, 16, 24, 32, then steps of 16 up to `--cuda-graph-max-bs`.
//!
//! A graph holds the addresses of the buffers it was captured with; every buffer is sized at
//! start-up for the largest step, and a graph captured before an allocation that might have
//! moved one (`Backend::memory_epoch`) is captured again before it is replayed.

use std::time::Instant;

use crate::batch::{LogitsWanted, StepBatch};
use crate::sampling::SampleBatch;

/// How the runner uses graphs (`--cuda-graph-max-bs`, and the sizes a server needs).
#[derive(Debug, Clone, Copy)]
pub struct GraphOptions {
    /// The largest decode batch replayed (larger ones run eagerly).
    pub max_bs: usize,
    /// Most tokens of one step (the chunked prefill size), and most sampling rows: buffers
    /// are sized for them at start-up so that no step moves them.
    pub max_tokens: usize,
    pub max_rows: usize,
    /// Positions below this may occur (the context length).
    pub max_positions: usize,
}

/// The padded batch sizes captured for `max_bs`: 1, 2, 4, 8, 16, 24, 32, then steps of 16,
/// and `max_bs` itself.
pub fn graph_sizes(max_bs: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [1, 2, 4, 8, 16, 24]
        .into_iter()
        .chain((32..).step_by(16))
        .take_while(|&s| s < max_bs)
        .collect();
    if max_bs > 0 {
        sizes.push(max_bs);
    }
    sizes
}

/// The captured graphs of one runner and what a replay needs.
pub(super) struct Graphs<G> {
    sizes: Vec<usize>,
    /// Per size: the graph and the memory epoch it was captured under.
    pub(super) captured: Vec<Option<(G, u64)>>,
    /// The padding rows' page, and tokens per page.
    dummy_page: u32,
    page_size: usize,
    /// The last step `pad` made.
    pub(super) padded: StepBatch,
    pub(super) padded_samples: SampleBatch,
    pub(super) replays: u64,
}

impl<G> Graphs<G> {
    pub(super) fn new(max_bs: usize, dummy_page: u32, page_size: usize) -> Self {
        let sizes = graph_sizes(max_bs);
        Self {
            captured: sizes.iter().map(|_| None).collect(),
            sizes,
            dummy_page,
            page_size,
            padded: StepBatch {
                page_size,
                ..Default::default()
            },
            padded_samples: SampleBatch::default(),
            replays: 0,
        }
    }

    pub(super) fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The index of the size a decode step of `batch` pads to, when it can be replayed: one
    /// new token per sequence, each with its logits row in order, one sampling row each.
    pub(super) fn size_for(&self, batch: &StepBatch, samples: &SampleBatch) -> Option<usize> {
        let n = batch.seqs.len();
        let decode = n > 0
            && batch.num_tokens() == n
            && samples.len() == n
            && batch.seqs.iter().all(|s| s.num_tokens == 1)
            && batch
                .logit_rows
                .iter()
                .enumerate()
                .all(|(i, &r)| r as usize == i)
            && batch.logit_rows.len() == n;
        if !decode {
            return None;
        }
        self.sizes.iter().position(|&s| s >= n)
    }

    /// Pads `batch` and `samples` to size `i` (the padding rows as described above) into
    /// `padded` and `padded_samples` (reused: no allocation in steady state).
    pub(super) fn pad(&mut self, i: usize, batch: &StepBatch, samples: &SampleBatch) {
        let size = self.sizes[i];
        let p = &mut self.padded;
        p.clone_from(batch);
        p.page_size = self.page_size;
        let s = &mut self.padded_samples;
        s.clone_from(samples);
        for _ in batch.seqs.len()..size {
            p.push_seq(&[0], 0, &[self.dummy_page], LogitsWanted::Last);
            s.push_unused();
        }
    }
}

/// Logs a start-up capture's cost.
pub(super) fn log_capture(
    sizes: &[usize],
    started: Instant,
    before: Option<usize>,
    after: Option<usize>,
) {
    let held = match (before, after) {
        (Some(b), Some(a)) => format!(
            ", {:.1} MiB of device memory",
            a.saturating_sub(b) as f64 / (1 << 20) as f64
        ),
        _ => String::new(),
    };
    tracing::info!(
        "CUDA graphs captured for decode batch sizes {sizes:?} in {:.2}s{held}",
        started.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_sglang() {
        assert_eq!(
            graph_sizes(160),
            vec![1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160]
        );
        assert_eq!(graph_sizes(4), vec![1, 2, 4]);
        assert_eq!(graph_sizes(3), vec![1, 2, 3]);
        assert_eq!(graph_sizes(40), vec![1, 2, 4, 8, 16, 24, 32, 40]);
        assert!(graph_sizes(0).is_empty());
    }

    #[test]
    fn decode_batches_pad_to_the_next_size_with_padding_rows() {
        let mut g: Graphs<()> = Graphs::new(8, 99, 4);
        let mut batch = StepBatch {
            page_size: 4,
            ..Default::default()
        };
        let mut samples = SampleBatch::default();
        for i in 0..3u32 {
            batch.push_seq(&[10 + i], 5, &[i, i + 1], LogitsWanted::Last);
            samples.push_unused();
        }
        let i = g.size_for(&batch, &samples).unwrap();
        assert_eq!(g.sizes()[i], 4);
        g.pad(i, &batch, &samples);
        let (p, s) = (&g.padded, &g.padded_samples);
        assert_eq!(p.num_tokens(), 4);
        assert_eq!(s.len(), 4);
        assert_eq!(&p.tokens[..3], &batch.tokens[..]);
        assert_eq!(p.positions[3], 0);
        assert_eq!(
            p.slots[3],
            99 * 4,
            "the padding row writes the padding page"
        );
        assert_eq!(p.logit_rows, vec![0, 1, 2, 3]);
        // a prefill chunk, or a step without sampling rows, runs eagerly
        let mut prefill = batch.clone();
        prefill.push_seq(&[1, 2], 0, &[7], LogitsWanted::Last);
        samples.push_unused();
        assert_eq!(g.size_for(&prefill, &samples), None);
        assert_eq!(g.size_for(&batch, &SampleBatch::default()), None);
        // above the largest size: eager
        let mut g9: Graphs<()> = Graphs::new(9, 0, 4);
        g9.pad(4, &StepBatch::default(), &SampleBatch::default());
        let (big, nine) = (&g9.padded, &g9.padded_samples);
        assert_eq!((big.num_tokens(), big.page_size), (9, 4));
        assert_eq!(g.size_for(big, nine), None);
    }
}
