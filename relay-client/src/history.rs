//! Exchange history: every delivery and replay the agent handles, persisted
//! beside the agent and broadcast to live inspector sessions.
//!
//! Layout (known only to this module). An exchange's record is its JSON,
//! then, for bodies of at most [`INLINE_BODY_MAX`] bytes, a newline and the
//! bodies themselves (per body: one byte for the part, 0 request or 1
//! response, its length as u32 BE, the bytes). Larger bodies are appended,
//! piece by piece as they stream past, to segment files in directory
//! `history-bodies` beside the store (see [`segments`]), so that recording
//! never holds a large body in memory; the record then names where its pieces
//! went (per body: one byte, 2 + the part, the list's length as u32 BE, then
//! 16 bytes per piece).
//!
//! The record itself is appended to the segments too, and the sled tree
//! `records` lists where: batches keyed by a u64 BE number, each value 32
//! bytes per record (its ULID, then its extent). Appended records gather in
//! memory; the flush that makes them durable writes them (one `pwrite` for
//! all of them) and syncs the segments, then writes one batch for all of its
//! records (a record stored for a caller that flushes itself is written and
//! listed at once), so recording a webhook costs no system call and no sled
//! write on the agent's thread: a sled insert per record (a leaf rewritten,
//! a log entry) was a quarter of the agent's CPU per webhook and most of its
//! RSS, and its own `pwrite` a tenth.
//! What is kept, and where, is in memory (the totals); a batch is rewritten
//! without the records deleted or evicted from it, and removed with its last.
//!
//! sled holds large bodies no more either: written into its leaves in pieces
//! they cost two thirds of the agent's CPU for 256 KiB uploads, and its RSS
//! tripled with larger pieces. Stores written before keep their records in
//! tree `exchanges` (16-byte ULID to record) and their bodies as one file per
//! body in `history-bodies` (named by the ULID in hex and the part,
//! `<ulid>.0`), or in tree `bodies` (ULID, part and chunk number to raw
//! bytes); all are still read and removed, and the two trees are what an
//! in-memory store uses. Records from before the inline bodies are JSON alone
//! and still read. Tree `settings` keeps what commands reading the store
//! without the agent must know of the agent's configuration: key
//! `redact_headers`, a JSON list of header names; and key `kept_index`, what
//! retention knows of every record and where it is, saved by a clean close
//! and taken out by the next open, so that opening reads one value instead of
//! every record.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use hookrelay_shared::{
    durable::GroupCommit,
    signature::{self, Verdict},
};
use relay_server::sled_walk::{walk, Direction};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use ulid::Ulid;

mod segments;

pub use segments::{Extent, Spilled};
use segments::{OpenSegment, Segments, EXTENT_BYTES};

/// Key of the store's format in tree `settings` (u64 BE).
const FORMAT_KEY: &[u8] = b"format";

/// The store format this version writes: 2, records in the segments listed
/// by tree `records` (1, or no key: records in tree `exchanges`). A store of
/// a later format is refused, not misread: an earlier version would not see
/// the records it cannot place, and would delete their segments.
const STORE_FORMAT: u64 = 2;

/// Key of the redacted header names in tree `settings`.
const REDACT_HEADERS_KEY: &[u8] = b"redact_headers";

/// Key of the retention index [`History::close`] saves in tree `settings`.
const KEPT_INDEX_KEY: &[u8] = b"kept_index";

/// Default retention by count: enough for weeks of integration work.
pub const DEFAULT_MAX_EXCHANGES: u64 = 10_000;

/// How long a forwarded exchange's record waits for others to share its fsync
/// ([`History::record_lingering`]). Short enough that the terminal line and
/// the inspector show it at once to a person.
pub const RECORD_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// Default retention by stored bytes (bodies and metadata): 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// Live-feed buffer per subscriber; a slower reader skips ahead (and is told).
const EVENT_BUFFER: usize = 1024;

/// Records a listing reads the place of at a time.
const LIST_CHUNK: usize = 256;

/// Most exchanges one list call returns.
pub const MAX_PAGE: usize = 500;

/// Bodies up to this size are kept inside the exchange's record instead of
/// as chunks of their own. Larger ones go to the segments: sled keeps in
/// memory about what it stores in large values (see
/// [`hookrelay_shared::body_files`]; at 64 KiB, 12,000 webhooks of 32 KiB
/// took the agent to 173 MiB), and it rewrites whole leaves of records as
/// they are inserted and removed, so small records cost it less: with 1 KiB
/// bodies in the segments instead of the records, six pairs of `http
/// --workloads a,c` put c's p99 at 0.69/0.67/0.66/0.65/0.72/0.69 ms against
/// 0.75/0.70/0.73/0.78/0.79/0.66 (README, Benchmarks).
pub const INLINE_BODY_MAX: usize = 256;

/// Identifies one recorded exchange (sortable by time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExchangeId(pub Ulid);

impl ExchangeId {
    /// A fresh id, strictly greater than every id made before it in this
    /// process (ULIDs made in the same millisecond are otherwise random, and
    /// the history lists in id order).
    pub fn new() -> Self {
        static GENERATOR: Mutex<Option<ulid::Generator>> = Mutex::new(None);
        let mut generator = lock(&GENERATOR);
        let generator = generator.get_or_insert_with(ulid::Generator::new);
        // Overflow needs 2^80 ids in one millisecond; fall back to a plain one.
        ExchangeId(generator.generate().unwrap_or_else(|_| Ulid::new()))
    }

    fn key(self) -> [u8; 16] {
        self.0 .0.to_be_bytes()
    }

    fn from_key(key: &[u8]) -> Option<Self> {
        let bytes: [u8; 16] = key.get(..16)?.try_into().ok()?;
        Some(ExchangeId(Ulid(u128::from_be_bytes(bytes))))
    }
}

impl Default for ExchangeId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ExchangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for ExchangeId {
    type Err = HistoryError;
    fn from_str(s: &str) -> Result<Self, HistoryError> {
        Ulid::from_string(s.trim())
            .map(ExchangeId)
            .map_err(|_| HistoryError::BadId(s.to_owned()))
    }
}

/// One header, value as raw bytes. In JSON the value is text (lossy when not
/// UTF-8) plus `value_base64` holding the exact bytes when they are not UTF-8.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "HeaderJson")]
pub struct Header {
    /// Lowercase name.
    pub name: String,
    /// Exact value bytes.
    pub value: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct HeaderJson {
    name: String,
    value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

/// Serialized in place, as [`HeaderJson`] reads it back: every record's
/// headers pass through here, and going through an owned `HeaderJson` cost
/// two allocations and copies per header.
impl Serialize for Header {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let utf8 = std::str::from_utf8(&self.value).ok();
        let mut s = serializer.serialize_struct("Header", if utf8.is_some() { 2 } else { 3 })?;
        s.serialize_field("name", &self.name)?;
        match utf8 {
            Some(value) => s.serialize_field("value", value)?,
            None => {
                s.serialize_field("value", &String::from_utf8_lossy(&self.value))?;
                s.serialize_field(
                    "value_base64",
                    &base64::engine::general_purpose::STANDARD.encode(&self.value),
                )?;
            }
        }
        s.end()
    }
}

impl From<HeaderJson> for Header {
    fn from(h: HeaderJson) -> Self {
        let value = h
            .value_base64
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_else(|| h.value.into_bytes());
        Header {
            name: h.name,
            value,
        }
    }
}

/// Converts wire headers into recorded ones.
pub fn headers_from(pairs: &[(String, Vec<u8>)]) -> Vec<Header> {
    pairs
        .iter()
        .map(|(n, v)| Header {
            name: n.to_ascii_lowercase(),
            value: v.clone(),
        })
        .collect()
}

/// [`headers_from`] for headers no longer needed otherwise: their strings
/// move into the record (lowercased in place) instead of being copied, two
/// allocations fewer per header.
pub fn headers_into(pairs: Vec<(String, Vec<u8>)>) -> Vec<Header> {
    pairs
        .into_iter()
        .map(|(mut name, value)| {
            name.make_ascii_lowercase();
            Header { name, value }
        })
        .collect()
}

/// `addr` as its `Display` writes it, without the formatting machinery for
/// IPv4 (about 1,900 instructions per recorded exchange through `to_string`,
/// callgrind; the agent records one for every webhook).
pub fn socket_addr_text(addr: std::net::SocketAddr) -> String {
    let std::net::SocketAddr::V4(v4) = addr else {
        return addr.to_string();
    };
    let mut text = String::with_capacity(21);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        text.push_str(digits.format(octet));
    }
    text.push(':');
    text.push_str(digits.format(v4.port()));
    text
}

/// How an exchange ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The app answered (any status).
    Ok,
    /// The app could not be reached.
    LocalAppUnreachable,
    /// The app did not answer in time.
    LocalAppTimeout,
    /// The connection broke or the app spoke broken HTTP.
    LocalAppError,
    /// The request could not be built (bad method or header after editing).
    BadRequest,
    /// The relay or sender gave up first.
    Cancelled,
}

impl Outcome {
    /// Whether this counts as a failed delivery (for "replay every failed").
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Ok)
    }
}

/// Request side of an exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Headers in arrival order.
    pub headers: Vec<Header>,
    /// Body length in bytes (the body itself is stored apart).
    pub body_len: u64,
}

/// Response side of an exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseRecord {
    /// HTTP status.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<Header>,
    /// Body length in bytes.
    pub body_len: u64,
}

/// Timings, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durations {
    /// From the relay's arrival stamp to the agent's (includes clock skew).
    pub relay_to_agent_ms: Option<u64>,
    /// From sending to the local app until its response head.
    pub local_app_ms: Option<u64>,
    /// From the agent's arrival stamp to the end of the response body.
    pub total_ms: u64,
}

/// A request and its response as recorded. The stable JSON form of `--json`
/// output and of the inspector API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    /// This exchange's id.
    pub id: ExchangeId,
    /// The relay's delivery id; `None` for replays.
    pub delivery_id: Option<String>,
    /// Tunnel the webhook arrived on.
    pub tunnel: String,
    /// When the relay received it (Unix ms).
    pub received_at_relay_ms: Option<u64>,
    /// When the agent received it, or when a replay started (Unix ms).
    pub received_at_ms: u64,
    /// The sender's address.
    pub remote_addr: Option<String>,
    /// HTTP method.
    pub method: String,
    /// The full public URL the sender used (for replays: the URL replayed to).
    pub url: String,
    /// Path and query below the tunnel root.
    pub path: String,
    /// Base URL of the app the request went to.
    pub target: String,
    /// Request headers and body length.
    pub request: RequestRecord,
    /// Response, when the app answered.
    pub response: Option<ResponseRecord>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed, in words.
    pub error: Option<String>,
    /// Timings.
    pub duration: Durations,
    /// Detected signature provider.
    pub provider: Option<signature::Provider>,
    /// Signature verdict, when a provider was detected.
    pub signature: Option<Verdict>,
    /// The exchange this one replays.
    pub replay_of: Option<ExchangeId>,
    /// The provider's own id for the event (GitHub delivery, Stripe `evt_…`,
    /// `webhook-id`…), taken from requests whose signature verified.
    #[serde(default)]
    pub event_id: Option<String>,
    /// When this is a provider's retry of an event the app already accepted:
    /// the exchange that delivered it. The app was not called again; the
    /// sender got that exchange's answer.
    #[serde(default)]
    pub duplicate_of: Option<ExchangeId>,
    /// For a webhook the relay queued (the sender got `202`): which attempt
    /// this was and what happens next.
    #[serde(default)]
    pub queued: Option<QueuedAttempt>,
}

/// One attempt at handing a queued webhook to the app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedAttempt {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// When the next attempt is due (Unix ms), when there will be one.
    pub next_attempt_at_ms: Option<u64>,
    /// This was the last attempt and it failed: the webhook is marked failed
    /// (replay it from the history).
    pub failed: bool,
    /// The agent stopped while the app had this webhook; it is not sent again
    /// (at most once), so replay it if the app did not get it.
    pub interrupted: bool,
}

impl Exchange {
    /// The response status, if any.
    pub fn status(&self) -> Option<u16> {
        self.response.as_ref().map(|r| r.status)
    }

    fn stored_bytes(&self, meta_len: usize) -> u64 {
        meta_len as u64 + self.request.body_len + self.response.as_ref().map_or(0, |r| r.body_len)
    }
}

/// Which body of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The request body.
    Request = 0,
    /// The response body.
    Response = 1,
}

/// What the live feed carries.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HistoryEvent {
    /// An exchange completed and was recorded.
    Exchange {
        /// The exchange, shared: every subscriber receives this one.
        exchange: Arc<Exchange>,
    },
    /// One exchange was deleted.
    Deleted {
        /// Its id.
        id: ExchangeId,
    },
    /// History was cleared.
    Cleared,
}

/// Retention limits, oldest removed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Most exchanges kept.
    pub max_exchanges: u64,
    /// Most bytes kept (bodies and metadata).
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_exchanges: DEFAULT_MAX_EXCHANGES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Filters for listing, all optional; every given one must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Method, case-insensitive.
    pub method: Option<String>,
    /// Substring of the path (ASCII case-insensitive).
    pub path: Option<String>,
    /// `404`, `4xx`, or `failed` (no response or a 5xx).
    pub status: Option<String>,
    /// Text in the request or response body (ASCII case-insensitive).
    pub q: Option<String>,
    /// `name` (present) or `name:value` (value contains).
    pub header: Option<String>,
    /// Received at or after (Unix ms).
    pub since: Option<u64>,
    /// Received before (Unix ms).
    pub until: Option<u64>,
    /// Tunnel name.
    pub tunnel: Option<String>,
}

impl Filter {
    /// Whether the filter needs the bodies.
    fn needs_bodies(&self) -> bool {
        self.q.as_deref().is_some_and(|q| !q.is_empty())
    }

    fn matches_meta(&self, e: &Exchange) -> bool {
        if let Some(m) = &self.method {
            if !e.method.eq_ignore_ascii_case(m) {
                return false;
            }
        }
        if let Some(p) = &self.path {
            if !contains_ci(e.path.as_bytes(), p.as_bytes()) {
                return false;
            }
        }
        if let Some(t) = &self.tunnel {
            if e.tunnel != *t {
                return false;
            }
        }
        if self.since.is_some_and(|s| e.received_at_ms < s)
            || self.until.is_some_and(|u| e.received_at_ms >= u)
        {
            return false;
        }
        if let Some(s) = &self.status {
            if !status_matches(s, e) {
                return false;
            }
        }
        if let Some(h) = &self.header {
            let (name, value) = match h.split_once(':') {
                Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim())),
                None => (h.trim().to_ascii_lowercase(), None),
            };
            let found = e
                .request
                .headers
                .iter()
                .chain(e.response.iter().flat_map(|r| &r.headers))
                .any(|hd| {
                    hd.name == name && value.is_none_or(|v| contains_ci(&hd.value, v.as_bytes()))
                });
            if !found {
                return false;
            }
        }
        true
    }
}

fn status_matches(spec: &str, e: &Exchange) -> bool {
    let spec = spec.trim().to_ascii_lowercase();
    let status = e.status();
    if spec == "failed" || spec == "error" {
        return e.outcome.is_failure() || status.is_some_and(|s| s >= 500);
    }
    if let Some(class) = spec.strip_suffix("xx").and_then(|c| c.parse::<u16>().ok()) {
        return status.is_some_and(|s| s / 100 == class);
    }
    spec.parse::<u16>().is_ok_and(|code| status == Some(code))
}

