//! The cache-aware policy's picture of each worker's radix cache: an approximate radix tree of
//! the prompts routed to it.
//!
//! A prompt is cut into chunks of [`CHUNK`] bytes; node `i` of its path is the hash of chunks
//! `0..=i` (a hashed trie: two prompts share node `i` exactly when their first `i + 1` chunks
//! are equal, up to 64-bit hash collisions). Each node records which workers were sent a
//! prompt through it and when. The longest match of a new prompt on a worker is the deepest
//! node of its path that the worker holds. The tree is approximate twice over: matches are
//! counted in whole chunks, and it holds what was *sent* to a worker, not what that worker's
//! cache still keeps. Memory is bounded per worker (`max_chunks` nodes); past it the least
//! recently used nodes go first, the deepest first among equals, so that a path's prefix
//! outlives its continuations as in a real radix cache.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};

/// Bytes per node of the hashed trie.
pub const CHUNK: usize = 16;

#[derive(Default)]
struct WorkerNodes {
    /// (last use, u32::MAX - depth, node): the eviction order.
    lru: BTreeSet<(u64, u32, u64)>,
    /// node -> (last use, depth)
    nodes: HashMap<u64, (u64, u32)>,
}

pub struct PrefixIndex {
    max_chunks: usize,
    clock: u64,
    hasher: std::collections::hash_map::RandomState,
    /// node -> the workers holding it
    holders: HashMap<u64, Vec<u32>>,
    workers: HashMap<u32, WorkerNodes>,
}

/// The best match of a prompt: the workers (ids) sharing the longest prefix with it, and that
/// prefix's length in bytes.
#[derive(Debug, Default, PartialEq)]
pub struct Match {
    pub workers: Vec<u32>,
    pub bytes: usize,
}

impl PrefixIndex {
    /// `max_bytes`: how much prompt text the index keeps per worker (rounded to chunks).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_chunks: (max_bytes / CHUNK).max(1),
            clock: 0,
            hasher: Default::default(),
            holders: HashMap::new(),
            workers: HashMap::new(),
        }
    }

    /// The node ids along `text`'s path (whole chunks only).
    fn path<'a>(&'a self, text: &'a [u8]) -> impl Iterator<Item = u64> + 'a {
        let mut prev = 0u64;
        text.chunks_exact(CHUNK).map(move |c| {
            let mut h = self.hasher.build_hasher();
            h.write_u64(prev);
            h.write(c);
            prev = h.finish();
            prev
        })
    }

    /// The workers among `eligible` holding the longest prefix of `text`.
    pub fn longest_match(&self, text: &[u8], eligible: &[u32]) -> Match {
        let mut best = Match::default();
        for (depth, node) in self.path(text).enumerate() {
            let Some(holders) = self.holders.get(&node) else {
                break;
            };
            let here: Vec<u32> = holders
                .iter()
                .copied()
                .filter(|w| eligible.contains(w))
                .collect();
            if here.is_empty() {
                break;
            }
            best = Match {
                workers: here,
                bytes: (depth + 1) * CHUNK,
            };
        }
        best
    }

    /// Records that `text` was sent to `worker`, then evicts that worker's least recently used
    /// nodes past the bound.
    pub fn insert(&mut self, text: &[u8], worker: u32) {
        self.clock += 1;
        let now = self.clock;
        let path: Vec<u64> = self.path(text).collect();
        let w = self.workers.entry(worker).or_default();
        for (depth, node) in path.into_iter().enumerate() {
            let depth = depth as u32;
            match w.nodes.insert(node, (now, depth)) {
                Some((then, d)) => {
                    w.lru.remove(&(then, u32::MAX - d, node));
                }
                None => self.holders.entry(node).or_default().push(worker),
            }
            w.lru.insert((now, u32::MAX - depth, node));
        }
        while w.nodes.len() > self.max_chunks {
            let Some((_, _, node)) = w.lru.pop_first() else {
                break;
            };
            w.nodes.remove(&node);
            unhold(&mut self.holders, node, worker);
        }
    }

    /// Forgets everything sent to `worker` (it left the pool, or its cache was flushed).
    pub fn remove_worker(&mut self, worker: u32) {
        if let Some(w) = self.workers.remove(&worker) {
            for node in w.nodes.into_keys() {
                unhold(&mut self.holders, node, worker);
            }
        }
    }

    /// Prompt bytes the index holds for `worker` (whole chunks).
    pub fn size(&self, worker: u32) -> usize {
        self.workers
            .get(&worker)
            .map_or(0, |w| w.nodes.len() * CHUNK)
    }
}

fn unhold(holders: &mut HashMap<u64, Vec<u32>>, node: u64, worker: u32) {
    if let Some(v) = holders.get_mut(&node) {
        v.retain(|&x| x != worker);
        if v.is_empty() {
            holders.remove(&node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(prefix: &str, n: usize) -> Vec<u8> {
        prefix.bytes().cycle().take(n).collect()
    }

    #[test]
    fn longest_shared_prefix_wins_in_whole_chunks() {
        let mut ix = PrefixIndex::new(1 << 20);
        let a = text("conversation one ", 200);
        let mut b = a[..100].to_vec();
        b.extend(text("something else ", 100));
        ix.insert(&a, 0);
        ix.insert(&b, 1);
        let next_turn = [a.clone(), text(" and more", 50)].concat();
        let m = ix.longest_match(&next_turn, &[0, 1]);
        assert_eq!(m.workers, vec![0]);
        assert_eq!(m.bytes, 200 / CHUNK * CHUNK);
        // both hold the first 96 bytes (6 whole chunks); only worker 1 its tail
        let m = ix.longest_match(&b, &[0, 1]);
        assert_eq!(
            m,
            Match {
                workers: vec![1],
                bytes: 192
            }
        );
        // an ineligible (ejected) worker's match does not count
        assert_eq!(ix.longest_match(&next_turn, &[1]).bytes, 96);
        assert_eq!(ix.longest_match(b"short", &[0, 1]), Match::default());
    }

    #[test]
    fn memory_is_bounded_and_least_recently_used_goes_first() {
        let mut ix = PrefixIndex::new(10 * CHUNK);
        let old = text("old prompt ", 6 * CHUNK);
        let new = text("new prompt ", 6 * CHUNK);
        ix.insert(&old, 7);
        ix.insert(&new, 7);
        assert_eq!(ix.size(7), 10 * CHUNK);
        // the new prompt is whole; the old one lost its deepest nodes, kept its prefix
        assert_eq!(ix.longest_match(&new, &[7]).bytes, 6 * CHUNK);
        assert_eq!(ix.longest_match(&old, &[7]).bytes, 4 * CHUNK);
        ix.remove_worker(7);
        assert_eq!(ix.size(7), 0);
        assert!(ix.holders.is_empty());
    }
}
