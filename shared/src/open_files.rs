//! The open-files limit (`RLIMIT_NOFILE`), raised when a binary starts, and
//! how much of what holds a descriptor fits under it.
//!
//! Login shells and service managers commonly start a program with a soft
//! limit of 1,024 open files (macOS: 256) under a hard limit many times that,
//! and every connection holds one. Under a burst of webhooks an agent with
//! the usual 1,024 ran out while connecting to its app (deliveries answered
//! `502`, and the history's flush, which opens files too, failed for the
//! exchanges waiting on it), and a relay stopped accepting for a while. So
//! both binaries raise the soft limit to the hard one at start, as Go's
//! runtime does for its programs, and size what holds descriptors by what
//! they got: the agent the deliveries the relay may send it at once, the
//! relay its ingress connections.

/// The most asked for: Linux's default `fs.nr_open`. (`rlimit` also keeps to
/// macOS's `kern.maxfilesperproc`.)
const WANTED: u64 = 1 << 20;

/// Descriptors kept out of what [`fit`] hands out: the stores' files,
/// listeners, sockets and pipes of the process itself (about 15 when idle),
/// files opened for a moment (segments, queued bodies, a certificate), the
/// inspector's and admin API's connections.
pub const RESERVED: u64 = 128;

/// The soft open-files limit before and after [`raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// What the process was started with.
    pub before: u64,
    /// What it has now.
    pub now: u64,
}

/// Raises the soft limit to the hard limit (at most 2^20).
///
/// # Errors
/// `getrlimit` or `setrlimit` failed; the limit is as it was.
pub fn raise() -> std::io::Result<Limit> {
    let (before, _) = rlimit::Resource::NOFILE.get()?;
    let now = rlimit::increase_nofile_limit(WANTED)?;
    Ok(Limit {
        before,
        now: now.max(before),
    })
}

/// [`raise`], logged: a debug line when the limit went up, a warning (and
/// `None`) when it cannot be read or raised.
pub fn raise_logged() -> Option<Limit> {
    match raise() {
        Ok(limit) => {
            if limit.now > limit.before {
                tracing::debug!(
                    from = limit.before,
                    to = limit.now,
                    "open-files limit raised"
                );
            }
            Some(limit)
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot read or raise the open-files limit");
            None
        }
    }
}

/// How many of `wanted` things holding up to `each` descriptors each fit
/// under a soft limit of `limit` besides the [`RESERVED`] ones; never fewer
/// than `floor` (below which nothing useful runs anyway) nor more than
/// `wanted`.
pub fn fit(limit: u64, each: u64, wanted: usize, floor: usize) -> usize {
    let room = limit.saturating_sub(RESERVED) / each.max(1);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    wanted.min(room.max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_reserve_and_the_bounds() {
        assert_eq!(fit(1 << 20, 2, 4096, 64), 4096);
        assert_eq!(fit(1024, 1, 4096, 64), 1024 - 128);
        assert_eq!(fit(1024, 2, 4096, 64), (1024 - 128) / 2);
        assert_eq!(fit(1024, 1, 512, 64), 512);
        assert_eq!(fit(256, 1, 1024, 16), 128);
        assert_eq!(fit(100, 1, 1024, 16), 16);
        assert_eq!(fit(100, 1, 8, 16), 8);
        assert_eq!(fit(300, 2, 4096, 64), 86);
        assert_eq!(fit(u64::MAX, 2, 5000, 1), 5000);
        assert_eq!(
            fit(1024, 0, 5000, 1),
            1024 - 128,
            "each counts as 1 at least"
        );
    }

    #[test]
    fn raise_leaves_the_soft_limit_at_the_hard_one() {
        let limit = raise().expect("raise");
        let (soft, hard) = rlimit::Resource::NOFILE.get().expect("get");
        assert_eq!(limit.now, soft);
        assert!(limit.now >= limit.before);
        assert_eq!(soft, hard.min(WANTED).max(limit.before));
    }
}
