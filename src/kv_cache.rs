//! The batch KV cache and its rebatching operations (after mlx-lm's `BatchKVCache`).
//!
//! Per layer, keys and values are `[B, kv_heads, capacity, head_dim]`. Columns `[0, idx)` are
//! written; all rows share the write index `idx`, and row `r` is left-padded: its own tokens
//! occupy columns `[left_pad[r], idx)`, so its next position is `idx - left_pad[r]`.
//!
//! - [`BatchKvCache::filter`] keeps a subset of rows and trims the padding columns every kept
//!   row shares, so the per-step cost never grows with requests that already left.
//! - [`BatchKvCache::extend`] appends another cache's rows, left-padding whichever side is
//!   shorter so both end at the same column.
//! - Sliding-window layers keep only a suffix of the columns (see [`WindowColumns`]), the
//!   same for every row, moved along by the same operations: their memory is bounded by the
//!   window, not the context (after mlx-lm's `RotatingKVCache`, without the rotation: the
//!   columns stay in order, so masks and rebatching work as on full layers).
//!
//! Owns only MLX arrays and host bookkeeping; knows nothing of requests or models.
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::ops::{concatenate, zeros};
use mlx_rs::Array;

use crate::error::Result;
use crate::model::AttentionMask;

/// Capacity grows in steps of this many columns.
pub const STEP: usize = 256;

/// Shape parameters of every layer's keys and values, and which layers attend over a
/// sliding window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Per layer, the sliding window of its attention (`None`: the layer sees every column).
    /// Empty: no sliding layers. A sliding layer keeps only the columns its window can still
    /// reach (see [`WindowColumns`]).
    pub windows: Vec<Option<usize>>,
}

impl KvLayout {
    /// A layout of `layers` full-attention layers.
    pub const fn full(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            layers,
            kv_heads,
            head_dim,
            windows: Vec::new(),
        }
    }

    /// Bytes one row's one column costs in one layer (keys and values, float32).
    pub fn layer_column_bytes(&self) -> usize {
        2 * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Bytes one row's one column costs over all layers (what a prefix-cache entry holds
    /// per token: sliding layers included).
    pub fn column_bytes(&self) -> usize {
        self.layers * self.layer_column_bytes()
    }

    /// The sliding window of `layer`, if any.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.windows.get(layer).copied().flatten()
    }

    /// The distinct sliding windows, smallest first: one [`WindowColumns`] each in a
    /// geometry.
    pub fn window_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = self.windows.iter().flatten().copied().collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// Which [`WindowColumns`] of a geometry `layer` uses (`None`: a full layer).
    pub fn window_slot(&self, layer: usize) -> Option<usize> {
        let w = self.window(layer)?;
        self.window_sizes().iter().position(|&x| x == w)
    }

    /// Layers that keep every column.
    pub fn full_layers(&self) -> usize {
        (0..self.layers)
            .filter(|&l| self.window(l).is_none())
            .count()
    }
}

/// Most bytes a cache can allocate for `rows` rows none of which grows past `max_len`
/// tokens, when no forward pass writes more than `pass` columns at once: every row is as
/// wide as the widest plus up to `STEP - 1` spare columns (see [`KvGeometry`]); a layer with
/// a sliding window of `w` keeps at most `w + pass + STEP - 1` of them (see
/// [`WindowColumns`]). The scheduler admits requests against this bound.
pub fn footprint_bytes(layout: &KvLayout, rows: usize, max_len: usize, pass: usize) -> usize {
    let full = max_len.saturating_add(STEP - 1);
    let columns = (0..layout.layers)
        .map(|l| match layout.window(l) {
            None => full,
            Some(w) => full.min(w.saturating_add(pass).saturating_add(STEP - 1)),
        })
        .fold(0usize, usize::saturating_add);
    rows.saturating_mul(columns)
        .saturating_mul(layout.layer_column_bytes())
}

/// What [`KvGeometry::filter`] removed from the front of the kept rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trim {
    /// Written columns dropped (padding every kept row shared).
    pub written: usize,
    /// Columns dropped from the rows' timeline: `written` plus, for a group still being
    /// prefilled, not-yet-written columns that are padding for every kept row. The prompt
    /// columns of a prefill group shift left by this much.
    pub timeline: usize,
}

/// The columns the layers with one sliding window keep: `[start, start + capacity)`.
///
/// A query at column `q` sees keys at columns `q - window + 1 ..= q` (a row's positions and
/// columns differ by its left padding, the same for queries and keys), so a pass writing from
/// the write index `idx` needs nothing before `idx + 1 - window`. Columns are dropped only
/// when the layers grow, which is when the full layers grow (once per `STEP` columns), and
/// never past `idx - window` at the start of a pass: one column more than the pass needs, so
/// forgetting that pass again ([`KvGeometry::rollback`]) still leaves every column the next
/// pass needs.
///
/// Invariants: once allocated, `start + capacity` is the full layers' capacity, so a window
/// never holds more than they do and grows when they grow; after a pass of `l` columns,
/// `capacity <= window + l + STEP - 1`, after a join `capacity <= window + STEP` (see
/// [`footprint_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowColumns {
    pub window: usize,
    /// First column held (columns before it were dropped).
    pub start: usize,
    /// Columns held per row.
    pub capacity: usize,
}

impl WindowColumns {
    fn empty(window: usize) -> Self {
        Self {
            window,
            start: 0,
            capacity: 0,
        }
    }
}

/// The host bookkeeping of a batch cache: which columns hold which row's tokens. Pure CPU;
/// shared by the MLX cache and the scheduler tests' fake runner, so both follow one set of
/// rules.
///
/// Invariants: `idx <= capacity`; `capacity <= idx + STEP - 1` unless the cache is empty (a
/// [`rollback`](Self::rollback) of the decode-ahead column, or an [`extend`](Self::extend)
/// that leaves room for the next column, can briefly make it `idx + STEP`; the footprint
/// bound, in terms of each row's final length, still holds: every row's next column is
/// within its final length);
/// in a running batch `left_pad[r] <= idx` and some row has no padding, so `idx` is the
/// longest row. Only a group still being prefilled has `left_pad[r] > idx` (rows whose
/// prompt has not started yet). Sliding-window layers keep a suffix of the columns; see
/// [`WindowColumns`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvGeometry {
    idx: usize,
    capacity: usize,
    left_pad: Vec<usize>,
    windows: Vec<WindowColumns>,
}

