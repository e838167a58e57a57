//! The relay's durable store-and-forward queue.
//!
//! Webhooks answered with `202 Accepted` while their tunnel's agent is offline
//! (or in queue mode) are written here, flushed to disk before the `202` goes
//! out, and drained to the agent later, in order. [`Queue`] is the interface
//! the relay codes against; [`SledQueue`] is the single-node implementation.
//!
//! # Bounds
//! Each tunnel holds at most [`QueueLimits::max_count`] items and
//! [`QueueLimits::max_bytes`] body bytes, counting uploads still in progress,
//! and refuses new work once its oldest item is older than
//! [`QueueLimits::max_age`]. Nothing queued is ever dropped to make room.
//!
//! # Storage layout of [`SledQueue`]
//! One sled database in `DIR/queue`, with a small page cache so that memory
//! stays flat however much is queued: bodies are never held in memory.
//!
//! - tree `heads`: `tunnel name ++ 0x00 ++ seq (u64 BE)` → postcard of a
//!   [`QueuedItem`]. Tunnel names are DNS labels (`[a-z0-9-]`), so the `0x00`
//!   separator is unambiguous and the prefix `name ++ 0x00` lists one tunnel in
//!   seq order.
//! - tree `chunks`: `upload id (u64 BE) ++ chunk number (u32 BE)` → the raw
//!   bytes of one body chunk: a body of up to 4 KiB is one chunk.
//! - directory `DIR/queue-bodies`: a larger body is a file of its own (see
//!   [`hookrelay_shared::body_files`]: sled holds in memory about as much as it stores
//!   in large values, whatever its cache size). A body is read from its file
//!   when there is one, else from its chunks (bodies queued by earlier
//!   versions are chunks of any size).
//! - tree `uploads`: `upload id (u64 BE)` → tunnel name: a body whose chunks
//!   are not owned by any head, either an upload in progress or a removed
//!   item whose chunks are being deleted. `begin` inserts it; `commit`
//!   swaps it for the head and `remove`/`purge` swap the head for it, each
//!   in one transaction, so an upload id always has a head or a marker (never
//!   both). Chunks are deleted before their marker, so after a crash every
//!   leftover marker names chunks nobody owns, which `open` deletes. A body
//!   file goes after its head's removal is flushed, then its marker.
//! - seqs and upload ids come from sled's `generate_id`, monotonic across
//!   restarts.
//!
//! Per-tunnel counts (items, bytes, uploads in progress and their byte
//! reservations) live in memory behind one mutex, rebuilt at open by scanning
//! the heads. The age of a tunnel's oldest item is read on demand from the
//! first head under its prefix.

use std::{
    collections::{BTreeMap, HashSet},
    fmt, io,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hookrelay_shared::{
    body_files::{kept_in_file, read_piece, BodyFiles, INLINE_BODY_BYTES},
    durable::GroupCommit,
    RequestHead, TunnelName,
};
use serde::{Deserialize, Serialize};
use sled::{transaction::TransactionError, Transactional};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    now_ms,
    sled_walk::{walk, Direction},
};

/// Default bound on the items queued per tunnel.
pub const DEFAULT_MAX_COUNT: u64 = 100_000;
/// Default bound on the body bytes queued per tunnel (1 GiB).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default age past which a tunnel's oldest item makes its queue refuse new work.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Retry-After sent with 503 when a queue is full.
pub const FULL_RETRY_AFTER: Duration = Duration::from_secs(60);

/// sled's page cache: small, so memory stays flat with a full queue.
const CACHE_CAPACITY: u64 = 8 * 1024 * 1024;
/// How long `open` waits for a lock a closing store still holds.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Pause between attempts to take the lock.
const LOCK_RETRY: Duration = Duration::from_millis(25);
/// Heads removed per transaction by `purge`, and chunk keys per deletion batch:
/// bounds the memory a large purge or body deletion needs.
const PAGE: usize = 1024;
/// Separates the tunnel name from the seq in a head key.
const SEPARATOR: u8 = 0x00;

/// The bounds of every tunnel's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Items per tunnel, counting uploads in progress.
    pub max_count: u64,
    /// Body bytes per tunnel, counting the bytes reserved by uploads in progress.
    pub max_bytes: u64,
    /// Age of the oldest item past which the tunnel refuses new work.
    pub max_age: Duration,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_count: DEFAULT_MAX_COUNT,
            max_bytes: DEFAULT_MAX_BYTES,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

/// One queued delivery's metadata (no body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedItem {
    /// Queue position: strictly increasing in commit order, across restarts too.
    pub seq: u64,
    /// The request as received; `head.tunnel` is its tunnel, `head.delivery_id` its id,
    /// `head.received_at_ms` its arrival time (Unix ms).
    pub head: RequestHead,
    /// Body length in bytes.
    pub body_len: u64,
    /// Where its body chunks are stored.
    pub upload_id: u64,
}

/// What one tunnel's queue holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TunnelStats {
    /// The tunnel.
    pub tunnel: TunnelName,
    /// Items queued.
    pub count: u64,
    /// Body bytes queued.
    pub bytes: u64,
    /// `received_at_ms` of the oldest queued item.
    pub oldest_received_at_ms: Option<u64>,
}

/// Which bound a full queue hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FullReason {
    /// Too many items.
    Count,
    /// Too many body bytes.
    Bytes,
    /// The oldest item is older than the age bound.
    Age,
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The tunnel's queue is at one of its bounds; the sender should retry later.
    #[error("the queue of tunnel {tunnel} is full ({reason:?})")]
    Full {
        /// The tunnel whose queue is full.
        tunnel: TunnelName,
        /// The bound it hit.
        reason: FullReason,
        /// How long the sender should wait before retrying.
        retry_after: Duration,
    },
    /// Another process (or a store not yet closed) holds the store's lock.
    #[error("the queue in {0} is held by a running relay; use its admin API or stop it")]
    Locked(String),
    /// The disk or the database failed, or stored data is corrupt.
    #[error("queue storage failed: {0}")]
    Storage(String),
}

/// Bytes of one request being written, not yet queued. Not Clone.
///
/// Finish it with [`Queue::commit`] or [`Queue::abort`]. Dropping it
/// unfinished (an ingress future cancelled by a disconnecting sender) aborts
/// it: its chunks are deleted and its reservation released.
pub struct Upload {
    tunnel: TunnelName,
    id: u64,
    /// Body bytes appended so far.
    written: u64,
    /// Bytes counted against the tunnel's byte bound for this upload.
    reserved: u64,
    /// Number of the next chunk to store.
    next_chunk: u32,
    /// The body so far while it fits in [`INLINE_BODY_BYTES`] and nothing
    /// was stored yet.
    small: Vec<u8>,
    /// The body's file once it outgrew `small`, with the creation count
    /// [`BodyFiles::sync_dir`] needs to cover it.
    file: Option<(std::fs::File, u64)>,
    /// The store that cleans up when the upload is dropped unfinished;
    /// `None` once committed or aborted.
    owner: Option<Arc<dyn UploadOwner>>,
}

impl Upload {
    /// The tunnel this upload is for.
    pub fn tunnel(&self) -> &TunnelName {
        &self.tunnel
    }

    /// Body bytes appended so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether [`Queue::commit`] waits for the disk (the body is in a file it
    /// syncs): call it off the async workers then.
    pub fn commit_blocks(&self) -> bool {
        self.file.is_some()
    }

    /// Detaches the upload from its store: dropping it then does nothing.
    fn disarm(&mut self) -> Option<Arc<dyn UploadOwner>> {
        self.owner.take()
    }
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload")
            .field("tunnel", &self.tunnel)
            .field("id", &self.id)
            .field("written", &self.written)
            .field("reserved", &self.reserved)
            .field("next_chunk", &self.next_chunk)
            .field("small", &self.small.len())
            .field("file", &self.file.is_some())
            .field("armed", &self.owner.is_some())
            .finish()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(owner) = self.disarm() {
            owner.abandon(self);
        }
    }
}

/// A store's clean-up for uploads that end without a commit.
trait UploadOwner: Send + Sync {
    /// Deletes the upload's chunks and releases its reservation. Never fails.
    fn abandon(&self, upload: &Upload);
}

