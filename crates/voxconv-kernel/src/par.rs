//! Splitting work over threads: [`run_parts`] on a pool of parked workers, and
//! [`par_blocks`] (elementwise work in whole blocks) on top of it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

/// Calls `f(first_block, part)` on `groups` parts of `v`, each a run of whole `block`-value
/// blocks (the last part takes the rest), the first part on the calling thread and the others
/// on the pool ([`run_parts`]). For work where each value's result does not depend on the split (a
/// copy, an elementwise op, independent channels): the same bits with any `groups`.
pub fn par_blocks<F>(v: &mut [f32], block: usize, groups: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let block = block.max(1);
    let blocks = v.len().div_ceil(block);
    let groups = groups.min(blocks).max(1);
    if groups <= 1 {
        f(0, v);
        return;
    }
    let per = blocks.div_ceil(groups);
    // Each part a disjoint run of whole blocks, handed to its part index.
    let parts: Vec<std::sync::Mutex<Option<&mut [f32]>>> = v
        .chunks_mut(per * block)
        .map(|p| std::sync::Mutex::new(Some(p)))
        .collect();
    run_parts(parts.len(), &|g| {
        let part = parts[g].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(part) = part {
            f(g * per, part);
        }
    });
}
/// Runs `f(i)` once for every `i < parts`: part 0 on the calling thread, the others offered
/// to a process-wide pool of parked worker threads (started on first use, grown to the
/// largest count asked for), so a call costs a wake-up, not a thread spawn (tens of
/// microseconds each, which small convolutions cannot repay). Parts no worker has started
/// by the time the caller finishes its own are taken back and run by the caller, so a call
/// never waits for other calls' work: only for its own parts already running. Nested calls
/// (a part that calls `run_parts`) are fine for the same reason.
///
/// A panicking part is re-raised on the calling thread after every part has finished.
pub fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        if parts == 1 {
            f(0);
        }
        return;
    }
    let pool = pool::get(parts - 1);
    let batch = Arc::new(pool::Batch::default());
    // SAFETY: the `'static` lifetime is a lie the pool never acts on: a worker calls `job`
    // only for an entry it took from the queue, and takes one only under the queue's lock,
    // counting itself in `batch.running` before releasing it. Before this function returns
    // (also when a part panics: every part runs under `catch_unwind`), the caller removes
    // every entry of this batch still queued (under the same lock) and then waits until
    // `batch.running` is back to 0. So no call of `job` starts or is in progress after
    // `f`'s borrow ends.
    let job: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    pool.offer(job, parts, &batch);
    let mut panic = std::panic::catch_unwind(AssertUnwindSafe(|| f(0))).err();
    for i in pool.take_back(&batch) {
        if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| f(i))) {
            panic.get_or_insert(p);
        }
    }
    if let Some(p) = batch.wait().or(panic) {
        std::panic::resume_unwind(p);
    }
}

mod pool {
    use std::any::Any;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
    use std::time::{Duration, Instant};

    /// Most worker threads the pool starts (callers asking for more share them).
    const MAX_WORKERS: usize = 256;
    /// How long an idle worker, and a caller waiting for its parts, spin before sleeping:
    /// back-to-back calls (a network's layers, a benchmark) then start and end without a
    /// futex wake-up each, which costs tens of microseconds on a VM (small-batch-odd, a
    /// 0.15 ms convolution, at 2 threads). OpenMP runtimes spin far longer (200 ms).
    const SPIN: Duration = Duration::from_micros(50);

    type Job = &'static (dyn Fn(usize) + Sync);