impl KvGeometry {
    /// Rows that will be prefilled together, row `r` with `left_pad[r]` padding columns.
    pub fn with_padding(left_pad: Vec<usize>) -> Self {
        Self {
            idx: 0,
            capacity: 0,
            left_pad,
            windows: Vec::new(),
        }
    }

    /// The same rows, keeping for each of `layout`'s sliding windows only the columns it can
    /// still reach. Only for a geometry with nothing written yet.
    pub fn with_windows(mut self, layout: &KvLayout) -> Self {
        debug_assert_eq!(self.idx, 0);
        self.windows = layout
            .window_sizes()
            .into_iter()
            .map(WindowColumns::empty)
            .collect();
        self
    }

    pub fn batch_size(&self) -> usize {
        self.left_pad.len()
    }

    /// Columns written (the longest row plus its padding).
    pub fn width(&self) -> usize {
        self.idx
    }

    /// Columns allocated per row in full-attention layers.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The columns each sliding window's layers hold, in [`KvLayout::window_sizes`] order.
    pub fn windows(&self) -> &[WindowColumns] {
        &self.windows
    }

    pub fn left_padding(&self) -> &[usize] {
        &self.left_pad
    }

    /// Tokens held for row `r`.
    pub fn row_len(&self, r: usize) -> usize {
        self.idx.saturating_sub(self.left_pad[r])
    }

    /// Tokens held over all rows (padding excluded).
    pub fn tokens(&self) -> usize {
        (0..self.batch_size()).map(|r| self.row_len(r)).sum()
    }

    /// Bytes allocated for `layout`'s keys and values: rows x capacity (padding and spare
    /// capacity included) in each layer.
    pub fn allocated_bytes(&self, layout: &KvLayout) -> usize {
        let slots = layout.window_sizes();
        let columns: usize = (0..layout.layers)
            .map(|l| match layout.window(l) {
                None => self.capacity,
                Some(w) => slots
                    .iter()
                    .position(|&x| x == w)
                    .and_then(|s| self.windows.get(s))
                    .map_or(self.capacity, |c| c.capacity),
            })
            .sum();
        self.batch_size() * columns * layout.layer_column_bytes()
    }

    /// Position of each row's next token. Negative while a row's next column is still
    /// padding (a group being prefilled): its real tokens then land at positions 0, 1, ...
    pub fn offsets(&self) -> Vec<i32> {
        self.left_pad
            .iter()
            .map(|&p| self.idx as i32 - p as i32)
            .collect()
    }

    /// The capacity needed before `l` more columns can be written, if above today's.
    pub fn needs_capacity(&self, l: usize) -> Option<usize> {
        let end = self.idx + l;
        (end > self.capacity).then(|| end.div_ceil(STEP) * STEP)
    }

    /// Records that `capacity` columns per row are allocated (at least the width).
    pub fn set_capacity(&mut self, capacity: usize) {
        debug_assert!(capacity >= self.idx);
        self.capacity = capacity;
    }

    /// The first column window `slot`'s layers must keep before a pass of `l` columns: one
    /// before the first the pass can see (see [`WindowColumns`]). A `restore` (columns
    /// copied in from the prefix cache: no queries) keeps only what the next pass needs,
    /// the last `window` of them.
    pub fn window_keep_from(&self, slot: usize, l: usize, restore: bool) -> usize {
        let w = self.windows[slot].window;
        if restore {
            (self.idx + l).saturating_sub(w)
        } else {
            self.idx.saturating_sub(w)
        }
    }

    /// The columns window `slot`'s layers hold after making room for `l` more, if they must
    /// change: dropping what no later pass can see (never past `keep_from`), and growing
    /// in steps of `STEP`.
    pub fn window_needs(&self, slot: usize, l: usize, keep_from: usize) -> Option<WindowColumns> {
        let c = self.windows[slot];
        let end = self.idx + l;
        if end <= c.start + c.capacity {
            return None;
        }
        let start = c.start.max(keep_from.min(end));
        // Ends where the full layers' capacity does (`needs_capacity`), so a window grows
        // when they do, once per `STEP` columns, whatever its size.
        Some(WindowColumns {
            window: c.window,
            start,
            capacity: end.div_ceil(STEP) * STEP - start,
        })
    }

    /// Records window `slot`'s new columns (see [`window_needs`](Self::window_needs)).
    pub fn set_window(&mut self, slot: usize, columns: WindowColumns) {
        debug_assert!(columns.start >= self.windows[slot].start);
        self.windows[slot] = columns;
    }

    /// Makes room for `l` more columns in every layer (what a write of `l` columns does to
    /// the geometry; `restore` as in [`window_keep_from`](Self::window_keep_from)): for the
    /// fake runner and checks.
    pub fn reserve(&mut self, l: usize, restore: bool) {
        if let Some(capacity) = self.needs_capacity(l) {
            self.set_capacity(capacity);
        }
        for slot in 0..self.windows.len() {
            let keep = self.window_keep_from(slot, l, restore);
            if let Some(c) = self.window_needs(slot, l, keep) {
                self.set_window(slot, c);
            }
        }
    }

    /// Whether every layer still holds row `r`'s history from its first token (no sliding
    /// window has dropped any of its columns): its prefix can be copied.
    pub fn holds_row_start(&self, r: usize) -> bool {
        self.windows.iter().all(|c| c.start <= self.left_pad[r])
    }

    /// Moves the write index past `l` written columns.
    pub fn advance(&mut self, l: usize) {
        debug_assert!(self.idx + l <= self.capacity, "write past capacity");
        self.idx += l;
    }

    /// Forgets the last `n` written columns (at most the last pass's: columns dropped from
    /// sliding windows before that pass are not needed again, see [`WindowColumns`]).
    pub fn rollback(&mut self, n: usize) {
        let n = n.min(self.idx);
        self.idx -= n;
        for p in self.left_pad.iter_mut() {
            *p = (*p).min(self.idx);
        }
    }

    /// Keeps only `rows` (in that order) and drops the padding every kept row shares. Never
    /// drops more written columns than there are; see [`Trim`]. Keeping no rows empties it.
    pub fn filter(&mut self, rows: &[usize]) -> Trim {
        if rows.is_empty() {
            let trim = Trim {
                written: self.idx,
                timeline: self.idx,
            };
            let windows = self.windows.iter().map(|c| WindowColumns::empty(c.window));
            *self = Self {
                windows: windows.collect(),
                ..Self::default()
            };
            return trim;
        }
        let shared = rows.iter().map(|&r| self.left_pad[r]).min().unwrap_or(0);
        let written = shared.min(self.idx);
        self.left_pad = rows.iter().map(|&r| self.left_pad[r] - shared).collect();
        self.idx -= written;
        self.capacity -= written;
        for c in self.windows.iter_mut() {
            // Columns before `start` are gone already; the rest of the trim is cut.
            let cut = written.saturating_sub(c.start);
            c.start = c.start.saturating_sub(written);
            c.capacity -= cut;
        }
        Trim {
            written,
            timeline: shared,
        }
    }