/// A durable per-tunnel queue of deliveries.
pub trait Queue: Send + Sync + 'static {
    /// Starts storing one request for `tunnel`. Checks the bounds first: count (queued + uploads in
    /// progress) would exceed max_count -> Full{Count}; queued bytes + reserved bytes + declared_len
    /// would exceed max_bytes -> Full{Bytes}; the oldest queued item is older than max_age -> Full{Age}
    /// (nothing queued is ever dropped to make room; a stale queue refuses new work until drained or
    /// purged). Reserves one slot and declared_len bytes (0 when None).
    fn begin(&self, tunnel: &TunnelName, declared_len: Option<u64>) -> Result<Upload, QueueError>;

    /// Appends one body chunk (stored as one sled value). When the bytes written exceed the
    /// reservation, reserves more, failing with Full{Bytes} when that breaks the bound (the caller
    /// then calls abort).
    fn append(&self, upload: &mut Upload, chunk: &[u8]) -> Result<(), QueueError>;

    /// Queues the upload with its head, at the end of the tunnel's queue (new seq). Written but
    /// NOT yet durable: call `sync` before telling anyone. Notifies `changed()` waiters.
    /// `head.body_len` is left as the caller set it; the item's `body_len` is the bytes written.
    /// `head.tunnel` must be the upload's tunnel. On error nothing is queued and the upload is
    /// aborted.
    fn commit(&self, upload: Upload, head: RequestHead) -> Result<QueuedItem, QueueError>;

    /// Forgets an upload: removes its chunks, releases its reservation. Never fails (logs errors).
    fn abort(&self, upload: Upload);

    /// Makes everything written so far durable (fsync). Concurrent callers share one flush.
    fn sync(&self) -> BoxFuture<'_, Result<(), QueueError>>;

    /// Up to `limit` items of `tunnel` with seq > after (or from the start), in seq order.
    fn after(
        &self,
        tunnel: &TunnelName,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<QueuedItem>, QueueError>;

    /// The item's body, chunk by chunk, in order, read lazily from disk.
    fn body(&self, item: &QueuedItem)
        -> Box<dyn Iterator<Item = Result<Bytes, QueueError>> + Send>;

    /// Deletes one delivered item and its body; Ok(false) when it was not there (already removed or
    /// purged). Not synced (a relay crash may bring it back, which the agent de-duplicates).
    fn remove(&self, tunnel: &TunnelName, seq: u64) -> Result<bool, QueueError>;

    /// Deletes every item of the tunnel, heads and bodies; returns how many. Not synced: call
    /// `sync` for that. Items committed while the purge runs may stay.
    fn purge(&self, tunnel: &TunnelName) -> Result<u64, QueueError>;

    /// Counts for one tunnel (zeros and None when empty or unknown).
    fn stats(&self, tunnel: &TunnelName) -> TunnelStats;

    /// Stats of every tunnel that has items queued, sorted by tunnel name.
    fn all_stats(&self) -> Vec<TunnelStats>;

    /// Woken (notify_waiters) after every commit.
    fn changed(&self) -> Arc<Notify>;

    /// The bounds in force.
    fn limits(&self) -> QueueLimits;
}

/// The single-node implementation in sled; see the module documentation for its layout.
pub struct SledQueue {
    inner: Arc<Inner>,
}

impl fmt::Debug for SledQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledQueue")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl SledQueue {
    /// Opens or creates the store in `dir.join("queue")`. Retries for ~2 s while sled's file lock is
    /// held (a relay restarted in the same process releases it from a background thread a moment
    /// late); then QueueError::Locked. Rebuilds per-tunnel stats by scanning the heads, and removes
    /// chunks of uploads that never committed (crash mid-upload).
    ///
    /// # Errors
    /// [`QueueError::Locked`] while another store holds it, else [`QueueError::Storage`].
    pub fn open(dir: &Path, limits: QueueLimits) -> Result<SledQueue, QueueError> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match Self::open_once(dir, limits) {
                Err(QueueError::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(LOCK_RETRY);
                }
                other => return other,
            }
        }
    }

    fn open_once(dir: &Path, limits: QueueLimits) -> Result<SledQueue, QueueError> {
        let files_dir = dir.join("queue-bodies");
        let db = sled::Config::new()
            .path(dir.join("queue"))
            .cache_capacity(CACHE_CAPACITY)
            .open()
            .map_err(|e| match e {
                // sled reports a held lock as an `Other` I/O error whose text
                // is all that identifies it (sled 0.34).
                sled::Error::Io(io)
                    if io.kind() == io::ErrorKind::WouldBlock
                        || io.raw_os_error() == Some(11)
                        || io.to_string().contains("could not acquire lock") =>
                {
                    QueueError::Locked(dir.display().to_string())
                }
                other => storage(other),
            })?;
        let files = BodyFiles::open(files_dir.clone()).map_err(|e| {
            QueueError::Storage(format!("cannot create {}: {e}", files_dir.display()))
        })?;
        Self::from_db(db, limits, Some(files))
    }

    /// In-memory store for tests.
    ///
    /// # Errors
    /// [`QueueError::Storage`] when sled cannot start.
    pub fn temporary(limits: QueueLimits) -> Result<SledQueue, QueueError> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(CACHE_CAPACITY)
            .open()
            .map_err(storage)?;
        Self::from_db(db, limits, None)
    }

    /// `files` is where large bodies go; without it (a temporary store) they
    /// are chunks in sled like small ones.
    fn from_db(
        db: sled::Db,
        limits: QueueLimits,
        files: Option<BodyFiles>,
    ) -> Result<SledQueue, QueueError> {
        let inner = Inner {
            heads: db.open_tree("heads").map_err(storage)?,
            chunks: db.open_tree("chunks").map_err(storage)?,
            uploads: db.open_tree("uploads").map_err(storage)?,
            db,
            usage: Mutex::new(BTreeMap::new()),
            changed: Arc::new(Notify::new()),
            group: GroupCommit::new(),
            limits,
            files,
        };
        inner.clear_orphaned_bodies()?;
        let (usage, upload_ids) = inner.tally_heads()?;
        if let Some(files) = &inner.files {
            files
                .delete_unowned(&upload_ids)
                .map_err(|e| QueueError::Storage(format!("cannot clear the body files: {e}")))?;
        }
        *inner.lock_usage() = usage;
        Ok(SledQueue {
            inner: Arc::new(inner),
        })
    }

    /// Chunks stored, committed or not.
    #[cfg(test)]
    fn stored_chunks(&self) -> usize {
        self.inner.chunks.len()
    }

    /// Upload markers stored (uploads in progress or bodies being deleted).
    #[cfg(test)]
    fn stored_markers(&self) -> usize {
        self.inner.uploads.len()
    }

    #[cfg(test)]
    fn files(&self) -> &BodyFiles {
        self.inner.files.as_ref().expect("an on-disk store")
    }
}

impl Queue for SledQueue {
    fn begin(&self, tunnel: &TunnelName, declared_len: Option<u64>) -> Result<Upload, QueueError> {
        let declared = declared_len.unwrap_or(0);
        // Read outside the lock: a stale answer only delays the refusal by one request.
        let oldest = self
            .inner
            .first_item(tunnel)?
            .map(|item| item.head.received_at_ms);
        self.inner.reserve_slot(tunnel, declared, oldest)?;
        match self.inner.start_upload(tunnel) {
            Ok(id) => Ok(Upload {
                tunnel: tunnel.clone(),
                id,
                written: 0,
                reserved: declared,
                next_chunk: 0,
                small: Vec::new(),
                file: None,
                owner: Some(self.inner.clone()),
            }),
            Err(e) => {
                self.inner.release_slot(tunnel, declared);
                Err(e)
            }
        }
    }

