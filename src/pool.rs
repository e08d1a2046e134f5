//! The only bridge from async code to the kernel: memory admission, a bounded job queue and
//! dedicated worker threads (never the tokio runtime's).
//!
//! * [`Pool::reserve`] takes bytes from the memory budget before anything large is
//!   allocated: a request that could never fit is refused at once; one that fits waits (the
//!   caller bounds the wait by its deadline).
//! * [`Pool::submit`] queues a job without blocking; a full queue is refused at once.
//! * Each job gets a cancellation flag, checked before it starts and by the kernel between
//!   tiles; a panicking job is reported, and the worker keeps serving.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Live counters, for tests, logs and metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Jobs waiting for a worker.
    pub queued: AtomicUsize,
    /// Workers running a job.
    pub busy: AtomicUsize,
    /// Bytes reserved from the memory budget.
    pub reserved_bytes: AtomicU64,
    pub completed: AtomicU64,
    /// Jobs dropped before starting because their caller had gone.
    pub skipped: AtomicU64,
    pub panicked: AtomicU64,
}

/// Why the pool refused or failed a job.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    #[error("job queue is full ({capacity} waiting)")]
    QueueFull { capacity: usize },
    #[error("request needs {needed} bytes of working memory but the server's budget is {budget}")]
    TooLarge { needed: u64, budget: u64 },
    #[error("the job was cancelled before it started")]
    Skipped,
    #[error("the job panicked")]
    Panicked,
}

/// What a job is handed.
pub struct JobCtx {
    pub cancel: Arc<AtomicBool>,
    pub threads: usize,
    /// Time the job waited in the queue.
    pub queue_wait: Duration,
}

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads, queue and memory budget.
pub struct Pool {
    tx: Mutex<SyncSender<Job>>,
    queue_len: usize,
    threads_per_job: usize,
    budget: Arc<Semaphore>,
    budget_bytes: u64,
    stats: Arc<PoolStats>,
}

/// Bytes held from the memory budget; returned on drop.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: u64,
    stats: Arc<PoolStats>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.stats
            .reserved_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

const KIB: u64 = 1024;