fn contains_ci(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    // Only where the first byte is, in either case, found a vector at a
    // time: comparing at every position was a fifth of a body search.
    memchr::memchr2_iter(
        first.to_ascii_lowercase(),
        first.to_ascii_uppercase(),
        haystack,
    )
    .any(|at| {
        haystack
            .get(at + 1..at + needle.len())
            .is_some_and(|tail| tail.eq_ignore_ascii_case(rest))
    })
}

/// One page of a listing, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Page {
    /// The exchanges.
    pub exchanges: Vec<Exchange>,
    /// Pass as `before` to get the next (older) page; `None` at the end.
    pub next_before: Option<ExchangeId>,
}

/// Ordered log of recorded exchanges. Cheap to clone; clones share one store.
#[derive(Clone)]
pub struct History {
    db: sled::Db,
    exchanges: sled::Tree,
    bodies: sled::Tree,
    /// `tunnel NUL provider NUL event id` to the exchange that delivered it.
    delivered: sled::Tree,
    events: broadcast::Sender<HistoryEvent>,
    retention: Retention,
    totals: Arc<Mutex<Totals>>,
    /// Shares fsyncs between concurrent recorders.
    commits: Arc<GroupCommit>,
    /// Where large bodies go; `None` for an in-memory store (tree `bodies`).
    segments: Option<Arc<Segments>>,
    /// Large bodies of stores from before the segments, one file each.
    files: Option<Arc<LegacyBodyFiles>>,
    /// Batches of where records are in the segments (see the module docs).
    records: sled::Tree,
    /// Records in the segments that no batch lists yet: the next flush
    /// lists them.
    unlisted: Arc<Mutex<Vec<(ExchangeId, Extent)>>>,
    /// Number of the next batch in tree `records`.
    next_batch: Arc<AtomicU64>,
    /// Held while writing tree `records` or a record into tree `exchanges`,
    /// so that two writers of one batch never undo each other.
    tree_writes: Arc<Mutex<()>>,
}

/// When [`History::store_as`] lists a record in tree `records`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Before it returns, ahead of the caller's own writes.
    Now,
    /// In the flush the caller waits for, with every other record of it.
    ByFlush,
}

/// A stored record's bytes.
enum RecordBytes {
    Tree(sled::IVec),
    Segment(Vec<u8>),
}

impl std::ops::Deref for RecordBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Tree(bytes) => bytes,
            Self::Segment(bytes) => bytes,
        }
    }
}

/// [`Place::Segment`]'s batch of a record no batch lists yet.
const UNLISTED: u64 = u64::MAX;

/// Bytes per record in a batch of tree `records`: id, extent.
const BATCH_ENTRY: usize = 16 + EXTENT_BYTES;

/// Most records one batch lists (64 KiB): sled rewrites a leaf with all of
/// its values, so they stay small.
const BATCH_ENTRIES: usize = 2048;

/// The records a batch of tree `records` lists; an entry that cannot be
/// read is skipped.
fn batch_entries(value: &[u8]) -> impl Iterator<Item = (ExchangeId, Extent)> + '_ {
    value.chunks_exact(BATCH_ENTRY).filter_map(|entry| {
        let id = ExchangeId::from_key(entry.get(..16)?)?;
        Some((id, Extent::decode(entry.get(16..)?)?))
    })
}

/// Key of batch `n` in tree `records`.
fn batch_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Large bodies as stores from before [`segments`] kept them: one file each,
/// in the segments' directory. Read and removed, never written.
struct LegacyBodyFiles {
    dir: PathBuf,
}

impl LegacyBodyFiles {
    fn path(&self, id: ExchangeId, part: Part) -> PathBuf {
        self.dir
            .join(format!("{}.{}", hex::encode(id.key()), part as u8))
    }

    fn read(&self, id: ExchangeId, part: Part) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(id, part)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    fn remove(&self, id: ExchangeId) -> std::io::Result<()> {
        for part in [Part::Request, Part::Response] {
            match std::fs::remove_file(self.path(id, part)) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the body files of the exchanges `gone` says so of; other
    /// files in the directory are left alone.
    fn remove_where(
        &self,
        mut gone: impl FnMut(ExchangeId) -> Result<bool, HistoryError>,
    ) -> Result<(), HistoryError> {
        for entry in std::fs::read_dir(&self.dir).map_err(file_error)? {
            let entry = entry.map_err(file_error)?;
            if let Some(id) = Self::owner(&entry.file_name()) {
                if gone(id)? {
                    std::fs::remove_file(entry.path()).map_err(file_error)?;
                }
            }
        }
        Ok(())
    }

    /// The exchange a file in the directory belongs to (`None`: not ours).
    fn owner(name: &std::ffi::OsStr) -> Option<ExchangeId> {
        let (hex_id, part) = name.to_str()?.split_once('.')?;
        if part != "0" && part != "1" {
            return None;
        }
        let key = hex::decode(hex_id).ok()?;
        ExchangeId::from_key(&key)
    }
}

fn file_error(err: std::io::Error) -> HistoryError {
    HistoryError::Storage(format!("body file: {err}"))
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Running totals, and each kept exchange's size in age order, for retention.
#[derive(Debug, Default)]
struct Totals {
    bytes: u64,
    sizes: VecDeque<Kept>,
    /// Records each batch of tree `records` lists that are still kept.
    live: HashMap<u64, u32>,
}

/// Bytes per exchange in the retention index: id, size, flags, first
/// segment, place (kind, extent, batch).
const KEPT_INDEX_ENTRY: usize = 16 + 8 + 1 + 4 + 1 + EXTENT_BYTES + 8;

/// Bytes per exchange in the retention index of version 2 (records in
/// tree `exchanges` only).
const KEPT_INDEX_ENTRY_V2: usize = 16 + 8 + 1 + 4;

/// Bytes per exchange in the retention index of version 1 (no segments).
const KEPT_INDEX_ENTRY_V1: usize = 16 + 8 + 1;

/// [`Kept::first_seg`] `None` in the retention index.
const NO_SEGMENT: u32 = u32::MAX;

impl Totals {
    /// Adds the records `iter` yields from tree `exchanges` (a full scan,
    /// or what is newer than a saved index). A record that cannot be decoded
    /// still counts, at its stored size, and may have anything to remove.
    fn scan(
        &mut self,
        iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<(), HistoryError> {
        for item in iter {
            let (key, value) = item.map_err(storage)?;
            let Some(id) = ExchangeId::from_key(&key) else {
                continue;
            };
            let kept = match Record::decode(&value) {
                Ok(record) => record.kept(),
                Err(_) => Kept {
                    id,
                    size: value.len() as u64,
                    delivered: true,
                    chunked: true,
                    first_seg: None,
                    at: Place::Tree,
                },
            };
            self.sizes.push_back(kept);
        }
        Ok(())
    }

    /// Adds the records the batches `iter` yields list, read from the
    /// segments. One that cannot be read or decoded (zeroed by a deletion
    /// that a crash kept from its batch, cut short) is left out: its batch
    /// loses it when next settled.
    fn scan_batches(
        &mut self,
        iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        segments: &Segments,
    ) -> Result<(), HistoryError> {
        let mut open = None;
        for item in iter {
            let (key, value) = item.map_err(storage)?;
            let Some(batch) = <[u8; 8]>::try_from(key.as_ref())
                .ok()
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            for (id, extent) in batch_entries(&value) {
                let Ok(bytes) = segments.read_in(&[extent], &mut open) else {
                    continue;
                };
                let Ok(record) = Record::decode(&bytes) else {
                    continue;
                };
                if record.exchange.id != id {
                    continue;
                }
                let mut kept = record.kept();
                kept.place_in(extent, batch);
                self.sizes.push_back(kept);
            }
        }
        Ok(())
    }

    /// Orders what open gathered by id, keeps the newest copy of a record
    /// stored twice, and counts bytes and each batch's records.
    fn settle(&mut self) {
        let mut sizes = Vec::from(std::mem::take(&mut self.sizes));
        sizes.sort_by(|a, b| a.id.cmp(&b.id).then(b.at.order().cmp(&a.at.order())));
        sizes.dedup_by_key(|k| k.id);
        self.bytes = sizes.iter().map(|k| k.size).sum();
        self.live.clear();
        for kept in &sizes {
            if let Some(batch) = kept.at.batch() {
                *self.live.entry(batch).or_default() += 1;
            }
        }
        self.sizes = sizes.into();
    }

    /// Where `id` is in [`Totals::sizes`].
    fn position(&self, id: ExchangeId) -> Option<usize> {
        let pos = self.sizes.partition_point(|k| k.id < id);
        self.sizes.get(pos).filter(|k| k.id == id).map(|_| pos)
    }

    fn find(&self, id: ExchangeId) -> Option<&Kept> {
        self.position(id).and_then(|pos| self.sizes.get(pos))
    }

    /// Takes a record no longer kept out of its batch's count.
    fn forget(&mut self, kept: &Kept) {
        if let Some(batch) = kept.at.batch() {
            if let Some(n) = self.live.get_mut(&batch) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.live.remove(&batch);
                }
            }
        }
    }

    /// The retention index saved on close: a version byte (3), then per
    /// kept exchange, oldest first, its id (16 bytes), stored size (u64 BE),
    /// flags (1 delivered, 2 chunked), first segment (u32 BE, `u32::MAX`
    /// for none), and where its record is: a byte (0 tree `exchanges`, 1
    /// the segments), its extent and its batch (u64 BE). Version 2 had no
    /// place (every record in the tree), version 1 no segment either.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.sizes.len() * KEPT_INDEX_ENTRY);
        out.push(3);
        for kept in &self.sizes {
            out.extend_from_slice(&kept.id.key());
            out.extend_from_slice(&kept.size.to_be_bytes());
            out.push(u8::from(kept.delivered) | (u8::from(kept.chunked) << 1));
            out.extend_from_slice(&kept.first_seg.unwrap_or(NO_SEGMENT).to_be_bytes());
            match kept.at {
                Place::Tree => out.extend_from_slice(&[0; 1 + EXTENT_BYTES + 8]),
                Place::Segment { extent, batch } => {
                    out.push(1);
                    extent.encode_into(&mut out);
                    out.extend_from_slice(&batch.to_be_bytes());
                }
            }
        }
        out
    }

    /// The totals an index holds and the newest id in it; `None` for an
    /// index this version cannot read (then the records are scanned).
    fn decode(bytes: &[u8]) -> Option<(Totals, Option<ExchangeId>)> {
        let (&version, entries) = bytes.split_first()?;
        let entry_len = match version {
            1 => KEPT_INDEX_ENTRY_V1,
            2 => KEPT_INDEX_ENTRY_V2,
            3 => KEPT_INDEX_ENTRY,
            _ => return None,
        };
        if entries.len() % entry_len != 0 {
            return None;
        }
        let mut totals = Totals::default();
        let mut newest: Option<ExchangeId> = None;
        for entry in entries.chunks_exact(entry_len) {
            let id = ExchangeId::from_key(entry.get(..16)?)?;
            let size = u64::from_be_bytes(entry.get(16..24)?.try_into().ok()?);
            let flags = *entry.get(24)?;
            let first_seg = match entry.get(25..29) {
                Some(seg) => Some(u32::from_be_bytes(seg.try_into().ok()?)),
                None => None,
            }
            .filter(|seg| *seg != NO_SEGMENT);
            let at = match entry.get(29..) {
                Some([1, place @ ..]) => Place::Segment {
                    extent: Extent::decode(place.get(..EXTENT_BYTES)?)?,
                    batch: u64::from_be_bytes(place.get(EXTENT_BYTES..)?.try_into().ok()?),
                },
                Some([0, ..]) | Some([]) | None => Place::Tree,
                Some(_) => return None,
            };
            totals.bytes = totals.bytes.saturating_add(size);
            totals.sizes.push_back(Kept {
                id,
                size,
                delivered: flags & 1 != 0,
                chunked: flags & 2 != 0,
                first_seg,
                at,
            });
            newest = newest.max(Some(id));
        }
        Some((totals, newest))
    }
}

/// What retention must know of one kept exchange to drop it without reading
/// it back.
#[derive(Clone, Copy, Debug)]
struct Kept {
    id: ExchangeId,
    size: u64,
    /// It may be indexed in `delivered`.
    delivered: bool,
    /// It may have bodies in tree `bodies` or files of their own (stores
    /// from before the segments).
    chunked: bool,
    /// The oldest segment its record or bodies are in, held for it in
    /// [`Segments`].
    first_seg: Option<u32>,
    /// Where its record is.
    at: Place,
}

impl Kept {
    /// Its record is at `extent` in the segments, listed by `batch`.
    fn place_in(&mut self, extent: Extent, batch: u64) {
        self.first_seg = Some(self.first_seg.map_or(extent.seg(), |s| s.min(extent.seg())));
        self.at = Place::Segment { extent, batch };
    }
}

/// Where a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// In tree `exchanges`: stores from before the records went to the
    /// segments, and in-memory stores.
    Tree,
    /// In the segments at `extent`, listed in tree `records` by `batch`
    /// ([`UNLISTED`] until a flush lists it).
    Segment { extent: Extent, batch: u64 },
}

impl Place {
    /// The batch listing it, if one does.
    fn batch(self) -> Option<u64> {
        match self {
            Place::Segment { batch, .. } if batch != UNLISTED => Some(batch),
            _ => None,
        }
    }

    /// Of two copies of one record, the later has the larger.
    fn order(self) -> u64 {
        match self {
            Place::Tree => 0,
            Place::Segment { batch, .. } => batch.saturating_add(1).max(1),
        }
    }
}

/// One stored record, decoded.
struct Record<'a> {
    exchange: Exchange,
    /// Length of the JSON part.
    json_len: usize,
    /// Inline bodies (see the module docs); empty when there are none.
    inline: &'a [u8],
}

impl<'a> Record<'a> {
    fn decode(value: &'a [u8]) -> Result<Record<'a>, serde_json::Error> {
        let mut stream = serde_json::Deserializer::from_slice(value).into_iter::<Exchange>();
        let exchange = stream
            .next()
            .unwrap_or_else(|| Err(serde::de::Error::custom("empty record")))?;
        let json_len = stream.byte_offset();
        let inline = value.get(json_len + 1..).unwrap_or_default();
        Ok(Record {
            exchange,
            json_len,
            inline,
        })
    }

    /// The section tagged `tag` after the JSON.
    fn section(&self, tag: u8) -> Option<&'a [u8]> {
        let mut rest = self.inline;
        while let [t, l0, l1, l2, l3, tail @ ..] = rest {
            let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
            let bytes = tail.get(..len)?;
            if *t == tag {
                return Some(bytes);
            }
            rest = &tail[len..];
        }
        None
    }

    /// The inline body of `part`, if it was stored inline.
    fn body(&self, part: Part) -> Option<&'a [u8]> {
        self.section(part as u8)
    }

    /// Where the body of `part` is in the segments, if it went there.
    fn extents(&self, part: Part) -> Option<Vec<Extent>> {
        self.section(EXTENTS_TAG + part as u8)
            .and_then(Extent::decode_all)
    }

    fn kept(&self) -> Kept {
        let extents: Vec<Extent> = [Part::Request, Part::Response]
            .into_iter()
            .filter_map(|part| self.extents(part))
            .flatten()
            .collect();
        Kept::of(
            &self.exchange,
            self.json_len,
            |part| self.body(part).is_some() || self.extents(part).is_some(),
            extents.iter().map(|e| e.seg()).min(),
        )
    }
}

/// Tag of a body's extents in a record: this plus the [`Part`].
const EXTENTS_TAG: u8 = 2;