    fn append(&self, upload: &mut Upload, chunk: &[u8]) -> Result<(), QueueError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let written = upload.written.saturating_add(chunk.len() as u64);
        if written > upload.reserved {
            self.inner
                .reserve_bytes(&upload.tunnel, written - upload.reserved)?;
            upload.reserved = written;
        }
        if upload.file.is_none()
            && upload.next_chunk == 0
            && upload.small.len() + chunk.len() <= INLINE_BODY_BYTES
        {
            upload.small.extend_from_slice(chunk);
        } else {
            let small = std::mem::take(&mut upload.small);
            self.inner.store(upload, &small)?;
            self.inner.store(upload, chunk)?;
        }
        upload.written = written;
        Ok(())
    }

    fn commit(&self, mut upload: Upload, head: RequestHead) -> Result<QueuedItem, QueueError> {
        // On any error below, dropping `upload` aborts it.
        if head.tunnel != upload.tunnel {
            return Err(QueueError::Storage(format!(
                "a head of tunnel {} was committed to an upload for tunnel {}",
                head.tunnel, upload.tunnel
            )));
        }
        // A body that never outgrew `small` is one chunk.
        let small = std::mem::take(&mut upload.small);
        self.inner.store_chunk(&mut upload, &small)?;
        if let Some((file, created)) = upload.file.take() {
            // On disk, and findable, before its head is.
            file.sync_data()
                .and_then(|()| self.inner.files()?.sync_dir(created))
                .map_err(|e| {
                    QueueError::Storage(format!(
                        "cannot sync the body of upload {}: {e}",
                        upload.id
                    ))
                })?;
        }
        let item = self.inner.commit_upload(&upload, head)?;
        // Queued: its chunks now belong to the head.
        upload.disarm();
        self.inner.changed.notify_waiters();
        Ok(item)
    }

    fn abort(&self, upload: Upload) {
        // Dropping an armed upload deletes its chunks and releases its reservation.
        drop(upload);
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // Never sled's flush_async: it runs on sled's own small pool, which
            // the flush also needs, and deadlocks under load.
            self.inner
                .group
                .flush(move || {
                    // Taken first: every removal behind these ids is in
                    // sled before the flush starts, so on disk after it.
                    let doomed = inner.files.as_ref().map(BodyFiles::take_doomed);
                    let flushed = inner.db.flush();
                    if let (Some(files), Some(doomed)) = (&inner.files, doomed) {
                        // A file that could not be deleted keeps its
                        // marker: the next open finishes the job.
                        let deleted = files.settle_doomed(doomed, flushed.is_ok());
                        if let Err(e) = inner.delete_markers(&deleted) {
                            warn!(error = %e, "could not delete upload markers; retried at next start");
                        }
                    }
                    flushed
                        .map(drop)
                        .map_err(|e| io::Error::other(e.to_string()))
                })
                .await
                .map_err(|e: io::Error| QueueError::Storage(format!("flush failed: {e}")))
        })
    }

    fn after(
        &self,
        tunnel: &TunnelName,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<QueuedItem>, QueueError> {
        // Exclusive: no head key is the bare prefix.
        let from = match after {
            None => tunnel_prefix(tunnel),
            Some(seq) => head_key(tunnel, seq),
        };
        // Point reads, not a range iterator: see `walk` (a drain reads every
        // head of a backlog once).
        let end = tunnel_end(tunnel);
        let mut entries = walk(&self.inner.heads, Some(from.into()), Direction::OldestFirst);
        let mut items = Vec::new();
        while items.len() < limit {
            let Some(entry) = entries.next() else { break };
            let (key, value) = entry.map_err(storage)?;
            if key.as_ref() >= end.as_slice() {
                break;
            }
            if let Some(item) = decode_head(&key, &value) {
                items.push(item);
            }
        }
        Ok(items)
    }

    fn body(
        &self,
        item: &QueuedItem,
    ) -> Box<dyn Iterator<Item = Result<Bytes, QueueError>> + Send> {
        let file = match self.inner.file_of(item.body_len) {
            Some(files) => BodyFile::Unopened(files.path(item.upload_id)),
            None => BodyFile::None,
        };
        Box::new(BodyChunks {
            chunks: self.inner.chunks.clone(),
            upload_id: item.upload_id,
            next_chunk: 0,
            remaining: item.body_len,
            failed: false,
            file,
        })
    }

    fn remove(&self, tunnel: &TunnelName, seq: u64) -> Result<bool, QueueError> {
        let key = head_key(tunnel, seq);
        let Some(body) = self.inner.unlink_head(tunnel, &key)? else {
            return Ok(false);
        };
        if let Some(body) = body {
            self.inner.release_bodies(&[body]);
        }
        Ok(true)
    }

    fn purge(&self, tunnel: &TunnelName) -> Result<u64, QueueError> {
        // Bounded by the last seq at the start, so steady commits cannot keep it going.
        let Some(last) = self.inner.last_seq(tunnel)? else {
            return Ok(0);
        };
        let mut purged = 0u64;
        loop {
            let page = self.inner.unlink_page(tunnel, last)?;
            if page.is_empty() {
                break;
            }
            purged += page.len() as u64;
            let bodies: Vec<(u64, u64)> = page.into_iter().flatten().collect();
            self.inner.release_bodies(&bodies);
        }
        info!(%tunnel, purged, "queue purged");
        Ok(purged)
    }

    fn stats(&self, tunnel: &TunnelName) -> TunnelStats {
        let usage = self
            .inner
            .lock_usage()
            .get(tunnel)
            .copied()
            .unwrap_or_default();
        self.inner.stats_of(tunnel, usage)
    }

    fn all_stats(&self) -> Vec<TunnelStats> {
        let queued: Vec<(TunnelName, Usage)> = self
            .inner
            .lock_usage()
            .iter()
            .filter(|(_, usage)| usage.count > 0)
            .map(|(tunnel, usage)| (tunnel.clone(), *usage))
            .collect();
        queued
            .into_iter()
            .map(|(tunnel, usage)| self.inner.stats_of(&tunnel, usage))
            .collect()
    }

    fn changed(&self) -> Arc<Notify> {
        self.inner.changed.clone()
    }

    fn limits(&self) -> QueueLimits {
        self.inner.limits
    }
}

/// What one tunnel holds and has reserved, in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    /// Items queued.
    count: u64,
    /// Body bytes queued.
    bytes: u64,
    /// Uploads in progress.
    uploads: u64,
    /// Bytes reserved by the uploads in progress.
    reserved: u64,
}

impl Usage {
    fn is_empty(&self) -> bool {
        *self == Usage::default()
    }
}

/// The store shared by [`SledQueue`] and its live [`Upload`]s.
struct Inner {
    db: sled::Db,
    heads: sled::Tree,
    chunks: sled::Tree,
    uploads: sled::Tree,
    /// Per-tunnel usage; tunnels with nothing queued or reserved are absent.
    /// Every change to `heads` happens under this lock, so the counts match
    /// the heads and commits become visible in seq order.
    usage: Mutex<BTreeMap<TunnelName, Usage>>,
    changed: Arc<Notify>,
    group: GroupCommit,
    limits: QueueLimits,
    /// Where bodies larger than [`INLINE_BODY_BYTES`] go (none in a
    /// temporary store: they are chunks then).
    files: Option<BodyFiles>,
}

impl Inner {
    fn files(&self) -> io::Result<&BodyFiles> {
        self.files
            .as_ref()
            .ok_or_else(|| io::Error::other("this store keeps no body files"))
    }

    /// The body files, when a body of `len` bytes is one of them (a small
    /// body never is; a temporary store keeps every body as chunks).
    fn file_of(&self, len: u64) -> Option<&BodyFiles> {
        self.files.as_ref().filter(|_| kept_in_file(len))
    }

