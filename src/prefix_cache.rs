//! The prefix cache's index: which token sequences have their KV saved, in LRU order, under
//! a byte budget. Pure CPU: the scheduler decides with it, and the runner keeps the KV
//! itself, keyed by [`EntryId`] (see `Runner::save_prefix`).
//!
//! An entry holds the KV of exactly its tokens. Because attention is causal, the KV of an
//! entry's first `k` tokens is the KV of any sequence that starts with those `k` tokens, so
//! a new prompt reuses the longest common prefix it shares with any entry (after mlx-lm's
//! prompt cache, which keeps whole sequences too). Entries are whole sequences rather than
//! shared blocks: an entry whose tokens are a prefix of a new one is dropped when the new one
//! is stored (it adds nothing), and an entry that already covers new tokens is kept instead.
//!
//! Running requests never read an entry: a prompt's cached prefix is copied into its prefill
//! group when the group starts, so eviction can never pull KV from under a request.

/// Names one entry's KV in the runner.
pub type EntryId = u64;

/// What [`PrefixIndex::insert`] decided: store the KV of the first `len` tokens under `id`,
/// after dropping the entries in `evict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub id: EntryId,
    pub len: usize,
    pub evict: Vec<EntryId>,
}

/// Engine-wide prefix-cache counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Admitted requests that reused a cached prefix.
    pub hits: u64,
    /// Prompt tokens those requests did not compute.
    pub hit_tokens: u64,
    /// Bytes the entries hold.
    pub bytes: usize,
    pub entries: usize,
    /// Entries dropped to stay within the budget.
    pub evictions: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    id: EntryId,
    tokens: Vec<u32>,
    /// Logical time of the last store or use (LRU).
    used: u64,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    budget: usize,
    column_bytes: usize,
    entries: Vec<Entry>,
    next_id: EntryId,
    clock: u64,
    hits: u64,
    hit_tokens: u64,
    evictions: u64,
}

