//! The paged KV pool: fixed-size pages of KV slots, handed out to sequences as block tables.
//!
//! The pool only does bookkeeping (the memory itself belongs to the backend's KV cache). Pages
//! are reference-counted so that the radix prefix cache and several sequences can share the
//! pages of a common prefix; a page returns to the free list when its last reference goes.
//! Owned by the engine thread alone. All operations are O(pages touched).

pub mod radix;

/// Page ids and their reference counts.
#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    free: Vec<u32>,
    refs: Vec<u32>,
}

impl PagePool {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        assert!(page_size > 0);
        assert!(num_pages <= u32::MAX as usize);
        Self {
            page_size,
            // pop() hands out low page ids first
            free: (0..num_pages as u32).rev().collect(),
            refs: vec![0; num_pages],
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn total_pages(&self) -> usize {
        self.refs.len()
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    pub fn used_pages(&self) -> usize {
        self.total_pages() - self.free_pages()
    }

    /// Pages needed to hold `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// Appends `n` fresh pages (reference count 1) to `table`; false (and nothing taken) when
    /// fewer than `n` are free.
    pub fn alloc_into(&mut self, table: &mut Vec<u32>, n: usize) -> bool {
        if n > self.free.len() {
            return false;
        }
        for _ in 0..n {
            let p = self.free.pop().expect("checked above");
            debug_assert_eq!(self.refs[p as usize], 0);
            self.refs[p as usize] = 1;
            table.push(p);
        }
        true
    }

    /// One more reference to an allocated page.
    pub fn retain(&mut self, page: u32) {
        let r = &mut self.refs[page as usize];
        assert!(*r > 0, "retain of free page {page}");
        *r += 1;
    }

    /// Drops one reference; the page is free again when none remain.
    pub fn release(&mut self, page: u32) {
        let r = &mut self.refs[page as usize];
        assert!(*r > 0, "release of free page {page}");
        *r -= 1;
        if *r == 0 {
            self.free.push(page);
        }
    }

    /// Releases every page of `table` and empties it.
    pub fn release_all(&mut self, table: &mut Vec<u32>) {
        for p in table.drain(..) {
            self.release(p);
        }
    }

    pub fn ref_count(&self, page: u32) -> u32 {
        self.refs[page as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_and_sharing() {
        let mut pool = PagePool::new(4, 16);
        let mut a = Vec::new();
        assert!(pool.alloc_into(&mut a, 3));
        assert_eq!(pool.free_pages(), 1);
        let mut b = Vec::new();
        assert!(!pool.alloc_into(&mut b, 2), "only one page left");
        assert!(b.is_empty());
        pool.retain(a[0]);
        pool.release_all(&mut a);
        assert_eq!(pool.free_pages(), 3, "shared page still held");
        pool.release(0);
        assert_eq!(pool.free_pages(), 4);
        assert_eq!(pool.pages_for(33), 3);
    }
}