    /// Stores the next `bytes` of an upload's body: in its file when the
    /// store has files, else as its next chunk.
    fn store(&self, upload: &mut Upload, bytes: &[u8]) -> Result<(), QueueError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let id = upload.id;
        if let Some(files) = &self.files {
            let written = match &mut upload.file {
                Some((file, _)) => io::Write::write_all(file, bytes),
                None => files.create(id).and_then(|(mut file, created)| {
                    let written = io::Write::write_all(&mut file, bytes);
                    upload.file = Some((file, created));
                    written
                }),
            };
            return written.map_err(|e| {
                QueueError::Storage(format!("cannot write the body of upload {id}: {e}"))
            });
        }
        self.store_chunk(upload, bytes)
    }

    /// Stores `bytes` as the upload's next chunk in sled.
    fn store_chunk(&self, upload: &mut Upload, bytes: &[u8]) -> Result<(), QueueError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let id = upload.id;
        let number = upload.next_chunk;
        let next = number
            .checked_add(1)
            .ok_or_else(|| QueueError::Storage(format!("upload {id} has too many chunks")))?;
        self.chunks
            .insert(chunk_key(id, number), bytes)
            .map_err(storage)?;
        upload.next_chunk = next;
        Ok(())
    }

    /// The bodies `(upload id, length)` of removed items: chunks and markers
    /// go now, a file (and its marker) after the removal is flushed.
    fn release_bodies(&self, bodies: &[(u64, u64)]) {
        let (mut small, mut large) = (Vec::new(), Vec::new());
        for &(id, len) in bodies {
            if self.file_of(len).is_some() {
                large.push(id);
            } else {
                small.push(id);
            }
        }
        self.delete_orphaned_bodies(&small);
        if let Some(files) = &self.files {
            if let Err(e) = self.delete_chunks(&large) {
                warn!(error = %e, "could not delete queued chunks; retried at next start");
            }
            files.doom(large);
        }
    }

    /// Removes the upload markers of bodies that are gone.
    fn delete_markers(&self, upload_ids: &[u64]) -> Result<(), QueueError> {
        if upload_ids.is_empty() {
            return Ok(());
        }
        let mut markers = sled::Batch::default();
        for id in upload_ids {
            markers.remove(&id.to_be_bytes()[..]);
        }
        self.uploads.apply_batch(markers).map_err(storage)
    }

    fn lock_usage(&self) -> MutexGuard<'_, BTreeMap<TunnelName, Usage>> {
        // The critical sections cannot leave the map half-updated, so a
        // panic elsewhere while holding the lock does not make it wrong.
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks the bounds for one more upload of `declared` bytes and reserves it.
    fn reserve_slot(
        &self,
        tunnel: &TunnelName,
        declared: u64,
        oldest_received_at_ms: Option<u64>,
    ) -> Result<(), QueueError> {
        let mut all = self.lock_usage();
        let usage = all.get(tunnel).copied().unwrap_or_default();
        let full = |reason| QueueError::Full {
            tunnel: tunnel.clone(),
            reason,
            retry_after: FULL_RETRY_AFTER,
        };
        if usage.count.saturating_add(usage.uploads) >= self.limits.max_count {
            return Err(full(FullReason::Count));
        }
        if usage
            .bytes
            .saturating_add(usage.reserved)
            .saturating_add(declared)
            > self.limits.max_bytes
        {
            return Err(full(FullReason::Bytes));
        }
        if oldest_received_at_ms.is_some_and(|oldest| is_stale(oldest, self.limits.max_age)) {
            return Err(full(FullReason::Age));
        }
        let entry = all.entry(tunnel.clone()).or_default();
        entry.uploads += 1;
        entry.reserved += declared;
        Ok(())
    }

    /// Reserves `extra` more bytes for an upload in progress.
    fn reserve_bytes(&self, tunnel: &TunnelName, extra: u64) -> Result<(), QueueError> {
        let mut all = self.lock_usage();
        let usage = all.entry(tunnel.clone()).or_default();
        if usage
            .bytes
            .saturating_add(usage.reserved)
            .saturating_add(extra)
            > self.limits.max_bytes
        {
            return Err(QueueError::Full {
                tunnel: tunnel.clone(),
                reason: FullReason::Bytes,
                retry_after: FULL_RETRY_AFTER,
            });
        }
        usage.reserved += extra;
        Ok(())
    }

    /// Gives back an upload's slot and its reserved bytes.
    fn release_slot(&self, tunnel: &TunnelName, reserved: u64) {
        let mut all = self.lock_usage();
        if let Some(usage) = all.get_mut(tunnel) {
            usage.uploads = usage.uploads.saturating_sub(1);
            usage.reserved = usage.reserved.saturating_sub(reserved);
            if usage.is_empty() {
                all.remove(tunnel);
            }
        }
    }

    /// A fresh upload id, marked as in progress on disk.
    fn start_upload(&self, tunnel: &TunnelName) -> Result<u64, QueueError> {
        let id = self.db.generate_id().map_err(storage)?;
        self.uploads
            .insert(id.to_be_bytes(), tunnel.as_str().as_bytes())
            .map_err(storage)?;
        Ok(id)
    }

    /// Writes the head of a finished upload in place of its marker and counts it.
    fn commit_upload(&self, upload: &Upload, head: RequestHead) -> Result<QueuedItem, QueueError> {
        let mut all = self.lock_usage();
        // Taken under the lock so that seqs reach the tree in increasing
        // order: a reader never sees seq n+1 before seq n.
        let seq = self.db.generate_id().map_err(storage)?;
        let item = QueuedItem {
            seq,
            head,
            body_len: upload.written,
            upload_id: upload.id,
        };
        let value = postcard::to_stdvec(&item)
            .map_err(|e| QueueError::Storage(format!("cannot encode a queued item: {e}")))?;
        let key = head_key(&upload.tunnel, seq);
        let marker = upload.id.to_be_bytes();
        (&self.heads, &self.uploads)
            .transaction(|(heads, uploads)| {
                heads.insert(key.as_slice(), value.as_slice())?;
                uploads.remove(&marker[..])?;
                Ok(())
            })
            .map_err(transaction_error)?;
        let usage = all.entry(upload.tunnel.clone()).or_default();
        usage.uploads = usage.uploads.saturating_sub(1);
        usage.reserved = usage.reserved.saturating_sub(upload.reserved);
        usage.count += 1;
        usage.bytes += upload.written;
        Ok(item)
    }

    /// Removes the head at `key`, handing its body to a marker in the same
    /// transaction. `None` when there was no head; `Some(None)` when the head
    /// was unreadable (its body cannot be found); else its body's upload id
    /// and length.
    fn unlink_head(
        &self,
        tunnel: &TunnelName,
        key: &[u8],
    ) -> Result<Option<Option<(u64, u64)>>, QueueError> {
        let mut all = self.lock_usage();
        let Some(value) = self.heads.get(key).map_err(storage)? else {
            return Ok(None);
        };
        let item = decode_head(key, &value);
        let marker = item.as_ref().map(|item| item.upload_id.to_be_bytes());
        (&self.heads, &self.uploads)
            .transaction(|(heads, uploads)| {
                heads.remove(key)?;
                if let Some(marker) = &marker {
                    uploads.insert(&marker[..], tunnel.as_str().as_bytes())?;
                }
                Ok(())
            })
            .map_err(transaction_error)?;
        if let Some(item) = &item {
            uncount(&mut all, tunnel, 1, item.body_len);
        }
        Ok(Some(item.map(|item| (item.upload_id, item.body_len))))
    }

    /// Removes up to [`PAGE`] heads of `tunnel` with seq ≤ `last`, as
    /// [`Inner::unlink_head`] does; returns their bodies.
    fn unlink_page(
        &self,
        tunnel: &TunnelName,
        last: u64,
    ) -> Result<Vec<Option<(u64, u64)>>, QueueError> {
        let mut all = self.lock_usage();
        let mut keys = Vec::new();
        let mut ids = Vec::new();
        let mut bytes = 0u64;
        for entry in self
            .heads
            .range(tunnel_prefix(tunnel)..=head_key(tunnel, last))
            .take(PAGE)
        {
            let (key, value) = entry.map_err(storage)?;
            let item = decode_head(&key, &value);
            bytes = bytes.saturating_add(item.as_ref().map_or(0, |item| item.body_len));
            ids.push(item.map(|item| (item.upload_id, item.body_len)));
            keys.push(key);
        }
        if keys.is_empty() {
            return Ok(ids);
        }
        (&self.heads, &self.uploads)
            .transaction(|(heads, uploads)| {
                for key in &keys {
                    heads.remove(key)?;
                }
                for (id, _) in ids.iter().flatten() {
                    uploads.insert(&id.to_be_bytes()[..], tunnel.as_str().as_bytes())?;
                }
                Ok(())
            })
            .map_err(transaction_error)?;
        let counted = ids.iter().flatten().count() as u64;
        uncount(&mut all, tunnel, counted, bytes);
        Ok(ids)
    }

    /// Deletes the chunks of bodies nobody owns any more, then their markers.
    /// A failure leaves the markers, so the next `open` finishes the job.
    fn delete_orphaned_bodies(&self, upload_ids: &[u64]) {
        if upload_ids.is_empty() {
            return;
        }
        let deleted = self
            .delete_chunks(upload_ids)
            .and_then(|()| self.delete_markers(upload_ids));
        if let Err(e) = deleted {
            warn!(
                bodies = upload_ids.len(),
                first_upload_id = upload_ids.first(),
                error = %e,
                "could not delete queued bodies; retried at next start"
            );
        }
    }

    /// Deletes every chunk of the uploads, in batches of at most [`PAGE`] keys.
    fn delete_chunks(&self, upload_ids: &[u64]) -> Result<(), QueueError> {
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for id in upload_ids {
            for key in self.chunks.scan_prefix(id.to_be_bytes()).keys() {
                batch.remove(key.map_err(storage)?);
                pending += 1;
                if pending == PAGE {
                    self.chunks
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(storage)?;
                    pending = 0;
                }
            }
        }
        if pending > 0 {
            self.chunks.apply_batch(batch).map_err(storage)?;
        }
        Ok(())
    }

    /// At open: deletes the bodies of uploads that never committed and of
    /// items whose removal a crash interrupted.
    fn clear_orphaned_bodies(&self) -> Result<(), QueueError> {
        let mut cleared = 0u64;
        for key in self.uploads.iter().keys() {
            let key = key.map_err(storage)?;
            match <[u8; 8]>::try_from(key.as_ref()) {
                Ok(id) => {
                    let id = u64::from_be_bytes(id);
                    self.delete_chunks(&[id])?;
                    if let Some(files) = &self.files {
                        files.remove(id).map_err(|e| {
                            QueueError::Storage(format!("cannot delete a body file: {e}"))
                        })?;
                    }
                }
                Err(_) => warn!(key = ?key, "malformed upload marker removed"),
            }
            self.uploads.remove(&key).map_err(storage)?;
            cleared += 1;
        }
        if cleared > 0 {
            info!(cleared, "deleted the bodies of unfinished uploads");
        }
        Ok(())
    }

    /// At open: per-tunnel counts from the heads on disk, and their bodies'
    /// upload ids.
    fn tally_heads(&self) -> Result<(BTreeMap<TunnelName, Usage>, HashSet<u64>), QueueError> {
        let mut usage: BTreeMap<TunnelName, Usage> = BTreeMap::new();
        let mut upload_ids = HashSet::new();
        for entry in self.heads.iter() {
            let (key, value) = entry.map_err(storage)?;
            let Some(tunnel) = parse_head_key(&key) else {
                warn!(key = ?key, "queued head with a malformed key skipped");
                continue;
            };
            if let Some(item) = decode_head(&key, &value) {
                let tunnel_usage = usage.entry(tunnel).or_default();
                tunnel_usage.count += 1;
                tunnel_usage.bytes += item.body_len;
                upload_ids.insert(item.upload_id);
            }
        }
        Ok((usage, upload_ids))
    }

    /// The tunnel's first readable item.
    fn first_item(&self, tunnel: &TunnelName) -> Result<Option<QueuedItem>, QueueError> {
        for entry in self.heads.scan_prefix(tunnel_prefix(tunnel)) {
            let (key, value) = entry.map_err(storage)?;
            if let Some(item) = decode_head(&key, &value) {
                return Ok(Some(item));
            }
        }
        Ok(None)
    }

    /// The tunnel's highest seq on disk.
    fn last_seq(&self, tunnel: &TunnelName) -> Result<Option<u64>, QueueError> {
        match self
            .heads
            .scan_prefix(tunnel_prefix(tunnel))
            .keys()
            .next_back()
        {
            None => Ok(None),
            Some(key) => Ok(seq_of_key(&key.map_err(storage)?)),
        }
    }

    fn stats_of(&self, tunnel: &TunnelName, usage: Usage) -> TunnelStats {
        let oldest_received_at_ms = if usage.count == 0 {
            None
        } else {
            self.first_item(tunnel)
                .unwrap_or_else(|e| {
                    warn!(%tunnel, error = %e, "cannot read the oldest queued item");
                    None
                })
                .map(|item| item.head.received_at_ms)
        };
        TunnelStats {
            tunnel: tunnel.clone(),
            count: usage.count,
            bytes: usage.bytes,
            oldest_received_at_ms,
        }
    }
}