    /// Appends `other`'s rows, right-aligning both so every row ends at the shared write
    /// index. Returns how many padding columns go in front of (this cache's, other's) rows.
    /// Both must be fully prefilled (`left_pad <= width`). Sliding windows keep the columns
    /// from `width - window` (what the next pass and a rollback of it can reach): a side
    /// that dropped less has the rest cut, a side that holds less has zeros in front,
    /// columns none of its rows can see.
    pub fn extend(&mut self, other: &KvGeometry) -> (usize, usize) {
        debug_assert!(self.left_pad.iter().all(|&p| p <= self.idx));
        debug_assert!(other.left_pad.iter().all(|&p| p <= other.idx));
        let width = self.idx.max(other.idx);
        let (shift_a, shift_b) = (width - self.idx, width - other.idx);
        for p in self.left_pad.iter_mut() {
            *p += shift_a;
        }
        self.left_pad
            .extend(other.left_pad.iter().map(|p| p + shift_b));
        self.idx = width;
        // Room for the next column at once (a second copy of every row otherwise).
        self.capacity = (width + 1).div_ceil(STEP) * STEP;
        if self.windows.is_empty() {
            self.windows.clone_from(&other.windows);
        }
        for c in self.windows.iter_mut() {
            c.start = width.saturating_sub(c.window);
            c.capacity = self.capacity - c.start;
        }
        (shift_a, shift_b)
    }
}

/// The host side of a group being prefilled: each row's prompt, left-padded to one width,
/// and how many columns are done. Shared by the MLX runner and the fake runner.
#[derive(Debug, Clone, Default)]
pub struct PrefillTokens {
    tokens: Vec<Vec<u32>>,
    done: usize,
}

impl PrefillTokens {
    /// The group for `prompts` and the geometry of its cache. Padding ids are 0 (a valid id
    /// for any vocabulary; padding is never attended to).
    pub fn new(prompts: &[&[u32]]) -> (Self, KvGeometry) {
        let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let left_pad: Vec<usize> = prompts.iter().map(|p| len - p.len()).collect();
        let tokens = prompts
            .iter()
            .map(|p| {
                std::iter::repeat_n(0, len - p.len())
                    .chain(p.iter().copied())
                    .collect()
            })
            .collect();
        (Self { tokens, done: 0 }, KvGeometry::with_padding(left_pad))
    }

    /// Columns in all (the longest prompt left).
    pub fn width(&self) -> usize {
        self.tokens.first().map_or(0, Vec::len)
    }

    pub fn done(&self) -> usize {
        self.done
    }

    pub fn is_done(&self) -> bool {
        self.done >= self.width()
    }

    /// The next chunk of at most `max_columns` columns of every row (empty when done).
    pub fn next_chunk(&self, max_columns: usize) -> Vec<&[u32]> {
        let end = self
            .width()
            .min(self.done.saturating_add(max_columns.max(1)));
        self.tokens.iter().map(|t| &t[self.done..end]).collect()
    }

    /// Marks `n` more columns done.
    pub fn advance(&mut self, n: usize) {
        self.done = (self.done + n).min(self.width());
    }

    /// Keeps `rows`, after the cache's geometry was filtered with `trim`.
    pub fn retain(&mut self, rows: &[usize], trim: Trim) {
        self.tokens = rows
            .iter()
            .map(|&r| self.tokens[r][trim.timeline.min(self.tokens[r].len())..].to_vec())
            .collect();
        self.done -= trim.written;
        debug_assert!(self.done <= self.width());
    }
}

/// The columns a prefill group starts with from the prefix cache: `cached[r] = Some((_, n))`
/// reuses row r's first n prompt tokens. With the prompts left-padded to one width, every
/// row's cached part must end at the same column, and rows without one must have only
/// padding before it; returns that column (0 when nothing is cached).
pub fn prefix_columns<T>(prompts: &[&[u32]], cached: &[Option<(T, usize)>]) -> Result<usize> {
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let end = |r: usize, n: usize| width - prompts[r].len() + n;
    let columns = cached
        .iter()
        .enumerate()
        .filter_map(|(r, c)| c.as_ref().filter(|c| c.1 > 0).map(|c| end(r, c.1)))
        .max()
        .unwrap_or(0);
    let aligned = cached.len() == prompts.len()
        && cached.iter().enumerate().all(|(r, c)| match c {
            Some((_, n)) if *n > 0 => *n <= prompts[r].len() && end(r, *n) == columns,
            _ => end(r, 0) >= columns,
        });
    if !aligned {
        return Err(crate::Error::EngineFailed(
            "cached prefixes of a prefill group do not line up".into(),
        ));
    }
    Ok(columns)
}

/// A batch of per-row KV histories; see the module docs.
pub struct BatchKvCache {
    layout: KvLayout,
    /// Per layer, which of the geometry's [`WindowColumns`] it keeps (`None`: every column).
    slots: Vec<Option<usize>>,
    /// `(keys, values)` per layer; `None` until the first write. Full layers hold columns
    /// `[0, capacity)`; a sliding layer holds its window's `[start, start + capacity)`.
    data: Vec<Option<(Array, Array)>>,
    geom: KvGeometry,
}

impl BatchKvCache {
    /// An empty cache with no rows.
    pub fn new(layout: KvLayout) -> Self {
        Self::with_geometry(layout, KvGeometry::default())
    }

    /// A cache for `left_pad.len()` rows that will be prefilled together, row `r` with
    /// `left_pad[r]` padding columns in front.
    pub fn with_padding(layout: KvLayout, left_pad: Vec<usize>) -> Self {
        Self::with_geometry(layout, KvGeometry::with_padding(left_pad))
    }

    /// An empty (unwritten) cache with this geometry (its windows are `layout`'s).
    pub fn with_geometry(layout: KvLayout, geom: KvGeometry) -> Self {
        debug_assert_eq!(geom.width(), 0);
        let geom = geom.with_windows(&layout);
        Self {
            slots: (0..layout.layers).map(|l| layout.window_slot(l)).collect(),
            data: vec![None; layout.layers],
            layout,
            geom,
        }
    }

