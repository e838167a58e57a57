//! Large bodies in a few append-only segment files instead of one file each.
//!
//! Bodies over [`super::INLINE_BODY_MAX`] are appended, piece by piece as
//! they stream past, to the current segment (`NNNNNNNNNN.seg` in
//! `history-bodies/`), which is replaced by a new one once it holds
//! [`SEGMENT_BYTES`]. A record names where its bodies went as a list of
//! [`Extent`]s. With one file per body, a 256 KiB upload cost an inode
//! created (on ext4 without a journal, a scan for recently deleted ones), four
//! opens, an fsync and later an unlink; under workload b that was up to 30 %
//! of the agent's CPU.
//!
//! A segment is deleted once no kept record and no body being written has its
//! first piece in it or in an older one: retention drops the oldest exchanges
//! first, so segments go in order. A record deleted on its own (the API's
//! `DELETE`) has its bodies overwritten with zeros at once; its space comes
//! back with its segment.
//!
//! Records (with their bodies' buffered rests) are gathered in memory and
//! written by the next flush, a write for every few dozen webhooks instead
//! of one each on the thread deliveries wait for (or, once [`PENDING_MAX`]
//! are gathered, by the next append); reads and zeroing see them there until
//! then.
//!
//! Durability: pieces are written before the records naming them are
//! listed, and synced (one `fdatasync` per segment written since the last
//! flush, the directory when a segment was created) before those lists are
//! flushed; segments are deleted only after the removal of the last record
//! naming them is on disk.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex, MutexGuard},
};

use super::lock;

/// The segment file a walk over many records or bodies keeps open between
/// reads, with its number (see [`Segments::read_in`]).
pub(crate) type OpenSegment = Option<(u32, File)>;

/// How large a segment grows before the next one is started. Smaller gives
/// space back sooner after retention; larger creates files less often
/// (under workload b, 32 MiB is a new file every quarter second).
pub(crate) const SEGMENT_BYTES: u64 = 32 << 20;

/// Bytes of records gathered in memory at which the next append writes them
/// first: about a flush's worth (10 ms) of 1 KiB webhooks at 10,000 a
/// second. Also the bound on what a failing disk leaves in memory.
pub(crate) const PENDING_MAX: usize = 256 << 10;

/// A run's buffer: room for [`PENDING_MAX`] and one more record with a body
/// rest of up to a piece, so that it is not grown on the way.
const RUN_CAPACITY: usize = PENDING_MAX + (80 << 10);

/// Buffers kept for reuse.
const SPARE_RUNS: usize = 2;

/// Where one piece of a body is: segment, offset, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    seg: u32,
    off: u64,
    len: u32,
}

/// Bytes of one encoded [`Extent`]: segment (u32), offset (u64), length
/// (u32), big-endian.
pub(crate) const EXTENT_BYTES: usize = 16;

impl Extent {
    pub(crate) fn encode_into(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seg.to_be_bytes());
        out.extend_from_slice(&self.off.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    /// One extent: `bytes` holds exactly one.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Extent> {
        match Self::decode_all(bytes)?.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// `None` unless `bytes` is a whole number of extents.
    pub(crate) fn decode_all(bytes: &[u8]) -> Option<Vec<Extent>> {
        if !bytes.len().is_multiple_of(EXTENT_BYTES) {
            return None;
        }
        bytes
            .chunks_exact(EXTENT_BYTES)
            .map(|e| {
                Some(Extent {
                    seg: u32::from_be_bytes(e.get(0..4)?.try_into().ok()?),
                    off: u64::from_be_bytes(e.get(4..12)?.try_into().ok()?),
                    len: u32::from_be_bytes(e.get(12..16)?.try_into().ok()?),
                })
            })
            .collect()
    }

    pub(crate) fn seg(self) -> u32 {
        self.seg
    }
}

/// A body being written to the segments: where its pieces went, and a hold
/// on the segment of its first piece until it is dropped (so that the
/// segment outlives the body's wait for its record).
#[derive(Debug, Default)]
pub struct Spilled {
    extents: Vec<Extent>,
    hold: Option<Hold>,
    /// Pieces written, for stores that keep them in sled instead.
    pub(crate) pieces: u32,
}

impl Spilled {
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
}

/// One count on a segment in [`Segments::held`], given back on drop.
#[derive(Debug)]
struct Hold {
    log: Arc<Segments>,
    seg: u32,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.log.release(self.seg);
    }
}