impl UploadOwner for Inner {
    fn abandon(&self, upload: &Upload) {
        // Never committed, so no head names its file: it can go at once. (A
        // body that outgrew INLINE_BODY_BYTES has one, even when a failed
        // commit took its handle.)
        if let Some(files) = self.file_of(upload.written) {
            if let Err(e) = files.remove(upload.id) {
                warn!(upload_id = upload.id, error = %e, "could not delete an unfinished body file; retried at next start");
            }
        }
        self.delete_orphaned_bodies(&[upload.id]);
        self.release_slot(&upload.tunnel, upload.reserved);
    }
}

/// Reads a body's pieces one at a time, from its file or its chunks,
/// checking they add up to its length.
struct BodyChunks {
    chunks: sled::Tree,
    upload_id: u64,
    next_chunk: u32,
    /// Bytes still to come.
    remaining: u64,
    /// Set after an error: the iterator ends.
    failed: bool,
    file: BodyFile,
}

/// Where a body is read from when it may be a file.
enum BodyFile {
    /// Not looked for yet.
    Unopened(std::path::PathBuf),
    /// Found.
    Open(std::fs::File, std::path::PathBuf),
    /// No file: the body is in chunks.
    None,
}

impl BodyChunks {
    fn read_chunk(&mut self) -> Result<Bytes, QueueError> {
        let id = self.upload_id;
        if let BodyFile::Unopened(path) = &self.file {
            self.file = match std::fs::File::open(path) {
                Ok(file) => BodyFile::Open(file, path.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => BodyFile::None,
                Err(e) => {
                    return Err(QueueError::Storage(format!(
                        "cannot open the body of upload {id}: {e}"
                    )))
                }
            };
        }
        if let BodyFile::Open(file, path) = &mut self.file {
            let piece = read_piece(file, self.remaining, path).map_err(|e| {
                QueueError::Storage(format!("cannot read the body of upload {id}: {e}"))
            })?;
            self.remaining -= piece.len() as u64;
            return Ok(piece);
        }
        let number = self.next_chunk;
        let chunk = self
            .chunks
            .get(chunk_key(id, number))
            .map_err(storage)?
            .ok_or_else(|| {
                QueueError::Storage(format!(
                    "body of upload {id} ends at chunk {number}, {} bytes short",
                    self.remaining
                ))
            })?;
        let len = chunk.len() as u64;
        if len > self.remaining {
            return Err(QueueError::Storage(format!(
                "body of upload {id} is longer than recorded at chunk {number}"
            )));
        }
        self.remaining -= len;
        self.next_chunk = number.checked_add(1).ok_or_else(|| {
            QueueError::Storage(format!("body of upload {id} has too many chunks"))
        })?;
        Ok(Bytes::from_owner(chunk))
    }
}

impl Iterator for BodyChunks {
    type Item = Result<Bytes, QueueError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.remaining == 0 {
            return None;
        }
        let chunk = self.read_chunk();
        self.failed = chunk.is_err();
        Some(chunk)
    }
}

/// Takes `count` items of `bytes` in total off a tunnel's usage.
fn uncount(all: &mut BTreeMap<TunnelName, Usage>, tunnel: &TunnelName, count: u64, bytes: u64) {
    if let Some(usage) = all.get_mut(tunnel) {
        usage.count = usage.count.saturating_sub(count);
        usage.bytes = usage.bytes.saturating_sub(bytes);
        if usage.is_empty() {
            all.remove(tunnel);
        }
    }
}

/// Whether an item received at `received_at_ms` is older than `max_age` now.
fn is_stale(received_at_ms: u64, max_age: Duration) -> bool {
    let age_ms = now_ms().saturating_sub(received_at_ms);
    u128::from(age_ms) > max_age.as_millis()
}

/// `name ++ 0x00`: the prefix of every head key of the tunnel.
fn tunnel_prefix(tunnel: &TunnelName) -> Vec<u8> {
    let mut key = Vec::with_capacity(tunnel.as_str().len() + 9);
    key.extend_from_slice(tunnel.as_str().as_bytes());
    key.push(SEPARATOR);
    key
}

