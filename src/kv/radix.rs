//! Radix prefix cache over KV pages (SGLang's RadixAttention, page-granular).
//!
//! A tree whose edges are runs of whole pages of tokens: the path from the root spells a token
//! prefix, and each node holds the KV pages of its run. A new sequence starts from the pages
//! of its longest cached prefix instead of recomputing them. Only full pages enter the tree, so
//! a cached page is immutable: sequences only ever write into their own, partly filled last
//! page.
//!
//! Ownership is by page reference counts (see [`PagePool`]): the tree holds one reference on
//! each of its pages and every sequence holds one on each page of its block table. A page is
//! therefore "in use" exactly when its count exceeds 1, and eviction (least recently used
//! leaves first) only removes leaves whose pages the tree alone holds, which frees them.
//!
//! Matching costs O(prefix pages) hash lookups and comparisons; eviction O(nodes log nodes).
//! Owned by the scheduler, on the engine thread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::PagePool;

const ROOT: usize = 0;

#[derive(Debug, Default)]
struct Node {
    parent: usize,
    /// Tokens of this run: `pages.len() * page_size` of them.
    key: Vec<u32>,
    pages: Vec<u32>,
    /// Children by the tokens of their first page.
    children: HashMap<Box<[u32]>, usize>,
    last_access: u64,
}

#[derive(Debug)]
pub struct RadixCache {
    page_size: usize,
    nodes: Vec<Node>,
    free_nodes: Vec<usize>,
    clock: u64,
    pages: usize,
}

impl RadixCache {
    pub fn new(page_size: usize) -> Self {
        assert!(page_size > 0);
        Self {
            page_size,
            nodes: vec![Node::default()],
            free_nodes: Vec::new(),
            clock: 0,
            pages: 0,
        }
    }

    /// Pages the tree holds.
    pub fn cached_pages(&self) -> usize {
        self.pages
    }

    /// Pages only the tree holds (freed if evicted).
    pub fn evictable_pages(&self, pool: &PagePool) -> usize {
        self.nodes
            .iter()
            .flat_map(|n| n.pages.iter())
            .filter(|&&p| pool.ref_count(p) == 1)
            .count()
    }

    /// Full pages of `a` and `b` that agree from the start.
    fn common_pages(&self, a: &[u32], b: &[u32]) -> usize {
        let ps = self.page_size;
        a.chunks_exact(ps)
            .zip(b.chunks_exact(ps))
            .take_while(|(x, y)| x == y)
            .count()
    }

    /// Walks the longest cached prefix of `tokens`: calls `visit(node, pages matched in it)`.
    fn walk(&self, tokens: &[u32], mut visit: impl FnMut(usize, usize)) {
        let ps = self.page_size;
        let mut node = ROOT;
        let mut pos = 0;
        while pos + ps <= tokens.len() {
            let Some(&child) = self.nodes[node].children.get(&tokens[pos..pos + ps]) else {
                break;
            };
            let n = self.common_pages(&self.nodes[child].key, &tokens[pos..]);
            visit(child, n);
            if n < self.nodes[child].pages.len() {
                break;
            }
            pos += n * ps;
            node = child;
        }
    }

    /// Length in tokens of the longest cached prefix of `tokens` (no side effects).
    pub fn match_len(&self, tokens: &[u32]) -> usize {
        let mut pages = 0;
        self.walk(tokens, |_, n| pages += n);
        pages * self.page_size
    }