impl Kept {
    /// What retention needs of `e`, whose JSON is `json_len` bytes, whose
    /// bodies for which `placed` holds are inside its record or named by it,
    /// and whose oldest segment is `first_seg`.
    fn of(
        e: &Exchange,
        json_len: usize,
        placed: impl Fn(Part) -> bool,
        first_seg: Option<u32>,
    ) -> Kept {
        let chunked = (e.request.body_len > 0 && !placed(Part::Request))
            || (e.response.as_ref().is_some_and(|r| r.body_len > 0) && !placed(Part::Response));
        Kept {
            id: e.id,
            size: e.stored_bytes(json_len),
            delivered: delivered_key(e).is_some(),
            chunked,
            first_seg,
            at: Place::Tree,
        }
    }
}

/// The size of a history, for the agent's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// Exchanges kept.
    pub exchanges: usize,
    /// Bytes on disk: the sled store and the body segments.
    pub disk_bytes: u64,
}

/// A whole body taken by [`History::keep_body`].
#[derive(Debug)]
pub enum KeptBody<'a> {
    /// To go inside the record.
    Inline(&'a [u8]),
    /// Appended; holds its segment until dropped.
    Spilled(Spilled),
}

impl KeptBody<'_> {
    pub fn as_body(&self) -> Body<'_> {
        match self {
            KeptBody::Inline(bytes) => Body::Inline(bytes),
            KeptBody::Spilled(spilled) => Body::Spilled(spilled.extents()),
        }
    }
}

/// A body as [`History::store`] takes it.
#[derive(Clone, Copy, Debug)]
pub enum Body<'a> {
    /// Small enough to go inside the record.
    Inline(&'a [u8]),
    /// Appended already with [`History::append_body`]; these are its
    /// pieces (none for an in-memory store, which finds them by id).
    Spilled(&'a [Extent]),
    /// Appended in part (`written`, `pieces` of them, as for
    /// [`Body::Spilled`]), with the `rest` still to write: the record takes
    /// it along in its own write.
    Tail {
        written: &'a [Extent],
        pieces: u32,
        rest: &'a [u8],
    },
}

/// `bodies` with each one not inline named by `extents` (the same order):
/// what [`encode_record`] takes once every piece has its place.
fn placed<'a>(bodies: &[(Part, Body<'a>)], extents: &'a [Vec<Extent>]) -> Vec<(Part, Body<'a>)> {
    bodies
        .iter()
        .zip(extents)
        .map(|((part, body), extents)| match body {
            Body::Inline(bytes) => (*part, Body::Inline(bytes)),
            _ => (*part, Body::Spilled(extents)),
        })
        .collect()
}

/// The record's JSON, byte for byte what `serde_json::to_writer(exchange)`
/// writes (a test compares them), without serde_json's escaping scan of every
/// byte of every string: a record has about 80 (field names, header names and
/// values). A string is copied as it is when it holds nothing to escape,
/// checked in one pass the compiler vectorises; the few fields that are not
/// plain strings or numbers go through serde_json. Encoding a record took
/// 17,500 instructions through serde_json, 8,400 this way (callgrind,
/// workload c): about 6 % of the agent's instructions per webhook.
mod record_json {
    use super::{Durations, Exchange, Header, RequestRecord, ResponseRecord};

    pub(super) fn write(out: &mut Vec<u8>, e: &Exchange) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"id\":");
        serde_json::to_writer(&mut *out, &e.id)?;
        out.extend_from_slice(b",\"delivery_id\":");
        opt_str(out, e.delivery_id.as_deref());
        out.extend_from_slice(b",\"tunnel\":");
        string(out, &e.tunnel);
        out.extend_from_slice(b",\"received_at_relay_ms\":");
        opt_number(out, e.received_at_relay_ms);
        out.extend_from_slice(b",\"received_at_ms\":");
        number(out, e.received_at_ms);
        out.extend_from_slice(b",\"remote_addr\":");
        opt_str(out, e.remote_addr.as_deref());
        out.extend_from_slice(b",\"method\":");
        string(out, &e.method);
        out.extend_from_slice(b",\"url\":");
        string(out, &e.url);
        out.extend_from_slice(b",\"path\":");
        string(out, &e.path);
        out.extend_from_slice(b",\"target\":");
        string(out, &e.target);
        out.extend_from_slice(b",\"request\":");
        request(out, &e.request)?;
        out.extend_from_slice(b",\"response\":");
        match &e.response {
            Some(r) => response(out, r)?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"outcome\":");
        serde_json::to_writer(&mut *out, &e.outcome)?;
        out.extend_from_slice(b",\"error\":");
        opt_str(out, e.error.as_deref());
        out.extend_from_slice(b",\"duration\":");
        durations(out, &e.duration);
        out.extend_from_slice(b",\"provider\":");
        serde_json::to_writer(&mut *out, &e.provider)?;
        out.extend_from_slice(b",\"signature\":");
        serde_json::to_writer(&mut *out, &e.signature)?;
        out.extend_from_slice(b",\"replay_of\":");
        serde_json::to_writer(&mut *out, &e.replay_of)?;
        out.extend_from_slice(b",\"event_id\":");
        opt_str(out, e.event_id.as_deref());
        out.extend_from_slice(b",\"duplicate_of\":");
        serde_json::to_writer(&mut *out, &e.duplicate_of)?;
        out.extend_from_slice(b",\"queued\":");
        serde_json::to_writer(&mut *out, &e.queued)?;
        out.push(b'}');
        Ok(())
    }

    fn request(out: &mut Vec<u8>, r: &RequestRecord) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"headers\":");
        headers(out, &r.headers)?;
        out.extend_from_slice(b",\"body_len\":");
        number(out, r.body_len);
        out.push(b'}');
        Ok(())
    }

    fn response(out: &mut Vec<u8>, r: &ResponseRecord) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"status\":");
        number(out, r.status);
        out.extend_from_slice(b",\"headers\":");
        headers(out, &r.headers)?;
        out.extend_from_slice(b",\"body_len\":");
        number(out, r.body_len);
        out.push(b'}');
        Ok(())
    }

    fn durations(out: &mut Vec<u8>, d: &Durations) {
        out.extend_from_slice(b"{\"relay_to_agent_ms\":");
        opt_number(out, d.relay_to_agent_ms);
        out.extend_from_slice(b",\"local_app_ms\":");
        opt_number(out, d.local_app_ms);
        out.extend_from_slice(b",\"total_ms\":");
        number(out, d.total_ms);
        out.push(b'}');
    }

    /// As [`Header`]'s `Serialize`, which writes the rare value that is not
    /// UTF-8 (its text and its exact bytes in base64).
    fn headers(out: &mut Vec<u8>, headers: &[Header]) -> serde_json::Result<()> {
        out.push(b'[');
        for (i, h) in headers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match std::str::from_utf8(&h.value) {
                Ok(value) => {
                    out.extend_from_slice(b"{\"name\":");
                    string(out, &h.name);
                    out.extend_from_slice(b",\"value\":");
                    string(out, value);
                    out.push(b'}');
                }
                Err(_) => serde_json::to_writer(&mut *out, h)?,
            }
        }
        out.push(b']');
        Ok(())
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        let bytes = s.as_bytes();
        // Branch-free over the whole string, so that it vectorises; JSON
        // escapes only control characters, `"` and `\`.
        let escapes = bytes.iter().fold(0u8, |acc, &b| {
            acc | u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\')
        });
        if escapes == 0 {
            out.reserve(bytes.len() + 2);
            out.push(b'"');
            out.extend_from_slice(bytes);
            out.push(b'"');
        } else {
            // Writing into a Vec cannot fail, nor can serialising a str.
            let _ = serde_json::to_writer(&mut *out, s);
        }
    }

    fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => string(out, s),
            None => out.extend_from_slice(b"null"),
        }
    }

    fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    fn opt_number(out: &mut Vec<u8>, n: Option<u64>) {
        match n {
            Some(n) => number(out, n),
            None => out.extend_from_slice(b"null"),
        }
    }
}

/// Roughly how long `e`'s JSON is: its strings and headers plus room for
/// the field names and numbers (escapes make it longer, rarely by much).
fn json_estimate(e: &Exchange) -> usize {
    let headers =
        |hs: &[Header]| -> usize { hs.iter().map(|h| h.name.len() + h.value.len() + 24).sum() };
    let text = [&e.tunnel, &e.method, &e.url, &e.path, &e.target]
        .iter()
        .map(|s| s.len())
        .sum::<usize>()
        + e.delivery_id.as_ref().map_or(0, String::len)
        + e.remote_addr.as_ref().map_or(0, String::len)
        + e.error.as_ref().map_or(0, String::len)
        + e.event_id.as_ref().map_or(0, String::len)
        + match &e.signature {
            Some(Verdict::Invalid { reason, .. }) => reason.len(),
            _ => 0,
        };
    text + headers(&e.request.headers)
        + e.response.as_ref().map_or(0, |r| headers(&r.headers))
        + 768
}