/// The segment files of one store.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    segment_bytes: u64,
    state: Mutex<State>,
    /// Held while gathered bytes are taken and written, and while a body is
    /// zeroed: a zeroed record is never written again from memory.
    io: Mutex<()>,
    /// The thread deleting the segments [`Segments::collect_later`] gives
    /// it, started on first use.
    deleter: Mutex<Option<mpsc::Sender<Deletion>>>,
}

/// Work for the deleting thread.
#[derive(Debug)]
enum Deletion {
    File(PathBuf),
    /// Answered once every file sent before it is deleted.
    Done(mpsc::Sender<()>),
}

/// Bytes appended but not yet written: one contiguous run of a segment.
#[derive(Clone, Debug)]
struct Run {
    seg: u32,
    off: u64,
    file: Arc<File>,
    bytes: Vec<u8>,
}

impl Run {
    /// Whether bytes appended at `off` of segment `seg` follow this run.
    fn ends_at(&self, seg: u32, off: u64) -> bool {
        self.seg == seg && self.off + self.bytes.len() as u64 == off
    }

    /// Where `e`'s bytes are in this run, if they are.
    fn range(&self, e: Extent) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(e.off.checked_sub(self.off)?).ok()?;
        let end = start.checked_add(e.len as usize)?;
        (self.seg == e.seg && end <= self.bytes.len()).then_some(start..end)
    }

    /// Copies `e`'s bytes into `out` if the run holds them.
    fn copy(&self, e: Extent, out: &mut [u8]) -> bool {
        match self.range(e).and_then(|r| self.bytes.get(r)) {
            Some(bytes) if bytes.len() == out.len() => {
                out.copy_from_slice(bytes);
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The segment appended to; `None` until the first append after an open
    /// or a [`Segments::retire_all`].
    active: Option<Active>,
    /// The number the next new segment gets.
    next: u32,
    on_disk: BTreeSet<u32>,
    /// Segments written since the last sync.
    dirty: BTreeMap<u32, Arc<File>>,
    /// A segment was created since the last sync.
    dir_dirty: bool,
    /// Per segment, the kept records and bodies in progress whose first
    /// piece is in it.
    held: BTreeMap<u32, u64>,
    /// Records appended and not yet written, oldest first.
    pending: Vec<Run>,
    pending_bytes: usize,
    /// Runs being written, still read from memory until they are.
    writing: Option<Arc<Vec<Run>>>,
    /// Buffers of runs written, for the next runs: their pages stay mapped
    /// (a fresh buffer's page faults landed on the delivery that started it).
    spare: Vec<Vec<u8>>,
}

impl State {
    fn hold(&mut self, seg: u32) {
        *self.held.entry(seg).or_default() += 1;
    }

    fn release(&mut self, seg: u32) {
        if let Some(count) = self.held.get_mut(&seg) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(&seg);
            }
        }
    }
}

#[derive(Debug)]
struct Active {
    seg: u32,
    file: Arc<File>,
    len: u64,
}

