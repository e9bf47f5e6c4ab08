//! A fork-join thread pool for the CPU kernels.
//!
//! A decode step of a small model runs a few hundred parallel regions of a few microseconds
//! each, so the cost of starting a region matters more than anything else: the caller thread
//! does a share of the work itself, and workers spin on a generation counter for a while
//! (default 1 ms) after each region before they sleep on a condition variable. `run` returns
//! only when every thread has finished the closure, which is what makes lending a borrowed
//! closure to the workers sound.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

type Job = dyn Fn(usize) + Sync + 'static;

struct Shared {
    generation: AtomicU64,
    /// The closure of the current region; written only while no worker runs (see `run`).
    job: UnsafeCell<Option<*const Job>>,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    spin: Duration,
}

// SAFETY: `job` is written by the caller of `run` only before it publishes a new generation
// (Release) and after every worker has reported completion (Acquire on `pending`); workers read
// it only between those two points. The closure it points to is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    num_threads: usize,
    /// Serialises `run` calls from different threads (the engine normally has one).
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `num_threads` threads in all: the caller plus `num_threads - 1` workers.
    pub fn new(num_threads: usize) -> Self {
        Self::with_spin(num_threads, Duration::from_millis(1))
    }

    pub fn with_spin(num_threads: usize, spin: Duration) -> Self {
        let num_threads = num_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            spin,
        });
        let workers = (1..num_threads)
            .map(|tid| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("sglang-cpu-{tid}"))
                    .spawn(move || worker(shared, tid))
                    .expect("spawning a CPU worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            num_threads,
            run_lock: Mutex::new(()),
        }
    }

    pub fn num_threads(&self) -> usize {
        self.num_threads
    }

    /// Runs `f(thread_index)` on every thread of the pool (index 0 is the caller) and returns
    /// when all have finished. A panic in any of them is re-raised here.
    pub fn run<F: Fn(usize) + Sync>(&self, f: F) {
        if self.num_threads == 1 {
            f(0);
            return;
        }
        let _serial = self.run_lock.lock();
        let sh = &*self.shared;
        let job: &(dyn Fn(usize) + Sync + '_) = &f;
        // SAFETY: erases the lifetime of `f`; this function does not return (or unwind) before
        // every worker has finished with it (the wait loop below runs even if `f(0)` panics).
        let job: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(job) };
        // SAFETY: no worker reads `job` now (previous region complete, next not published).
        unsafe { *sh.job.get() = Some(job) };
        sh.pending.store(self.num_threads - 1, Ordering::Relaxed);
        sh.generation.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.lock.lock();
            sh.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while sh.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: all workers are done with the job.
        unsafe { *sh.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if sh.panicked.swap(false, Ordering::AcqRel) {
            panic!("a CPU worker thread panicked in a kernel");
        }
    }

    /// Splits `0..n` into one contiguous range per thread (multiples of `align`) and runs
    /// `f(range)` on each non-empty one.
    pub fn for_ranges<F: Fn(std::ops::Range<usize>) + Sync>(&self, n: usize, align: usize, f: F) {
        let threads = self.num_threads;
        if threads == 1 || n <= align {
            f(0..n);
            return;
        }
        self.run(|tid| {
            let r = split_range(n, align, threads, tid);
            if !r.is_empty() {
                f(r);
            }
        });
    }
}

/// The `tid`-th of `parts` near-equal ranges of `0..n`, boundaries multiples of `align`.
pub fn split_range(n: usize, align: usize, parts: usize, tid: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let lo = (units * tid / parts * align).min(n);
    let hi = (units * (tid + 1) / parts * align).min(n);
    lo..hi
}

/// Rows `0..n` shared among `threads` threads: each thread owns a contiguous share
/// ([`split_range`]) and takes it front to back in blocks of `own` rows; a thread done with its
/// share takes blocks of `steal` rows from the back of the others'. Every thread thus streams
/// its own rows in order, as a static split does, and none waits long at the end of the region
/// for one that was slowed down. Block sizes are multiples of `align` (the kernels' row tiles).
pub struct Shares {
    /// Per share: `front << 32 | back`, the rows not yet taken.
    cursors: Vec<AtomicU64>,
    align: usize,
}

impl Shares {
    pub fn new(n: usize, align: usize, threads: usize) -> Self {
        assert!(n < 1 << 32, "{n} rows");
        let cursors = (0..threads)
            .map(|t| {
                let r = split_range(n, align, threads, t);
                AtomicU64::new((r.start as u64) << 32 | r.end as u64)
            })
            .collect();
        Self {
            cursors,
            align: align.max(1),
        }
    }