    /// The pages of the longest cached prefix of `tokens`, in order; marks the path used.
    /// The caller takes its own reference on each page it keeps.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        self.clock += 1;
        let mut path = Vec::new();
        self.walk(tokens, |node, n| path.push((node, n)));
        let mut pages = Vec::new();
        for (node, n) in path {
            let nd = &mut self.nodes[node];
            nd.last_access = self.clock;
            pages.extend_from_slice(&nd.pages[..n]);
        }
        pages
    }

    fn new_node(&mut self, node: Node) -> usize {
        if let Some(i) = self.free_nodes.pop() {
            self.nodes[i] = node;
            i
        } else {
            self.nodes.push(node);
            self.nodes.len() - 1
        }
    }

    /// Splits `child` after its first `n` pages; returns the new upper node.
    fn split(&mut self, child: usize, n: usize) -> usize {
        let ps = self.page_size;
        let parent = self.nodes[child].parent;
        let key_head: Vec<u32> = self.nodes[child].key[..n * ps].to_vec();
        let upper = self.new_node(Node {
            parent,
            key: key_head.clone(),
            pages: self.nodes[child].pages[..n].to_vec(),
            children: HashMap::new(),
            last_access: self.nodes[child].last_access,
        });
        let lower = &mut self.nodes[child];
        lower.key.drain(..n * ps);
        lower.pages.drain(..n);
        lower.parent = upper;
        let lower_first: Box<[u32]> = lower.key[..ps].into();
        self.nodes[upper].children.insert(lower_first, child);
        self.nodes[parent]
            .children
            .insert(key_head[..ps].into(), upper);
        upper
    }

    /// Adds the whole pages of `tokens` (whose KV is in `pages`, page for page) to the tree.
    /// Runs already cached keep their pages; the tree takes a reference on each page it adds.
    pub fn insert(&mut self, pool: &mut PagePool, tokens: &[u32], pages: &[u32]) {
        let ps = self.page_size;
        let full = (tokens.len() / ps).min(pages.len());
        let tokens = &tokens[..full * ps];
        self.clock += 1;
        let mut node = ROOT;
        let mut pos = 0;
        while pos < tokens.len() {
            let first = &tokens[pos..pos + ps];
            match self.nodes[node].children.get(first).copied() {
                Some(child) => {
                    let n = self.common_pages(&self.nodes[child].key, &tokens[pos..]);
                    let next = if n < self.nodes[child].pages.len() {
                        self.split(child, n)
                    } else {
                        child
                    };
                    self.nodes[next].last_access = self.clock;
                    pos += n * ps;
                    node = next;
                }
                None => {
                    let new_pages = pages[pos / ps..full].to_vec();
                    for &p in &new_pages {
                        pool.retain(p);
                    }
                    self.pages += new_pages.len();
                    let leaf = self.new_node(Node {
                        parent: node,
                        key: tokens[pos..].to_vec(),
                        pages: new_pages,
                        children: HashMap::new(),
                        last_access: self.clock,
                    });
                    self.nodes[node].children.insert(first.into(), leaf);
                    break;
                }
            }
        }
    }

    /// Every cached prefix that ends at a leaf (root-to-leaf token paths), most recently used
    /// first: enough to warm another server's cache by prefilling them.
    pub fn prefixes(&self) -> Vec<Vec<u32>> {
        let mut out: Vec<(u64, Vec<u32>)> = Vec::new();
        let mut stack: Vec<(usize, Vec<u32>)> = vec![(ROOT, Vec::new())];
        while let Some((node, path)) = stack.pop() {
            let n = &self.nodes[node];
            if n.children.is_empty() {
                if node != ROOT {
                    out.push((n.last_access, path));
                }
                continue;
            }
            for &child in n.children.values() {
                let mut p = path.clone();
                p.extend_from_slice(&self.nodes[child].key);
                stack.push((child, p));
            }
        }
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        out.into_iter().map(|(_, p)| p).collect()
    }

    fn is_evictable_leaf(&self, node: usize, pool: &PagePool) -> bool {
        let n = &self.nodes[node];
        node != ROOT
            && n.children.is_empty()
            && !n.pages.is_empty()
            && n.pages.iter().all(|&p| pool.ref_count(p) == 1)
    }

    fn remove_leaf(&mut self, pool: &mut PagePool, node: usize) -> usize {
        let n = std::mem::take(&mut self.nodes[node]);
        let freed = n.pages.len();
        for p in n.pages {
            pool.release(p);
        }
        self.pages -= freed;
        let first: Box<[u32]> = n.key[..self.page_size].into();
        self.nodes[n.parent].children.remove(&first);
        self.free_nodes.push(node);
        freed
    }

    /// Evicts least recently used leaves that only the tree holds until `pool` has at least
    /// `want_free` free pages or nothing more can go. Returns pages freed.
    pub fn evict(&mut self, pool: &mut PagePool, want_free: usize) -> usize {
        if pool.free_pages() >= want_free {
            return 0;
        }
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = (1..self.nodes.len())
            .filter(|&i| self.is_evictable_leaf(i, pool))
            .map(|i| Reverse((self.nodes[i].last_access, i)))
            .collect();
        let mut freed = 0;
        while pool.free_pages() < want_free {
            let Some(Reverse((_, node))) = heap.pop() else {
                break;
            };
            let parent = self.nodes[node].parent;
            freed += self.remove_leaf(pool, node);
            if self.is_evictable_leaf(parent, pool) {
                heap.push(Reverse((self.nodes[parent].last_access, parent)));
            }
        }
        freed
    }

    /// Drops every cached run (pages in use by sequences stay alive through their references).
    pub fn clear(&mut self, pool: &mut PagePool) {
        for node in self.nodes.drain(1..) {
            for p in node.pages {
                pool.release(p);
            }
        }
        self.nodes[ROOT].children.clear();
        self.free_nodes.clear();
        self.pages = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates pages for `tokens` as a sequence would and returns the block table.
    fn seq_pages(pool: &mut PagePool, tokens: usize) -> Vec<u32> {
        let mut t = Vec::new();
        assert!(pool.alloc_into(&mut t, pool.pages_for(tokens)));
        t
    }

    #[test]
    fn match_insert_split_and_share() {
        let mut pool = PagePool::new(32, 2);
        let mut tree = RadixCache::new(2);
        let a: Vec<u32> = (0..9).collect(); // 4 full pages + 1 token
        let ta = seq_pages(&mut pool, a.len());
        tree.insert(&mut pool, &a, &ta);
        assert_eq!(tree.cached_pages(), 4);
        assert_eq!(tree.match_len(&a), 8);
        // a sequence sharing the first 5 tokens: 2 full pages match
        let mut b: Vec<u32> = (0..5).collect();
        b.extend([100, 101, 102]);
        assert_eq!(tree.match_prefix(&b), ta[..2].to_vec());
        // inserting b splits a's run after 2 pages; b's own first 2 pages are not taken
        let tb = seq_pages(&mut pool, b.len());
        tree.insert(&mut pool, &b, &tb);
        assert_eq!(tree.cached_pages(), 4 + 2);
        assert_eq!(tree.match_len(&a), 8);
        assert_eq!(tree.match_len(&b), 8);
        assert_eq!(
            pool.ref_count(tb[0]),
            1,
            "duplicate page not taken by the tree"
        );
        assert_eq!(pool.ref_count(tb[2]), 2);
        // a page-misaligned difference inside the first page matches nothing
        assert_eq!(tree.match_len(&[0, 7, 2, 3]), 0);
    }

    #[test]
    fn eviction_takes_lru_leaves_the_tree_alone_holds() {
        let mut pool = PagePool::new(8, 1);
        let mut tree = RadixCache::new(1);
        let mut t1 = seq_pages(&mut pool, 3);
        tree.insert(&mut pool, &[1, 2, 3], &t1);
        let mut t2 = seq_pages(&mut pool, 3);
        tree.insert(&mut pool, &[7, 8, 9], &t2);
        // sequence 1 finished; sequence 2 still runs
        pool.release_all(&mut t1);
        assert_eq!(pool.free_pages(), 2);
        assert_eq!(tree.evictable_pages(&pool), 3);
        let freed = tree.evict(&mut pool, 8);
        assert_eq!(freed, 3, "only the finished sequence's pages go");
        assert_eq!(tree.match_len(&[7, 8, 9]), 3);
        assert_eq!(tree.match_len(&[1, 2, 3]), 0);
        pool.release_all(&mut t2);
        tree.clear(&mut pool);
        assert_eq!(pool.free_pages(), 8);
    }

    #[test]
    fn prefixes_are_the_root_to_leaf_paths() {
        let mut pool = PagePool::new(16, 2);
        let mut tree = RadixCache::new(2);
        for toks in [vec![1u32, 2, 3, 4], vec![1, 2, 7, 8, 9, 10], vec![5, 6]] {
            let t = seq_pages(&mut pool, toks.len());
            tree.insert(&mut pool, &toks, &t);
        }
        let mut p = tree.prefixes();
        p.sort();
        assert_eq!(
            p,
            vec![vec![1, 2, 3, 4], vec![1, 2, 7, 8, 9, 10], vec![5, 6]]
        );
    }

    #[test]
    fn lru_order_is_respected() {
        let mut pool = PagePool::new(4, 1);
        let mut tree = RadixCache::new(1);
        for k in [[1u32, 2], [3, 4]] {
            let mut t = seq_pages(&mut pool, 2);
            tree.insert(&mut pool, &k, &t);
            pool.release_all(&mut t);
        }
        tree.match_prefix(&[1, 2]); // touch the first: the second is now LRU
        tree.evict(&mut pool, 2);
        assert_eq!(tree.match_len(&[1, 2]), 2);
        assert_eq!(tree.match_len(&[3, 4]), 0);
    }
}