/// `name ++ 0x01`: just past every head key of the tunnel.
fn tunnel_end(tunnel: &TunnelName) -> Vec<u8> {
    let mut key = tunnel.as_str().as_bytes().to_vec();
    key.push(SEPARATOR + 1);
    key
}

fn head_key(tunnel: &TunnelName, seq: u64) -> Vec<u8> {
    let mut key = tunnel_prefix(tunnel);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The tunnel a head key belongs to, when the key is well formed.
fn parse_head_key(key: &[u8]) -> Option<TunnelName> {
    let name_len = key.len().checked_sub(9)?;
    if key[name_len] != SEPARATOR {
        return None;
    }
    std::str::from_utf8(&key[..name_len]).ok()?.parse().ok()
}

/// The seq at the end of a head key.
fn seq_of_key(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[start..].try_into().ok()?))
}

fn chunk_key(upload_id: u64, number: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&upload_id.to_be_bytes());
    key[8..].copy_from_slice(&number.to_be_bytes());
    key
}

/// A stored head, or `None` (logged) when it cannot be read: an unreadable
/// head is skipped, never a panic, and stays on disk until purged.
fn decode_head(key: &[u8], value: &[u8]) -> Option<QueuedItem> {
    match postcard::from_bytes(value) {
        Ok(item) => Some(item),
        Err(e) => {
            warn!(key = ?String::from_utf8_lossy(key), error = %e, "unreadable queued head skipped");
            None
        }
    }
}

fn storage(e: sled::Error) -> QueueError {
    QueueError::Storage(e.to_string())
}