/// Encodes a record: the exchange's JSON, then its inline bodies and where
/// its other bodies are in the segments. A [`Body::Tail`] counts as the
/// pieces written so far: the caller places its rest first (see
/// [`History::store_as`]).
fn encode_record(
    exchange: &Exchange,
    bodies: &[(Part, Body<'_>)],
) -> Result<(Vec<u8>, Kept), HistoryError> {
    // Each section: tag, length (u32 BE), bytes.
    let sections: Vec<(u8, usize, &Body<'_>)> = bodies
        .iter()
        .filter_map(|(part, body)| {
            let (tag, len) = match body {
                Body::Inline(bytes) => (*part as u8, bytes.len()),
                Body::Spilled(extents)
                | Body::Tail {
                    written: extents, ..
                } => (EXTENTS_TAG + *part as u8, extents.len() * EXTENT_BYTES),
            };
            (len > 0 && u32::try_from(len).is_ok()).then_some((tag, len, body))
        })
        .collect();
    // Sized once for the whole record: grown from empty, the JSON and the
    // bodies behind it were reallocated and copied a dozen times.
    let mut value = Vec::with_capacity(
        json_estimate(exchange) + 1 + sections.iter().map(|(_, len, _)| 5 + len).sum::<usize>(),
    );
    record_json::write(&mut value, exchange).map_err(|e| HistoryError::Storage(e.to_string()))?;
    let json_len = value.len();
    if !sections.is_empty() {
        value.push(b'\n');
        for (tag, len, body) in &sections {
            value.push(*tag);
            let len = u32::try_from(*len).unwrap_or(u32::MAX);
            value.extend_from_slice(&len.to_be_bytes());
            match body {
                Body::Inline(bytes) => value.extend_from_slice(bytes),
                Body::Spilled(extents)
                | Body::Tail {
                    written: extents, ..
                } => {
                    for extent in *extents {
                        extent.encode_into(&mut value);
                    }
                }
            }
        }
    }
    let placed = |p: Part| {
        sections
            .iter()
            .any(|(tag, _, _)| *tag == p as u8 || *tag == EXTENTS_TAG + p as u8)
    };
    let first_seg = bodies
        .iter()
        .filter_map(|(_, body)| match body {
            Body::Spilled(extents)
            | Body::Tail {
                written: extents, ..
            } => extents.iter().map(|e| e.seg()).min(),
            Body::Inline(_) => None,
        })
        .min();
    let kept = Kept::of(exchange, json_len, placed, first_seg);
    Ok((value, kept))
}

impl History {
    /// Opens or creates the store under `dir`.
    ///
    /// # Errors
    /// [`HistoryError::Locked`] when another process holds the store (a
    /// running agent), or a storage error.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, HistoryError> {
        // sled releases its file lock from a background thread a moment
        // after the last handle drops, so a store closed just now (an agent
        // restarted in the same process) can still look held: retry briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match Self::open_once(dir, retention, segments::SEGMENT_BYTES) {
                Err(HistoryError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                other => return other,
            }
        }
    }

    fn open_once(
        dir: &Path,
        retention: Retention,
        segment_bytes: u64,
    ) -> Result<Self, HistoryError> {
        let db = sled::Config::new()
            .path(dir.join("history"))
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|e| match e {
                // sled reports a held lock as an `Other` I/O error whose text
                // is all that identifies it (sled 0.34).
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.raw_os_error() == Some(11)
                        || io.to_string().contains("could not acquire lock") =>
                {
                    HistoryError::Locked(dir.display().to_string())
                }
                other => HistoryError::Storage(other.to_string()),
            })?;
        let dir = dir.join("history-bodies");
        let segments = Segments::open(&dir, segment_bytes).map_err(file_error)?;
        let files = LegacyBodyFiles { dir };
        Self::from_db(db, retention, Some((Arc::new(segments), Arc::new(files))))
    }

    /// The directory the store lives in; `None` for an in-memory store.
    pub(crate) fn dir(&self) -> Option<&Path> {
        self.files.as_ref().and_then(|files| files.dir.parent())
    }

    /// Another tree in the same store (one lock, one flush for both).
    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree, HistoryError> {
        self.db.open_tree(name).map_err(storage)
    }

    /// A fresh id, larger than any the store handed out before.
    pub(crate) fn generate_id(&self) -> Result<u64, HistoryError> {
        self.db.generate_id().map_err(storage)
    }

    /// Whether a store was ever created under `dir`.
    pub fn exists(dir: &Path) -> bool {
        dir.join("history").join("conf").exists() || dir.join("history").join("db").exists()
    }

    /// An in-memory store that vanishes on drop.
    ///
    /// # Errors
    /// A storage error.
    pub fn temporary(retention: Retention) -> Result<Self, HistoryError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|e| HistoryError::Storage(e.to_string()))?;
        Self::from_db(db, retention, None)
    }

    fn from_db(
        db: sled::Db,
        retention: Retention,
        on_disk: Option<(Arc<Segments>, Arc<LegacyBodyFiles>)>,
    ) -> Result<Self, HistoryError> {
        let (segments, files) = on_disk.unzip();
        let exchanges = db.open_tree("exchanges").map_err(storage)?;
        let bodies = db.open_tree("bodies").map_err(storage)?;
        let delivered = db.open_tree("delivered").map_err(storage)?;
        let records = db.open_tree("records").map_err(storage)?;
        let settings = db.open_tree("settings").map_err(storage)?;
        let found = match settings.get(FORMAT_KEY).map_err(storage)? {
            None => None,
            Some(v) => Some(
                <[u8; 8]>::try_from(v.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        HistoryError::Storage("the store's format marker is unreadable".into())
                    })?,
            ),
        };
        match found {
            Some(found) if found > STORE_FORMAT => {
                return Err(HistoryError::TooNew {
                    found,
                    known: STORE_FORMAT,
                })
            }
            Some(STORE_FORMAT) => {}
            _ => {
                settings
                    .insert(FORMAT_KEY, &STORE_FORMAT.to_be_bytes())
                    .map_err(storage)?;
            }
        }
        // Taken out as it is read: from now on only the next clean close
        // writes a current one, so a crash leaves none and the next open
        // scans instead of trusting a stale index.
        let index = settings.remove(KEPT_INDEX_KEY).map_err(storage)?;
        // Without an index every record is scanned; with one, those written
        // after it (none normally, as it is taken out on open).
        let (mut totals, newest) = index
            .as_deref()
            .and_then(Totals::decode)
            .unwrap_or_default();
        let after = newest.map(|id| sled::IVec::from(&id.key()[..]));
        totals.scan(walk(&exchanges, after, Direction::OldestFirst))?;
        if let Some(segments) = &segments {
            // The batches written after the index (none normally).
            let listed_to = totals.sizes.iter().filter_map(|k| k.at.batch()).max();
            let from = listed_to.map_or(0, |n| n.saturating_add(1));
            totals.scan_batches(records.range(batch_key(from)..), segments)?;
        }
        totals.settle();
        let next_batch = match records.last().map_err(storage)? {
            Some((key, _)) => <[u8; 8]>::try_from(key.as_ref())
                .map_or(1, |n| u64::from_be_bytes(n).saturating_add(1)),
            None => 1,
        };
        // Bodies of exchanges that never finished (a crash mid-delivery) would
        // otherwise leak: drop those without a record.
        if let Some(segments) = &segments {
            for seg in totals.sizes.iter().filter_map(|k| k.first_seg) {
                segments.hold(seg);
            }
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let history = History {
            db,
            exchanges,
            bodies,
            delivered,
            events,
            retention,
            totals: Arc::new(Mutex::new(totals)),
            commits: Arc::default(),
            segments,
            files,
            records,
            unlisted: Arc::default(),
            next_batch: Arc::new(AtomicU64::new(next_batch)),
            tree_writes: Arc::default(),
        };
        history.drop_orphan_bodies()?;
        history.enforce_retention()?;
        // Segments older than any record's (their records dropped, or
        // bodies of deliveries a crash cut short) go once that is on disk.
        if let Some(segments) = &history.segments {
            let needed_from = segments.needed_from();
            if segments.any_before(needed_from) {
                history.db.flush().map_err(storage)?;
                segments.collect(needed_from).map_err(file_error)?;
            }
        }
        Ok(history)
    }

    fn drop_orphan_bodies(&self) -> Result<(), HistoryError> {
        let mut last: Option<[u8; 16]> = None;
        let mut orphan = false;
        for item in self.bodies.iter().keys() {
            let key = item.map_err(storage)?;
            let Some(prefix) = key.get(..16).and_then(|k| <[u8; 16]>::try_from(k).ok()) else {
                self.bodies.remove(&key).map_err(storage)?;
                continue;
            };
            if last != Some(prefix) {
                last = Some(prefix);
                orphan = !ExchangeId::from_key(&prefix)
                    .map(|id| self.is_kept(id))
                    .transpose()?
                    .unwrap_or(false);
            }
            if orphan {
                self.bodies.remove(&key).map_err(storage)?;
            }
        }
        if let Some(files) = &self.files {
            files.remove_where(|id| self.is_kept(id).map(|kept| !kept))?;
        }
        Ok(())
    }

    /// Live feed. Subscribe *before* listing so nothing falls in the gap.
    pub fn subscribe(&self) -> broadcast::Receiver<HistoryEvent> {
        self.events.subscribe()
    }

    /// Appends the next piece of a body being recorded; `body` collects
    /// where the pieces went, for [`Body::Spilled`].
    ///
    /// # Errors
    /// A storage error.
    pub fn append_body(
        &self,
        id: ExchangeId,
        part: Part,
        body: &mut Spilled,
        chunk: &[u8],
    ) -> Result<(), HistoryError> {
        let seq = body.pieces;
        body.pieces = seq.saturating_add(1);
        match &self.segments {
            Some(segments) => segments.append(body, chunk).map_err(file_error),
            None => self
                .bodies
                .insert(body_key(id, part, seq), chunk)
                .map(drop)
                .map_err(storage),
        }
    }

    /// A body appended with [`History::append_body`], before its record is
    /// stored.
    ///
    /// # Errors
    /// A storage error.
    pub fn spilled_body(
        &self,
        id: ExchangeId,
        part: Part,
        body: &Spilled,
    ) -> Result<Vec<u8>, HistoryError> {
        match &self.segments {
            Some(segments) => segments.read(body.extents()).map_err(file_error),
            None => self.tree_body(id, part),
        }
    }

    /// How much of a large body is gathered before each append. A segment
    /// takes large pieces; the sled tree (in-memory stores) small ones, as
    /// sled rewrites a whole leaf (up to 16 values) per insert and keeps a
    /// value over 128 KiB in memory as a blob.
    pub(crate) fn piece_bytes(&self) -> usize {
        if self.segments.is_some() {
            64 * 1024
        } else {
            8 * 1024
        }
    }

    /// Takes a whole body at once (replays): one small enough stays for the
    /// record, a larger one is appended now. Pass
    /// [`KeptBody::as_body`] to [`History::record`].
    ///
    /// # Errors
    /// A storage error.
    pub fn keep_body<'a>(
        &self,
        id: ExchangeId,
        part: Part,
        body: &'a [u8],
    ) -> Result<KeptBody<'a>, HistoryError> {
        if body.len() <= INLINE_BODY_MAX {
            return Ok(KeptBody::Inline(body));
        }
        let mut spilled = Spilled::default();
        for chunk in body.chunks(256 * 1024) {
            self.append_body(id, part, &mut spilled, chunk)?;
        }
        Ok(KeptBody::Spilled(spilled))
    }

    /// Records a finished exchange with its `bodies` (small ones inside the
    /// record, large ones appended already), applies retention, waits until
    /// it is on disk, then tells live subscribers: an exchange anyone has
    /// seen survives a kill -9.
    ///
    /// # Errors
    /// A storage error.
    pub async fn record(
        &self,
        exchange: impl Into<Arc<Exchange>>,
        bodies: &[(Part, Body<'_>)],
    ) -> Result<(), HistoryError> {
        let exchange = exchange.into();
        self.store_as(&exchange, bodies, Write::ByFlush)?;
        self.flush().await?;
        self.announce(exchange);
        Ok(())
    }

    /// The first half of [`History::record`]: writes the record without
    /// waiting for the disk. The caller flushes, then
    /// [announces](Self::announce) it, so that one fsync can cover this and
    /// the caller's own writes. Listed before it returns, so that a crash
    /// never keeps a write the caller makes after it (the outbox's removal
    /// of the webhook) without this record.
    ///
    /// # Errors
    /// A storage error.
    pub(crate) fn store(
        &self,
        exchange: &Exchange,
        bodies: &[(Part, Body<'_>)],
    ) -> Result<(), HistoryError> {
        self.store_as(exchange, bodies, Write::Now)
    }

    /// Writes a record: appended to the segments (gathered for the write of
    /// the flush or of the listing, no sled insert on the thread deliveries
    /// wait for) and listed by a batch of tree `records` `write` says when;
    /// in tree `exchanges` for an in-memory store.
    fn store_as(
        &self,
        exchange: &Exchange,
        bodies: &[(Part, Body<'_>)],
        write: Write,
    ) -> Result<(), HistoryError> {
        let id = exchange.id;
        // Holds the record's segment until `kept` holds it.
        let mut spilled = Spilled::default();
        let kept = match &self.segments {
            Some(segments) => {
                let tails: Vec<&[u8]> = bodies
                    .iter()
                    .filter_map(|(_, body)| match body {
                        Body::Tail { rest, .. } => Some(*rest),
                        _ => None,
                    })
                    .collect();
                let mut kept = None;
                let (_, at) = segments
                    .append_record(&mut spilled, &tails, |tail_extents| {
                        let mut tail_extents = tail_extents.iter();
                        let whole: Vec<Vec<Extent>> = bodies
                            .iter()
                            .map(|(_, body)| match body {
                                Body::Inline(_) => Vec::new(),
                                Body::Spilled(written) => written.to_vec(),
                                Body::Tail { written, .. } => {
                                    written.iter().chain(tail_extents.next()).copied().collect()
                                }
                            })
                            .collect();
                        let (value, k) = encode_record(exchange, &placed(bodies, &whole))
                            .map_err(|e| std::io::Error::other(e.to_string()))?;
                        kept = Some(k);
                        Ok(value)
                    })
                    .map_err(file_error)?;
                let Some(mut kept) = kept else {
                    return Err(HistoryError::Storage("a record was not encoded".into()));
                };
                kept.place_in(at, UNLISTED);
                kept
            }
            None => {
                // An in-memory store keeps a rest as the body's next piece.
                for (part, body) in bodies {
                    if let Body::Tail { pieces, rest, .. } = body {
                        self.bodies
                            .insert(body_key(id, *part, *pieces), *rest)
                            .map_err(storage)?;
                    }
                }
                // The pieces are found by id, so a tail needs no extent.
                let (value, kept) = encode_record(exchange, bodies)?;
                let _writes = lock(&self.tree_writes);
                self.exchanges.insert(id.key(), value).map_err(storage)?;
                kept
            }
        };
        if let Some(key) = delivered_key(exchange) {
            // First accepted delivery wins; a later one never replaces it.
            let _ = self
                .delivered
                .compare_and_swap(key, None as Option<&[u8]>, Some(&id.key()[..]))
                .map_err(storage)?;
        }
        let replaced = {
            let mut totals = lock(&self.totals);
            totals.bytes += kept.size;
            if let (Some(segments), Some(seg)) = (&self.segments, kept.first_seg) {
                segments.hold(seg);
            }
            // Ids are time-ordered; a replay recorded late still sorts by its start.
            let pos = totals.sizes.partition_point(|k| k.id < id);
            match totals.sizes.get_mut(pos) {
                // Stored again: it replaces the record, and what it held.
                Some(old) if old.id == id => {
                    let old = std::mem::replace(old, kept);
                    totals.bytes = totals.bytes.saturating_sub(old.size);
                    totals.forget(&old);
                    if let (Some(segments), Some(seg)) = (&self.segments, old.first_seg) {
                        segments.release(seg);
                    }
                    Some(old)
                }
                _ => {
                    totals.sizes.insert(pos, kept);
                    None
                }
            }
        };
        drop(spilled);
        if let Place::Segment { extent, .. } = kept.at {
            lock(&self.unlisted).push((id, extent));
        }
        if let Some(old) = replaced {
            self.drop_copy(id, old.at, kept.at)?;
        }
        if write == Write::Now {
            self.list_unlisted()?;
        }
        // Retention is applied by the flush that makes this record durable
        // (on the blocking pool, with every other record of that flush):
        // once the history is full, each record evicts the oldest, and that
        // removal (sled, and the body files' unlinks) held the agent's worker.
        Ok(())
    }

    /// Drops the copy of a record stored again that was at `old` (now at
    /// `new`).
    fn drop_copy(&self, id: ExchangeId, old: Place, new: Place) -> Result<(), HistoryError> {
        match old {
            Place::Tree if new != Place::Tree => {
                let _writes = lock(&self.tree_writes);
                self.exchanges.remove(id.key()).map_err(storage)?;
            }
            Place::Tree => {}
            Place::Segment { extent, batch } if batch == UNLISTED => {
                lock(&self.unlisted).retain(|entry| *entry != (id, extent));
            }
            Place::Segment { batch, .. } => {
                let _writes = lock(&self.tree_writes);
                self.settle(batch)?;
            }
        }
        Ok(())
    }

    /// Lists the records written to the segments since the last listing,
    /// in new batches of tree `records`.
    fn list_unlisted(&self) -> Result<(), HistoryError> {
        let _writes = lock(&self.tree_writes);
        let taken = std::mem::take(&mut *lock(&self.unlisted));
        // Every record taken is written before a batch names it (it was
        // appended before it was put in `unlisted`): a kill between the two
        // never leaves a listed record that is not in its segment.
        if let Some(segments) = self.segments.as_ref().filter(|_| !taken.is_empty()) {
            if let Err(err) = segments.write_pending() {
                lock(&self.unlisted).splice(0..0, taken);
                return Err(file_error(err));
            }
        }
        for (i, chunk) in taken.chunks(BATCH_ENTRIES).enumerate() {
            let n = self.next_batch.fetch_add(1, Ordering::Relaxed);
            let mut value = Vec::with_capacity(chunk.len() * BATCH_ENTRY);
            for (id, extent) in chunk {
                value.extend_from_slice(&id.key());
                extent.encode_into(&mut value);
            }
            if let Err(err) = self.records.insert(batch_key(n), value) {
                // Listed by a later flush, if any succeeds.
                let rest = taken.get(i * BATCH_ENTRIES..).unwrap_or_default();
                lock(&self.unlisted).splice(0..0, rest.iter().copied());
                return Err(storage(err));
            }
            let listed = {
                let mut totals = lock(&self.totals);
                let mut listed = 0u32;
                for &(id, extent) in chunk {
                    let unlisted = Place::Segment {
                        extent,
                        batch: UNLISTED,
                    };
                    if let Some(pos) = totals.position(id) {
                        if let Some(kept) = totals.sizes.get_mut(pos).filter(|k| k.at == unlisted) {
                            kept.at = Place::Segment { extent, batch: n };
                            listed += 1;
                        }
                    }
                }
                if listed > 0 {
                    totals.live.insert(n, listed);
                }
                listed as usize
            };
            // Some were deleted or stored again meanwhile.
            if listed < chunk.len() {
                self.settle(n)?;
            }
        }
        Ok(())
    }

    /// Rewrites batch `n` of tree `records` with only the records still kept
    /// there, or removes it when none is. The caller holds `tree_writes`.
    fn settle(&self, n: u64) -> Result<(), HistoryError> {
        let Some(value) = self.records.get(batch_key(n)).map_err(storage)? else {
            return Ok(());
        };
        let still: Vec<u8> = {
            let totals = lock(&self.totals);
            value
                .chunks_exact(BATCH_ENTRY)
                .filter(|entry| {
                    let Some((id, extent)) = batch_entries(entry).next() else {
                        return false;
                    };
                    totals
                        .find(id)
                        .is_some_and(|k| k.at == Place::Segment { extent, batch: n })
                })
                .flatten()
                .copied()
                .collect()
        };
        if still.is_empty() {
            self.records.remove(batch_key(n)).map_err(storage)?;
        } else if still.len() < value.len() {
            self.records.insert(batch_key(n), still).map_err(storage)?;
        }
        Ok(())
    }

    /// [`History::record`] for exchanges nobody waits on: the fsync is shared
    /// with every record of the next [`RECORD_LINGER`], so a steady stream of
    /// webhooks costs one fsync per linger, not one each. Still on disk
    /// before it is announced (and printed).
    ///
    /// # Errors
    /// A storage error.
    pub async fn record_lingering(
        &self,
        exchange: impl Into<Arc<Exchange>>,
        bodies: &[(Part, Body<'_>)],
    ) -> Result<(), HistoryError> {
        let exchange = exchange.into();
        self.store_as(&exchange, bodies, Write::ByFlush)?;
        self.commits
            .flush_lingering(RECORD_LINGER, self.flush_fn())
            .await?;
        self.announce(exchange);
        Ok(())
    }

    /// Tells live views about a stored (and flushed) exchange.
    pub(crate) fn announce(&self, exchange: impl Into<Arc<Exchange>>) {
        let _ = self.events.send(HistoryEvent::Exchange {
            exchange: exchange.into(),
        });
    }

    /// Flushes everything written so far to disk; concurrent callers share
    /// one fsync ([`GroupCommit`]).
    ///
    /// # Errors
    /// A storage error.
    pub async fn flush(&self) -> Result<(), HistoryError> {
        self.commits.flush(self.flush_fn()).await
    }

    /// Saves the retention index and flushes: the next open reads the index
    /// (about 25 bytes per exchange) instead of every record, which with
    /// 100,000 exchanges took seconds and 200 MiB (sled keeps every page it
    /// read). Call it last, when nothing records any more; without it (a
    /// crash) the next open scans the records as before.
    ///
    /// # Errors
    /// A storage error.
    pub async fn close(&self) -> Result<(), HistoryError> {
        // Every record listed first: the index names their batches.
        self.flush().await?;
        let index = lock(&self.totals).encode();
        self.settings()?
            .insert(KEPT_INDEX_KEY, index)
            .map_err(storage)?;
        self.flush_and_delete().await
    }

    /// Flushes, and waits until the segment files no longer needed are
    /// deleted (a flush leaves that to a thread of its own; see
    /// `Segments::collect_later`): for callers that promise the space back.
    ///
    /// # Errors
    /// A storage error.
    pub async fn flush_and_delete(&self) -> Result<(), HistoryError> {
        self.flush().await?;
        self.segments_deleted().await
    }

    async fn segments_deleted(&self) -> Result<(), HistoryError> {
        self.off_runtime(|h| {
            if let Some(segments) = &h.segments {
                segments.wait_deleted();
            }
            Ok(())
        })
        .await
    }

    /// One fsync of the store, for [`GroupCommit`] to run.
    /// Applies retention first, so that the store is within its limits
    /// whenever it is on disk.
    fn flush_fn(&self) -> impl FnOnce() -> Result<(), HistoryError> + Send + 'static {
        let history = self.clone();
        move || {
            history.list_unlisted()?;
            history.enforce_retention()?;
            let Some(segments) = &history.segments else {
                return history.db.flush().map(drop).map_err(storage);
            };
            // Taken before the flush: whatever was no longer needed then
            // has its removal on disk after it.
            let needed_from = segments.needed_from();
            // Bodies first: a durable record never names a body that is not.
            segments.sync().map_err(file_error)?;
            history.db.flush().map_err(storage)?;
            segments.collect_later(needed_from).map_err(file_error)
        }
    }

    fn enforce_retention(&self) -> Result<(), HistoryError> {
        let mut batches = BTreeSet::new();
        loop {
            let victim = {
                let mut totals = lock(&self.totals);
                let over = totals.sizes.len() as u64 > self.retention.max_exchanges
                    || (totals.bytes > self.retention.max_bytes && totals.sizes.len() > 1);
                if !over {
                    break;
                }
                let Some(kept) = totals.sizes.pop_front() else {
                    break;
                };
                totals.bytes = totals.bytes.saturating_sub(kept.size);
                totals.forget(&kept);
                kept
            };
            if self.remove_stored(victim, false, &mut batches)? {
                // Live views drop it too.
                let _ = self.events.send(HistoryEvent::Deleted { id: victim.id });
            }
        }
        // Each batch the victims were in, once: the oldest go whole.
        self.settle_all(batches)
    }

    fn settle_all(&self, batches: BTreeSet<u64>) -> Result<(), HistoryError> {
        let _writes = lock(&self.tree_writes);
        batches.into_iter().try_for_each(|n| self.settle(n))
    }

    /// Removes a record no longer in the totals, its `delivered` index entry
    /// and its chunked bodies, reading back and scanning only what `kept`
    /// says may be there. The record and its bodies in the segments are
    /// overwritten with zeros if `zero`, and otherwise left for their
    /// segment's deletion (retention drops the oldest, whose segments go
    /// next). The batch listing it goes into `batches`, for the caller to
    /// [settle](Self::settle).
    fn remove_stored(
        &self,
        kept: Kept,
        zero: bool,
        batches: &mut BTreeSet<u64>,
    ) -> Result<bool, HistoryError> {
        let id = kept.id;
        let in_segments = kept.first_seg.is_some();
        let needed = kept.delivered || (zero && in_segments);
        let (existed, removed) = match (kept.at, &self.segments) {
            (Place::Segment { extent, .. }, Some(segments)) => {
                match kept.at.batch() {
                    Some(batch) => {
                        batches.insert(batch);
                    }
                    None => lock(&self.unlisted).retain(|entry| *entry != (id, extent)),
                }
                let removed = if needed {
                    segments.read(&[extent]).ok().map(RecordBytes::Segment)
                } else {
                    None
                };
                if zero {
                    segments.zero(&[extent]).map_err(file_error)?;
                }
                (true, removed)
            }
            _ => {
                let _writes = lock(&self.tree_writes);
                let removed = self.exchanges.remove(id.key()).map_err(storage)?;
                (removed.is_some(), removed.map(RecordBytes::Tree))
            }
        };
        let record = removed
            .as_deref()
            .filter(|_| needed)
            .and_then(|v| Record::decode(v).ok());
        if let (Some(segments), Some(seg)) = (&self.segments, kept.first_seg) {
            if existed {
                segments.release(seg);
            }
            if let Some(record) = record.as_ref().filter(|_| zero) {
                for part in [Part::Request, Part::Response] {
                    if let Some(extents) = record.extents(part) {
                        segments.zero(&extents).map_err(file_error)?;
                    }
                }
            }
        }
        let key = record
            .filter(|_| kept.delivered)
            .and_then(|r| delivered_key(&r.exchange));
        if let Some(key) = key {
            let _ = self
                .delivered
                .compare_and_swap(key, Some(&id.key()[..]), None as Option<&[u8]>)
                .map_err(storage)?;
        }
        if kept.chunked {
            for key in self.bodies.scan_prefix(id.key()).keys() {
                self.bodies.remove(key.map_err(storage)?).map_err(storage)?;
            }
            if let Some(files) = &self.files {
                files.remove(id).map_err(file_error)?;
            }
        }
        Ok(existed)
    }

    /// The exchange through which the app accepted (2xx) this provider
    /// event on this tunnel, if it is still kept.
    ///
    /// # Errors
    /// A storage error.
    pub fn delivered(
        &self,
        tunnel: &str,
        provider: signature::Provider,
        event_id: &str,
    ) -> Result<Option<Exchange>, HistoryError> {
        let key = event_key(tunnel, provider, event_id);
        let Some(id) = self.delivered.get(&key).map_err(storage)? else {
            return Ok(None);
        };
        let Some(id) = ExchangeId::from_key(&id) else {
            return Ok(None);
        };
        match self.get(id) {
            Ok(e) => Ok(Some(e)),
            Err(HistoryError::NotFound(_)) => {
                self.delivered.remove(&key).map_err(storage)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// One exchange.
    ///
    /// # Errors
    /// [`HistoryError::NotFound`] or a storage error.
    pub fn get(&self, id: ExchangeId) -> Result<Exchange, HistoryError> {
        let value = self.record_value(id)?.ok_or(HistoryError::NotFound(id))?;
        Record::decode(&value)
            .map(|r| r.exchange)
            .map_err(|e| HistoryError::Storage(format!("damaged record {id}: {e}")))
    }

    /// A body, reassembled from its chunks.
    ///
    /// # Errors
    /// A storage error.
    pub fn body(&self, id: ExchangeId, part: Part) -> Result<Vec<u8>, HistoryError> {
        if let Some(value) = self.record_value(id)? {
            if let Ok(record) = Record::decode(&value) {
                return self.record_body(&record, part);
            }
        }
        self.unplaced_body(id, part)
    }

    /// The stored record of `id`, wherever it is.
    fn record_value(&self, id: ExchangeId) -> Result<Option<RecordBytes>, HistoryError> {
        let at = lock(&self.totals).find(id).map(|k| k.at);
        self.read_record(id, at, &mut None)
    }

    /// The record of `id` at `at` (`None`: look in tree `exchanges`),
    /// reading its segment from `open` when that is the one.
    fn read_record(
        &self,
        id: ExchangeId,
        at: Option<Place>,
        open: &mut OpenSegment,
    ) -> Result<Option<RecordBytes>, HistoryError> {
        match (at, &self.segments) {
            (Some(Place::Segment { extent, .. }), Some(segments)) => {
                match segments.read_in(&[extent], open) {
                    Ok(bytes) => Ok(Some(RecordBytes::Segment(bytes))),
                    // Its segment went: retention dropped it meanwhile.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(err) => Err(file_error(err)),
                }
            }
            _ => Ok(self
                .exchanges
                .get(id.key())
                .map_err(storage)?
                .map(RecordBytes::Tree)),
        }
    }

    /// Whether `id` is still kept.
    fn is_kept(&self, id: ExchangeId) -> Result<bool, HistoryError> {
        if lock(&self.totals).find(id).is_some() {
            return Ok(true);
        }
        self.exchanges.contains_key(id.key()).map_err(storage)
    }

    /// The body of `part` of a record in hand: inside it, in the segments,
    /// or where stores from before put it.
    fn record_body(&self, record: &Record<'_>, part: Part) -> Result<Vec<u8>, HistoryError> {
        self.record_body_in(record, part, &mut None)
    }

    /// [`History::record_body`], reading segments through `open` (see
    /// [`Segments::read_in`]).
    fn record_body_in(
        &self,
        record: &Record<'_>,
        part: Part,
        open: &mut OpenSegment,
    ) -> Result<Vec<u8>, HistoryError> {
        let id = record.exchange.id;
        if let Some(body) = record.body(part) {
            return Ok(body.to_vec());
        }
        if let (Some(extents), Some(segments)) = (record.extents(part), &self.segments) {
            return self.read_segments(segments, id, &extents, open);
        }
        self.unplaced_body(id, part)
    }

    /// A body its record does not place: a file of its own or pieces in
    /// tree `bodies` (stores from before, in-memory stores).
    fn unplaced_body(&self, id: ExchangeId, part: Part) -> Result<Vec<u8>, HistoryError> {
        if let Some(files) = &self.files {
            if let Some(body) = files.read(id, part).map_err(file_error)? {
                return Ok(body);
            }
        }
        self.tree_body(id, part)
    }

    /// A body in the segments. A segment found missing because retention
    /// deleted it since the record was read (the record is gone too) is
    /// [`HistoryError::NotFound`]; one missing under a kept record is a
    /// storage error.
    fn read_segments(
        &self,
        segments: &Segments,
        id: ExchangeId,
        extents: &[Extent],
        open: &mut OpenSegment,
    ) -> Result<Vec<u8>, HistoryError> {
        match segments.read_in(extents, open) {
            Ok(body) => Ok(body),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !self.is_kept(id)? => {
                Err(HistoryError::NotFound(id))
            }
            Err(err) => Err(file_error(err)),
        }
    }

    /// A body kept in tree `bodies` (in-memory stores, and stores from
    /// before the files).
    fn tree_body(&self, id: ExchangeId, part: Part) -> Result<Vec<u8>, HistoryError> {
        let mut prefix = id.key().to_vec();
        prefix.push(part as u8);
        let mut out = Vec::new();
        for item in self.bodies.scan_prefix(prefix) {
            let (_, chunk) = item.map_err(storage)?;
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Newest first, `limit` at most, starting below `before` when given.
    ///
    /// # Errors
    /// A storage error.
    pub fn list(
        &self,
        filter: &Filter,
        before: Option<ExchangeId>,
        limit: usize,
    ) -> Result<Page, HistoryError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut exchanges = Vec::new();
        let mut next_before = None;
        let mut below = before;
        let mut open = None;
        loop {
            // A few at a time, newest first, without holding the totals
            // while reading them.
            let chunk: Vec<(ExchangeId, Place)> = {
                let totals = lock(&self.totals);
                let end = match below {
                    Some(id) => totals.sizes.partition_point(|k| k.id < id),
                    None => totals.sizes.len(),
                };
                totals
                    .sizes
                    .range(end.saturating_sub(LIST_CHUNK)..end)
                    .rev()
                    .map(|k| (k.id, k.at))
                    .collect()
            };
            let Some(&(oldest, _)) = chunk.last() else {
                break;
            };
            below = Some(oldest);
            for (id, at) in chunk {
                let Some(value) = self.read_record(id, Some(at), &mut open)? else {
                    continue;
                };
                let Ok(record) = Record::decode(&value) else {
                    continue;
                };
                if !filter.matches_meta(&record.exchange) {
                    continue;
                }
                if filter.needs_bodies() && !self.body_matches(filter, &record, &mut open) {
                    continue;
                }
                if exchanges.len() == limit {
                    next_before = exchanges.last().map(|x: &Exchange| x.id);
                    return Ok(Page {
                        exchanges,
                        next_before,
                    });
                }
                exchanges.push(record.exchange);
            }
        }
        Ok(Page {
            exchanges,
            next_before,
        })
    }

    /// Whether a body of `record` holds the filter's text.
    fn body_matches(&self, filter: &Filter, record: &Record<'_>, open: &mut OpenSegment) -> bool {
        let q = filter.q.as_deref().unwrap_or_default().as_bytes();
        let mut body = |part| self.record_body_in(record, part, open);
        match body(Part::Request)
            .and_then(|b| Ok(contains_ci(&b, q) || contains_ci(&body(Part::Response)?, q)))
        {
            Ok(hit) => hit,
            // Dropped by retention while this listing walked past it.
            Err(HistoryError::NotFound(_)) => false,
            // One unreadable body does not end the search for the rest.
            Err(err) => {
                tracing::warn!(
                    exchange = %record.exchange.id,
                    error = &err as &dyn std::error::Error,
                    "cannot search a body"
                );
                false
            }
        }
    }

    /// Deletes one exchange; returns whether it existed.
    ///
    /// # Errors
    /// A storage error.
    pub fn delete(&self, id: ExchangeId) -> Result<bool, HistoryError> {
        let kept = {
            let mut totals = lock(&self.totals);
            match totals.position(id).and_then(|pos| totals.sizes.remove(pos)) {
                Some(kept) => {
                    totals.bytes = totals.bytes.saturating_sub(kept.size);
                    totals.forget(&kept);
                    kept
                }
                // Not kept (or removed meanwhile): look for everything.
                None => Kept {
                    id,
                    size: 0,
                    delivered: true,
                    chunked: true,
                    first_seg: None,
                    at: Place::Tree,
                },
            }
        };
        let mut batches = BTreeSet::new();
        let existed = self.remove_stored(kept, true, &mut batches)?;
        self.settle_all(batches)?;
        if existed {
            let _ = self.events.send(HistoryEvent::Deleted { id });
        }
        Ok(existed)
    }

    /// Deletes everything.
    ///
    /// # Errors
    /// A storage error.
    pub fn clear(&self) -> Result<(), HistoryError> {
        {
            let _writes = lock(&self.tree_writes);
            lock(&self.unlisted).clear();
            self.records.clear().map_err(storage)?;
            self.exchanges.clear().map_err(storage)?;
        }
        self.bodies.clear().map_err(storage)?;
        self.delivered.clear().map_err(storage)?;
        if let Some(files) = &self.files {
            files.remove_where(|_| Ok(true))?;
        }
        let totals = std::mem::take(&mut *lock(&self.totals));
        if let Some(segments) = &self.segments {
            // Deleted by the next flush, once the clearing is on disk.
            segments.retire_all(totals.sizes.iter().filter_map(|k| k.first_seg));
        }
        let _ = self.events.send(HistoryEvent::Cleared);
        Ok(())
    }

    /// Remembers the header names the agent redacts in exports, so that
    /// `export` reading this store after the agent stopped redacts them too.
    /// Replaces what an earlier run stored.
    ///
    /// # Errors
    /// A storage error.
    pub fn set_redact_headers(&self, names: &[String]) -> Result<(), HistoryError> {
        let json = serde_json::to_vec(names).map_err(|e| HistoryError::Storage(e.to_string()))?;
        self.settings()?
            .insert(REDACT_HEADERS_KEY, json)
            .map_err(storage)?;
        Ok(())
    }

    /// The header names stored by [`History::set_redact_headers`]; empty when
    /// none were (or the stored value is unreadable).
    ///
    /// # Errors
    /// A storage error.
    pub fn redact_headers(&self) -> Result<Vec<String>, HistoryError> {
        let stored = self.settings()?.get(REDACT_HEADERS_KEY).map_err(storage)?;
        Ok(stored
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    fn settings(&self) -> Result<sled::Tree, HistoryError> {
        self.tree("settings")
    }

    /// Runs `work` (sled reads and writes, body files) on tokio's blocking
    /// pool with a handle to this store: a listing of many exchanges or a
    /// body of many MiB must not hold the agent's worker thread, which
    /// deliveries wait for.
    ///
    /// # Errors
    /// `work`'s error, or [`HistoryError::Storage`] when it panicked.
    pub async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&History) -> Result<T, HistoryError> + Send + 'static,
    ) -> Result<T, HistoryError> {
        let history = self.clone();
        tokio::task::spawn_blocking(move || work(&history))
            .await
            .map_err(|err| HistoryError::Storage(format!("a history task failed: {err}")))?
    }

    /// Number of exchanges kept.
    pub fn len(&self) -> usize {
        lock(&self.totals).sizes.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the agent's history gauges show.
    pub fn figures(&self) -> Figures {
        Figures {
            exchanges: self.len(),
            disk_bytes: self.db.size_on_disk().unwrap_or(0)
                + self.segments.as_ref().map_or(0, |s| s.disk_bytes()),
        }
    }
}

fn event_key(tunnel: &str, provider: signature::Provider, event_id: &str) -> Vec<u8> {
    format!("{tunnel}\0{provider}\0{event_id}").into_bytes()
}

/// The index key of an exchange that delivered a provider event: an
/// original (not a replay or a duplicate) the app answered with 2xx.
fn delivered_key(e: &Exchange) -> Option<Vec<u8>> {
    let accepted = e.status().is_some_and(|s| (200..300).contains(&s));
    if !accepted || e.replay_of.is_some() || e.duplicate_of.is_some() {
        return None;
    }
    Some(event_key(&e.tunnel, e.provider?, e.event_id.as_deref()?))
}

fn body_key(id: ExchangeId, part: Part, seq: u32) -> [u8; 21] {
    let mut key = [0u8; 21];
    key[..16].copy_from_slice(&id.key());
    key[16] = part as u8;
    key[17..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Locks `mutex`, also after a panic elsewhere held it (what it guards stays
/// consistent between statements).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn storage(e: sled::Error) -> HistoryError {
    HistoryError::Storage(e.to_string())
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why a history operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("no exchange {0}")]
    NotFound(ExchangeId),
    #[error("{0:?} is not an exchange id")]
    BadId(String),
    #[error(
        "the history in {0} is held by a running agent; use its inspector (--inspect ADDR) or stop it"
    )]
    Locked(String),
    #[error("history storage failed: {0}")]
    Storage(String),
    #[error(
        "the history in this data dir was written by a newer relay-client (store format {found}; \
         this one reads up to {known}): run that version or a newer one, or use another --data-dir"
    )]
    TooNew { found: u64, known: u64 },
}

impl From<std::io::Error> for HistoryError {
    fn from(e: std::io::Error) -> Self {
        HistoryError::Storage(e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The quick text of a socket address is `Display`'s, byte for byte.
    #[test]
    fn socket_addr_text_is_display() {
        let addrs = [
            "0.0.0.0:0",
            "127.0.0.1:8080",
            "255.255.255.255:65535",
            "10.0.20.100:9",
            "[::1]:443",
            "[2001:db8::7]:1",
        ];
        for addr in addrs {
            let addr: std::net::SocketAddr = addr.parse().expect("address");
            assert_eq!(socket_addr_text(addr), addr.to_string());
        }
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..2_000 {
            let ip = std::net::Ipv4Addr::from(rng.u32(..));
            let addr = std::net::SocketAddr::from((ip, rng.u16(..)));
            assert_eq!(socket_addr_text(addr), addr.to_string());
        }
    }

    /// Moving headers into a record gives what copying them does.
    #[test]
    fn headers_into_matches_headers_from() {
        let wire = vec![
            ("Content-Type".to_owned(), b"application/json".to_vec()),
            ("x-github-event".to_owned(), b"push".to_vec()),
            ("X-Raw".to_owned(), vec![0xff, b'a']),
        ];
        assert_eq!(headers_into(wire.clone()), headers_from(&wire));
        assert_eq!(headers_into(wire)[0].name, "content-type");
    }

    /// The search's matcher agrees with comparing at every position, over
    /// texts of a few letters in both cases and some other bytes, where
    /// near misses and overlaps are common.
    #[test]
    fn contains_ci_agrees_with_comparing_at_every_position() {
        fn naive(haystack: &[u8], needle: &[u8]) -> bool {
            needle.is_empty()
                || haystack
                    .windows(needle.len())
                    .any(|w| w.eq_ignore_ascii_case(needle))
        }
        let alphabet = b"aAbB{}\"\xff";
        let mut rng = fastrand::Rng::with_seed(8);
        let mut text = |most: usize| -> Vec<u8> {
            let len = rng.usize(..most);
            (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect()
        };
        let mut hits = 0;
        for _ in 0..20_000 {
            let haystack = text(40);
            let needle = text(5);
            let expected = naive(&haystack, &needle);
            assert_eq!(
                contains_ci(&haystack, &needle),
                expected,
                "{haystack:?} / {needle:?}"
            );
            hits += usize::from(expected);
        }
        assert!(hits > 2_000 && hits < 18_000, "{hits}: both outcomes tried");
        assert!(contains_ci(b"{\"type\":\"Invoice.Paid\"}", b"invoice.paid"));
        assert!(!contains_ci(b"invoice.pai", b"invoice.paid"));
    }

    /// An exchange with a request header, no bodies, forwarded to
    /// `127.0.0.1:3000` (other modules' tests use it too).
    pub(crate) fn exchange(method: &str, path: &str, status: Option<u16>) -> Exchange {
        Exchange {
            id: ExchangeId::new(),
            delivery_id: Some("d".into()),
            tunnel: "t".into(),
            received_at_relay_ms: Some(now_ms()),
            received_at_ms: now_ms(),
            remote_addr: None,
            method: method.into(),
            url: format!("http://relay/t/t{path}"),
            path: path.into(),
            target: "http://127.0.0.1:3000".into(),
            request: RequestRecord {
                headers: vec![Header {
                    name: "x-github-event".into(),
                    value: b"push".to_vec(),
                }],
                body_len: 0,
            },
            response: status.map(|s| ResponseRecord {
                status: s,
                headers: vec![],
                body_len: 0,
            }),
            outcome: if status.is_some() {
                Outcome::Ok
            } else {
                Outcome::LocalAppUnreachable
            },
            error: None,
            duration: Durations::default(),
            provider: None,
            signature: None,
            replay_of: None,
            event_id: None,
            duplicate_of: None,
            queued: None,
        }
    }

    /// A string of up to `max` characters drawn from everything JSON
    /// escapes or might trip over: controls, quotes, backslashes, DEL,
    /// multi-byte characters.
    fn tricky_string(rng: &mut fastrand::Rng, max: usize) -> String {
        const PALETTE: &[char] = &[
            'a', 'Z', '0', ' ', '/', '"', '\\', '\n', '\r', '\t', '\u{0}', '\u{1f}', '\u{7f}',
            '\u{8}', '\u{c}', 'é', '€', '😀', '\u{2028}', '<', '&', '\'',
        ];
        (0..rng.usize(0..=max))
            .map(|_| PALETTE[rng.usize(0..PALETTE.len())])
            .collect()
    }

    fn tricky_headers(rng: &mut fastrand::Rng) -> Vec<Header> {
        (0..rng.usize(0..4))
            .map(|_| Header {
                name: tricky_string(rng, 8),
                value: if rng.bool() {
                    tricky_string(rng, 12).into_bytes()
                } else {
                    // Often not UTF-8.
                    (0..rng.usize(0..6)).map(|_| rng.u8(..)).collect()
                },
            })
            .collect()
    }

    /// The record's hand-written JSON is serde_json's, byte for byte, for
    /// every field set or not and strings that need escaping or not (a field
    /// added to `Exchange` but not to the writer makes this fail).
    #[test]
    fn record_json_is_exactly_serde_jsons() {
        let mut rng = fastrand::Rng::with_seed(8);
        let provider = signature::Provider::Stripe;
        let verdicts = [
            Verdict::Valid { provider },
            Verdict::Invalid {
                provider,
                reason: "no \"v1\" signature".into(),
            },
            Verdict::Stale {
                provider,
                age_s: -3,
            },
            Verdict::Unsigned,
            Verdict::NoSecret { provider },
        ];
        for i in 0..3000 {
            let some = i % 2 == 0;
            let mut e = exchange("POST", "/hook", (i % 3 != 0).then_some(200));
            e.delivery_id = some.then(|| tricky_string(&mut rng, 30));
            e.tunnel = tricky_string(&mut rng, 20);
            e.received_at_relay_ms = some.then(|| rng.u64(..));
            e.received_at_ms = rng.u64(..);
            e.remote_addr = some.then(|| tricky_string(&mut rng, 20));
            e.method = tricky_string(&mut rng, 8);
            e.url = tricky_string(&mut rng, 40);
            e.path = tricky_string(&mut rng, 30);
            e.target = tricky_string(&mut rng, 30);
            e.request.headers = tricky_headers(&mut rng);
            e.request.body_len = rng.u64(..);
            if let Some(r) = e.response.as_mut() {
                r.status = rng.u16(..);
                r.headers = tricky_headers(&mut rng);
                r.body_len = rng.u64(..);
            }
            e.error = some.then(|| tricky_string(&mut rng, 30));
            e.duration = Durations {
                relay_to_agent_ms: some.then(|| rng.u64(..)),
                local_app_ms: (!some).then(|| rng.u64(..)),
                total_ms: rng.u64(..),
            };
            e.provider = some.then_some(provider);
            e.signature = (i % 6 != 1).then(|| verdicts[i % verdicts.len()].clone());
            e.replay_of = some.then(ExchangeId::new);
            e.event_id = (i % 4 == 0).then(|| tricky_string(&mut rng, 20));
            e.duplicate_of = (i % 4 == 1).then(ExchangeId::new);
            e.queued = (i % 5 == 0).then(|| QueuedAttempt {
                attempt: rng.u32(..),
                max_attempts: rng.u32(..),
                next_attempt_at_ms: some.then(|| rng.u64(..)),
                failed: rng.bool(),
                interrupted: rng.bool(),
            });
            let mut fast = Vec::new();
            record_json::write(&mut fast, &e).expect("write");
            let serde = serde_json::to_vec(&e).expect("serde_json");
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&serde),
                "exchange {i}"
            );
            assert_eq!(fast, serde, "exchange {i}");
            let back: Exchange = serde_json::from_slice(&fast).expect("reads back");
            assert_eq!(back, e, "exchange {i}");
        }
    }

    /// Records `e` with `body` appended in pieces (whatever its size).
    async fn record_with_body(h: &History, mut e: Exchange, body: &[u8]) -> ExchangeId {
        e.request.body_len = body.len() as u64;
        let id = e.id;
        let mut spilled = Spilled::default();
        for chunk in body.chunks(3) {
            h.append_body(id, Part::Request, &mut spilled, chunk)
                .expect("append");
        }
        h.record(e, &[(Part::Request, Body::Spilled(spilled.extents()))])
            .await
            .expect("record");
        id
    }

    /// Stores (without flushing) an exchange whose request body is `body`,
    /// taken as replays take theirs ([`History::keep_body`]).
    fn store_kept(h: &History, body: &[u8]) -> ExchangeId {
        let mut e = exchange("POST", "/x", Some(200));
        e.request.body_len = body.len() as u64;
        let kept = h.keep_body(e.id, Part::Request, body).expect("keep");
        h.store(&e, &[(Part::Request, kept.as_body())])
            .expect("store");
        e.id
    }

    /// A store on disk whose segments are `segment_bytes` long.
    fn open_small(dir: &Path, retention: Retention, segment_bytes: u64) -> History {
        History::open_once(dir, retention, segment_bytes).expect("open")
    }

    /// The segment files in `dir`'s store.
    fn segment_files(dir: &Path) -> Vec<String> {
        body_files(dir)
            .into_iter()
            .filter(|name| name.ends_with(".seg"))
            .collect()
    }

    #[tokio::test]
    async fn bodies_reassemble_and_lists_filter_newest_first() {
        let h = History::temporary(Retention::default()).expect("open");
        let a = record_with_body(
            &h,
            exchange("POST", "/github", Some(200)),
            b"{\"action\":\"opened\"}",
        )
        .await;
        let b = record_with_body(&h, exchange("GET", "/health", Some(404)), b"").await;
        let c = record_with_body(&h, exchange("POST", "/stripe", None), b"Payment_Intent").await;
        assert_eq!(
            h.body(a, Part::Request).expect("body"),
            b"{\"action\":\"opened\"}"
        );
        let all = h.list(&Filter::default(), None, 10).expect("list");
        let ids: Vec<ExchangeId> = all.exchanges.iter().map(|e| e.id).collect();
        assert_eq!(ids, [c, b, a]);

        let by = |f: Filter| -> Vec<ExchangeId> {
            h.list(&f, None, 10)
                .expect("list")
                .exchanges
                .iter()
                .map(|e| e.id)
                .collect()
        };
        assert_eq!(
            by(Filter {
                method: Some("post".into()),
                ..Default::default()
            }),
            [c, a]
        );
        assert_eq!(
            by(Filter {
                path: Some("HUB".into()),
                ..Default::default()
            }),
            [a]
        );
        assert_eq!(
            by(Filter {
                path: Some("/gitlab".into()),
                ..Default::default()
            }),
            Vec::<ExchangeId>::new()
        );
        assert_eq!(
            by(Filter {
                status: Some("4xx".into()),
                ..Default::default()
            }),
            [b]
        );
        assert_eq!(
            by(Filter {
                status: Some("200".into()),
                ..Default::default()
            }),
            [a]
        );
        assert_eq!(
            by(Filter {
                status: Some("failed".into()),
                ..Default::default()
            }),
            [c]
        );
        assert_eq!(
            by(Filter {
                q: Some("payment_INTENT".into()),
                ..Default::default()
            }),
            [c]
        );
        assert_eq!(
            by(Filter {
                header: Some("X-GitHub-Event: PUSH".into()),
                ..Default::default()
            })
            .len(),
            3
        );
        assert_eq!(
            by(Filter {
                header: Some("x-stripe".into()),
                ..Default::default()
            })
            .len(),
            0
        );

        let page = h.list(&Filter::default(), None, 2).expect("list");
        assert_eq!(page.exchanges.len(), 2);
        let rest = h
            .list(&Filter::default(), page.next_before, 2)
            .expect("list");
        assert_eq!(rest.exchanges.iter().map(|e| e.id).collect::<Vec<_>>(), [a]);
        assert!(rest.next_before.is_none());
    }

    #[tokio::test]
    async fn retention_drops_oldest_by_count_and_bytes() {
        let h = History::temporary(Retention {
            max_exchanges: 3,
            max_bytes: u64::MAX,
        })
        .expect("open");
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(record_with_body(&h, exchange("POST", "/x", Some(200)), b"abc").await);
        }
        assert_eq!(h.len(), 3);
        assert!(matches!(h.get(ids[0]), Err(HistoryError::NotFound(_))));
        assert!(
            h.body(ids[0], Part::Request).expect("body").is_empty(),
            "bodies go with their record"
        );
        assert!(h.get(ids[4]).is_ok());

        let h = History::temporary(Retention {
            max_exchanges: 100,
            max_bytes: 5_000,
        })
        .expect("open");
        let big = vec![b'x'; 2_000];
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(record_with_body(&h, exchange("POST", "/x", Some(200)), &big).await);
        }
        assert!(h.len() <= 2, "{} kept", h.len());
        assert!(h.get(ids[3]).is_ok());
    }

    /// Storing leaves eviction to the flush (off the recorder's thread), and
    /// every flush, lingering ones too, leaves the store within its limits.
    #[tokio::test]
    async fn retention_is_applied_by_the_flush_on_disk_stores_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![b'x'; INLINE_BODY_MAX + 1];
        // One body per segment.
        let h = open_small(
            dir.path(),
            Retention {
                max_exchanges: 3,
                max_bytes: u64::MAX,
            },
            big.len() as u64,
        );
        let ids: Vec<ExchangeId> = (0..5).map(|_| store_kept(&h, &big)).collect();
        assert_eq!(h.len(), 5, "not evicted on the recorder's thread");
        h.flush().await.expect("flush");
        assert_eq!(h.len(), 3);
        for gone in &ids[..2] {
            assert!(matches!(h.get(*gone), Err(HistoryError::NotFound(_))));
        }
        // Deleted by a thread of their own, after the flush.
        h.segments_deleted().await.expect("deleted");
        assert_eq!(
            segment_files(dir.path()).len(),
            6,
            "the evicted records' segments are gone (a body and its record each)"
        );
        let figures = h.figures();
        assert_eq!(figures.exchanges, 3);
        assert!(
            figures.disk_bytes >= 3 * big.len() as u64,
            "{figures:?}: the segments count"
        );
        for kept in &ids[2..] {
            assert_eq!(h.body(*kept, Part::Request).expect("body"), big);
        }

        let e = exchange("POST", "/y", Some(200));
        let newest = e.id;
        h.record_lingering(e, &[(Part::Request, Body::Inline(b"small"))])
            .await
            .expect("record");
        assert_eq!(h.len(), 3);
        assert!(matches!(h.get(ids[2]), Err(HistoryError::NotFound(_))));
        assert_eq!(h.body(newest, Part::Request).expect("body"), b"small");
    }

    /// Small bodies inside the record, a large one in chunks, and a record
    /// from before inline bodies (JSON alone): all read back, list, search,
    /// survive reopening, and leave nothing behind when retention drops them.
    #[tokio::test]
    async fn inline_chunked_and_legacy_records_read_back_and_retire_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![b'z'; INLINE_BODY_MAX + 1];
        let (inline_id, mixed_id, legacy_id) = {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            let mut legacy = exchange("POST", "/legacy", Some(200));
            legacy.request.body_len = 6;
            let legacy_id = legacy.id;
            // As a version before the segments wrote it: a file per body.
            std::fs::write(
                dir.path()
                    .join("history-bodies")
                    .join(format!("{}.0", hex::encode(legacy_id.key()))),
                b"old-bo",
            )
            .expect("legacy file");
            let json = serde_json::to_vec(&legacy).expect("json");
            h.exchanges.insert(legacy_id.key(), json).expect("insert");

            let mut small = exchange("POST", "/inline", Some(200));
            small.request.body_len = 5;
            if let Some(r) = small.response.as_mut() {
                r.body_len = 2;
            }
            let inline_id = small.id;
            h.store(
                &small,
                &[
                    (Part::Request, Body::Inline(b"hello")),
                    (Part::Response, Body::Inline(b"ok")),
                ],
            )
            .expect("store");

            let mut mixed = exchange("POST", "/mixed", Some(200));
            mixed.request.body_len = big.len() as u64;
            if let Some(r) = mixed.response.as_mut() {
                r.body_len = 4;
            }
            let mixed_id = mixed.id;
            let body = h.keep_body(mixed_id, Part::Request, &big).expect("keep");
            h.store(
                &mixed,
                &[
                    (Part::Request, body.as_body()),
                    (Part::Response, Body::Inline(b"done")),
                ],
            )
            .expect("store");
            h.flush().await.expect("flush");
            h.db.flush().expect("flush");
            (inline_id, mixed_id, legacy_id)
        };
        let h = History::open(dir.path(), Retention::default()).expect("reopen");
        assert_eq!(h.len(), 3);
        assert_eq!(h.body(inline_id, Part::Request).expect("body"), b"hello");
        assert_eq!(h.body(inline_id, Part::Response).expect("body"), b"ok");
        assert_eq!(h.body(mixed_id, Part::Request).expect("body"), big);
        assert_eq!(h.body(mixed_id, Part::Response).expect("body"), b"done");
        assert_eq!(h.body(legacy_id, Part::Request).expect("body"), b"old-bo");
        assert_eq!(h.get(inline_id).expect("get").path, "/inline");
        let search = |q: &str| {
            let filter = Filter {
                q: Some(q.into()),
                ..Filter::default()
            };
            let page = h.list(&filter, None, 10).expect("list");
            page.exchanges.into_iter().map(|e| e.id).collect::<Vec<_>>()
        };
        assert_eq!(search("HELLO"), vec![inline_id]);
        assert_eq!(search("done"), vec![mixed_id]);
        assert_eq!(search("old-bo"), vec![legacy_id]);
        assert_eq!(
            h.list(&Filter::default(), None, 10)
                .expect("list")
                .exchanges
                .len(),
            3
        );

        // Retention by count drops them oldest first, chunks and all.
        let h = History {
            retention: Retention {
                max_exchanges: 0,
                max_bytes: u64::MAX,
            },
            ..h
        };
        h.flush_and_delete().await.expect("retention");
        assert!(h.exchanges.is_empty());
        assert!(
            body_files(dir.path()).is_empty(),
            "bodies went with their records, segments and legacy files"
        );
    }

    #[tokio::test]
    async fn delete_and_clear_tell_subscribers() {
        let h = History::temporary(Retention::default()).expect("open");
        let mut rx = h.subscribe();
        let id = record_with_body(&h, exchange("POST", "/x", Some(200)), b"a").await;
        assert!(matches!(rx.try_recv(), Ok(HistoryEvent::Exchange { .. })));
        assert!(h.delete(id).expect("delete"));
        assert!(!h.delete(id).expect("delete"));
        assert!(matches!(rx.try_recv(), Ok(HistoryEvent::Deleted { .. })));
        record_with_body(&h, exchange("POST", "/x", Some(200)), b"a").await;
        h.clear().expect("clear");
        assert!(h.is_empty());
    }

    #[test]
    fn a_webhook_record_is_encoded_into_one_allocation() {
        let mut e = exchange("POST", "/hooks/github?x=1", Some(200));
        e.remote_addr = Some("203.0.113.7:51234".into());
        e.event_id = Some("72d3162e-cc78-11e3-81ab-4c9367dc0958".into());
        e.provider = Some(signature::Provider::Github);
        e.signature = Some(Verdict::Invalid {
            provider: signature::Provider::Github,
            reason: "signature does not match any configured secret".into(),
        });
        e.error = Some("the app answered 500".into());
        e.duration = Durations {
            relay_to_agent_ms: Some(12_345),
            local_app_ms: Some(67_890),
            total_ms: 123_456,
        };
        e.queued = Some(QueuedAttempt {
            attempt: 3,
            max_attempts: 10,
            next_attempt_at_ms: Some(now_ms()),
            failed: false,
            interrupted: false,
        });
        e.request.headers = [
            ("host", "relay.example.com"),
            ("user-agent", "GitHub-Hookshot/abc1234"),
            ("content-type", "application/json"),
            ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ("x-github-event", "pull_request"),
            ("x-github-hook-id", "123456789"),
            (
                "x-hub-signature-256",
                "sha256=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            ("x-forwarded-for", "203.0.113.7"),
            ("content-length", "1024"),
        ]
        .iter()
        .map(|(n, v)| Header {
            name: (*n).into(),
            value: v.as_bytes().to_vec(),
        })
        .collect();
        e.request.headers.push(Header {
            name: "x-binary".into(),
            value: vec![0xff, 0xfe, b'"', b'\\'],
        });
        let response = e.response.as_mut().expect("response");
        response.headers = vec![Header {
            name: "content-type".into(),
            value: b"application/json; charset=utf-8".to_vec(),
        }];
        let body = vec![b'x'; 1024];
        let (value, _) = encode_record(
            &e,
            &[
                (Part::Request, Body::Inline(&body[..])),
                (Part::Response, Body::Inline(b"ok")),
            ],
        )
        .expect("encode");
        // The estimate covered it: the buffer was never regrown (and copied).
        let asked = json_estimate(&e) + 1 + 5 + body.len() + 5 + 2;
        assert!(value.len() <= asked, "{} > {asked}", value.len());
        assert_eq!(value.capacity(), asked);
        let record = Record::decode(&value).expect("decode");
        assert_eq!(record.exchange, e);
        assert_eq!(record.body(Part::Request), Some(&body[..]));
    }

    #[test]
    fn non_utf8_header_values_round_trip_through_json() {
        let h = Header {
            name: "x-bin".into(),
            value: vec![0xff, b'a'],
        };
        let json = serde_json::to_string(&h).expect("json");
        assert!(json.contains("value_base64"));
        let back: Header = serde_json::from_str(&json).expect("json");
        assert_eq!(back, h);
        let text = Header {
            name: "a".into(),
            value: b"b".to_vec(),
        };
        assert_eq!(
            serde_json::to_string(&text).expect("json"),
            r#"{"name":"a","value":"b"}"#
        );
    }

    #[tokio::test]
    async fn records_survive_reopening_and_orphan_bodies_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let legacy_orphan = format!("{}.0", hex::encode(ExchangeId::new().key()));
        let (id, other) = {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            let id = record_with_body(&h, exchange("POST", "/x", Some(200)), b"kept").await;
            let other = record_with_body(&h, exchange("POST", "/y", Some(200)), b"other").await;
            // A delivery cut short by a crash: pieces, no record.
            let mut cut = Spilled::default();
            h.append_body(ExchangeId::new(), Part::Request, &mut cut, b"cut short")
                .expect("append");
            std::fs::write(
                dir.path().join("history-bodies").join(&legacy_orphan),
                b"orphan",
            )
            .expect("legacy orphan");
            h.flush().await.expect("flush");
            (id, other)
        };
        let h = History::open(dir.path(), Retention::default()).expect("reopen");
        assert_eq!(h.len(), 2);
        assert_eq!(h.body(id, Part::Request).expect("body"), b"kept");
        assert_eq!(
            body_files(dir.path()),
            ["0000000000.seg"],
            "the legacy orphan was removed, the kept body's segment was not"
        );
        assert_eq!(h.bodies.len(), 0, "large bodies are files, not sled values");
        // Deleting an exchange overwrites its body at once (its segment
        // stays, as the other one's body is in it too).
        assert!(h.delete(id).expect("delete"));
        h.flush().await.expect("flush");
        let raw = std::fs::read(dir.path().join("history-bodies/0000000000.seg")).expect("read");
        assert!(
            !raw.windows(4).any(|w| w == b"kept"),
            "a deleted body is zeroed"
        );
        assert_eq!(h.body(other, Part::Request).expect("body"), b"other");
        // Clearing deletes every segment with the next flush (on the
        // deleting thread, which `flush_and_delete` waits for).
        h.clear().expect("clear");
        h.flush_and_delete().await.expect("flush");
        assert!(body_files(dir.path()).is_empty());
        let late = record_with_body(&h, exchange("POST", "/z", Some(200)), b"late").await;
        assert_eq!(h.body(late, Part::Request).expect("body"), b"late");
        assert_eq!(segment_files(dir.path()), ["0000000001.seg"]);
    }

    /// A segment is deleted only once no kept record and no body still being
    /// written starts in it or before it; on reopen, segments older than
    /// every record's (their records removed before a crash) are deleted.
    #[tokio::test]
    async fn segments_go_in_order_once_nothing_needs_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let piece = vec![b'p'; 1000];
        let retention = Retention {
            max_exchanges: 1,
            max_bytes: u64::MAX,
        };
        {
            let h = open_small(dir.path(), retention, 1000);
            // A slow upload: its first piece in segment 0.
            let slow_id = ExchangeId::new();
            let mut slow = Spilled::default();
            h.append_body(slow_id, Part::Request, &mut slow, &piece)
                .expect("append");
            // Quick ones: a's body in segment 1, its record and b's body in
            // 2, b's record in 3; retention keeps the newest.
            record_with_body(&h, exchange("POST", "/a", Some(200)), &piece).await;
            let b = record_with_body(&h, exchange("POST", "/b", Some(200)), &piece).await;
            assert_eq!(h.len(), 1);
            assert_eq!(
                segment_files(dir.path()).len(),
                4,
                "segment 0 is held by the upload in progress, the others by being newer"
            );
            // The upload goes on into segment 3, then finishes (its record
            // in 4).
            h.append_body(slow_id, Part::Request, &mut slow, &piece)
                .expect("append");
            let mut e = exchange("POST", "/slow", Some(200));
            e.id = slow_id;
            e.request.body_len = 2 * piece.len() as u64;
            assert_eq!(slow.extents().len(), 2);
            h.record(e, &[(Part::Request, Body::Spilled(slow.extents()))])
                .await
                .expect("record");
            drop(slow);
            // The slow upload's id is the oldest: retention dropped it at
            // once, and with b kept, only b's segment is needed.
            assert!(h.get(slow_id).is_err());
            h.flush_and_delete().await.expect("flush");
            assert_eq!(
                segment_files(dir.path()),
                [
                    "0000000002.seg",
                    "0000000003.seg",
                    "0000000004.seg",
                    "0000000005.seg"
                ],
                "0 and 1 went: none before b's body needs them"
            );
            assert_eq!(h.body(b, Part::Request).expect("body"), piece);
            // As if b's removal reached the disk but a crash came before
            // its segments' deletion.
            assert_eq!(h.records.len(), 1, "one batch lists b");
            h.records.clear().expect("remove");
            h.db.flush().expect("flush");
        }
        let h = open_small(dir.path(), retention, 1000);
        assert!(h.is_empty());
        assert!(segment_files(dir.path()).is_empty(), "no record needs it");
    }

    fn body_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("history-bodies"))
            .expect("bodies directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn bodies_of_stores_from_before_the_files_still_read_and_retire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (id, big) = {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            let mut e = exchange("POST", "/old", Some(200));
            let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            e.request.body_len = big.len() as u64;
            // As an earlier version wrote it: pieces in tree `bodies`.
            for (seq, piece) in big.chunks(8 * 1024).enumerate() {
                h.bodies
                    .insert(body_key(e.id, Part::Request, seq as u32), piece)
                    .expect("insert");
            }
            let id = e.id;
            h.record(e, &[]).await.expect("record");
            (id, big)
        };
        let h = History::open(dir.path(), Retention::default()).expect("reopen");
        assert_eq!(h.body(id, Part::Request).expect("body"), big);
        assert!(h.delete(id).expect("delete"));
        assert_eq!(h.bodies.len(), 0, "its pieces went with it");
    }

    #[tokio::test]
    async fn redacted_header_names_survive_reopening_and_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            assert!(h.redact_headers().expect("read").is_empty());
            h.set_redact_headers(&["x-shop-token".into(), "x-other".into()])
                .expect("store");
            h.clear().expect("clear");
            h.flush().await.expect("flush");
        }
        let h = History::open(dir.path(), Retention::default()).expect("reopen");
        assert_eq!(
            h.redact_headers().expect("read"),
            ["x-shop-token", "x-other"]
        );
        h.set_redact_headers(&[]).expect("store");
        assert!(h.redact_headers().expect("read").is_empty());
    }

    type KeptTuple = (ExchangeId, u64, bool, bool, Option<u32>, Place);

    fn totals_of(h: &History) -> (u64, Vec<KeptTuple>) {
        let t = h.totals.lock().expect("totals");
        let sizes = t
            .sizes
            .iter()
            .map(|k| (k.id, k.size, k.delivered, k.chunked, k.first_seg, k.at))
            .collect();
        (t.bytes, sizes)
    }

    /// A clean close saves the retention index and the next open reads it
    /// instead of every record: the same totals as a scan, the index taken
    /// out (a crash after this open must not trust it), records written after
    /// it still counted, and retention after the reopen drops the oldest.
    #[tokio::test]
    async fn retention_index_saved_on_close_matches_a_scan_and_is_taken_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![b'b'; INLINE_BODY_MAX + 1];
        let (scanned, ids) = {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            let mut ids = Vec::new();
            for i in 0..5 {
                let body = if i == 2 {
                    big.clone()
                } else {
                    vec![b'x'; 10 * i]
                };
                ids.push(record_with_body(&h, exchange("POST", "/i", Some(200)), &body).await);
            }
            h.close().await.expect("close");
            // Written after the index (as if a command had run on a store
            // whose index survived): found by the scan past the index.
            let late = exchange("POST", "/late", Some(200));
            ids.push(late.id);
            h.record(late, &[(Part::Request, Body::Inline(b"late"))])
                .await
                .expect("record");
            h.close().await.expect("close again");
            (totals_of(&h), ids)
        };
        // The same store opened by scanning every record.
        let reference = {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            assert!(
                h.settings()
                    .expect("settings")
                    .get(KEPT_INDEX_KEY)
                    .expect("get")
                    .is_none(),
                "opening takes the index out"
            );
            assert_eq!(totals_of(&h), scanned, "index and memory agree");
            h.flush().await.expect("flush");
            drop(h);
            // No close: the next open has no index and scans.
            let h = History::open(dir.path(), Retention::default()).expect("open");
            totals_of(&h)
        };
        let by_id = |t: &(u64, Vec<KeptTuple>)| {
            let mut v = t.1.clone();
            v.sort_by_key(|k| k.0);
            (t.0, v)
        };
        assert_eq!(by_id(&reference), by_id(&scanned), "index and scan agree");
        assert!(
            scanned.1.len() == 6
                && scanned
                    .1
                    .iter()
                    .all(|k| k.4 == Some(0) && k.5.batch().is_some()),
            "records and bodies are in segment 0, each record listed: {scanned:?}"
        );

        let h = History::open(
            dir.path(),
            Retention {
                max_exchanges: 2,
                ..Retention::default()
            },
        )
        .expect("open");
        assert_eq!(h.len(), 2);
        assert!(h.get(ids[5]).is_ok() && h.get(ids[4]).is_ok());
        for gone in &ids[..4] {
            assert!(h.get(*gone).is_err(), "the oldest went");
        }
        assert_eq!(h.body(ids[4], Part::Request).expect("body"), [b'x'; 40]);
        assert_eq!(
            segment_files(dir.path()),
            ["0000000000.seg"],
            "still held by the newest"
        );
    }

    /// A body whose segment is gone: not found when retention took its
    /// record too (a listing or a reader raced it), a storage error when its
    /// record is still kept; a search skips it and goes on.
    #[tokio::test]
    async fn a_body_whose_segment_is_gone_is_not_found_or_an_error_and_search_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut big = b"needle".to_vec();
        big.resize(INLINE_BODY_MAX + 1, b'.');
        // One body per segment, its record in the next.
        let h = open_small(dir.path(), Retention::default(), big.len() as u64);
        let ids: Vec<ExchangeId> = (0..3).map(|_| store_kept(&h, &big)).collect();
        h.flush().await.expect("flush");
        let segment = |n: u32| dir.path().join(format!("history-bodies/{n:010}.seg"));
        // Read, then dropped by retention (record, then segment) before its
        // body is read.
        let value = h.record_value(ids[0]).expect("get").expect("kept");
        let extents = Record::decode(&value)
            .expect("decode")
            .extents(Part::Request)
            .expect("extents");
        {
            let mut totals = lock(&h.totals);
            let pos = totals.position(ids[0]).expect("kept");
            totals.sizes.remove(pos);
        }
        std::fs::remove_file(segment(0)).expect("remove segment 0");
        let segments = h.segments.as_ref().expect("on disk");
        assert!(matches!(
            h.read_segments(segments, ids[0], &extents, &mut None),
            Err(HistoryError::NotFound(_))
        ));
        std::fs::remove_file(segment(2)).expect("remove segment 2");
        let err = h.body(ids[1], Part::Request).expect_err("segment gone");
        assert!(
            matches!(&err, HistoryError::Storage(m) if m.contains("0000000002.seg")),
            "{err}"
        );
        let found = h
            .list(
                &Filter {
                    q: Some("NEEDLE".into()),
                    ..Filter::default()
                },
                None,
                10,
            )
            .expect("the search goes on");
        assert_eq!(
            found.exchanges.iter().map(|e| e.id).collect::<Vec<_>>(),
            [ids[2]]
        );
    }

    /// Records on disk go to the segments, listed in tree `records` by one
    /// batch per flush, not a sled write each. A crash (no close) finds
    /// them all again, and neither a deletion, one made before its record's
    /// flush, nor retention's evictions come back; a deletion zeroes the
    /// record's bytes in its segment.
    #[tokio::test]
    async fn records_go_to_the_segments_one_batch_per_flush_and_deletions_survive_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let retention = Retention {
            max_exchanges: 8,
            max_bytes: u64::MAX,
        };
        let secret = |i: usize| format!("secret-{i:02}-4242424242424242");
        let (ids, early) = {
            let h = History::open(dir.path(), retention).expect("open");
            let exchanges: Vec<Exchange> = (0..10)
                .map(|i| exchange("POST", &format!("/r{i}"), Some(200)))
                .collect();
            let ids: Vec<ExchangeId> = exchanges.iter().map(|e| e.id).collect();
            // Recorded at once, as concurrent deliveries are: one flush.
            let tasks: Vec<_> = exchanges
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let h = h.clone();
                    tokio::spawn(async move {
                        let body = secret(i);
                        h.record_lingering(e, &[(Part::Request, Body::Inline(body.as_bytes()))])
                            .await
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task").expect("record");
            }
            assert!(h.exchanges.is_empty(), "no record in tree `exchanges`");
            let batches = h.records.len();
            assert!(
                (1..=2).contains(&batches),
                "{batches} batches for 10 records"
            );
            // Retention kept the newest 8, and the batch lists only those.
            assert_eq!(h.len(), 8);
            let listed: usize = h
                .records
                .iter()
                .values()
                .map(|v| v.expect("batch").len() / BATCH_ENTRY)
                .sum();
            assert_eq!(listed, 8, "evicted records are no longer listed");
            assert!(h.delete(ids[5]).expect("delete"));
            // A record stored for a flush that has not run yet, deleted.
            let early = exchange("POST", "/early", Some(200));
            h.store_as(
                &early,
                &[(Part::Request, Body::Inline(b"early"))],
                Write::ByFlush,
            )
            .expect("store");
            assert_eq!(
                h.get(early.id).expect("readable before its flush").path,
                "/early"
            );
            assert!(h.delete(early.id).expect("delete"));
            // One stored for the caller's flush is listed at once.
            let before = h.records.len();
            let now = store_kept(&h, b"now");
            assert_eq!(h.records.len(), before + 1, "listed before store returns");
            assert!(h.delete(now).expect("delete"));
            h.flush_and_delete().await.expect("flush");
            h.db.flush().expect("sled flush");
            (ids, early.id)
        };
        let segments: Vec<u8> = segment_files(dir.path())
            .iter()
            .flat_map(|name| {
                std::fs::read(dir.path().join("history-bodies").join(name)).expect("read")
            })
            .collect();
        let holds = |text: &str| segments.windows(text.len()).any(|w| w == text.as_bytes());
        assert!(!holds(&secret(5)), "the deleted record was zeroed");
        assert!(holds(&secret(6)));

        // No close: the open scans the batches.
        let h = History::open(dir.path(), retention).expect("reopen");
        let kept: Vec<ExchangeId> = ids[2..]
            .iter()
            .copied()
            .filter(|id| *id != ids[5])
            .collect();
        let listed = |h: &History| {
            let page = h.list(&Filter::default(), None, 100).expect("list");
            page.exchanges.into_iter().map(|e| e.id).collect::<Vec<_>>()
        };
        assert_eq!(listed(&h), kept.iter().rev().copied().collect::<Vec<_>>());
        for gone in [ids[0], ids[1], ids[5], early] {
            assert!(matches!(h.get(gone), Err(HistoryError::NotFound(_))));
        }
        assert_eq!(
            h.body(ids[9], Part::Request).expect("body"),
            secret(9).as_bytes()
        );
        let scanned = totals_of(&h);

        // A clean close, and the open takes the index: the same records.
        h.close().await.expect("close");
        drop(h);
        let h = History::open(dir.path(), retention).expect("reopen");
        assert_eq!(totals_of(&h), scanned, "index and scan agree");
        assert_eq!(listed(&h), kept.iter().rev().copied().collect::<Vec<_>>());
        let search = Filter {
            q: Some(secret(7)),
            ..Filter::default()
        };
        let found = h.list(&search, None, 10).expect("search").exchanges;
        assert_eq!(found.iter().map(|e| e.id).collect::<Vec<_>>(), [ids[7]]);
    }

    /// A record listed before `store` returns (the outbox's queued path) is
    /// in its segment file by then: a batch never names bytes still in
    /// memory, which a kill would lose.
    #[tokio::test]
    async fn a_record_listed_at_once_is_written_before_its_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            // Gathered in memory, for the next flush.
            let lingering = exchange("POST", "/lingering-0001", Some(200));
            h.store_as(&lingering, &[], Write::ByFlush).expect("store");
            let raw = || -> Vec<u8> {
                segment_files(dir.path())
                    .iter()
                    .flat_map(|name| {
                        std::fs::read(dir.path().join("history-bodies").join(name)).expect("read")
                    })
                    .collect()
            };
            let holds = |text: &str| raw().windows(text.len()).any(|w| w == text.as_bytes());
            assert!(!holds("/lingering-0001"), "not written before a flush");
            let id = store_kept(&h, b"listed-at-once-0002");
            assert!(holds("listed-at-once-0002"), "written before it was listed");
            assert!(holds("/lingering-0001"), "and what was gathered before it");
            h.db.flush().expect("sled flush");
            id
        };
        // No flush of the segments, no close.
        let h = History::open(dir.path(), Retention::default()).expect("reopen");
        assert_eq!(
            h.body(id, Part::Request).expect("body"),
            b"listed-at-once-0002"
        );
    }

    /// Scale check, run by hand (release build; prints its figures):
    /// `cargo test --release -p relay-client --lib history_after_a_crash_at_100k -- --ignored --nocapture`.
    /// 100,000 webhooks of 1 KiB recorded by 1,000 concurrent recorders, no
    /// close (a crash), then the open (a scan of every record) and a listing
    /// of all of them in pages of 500.
    #[tokio::test]
    #[ignore = "a scale check run by hand, in release mode"]
    async fn history_after_a_crash_at_100k() {
        let dir = tempfile::tempdir().expect("tempdir");
        let retention = Retention {
            max_exchanges: 100_000,
            max_bytes: u64::MAX,
        };
        {
            let h = History::open(dir.path(), retention).expect("open");
            let body = vec![b'x'; 1024];
            let t = std::time::Instant::now();
            for _ in 0..100 {
                let tasks: Vec<_> = (0..1000)
                    .map(|_| {
                        let h = h.clone();
                        let body = body.clone();
                        tokio::spawn(async move {
                            let mut e = exchange("POST", "/x", Some(200));
                            e.request.body_len = body.len() as u64;
                            let id = e.id;
                            let mut spilled = Spilled::default();
                            h.append_body(id, Part::Request, &mut spilled, &body)
                                .expect("append");
                            h.record_lingering(
                                e,
                                &[(Part::Request, Body::Spilled(spilled.extents()))],
                            )
                            .await
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("task").expect("record");
                }
            }
            eprintln!("recorded 100k in {:?}", t.elapsed());
            // no close: a crash
        }
        let t = std::time::Instant::now();
        let h = History::open(dir.path(), retention).expect("reopen");
        eprintln!("crash open: {} exchanges in {:?}", h.len(), t.elapsed());
        assert_eq!(h.len(), 100_000);
        let t = std::time::Instant::now();
        let mut before = None;
        let mut n = 0;
        loop {
            let page = h.list(&Filter::default(), before, 500).expect("list");
            n += page.exchanges.len();
            match page.next_before {
                Some(b) => before = Some(b),
                None => break,
            }
        }
        eprintln!("listed {n} in {:?}", t.elapsed());
        assert_eq!(n, 100_000);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak: Vec<&str> = status.lines().filter(|l| l.starts_with("VmHWM")).collect();
        eprintln!("{}", peak.join(" "));
    }

    /// A store is marked with its format; one marked by a newer version is
    /// refused with an error that says so, and nothing in it is touched.
    #[tokio::test]
    async fn a_store_of_a_newer_format_is_refused_not_misread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            let id = record_with_body(&h, exchange("POST", "/a", Some(200)), b"abc").await;
            let format = h
                .settings()
                .expect("settings")
                .get(FORMAT_KEY)
                .expect("get");
            assert_eq!(format.as_deref(), Some(&STORE_FORMAT.to_be_bytes()[..]));
            h.close().await.expect("close");
            id
        };
        let bump = |format: u64| {
            let db = sled::open(dir.path().join("history")).expect("sled");
            let settings = db.open_tree("settings").expect("settings");
            settings
                .insert(FORMAT_KEY, &format.to_be_bytes())
                .expect("insert");
            db.flush().expect("flush");
        };
        bump(STORE_FORMAT + 1);
        let err = History::open(dir.path(), Retention::default()).expect_err("newer");
        assert!(
            matches!(err, HistoryError::TooNew { found, known } if found == STORE_FORMAT + 1 && known == STORE_FORMAT),
            "{err}"
        );
        assert!(err.to_string().contains("newer relay-client"), "{err}");
        // Untouched: marked back, it opens with its record and index.
        bump(STORE_FORMAT);
        let h = History::open(dir.path(), Retention::default()).expect("reopen");
        assert_eq!(h.get(id).expect("kept").path, "/a");
    }

    #[test]
    fn retention_index_of_version_1_still_reads() {
        let id = ExchangeId::new();
        let mut v1 = vec![1];
        v1.extend_from_slice(&id.key());
        v1.extend_from_slice(&42u64.to_be_bytes());
        v1.push(3);
        let (totals, newest) = Totals::decode(&v1).expect("v1");
        assert_eq!(newest, Some(id));
        assert_eq!(totals.bytes, 42);
        let kept = totals.sizes[0];
        assert!(kept.delivered && kept.chunked && kept.first_seg.is_none());
        // And version 2 round-trips a segment.
        let mut two = Totals::default();
        two.sizes.push_back(Kept {
            first_seg: Some(7),
            ..kept
        });
        let (back, _) = Totals::decode(&two.encode()).expect("v2");
        assert_eq!(back.sizes[0].first_seg, Some(7));
    }

    /// An index this version cannot read is ignored: the records are scanned.
    #[tokio::test]
    async fn unreadable_retention_index_falls_back_to_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let h = History::open(dir.path(), Retention::default()).expect("open");
            record_with_body(&h, exchange("POST", "/a", Some(200)), b"abc").await;
            record_with_body(&h, exchange("POST", "/b", Some(200)), b"de").await;
            h.close().await.expect("close");
            for bad in [
                &b"\x02whatever"[..],
                &b"\x01short"[..],
                &b""[..],
                &b"\x04"[..],
                &b"\x03short"[..],
            ] {
                assert!(Totals::decode(bad).is_none());
            }
            h.settings()
                .expect("settings")
                .insert(KEPT_INDEX_KEY, &b"\x01short"[..])
                .expect("insert");
            h.flush().await.expect("flush");
        }
        let h = History::open(dir.path(), Retention::default()).expect("reopen");
        assert_eq!(h.len(), 2);
        assert!(totals_of(&h).0 > 0);
    }
}