    /// Spins until `done()` or [`SPIN`] has passed; whether `done()` held.
    fn spin_until(done: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        loop {
            for _ in 0..64 {
                if done() {
                    return true;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= SPIN {
                return done();
            }
        }
    }

    /// One `run_parts` call: how many of its parts are running on workers, and the first
    /// panic among them.
    #[derive(Default)]
    pub(super) struct Batch {
        running: AtomicUsize,
        panic: Mutex<Option<Box<dyn Any + Send>>>,
        sleep: Mutex<()>,
        idle: Condvar,
    }

    impl Batch {
        /// Waits until no part of this batch runs on a worker; the first worker panic.
        pub(super) fn wait(&self) -> Option<Box<dyn Any + Send>> {
            if !spin_until(|| self.running.load(Ordering::Acquire) == 0) {
                let mut g = lock(&self.sleep);
                // A worker decrements `running` before taking `sleep` to notify, so the
                // check and the wait under `sleep` cannot miss its notification.
                while self.running.load(Ordering::Acquire) > 0 {
                    g = self.idle.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
            lock(&self.panic).take()
        }

        fn finished(&self, result: Result<(), Box<dyn Any + Send>>) {
            if let Err(p) = result {
                lock(&self.panic).get_or_insert(p);
            }
            if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                let _g = lock(&self.sleep);
                self.idle.notify_all();
            }
        }
    }

    struct Entry {
        job: Job,
        index: usize,
        batch: Arc<Batch>,
    }

    pub(super) struct Pool {
        queue: Mutex<VecDeque<Entry>>,
        /// Entries in `queue` (read without its lock by spinning workers).
        queued: AtomicUsize,
        /// Workers asleep on `ready` (changed under the queue's lock).
        sleepers: AtomicUsize,
        ready: Condvar,
        workers: Mutex<usize>,
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool, with at least `workers` threads started (up to [`MAX_WORKERS`]).
    pub(super) fn get(workers: usize) -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        let pool = POOL.get_or_init(|| Pool {
            queue: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            ready: Condvar::new(),
            workers: Mutex::new(0),
        });
        let want = workers.min(MAX_WORKERS);
        let mut have = lock(&pool.workers);
        while *have < want {
            let started = std::thread::Builder::new()
                .name(format!("voxconv-kernel-{have}"))
                .spawn(move || pool.work());
            if started.is_err() {
                // No more threads: the callers run the parts themselves.
                break;
            }
            *have += 1;
        }
        pool
    }

    impl Pool {
        /// Queues parts `1..parts` of `job`.
        pub(super) fn offer(&self, job: Job, parts: usize, batch: &Arc<Batch>) {
            let mut q = lock(&self.queue);
            for index in 1..parts {
                q.push_back(Entry {
                    job,
                    index,
                    batch: Arc::clone(batch),
                });
            }
            self.queued.fetch_add(parts - 1, Ordering::Release);
            let asleep = self.sleepers.load(Ordering::Relaxed);
            drop(q);
            // Spinning workers find the entries themselves.
            for _ in 0..asleep.min(parts - 1) {
                self.ready.notify_one();
            }
        }

        /// Removes this batch's parts no worker has started; their indices.
        pub(super) fn take_back(&self, batch: &Arc<Batch>) -> Vec<usize> {
            let mut q = lock(&self.queue);
            let mut mine = Vec::new();
            q.retain(|e| {
                let own = Arc::ptr_eq(&e.batch, batch);
                if own {
                    mine.push(e.index);
                }
                !own
            });
            self.queued.fetch_sub(mine.len(), Ordering::Release);
            mine
        }

        fn work(&self) {
            loop {
                spin_until(|| self.queued.load(Ordering::Acquire) > 0);
                let entry = {
                    let mut q = lock(&self.queue);
                    loop {
                        if let Some(e) = q.pop_front() {
                            self.queued.fetch_sub(1, Ordering::Release);
                            // Counted as running before the queue's lock is released (see
                            // `run_parts`).
                            e.batch.running.fetch_add(1, Ordering::AcqRel);
                            break e;
                        }
                        self.sleepers.fetch_add(1, Ordering::Relaxed);
                        q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                        self.sleepers.fetch_sub(1, Ordering::Relaxed);
                    }
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    (entry.job)(entry.index)
                }));
                entry.batch.finished(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_once_with_its_index() {
        for (len, block, groups) in [(10, 3, 2), (12, 4, 3), (5, 1, 8), (7, 7, 2), (0, 3, 2)] {
            let mut v = vec![-1f32; len];
            par_blocks(&mut v, block, groups, |first, part| {
                for (i, x) in part.iter_mut().enumerate() {
                    *x = (first * block + i) as f32;
                }
            });
            let want: Vec<f32> = (0..len).map(|i| i as f32).collect();
            assert_eq!(v, want, "{len} {block} {groups}");
        }
    }

    #[test]
    fn run_parts_runs_every_part_once_also_nested_and_concurrent() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for parts in [0, 1, 2, 3, 7, 40] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            run_parts(parts, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{parts}"
            );
        }
        // Several callers at once, each part calling run_parts again: every inner part
        // runs once, and nobody waits forever on work queued behind the others.
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        run_parts(3, &|_| {
                            run_parts(4, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 3 * 4);
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_pool_goes_on() {
        for bad in [0, 1, 2] {
            let r = std::panic::catch_unwind(|| {
                run_parts(3, &|i| {
                    if i == bad {
                        panic!("part {i}");
                    }
                })
            });
            assert!(r.is_err(), "part {bad}'s panic was lost");
        }
        let mut v = vec![0f32; 64];
        par_blocks(&mut v, 8, 4, |first, part| part.fill(first as f32));
        assert_eq!(v[63], 6.0);
    }
}
