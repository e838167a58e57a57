//! Bodies too large to keep as sled values, one file each in a directory
//! beside the store: the relay's queue (`DATA_DIR/queue-bodies/`) and the
//! agent's outbox (`DATA_DIR/outbox-bodies/`).
//!
//! sled 0.34 holds far more of its pages in memory than its cache capacity
//! says: its LRU is split in 256 shards that each keep at least their last
//! page, and evicts only once 64 accesses to a shard have piled up. Bodies
//! stored as sled values made memory grow with the bytes stored (2,000
//! queued bodies of 256 KiB: 396 MiB of the relay's RSS, 450 MiB of the
//! agent's while it drained them), so larger bodies live in files and sled
//! keeps the small ones.
//!
//! What the stores do with them: a file is `fdatasync`ed, and the directory
//! synced once since its creation ([`BodyFiles::sync_dir`]), before the
//! record naming it is written; a removed record's file is deleted only
//! after the removal is on disk ([`BodyFiles::doom`], then
//! [`BodyFiles::take_doomed`] before a flush and [`BodyFiles::settle_doomed`]
//! after it), so a crash never leaves a
//! record whose body file is gone; files no record owns are deleted when the
//! store opens ([`BodyFiles::delete_unowned`]).

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
};

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

/// Bodies up to this size stay sled values; larger ones are a file.
pub const INLINE_BODY_BYTES: usize = 4 * 1024;

/// Whether a body of `len` bytes is kept as a file (in a store that has
/// them) rather than as a sled value.
pub fn kept_in_file(len: u64) -> bool {
    len > INLINE_BODY_BYTES as u64
}

/// Largest piece read from a body file at once.
const READ_BYTES: u64 = 64 * 1024;

/// The directory of body files and what still has to happen to it.
#[derive(Debug)]
pub struct BodyFiles {
    dir: PathBuf,
    /// Files created so far.
    created: AtomicU64,
    /// The count of `created` the last directory sync covered.
    dir_synced: Mutex<u64>,
    /// Ids whose records were removed: their files go once the removal is
    /// on disk.
    doomed: Mutex<Vec<u64>>,
}

impl BodyFiles {
    /// Opens (creating) the directory.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir)?;
        Ok(BodyFiles {
            dir,
            created: AtomicU64::new(0),
            dir_synced: Mutex::new(0),
            doomed: Mutex::new(Vec::new()),
        })
    }

    /// Where the body with this id is (or would be).
    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.body"))
    }

    /// Creates the file of a new body; the number returned is what
    /// [`BodyFiles::sync_dir`] needs to cover it.
    pub fn create(&self, id: u64) -> io::Result<(File, u64)> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.path(id))?;
        Ok((file, self.created.fetch_add(1, Ordering::SeqCst) + 1))
    }

    /// Makes the directory entries of the first `created` files durable,
    /// unless a sync that covered them has already completed.
    pub fn sync_dir(&self, created: u64) -> io::Result<()> {
        let mut synced = self
            .dir_synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *synced >= created {
            return Ok(());
        }
        let covered = self.created.load(Ordering::SeqCst);
        File::open(&self.dir)?.sync_all()?;
        *synced = covered;
        Ok(())
    }

    /// Deletes a body's file; one that is not there is fine.
    pub fn remove(&self, id: u64) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Schedules the files of removed records for deletion after the next flush.
    pub fn doom(&self, ids: impl IntoIterator<Item = u64>) {
        self.doomed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(ids);
    }

    /// The files scheduled so far, taken just before a flush; hand them to
    /// [`BodyFiles::settle_doomed`] once it is over.
    pub fn take_doomed(&self) -> Vec<u64> {
        std::mem::take(&mut *self.doomed.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// After the flush that followed [`BodyFiles::take_doomed`]: when it
    /// `flushed`, deletes those files and returns the ids whose file is gone
    /// (a failure is logged and the file left for the next start); when it
    /// did not, schedules them again for the next flush and returns none.
    pub fn settle_doomed(&self, doomed: Vec<u64>, flushed: bool) -> Vec<u64> {
        if !flushed {
            self.doom(doomed);
            return Vec::new();
        }
        doomed
            .into_iter()
            .filter(|&id| match self.remove(id) {
                Ok(()) => true,
                Err(e) => {
                    warn!(id, dir = %self.dir.display(), error = %e, "cannot delete a body file; retried at next start");
                    false
                }
            })
            .collect()
    }

    /// At open: deletes every file whose id is not in `kept` (the ids of all
    /// records). Returns how many went.
    pub fn delete_unowned(&self, kept: &HashSet<u64>) -> io::Result<u64> {
        let mut deleted = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".body"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                warn!(file = %entry.path().display(), "unexpected file among the body files left alone");
                continue;
            };
            if !kept.contains(&id) {
                self.remove(id)?;
                deleted += 1;
            }
        }
        if deleted > 0 {
            info!(deleted, dir = %self.dir.display(), "deleted body files no record owns");
        }
        Ok(deleted)
    }

    /// Files in the directory.
    pub fn count(&self) -> usize {
        fs::read_dir(&self.dir).map_or(0, |d| d.count())
    }

    /// Bytes of the files in the directory (0 when it cannot be read).
    pub fn disk_bytes(&self) -> u64 {
        fs::read_dir(&self.dir).map_or(0, |dir| {
            dir.filter_map(|entry| entry.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
    }
}

/// Reads the next piece (at most 64 KiB) of a body file with `remaining`
/// bytes still to come.
pub fn read_piece(file: &mut File, remaining: u64, path: &Path) -> io::Result<Bytes> {
    let len = usize::try_from(remaining.min(READ_BYTES)).unwrap_or(usize::MAX);
    let mut buf = BytesMut::zeroed(len);
    file.read_exact(&mut buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::other(format!(
                "body file {} ends {remaining} bytes or fewer short of its length",
                path.display()
            ))
        } else {
            e
        }
    })?;
    Ok(buf.freeze())
}
