//! Walking a sled tree without keeping what was read in memory.

/// Which way [`walk`] goes.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// Ascending keys.
    OldestFirst,
    /// Descending keys.
    NewestFirst,
}

/// The entries of `tree` after `from` (excluded; from the start when `None`)
/// in `direction`, one point read each, rather than one sled iterator over
/// them. sled 0.34 feeds its cache's LRU in batches of 64 accesses per shard
/// (of 256), and an iterator accesses each leaf once: walking a whole history
/// never completed a batch, so nothing was evicted and every leaf read stayed
/// in memory (listing 100,000 exchanges took the agent to 263 MiB). A point
/// read counts once per entry, and the cache stays near its capacity (91 MiB
/// peak for the same listing, in the same time).
pub fn walk(
    tree: &sled::Tree,
    from: Option<sled::IVec>,
    direction: Direction,
) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + '_ {
    let mut cursor = from;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let item = match (&cursor, direction) {
            (Some(key), Direction::NewestFirst) => tree.get_lt(key),
            (Some(key), Direction::OldestFirst) => tree.get_gt(key),
            (None, Direction::NewestFirst) => tree.last(),
            (None, Direction::OldestFirst) => tree.first(),
        };
        match item {
            Ok(Some((key, value))) => {
                cursor = Some(key.clone());
                Some(Ok((key, value)))
            }
            Ok(None) => {
                done = true;
                None
            }
            Err(err) => {
                done = true;
                Some(Err(err))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_reads_every_entry_once_in_either_direction() -> sled::Result<()> {
        let db = sled::Config::new().temporary(true).open()?;
        let tree = db.open_tree("t")?;
        let keys = |it: &mut dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>| {
            it.map(|r| r.map(|(k, _)| k[0]))
                .collect::<sled::Result<Vec<u8>>>()
        };
        assert!(keys(&mut walk(&tree, None, Direction::NewestFirst))?.is_empty());
        for k in [3u8, 1, 4, 2, 5] {
            tree.insert([k], vec![k; 100])?;
        }
        let from = |k: u8| Some(sled::IVec::from(&[k][..]));
        assert_eq!(
            keys(&mut walk(&tree, None, Direction::NewestFirst))?,
            [5, 4, 3, 2, 1]
        );
        assert_eq!(
            keys(&mut walk(&tree, None, Direction::OldestFirst))?,
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            keys(&mut walk(&tree, from(4), Direction::NewestFirst))?,
            [3, 2, 1]
        );
        assert_eq!(
            keys(&mut walk(&tree, from(2), Direction::OldestFirst))?,
            [3, 4, 5]
        );
        assert!(keys(&mut walk(&tree, from(5), Direction::OldestFirst))?.is_empty());
        Ok(())
    }
}
