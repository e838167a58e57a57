//! Group commit: many writers, one fsync.
//!
//! A store that must be on disk before it answers (the agent's history, the
//! relay's queue) calls [`GroupCommit::flush`] after its writes. Callers whose
//! writes an earlier flush already covered return without another fsync, so a
//! burst of N concurrent writers pays for about two flushes, not N.
//!
//! The flush runs on tokio's blocking pool: sled's own `flush_async` runs on
//! sled's small thread pool, which it also needs for the log writes a flush
//! waits on, and under load that deadlocks (seen in our tests).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

/// Shares flushes between concurrent writers of one store.
#[derive(Debug, Default)]
pub struct GroupCommit {
    /// Ticks for every flush request and every flush start.
    clock: AtomicU64,
    /// The clock reading just before the last completed flush started.
    flushed: tokio::sync::Mutex<u64>,
}

impl GroupCommit {
    /// A fresh group with nothing flushed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every write issued before this call durable, running `flush` on
    /// the blocking pool unless a flush that started after this call's writes
    /// has completed meanwhile.
    ///
    /// # Errors
    /// The flush's own error, or [`io::ErrorKind::Other`] when its task died.
    pub async fn flush<F, E>(&self, flush: F) -> Result<(), E>
    where
        F: FnOnce() -> Result<(), E> + Send + 'static,
        E: From<io::Error> + Send + 'static,
    {
        let wanted = self.clock.fetch_add(1, Ordering::SeqCst);
        self.flush_since(wanted, flush).await
    }

    /// Like [`GroupCommit::flush`], but waits `linger` first, so that the
    /// writes of other callers in that time share the same fsync. For records
    /// nobody waits on (the sync path's history): one fsync per `linger`
    /// instead of one per request, at the price of announcing them `linger`
    /// later. Other callers are not held up meanwhile.
    ///
    /// # Errors
    /// As [`GroupCommit::flush`].
    pub async fn flush_lingering<F, E>(
        &self,
        linger: std::time::Duration,
        flush: F,
    ) -> Result<(), E>
    where
        F: FnOnce() -> Result<(), E> + Send + 'static,
        E: From<io::Error> + Send + 'static,
    {
        let wanted = self.clock.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(linger).await;
        self.flush_since(wanted, flush).await
    }

    async fn flush_since<F, E>(&self, wanted: u64, flush: F) -> Result<(), E>
    where
        F: FnOnce() -> Result<(), E> + Send + 'static,
        E: From<io::Error> + Send + 'static,
    {
        let mut flushed = self.flushed.lock().await;
        if *flushed > wanted {
            return Ok(());
        }
        let mark = self.clock.fetch_add(1, Ordering::SeqCst);
        tokio::task::spawn_blocking(flush)
            .await
            .map_err(|e| io::Error::other(format!("flush task failed: {e}")))??;
        *flushed = mark;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{atomic::AtomicUsize, Arc};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_share_flushes() {
        let group = Arc::new(GroupCommit::new());
        let flushes = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let group = group.clone();
            let flushes = flushes.clone();
            tasks.push(tokio::spawn(async move {
                group
                    .flush(move || {
                        flushes.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        Ok::<(), io::Error>(())
                    })
                    .await
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("flush");
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..64).contains(&n), "{n} flushes for 64 writers");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lingering_writers_one_after_another_share_a_flush() {
        let group = Arc::new(GroupCommit::new());
        let flushes = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        // Writers 1 ms apart, each lingering 50 ms: a sequential stream of
        // records, as one keep-alive connection sends them.
        for _ in 0..20 {
            let (group, flushes) = (group.clone(), flushes.clone());
            tasks.push(tokio::spawn(async move {
                group
                    .flush_lingering(std::time::Duration::from_millis(50), move || {
                        flushes.fetch_add(1, Ordering::SeqCst);
                        Ok::<(), io::Error>(())
                    })
                    .await
            }));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        for t in tasks {
            t.await.expect("task").expect("flush");
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..=5).contains(&n), "{n} flushes for 20 lingering writers");
    }

    #[tokio::test]
    async fn a_write_after_a_flush_started_gets_its_own() {
        let group = GroupCommit::new();
        let flushes = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let f = flushes.clone();
            group
                .flush(move || {
                    f.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), io::Error>(())
                })
                .await
                .expect("flush");
        }
        assert_eq!(flushes.load(Ordering::SeqCst), 3);
    }
}
