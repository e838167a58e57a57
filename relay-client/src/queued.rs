//! Webhooks the relay queued (the sender already got `202`): the agent's own
//! durable outbox, the queue stream that fills it, and the worker that hands
//! each one to the local app, in order, with retries.
//!
//! Guarantees, in the order a webhook meets them:
//! - The relay deletes a webhook only after the agent acknowledged it, and the
//!   agent acknowledges only what is flushed to its disk. Anything in between
//!   is sent again after a reconnect; the agent knows every delivery id it
//!   ever stored (tree `outbox_seen`) and acknowledges a repeat without
//!   storing it twice. An entry a crash left on disk without its delivery id
//!   (sled writes its log whenever any flush runs) gets it back at the next
//!   open, before anything is received.
//! - The worker takes the oldest webhook, marks it "with the app" on disk,
//!   then sends it: an agent killed meanwhile does not send that one again on
//!   restart (at most once per delivery id); it is recorded as interrupted
//!   and can be replayed.
//! - A local app that cannot be connected to is waited for (nothing reached
//!   it; attempts are not used up); a 5xx, 429, timeout or broken answer is
//!   retried with exponential backoff and jitter, honouring `Retry-After`;
//!   after the last attempt the webhook is marked failed in the history. Any
//!   other answer is final. Later webhooks wait their turn: the app sees them
//!   in the order the relay received them.
//!
//! Layout (in the history's sled store, sharing its flushes): `outbox` maps a
//! local sequence number (u64 BE, increasing in queue-stream order) to an
//! [`Entry`] in JSON; `outbox_bodies` maps the same key to a body of up to
//! 4 KiB; a larger body is a file named after the key in `DATA_DIR/outbox-bodies/`
//! (sled keeps in memory about what it stores in large values, see
//! [`hookrelay_shared::body_files`]), synced before its entry is written and
//! deleted after the flush that makes the entry's removal durable;
//! `outbox_seen` maps a delivery id (16-byte ULID) to the time it was stored.
//! What the queue stream brings is staged in memory (a large body already in
//! its file) and written by the next [`Outbox::flush`], in order, after one
//! sync of all the staged files: one `fdatasync` per file and one of the
//! directory per acknowledged batch, off the async worker.

use std::{collections::HashSet, io::Write, sync::Arc, time::Duration};

use bytes::Bytes;
use hookrelay_shared::{
    body_files::{kept_in_file, BodyFiles},
    codec::{read_frame, write_frame},
    DeliveryId, QueueAck, QueueOpen, QueuedDelivery, RequestHead,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    forward::Forwarder,
    history::{lock, now_ms, Exchange, History, HistoryError},
};

/// Deliveries the relay may send ahead of the agent's acknowledgements.
pub const QUEUE_WINDOW: u32 = 64;

/// Largest queued body the agent takes (the relay's own limit is far lower).
const MAX_QUEUED_BODY: u64 = 1 << 30;

/// Largest read from the queue stream at once.
const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// Delivery ids are remembered this long after they were stored: far longer
/// than the relay keeps anything queued (7 days by default).
const SEEN_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;

/// Default attempts at a queued webhook before it is marked failed.
pub const DEFAULT_ATTEMPTS: u32 = 10;
/// Default first retry delay.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Default longest retry delay.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(300);

/// When to try a queued webhook again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included).
    pub attempts: u32,
    /// Delay after the first failed attempt; doubled after each one.
    pub initial: Duration,
    /// Cap on any delay (a longer `Retry-After` is capped too).
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: DEFAULT_ATTEMPTS,
            initial: DEFAULT_RETRY_INITIAL,
            max: DEFAULT_RETRY_MAX,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): exponential,
    /// capped, with "equal jitter" (half fixed, half random) so that many
    /// agents do not hammer an app in step.
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// What one attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueuedOutcome {
    /// Answered for good (2xx, 3xx, or a 4xx other than 429), or a duplicate.
    Done,
    /// Try again at this time (Unix ms).
    RetryAt(u64),
    /// The last attempt failed; marked failed in the history.
    Failed,
    /// The app could not be connected to; nothing reached it.
    Unreachable,
}

/// One stored webhook.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    head: RequestHead,
    /// Attempts made so far.
    attempts: u32,
    /// Not before this time (Unix ms).
    next_at_ms: u64,
    /// Set (and flushed) just before the app gets it; cleared after.
    with_app: bool,
}

/// What [`Outbox::open`] reads of an [`Entry`] written some other way
/// than [`ENTRY_ID_PREFIX`] expects.
#[derive(Deserialize)]
struct EntryId {
    head: HeadId,
}

#[derive(Deserialize)]
struct HeadId {
    delivery_id: DeliveryId,
}

/// How every stored [`Entry`]'s JSON begins: serde writes fields in their
/// declared order, `head` first in `Entry` and `delivery_id` first in
/// `RequestHead`, and a ULID as its 26 characters.
const ENTRY_ID_PREFIX: &[u8] = br#"{"head":{"delivery_id":""#;

/// The delivery id of a stored entry, read from the start of its JSON
/// ([`Outbox::open`] reads every waiting webhook's, and parsing the whole
/// entry was four fifths of its time: 1 s for 100,000), or from the whole
/// entry if it does not begin as expected; `None` if neither reads.
fn entry_delivery_id(value: &[u8]) -> Option<[u8; 16]> {
    quick_delivery_id(value).or_else(|| {
        serde_json::from_slice::<EntryId>(value)
            .ok()
            .map(|entry| entry.head.delivery_id.0.to_bytes())
    })
}

