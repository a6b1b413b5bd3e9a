//! The key space shared by all connections of one `kv` capsule.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Bound;

/// How many entries one [`Store::purge_expired`] call looks at, so a capsule
/// with many keys never stalls its other connections on housekeeping.
const PURGE_BUDGET: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub value: Vec<u8>,
    pub expires_at_ms: Option<u64>,
}

impl Entry {
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|at| at > now_ms)
    }
}

/// In-memory string key space with per-key expiry. Expired keys behave as
/// missing: they are dropped when touched and reclaimed by
/// [`Store::purge_expired`].
#[derive(Debug, Default)]
pub struct Store {
    entries: BTreeMap<Vec<u8>, Entry>,
    /// Where the next purge pass resumes; `None` starts from the first key.
    purge_cursor: Option<Vec<u8>>,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries held, including expired ones not reclaimed yet.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys that have not expired at `now_ms`.
    pub fn live_len(&self, now_ms: u64) -> usize {
        self.entries.values().filter(|e| e.is_live(now_ms)).count()
    }

    /// Reclaims expired entries, examining a bounded slice of the key space
    /// per call and resuming where the previous call stopped; call it
    /// periodically. Returns how many entries were removed.
    pub fn purge_expired(&mut self, now_ms: u64) -> usize {
        let start = match &self.purge_cursor {
            Some(key) => Bound::Included(key.as_slice()),
            None => Bound::Unbounded,
        };
        let mut doomed = Vec::new();
        let mut next_cursor = None;
        for (examined, (key, entry)) in self
            .entries
            .range::<[u8], _>((start, Bound::Unbounded))
            .enumerate()
        {
            if examined == PURGE_BUDGET {
                next_cursor = Some(key.clone());
                break;
            }
            if !entry.is_live(now_ms) {
                doomed.push(key.clone());
            }
        }
        self.purge_cursor = next_cursor;
        for key in &doomed {
            self.entries.remove(key.as_slice());
        }
        doomed.len()
    }

    /// The live entry under `key`; an expired one is removed on the way.
    pub(crate) fn get_mut(&mut self, key: &[u8], now_ms: u64) -> Option<&mut Entry> {
        let live = self.entries.get(key)?.is_live(now_ms);
        if !live {
            self.entries.remove(key);
            return None;
        }
        self.entries.get_mut(key)
    }

    pub(crate) fn get(&mut self, key: &[u8], now_ms: u64) -> Option<&Entry> {
        self.get_mut(key, now_ms).map(|e| &*e)
    }

    pub(crate) fn contains(&mut self, key: &[u8], now_ms: u64) -> bool {
        self.get_mut(key, now_ms).is_some()
    }

    /// Stores `value`, reusing the existing allocations when the key exists.
    pub(crate) fn set(&mut self, key: &[u8], value: &[u8], expires_at_ms: Option<u64>) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.value.clear();
            entry.value.extend_from_slice(value);
            entry.expires_at_ms = expires_at_ms;
        } else {
            self.entries.insert(
                key.to_vec(),
                Entry {
                    value: value.to_vec(),
                    expires_at_ms,
                },
            );
        }
    }

    /// The live entry under `key`, created empty without expiry if missing.
    /// (`None` cannot happen; it only spares a panic path.)
    pub(crate) fn entry_or_empty(&mut self, key: &[u8], now_ms: u64) -> Option<&mut Entry> {
        match self.entries.get(key).map(|e| e.is_live(now_ms)) {
            Some(true) => {}
            Some(false) => {
                // Reuse the expired entry's allocations for the fresh value.
                if let Some(entry) = self.entries.get_mut(key) {
                    entry.value.clear();
                    entry.expires_at_ms = None;
                }
            }
            None => {
                self.entries.insert(
                    key.to_vec(),
                    Entry {
                        value: Vec::new(),
                        expires_at_ms: None,
                    },
                );
            }
        }
        self.entries.get_mut(key)
    }

    /// Removes `key`; true if it was live.
    pub(crate) fn remove(&mut self, key: &[u8], now_ms: u64) -> bool {
        self.entries
            .remove(key)
            .is_some_and(|entry| entry.is_live(now_ms))
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.purge_cursor = None;
    }

    pub(crate) fn live_entries(&self, now_ms: u64) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.entries
            .iter()
            .filter(move |(_, e)| e.is_live(now_ms))
            .map(|(k, e)| (k.as_slice(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn expired_entries_read_as_missing() {
        let mut store = Store::new();
        store.set(b"a", b"1", Some(100));
        assert!(store.contains(b"a", 99));
        assert!(!store.contains(b"a", 100));
        assert_eq!(store.len(), 0, "touching an expired key removes it");
    }

    #[test]
    fn purge_is_bounded_and_eventually_complete() {
        let mut store = Store::new();
        for i in 0..1000 {
            let key = format!("k{i:04}");
            store.set(key.as_bytes(), b"v", (i % 2 == 0).then_some(10));
        }
        assert_eq!(store.live_len(5), 1000);
        assert_eq!(store.live_len(10), 500);
        let mut removed = 0;
        for _ in 0..(1000 / PURGE_BUDGET + 1) {
            let now = store.purge_expired(10);
            assert!(now <= PURGE_BUDGET);
            removed += now;
        }
        assert_eq!(removed, 500);
        assert_eq!(store.len(), 500);
        assert_eq!(store.purge_expired(10), 0);
    }
}