fn transaction_error(e: TransactionError<()>) -> QueueError {
    match e {
        TransactionError::Abort(()) => QueueError::Storage("transaction aborted".into()),
        TransactionError::Storage(e) => storage(e),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashSet;

    use hookrelay_shared::DeliveryId;

    use super::*;

    fn tunnel(name: &str) -> TunnelName {
        name.parse().expect("valid tunnel name")
    }

    pub(crate) fn head(tunnel: &TunnelName, received_at_ms: u64) -> RequestHead {
        RequestHead {
            delivery_id: DeliveryId::new(),
            tunnel: tunnel.clone(),
            method: "POST".into(),
            path: "/hook?x=1".into(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            remote_addr: "127.0.0.1:1".parse().expect("socket address"),
            public_url: format!("https://relay.example/t/{tunnel}/hook?x=1"),
            received_at_ms,
            timeout_ms: 30_000,
            body_len: None,
        }
    }

    /// Queues `body` in one chunk, with its length declared.
    fn enqueue(q: &SledQueue, t: &TunnelName, body: &[u8]) -> QueuedItem {
        let mut upload = q.begin(t, Some(body.len() as u64)).expect("begin");
        q.append(&mut upload, body).expect("append");
        q.commit(upload, head(t, now_ms())).expect("commit")
    }

    fn read_body(q: &SledQueue, item: &QueuedItem) -> Vec<u8> {
        let mut body = Vec::new();
        for chunk in q.body(item) {
            body.extend_from_slice(&chunk.expect("chunk"));
        }
        body
    }

    fn limits(max_count: u64, max_bytes: u64) -> QueueLimits {
        QueueLimits {
            max_count,
            max_bytes,
            max_age: DEFAULT_MAX_AGE,
        }
    }

    fn full_reason(result: Result<Upload, QueueError>) -> FullReason {
        match result {
            Err(QueueError::Full {
                reason,
                retry_after,
                ..
            }) => {
                assert_eq!(retry_after, FULL_RETRY_AFTER);
                reason
            }
            other => panic!("expected Full, got {other:?}"),
        }
    }

    #[test]
    fn items_come_back_in_seq_order_per_tunnel() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let (a, b) = (tunnel("alpha"), tunnel("alpha-b"));
        let mut expected_a = Vec::new();
        for i in 0..10u8 {
            expected_a.push(enqueue(&q, &a, &[i]));
            enqueue(&q, &b, &[100 + i]);
        }
        let all_a = q.after(&a, None, 100).expect("after");
        assert_eq!(all_a, expected_a);
        assert!(all_a.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(all_a.iter().all(|item| item.head.tunnel == a));

        // Paging by cursor visits the same items, none twice.
        let mut paged = Vec::new();
        let mut cursor = None;
        loop {
            let page = q.after(&a, cursor, 3).expect("page");
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 3);
            cursor = page.last().map(|item| item.seq);
            paged.extend(page);
        }
        assert_eq!(paged, expected_a);
        assert!(q
            .after(&a, Some(u64::MAX), 10)
            .expect("after max")
            .is_empty());

        let b_bodies: Vec<Vec<u8>> = q
            .after(&b, None, 100)
            .expect("after b")
            .iter()
            .map(|item| read_body(&q, item))
            .collect();
        assert_eq!(b_bodies, (100..110u8).map(|i| vec![i]).collect::<Vec<_>>());
    }

    #[test]
    fn multi_chunk_body_is_reassembled_exactly() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let t = tunnel("big");
        // 3 MiB plus a ragged tail of xorshift bytes.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let body: Vec<u8> = (0..(3 << 20) + 1234)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut upload = q.begin(&t, None).expect("begin");
        for chunk in body.chunks(64 * 1024) {
            q.append(&mut upload, chunk).expect("append");
        }
        q.append(&mut upload, &[]).expect("empty chunk");
        assert_eq!(upload.written(), body.len() as u64);
        let item = q.commit(upload, head(&t, now_ms())).expect("commit");
        assert_eq!(item.body_len, body.len() as u64);
        assert_eq!(q.body(&item).count(), 49);
        assert!(read_body(&q, &item) == body, "body differs");
        assert_eq!(q.stats(&t).bytes, body.len() as u64);
    }

    #[test]
    fn empty_body_has_no_chunks() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let t = tunnel("empty");
        let upload = q.begin(&t, Some(0)).expect("begin");
        let item = q.commit(upload, head(&t, now_ms())).expect("commit");
        assert_eq!(item.body_len, 0);
        assert_eq!(q.body(&item).count(), 0);
    }

    #[test]
    fn remove_updates_stats_and_deletes_body() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let t = tunnel("rm");
        let first = enqueue(&q, &t, &[1; 1000]);
        let second = enqueue(&q, &t, &[2; 500]);
        let stats = q.stats(&t);
        assert_eq!((stats.count, stats.bytes), (2, 1500));
        assert_eq!(stats.oldest_received_at_ms, Some(first.head.received_at_ms));

        assert!(q.remove(&t, first.seq).expect("remove"));
        assert!(!q.remove(&t, first.seq).expect("remove again"));
        let stats = q.stats(&t);
        assert_eq!((stats.count, stats.bytes), (1, 500));
        assert_eq!(
            stats.oldest_received_at_ms,
            Some(second.head.received_at_ms)
        );
        assert_eq!(q.stored_chunks(), 1);

        assert!(q.remove(&t, second.seq).expect("remove"));
        assert_eq!(
            q.stats(&t),
            TunnelStats {
                tunnel: t.clone(),
                count: 0,
                bytes: 0,
                oldest_received_at_ms: None,
            }
        );
        assert_eq!(q.stored_chunks(), 0);
        assert_eq!(q.stored_markers(), 0);
        assert!(q.all_stats().is_empty());
    }

    #[test]
    fn purge_removes_every_item_and_body_of_one_tunnel() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let (doomed, kept) = (tunnel("doomed"), tunnel("kept"));
        // More than one purge page.
        for i in 0..(PAGE + 10) {
            enqueue(&q, &doomed, &i.to_be_bytes());
        }
        let survivor = enqueue(&q, &kept, b"stay");
        assert_eq!(q.purge(&doomed).expect("purge"), (PAGE + 10) as u64);
        assert_eq!(q.stats(&doomed).count, 0);
        assert!(q.after(&doomed, None, 10).expect("after").is_empty());
        assert_eq!(q.stored_chunks(), 1, "only the kept tunnel's body remains");
        assert_eq!(q.stored_markers(), 0);
        assert_eq!(q.all_stats(), vec![q.stats(&kept)]);
        assert_eq!(read_body(&q, &survivor), b"stay");
        assert_eq!(q.purge(&doomed).expect("purge empty"), 0);
    }

    #[test]
    fn all_stats_lists_queued_tunnels_by_name() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        enqueue(&q, &tunnel("zulu"), b"z");
        enqueue(&q, &tunnel("alpha"), b"aa");
        // An upload in progress does not make a tunnel "queued".
        let _upload = q.begin(&tunnel("mike"), Some(5)).expect("begin");
        let names: Vec<String> = q.all_stats().iter().map(|s| s.tunnel.to_string()).collect();
        assert_eq!(names, ["alpha", "zulu"]);
        assert_eq!(q.all_stats()[0].bytes, 2);
    }

    #[test]
    fn count_bound_counts_uploads_and_reopens_after_removal() {
        let q = SledQueue::temporary(limits(3, u64::MAX)).expect("queue");
        let t = tunnel("count");
        let first = enqueue(&q, &t, b"1");
        enqueue(&q, &t, b"2");
        let in_progress = q.begin(&t, None).expect("third slot");
        assert_eq!(full_reason(q.begin(&t, None)), FullReason::Count);
        q.abort(in_progress);
        let third = q.begin(&t, None).expect("slot freed by abort");
        q.commit(third, head(&t, now_ms())).expect("commit");
        assert_eq!(full_reason(q.begin(&t, None)), FullReason::Count);
        // Other tunnels have their own bounds.
        q.begin(&tunnel("other"), None).expect("other tunnel");
        assert!(q.remove(&t, first.seq).expect("remove"));
        q.begin(&t, None).expect("slot freed by removal");
    }

    #[test]
    fn byte_bound_applies_to_declared_length() {
        let q = SledQueue::temporary(limits(100, 1000)).expect("queue");
        let t = tunnel("bytes");
        let item = enqueue(&q, &t, &[0; 600]);
        assert_eq!(full_reason(q.begin(&t, Some(401))), FullReason::Bytes);
        let reserved = q.begin(&t, Some(300)).expect("fits");
        assert_eq!(full_reason(q.begin(&t, Some(101))), FullReason::Bytes);
        drop(reserved);
        q.begin(&t, Some(400))
            .expect("fits exactly once the reservation is gone");
        assert!(q.remove(&t, item.seq).expect("remove"));
        q.begin(&t, Some(600)).expect("fits after removal");
    }

    #[test]
    fn byte_bound_applies_while_streaming_undeclared_bodies() {
        let q = SledQueue::temporary(limits(100, 1000)).expect("queue");
        let t = tunnel("stream");
        let mut upload = q.begin(&t, None).expect("begin");
        q.append(&mut upload, &[1; 700]).expect("first chunk fits");
        let second = q.begin(&t, Some(300)).expect("room left");
        match q.append(&mut upload, &[2; 1]) {
            Err(QueueError::Full {
                reason: FullReason::Bytes,
                ..
            }) => {}
            other => panic!("expected Full(Bytes), got {other:?}"),
        }
        assert_eq!(upload.written(), 700, "the refused chunk is not written");
        q.abort(upload);
        assert_eq!(q.stored_chunks(), 0, "abort deletes the chunks");
        drop(second);
        // A body shorter than declared only counts what was written.
        let mut upload = q.begin(&t, Some(1000)).expect("begin");
        q.append(&mut upload, &[3; 10]).expect("append");
        let item = q.commit(upload, head(&t, now_ms())).expect("commit");
        assert_eq!(item.body_len, 10);
        assert_eq!(q.stats(&t).bytes, 10);
        q.begin(&t, Some(990))
            .expect("the rest of the reservation is free");
    }

    #[test]
    fn stale_queue_refuses_new_work_until_drained() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let t = tunnel("stale");
        let eight_days_ago = now_ms() - 8 * 24 * 3600 * 1000;
        let upload = q.begin(&t, Some(0)).expect("begin");
        let old = q.commit(upload, head(&t, eight_days_ago)).expect("commit");
        assert_eq!(full_reason(q.begin(&t, None)), FullReason::Age);
        q.begin(&tunnel("fresh"), None)
            .expect("other tunnels unaffected");
        assert!(q.remove(&t, old.seq).expect("remove"));
        q.begin(&t, None).expect("accepted once drained");
    }

    #[test]
    fn commit_refuses_a_head_of_another_tunnel_and_aborts() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let t = tunnel("mine");
        let mut upload = q.begin(&t, Some(3)).expect("begin");
        q.append(&mut upload, b"abc").expect("append");
        assert!(matches!(
            q.commit(upload, head(&tunnel("theirs"), now_ms())),
            Err(QueueError::Storage(_))
        ));
        assert_eq!(q.stored_chunks(), 0);
        assert_eq!(q.stored_markers(), 0);
        assert!(q.all_stats().is_empty());
        assert!(q.inner.lock_usage().is_empty(), "reservation released");
    }

    #[test]
    fn dropped_upload_is_aborted() {
        let q = SledQueue::temporary(limits(1, 100)).expect("queue");
        let t = tunnel("cancel");
        let mut upload = q.begin(&t, None).expect("begin");
        q.append(&mut upload, &[7; 100]).expect("append");
        // As when the sender disconnects and the ingress future is dropped.
        drop(upload);
        assert_eq!(q.stored_chunks(), 0);
        assert_eq!(q.stored_markers(), 0);
        q.begin(&t, Some(100)).expect("slot and bytes released");
    }

    #[test]
    fn missing_chunk_is_a_storage_error_not_a_panic() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let t = tunnel("broken");
        let mut upload = q.begin(&t, None).expect("begin");
        // Beyond the inline size: stored as it comes, one chunk each.
        q.append(&mut upload, &[1; 5000]).expect("append");
        q.append(&mut upload, &[2; 5000]).expect("append");
        let item = q.commit(upload, head(&t, now_ms())).expect("commit");
        q.inner
            .chunks
            .remove(chunk_key(item.upload_id, 1))
            .expect("remove chunk");
        let chunks: Vec<_> = q.body(&item).collect();
        assert_eq!(chunks.len(), 2, "stops after the error");
        assert_eq!(chunks[0].as_ref().expect("first chunk").as_ref(), [1; 5000]);
        assert!(matches!(chunks[1], Err(QueueError::Storage(_))));
    }

    #[test]
    fn unreadable_head_is_skipped_and_not_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tunnel("corrupt");
        {
            let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
            let good = enqueue(&q, &t, b"ok");
            q.inner
                .heads
                .insert(head_key(&t, good.seq - 1), &b"\xff\xff garbage"[..])
                .expect("insert garbage");
            let items = q.after(&t, None, 10).expect("after");
            assert_eq!(items, vec![good.clone()]);
            assert_eq!(
                q.stats(&t).oldest_received_at_ms,
                Some(good.head.received_at_ms)
            );
        }
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        assert_eq!(q.stats(&t).count, 1);
        assert_eq!(q.purge(&t).expect("purge"), 2, "purge clears it too");
        assert_eq!(q.stats(&t).count, 0);
    }

    #[tokio::test]
    async fn reopen_keeps_items_and_stats_and_seqs_keep_growing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (tunnel("keep-a"), tunnel("keep-b"));
        let (before, stats_before) = {
            let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
            let mut items = Vec::new();
            for i in 0..5u8 {
                items.push(enqueue(&q, &a, &[i; 10]));
            }
            enqueue(&q, &b, b"b");
            q.sync().await.expect("sync");
            (items, q.all_stats())
        };
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        assert_eq!(q.after(&a, None, 100).expect("after"), before);
        assert_eq!(q.all_stats(), stats_before);
        assert_eq!(read_body(&q, &before[4]), vec![4; 10]);
        let newest = before.iter().map(|item| item.seq).max().expect("items");
        let next = enqueue(&q, &a, b"new");
        assert!(next.seq > newest, "{} <= {newest}", next.seq);
        assert!(next.upload_id > before[4].upload_id);
    }

    #[test]
    fn uncommitted_upload_leaves_nothing_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tunnel("crash");
        {
            let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
            enqueue(&q, &t, b"committed");
            let mut upload = q.begin(&t, None).expect("begin");
            q.append(&mut upload, &[9; 4096]).expect("append");
            q.append(&mut upload, &[9; 4096]).expect("append");
            // The committed body is a chunk, the unfinished one (8 KiB) a file.
            assert_eq!(q.stored_chunks(), 1);
            assert_eq!(q.files().count(), 1);
            // A crash: neither commit nor abort runs.
            upload.disarm();
            drop(upload);
            q.inner.db.flush().expect("flush");
        }
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        assert_eq!(q.stored_chunks(), 1, "only the committed body remains");
        assert_eq!(q.files().count(), 0, "the unfinished body's file is gone");
        assert_eq!(q.stored_markers(), 0);
        let stats = q.stats(&t);
        assert_eq!((stats.count, stats.bytes), (1, 9));
        assert!(q.inner.lock_usage().get(&t).is_some_and(|u| u.uploads == 0));
    }

    /// `len` bytes that differ from one position to the next.
    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn large_bodies_are_files_deleted_only_after_their_removal_is_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tunnel("files");
        let body = noise(300_000);
        let (large, small) = {
            let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
            let mut upload = q.begin(&t, None).expect("begin");
            for piece in body.chunks(64 * 1024) {
                q.append(&mut upload, piece).expect("append");
            }
            assert!(upload.commit_blocks());
            let large = q.commit(upload, head(&t, now_ms())).expect("commit");
            // Exactly at the limit: one sled value, no file.
            let small = enqueue(&q, &t, &[7; INLINE_BODY_BYTES]);
            assert_eq!((q.files().count(), q.stored_chunks()), (1, 1));
            assert!(read_body(&q, &large) == body, "body differs");
            assert_eq!(q.body(&large).count(), 5, "read in 64 KiB pieces");
            q.sync().await.expect("sync");
            (large, small)
        };
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        assert!(read_body(&q, &large) == body, "body differs after reopen");
        assert_eq!(read_body(&q, &small), vec![7; INLINE_BODY_BYTES]);

        assert!(q.remove(&t, large.seq).expect("remove"));
        // Until the removal is on disk, a crash could bring the head back:
        // its file stays.
        assert!(q.files().path(large.upload_id).exists());
        assert_eq!(q.stored_markers(), 1);
        q.sync().await.expect("sync");
        assert_eq!((q.files().count(), q.stored_markers()), (0, 0));
        assert!(q.remove(&t, small.seq).expect("remove"));
        assert_eq!((q.stored_chunks(), q.stored_markers()), (0, 0));
        assert_eq!(q.stats(&t).count, 0);
    }

    #[tokio::test]
    async fn a_removal_cut_short_leaves_no_head_without_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tunnel("cut");
        let body = noise(100_000);
        {
            let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
            let kept = enqueue(&q, &t, &body);
            let removed = enqueue(&q, &t, &body);
            q.sync().await.expect("sync");
            assert!(q.remove(&t, removed.seq).expect("remove"));
            assert_eq!(kept.body_len, 100_000);
            // No sync: whatever sled wrote by itself is all there is.
        }
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        let items = q.after(&t, None, 10).expect("after");
        assert!(!items.is_empty());
        for item in &items {
            assert!(read_body(&q, item) == body, "body of {} differs", item.seq);
        }
        assert_eq!(q.files().count(), items.len(), "one file per head, no more");
        assert_eq!(q.stored_markers(), 0);
    }

    #[test]
    fn an_aborted_or_refused_large_upload_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
        let t = tunnel("gone");
        let mut upload = q.begin(&t, None).expect("begin");
        q.append(&mut upload, &noise(10_000)).expect("append");
        assert_eq!(q.files().count(), 1);
        q.abort(upload);
        assert_eq!((q.files().count(), q.stored_markers()), (0, 0));
        // A refused commit (a head of another tunnel) cleans up too.
        let mut upload = q.begin(&t, None).expect("begin");
        q.append(&mut upload, &noise(10_000)).expect("append");
        assert!(q.commit(upload, head(&tunnel("other"), now_ms())).is_err());
        assert_eq!((q.files().count(), q.stored_markers()), (0, 0));
        assert_eq!(q.stats(&t).count, 0);
    }

    /// A body file that cannot be written (here: its directory is gone; a
    /// full disk alike) fails the append with a storage error, and the
    /// aborted upload leaves nothing behind; the next one works again.
    #[test]
    fn a_body_file_that_cannot_be_written_is_a_storage_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
        let t = tunnel("full");
        let bodies = dir.path().join("queue-bodies");
        std::fs::remove_dir_all(&bodies).expect("remove");
        let mut upload = q.begin(&t, None).expect("begin");
        match q.append(&mut upload, &noise(10_000)) {
            Err(QueueError::Storage(why)) => assert!(why.contains("cannot write"), "{why}"),
            other => panic!("expected a storage error, got {other:?}"),
        }
        q.abort(upload);
        assert_eq!(q.stored_markers(), 0);
        assert!(
            q.inner.lock_usage().get(&t).is_none(),
            "nothing counted or reserved"
        );
        std::fs::create_dir_all(&bodies).expect("mkdir");
        let item = enqueue(&q, &t, &noise(10_000));
        assert!(read_body(&q, &item) == noise(10_000));
    }

    #[test]
    fn open_deletes_body_files_no_head_owns_and_leaves_other_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tunnel("strays");
        let kept = {
            let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
            enqueue(&q, &t, &noise(10_000))
        };
        let bodies = dir.path().join("queue-bodies");
        // A file created before a crash lost its upload's marker.
        std::fs::write(
            bodies.join(format!("{:016x}.body", kept.upload_id + 1000)),
            b"x",
        )
        .expect("stray");
        std::fs::write(bodies.join("notes.txt"), b"mine").expect("other file");
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        assert_eq!(q.files().count(), 2, "the kept body and the other file");
        assert!(read_body(&q, &kept) == noise(10_000));
        assert!(bodies.join("notes.txt").exists());
    }

    #[test]
    fn open_reports_locked_while_the_store_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
        let started = Instant::now();
        match SledQueue::open(dir.path(), QueueLimits::default()) {
            Err(QueueError::Locked(path)) => assert!(path.contains(&*dir.path().to_string_lossy())),
            other => panic!("expected Locked, got {other:?}"),
        }
        assert!(started.elapsed() >= LOCK_WAIT, "retried before giving up");
    }

    #[tokio::test]
    async fn commit_wakes_waiters() {
        let q = SledQueue::temporary(QueueLimits::default()).expect("queue");
        let changed = q.changed();
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        enqueue(&q, &tunnel("wake"), b"x");
        tokio::time::timeout(Duration::from_secs(1), notified)
            .await
            .expect("woken by the commit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sync_serves_fifty_concurrent_committers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Arc::new(SledQueue::open(dir.path(), QueueLimits::default()).expect("open"));
        let t = tunnel("many");
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let (q, t) = (q.clone(), t.clone());
            tasks.push(tokio::spawn(async move {
                let item = enqueue(&q, &t, &i.to_be_bytes());
                q.sync().await.expect("sync");
                item.seq
            }));
        }
        let mut seqs = HashSet::new();
        for task in tasks {
            seqs.insert(task.await.expect("task"));
        }
        assert_eq!(seqs.len(), 50);
        assert_eq!(q.stats(&t).count, 50);
        drop(q);
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        assert_eq!(q.stats(&t).count, 50);
    }

    /// Opening a store of 100k small items; run with `--ignored --nocapture`.
    #[test]
    #[ignore = "slow: measures open time with 100k items"]
    fn open_with_100k_items_is_quick() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tunnel("load");
        {
            let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("open");
            let started = Instant::now();
            for i in 0..100_000u32 {
                enqueue(&q, &t, &[i as u8; 200]);
            }
            q.inner.db.flush().expect("flush");
            eprintln!("queued 100k items in {:?}", started.elapsed());
        }
        let started = Instant::now();
        let q = SledQueue::open(dir.path(), QueueLimits::default()).expect("reopen");
        let opened = started.elapsed();
        eprintln!("opened 100k items in {opened:?}");
        assert_eq!(q.stats(&t).count, 100_000);
        let started = Instant::now();
        assert_eq!(q.purge(&t).expect("purge"), 100_000);
        eprintln!("purged 100k items in {:?}", started.elapsed());
        assert!(opened < Duration::from_secs(3), "{opened:?}");
    }
}