/// Whether a stored entry was with the app when the agent stopped, from
/// the end of its JSON (`with_app` is [`Entry`]'s last field), or from the
/// whole entry if it does not end as expected.
fn entry_with_app(value: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct WithApp {
        with_app: bool,
    }
    quick_with_app(value).unwrap_or_else(|| {
        serde_json::from_slice::<WithApp>(value).is_ok_and(|entry| entry.with_app)
    })
}

fn quick_with_app(value: &[u8]) -> Option<bool> {
    // Only the outermost object's last member can stand right before the
    // JSON's last byte.
    if value.ends_with(br#","with_app":false}"#) {
        Some(false)
    } else if value.ends_with(br#","with_app":true}"#) {
        Some(true)
    } else {
        None
    }
}

fn quick_delivery_id(value: &[u8]) -> Option<[u8; 16]> {
    let rest = value.strip_prefix(ENTRY_ID_PREFIX)?;
    let (id, after) = rest.split_at_checked(ulid::ULID_LEN)?;
    if after.first() != Some(&b'"') {
        return None;
    }
    let id = std::str::from_utf8(id).ok()?;
    ulid::Ulid::from_string(id).ok().map(|id| id.to_bytes())
}

/// A webhook received and not yet written to the store.
struct Staged {
    seq: [u8; 8],
    delivery_id: [u8; 16],
    entry: Entry,
    body: StagedBody,
}

enum StagedBody {
    /// Small: goes to `outbox_bodies`.
    Inline(Vec<u8>),
    /// Written to its file, not yet synced; the creation count
    /// [`BodyFiles::sync_dir`] needs.
    File(std::fs::File, u64),
}

/// Staged webhooks, and the delivery ids of those being written.
#[derive(Default)]
struct Pending {
    staged: Vec<Staged>,
    writing: HashSet<[u8; 16]>,
}

impl Pending {
    /// Whether this delivery is staged or being written.
    fn has(&self, delivery_id: &[u8; 16]) -> bool {
        self.writing.contains(delivery_id)
            || self.staged.iter().any(|s| &s.delivery_id == delivery_id)
    }
}

/// The agent's durable store of queued webhooks. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    history: History,
    items: sled::Tree,
    bodies: sled::Tree,
    seen: sled::Tree,
    changed: Arc<Notify>,
    /// Webhooks the relay sent again that were here already (since start).
    repeats: Arc<std::sync::atomic::AtomicU64>,
    /// Entries in `items`, kept as they are written and removed: sled
    /// counts a tree by walking it, and the inspector's status and metrics
    /// ask on the agent's one thread (100,000 waiting: a walk per request).
    stored: Arc<std::sync::atomic::AtomicUsize>,
    /// Bodies over [`INLINE_BODY_BYTES`](hookrelay_shared::body_files::INLINE_BODY_BYTES), a file each; `None` with an
    /// in-memory history (they are sled values then).
    files: Option<Arc<BodyFiles>>,
    pending: Arc<std::sync::Mutex<Pending>>,
    /// Held while staged webhooks are written, so that they reach the
    /// store in the order they came.
    writing: Arc<std::sync::Mutex<()>>,
    /// Every webhook stored since [`Outbox::open`] has a larger seq (the
    /// store's ids only grow): what [`Outbox::sweep`] may look at.
    opened_below: u64,
    /// Webhooks [`Outbox::open`] found with the app: the agent stopped
    /// while the app had them.
    interrupted: Arc<std::sync::Mutex<Vec<[u8; 8]>>>,
}

impl Outbox {
    /// Opens the outbox inside `history`'s store, restoring the delivery
    /// ids a crash kept off the disk and deleting body files no entry owns.
    /// The rest of the tidying up, which need not hold up the start, is
    /// [`Outbox::sweep`]'s.
    ///
    /// # Errors
    /// A storage error.
    pub fn open(history: &History) -> Result<Outbox, HistoryError> {
        let files = match history.dir() {
            Some(dir) => {
                let dir = dir.join("outbox-bodies");
                let files = BodyFiles::open(dir.clone()).map_err(|e| {
                    HistoryError::Storage(format!("cannot create {}: {e}", dir.display()))
                })?;
                Some(Arc::new(files))
            }
            None => None,
        };
        let outbox = Outbox {
            history: history.clone(),
            items: history.tree("outbox")?,
            bodies: history.tree("outbox_bodies")?,
            seen: history.tree("outbox_seen")?,
            changed: Arc::default(),
            repeats: Arc::default(),
            stored: Arc::default(),
            files,
            pending: Arc::default(),
            writing: Arc::default(),
            opened_below: history.generate_id()?,
            interrupted: Arc::default(),
        };
        // One walk: the count, the entries whose files are kept, those the
        // app had when the agent stopped, and the delivery ids a crash left
        // out of `seen`.
        let mut kept = HashSet::new();
        let mut interrupted = Vec::new();
        let mut stored = 0;
        let mut unseen = 0;
        let stamp_now = now_ms().to_be_bytes();
        for item in outbox.items.iter() {
            let (key, value) = item.map_err(storage)?;
            stored += 1;
            if let Ok(seq) = <[u8; 8]>::try_from(&key[..]) {
                kept.insert(u64::from_be_bytes(seq));
                if entry_with_app(&value) {
                    interrupted.push(seq);
                }
            }
            // sled writes its log whenever a buffer fills or any flush runs
            // (the history's too), so an entry can reach the disk without its
            // delivery id, written just after it: a crash then, before the
            // acknowledgement, and the relay's resend would be stored (and
            // delivered) a second time.
            if let Some(id) = entry_delivery_id(&value) {
                if !outbox.seen.contains_key(id).map_err(storage)? {
                    outbox.seen.insert(id, &stamp_now).map_err(storage)?;
                    unseen += 1;
                }
            }
        }
        if unseen > 0 {
            warn!(
                unseen,
                "queued webhooks were on disk without their delivery id (the agent stopped while storing them); restored, so that the relay's resend is not stored twice"
            );
        }
        outbox
            .stored
            .store(stored, std::sync::atomic::Ordering::Relaxed);
        *lock(&outbox.interrupted) = interrupted;
        if let Some(files) = &outbox.files {
            // Files of webhooks whose entry a crash kept off the disk, or
            // removed before their file went.
            files.delete_unowned(&kept).map_err(|e| {
                HistoryError::Storage(format!("cannot clear the outbox's files: {e}"))
            })?;
        }
        Ok(outbox)
    }