    pub fn geometry(&self) -> &KvGeometry {
        &self.geom
    }

    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.geom.batch_size()
    }

    /// Columns written (the longest row plus its padding).
    pub fn width(&self) -> usize {
        self.geom.width()
    }

    /// Left padding of each row.
    pub fn left_padding(&self) -> &[usize] {
        self.geom.left_padding()
    }

    /// Tokens held for row `r`.
    pub fn row_len(&self, r: usize) -> usize {
        self.geom.row_len(r)
    }

    /// Tokens held over all rows (the memory actually used, padding excluded).
    pub fn tokens(&self) -> usize {
        self.geom.tokens()
    }

    /// Bytes allocated for keys and values (float32), padding and spare capacity included.
    pub fn allocated_bytes(&self) -> usize {
        self.geom.allocated_bytes(&self.layout)
    }

    /// Position of each row's next token (see [`KvGeometry::offsets`]).
    pub fn offsets(&self) -> Vec<i32> {
        self.geom.offsets()
    }

    /// The first column `layer` holds: 0, or for a sliding layer the first its window has
    /// not dropped. [`update`](Self::update) returns the columns from here.
    pub fn first_column(&self, layer: usize) -> usize {
        self.slots[layer].map_or(0, |s| self.geom.windows[s].start)
    }

    /// The attention mask for a forward pass of `l` new tokens per row.
    pub(crate) fn mask(&self, l: usize) -> AttentionMask {
        let (idx, left_pad) = (self.geom.idx, &self.geom.left_pad);
        let padded = left_pad.iter().any(|&p| p > 0);
        if !padded {
            return if l == 1 {
                AttentionMask::None
            } else {
                AttentionMask::Causal
            };
        }
        let b = self.batch_size();
        let t = idx + l;
        let mut m = vec![false; b * l * t];
        for r in 0..b {
            for i in 0..l {
                let q = idx + i;
                let row = &mut m[(r * l + i) * t..(r * l + i + 1) * t];
                for (j, v) in row.iter_mut().enumerate() {
                    // A padding query still sees itself, so no softmax row is empty (NaN).
                    *v = (j >= left_pad[r] && j <= q) || j == q;
                }
            }
        }
        AttentionMask::Array(Array::from_slice(&m, &[b as i32, 1, l as i32, t as i32]))
    }

    /// The attention of a sliding-window layer for a forward pass of `l` new tokens per row:
    /// as [`mask`](Self::mask), and a query at position `p` sees only keys at positions
    /// `p - window + 1 ..= p`. Positions and columns differ by the row's left padding, so the
    /// window is a band of columns, the same for every row. Returns the first column any
    /// query of this pass can see, `lo` (columns before it can be left out of the attention),
    /// and the mask over columns `lo..`; `None` while every column is within the window
    /// (the layer then attends as a full one, with [`mask`](Self::mask)).
    pub(crate) fn window_mask(&self, l: usize, window: usize) -> Option<(usize, AttentionMask)> {
        let (idx, left_pad) = (self.geom.idx, &self.geom.left_pad);
        let t = idx + l;
        if t <= window {
            return None;
        }
        let lo = (idx + 1).saturating_sub(window);
        let padded = left_pad.iter().any(|&p| p > 0);
        let b = if padded { self.batch_size() } else { 1 };
        let width = t - lo;
        let mut m = vec![false; b * l * width];
        for r in 0..b {
            let pad = if padded { left_pad[r] } else { 0 };
            for i in 0..l {
                let q = idx + i;
                let row = &mut m[(r * l + i) * width..(r * l + i + 1) * width];
                for (c, v) in row.iter_mut().enumerate() {
                    let j = lo + c;
                    // A padding query still sees itself, so no softmax row is empty (NaN).
                    *v = (j >= pad && j <= q && q - j < window) || j == q;
                }
            }
        }
        let shape = [b as i32, 1, l as i32, width as i32];
        Some((lo, AttentionMask::Array(Array::from_slice(&m, &shape))))
    }

    /// Writes `[B, kv_heads, L, head_dim]` keys/values for `layer` at the current index and
    /// returns the layer's keys and values up to the end of the new ones, from
    /// [`first_column`](Self::first_column) on. Call [`advance`](Self::advance) once all
    /// layers are written.
    pub fn update(&mut self, layer: usize, k: &Array, v: &Array) -> Result<(Array, Array)> {
        self.write(layer, k, v, false)
    }

    /// Writes columns copied from the prefix cache into a cache with nothing written yet:
    /// as [`update`](Self::update), except that sliding layers keep only the columns the next
    /// pass can see (no query reads these columns now).
    pub fn restore(&mut self, layer: usize, k: &Array, v: &Array) -> Result<()> {
        debug_assert_eq!(self.width(), 0);
        self.write(layer, k, v, true).map(|_| ())
    }

    fn write(
        &mut self,
        layer: usize,
        k: &Array,
        v: &Array,
        restore: bool,
    ) -> Result<(Array, Array)> {
        let l = k.shape()[2] as usize;
        let start = self.geom.idx;
        let end = start + l;
        // (The full layers' capacity is the geometry's, kept even with no full layers.)
        if let Some(capacity) = self.geom.needs_capacity(l) {
            self.grow(capacity)?;
        }
        let first = match self.slots[layer] {
            None => 0,
            Some(slot) => {
                let keep = self.geom.window_keep_from(slot, l, restore);
                if let Some(columns) = self.geom.window_needs(slot, l, keep) {
                    self.grow_window(slot, columns)?;
                }
                self.geom.windows[slot].start
            }
        };
        let Some((keys, values)) = self.data[layer].as_mut() else {
            return Err(crate::Error::EngineFailed(format!(
                "a write of {l} columns to an unallocated KV layer"
            )));
        };
        // Columns before `first` (only in a restore) are not kept.
        let from = start.max(first);
        let cols = (from - first) as i32..(end - first) as i32;
        let (k, v) = if from > start {
            let skip = (from - start) as i32..;
            (
                k.try_index((.., .., skip.clone()))?,
                v.try_index((.., .., skip))?,
            )
        } else {
            (k.clone(), v.clone())
        };
        keys.try_index_mut((.., .., cols.clone()), &k)?;
        values.try_index_mut((.., .., cols), &v)?;
        let upto = ..(end - first) as i32;
        Ok((
            keys.try_index((.., .., upto))?,
            values.try_index((.., .., upto))?,
        ))
    }

    /// Moves the write index past `l` columns written by [`update`](Self::update).
    pub fn advance(&mut self, l: usize) {
        self.geom.advance(l);
    }

    /// Forgets the last `n` written columns (a speculative step that will not be used).
    pub fn rollback(&mut self, n: usize) {
        self.geom.rollback(n);
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Array> {
        let l = &self.layout;
        Ok(zeros::<f32>(&[
            rows as i32,
            l.kv_heads as i32,
            cols as i32,
            l.head_dim as i32,
        ])?)
    }

    /// Grows the full layers to `new_cap` columns.
    fn grow(&mut self, new_cap: usize) -> Result<()> {
        let extra = new_cap - self.geom.capacity;
        let b = self.batch_size();
        for layer in 0..self.data.len() {
            if self.slots[layer].is_some() {
                continue;
            }
            let grown = match self.data[layer].take() {
                None => (self.zeros(b, new_cap)?, self.zeros(b, new_cap)?),
                Some((k, v)) => {
                    let pad = self.zeros(b, extra)?;
                    (
                        concatenate(&[k, pad.clone()], 2)?,
                        concatenate(&[v, pad], 2)?,
                    )
                }
            };
            self.data[layer] = Some(grown);
        }
        self.geom.set_capacity(new_cap);
        Ok(())
    }

    /// Moves window `slot`'s layers to `new` columns: the columns they still need, copied
    /// into buffers of the new capacity (one copy of at most a window and a pass).
    fn grow_window(&mut self, slot: usize, new: WindowColumns) -> Result<()> {
        let old = self.geom.windows[slot];
        let b = self.batch_size();
        // Written columns still needed: [new.start, idx), at old.start + `from` in the old.
        let kept = self.geom.idx.saturating_sub(new.start);
        let from = (new.start - old.start) as i32;
        for layer in 0..self.data.len() {
            if self.slots[layer] != Some(slot) {
                continue;
            }
            let layout = &self.layout;
            let zeros = || -> Result<Array> {
                Ok(zeros::<f32>(&[
                    b as i32,
                    layout.kv_heads as i32,
                    new.capacity as i32,
                    layout.head_dim as i32,
                ])?)
            };
            let moved = |a: Array| -> Result<Array> {
                let mut fresh = zeros()?;
                if kept > 0 {
                    let part = a.try_index((.., .., from..from + kept as i32))?;
                    fresh.try_index_mut((.., .., ..kept as i32), &part)?;
                }
                Ok(fresh)
            };
            let grown = match self.data[layer].take() {
                None => (zeros()?, zeros()?),
                Some((k, v)) => (moved(k)?, moved(v)?),
            };
            self.data[layer] = Some(grown);
        }
        self.geom.set_window(slot, new);
        Ok(())
    }

    /// Keeps only `rows` (in that order) and trims padding columns shared by all of them,
    /// never more than are written (see [`KvGeometry::filter`]). Keeping no rows empties the
    /// cache. The kept rows are copied into arrays of exactly their size, so memory held by
    /// rows that left is released.
    pub fn filter(&mut self, rows: &[usize]) -> Result<Trim> {
        if rows.is_empty() {
            let trim = self.geom.filter(rows);
            *self = Self::new(self.layout.clone());
            return Ok(trim);
        }
        let before = self.geom.windows.clone();
        let trim = self.geom.filter(rows);
        let index = Array::from_slice(
            &rows.iter().map(|&r| r as i32).collect::<Vec<_>>(),
            &[rows.len() as i32],
        );
        for (layer, slot) in self.data.iter_mut().enumerate() {
            // Columns trimmed from the front of this layer's buffers.
            let cut = match self.slots[layer] {
                None => trim.written,
                Some(s) => trim.written.saturating_sub(before[s].start),
            };
            if let Some((k, v)) = slot.take() {
                // Slice first, then gather: the gather copies only what is kept.
                let cut = |a: Array| -> Result<Array> {
                    let a = if cut > 0 {
                        a.try_index((.., .., cut as i32..))?
                    } else {
                        a
                    };
                    Ok(a.take_axis(&index, 0)?)
                };
                *slot = Some((cut(k)?, cut(v)?));
            }
        }
        Ok(trim)
    }

    /// Whether row `row`'s history is held from its first token in every layer (no sliding
    /// window dropped any of it), so [`row_prefix`](Self::row_prefix) can copy it.
    pub fn holds_row_start(&self, row: usize) -> bool {
        row < self.batch_size() && self.geom.holds_row_start(row)
    }

    /// Copies of row `row`'s keys and values for its first `len` tokens, per layer
    /// (`[1, kv_heads, len, head_dim]` each), into arrays of their own (gathers, queued for
    /// evaluation at once): they share no buffer with the cache, so later in-place writes
    /// to it are never turned into copies. Fails if a sliding layer no longer holds them
    /// (see [`holds_row_start`](Self::holds_row_start)).
    pub fn row_prefix(&self, row: usize, len: usize) -> Result<Vec<(Array, Array)>> {
        if row >= self.batch_size() || len > self.row_len(row) || !self.holds_row_start(row) {
            return Err(crate::Error::EngineFailed(format!(
                "no {len} tokens in row {row} of the KV cache"
            )));
        }
        let first = Array::from_slice(&[0i32], &[1]);
        let mut out = Vec::with_capacity(self.data.len());
        for (layer, slot) in self.data.iter().enumerate() {
            let Some((k, v)) = slot else {
                return Err(crate::Error::EngineFailed("an unwritten KV cache".into()));
            };
            let start = (self.geom.left_pad[row] - self.first_column(layer)) as i32;
            let cols = start..start + len as i32;
            let r = row as i32;
            // Slice, then gather: the gather writes a fresh buffer of exactly this size.
            let copy = |a: &Array| -> Result<Array> {
                Ok(a.try_index((r..r + 1, .., cols.clone()))?
                    .take_axis(&first, 0)?)
            };
            out.push((copy(k)?, copy(v)?));
        }
        // Queued, not waited for: the copies run on the stream before anything that writes
        // the cache next (and then let go of its buffers), while the host goes on.
        let arrays: Vec<&Array> = out.iter().flat_map(|(k, v)| [k, v]).collect();
        mlx_rs::transforms::async_eval(arrays)?;
        Ok(out)
    }

    /// Appends the rows of `other` after this cache's rows, right-aligning both so every row's
    /// history ends at the shared write index. The merged arrays get the room the next
    /// column needs (what [`update`](Self::update) would otherwise grow to at once, with a
    /// second copy of every row).
    pub fn extend(&mut self, other: BatchKvCache) -> Result<()> {
        if other.batch_size() == 0 {
            return Ok(());
        }
        if self.batch_size() == 0 {
            *self = other;
            return Ok(());
        }
        let (na, nb) = (self.batch_size(), other.batch_size());
        let (width_a, width_b) = (self.width(), other.width());
        let old = std::mem::take(&mut self.data);
        let before = self.geom.windows.clone();
        let (shift_a, shift_b) = self.geom.extend(&other.geom);
        let (width, capacity) = (self.geom.idx, self.geom.capacity);
        let mut data = Vec::with_capacity(old.len());
        for (layer, mine) in old.iter().enumerate() {
            // First column held: before (this side, other side) and after.
            let (first_a, first_b, first, cols) = match self.slots[layer] {
                None => (0, 0, 0, capacity),
                Some(s) => {
                    let c = self.geom.windows[s];
                    (
                        before[s].start,
                        other.geom.windows[s].start,
                        c.start,
                        c.capacity,
                    )
                }
            };
            // One zeroed buffer, each side's written columns copied into place: a single
            // copy of every row, padding and spare columns included.
            let mut k = self.zeros(na + nb, cols)?;
            let mut v = self.zeros(na + nb, cols)?;
            let sides = [
                (mine, width_a, 0..na, shift_a, first_a),
                (&other.data[layer], width_b, na..na + nb, shift_b, first_b),
            ];
            for (slot, written, rows, shift, held) in sides {
                // Merged columns [from, width) come from this side's [from - shift, written).
                let from = first.max(shift + held);
                let Some((ck, cv)) = slot.as_ref().filter(|_| from < width) else {
                    continue;
                };
                let (r, c) = (
                    rows.start as i32..rows.end as i32,
                    (from - first) as i32..(width - first) as i32,
                );
                let src = (from - shift - held) as i32..(written - held) as i32;
                k.try_index_mut(
                    (r.clone(), .., c.clone()),
                    &ck.try_index((.., .., src.clone()))?,
                )?;
                v.try_index_mut((r, .., c), &cv.try_index((.., .., src))?)?;
            }
            data.push(Some((k, v)));
        }
        self.data = data;
        Ok(())
    }

    /// The written keys of `layer` (`[B, kv_heads, columns, head_dim]`) from
    /// [`first_column`](Self::first_column) on, for tests and checks.
    pub fn keys(&self, layer: usize) -> Option<Array> {
        let upto = (self.geom.idx - self.first_column(layer)) as i32;
        self.data[layer]
            .as_ref()
            .and_then(|(k, _)| k.try_index((.., .., ..upto)).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: KvLayout = KvLayout::full(2, 2, 3);

    /// Keys/values for `rows` rows of `len` tokens: value = tag * 1000 + position (+0.5 for
    /// values), so every cell says which row and position it belongs to.
    fn kv(tags: &[usize], start: &[usize], len: usize) -> (Array, Array) {
        let (h, d) = (LAYOUT.kv_heads, LAYOUT.head_dim);
        let mut k = Vec::new();
        for (r, &tag) in tags.iter().enumerate() {
            for _ in 0..h {
                for t in 0..len {
                    for _ in 0..d {
                        k.push((tag * 1000 + start[r] + t) as f32);
                    }
                }
            }
        }
        let shape = [tags.len() as i32, h as i32, len as i32, d as i32];
        let keys = Array::from_slice(&k, &shape);
        let values = keys.add(Array::from_f32(0.5)).unwrap();
        (keys, values)
    }

    /// Appends `len` tokens to every row (rows continue their own positions).
    fn write(cache: &mut BatchKvCache, tags: &[usize], len: usize) {
        let start: Vec<usize> = (0..tags.len()).map(|r| cache.row_len(r)).collect();
        let (k, v) = kv(tags, &start, len);
        for layer in 0..LAYOUT.layers {
            let (keys, values) = cache.update(layer, &k, &v).unwrap();
            assert_eq!(
                keys.shape(),
                &[tags.len() as i32, 2, (cache.width() + len) as i32, 3]
            );
            assert_eq!(values.shape(), keys.shape());
        }
        cache.advance(len);
    }

    /// Checks shapes and that row r holds exactly tag[r]'s positions 0..row_len after its
    /// padding.
    fn check(cache: &BatchKvCache, tags: &[usize]) {
        assert_eq!(cache.batch_size(), tags.len());
        if tags.is_empty() {
            assert_eq!(cache.width(), 0);
            return;
        }
        let keys = cache.keys(1).expect("written");
        let w = cache.width();
        assert_eq!(keys.shape(), &[tags.len() as i32, 2, w as i32, 3]);
        // A column slice is a strided view: copy it to read it as one slice.
        let keys = keys.multiply(Array::from_f32(1.0)).unwrap();
        keys.eval().unwrap();
        let flat = keys.as_slice::<f32>();
        for (r, &tag) in tags.iter().enumerate() {
            let pad = cache.left_padding()[r];
            assert!(pad <= w);
            for t in pad..w {
                let cell = flat[((r * 2 + 1) * w + t) * 3];
                assert_eq!(cell, (tag * 1000 + t - pad) as f32, "row {r} column {t}");
            }
        }
        assert_eq!(
            cache.offsets(),
            (0..tags.len())
                .map(|r| cache.row_len(r) as i32)
                .collect::<Vec<_>>()
        );
    }

    fn group(tags: &[usize], lens: &[usize]) -> BatchKvCache {
        // Prefill a left-padded group like the runner does: padding columns get written too,
        // then their contents are overwritten to carry the row's real positions.
        let width = *lens.iter().max().unwrap();
        let mut c = BatchKvCache::with_padding(LAYOUT, lens.iter().map(|l| width - l).collect());
        let (h, d) = (LAYOUT.kv_heads, LAYOUT.head_dim);
        let mut k = Vec::new();
        for (r, &tag) in tags.iter().enumerate() {
            for _ in 0..h {
                for t in 0..width {
                    let pos = t as i64 - (width - lens[r]) as i64;
                    for _ in 0..d {
                        k.push(if pos < 0 {
                            -1.0
                        } else {
                            (tag * 1000) as f32 + pos as f32
                        });
                    }
                }
            }
        }
        let keys = Array::from_slice(&k, &[tags.len() as i32, h as i32, width as i32, d as i32]);
        for layer in 0..LAYOUT.layers {
            c.update(layer, &keys, &keys).unwrap();
        }
        c.advance(width);
        c
    }

    #[test]
    fn join_leave_join_again() {
        let mut c = BatchKvCache::new(LAYOUT);
        c.extend(group(&[1, 2], &[3, 5])).unwrap();
        check(&c, &[1, 2]);
        write(&mut c, &[1, 2], 1);
        check(&c, &[1, 2]);
        c.extend(group(&[3], &[9])).unwrap();
        check(&c, &[1, 2, 3]);
        write(&mut c, &[1, 2, 3], 2);
        check(&c, &[1, 2, 3]);
        // Row 2 (tag 3, the longest) leaves: shared padding is trimmed.
        c.filter(&[0, 1]).unwrap();
        check(&c, &[1, 2]);
        assert_eq!(c.width(), 8, "width shrinks to the longest remaining row");
        c.extend(group(&[4], &[2])).unwrap();
        write(&mut c, &[1, 2, 4], 1);
        check(&c, &[1, 2, 4]);
        assert_eq!(c.tokens(), 7 + 9 + 3);
    }

    #[test]
    fn a_join_leaves_room_for_the_next_column_at_step_boundaries() {
        for width in [STEP - 1, STEP, STEP + 1] {
            let mut c = BatchKvCache::new(LAYOUT);
            c.extend(group(&[1], &[3])).unwrap();
            c.extend(group(&[2, 3], &[width, 5])).unwrap();
            check(&c, &[1, 2, 3]);
            let capacity = (width + 1).div_ceil(STEP) * STEP;
            assert_eq!(
                c.allocated_bytes(),
                3 * capacity * LAYOUT.column_bytes(),
                "width {width}"
            );
            // The next column is written in place (no growth), and everything still lines up.
            write(&mut c, &[1, 2, 3], 1);
            check(&c, &[1, 2, 3]);
            assert_eq!(
                c.allocated_bytes(),
                3 * capacity * LAYOUT.column_bytes(),
                "width {width}"
            );
        }
    }

    #[test]
    fn leave_down_to_empty_then_join_into_empty() {
        let mut c = BatchKvCache::new(LAYOUT);
        c.extend(group(&[1], &[4])).unwrap();
        write(&mut c, &[1], 3);
        c.filter(&[]).unwrap();
        check(&c, &[]);
        assert_eq!(c.tokens(), 0);
        assert_eq!(c.allocated_bytes(), 0);
        c.filter(&[]).unwrap();
        check(&c, &[]);
        // Second round after the cache emptied (a bug others shipped).
        c.extend(group(&[5, 6], &[2, 7])).unwrap();
        write(&mut c, &[5, 6], 1);
        check(&c, &[5, 6]);
    }

    #[test]
    fn finish_and_join_on_the_same_step() {
        let mut c = BatchKvCache::new(LAYOUT);
        c.extend(group(&[1, 2, 3], &[4, 6, 2])).unwrap();
        write(&mut c, &[1, 2, 3], 1);
        c.filter(&[0, 2]).unwrap();
        c.extend(group(&[7], &[5])).unwrap();
        check(&c, &[1, 3, 7]);
        write(&mut c, &[1, 3, 7], 1);
        check(&c, &[1, 3, 7]);
    }

    #[test]
    fn very_different_lengths_and_growth_past_capacity() {
        let mut c = BatchKvCache::new(LAYOUT);
        c.extend(group(&[1], &[300])).unwrap();
        c.extend(group(&[2], &[1])).unwrap();
        check(&c, &[1, 2]);
        assert_eq!(c.left_padding(), &[0, 299]);
        write(&mut c, &[1, 2], 260);
        check(&c, &[1, 2]);
        // The long row leaves: the short one keeps only its own 261 columns.
        c.filter(&[1]).unwrap();
        check(&c, &[2]);
        assert_eq!(c.width(), 261);
    }

    #[test]
    fn one_token_prompts_join_with_empty_history() {
        let mut c = BatchKvCache::new(LAYOUT);
        c.extend(group(&[1], &[3])).unwrap();
        // A group whose rows have no prefilled tokens (prompt of one token).
        c.extend(BatchKvCache::with_padding(LAYOUT, vec![0]))
            .unwrap();
        assert_eq!(c.left_padding(), &[0, 3]);
        write(&mut c, &[1, 2], 1);
        check(&c, &[1, 2]);
    }

    /// Issue 7's hang: a row leaves a group mid-prefill while the kept row's padding is wider
    /// than what was written so far. The trim stops at the written columns, and the kept
    /// row's remaining padding is dropped from its timeline.
    #[test]
    fn filter_mid_prefill_never_trims_more_than_written() {
        let short: &[u32] = &[1, 2, 3];
        let long: &[u32] = &[4; 10];
        let (mut tokens, geom) = PrefillTokens::new(&[short, long]);
        let mut c = BatchKvCache::with_geometry(LAYOUT, geom);
        assert_eq!(c.left_padding(), &[7, 0]);
        let chunk = tokens.next_chunk(4);
        assert_eq!(chunk.len(), 2);
        write(&mut c, &[1, 2], 4);
        tokens.advance(4);
        let trim = c.filter(&[0]).unwrap();
        assert_eq!(
            trim,
            Trim {
                written: 4,
                timeline: 7
            }
        );
        tokens.retain(&[0], trim);
        assert_eq!((c.width(), c.left_padding()), (0, &[0][..]));
        assert_eq!(tokens.done(), 0);
        assert_eq!(tokens.next_chunk(100), vec![short]);
        write(&mut c, &[1], 3);
        check(&c, &[1]);
        // The other way round: the long row stays, nothing is trimmed.
        let (_, geom) = PrefillTokens::new(&[short, long]);
        let mut c = BatchKvCache::with_geometry(LAYOUT, geom);
        write(&mut c, &[1, 2], 4);
        assert_eq!(c.filter(&[1]).unwrap(), Trim::default());
        assert_eq!(c.width(), 4);
    }

    #[test]
    fn mask_hides_padding_and_future() {
        let c = group(&[1, 2], &[1, 3]);
        let AttentionMask::Array(m) = c.mask(2) else {
            panic!("padded rows need a mask")
        };
        assert_eq!(m.shape(), &[2, 1, 2, 5]);
        let m = m.as_slice::<bool>().to_vec();
        // Row 0 (pad 2), query at column 3: sees columns 2..=3.
        assert_eq!(&m[0..5], &[false, false, true, true, false]);
        // Row 1 (no padding), query at column 4: sees everything.
        assert_eq!(&m[15..20], &[true, true, true, true, true]);
        assert!(matches!(
            BatchKvCache::new(LAYOUT).mask(1),
            AttentionMask::None
        ));
    }

    /// Sliding-window layers under random joins (prefilled in random chunks, some starting
    /// from restored prefix columns), decode steps, decode-ahead rollbacks and leaves: each
    /// layer holds exactly the columns its window can still reach, with the right row's
    /// values in them, and the cache stays within [`footprint_bytes`].
    #[test]
    fn sliding_windows_keep_what_they_can_reach_under_rebatching() {
        // Sliding and full layers mixed (two windows), and sliding layers only.
        windows_under_rebatching(KvLayout {
            windows: vec![None, Some(5), Some(300), Some(5)],
            ..KvLayout::full(4, 1, 1)
        });
        windows_under_rebatching(KvLayout {
            windows: vec![Some(17); 2],
            ..KvLayout::full(2, 1, 1)
        });
    }

    fn windows_under_rebatching(layout: KvLayout) {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        const MAX_CHUNK: usize = 200;
        // Column c of a row with padding `pad` holds tag * 10000 + (c - pad), padding -1.
        let value = |tag: usize, pad: usize, c: usize| -> f32 {
            if c < pad {
                -1.0
            } else {
                (tag * 10000 + c - pad) as f32
            }
        };
        let write = |cache: &mut BatchKvCache, tags: &[usize], l: usize, restore: bool| {
            let idx = cache.width();
            let mut k = Vec::new();
            for (r, &tag) in tags.iter().enumerate() {
                let pad = cache.left_padding()[r];
                k.extend((idx..idx + l).map(|c| value(tag, pad, c)));
            }
            let k = Array::from_slice(&k, &[tags.len() as i32, 1, l as i32, 1]);
            for layer in 0..layout.layers {
                if restore {
                    cache.restore(layer, &k, &k).unwrap();
                } else {
                    let (keys, _) = cache.update(layer, &k, &k).unwrap();
                    let held = idx + l - cache.first_column(layer);
                    assert_eq!(keys.shape(), &[tags.len() as i32, 1, held as i32, 1]);
                }
            }
            cache.advance(l);
        };
        let mut drops = 0;
        for seed in 0..24u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
            let mut cache = BatchKvCache::new(layout.clone());
            let mut tags: Vec<usize> = Vec::new();
            let mut next_tag = 1;
            for _ in 0..40 {
                match below(6) {
                    0 | 1 => {
                        let n = 1 + below(3);
                        let lens: Vec<usize> = (0..n).map(|_| 1 + below(700)).collect();
                        let width = *lens.iter().max().unwrap();
                        let group_tags: Vec<usize> = (next_tag..next_tag + n).collect();
                        next_tag += n;
                        let mut g = BatchKvCache::with_padding(
                            layout.clone(),
                            lens.iter().map(|l| width - l).collect(),
                        );
                        let mut done = 0;
                        if below(3) == 0 {
                            // Columns from the prefix cache first.
                            let n = 1 + below(width);
                            write(&mut g, &group_tags, n, true);
                            done = n;
                        }
                        while done < width {
                            let n = (1 + below(MAX_CHUNK)).min(width - done);
                            write(&mut g, &group_tags, n, false);
                            done += n;
                        }
                        cache.extend(g).unwrap();
                        tags.extend(group_tags);
                    }
                    2 | 3 if !tags.is_empty() => {
                        for _ in 0..1 + below(300) {
                            write(&mut cache, &tags, 1, false);
                            if below(4) == 0 {
                                // A step queued ahead and thrown away, then taken again.
                                cache.rollback(1);
                                write(&mut cache, &tags, 1, false);
                            }
                        }
                    }
                    _ if !tags.is_empty() => {
                        let keep: Vec<usize> = (0..tags.len()).filter(|_| below(3) != 0).collect();
                        cache.filter(&keep).unwrap();
                        tags = keep.iter().map(|&r| tags[r]).collect();
                    }
                    _ => {}
                }
                // Every layer holds its reachable columns with the right values.
                let idx = cache.width();
                assert_eq!(cache.batch_size(), tags.len());
                if tags.is_empty() {
                    assert_eq!(cache.allocated_bytes(), 0);
                    continue;
                }
                for c in cache.geometry().windows() {
                    assert_eq!(c.start + c.capacity, cache.geometry().capacity());
                }
                for layer in 0..layout.layers {
                    let first = cache.first_column(layer);
                    let need = layout.window(layer).map_or(0, |w| idx.saturating_sub(w));
                    assert!(first <= need, "seed {seed} layer {layer}: {first} > {need}");
                    drops += usize::from(first > 0);
                    let keys = cache.keys(layer).unwrap();
                    let keys = keys.multiply(Array::from_f32(1.0)).unwrap();
                    keys.eval().unwrap();
                    let flat = keys.as_slice::<f32>();
                    let held = idx - first;
                    for (r, &tag) in tags.iter().enumerate() {
                        let pad = cache.left_padding()[r];
                        for c in need.max(pad)..idx {
                            assert_eq!(
                                flat[r * held + c - first],
                                value(tag, pad, c),
                                "seed {seed} layer {layer} row {r} column {c}"
                            );
                        }
                    }
                }
                let bound = footprint_bytes(&layout, tags.len(), idx + 1, MAX_CHUNK);
                assert!(cache.allocated_bytes() <= bound, "seed {seed}");
                let full = KvLayout {
                    windows: Vec::new(),
                    ..layout.clone()
                };
                let full = footprint_bytes(&full, tags.len(), idx + 1, 0);
                assert!(full >= bound);
            }
        }
        assert!(drops > 100, "windows dropped columns {drops} times");
    }

    /// A window grows (and copies what it keeps) when the full layers do, once per `STEP`
    /// decode steps, whatever its size: a window of `k * STEP - 1` columns once copied itself
    /// at every step.
    #[test]
    fn windows_grow_once_per_step_of_columns() {
        for w in [1, 8, 255, 256, 2047, 4096] {
            let layout = KvLayout {
                windows: vec![Some(w)],
                ..KvLayout::full(1, 1, 1)
            };
            let mut g = KvGeometry::with_padding(vec![0]).with_windows(&layout);
            g.reserve(300, false);
            g.advance(300);
            let mut moves = 0;
            for _ in 0..10 * STEP {
                let before = g.windows()[0];
                g.reserve(1, false);
                g.advance(1);
                moves += usize::from(g.windows()[0] != before);
                let c = g.windows()[0];
                assert_eq!(c.start + c.capacity, g.capacity(), "window {w}");
                // After the 300-column pass, then after one-column passes.
                let pass = if moves == 0 { 300 } else { 1 };
                assert!(c.capacity < w + pass + STEP, "window {w}: {c:?}");
            }
            assert!(
                moves <= 10,
                "window {w}: {moves} moves in {} steps",
                10 * STEP
            );
        }
    }
}
