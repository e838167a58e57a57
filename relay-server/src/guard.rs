//! Per-address limit on failed hellos: an address that presents too many wrong
//! tokens is refused for a while without its token being checked at all.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Failed hellos one address may make within [`FAILURE_WINDOW`].
pub(crate) const MAX_FAILURES: usize = 10;

/// The span failures are counted over, and how long a lockout lasts.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Most addresses tracked at once; beyond it the stalest entry makes room.
pub(crate) const MAX_TRACKED: usize = 10_000;

/// Counts failed hellos per source address (IPv6 per /64, since one host
/// usually owns the whole prefix) and locks out addresses that fail too often.
pub(crate) struct AttemptGuard {
    max_failures: usize,
    window: Duration,
    max_tracked: usize,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

#[derive(Default)]
struct Entry {
    /// When the recent failures happened, oldest first; at most `max_failures`.
    failures: VecDeque<Instant>,
    /// Refused without a token check until then.
    locked_until: Option<Instant>,
}

impl Entry {
    /// Whether the entry no longer affects anything at `now`.
    fn is_stale(&self, now: Instant, window: Duration) -> bool {
        self.locked_until.is_none_or(|until| until <= now)
            && self
                .failures
                .back()
                .is_none_or(|&last| now.saturating_duration_since(last) >= window)
    }

    /// The last moment this entry matters, for choosing what to evict.
    fn expires(&self, window: Duration) -> Option<Instant> {
        let last = self.failures.back().map(|&t| t + window);
        match (self.locked_until, last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A failure that was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Counted; the address may try again.
    Counted,
    /// This failure started a lockout of this length.
    LockedOut(Duration),
}

impl Default for AttemptGuard {
    fn default() -> Self {
        Self::new(MAX_FAILURES, FAILURE_WINDOW, MAX_TRACKED)
    }
}

impl AttemptGuard {
    /// At most `max_failures` failures per `window`; the failure that reaches
    /// the limit locks the address out for `window`. Tracks at most
    /// `max_tracked` addresses.
    pub(crate) fn new(max_failures: usize, window: Duration, max_tracked: usize) -> Self {
        AttemptGuard {
            max_failures: max_failures.max(1),
            window,
            max_tracked: max_tracked.max(1),
            entries: Mutex::default(),
        }
    }

    /// How much longer `ip` is locked out, if it is.
    pub(crate) fn locked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let key = key(ip);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get(&key)?;
        match entry.locked_until {
            Some(until) if until > now => Some(until - now),
            Some(_) => {
                // The lockout is over: the address starts afresh.
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Records a failed hello from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr, now: Instant) -> Failure {
        let key = key(ip);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !entries.contains_key(&key) && entries.len() >= self.max_tracked {
            self.make_room(&mut entries, now);
        }
        let entry = entries.entry(key).or_default();
        if let Some(until) = entry.locked_until {
            if until > now {
                return Failure::Counted;
            }
            *entry = Entry::default();
        }
        while entry
            .failures
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            entry.failures.pop_front();
        }
        entry.failures.push_back(now);
        if entry.failures.len() >= self.max_failures {
            entry.failures.clear();
            entry.locked_until = Some(now + self.window);
            return Failure::LockedOut(self.window);
        }
        Failure::Counted
    }

    /// Addresses currently tracked.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Drops stale entries; when none are, the one that would expire first.
    fn make_room(&self, entries: &mut HashMap<IpAddr, Entry>, now: Instant) {
        let window = self.window;
        entries.retain(|_, e| !e.is_stale(now, window));
        if entries.len() < self.max_tracked {
            return;
        }
        if let Some(victim) = entries
            .iter()
            .min_by_key(|(_, e)| e.expires(window))
            .map(|(ip, _)| *ip)
        {
            entries.remove(&victim);
        }
    }
}

/// The address an attempt is charged to: IPv4 as is (also when mapped into
/// IPv6), IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn locks_out_after_max_failures_for_one_window() {
        let guard = AttemptGuard::new(3, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(guard.failed(a, t0), Failure::Counted);
        assert_eq!(guard.failed(a, t0), Failure::Counted);
        assert_eq!(guard.locked(a, t0), None);
        assert_eq!(
            guard.failed(a, t0 + Duration::from_secs(1)),
            Failure::LockedOut(Duration::from_secs(10))
        );
        assert_eq!(
            guard.locked(a, t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(7))
        );
        // Failures while locked neither extend the lockout nor start a new one.
        assert_eq!(
            guard.failed(a, t0 + Duration::from_secs(5)),
            Failure::Counted
        );
        assert_eq!(
            guard.locked(a, t0 + Duration::from_secs(5)),
            Some(Duration::from_secs(6))
        );
        // Another address is unaffected.
        assert_eq!(guard.locked(ip("192.0.2.2"), t0), None);
        // Once the window has passed, the address starts afresh.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(guard.locked(a, later), None);
        assert_eq!(guard.failed(a, later), Failure::Counted);
        assert_eq!(guard.failed(a, later), Failure::Counted);
        assert!(matches!(guard.failed(a, later), Failure::LockedOut(_)));
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let guard = AttemptGuard::new(3, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        // Two failures per 10 s, forever, never reach three in one window.
        for i in 0..20u64 {
            let t = t0 + Duration::from_secs(i * 6);
            assert_eq!(guard.failed(a, t), Failure::Counted, "failure {i}");
            assert_eq!(guard.locked(a, t), None);
        }
        // Three within the window do.
        let t = t0 + Duration::from_secs(500);
        guard.failed(a, t);
        guard.failed(a, t + Duration::from_secs(4));
        assert!(matches!(
            guard.failed(a, t + Duration::from_secs(9)),
            Failure::LockedOut(_)
        ));
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let guard = AttemptGuard::new(2, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        guard.failed(ip("2001:db8:1:2::1"), t0);
        assert!(matches!(
            guard.failed(ip("2001:db8:1:2:ffff::9"), t0),
            Failure::LockedOut(_)
        ));
        assert!(guard.locked(ip("2001:db8:1:2::77"), t0).is_some());
        assert!(guard.locked(ip("2001:db8:1:3::1"), t0).is_none());

        guard.failed(ip("::ffff:192.0.2.9"), t0);
        assert!(matches!(
            guard.failed(ip("192.0.2.9"), t0),
            Failure::LockedOut(_)
        ));
    }

    #[test]
    fn tracked_addresses_are_capped() {
        let guard = AttemptGuard::new(2, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        let locked = ip("198.51.100.1");
        guard.failed(locked, t0);
        guard.failed(locked, t0);
        for i in 0..1_000u32 {
            let addr = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            guard.failed(addr, t0 + Duration::from_millis(u64::from(i)));
            assert!(guard.tracked() <= 100);
        }
        // Stale entries go first, so a fresh burst keeps the map small.
        let later = t0 + Duration::from_secs(60);
        guard.failed(ip("203.0.113.1"), later);
        assert!(guard.tracked() <= 100);
    }
}