    /// Removes, while the agent runs, the small bodies of webhooks stored
    /// before [`Outbox::open`] whose entry is gone (a crash between the two:
    /// a body is written before its entry and removed after it), and the
    /// delivery ids stored more than a month ago. Both walk a whole tree
    /// (the ids: every webhook of the month), half a second or more at
    /// 100,000 that no longer delays the connection. Returns early once
    /// `stop` is cancelled.
    ///
    /// # Errors
    /// A storage error.
    pub fn sweep(&self, stop: &CancellationToken) -> Result<(), HistoryError> {
        self.remove_stray_bodies(stop)?;
        self.forget_old_ids(stop)
    }

    /// The first half of [`Outbox::sweep`]: strays come from before the
    /// open, so once per open is enough.
    fn remove_stray_bodies(&self, stop: &CancellationToken) -> Result<(), HistoryError> {
        let mut strays = 0u64;
        for key in self.bodies.range(..self.opened_below.to_be_bytes()).keys() {
            if stop.is_cancelled() {
                return Ok(());
            }
            let key = key.map_err(storage)?;
            if !self.items.contains_key(&key).map_err(storage)? {
                self.bodies.remove(key).map_err(storage)?;
                strays += 1;
            }
        }
        if strays > 0 {
            info!(
                strays,
                "removed queued bodies whose webhook was gone (the agent stopped while storing or removing them)"
            );
        }
        Ok(())
    }