impl Segments {
    /// Opens the segments in `dir` (created if missing); appends go to a new
    /// one. Nothing is held until [`Segments::hold`] says so.
    pub(crate) fn open(dir: &Path, segment_bytes: u64) -> io::Result<Segments> {
        std::fs::create_dir_all(dir)?;
        let mut on_disk = BTreeSet::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(seg) = Self::number(&entry?.file_name()) {
                on_disk.insert(seg);
            }
        }
        let next = on_disk.last().map_or(0, |last| last.saturating_add(1));
        Ok(Segments {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1),
            state: Mutex::new(State {
                next,
                on_disk,
                ..State::default()
            }),
            io: Mutex::new(()),
            deleter: Mutex::new(None),
        })
    }

    fn number(name: &std::ffi::OsStr) -> Option<u32> {
        let digits = name.to_str()?.strip_suffix(".seg")?;
        if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    fn path(&self, seg: u32) -> PathBuf {
        self.dir.join(format!("{seg:010}.seg"))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Counts a kept record whose first piece is in `seg`.
    pub(crate) fn hold(&self, seg: u32) {
        self.state().hold(seg);
    }

    /// Gives back a count of [`Segments::hold`].
    pub(crate) fn release(&self, seg: u32) {
        self.state().release(seg);
    }

    /// Forgets every kept record (the store was cleared) and starts a new
    /// segment with the next append, so that every older segment not held
    /// by a body in progress goes at the next [`Segments::collect`].
    pub(crate) fn retire_all(&self, kept: impl IntoIterator<Item = u32>) {
        let mut state = self.state();
        for seg in kept {
            state.release(seg);
        }
        state.active = None;
    }

    /// Appends one piece of `body`.
    pub(crate) fn append(self: &Arc<Self>, body: &mut Spilled, chunk: &[u8]) -> io::Result<()> {
        let len = piece_len(chunk)?;
        let (seg, off, file) = {
            let mut state = self.state();
            let at = self.reserve(&mut state, u64::from(len))?;
            // Held from before the write: a segment no longer active is
            // deleted as soon as nothing holds it.
            self.hold_for(&mut state, body, at.0);
            at
        };
        write_at(&file, chunk, off)?;
        // Marked after the write, so the next sync covers it.
        self.state().dirty.insert(seg, file);
        match body.extents.last_mut() {
            Some(last) if last.seg == seg && last.off + u64::from(last.len) == off => {
                match last.len.checked_add(len) {
                    Some(joined) => last.len = joined,
                    None => body.extents.push(Extent { seg, off, len }),
                }
            }
            _ => body.extents.push(Extent { seg, off, len }),
        }
        Ok(())
    }

    /// Appends the rests of a record's bodies (`tails`, one after the other)
    /// and then the record, which `encode` makes once it knows where the
    /// tails went, to the bytes gathered for the next write
    /// ([`Segments::write_pending`]): a webhook whose body is still
    /// buffered costs no `pwrite` of its own. Returns the tails' extents (one
    /// each, in order) and the record's; `held` holds their segment.
    pub(crate) fn append_record(
        self: &Arc<Self>,
        held: &mut Spilled,
        tails: &[&[u8]],
        encode: impl FnOnce(&[Extent]) -> io::Result<Vec<u8>>,
    ) -> io::Result<(Vec<Extent>, Extent)> {
        let mut extents = Vec::with_capacity(tails.len());
        // Written first when full (a flush is late, or writing failed), so
        // that memory holds at most one more record than the limit whatever
        // the disk does (if they cannot be, this record is refused), and when
        // this record would not follow them (a large body's pieces went in
        // between, or a new segment): otherwise, under workload b, nearly
        // every record would start a run, and a buffer, of its own.
        let write_first = {
            let state = self.state();
            let follows = match (state.pending.last(), &state.active) {
                (None, _) => true,
                (Some(run), Some(active)) => {
                    run.ends_at(active.seg, active.len) && active.len < self.segment_bytes
                }
                (Some(_), None) => false,
            };
            state.pending_bytes >= PENDING_MAX || !follows
        };
        if write_first {
            self.write_pending()?;
        }
        let record = {
            let mut state = self.state();
            // Reserved empty first: the record's length is known only once
            // it names where the tails go.
            let (seg, start, file) = self.reserve(&mut state, 0)?;
            let mut at = start;
            for tail in tails {
                let len = piece_len(tail)?;
                extents.push(Extent { seg, off: at, len });
                at += u64::from(len);
            }
            let encoded = encode(&extents)?;
            let record = Extent {
                seg,
                off: at,
                len: piece_len(&encoded)?,
            };
            at += u64::from(record.len);
            if let Some(active) = state.active.as_mut().filter(|a| a.seg == seg) {
                active.len = at;
            }
            self.hold_for(&mut state, held, seg);
            let state = &mut *state;
            let run = match state.pending.last_mut() {
                Some(run) if run.ends_at(seg, start) => run,
                _ => {
                    let bytes = state
                        .spare
                        .pop()
                        .unwrap_or_else(|| Vec::with_capacity(RUN_CAPACITY));
                    state.pending.push(Run {
                        seg,
                        off: start,
                        file,
                        bytes,
                    });
                    state
                        .pending
                        .last_mut()
                        .ok_or_else(|| io::Error::other("no pending run"))?
                }
            };
            let before = run.bytes.len();
            for tail in tails {
                run.bytes.extend_from_slice(tail);
            }
            run.bytes.extend_from_slice(&encoded);
            state.pending_bytes += run.bytes.len() - before;
            record
        };
        held.extents.push(record);
        Ok((extents, record))
    }

    /// Writes the records gathered in memory (one `pwrite` per contiguous
    /// run), to be covered by the next [`Segments::sync`].
    pub(crate) fn write_pending(&self) -> io::Result<()> {
        let _io = lock(&self.io);
        self.write_pending_locked()
    }

    /// [`Segments::write_pending`] for a caller holding `io`.
    fn write_pending_locked(&self) -> io::Result<()> {
        let runs = {
            let mut state = self.state();
            if state.pending.is_empty() {
                return Ok(());
            }
            state.pending_bytes = 0;
            let runs = Arc::new(std::mem::take(&mut state.pending));
            state.writing = Some(Arc::clone(&runs));
            runs
        };
        let written = runs
            .iter()
            .try_for_each(|run| write_at(&run.file, &run.bytes, run.off));
        let mut state = self.state();
        state.writing = None;
        match written {
            Ok(()) => {
                // Marked once written, so the next sync covers them.
                for run in runs.iter() {
                    state.dirty.insert(run.seg, Arc::clone(&run.file));
                }
                if let Ok(runs) = Arc::try_unwrap(runs) {
                    for mut run in runs {
                        if state.spare.len() < SPARE_RUNS && run.bytes.capacity() <= RUN_CAPACITY {
                            run.bytes.clear();
                            state.spare.push(run.bytes);
                        }
                    }
                }
                Ok(())
            }
            Err(err) => {
                // Kept for the next try, and for readers meanwhile.
                let mut back = Arc::unwrap_or_clone(runs);
                back.append(&mut state.pending);
                state.pending_bytes = back.iter().map(|r| r.bytes.len()).sum();
                state.pending = back;
                Err(err)
            }
        }
    }

    /// Copies `e`'s bytes into `out` if they are still in memory.
    fn copy_buffered(&self, e: Extent, out: &mut [u8]) -> bool {
        let state = self.state();
        state
            .pending
            .iter()
            .chain(state.writing.iter().flat_map(|w| w.iter()))
            .any(|run| run.copy(e, out))
    }

    /// Where the next `len` bytes go in the active segment (a new one when
    /// there is none or it is full), reserved.
    fn reserve(&self, state: &mut State, len: u64) -> io::Result<(u32, u64, Arc<File>)> {
        if state
            .active
            .as_ref()
            .is_none_or(|a| a.len >= self.segment_bytes)
        {
            let seg = state.next;
            let next = seg
                .checked_add(1)
                .filter(|n| *n < u32::MAX)
                .ok_or_else(|| io::Error::other("out of segment numbers"))?;
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .open(self.path(seg))?;
            state.next = next;
            state.on_disk.insert(seg);
            state.dir_dirty = true;
            state.active = Some(Active {
                seg,
                file: Arc::new(file),
                len: 0,
            });
        }
        let Some(active) = state.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        let at = (active.seg, active.len, Arc::clone(&active.file));
        active.len += len;
        Ok(at)
    }

    /// Makes `body` hold segment `seg` unless it holds one already.
    fn hold_for(self: &Arc<Self>, state: &mut State, body: &mut Spilled, seg: u32) {
        if body.hold.is_none() {
            state.hold(seg);
            body.hold = Some(Hold {
                log: Arc::clone(self),
                seg,
            });
        }
    }

    /// Bytes of the segment files on disk.
    pub(crate) fn disk_bytes(&self) -> u64 {
        let segs: Vec<u32> = self.state().on_disk.iter().copied().collect();
        segs.into_iter()
            .filter_map(|seg| std::fs::metadata(self.path(seg)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Reads a body back.
    pub(crate) fn read(&self, extents: &[Extent]) -> io::Result<Vec<u8>> {
        self.read_in(extents, &mut None)
    }

    /// [`Segments::read`], reading from `open` when it is the segment wanted
    /// and leaving there the last segment opened: a walk over many records
    /// (a listing, the scan at open) opens each segment once, not once per
    /// record.
    pub(crate) fn read_in(
        &self,
        extents: &[Extent],
        open: &mut OpenSegment,
    ) -> io::Result<Vec<u8>> {
        let total: usize = extents.iter().map(|e| e.len as usize).sum();
        let mut out = vec![0; total];
        let mut at = 0;
        for e in extents {
            let end = at + e.len as usize;
            if self.copy_buffered(*e, &mut out[at..end]) {
                at = end;
                continue;
            }
            if open.as_ref().is_none_or(|(seg, _)| *seg != e.seg) {
                let file = File::open(self.path(e.seg)).map_err(|err| {
                    io::Error::new(err.kind(), format!("body segment {:010}.seg: {err}", e.seg))
                })?;
                *open = Some((e.seg, file));
            }
            if let Some((_, file)) = open.as_ref() {
                read_at(file, &mut out[at..end], e.off)?;
                at = end;
            }
        }
        Ok(out)
    }

    /// Overwrites a deleted body with zeros (its space comes back with its
    /// segment). A segment already gone is skipped.
    pub(crate) fn zero(&self, extents: &[Extent]) -> io::Result<()> {
        // Nothing is written from memory meanwhile (writes hold `io`): a
        // record still in memory is zeroed there, before it is written.
        let _io = lock(&self.io);
        let zeros = vec![0u8; 64 * 1024];
        for e in extents {
            let in_memory = {
                let mut state = self.state();
                let run = state.pending.iter_mut().find_map(|run| {
                    let range = run.range(*e)?;
                    run.bytes.get_mut(range)
                });
                run.map(|bytes| bytes.fill(0)).is_some()
            };
            if in_memory {
                continue;
            }
            let file = match std::fs::OpenOptions::new()
                .write(true)
                .open(self.path(e.seg))
            {
                Ok(file) => Arc::new(file),
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            let mut left = e.len as usize;
            let mut off = e.off;
            while left > 0 {
                let n = left.min(zeros.len());
                write_at(&file, &zeros[..n], off)?;
                left -= n;
                off += n as u64;
            }
            self.state().dirty.entry(e.seg).or_insert(file);
        }
        Ok(())
    }

    /// Makes every piece appended (or zeroed) so far durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.write_pending()?;
        let (dirty, dir_dirty) = {
            let mut state = self.state();
            (
                std::mem::take(&mut state.dirty),
                std::mem::take(&mut state.dir_dirty),
            )
        };
        let put_back = |err: io::Error, dirty: BTreeMap<u32, Arc<File>>| {
            let mut state = self.state();
            for (seg, file) in dirty {
                state.dirty.entry(seg).or_insert(file);
            }
            state.dir_dirty |= dir_dirty;
            err
        };
        for file in dirty.values() {
            if let Err(err) = file.sync_data() {
                return Err(put_back(err, dirty));
            }
        }
        if dir_dirty {
            if let Err(err) = File::open(&self.dir).and_then(|d| d.sync_all()) {
                return Err(put_back(err, dirty));
            }
        }
        Ok(())
    }

    /// The oldest segment still needed: anything older may be deleted once
    /// the removals made so far are on disk (see [`Segments::collect`]).
    pub(crate) fn needed_from(&self) -> u32 {
        let state = self.state();
        let current = state.active.as_ref().map_or(state.next, |a| a.seg);
        state
            .held
            .first_key_value()
            .map_or(current, |(seg, _)| current.min(*seg))
    }

    /// Whether a segment older than `needed_from` is on disk.
    pub(crate) fn any_before(&self, needed_from: u32) -> bool {
        self.state()
            .on_disk
            .first()
            .is_some_and(|oldest| *oldest < needed_from)
    }

    /// Deletes the segments older than `needed_from`, which
    /// [`Segments::needed_from`] gave before the store's last flush.
    pub(crate) fn collect(&self, needed_from: u32) -> io::Result<()> {
        for seg in self.forget_before(needed_from) {
            remove(&self.path(seg))?;
        }
        Ok(())
    }

    /// [`Segments::collect`] without waiting for the files to go: they are
    /// no longer part of the store at once, and a thread of their own
    /// deletes them. Deleting a 32 MiB file took 17-20 ms on this project's
    /// machine (ext4 mounted with `discard`: the blocks are trimmed then),
    /// and the group commit's flush, which every recorded exchange waits on,
    /// deleted up to a dozen at a time when retention dropped large bodies:
    /// flushes of 100-240 ms, records piling up in memory meanwhile. Files
    /// not deleted when the process ends are deleted by the next open.
    pub(crate) fn collect_later(&self, needed_from: u32) -> io::Result<()> {
        let gone = self.forget_before(needed_from);
        if gone.is_empty() {
            return Ok(());
        }
        let deleter = self.deleter();
        for seg in gone {
            let path = self.path(seg);
            let path = match &deleter {
                Some(tx) => match tx.send(Deletion::File(path)) {
                    Ok(()) => continue,
                    Err(mpsc::SendError(Deletion::File(path))) => path,
                    Err(_) => continue,
                },
                None => path,
            };
            remove(&path)?;
        }
        Ok(())
    }

    /// Waits until the files [`Segments::collect_later`] was given are
    /// deleted.
    pub(crate) fn wait_deleted(&self) {
        let Some(tx) = lock(&self.deleter).clone() else {
            return;
        };
        let (done, deleted) = mpsc::channel();
        if tx.send(Deletion::Done(done)).is_ok() {
            let _ = deleted.recv();
        }
    }

    /// Takes the segments older than `needed_from` out of the store.
    fn forget_before(&self, needed_from: u32) -> Vec<u32> {
        let mut state = self.state();
        let kept = state.on_disk.split_off(&needed_from);
        let gone = std::mem::replace(&mut state.on_disk, kept);
        for seg in &gone {
            state.dirty.remove(seg);
        }
        gone.into_iter().collect()
    }

    /// The deleting thread's queue; `None` if it cannot be started (the
    /// caller deletes then).
    fn deleter(&self) -> Option<mpsc::Sender<Deletion>> {
        let mut deleter = lock(&self.deleter);
        if deleter.is_none() {
            let (tx, rx) = mpsc::channel::<Deletion>();
            let spawned = std::thread::Builder::new()
                .name("history-delete".into())
                .spawn(move || {
                    for job in rx {
                        match job {
                            Deletion::File(path) => {
                                if let Err(err) = remove(&path) {
                                    tracing::warn!(
                                        path = %path.display(),
                                        error = %err,
                                        "cannot delete a history segment (the next start tries again)"
                                    );
                                }
                            }
                            Deletion::Done(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                });
            if spawned.is_ok() {
                *deleter = Some(tx);
            }
        }
        deleter.clone()
    }
}

/// Deletes a segment file; one already gone is no error.
fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// `bytes`'s length as a piece's, which is at most 4 GiB.
fn piece_len(bytes: &[u8]) -> io::Result<u32> {
    u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a body piece over 4 GiB"))
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, off)
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, off)
}

#[cfg(windows)]
fn write_at(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, buf, off)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_read(file, buf, off)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Arc<Segments>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let segments = Segments::open(dir.path(), SEGMENT_BYTES).expect("open");
        (dir, Arc::new(segments))
    }

    /// The flush's way: the segments leave the store at once, their files
    /// a moment later, on a thread of their own; waiting for it is possible.
    #[test]
    fn collect_later_forgets_at_once_and_deletes_on_its_own_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in 0..4u32 {
            std::fs::write(dir.path().join(format!("{n:010}.seg")), b"x").expect("write");
        }
        let segments = Segments::open(dir.path(), SEGMENT_BYTES).expect("open");
        assert!(segments.any_before(3));
        segments.collect_later(3).expect("collect");
        assert!(!segments.any_before(3), "out of the store at once");
        segments.wait_deleted();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["0000000003.seg"]);
        // A file already gone is no error; nothing to do is nothing done.
        std::fs::remove_file(dir.path().join("0000000003.seg")).expect("remove");
        segments.collect_later(4).expect("collect");
        segments.collect_later(4).expect("again");
        segments.wait_deleted();
    }

    fn on_disk(dir: &tempfile::TempDir) -> Vec<u8> {
        std::fs::read(dir.path().join("0000000000.seg")).expect("segment")
    }

    /// Appends a record of `record` after `tails`; its extents and hold.
    fn record(
        segments: &Arc<Segments>,
        tails: &[&[u8]],
        record: &[u8],
    ) -> (Vec<Extent>, Extent, Spilled) {
        let mut held = Spilled::default();
        let (tails, at) = segments
            .append_record(&mut held, tails, |_| Ok(record.to_vec()))
            .expect("append");
        (tails, at, held)
    }

    #[test]
    fn records_are_written_by_the_next_sync_and_read_from_memory_until_then() {
        let (dir, segments) = open();
        let (tails, first, _h1) = record(&segments, &[b"body-one"], b"record-one");
        let (_, second, _h2) = record(&segments, &[], b"record-two");
        assert!(on_disk(&dir).is_empty(), "nothing written before the sync");
        assert_eq!(segments.state().pending.len(), 1, "one run for both");
        assert_eq!(segments.read(&tails).expect("read"), b"body-one");
        assert_eq!(segments.read(&[first]).expect("read"), b"record-one");
        assert_eq!(segments.read(&[second]).expect("read"), b"record-two");
        // A large body's piece is written at once; the record after it does
        // not follow the run, which goes first.
        let mut body = Spilled::default();
        segments.append(&mut body, b"piece").expect("piece");
        let (_, third, _h3) = record(&segments, &[], b"record-three");
        assert_eq!(on_disk(&dir), b"body-onerecord-onerecord-twopiece");
        assert_eq!(segments.state().pending.len(), 1);
        assert_eq!(segments.read(&[third]).expect("read"), b"record-three");
        assert_eq!(
            segments.read(body.extents()).expect("read"),
            b"piece".to_vec()
        );

        segments.sync().expect("sync");
        assert_eq!(
            on_disk(&dir),
            b"body-onerecord-onerecord-twopiecerecord-three"
        );
        assert!(segments.state().pending.is_empty());
        assert!(segments.state().dirty.is_empty(), "the sync covered them");
        assert_eq!(segments.read(&[third]).expect("read"), b"record-three");
        // Another store's reads (an open after a crash) see the same bytes.
        drop(segments);
        let reopened = Segments::open(dir.path(), SEGMENT_BYTES).expect("reopen");
        assert_eq!(reopened.read(&[first]).expect("read"), b"record-one");
    }

    #[test]
    fn a_record_zeroed_before_it_is_written_never_reaches_the_disk() {
        let (dir, segments) = open();
        let (_, written, _h1) = record(&segments, &[], b"written-secret");
        segments.sync().expect("sync");
        let (tails, at, _h2) = record(&segments, &[b"secret-body"], b"secret-record");
        segments.zero(&tails).expect("zero");
        segments.zero(&[at, written]).expect("zero");
        assert_eq!(
            on_disk(&dir),
            [0u8; 14],
            "zeroed in the file, and in memory"
        );
        segments.sync().expect("sync");
        let raw = on_disk(&dir);
        assert_eq!(raw.len(), "written-secretsecret-bodysecret-record".len());
        assert!(raw.iter().all(|b| *b == 0), "{raw:?}");
        assert!(segments.read(&[at]).expect("read").iter().all(|b| *b == 0));
    }

    #[test]
    fn the_append_after_the_buffer_is_full_writes_it() {
        let (dir, segments) = open();
        let big = vec![7u8; PENDING_MAX / 4];
        let mut holds = Vec::new();
        for _ in 0..4 {
            holds.push(record(&segments, &[], &big));
        }
        assert!(on_disk(&dir).is_empty(), "nothing written up to the limit");
        holds.push(record(&segments, &[], b"fifth"));
        assert_eq!(
            on_disk(&dir).len(),
            PENDING_MAX,
            "the fifth wrote the first four"
        );
        assert_eq!(segments.state().pending_bytes, "fifth".len());
        assert!(segments.state().dirty.contains_key(&0), "for the next sync");
        // Written buffers are the next runs'.
        assert!(segments.state().spare.is_empty(), "the fifth's run took it");
        segments.sync().expect("sync");
        assert_eq!(segments.state().spare.len(), 1);
        let (_, at, _held) = record(&segments, &[], b"sixth");
        assert!(segments.state().spare.is_empty(), "the sixth's run took it");
        assert_eq!(segments.read(&[at]).expect("read"), b"sixth");
        segments.sync().expect("sync");
        assert!(on_disk(&dir).ends_with(b"fifthsixth"));
    }
}