    /// Takes up to `rows` rows from the front (`front == true`) or the back of share `s`.
    fn take(&self, s: usize, rows: usize, front: bool) -> Option<std::ops::Range<usize>> {
        let rows = rows.div_ceil(self.align) * self.align;
        let c = &self.cursors[s];
        let mut cur = c.load(Ordering::Relaxed);
        loop {
            let (lo, hi) = ((cur >> 32) as usize, (cur & 0xFFFF_FFFF) as usize);
            if lo >= hi {
                return None;
            }
            let (next, got) = if front {
                let m = (lo + rows).min(hi);
                ((m as u64) << 32 | hi as u64, lo..m)
            } else {
                // shares start on multiples of `align`, and so does every block
                let m = (hi.saturating_sub(rows) / self.align * self.align).max(lo);
                ((lo as u64) << 32 | m as u64, m..hi)
            };
            match c.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(got),
                Err(now) => cur = now,
            }
        }
    }

    /// Thread `tid`'s part: its own share in blocks of `own` rows, then blocks of `steal` rows
    /// from the others, each passed to `f`.
    pub fn work(
        &self,
        tid: usize,
        own: usize,
        steal: usize,
        mut f: impl FnMut(std::ops::Range<usize>),
    ) {
        while let Some(r) = self.take(tid, own, true) {
            f(r);
        }
        let n = self.cursors.len();
        for other in (1..n).map(|d| (tid + d) % n) {
            while let Some(r) = self.take(other, steal, false) {
                f(r);
            }
        }
    }
}

fn worker(sh: Arc<Shared>, tid: usize) {
    let mut seen = 0u64;
    loop {
        let mut started = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = sh.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if sh.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || started.elapsed() < sh.spin {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = sh.lock.lock();
            sh.sleepers.fetch_add(1, Ordering::SeqCst);
            if sh.generation.load(Ordering::SeqCst) == seen && !sh.shutdown.load(Ordering::SeqCst) {
                sh.wake.wait(&mut guard);
            }
            sh.sleepers.fetch_sub(1, Ordering::SeqCst);
            started = Instant::now();
        }
        // SAFETY: published before the generation bump we just observed (Acquire).
        let job = unsafe { *sh.job.get() };
        if let Some(job) = job {
            // SAFETY: the caller of `run` keeps the closure alive until `pending` reaches 0.
            let job = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| job(tid))).is_err() {
                sh.panicked.store(true, Ordering::Release);
            }
        }
        sh.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock();
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row is handed out exactly once, in aligned blocks, however the threads race.
    #[test]
    fn shares_hand_out_every_row_once() {
        let pool = ThreadPool::with_spin(3, Duration::from_micros(50));
        for &(n, align, own, steal) in &[
            (1000usize, 4usize, 64usize, 16usize),
            (13, 4, 4, 4),
            (577, 2, 8, 2),
            (5, 1, 64, 1),
        ] {
            for round in 0..20 {
                let shares = Shares::new(n, align, pool.num_threads());
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(|tid| {
                    shares.work(tid, own, steal, |r| {
                        assert!(r.start.is_multiple_of(align) || r.start == 0, "{r:?}");
                        assert!(r.end.is_multiple_of(align) || r.end == n, "{r:?}");
                        if tid == round % 3 {
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        r.for_each(|i| {
                            seen[i].fetch_add(1, Ordering::Relaxed);
                        });
                    })
                });
                assert!(
                    seen.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                    "n={n} round={round}"
                );
            }
        }
    }

    #[test]
    fn every_thread_runs_once_per_region() {
        let pool = ThreadPool::with_spin(3, Duration::from_micros(50));
        let counts: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..200 {
            pool.run(|tid| {
                counts[tid].fetch_add(1, Ordering::Relaxed);
            });
            if round == 100 {
                // let the workers fall asleep once
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for c in &counts {
            assert_eq!(c.load(Ordering::Relaxed), 200);
        }
    }

    #[test]
    fn ranges_cover_everything_once() {
        for n in [0, 1, 7, 64, 1001] {
            for parts in 1..5 {
                let mut covered = vec![0; n];
                for tid in 0..parts {
                    for i in split_range(n, 4, parts, tid) {
                        covered[i] += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "n={n} parts={parts}");
            }
        }
    }

    #[test]
    fn worker_panic_is_reraised() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|tid| {
                if tid == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // the pool still works afterwards
        let hits = AtomicUsize::new(0);
        pool.run(|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