impl Pool {
    /// Starts `workers` threads; `budget_bytes` at most `u32::MAX` KiB.
    pub fn new(
        workers: usize,
        queue_len: usize,
        budget_bytes: u64,
        threads_per_job: usize,
    ) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue_len);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("voxconv-worker-{i}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => break, // pool dropped
                    }
                })
                .expect("spawning a worker thread");
        }
        let permits = (budget_bytes / KIB).min(u64::from(u32::MAX)) as usize;
        Self {
            tx: Mutex::new(tx),
            queue_len,
            threads_per_job,
            budget: Arc::new(Semaphore::new(permits)),
            budget_bytes,
            stats: Arc::new(PoolStats::default()),
        }
    }

    pub fn stats(&self) -> Arc<PoolStats> {
        Arc::clone(&self.stats)
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn threads_per_job(&self) -> usize {
        self.threads_per_job
    }

    /// Reserves `bytes` of working memory, waiting while other requests hold it. Refuses at
    /// once a request larger than the whole budget. Cancel-safe: dropping the future gives
    /// nothing back because nothing was taken.
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, PoolError> {
        let kib = bytes.div_ceil(KIB);
        if bytes > self.budget_bytes || kib > u64::from(u32::MAX) {
            return Err(PoolError::TooLarge {
                needed: bytes,
                budget: self.budget_bytes,
            });
        }
        let permit = if kib == 0 {
            None
        } else {
            Some(
                Arc::clone(&self.budget)
                    .acquire_many_owned(kib as u32)
                    .await
                    .expect("the budget semaphore is never closed"),
            )
        };
        self.stats
            .reserved_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(Reservation {
            _permit: permit,
            bytes,
            stats: Arc::clone(&self.stats),
        })
    }

    /// Queues `f` for a worker without blocking. The receiver yields its result, or
    /// `Skipped` if `cancel` was set before a worker took it, or `Panicked`.
    pub fn submit<T, F>(
        &self,
        cancel: Arc<AtomicBool>,
        f: F,
    ) -> Result<oneshot::Receiver<Result<T, PoolError>>, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&JobCtx) -> T + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        let stats = Arc::clone(&self.stats);
        let threads = self.threads_per_job;
        let queued_at = Instant::now();
        let job: Job = Box::new(move || {
            stats.queued.fetch_sub(1, Ordering::AcqRel);
            if cancel.load(Ordering::Relaxed) || done_tx.is_closed() {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                let _ = done_tx.send(Err(PoolError::Skipped));
                return;
            }
            stats.busy.fetch_add(1, Ordering::Relaxed);
            let ctx = JobCtx {
                cancel,
                threads,
                queue_wait: queued_at.elapsed(),
            };
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(&ctx)));
            stats.busy.fetch_sub(1, Ordering::Relaxed);
            let result = match result {
                Ok(v) => {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                    Ok(v)
                }
                Err(_) => {
                    stats.panicked.fetch_add(1, Ordering::Relaxed);
                    Err(PoolError::Panicked)
                }
            };
            let _ = done_tx.send(result);
        });
        // Admission by the count itself, so the queue gauge never passes the limit (counting
        // first and undoing on a full channel let a refused call show as a 3rd of 2 queued).
        // The count covers the channel's jobs plus any a worker has taken but not yet
        // started, so a free slot in the count means a free slot in the channel.
        let full = || PoolError::QueueFull {
            capacity: self.queue_len,
        };
        self.stats
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.queue_len).then_some(q + 1)
            })
            .map_err(|_| full())?;
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.try_send(job) {
            Ok(()) => Ok(done_rx),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                Err(full())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_full_is_refused_at_once_and_cancelled_jobs_are_skipped() {
        let pool = Pool::new(1, 1, 1 << 20, 1);
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = Arc::clone(&gate);
        let running = pool.submit(Arc::new(AtomicBool::new(false)), move |_| {
            g.wait();
            1
        });
        // Wait until the worker has taken the first job.
        while pool.stats().busy.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let queued = pool.submit(Arc::clone(&cancel), |_| 2).unwrap();
        let t0 = Instant::now();
        assert_eq!(
            pool.submit(Arc::new(AtomicBool::new(false)), |_| 3)
                .unwrap_err(),
            PoolError::QueueFull { capacity: 1 }
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        cancel.store(true, Ordering::SeqCst);
        gate.wait();
        assert_eq!(running.unwrap().await.unwrap(), Ok(1));
        assert_eq!(queued.await.unwrap(), Err(PoolError::Skipped));
    }

    #[tokio::test]
    async fn budget_refuses_the_impossible_and_returns_bytes_on_drop() {
        let pool = Pool::new(1, 1, 1 << 20, 1);
        assert!(matches!(
            pool.reserve(2 << 20).await,
            Err(PoolError::TooLarge { .. })
        ));
        let r = pool.reserve(600 << 10).await.unwrap();
        assert_eq!(
            pool.stats().reserved_bytes.load(Ordering::SeqCst),
            600 << 10
        );
        // A second one cannot fit now: it waits.
        let second = tokio::time::timeout(Duration::from_millis(50), pool.reserve(600 << 10)).await;
        assert!(second.is_err(), "must wait while the budget is held");
        drop(r);
        let r2 = tokio::time::timeout(Duration::from_secs(5), pool.reserve(600 << 10)).await;
        assert!(r2.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_panicking_job_is_reported_and_the_worker_survives() {
        let pool = Pool::new(1, 4, 1 << 20, 1);
        let flag = || Arc::new(AtomicBool::new(false));
        let bad = pool.submit(flag(), |_| -> u8 { panic!("bug") }).unwrap();
        assert_eq!(bad.await.unwrap(), Err(PoolError::Panicked));
        let good = pool.submit(flag(), |_| 7u8).unwrap();
        assert_eq!(good.await.unwrap(), Ok(7));
    }
}