/// Length of the common prefix of `a` and `b`.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixIndex {
    /// An index for entries costing `column_bytes` per token, holding at most `budget` bytes
    /// (0: the cache is off).
    pub fn new(budget: usize, column_bytes: usize) -> Self {
        Self {
            budget,
            column_bytes: column_bytes.max(1),
            entries: Vec::new(),
            next_id: 1,
            clock: 0,
            hits: 0,
            hit_tokens: 0,
            evictions: 0,
        }
    }

    /// Whether anything can be stored at all.
    pub fn enabled(&self) -> bool {
        self.budget >= self.column_bytes
    }

    /// Most tokens one entry may hold.
    fn max_tokens(&self) -> usize {
        self.budget / self.column_bytes
    }

    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum::<usize>() * self.column_bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            hits: self.hits,
            hit_tokens: self.hit_tokens,
            bytes: self.bytes(),
            entries: self.entries.len(),
            evictions: self.evictions,
        }
    }

    /// The entry sharing the longest prefix with `tokens`, and that length (> 0). Ties go to
    /// the most recently used entry. Does not count as a use.
    pub fn longest(&self, tokens: &[u32]) -> Option<(EntryId, usize)> {
        self.entries
            .iter()
            .map(|e| (e, common_prefix(&e.tokens, tokens)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(e, n)| (n, e.used))
            .map(|(e, n)| (e.id, n))
    }

    /// The tokens of entry `id`, if held.
    pub fn tokens(&self, id: EntryId) -> Option<&[u32]> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.tokens.as_slice())
    }

    /// Records that a request reused `tokens` tokens of entry `id` (LRU and counters).
    pub fn record_hit(&mut self, id: EntryId, tokens: usize) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.used = self.clock;
        }
        self.hits += 1;
        self.hit_tokens += tokens as u64;
    }

    /// Plans storing the KV of `tokens` (truncated to what the budget can hold), evicting
    /// least recently used entries, never one in `pinned`. None when nothing needs storing:
    /// the cache is off, an entry already covers these tokens (it counts as used), or the
    /// budget cannot make room without touching a pinned entry. The index reflects the plan
    /// at once; the caller must carry it out (or [`remove`](Self::remove) the new entry).
    pub fn insert(&mut self, tokens: &[u32], pinned: &[EntryId]) -> Option<Insert> {
        if !self.enabled() || tokens.is_empty() {
            return None;
        }
        let tokens = &tokens[..tokens.len().min(self.max_tokens())];
        self.clock += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(tokens))
        {
            e.used = self.clock;
            return None;
        }
        // Entries the new one covers add nothing (unless pinned: still to be copied from).
        let mut evict: Vec<EntryId> = self
            .entries
            .iter()
            .filter(|e| tokens.starts_with(&e.tokens) && !pinned.contains(&e.id))
            .map(|e| e.id)
            .collect();
        let subsumed = evict.len();
        let mut held = self.bytes() - self.bytes_of(&evict);
        let need = tokens.len() * self.column_bytes;
        if held + need > self.budget {
            let mut by_age: Vec<&Entry> = self
                .entries
                .iter()
                .filter(|e| !evict.contains(&e.id) && !pinned.contains(&e.id))
                .collect();
            by_age.sort_by_key(|e| e.used);
            for e in by_age {
                if held + need <= self.budget {
                    break;
                }
                held -= e.tokens.len() * self.column_bytes;
                evict.push(e.id);
            }
            if held + need > self.budget {
                return None;
            }
        }
        self.evictions += (evict.len() - subsumed) as u64;
        self.entries.retain(|e| !evict.contains(&e.id));
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            tokens: tokens.to_vec(),
            used: self.clock,
        });
        Some(Insert {
            id,
            len: tokens.len(),
            evict,
        })
    }

    fn bytes_of(&self, ids: &[EntryId]) -> usize {
        self.entries
            .iter()
            .filter(|e| ids.contains(&e.id))
            .map(|e| e.tokens.len() * self.column_bytes)
            .sum()
    }

    /// Forgets one entry (its KV could not be stored).
    pub fn remove(&mut self, id: EntryId) {
        self.entries.retain(|e| e.id != id);
    }

    /// Forgets every entry; returns their ids.
    pub fn clear(&mut self) -> Vec<EntryId> {
        self.entries.drain(..).map(|e| e.id).collect()
    }

    /// Every entry as (id, tokens), least recently used first.
    pub fn entries(&self) -> Vec<(EntryId, &[u32])> {
        let mut all: Vec<&Entry> = self.entries.iter().collect();
        all.sort_by_key(|e| e.used);
        all.into_iter()
            .map(|e| (e.id, e.tokens.as_slice()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_common_prefix_wins_and_covered_inserts_are_skipped() {
        let mut ix = PrefixIndex::new(1000, 10);
        let a = ix.insert(&[1, 2, 3, 4], &[]).unwrap();
        assert_eq!((a.len, a.evict.len()), (4, 0));
        assert_eq!(ix.longest(&[1, 2, 3, 9]), Some((a.id, 3)));
        assert_eq!(ix.longest(&[1, 2, 3, 4, 5]), Some((a.id, 4)));
        assert_eq!(ix.longest(&[7]), None);
        // Covered by the entry: nothing to store.
        assert_eq!(ix.insert(&[1, 2], &[]), None);
        // Extends it: the old entry goes.
        let b = ix.insert(&[1, 2, 3, 4, 5, 6], &[]).unwrap();
        assert_eq!(b.evict, vec![a.id]);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.bytes(), 60);
        // Diverges: both kept.
        let c = ix.insert(&[1, 2, 8], &[]).unwrap();
        assert!(c.evict.is_empty());
        assert_eq!(ix.longest(&[1, 2, 8, 8]), Some((c.id, 3)));
    }

    #[test]
    fn evicts_least_recently_used_within_budget_and_spares_pinned() {
        let mut ix = PrefixIndex::new(100, 10); // 10 tokens
        let a = ix.insert(&[1; 4], &[]).unwrap();
        let b = ix.insert(&[2; 4], &[]).unwrap();
        ix.record_hit(a.id, 4); // b is now the oldest
        let c = ix.insert(&[3; 4], &[]).unwrap();
        assert_eq!(c.evict, vec![b.id]);
        assert!(ix.bytes() <= 100);
        // Pinned entries stay even if that means not storing.
        assert_eq!(ix.insert(&[4; 9], &[a.id, c.id]), None);
        assert_eq!(ix.len(), 2);
        // Longer than the whole budget: truncated to it.
        let d = ix.insert(&[5; 30], &[]).unwrap();
        assert_eq!(d.len, 10);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.bytes(), 100);
        assert_eq!(ix.stats().hits, 1);
        assert_eq!(ix.stats().evictions, 3);
    }

    #[test]
    fn off_stores_nothing() {
        let mut ix = PrefixIndex::new(0, 10);
        assert!(!ix.enabled());
        assert_eq!(ix.insert(&[1, 2, 3], &[]), None);
        assert_eq!(ix.longest(&[1, 2, 3]), None);
    }
}