    /// The second half of [`Outbox::sweep`], which a running agent repeats.
    fn forget_old_ids(&self, stop: &CancellationToken) -> Result<(), HistoryError> {
        let cutoff = now_ms().saturating_sub(SEEN_RETENTION_MS);
        for item in self.seen.iter() {
            if stop.is_cancelled() {
                return Ok(());
            }
            let (key, value) = item.map_err(storage)?;
            if stamp(&value).is_some_and(|t| t < cutoff) {
                // Unless stamped again meanwhile.
                let _ = self
                    .seen
                    .compare_and_swap(key, Some(value), None::<&[u8]>)
                    .map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Webhooks waiting for the app (those received and not yet written
    /// included).
    pub fn len(&self) -> usize {
        self.stored.load(std::sync::atomic::Ordering::Relaxed) + self.lock_pending().staged.len()
    }

    /// Bytes of the bodies waiting in files (those over
    /// [`INLINE_BODY_BYTES`](hookrelay_shared::body_files::INLINE_BODY_BYTES); smaller ones are in the history's sled store).
    pub fn file_bytes(&self) -> u64 {
        self.files.as_ref().map_or(0, |files| files.disk_bytes())
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many webhooks the relay sent again that this outbox had stored
    /// already, since start: acknowledgements a relay lost (it crashed
    /// before their removal reached its disk) or that were in flight when
    /// the link broke.
    pub fn repeats(&self) -> u64 {
        self.repeats.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes a webhook from the relay's queue, unless its delivery id was
    /// stored (or taken) before; `Ok(false)` for such a repeat. A body over
    /// [`INLINE_BODY_BYTES`](hookrelay_shared::body_files::INLINE_BODY_BYTES) is written to its file now; the webhook reaches
    /// the store with the next [`Outbox::flush`], which the acknowledgement
    /// waits for.
    ///
    /// # Errors
    /// A storage error.
    pub fn store(&self, head: RequestHead, body: &[u8]) -> Result<bool, HistoryError> {
        let delivery_id = head.delivery_id.0.to_bytes();
        if self.seen.contains_key(delivery_id).map_err(storage)?
            || self.lock_pending().has(&delivery_id)
        {
            self.repeats
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(false);
        }
        let seq = self.history.generate_id()?.to_be_bytes();
        let entry = Entry {
            head,
            attempts: 0,
            next_at_ms: 0,
            with_app: false,
        };
        let body = match &self.files {
            Some(files) if kept_in_file(body.len() as u64) => files
                .create(u64::from_be_bytes(seq))
                .and_then(|(mut file, created)| {
                    file.write_all(body)?;
                    Ok(StagedBody::File(file, created))
                })
                .map_err(|e| HistoryError::Storage(format!("cannot store a queued body: {e}")))?,
            _ => StagedBody::Inline(body.to_vec()),
        };
        // The file was written outside the lock: look again.
        let mut pending = self.lock_pending();
        if pending.has(&delivery_id) {
            drop(pending);
            if let (Some(files), StagedBody::File(..)) = (&self.files, &body) {
                let _ = files.remove(u64::from_be_bytes(seq));
            }
            self.repeats
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(false);
        }
        pending.staged.push(Staged {
            seq,
            delivery_id,
            entry,
            body,
        });
        Ok(true)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        lock(&self.pending)
    }

    /// Writes what was staged, in order, once its files are durable: on the
    /// blocking pool when there are files to sync or another write is under
    /// way (it is waited for: what it took may have been staged before this
    /// call), else here.
    async fn write_staged(&self) -> Result<(), HistoryError> {
        let has_files = self
            .lock_pending()
            .staged
            .iter()
            .any(|s| matches!(s.body, StagedBody::File(..)));
        if !has_files {
            if let Ok(order) = self.writing.try_lock() {
                return self.write_batch(order);
            }
        }
        let outbox = self.clone();
        tokio::task::spawn_blocking(move || {
            let order = lock(&outbox.writing);
            outbox.write_batch(order)
        })
        .await
        .unwrap_or_else(|e| Err(HistoryError::Storage(e.to_string())))
    }

    /// Takes everything staged and writes it, holding `_order`. Once begun
    /// it runs to its end even if the flush that asked for it is dropped.
    /// On failure the batch is staged again, ahead of anything newer, so
    /// that the next flush (the one an acknowledgement waits for, too)
    /// writes it or fails: nothing is acknowledged unwritten. Writing is
    /// idempotent (every key is the webhook's own seq).
    fn write_batch(&self, _order: std::sync::MutexGuard<'_, ()>) -> Result<(), HistoryError> {
        let staged = {
            let mut pending = self.lock_pending();
            let staged = std::mem::take(&mut pending.staged);
            pending.writing.extend(staged.iter().map(|s| s.delivery_id));
            staged
        };
        let written = self.write(&staged);
        let mut pending = self.lock_pending();
        for s in &staged {
            pending.writing.remove(&s.delivery_id);
        }
        if written.is_err() {
            let newer = std::mem::replace(&mut pending.staged, staged);
            pending.staged.extend(newer);
        }
        written
    }

    fn write(&self, staged: &[Staged]) -> Result<(), HistoryError> {
        let mut created = 0;
        for s in staged {
            if let StagedBody::File(file, c) = &s.body {
                file.sync_data().map_err(|e| {
                    HistoryError::Storage(format!("cannot sync a queued body: {e}"))
                })?;
                created = created.max(*c);
            }
        }
        if let (Some(files), true) = (&self.files, created > 0) {
            // Findable too, before an entry names them.
            files
                .sync_dir(created)
                .map_err(|e| HistoryError::Storage(format!("cannot sync the outbox: {e}")))?;
        }
        if staged.is_empty() {
            return Ok(());
        }
        // In this order, the delivery id last: whatever part of a webhook a
        // crash leaves on disk, a delivery id is never there without its
        // entry (the relay's resend would be acknowledged and lost), and an
        // entry without its delivery id is mended by the next open.
        for s in staged {
            if let StagedBody::Inline(body) = &s.body {
                self.bodies
                    .insert(s.seq, body.as_slice())
                    .map_err(storage)?;
            }
            self.put(s.seq, &s.entry)?;
            self.seen
                .insert(s.delivery_id, &now_ms().to_be_bytes())
                .map_err(storage)?;
        }
        self.changed.notify_one();
        Ok(())
    }

    /// Writes what was staged and makes everything stored so far durable.
    ///
    /// # Errors
    /// A storage error.
    pub async fn flush(&self) -> Result<(), HistoryError> {
        self.write_staged().await?;
        // Taken first: the removals behind them were written before this
        // flush was asked for, so they are on disk once it returns.
        let doomed = self.files.as_ref().map(|files| files.take_doomed());
        let flushed = self.history.flush().await;
        if let (Some(files), Some(doomed)) = (&self.files, doomed) {
            files.settle_doomed(doomed, flushed.is_ok());
        }
        flushed
    }

    fn put(&self, seq: [u8; 8], entry: &Entry) -> Result<(), HistoryError> {
        let json = serde_json::to_vec(entry).map_err(|e| HistoryError::Storage(e.to_string()))?;
        if self.items.insert(seq, json).map_err(storage)?.is_none() {
            self.stored
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes `key` from `items`, counting it out if it was there.
    fn remove_item(&self, key: impl AsRef<[u8]>) -> Result<(), HistoryError> {
        if self.items.remove(key).map_err(storage)?.is_some() {
            let _ = self.stored.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| Some(n.saturating_sub(1)),
            );
        }
        Ok(())
    }

    /// The oldest waiting webhook.
    fn first(&self) -> Result<Option<([u8; 8], Entry)>, HistoryError> {
        for item in self.items.iter() {
            let (key, value) = item.map_err(storage)?;
            let Ok(seq) = <[u8; 8]>::try_from(&key[..]) else {
                self.remove_item(key)?;
                continue;
            };
            match serde_json::from_slice::<Entry>(&value) {
                Ok(entry) => return Ok(Some((seq, entry))),
                Err(err) => {
                    // Cannot be delivered; keep the bytes visible in the log
                    // rather than block everything behind it.
                    warn!(error = %err, "dropping an unreadable outbox entry");
                    self.remove_item(key)?;
                }
            }
        }
        Ok(None)
    }

    fn body(&self, seq: [u8; 8]) -> Result<Bytes, HistoryError> {
        if let Some(body) = self.bodies.get(seq).map_err(storage)? {
            return Ok(Bytes::copy_from_slice(&body));
        }
        let Some(files) = &self.files else {
            return Ok(Bytes::new());
        };
        match std::fs::read(files.path(u64::from_be_bytes(seq))) {
            Ok(body) => Ok(Bytes::from(body)),
            // An empty body has neither.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Bytes::new()),
            Err(e) => Err(HistoryError::Storage(format!(
                "cannot read a queued body: {e}"
            ))),
        }
    }

    /// Removes a webhook; its body file goes with the next flush.
    fn remove(&self, seq: [u8; 8]) -> Result<(), HistoryError> {
        self.remove_item(seq)?;
        if self.bodies.remove(seq).map_err(storage)?.is_none() {
            if let Some(files) = &self.files {
                files.doom([u64::from_be_bytes(seq)]);
            }
        }
        Ok(())
    }
}

fn stamp(value: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(value).ok().map(u64::from_be_bytes)
}

fn storage(e: sled::Error) -> HistoryError {
    HistoryError::Storage(e.to_string())
}

/// How often a running agent forgets delivery ids older than
/// [`SEEN_RETENTION_MS`] (an agent may run for weeks without a restart).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Runs [`Outbox::sweep`] on the blocking pool now, and its forgetting of
/// old delivery ids every `every` after, until `shutdown`.
pub(crate) async fn sweep_periodically(
    outbox: Outbox,
    shutdown: CancellationToken,
    every: Duration,
) {
    let mut first = true;
    loop {
        let (o, stop) = (outbox.clone(), shutdown.clone());
        let whole = std::mem::replace(&mut first, false);
        let sweep = move || {
            if whole {
                o.sweep(&stop)
            } else {
                o.forget_old_ids(&stop)
            }
        };
        match tokio::task::spawn_blocking(sweep).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(
                error = &err as &dyn std::error::Error,
                "cannot tidy the outbox up; trying again later"
            ),
            Err(err) => warn!(error = %err, "the outbox's tidying up stopped"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Hands queued webhooks to the app, oldest first, until `shutdown`.
pub(crate) async fn run_worker(
    outbox: Outbox,
    forwarder: Forwarder,
    policy: RetryPolicy,
    shutdown: CancellationToken,
) {
    if let Err(err) = settle_interrupted(&outbox, &forwarder, &policy).await {
        tracing::error!(
            error = &err as &dyn std::error::Error,
            "cannot read the outbox"
        );
    }
    let mut unreachable_streak: u32 = 0;
    // Attempts stored but not yet flushed: the next flush covers them (one
    // fsync per webhook, not two), then they are shown.
    let mut unshown: Vec<Arc<Exchange>> = Vec::new();
    loop {
        let notified = outbox.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = match outbox.first() {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(
                    error = &err as &dyn std::error::Error,
                    "cannot read the outbox"
                );
                None
            }
        };
        let idle = next
            .as_ref()
            .is_none_or(|(_, entry)| entry.next_at_ms > now_ms());
        if idle && !unshown.is_empty() {
            show(&outbox, &forwarder, &mut unshown).await;
        }
        let Some((seq, mut entry)) = next else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut notified => continue,
            }
        };
        let wait = entry.next_at_ms.saturating_sub(now_ms());
        if wait > 0 {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            continue;
        }
        if shutdown.is_cancelled() {
            show(&outbox, &forwarder, &mut unshown).await;
            return;
        }
        match attempt(&outbox, &forwarder, &policy, seq, &mut entry, &mut unshown).await {
            Ok(QueuedOutcome::Unreachable) => {
                unreachable_streak = unreachable_streak.saturating_add(1);
                if unreachable_streak == 1 {
                    warn!(
                        waiting = outbox.len(),
                        "the local app is unreachable; queued webhooks wait for it"
                    );
                }
                let delay = policy.delay(unreachable_streak);
                entry.next_at_ms = now_ms() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                if let Err(err) = outbox.put(seq, &entry) {
                    tracing::error!(
                        error = &err as &dyn std::error::Error,
                        "cannot update the outbox"
                    );
                }
            }
            Ok(_) => {
                if unreachable_streak > 0 {
                    info!(
                        waiting = outbox.len(),
                        "the local app is back; delivering queued webhooks"
                    );
                }
                unreachable_streak = 0;
            }
            Err(err) => {
                tracing::error!(
                    error = &err as &dyn std::error::Error,
                    "outbox storage failed; retrying in 5s"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}

/// Flushes, then shows the attempts that flush made durable.
async fn show(outbox: &Outbox, forwarder: &Forwarder, unshown: &mut Vec<Arc<Exchange>>) {
    match outbox.flush().await {
        Ok(()) => {
            for exchange in unshown.drain(..) {
                forwarder.announce(exchange);
            }
        }
        Err(err) => {
            tracing::error!(
                error = &err as &dyn std::error::Error,
                "cannot flush the history"
            );
        }
    }
}

/// One attempt at the oldest webhook. `unshown` holds earlier attempts
/// stored but not yet flushed; this attempt's flush covers and shows them,
/// and this attempt's own record joins them.
async fn attempt(
    outbox: &Outbox,
    forwarder: &Forwarder,
    policy: &RetryPolicy,
    seq: [u8; 8],
    entry: &mut Entry,
    unshown: &mut Vec<Arc<Exchange>>,
) -> Result<QueuedOutcome, HistoryError> {
    let body = outbox.body(seq)?;
    entry.attempts += 1;
    entry.with_app = true;
    outbox.put(seq, entry)?;
    // On disk before the app sees it: at most once, even across a kill -9.
    // The same flush makes the previous attempt's record and removal durable.
    outbox.flush().await?;
    for exchange in unshown.drain(..) {
        forwarder.announce(exchange);
    }
    let (outcome, exchange) = forwarder
        .deliver_queued(&entry.head, body, entry.attempts, policy)
        .await;
    unshown.extend(exchange);
    entry.with_app = false;
    match outcome {
        QueuedOutcome::Done | QueuedOutcome::Failed => outbox.remove(seq)?,
        QueuedOutcome::RetryAt(at_ms) => {
            entry.next_at_ms = at_ms;
            outbox.put(seq, entry)?;
        }
        QueuedOutcome::Unreachable => {
            // Nothing reached the app: this attempt does not count.
            entry.attempts -= 1;
            outbox.put(seq, entry)?;
        }
    }
    Ok(outcome)
}

/// Webhooks that were with the app when the agent last stopped: recorded as
/// interrupted, not sent again.
async fn settle_interrupted(
    outbox: &Outbox,
    forwarder: &Forwarder,
    policy: &RetryPolicy,
) -> Result<(), HistoryError> {
    let interrupted = std::mem::take(&mut *lock(&outbox.interrupted));
    for seq in interrupted {
        let Some(value) = outbox.items.get(seq).map_err(storage)? else {
            continue;
        };
        let Ok(entry) = serde_json::from_slice::<Entry>(&value) else {
            continue;
        };
        if !entry.with_app {
            continue;
        }
        warn!(delivery_id = %entry.head.delivery_id, "the agent stopped while the app had this webhook; not sending it again (replay it if needed)");
        let body = outbox.body(seq)?;
        forwarder
            .record_interrupted(&entry.head, &body, entry.attempts, policy)
            .await;
        outbox.remove(seq)?;
    }
    outbox.flush().await
}

/// Opens the queue stream on a welcomed connection and stores what the relay
/// sends on it, acknowledging behind each flush. Returns when the stream or
/// the connection ends.
///
/// # Errors
/// Why the stream broke, in words.
pub(crate) async fn receive(connection: quinn::Connection, outbox: Outbox) -> Result<(), String> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(
        &mut send,
        &QueueOpen {
            window: QUEUE_WINDOW,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let (stored_tx, mut stored_rx) = watch::channel::<Option<DeliveryId>>(None);
    let acker = {
        let outbox = outbox.clone();
        async move {
            while stored_rx.changed().await.is_ok() {
                let Some(up_to) = *stored_rx.borrow_and_update() else {
                    continue;
                };
                // Everything stored before `up_to` was announced is covered.
                outbox.flush().await.map_err(|e| e.to_string())?;
                write_frame(&mut send, &QueueAck { up_to })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }
    };
    let reader = async move {
        loop {
            let delivery: QueuedDelivery = match read_frame(&mut recv).await {
                Ok(Some(d)) => d,
                Ok(None) => return Ok(()),
                Err(err) => return Err(err.to_string()),
            };
            if delivery.body_len > MAX_QUEUED_BODY {
                return Err(format!(
                    "queued body of {} bytes is too large",
                    delivery.body_len
                ));
            }
            let body = read_exact(&mut recv, delivery.body_len).await?;
            let id = delivery.head.delivery_id;
            outbox
                .store(delivery.head, &body)
                .map_err(|e| e.to_string())?;
            stored_tx.send_replace(Some(id));
        }
    };
    tokio::select! {
        r = reader => r,
        r = acker => r,
    }
}

async fn read_exact(recv: &mut quinn::RecvStream, len: u64) -> Result<Vec<u8>, String> {
    let mut body = Vec::with_capacity(usize::try_from(len.min(1 << 20)).unwrap_or(0));
    while (body.len() as u64) < len {
        let want = usize::try_from(len - body.len() as u64)
            .unwrap_or(usize::MAX)
            .min(MAX_CHUNK_BYTES);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err("queue stream ended inside a body".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use hookrelay_shared::body_files::INLINE_BODY_BYTES;

    use super::*;

    /// The agent's store in `dir`, as `relay-client http` opens it.
    fn store_in(dir: &std::path::Path) -> History {
        History::open(dir, crate::history::Retention::default()).expect("open the store")
    }

    /// Stores webhooks `ns`, each new to the outbox (not yet flushed).
    fn store_new(outbox: &Outbox, ns: std::ops::RangeInclusive<u8>) {
        for n in ns {
            assert!(
                outbox.store(head(n), b"{}").expect("store"),
                "webhook {n} is new"
            );
        }
    }

    /// A `seen` stamp just older than the ids are kept.
    fn past_retention() -> [u8; 8] {
        (now_ms() - SEEN_RETENTION_MS - 1000).to_be_bytes()
    }

    fn head(n: u8) -> RequestHead {
        RequestHead {
            delivery_id: DeliveryId(ulid::Ulid::from_parts(1, u128::from(n))),
            tunnel: "t".parse().expect("tunnel name"),
            method: "POST".into(),
            path: "/".into(),
            headers: Vec::new(),
            remote_addr: ([127, 0, 0, 1], 1).into(),
            public_url: "http://t.example/".into(),
            received_at_ms: 1,
            timeout_ms: 1000,
            body_len: None,
        }
    }

    /// A crash can leave an entry on disk without its delivery id in `seen`
    /// (sled writes its log whenever any flush runs, here one running on
    /// another thread while the entries were written): the next open
    /// restores the id, so that the relay's resend of that webhook, which was
    /// never acknowledged, is taken as a repeat instead of stored (and
    /// delivered) a second time. Seen in `tests/queue.rs`'s kill -9 test.
    #[tokio::test]
    async fn an_entry_on_disk_without_its_delivery_id_is_not_stored_twice_and_strays_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stray;
        {
            let history = store_in(dir.path());
            let outbox = Outbox::open(&history).expect("outbox");
            stray = history.generate_id().expect("id");
            store_new(&outbox, 1..=3);
            outbox.flush().await.expect("flush");
            // What the crash left: the second webhook's entry, not its id,
            // and the body of a webhook whose entry was not written.
            let id = head(2).delivery_id.0.to_bytes();
            outbox.seen.remove(id).expect("remove");
            outbox
                .bodies
                .insert(stray.to_be_bytes(), b"{}".as_slice())
                .expect("insert");
            outbox.flush().await.expect("flush");
            history.close().await.expect("close");
        }
        let history = store_in(dir.path());
        let outbox = Outbox::open(&history).expect("outbox");
        for n in 1..=3 {
            assert!(
                !outbox.store(head(n), b"{}").expect("store"),
                "webhook {n} sent again is a repeat"
            );
        }
        assert!(outbox.store(head(4), b"{}").expect("store"), "a new one");
        outbox.flush().await.expect("flush");
        outbox.sweep(&CancellationToken::new()).expect("sweep");
        assert!(
            !outbox
                .bodies
                .contains_key(stray.to_be_bytes())
                .expect("get"),
            "a body without its entry is dropped by the sweep"
        );
        assert_eq!(outbox.len(), 4);
        assert_eq!(outbox.bodies.len(), 4, "the others' bodies kept");
        assert_eq!(outbox.repeats(), 3);
    }

    /// The sweep looks only at bodies stored before the open, so that a
    /// webhook whose body is written and whose entry is not yet is safe
    /// from it; it forgets delivery ids older than a month, and stops when
    /// told to.
    #[tokio::test]
    async fn the_sweep_spares_what_came_after_the_open_forgets_old_ids_and_stops_when_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = store_in(dir.path());
        let outbox = Outbox::open(&history).expect("outbox");
        let month_ago = past_retention();
        let old_id = [1u8; 16];
        let recent_id = [2u8; 16];
        outbox.seen.insert(old_id, &month_ago).expect("insert");
        outbox
            .seen
            .insert(recent_id, &now_ms().to_be_bytes())
            .expect("insert");
        // The body of a webhook being stored now: its seq comes after the
        // open's.
        let storing = history.generate_id().expect("id").to_be_bytes();
        outbox
            .bodies
            .insert(storing, b"{}".as_slice())
            .expect("insert");

        let stop = CancellationToken::new();
        stop.cancel();
        outbox.sweep(&stop).expect("sweep");
        assert!(outbox.seen.contains_key(old_id).expect("get"), "stopped");

        outbox.sweep(&CancellationToken::new()).expect("sweep");
        assert!(!outbox.seen.contains_key(old_id).expect("get"));
        assert!(outbox.seen.contains_key(recent_id).expect("get"));
        assert!(outbox.bodies.contains_key(storing).expect("get"));
    }

    /// A running agent forgets month-old delivery ids again and again, not
    /// only at its start; the sweeping stops with the shutdown.
    #[tokio::test]
    async fn old_delivery_ids_are_forgotten_while_the_agent_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = store_in(dir.path());
        let outbox = Outbox::open(&history).expect("outbox");
        let shutdown = CancellationToken::new();
        let sweeping = tokio::spawn(sweep_periodically(
            outbox.clone(),
            shutdown.clone(),
            Duration::from_millis(20),
        ));
        let month_ago = past_retention();
        for round in 0..3u8 {
            let id = [round; 16];
            outbox.seen.insert(id, &month_ago).expect("insert");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while outbox.seen.contains_key(id).expect("get") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the old id is still there"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), sweeping)
            .await
            .expect("stops with the shutdown")
            .expect("join");
    }

    /// The delivery id is read from the start of an entry's JSON and
    /// `with_app` from its end; if a field is ever put before `head` or
    /// `delivery_id`, or after `with_app`, the quick reads' assertions fail
    /// (the whole entry would still be read, only slower).
    #[test]
    fn the_delivery_id_is_read_from_the_start_of_the_entry_or_from_the_whole() {
        let entry = Entry {
            head: head(7),
            attempts: 2,
            next_at_ms: 3,
            with_app: true,
        };
        let id = head(7).delivery_id.0.to_bytes();
        let json = serde_json::to_vec(&entry).expect("json");
        assert_eq!(quick_delivery_id(&json), Some(id));
        let reordered = serde_json::json!({
            "attempts": 2,
            "head": serde_json::to_value(head(7)).expect("head"),
            "next_at_ms": 3,
            "with_app": true,
        });
        let reordered = serde_json::to_vec(&reordered).expect("json");
        assert_eq!(quick_delivery_id(&reordered), None);
        assert_eq!(entry_delivery_id(&reordered), Some(id));
        let mut bad = json.clone();
        bad[ENTRY_ID_PREFIX.len() + 3] = b'!';
        assert_eq!(quick_delivery_id(&bad), None);
        assert_eq!(entry_delivery_id(&bad), None);
        assert_eq!(entry_delivery_id(b"junk"), None);
        assert_eq!(entry_delivery_id(&json[..ENTRY_ID_PREFIX.len() + 10]), None);

        // `with_app`, read from the end.
        assert_eq!(quick_with_app(&json), Some(true));
        assert!(entry_with_app(&json));
        let idle = Entry {
            with_app: false,
            ..entry.clone()
        };
        let idle = serde_json::to_vec(&idle).expect("json");
        assert_eq!(quick_with_app(&idle), Some(false));
        assert!(!entry_with_app(&idle));
        let head_json = serde_json::to_string(&head(7)).expect("json");
        let moved =
            format!(r#"{{"with_app":true,"head":{head_json},"attempts":2,"next_at_ms":3}}"#);
        assert_eq!(quick_with_app(moved.as_bytes()), None);
        assert!(entry_with_app(moved.as_bytes()));
        assert!(!entry_with_app(b"junk"));
    }

    /// What the app had when the agent stopped is found by the open's walk
    /// and only that.
    #[tokio::test]
    async fn the_open_finds_the_webhooks_the_app_had() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with_app;
        {
            let history = store_in(dir.path());
            let outbox = Outbox::open(&history).expect("outbox");
            store_new(&outbox, 1..=3);
            outbox.flush().await.expect("flush");
            let (seq, mut entry) = outbox.first().expect("first").expect("an entry");
            entry.with_app = true;
            outbox.put(seq, &entry).expect("put");
            with_app = seq;
            outbox.flush().await.expect("flush");
            history.close().await.expect("close");
        }
        let history = store_in(dir.path());
        let outbox = Outbox::open(&history).expect("outbox");
        assert_eq!(*lock(&outbox.interrupted), vec![with_app]);
        assert_eq!(outbox.len(), 3);
    }

    #[tokio::test]
    async fn large_bodies_are_files_deleted_after_the_flush_and_strays_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let large: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let small = vec![7u8; INLINE_BODY_BYTES];
        let outbox_files = dir.path().join("outbox-bodies");
        {
            let history = store_in(dir.path());
            let outbox = Outbox::open(&history).expect("outbox");
            assert!(outbox.store(head(1), &large).expect("store"));
            assert!(outbox.store(head(2), &small).expect("store"));
            assert!(outbox.store(head(3), b"").expect("store"));
            // Staged: the large body is in its file, nothing is in the store
            // until the flush (which syncs the file first), and a repeat is
            // recognised already.
            assert_eq!(
                BodyFiles::open(outbox_files.clone()).expect("dir").count(),
                1
            );
            assert!(outbox.first().expect("first").is_none());
            assert_eq!(outbox.len(), 3);
            assert!(!outbox.store(head(1), &large).expect("repeat"));
            outbox.flush().await.expect("flush");
            assert!(!outbox.store(head(1), &large).expect("repeat"));
            assert_eq!(outbox.len(), 3);
            assert_eq!(
                outbox.file_bytes(),
                large.len() as u64,
                "the large body's file"
            );
            assert_eq!(
                BodyFiles::open(outbox_files.clone()).expect("dir").count(),
                1
            );
            let (seq, entry) = outbox.first().expect("first").expect("an entry");
            assert_eq!(entry.head.delivery_id, head(1).delivery_id);
            assert!(outbox.body(seq).expect("body") == large);
            outbox.remove(seq).expect("remove");
            // Until the removal is on disk, a crash could bring it back.
            assert_eq!(
                BodyFiles::open(outbox_files.clone()).expect("dir").count(),
                1
            );
            outbox.flush().await.expect("flush");
            assert_eq!(outbox.file_bytes(), 0);
            assert_eq!(
                BodyFiles::open(outbox_files.clone()).expect("dir").count(),
                0
            );
            let (seq, _) = outbox.first().expect("first").expect("an entry");
            assert_eq!(outbox.body(seq).expect("body"), small);
            outbox.remove(seq).expect("remove");
            let (seq, _) = outbox.first().expect("first").expect("an entry");
            assert!(outbox.body(seq).expect("body").is_empty());
            outbox.remove(seq).expect("remove");
            outbox.flush().await.expect("flush");
        }
        // A file whose entry a crash kept off the disk, and a file of the
        // user's own.
        std::fs::write(outbox_files.join(format!("{:016x}.body", 999)), b"x").expect("stray");
        std::fs::write(outbox_files.join("mine.txt"), b"x").expect("other");
        let history = store_in(dir.path());
        let outbox = Outbox::open(&history).expect("outbox");
        assert!(outbox.is_empty());
        assert_eq!(
            BodyFiles::open(outbox_files.clone()).expect("dir").count(),
            1
        );
        assert!(outbox_files.join("mine.txt").exists());
    }

    #[tokio::test]
    async fn the_waiting_count_follows_writes_updates_removals_and_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let history = store_in(dir.path());
            let outbox = Outbox::open(&history).expect("outbox");
            store_new(&outbox, 1..=4);
            assert_eq!(outbox.len(), 4, "staged");
            outbox.flush().await.expect("flush");
            assert_eq!(outbox.len(), 4, "written");
            // An update (the next attempt's time, "with the app") is no new entry.
            let (seq, mut entry) = outbox.first().expect("first").expect("an entry");
            entry.attempts += 1;
            outbox.put(seq, &entry).expect("put");
            assert_eq!(outbox.len(), 4);
            outbox.remove(seq).expect("remove");
            outbox.remove(seq).expect("removed twice");
            assert_eq!(outbox.len(), 3);
            // An entry that cannot be read (a key sorting first) is dropped by
            // `first`, and counted out.
            outbox
                .items
                .insert([0u8; 1], b"junk".as_slice())
                .expect("insert");
            outbox
                .stored
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(outbox.len(), 4);
            let _ = outbox.first().expect("first");
            assert_eq!(outbox.len(), 3);
            assert_eq!(outbox.len(), outbox.items.len());
            outbox.flush().await.expect("flush");
            history.close().await.expect("close");
        }
        let history = store_in(dir.path());
        let outbox = Outbox::open(&history).expect("outbox");
        assert_eq!(outbox.len(), 3, "counted again at open");
    }

    /// A write that fails (here: the directory cannot be synced) leaves its
    /// webhooks staged, so the flush an acknowledgement waits for fails
    /// too, and the next one writes them.
    #[tokio::test]
    async fn a_failed_write_keeps_its_webhooks_staged_for_the_next_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = store_in(dir.path());
        let outbox = Outbox::open(&history).expect("outbox");
        let outbox_files = dir.path().join("outbox-bodies");
        assert!(outbox.store(head(1), &[1; 10_000]).expect("store"));
        std::fs::remove_dir_all(&outbox_files).expect("remove");
        assert!(outbox.flush().await.is_err());
        assert!(outbox.first().expect("first").is_none(), "nothing written");
        assert_eq!(outbox.len(), 1, "still staged");
        assert!(!outbox.store(head(1), &[1; 10_000]).expect("repeat"));
        std::fs::create_dir_all(&outbox_files).expect("mkdir");
        outbox.flush().await.expect("flush");
        let (_, entry) = outbox.first().expect("first").expect("written");
        assert_eq!(entry.head.delivery_id, head(1).delivery_id);
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn retry_delays_grow_are_capped_and_jittered() {
        let policy = RetryPolicy {
            attempts: 10,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        for attempt in 1..30 {
            let step = Duration::from_secs(1)
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(Duration::from_secs(60));
            let d = policy.delay(attempt);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
    }
}
