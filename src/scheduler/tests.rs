//! The scheduler against a fake runner whose next token is a function of the row's whole
//! history, so any row mix-up during join/leave changes the outputs.
use std::collections::HashMap;

use super::*;
use crate::kv_cache::{prefix_columns, KvGeometry, PrefillTokens, Trim, STEP};
use crate::tokenizer;

fn next_of(history: &[u32]) -> u32 {
    let sum: u64 = history.iter().map(|&t| t as u64).sum();
    10 + ((sum * 7 + history.len() as u64) % 40) as u32
}

/// The tokens a request would get alone.
fn alone(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut hist = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = next_of(&hist);
        hist.push(t);
        out.push(t);
    }
    out
}

const PAD: u32 = u32::MAX;

/// The fake model's KV layout: one float per column, so column bytes are 8.
const LAYOUT: KvLayout = KvLayout::full(1, 1, 1);

/// The fake runner's layout ([`LAYOUT`] unless a test gives another).
#[derive(Clone)]
struct FakeLayout(KvLayout);
impl Default for FakeLayout {
    fn default() -> Self {
        Self(LAYOUT)
    }
}

/// A host mirror of one batch KV cache: the geometry the MLX cache uses ([`KvGeometry`])
/// plus the token each column holds. Padding columns hold `PAD`; a row's history is what its
/// columns `[left_pad, width)` hold, so a wrong trim or alignment shows up as a wrong
/// history (and so a wrong next token), or as `PAD` inside a history (a panic).
/// (Sliding-window layers only change what the geometry holds and allocates: the fake model
/// still reads whole histories, so a column a window dropped too early is not caught here
/// but by the geometry checks and the MLX tests.)
struct HostKv {
    layout: KvLayout,
    geom: KvGeometry,
    cols: Vec<Vec<u32>>,
}

impl Default for HostKv {
    fn default() -> Self {
        Self::new(KvGeometry::default(), LAYOUT)
    }
}

impl HostKv {
    fn new(geom: KvGeometry, layout: KvLayout) -> Self {
        let cols = vec![Vec::new(); geom.batch_size()];
        let geom = geom.with_windows(&layout);
        Self { layout, geom, cols }
    }

    /// Writes one chunk of columns (one slice per row, all the same length); `restore`: as
    /// the MLX runner writes columns from the prefix cache.
    fn write(&mut self, chunk: &[&[u32]], restore: bool) {
        let l = chunk.first().map_or(0, |c| c.len());
        self.geom.reserve(l, restore);
        let idx = self.geom.width();
        for (r, tokens) in chunk.iter().enumerate() {
            assert_eq!(tokens.len(), l, "ragged chunk");
            for (i, &t) in tokens.iter().enumerate() {
                let pad = idx + i < self.geom.left_padding()[r];
                self.cols[r].push(if pad { PAD } else { t });
            }
        }
        self.geom.advance(l);
        self.check();
    }

    fn history(&self, r: usize) -> &[u32] {
        let pad = self.geom.left_padding()[r];
        let h = &self.cols[r][pad.min(self.cols[r].len())..];
        assert!(!h.contains(&PAD), "row {r} attends to padding: {h:?}");
        h
    }

    fn filter(&mut self, rows: &[usize]) -> Trim {
        let trim = self.geom.filter(rows);
        self.cols = rows
            .iter()
            .map(|&r| self.cols[r][trim.written..].to_vec())
            .collect();
        self.check();
        trim
    }

    fn extend(&mut self, other: HostKv) {
        if other.geom.batch_size() == 0 {
            return;
        }
        if self.geom.batch_size() == 0 {
            *self = other;
            return;
        }
        let (a, b) = self.geom.extend(&other.geom);
        let pad = |c: Vec<u32>, n: usize| std::iter::repeat_n(PAD, n).chain(c).collect();
        self.cols = std::mem::take(&mut self.cols)
            .into_iter()
            .map(|c| pad(c, a))
            .chain(other.cols.into_iter().map(|c| pad(c, b)))
            .collect();
        self.check();
    }

    /// The geometry's invariants (see [`KvGeometry`]).
    fn check(&self) {
        let g = &self.geom;
        assert_eq!(self.cols.len(), g.batch_size());
        assert!(self.cols.iter().all(|c| c.len() == g.width()));
        assert!(g.width() <= g.capacity());
        if g.batch_size() > 0 && g.width() > 0 {
            // A join leaves room for the next column: one step above the width at most.
            assert!(
                g.capacity() <= g.width() + STEP,
                "spare capacity above one step"
            );
        }
        for c in g.windows() {
            // Every written column a later pass (or a rollback of the last) can see is held,
            // and no more than the full layers hold.
            assert!(
                c.start <= g.width().saturating_sub(c.window),
                "{c:?} {}",
                g.width()
            );
            assert!(c.start + c.capacity >= g.width(), "{c:?} {}", g.width());
            assert_eq!(
                c.start + c.capacity,
                g.capacity(),
                "ends with the full layers"
            );
        }
    }

    fn bytes(&self) -> usize {
        self.geom.allocated_bytes(&self.layout)
    }
}

/// A runner with the real one's cache semantics (left padding, chunked prefill, trims on
/// leave, alignment on join) over [`HostKv`], and a "model" whose next token is a function of
/// the row's whole cached history.
#[derive(Default)]
struct FakeRunner {
    layout: FakeLayout,
    batch: HostKv,
    group: Option<(HostKv, PrefillTokens)>,
    max_rows_seen: usize,
    joins_while_running: usize,
    max_bytes_seen: usize,
    fail_next_decode: bool,
    /// The last decode said a step could be queued ahead (all rows go on unchanged).
    promised_ahead: bool,
    aheads: usize,
    /// The inputs a join said the next decode would have (decode-ahead across the join).
    promised_inputs: Option<Vec<u32>>,
    joins_ahead: usize,
    /// Steps a real runner would have queued ahead and then thrown away.
    wasted_aheads: usize,
    /// Prefix-cache entries: the tokens the saved columns held.
    prefixes: HashMap<EntryId, Vec<u32>>,
    /// Prompt columns computed by prefill (padding included), and taken from the cache.
    prefill_columns: usize,
    reused_columns: usize,
}

impl FakeRunner {
    fn note_bytes(&mut self) {
        let b = self.kv_bytes();
        self.max_bytes_seen = self.max_bytes_seen.max(b);
    }
}

impl Runner for FakeRunner {
    fn start_prefill(
        &mut self,
        prompts: &[&[u32]],
        cached: &[Option<(EntryId, usize)>],
    ) -> Result<()> {
        assert!(self.group.is_none(), "one group at a time");
        let columns = prefix_columns(prompts, cached).expect("aligned cached parts");
        let (mut tokens, geom) = PrefillTokens::new(prompts);
        let mut kv = HostKv::new(geom, self.layout.0.clone());
        if columns > 0 {
            // The saved columns, whatever they hold: a wrong entry shows in the outputs.
            let rows: Vec<Vec<u32>> = cached
                .iter()
                .map(|c| match c {
                    Some((id, n)) if *n > 0 => {
                        let saved = &self.prefixes[id];
                        assert!(saved.len() >= *n, "entry shorter than its use");
                        let mut row = vec![PAD; columns - n];
                        row.extend_from_slice(&saved[..*n]);
                        self.reused_columns += n;
                        row
                    }
                    _ => vec![PAD; columns],
                })
                .collect();
            let chunk: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
            kv.write(&chunk, true);
            tokens.advance(columns);
        }
        self.group = Some((kv, tokens));
        Ok(())
    }
    fn holds_row_start(&self, row: usize) -> bool {
        self.batch.geom.holds_row_start(row)
    }
    fn save_prefix(&mut self, id: EntryId, row: usize, len: usize) -> Result<()> {
        assert!(self.holds_row_start(row), "saving dropped columns");
        let h = self.batch.history(row);
        assert!(len <= h.len(), "saving more than the row holds");
        let saved = h[..len].to_vec();
        self.prefixes.insert(id, saved);
        Ok(())
    }
    fn drop_prefixes(&mut self, ids: &[EntryId]) {
        for id in ids {
            assert!(
                self.prefixes.remove(id).is_some(),
                "dropping unknown entry {id}"
            );
        }
    }
    fn prefill_step(&mut self, max_columns: usize) -> Result<bool> {
        let Some((kv, tokens)) = self.group.as_mut() else {
            return Ok(true);
        };
        if !tokens.is_done() {
            let chunk = tokens.next_chunk(max_columns);
            let n = chunk.first().map_or(0, |c| c.len());
            assert!(n > 0 && n <= max_columns.max(1));
            self.prefill_columns += n * chunk.len();
            kv.write(&chunk, false);
            tokens.advance(n);
            assert_eq!(tokens.done(), kv.geom.width(), "prefill and cache agree");
        }
        self.note_bytes();
        Ok(self.group.as_ref().is_none_or(|g| g.1.is_done()))
    }
    fn retain_prefill(&mut self, rows: &[usize]) -> Result<()> {
        let Some((kv, tokens)) = self.group.as_mut() else {
            return Ok(());
        };
        let trim = kv.filter(rows);
        tokens.retain(rows, trim);
        assert_eq!(tokens.done(), kv.geom.width(), "prefill and cache agree");
        if rows.is_empty() {
            self.group = None;
        }
        Ok(())
    }
    fn join(&mut self, samplers: &mut [&mut Sampler], ahead: Option<&[u32]>) -> Result<Vec<u32>> {
        let Some((kv, tokens)) = self.group.take() else {
            return Ok(Vec::new());
        };
        assert!(tokens.is_done());
        let rows = kv.geom.batch_size();
        assert_eq!(samplers.len(), rows);
        // The first tokens, from each row's whole prompt.
        let first: Vec<u32> = (0..rows).map(|r| next_of(kv.history(r))).collect();
        if self.batch.geom.batch_size() > 0 {
            self.joins_while_running += 1;
        }
        if std::mem::take(&mut self.promised_ahead) {
            self.wasted_aheads += 1;
        }
        if let Some(running) = ahead {
            assert_eq!(running.len(), self.batch.geom.batch_size());
            self.promised_ahead = true;
            self.joins_ahead += 1;
            self.promised_inputs = Some(running.iter().chain(&first).copied().collect());
        }
        self.batch.extend(kv);
        let g = &self.batch.geom;
        assert!(
            g.left_padding().iter().all(|&p| p <= g.width()),
            "a running row with unwritten prompt"
        );
        self.note_bytes();
        Ok(first)
    }
    fn prefill_remaining(&self) -> usize {
        self.group
            .as_ref()
            .map_or(0, |(_, t)| t.width().saturating_sub(t.done()))
    }
    fn decode(
        &mut self,
        inputs: &[u32],
        samplers: &mut [&mut Sampler],
        ahead: bool,
    ) -> Result<Vec<u32>> {
        if let Some(promised) = self.promised_inputs.take() {
            assert_eq!(
                promised, inputs,
                "the step queued at the join had these inputs"
            );
        }
        self.promised_ahead = ahead;
        self.aheads += usize::from(ahead);
        let rows = self.batch.geom.batch_size();
        assert_eq!(inputs.len(), rows);
        assert_eq!(samplers.len(), rows);
        if std::mem::take(&mut self.fail_next_decode) {
            return Err(Error::Mlx("injected failure".into()));
        }
        self.max_rows_seen = self.max_rows_seen.max(rows);
        let column: Vec<&[u32]> = inputs.iter().map(std::slice::from_ref).collect();
        self.batch.write(&column, false);
        self.note_bytes();
        Ok((0..rows).map(|r| next_of(self.batch.history(r))).collect())
    }
    fn retain(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() && std::mem::take(&mut self.promised_ahead) {
            self.wasted_aheads += 1;
        }
        if let Some(p) = self.promised_inputs.take() {
            // Keeping no rows drops the queued step (as the real runner does).
            if !rows.is_empty() {
                self.promised_inputs = Some(rows.iter().map(|&r| p[r]).collect());
            }
        }
        self.batch.filter(rows);
        Ok(())
    }
    fn reset(&mut self) {
        self.batch = HostKv::new(KvGeometry::default(), self.layout.0.clone());
        self.group = None;
        self.prefixes.clear();
        self.promised_ahead = false;
        self.promised_inputs = None;
    }
    fn kv_tokens(&self) -> usize {
        self.batch.geom.tokens() + self.group.as_ref().map_or(0, |g| g.0.geom.tokens())
    }
    fn kv_bytes(&self) -> usize {
        self.batch.bytes() + self.group.as_ref().map_or(0, |g| g.0.bytes())
    }
    fn take_eval_time(&mut self) -> Duration {
        Duration::ZERO
    }
}

/// Letters for ids: token t is the character 'a' + t % 26.
struct Letters;
impl TextDecoder for Letters {
    fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        Ok(ids
            .iter()
            .map(|&t| (b'a' + (t % 26) as u8) as char)
            .collect())
    }
}

struct Harness {
    sched: Scheduler,
    runner: FakeRunner,
    tokens: HashMap<RequestId, Vec<u32>>,
    text: HashMap<RequestId, String>,
    finished: HashMap<RequestId, (FinishReason, usize)>,
    decoder: Box<dyn TextDecoder>,
}

impl Harness {
    fn new(cfg: SchedulerConfig) -> Self {
        Self::with_layout(cfg, LAYOUT)
    }
    fn with_layout(cfg: SchedulerConfig, layout: KvLayout) -> Self {
        Self {
            sched: Scheduler::new(cfg, layout.clone()),
            runner: FakeRunner {
                batch: HostKv::new(KvGeometry::default(), layout.clone()),
                layout: FakeLayout(layout),
                ..Default::default()
            },
            tokens: HashMap::new(),
            text: HashMap::new(),
            finished: HashMap::new(),
            decoder: Box::new(Letters),
        }
    }
    fn submit(&mut self, id: RequestId, prompt: Vec<u32>, stop: StopConditions) -> Result<()> {
        self.sched.submit(
            id,
            prompt,
            SamplingParams::default(),
            stop,
            vec![2],
            Instant::now(),
        )
    }
    fn step(&mut self) {
        let budget = self.sched.config().max_kv_bytes;
        let mut events = Vec::new();
        self.sched
            .step(&mut self.runner, &*self.decoder, &mut events);
        for e in events {
            match e {
                Event::Token {
                    id, token, text, ..
                } => {
                    assert!(
                        !self.finished.contains_key(&id),
                        "token after the terminal event"
                    );
                    self.tokens.entry(id).or_default().push(token);
                    self.text.entry(id).or_default().push_str(&text);
                }
                Event::Finished {
                    id, reason, text, ..
                } => {
                    self.text.entry(id).or_default().push_str(&text);
                    let n = self.finished.get(&id).map_or(0, |f| f.1);
                    self.finished.insert(id, (reason, n + 1));
                }
            }
        }
        assert!(
            self.runner.max_bytes_seen <= budget,
            "KV cache allocated {} bytes over a budget of {budget}",
            self.runner.max_bytes_seen
        );
        self.check_prefix_cache();
    }
    /// The prefix cache stays within its budget, and the index and the runner agree on
    /// which entries exist and how long each is.
    fn check_prefix_cache(&self) {
        let index = self.sched.prefix_index();
        assert!(index.bytes() <= self.sched.config().prefix_cache_bytes);
        let entries = index.entries();
        assert_eq!(
            entries.len(),
            self.runner.prefixes.len(),
            "index and runner agree"
        );
        for (id, tokens) in entries {
            assert_eq!(
                self.runner.prefixes[&id], tokens,
                "entry {id} holds its tokens"
            );
        }
    }
    fn run(&mut self) {
        for _ in 0..10_000 {
            if self.sched.is_idle() {
                return;
            }
            self.step();
        }
        panic!("scheduler did not drain");
    }
}

fn limit(n: usize) -> StopConditions {
    StopConditions {
        max_tokens: n,
        ..Default::default()
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (seed * 13 + i * 5) % 90)
        .collect()
}

#[test]
fn more_requests_than_slots_each_get_their_own_tokens() {
    let mut h = Harness::new(SchedulerConfig {
        max_batch_size: 3,
        prefill_chunk: 4,
        ..Default::default()
    });
    let mut expected = HashMap::new();
    for id in 1..=10u64 {
        let p = prompt(id as u32, 1 + (id as usize * 7) % 23);
        let n = 1 + (id as usize * 3) % 9;
        expected.insert(id, alone(&p, n));
        h.submit(id, p, limit(n)).unwrap();
        // Requests keep arriving while others decode.
        h.step();
    }
    h.run();
    assert!(h.runner.max_rows_seen <= 3);
    assert!(
        h.runner.joins_while_running > 0,
        "continuous mode joins mid-decode"
    );
    for id in 1..=10u64 {
        assert_eq!(h.tokens[&id], expected[&id], "request {id}");
        assert_eq!(h.finished[&id], (FinishReason::Length, 1));
    }
}

#[test]
fn static_mode_never_joins_a_running_batch() {
    let mut h = Harness::new(SchedulerConfig {
        mode: BatchMode::Static,
        max_batch_size: 4,
        ..Default::default()
    });
    for id in 1..=9u64 {
        h.submit(
            id,
            prompt(id as u32, 5 + id as usize),
            limit(2 + id as usize % 4),
        )
        .unwrap();
    }
    h.run();
    assert_eq!(h.runner.joins_while_running, 0);
    for id in 1..=9u64 {
        assert_eq!(
            h.tokens[&id],
            alone(&prompt(id as u32, 5 + id as usize), 2 + id as usize % 4)
        );
    }
}

#[test]
fn cancel_while_waiting_prefilling_and_running() {
    let mut h = Harness::new(SchedulerConfig {
        max_batch_size: 2,
        prefill_chunk: 2,
        ..Default::default()
    });
    h.submit(1, prompt(1, 3), limit(50)).unwrap();
    h.submit(2, prompt(2, 40), limit(50)).unwrap();
    h.submit(3, prompt(3, 3), limit(50)).unwrap();
    h.submit(4, prompt(4, 3), limit(5)).unwrap();
    for _ in 0..3 {
        h.step();
    }
    // 1 and 2 were admitted as one group; 2's long prompt keeps it prefilling.
    assert!(h.sched.cancel(3), "waiting");
    assert!(h.sched.cancel(2), "prefilling");
    h.step();
    for _ in 0..30 {
        h.step();
    }
    assert!(h.tokens.get(&1).is_some_and(|t| !t.is_empty()));
    assert!(h.sched.cancel(1), "running");
    h.run();
    assert_eq!(h.finished[&1], (FinishReason::Cancelled, 1));
    assert_eq!(h.finished[&2], (FinishReason::Cancelled, 1));
    assert_eq!(h.finished[&3], (FinishReason::Cancelled, 1));
    assert!(!h.tokens.contains_key(&3));
    assert_eq!(h.tokens[&4], alone(&prompt(4, 3), 5), "survivor unaffected");
    assert!(!h.sched.cancel(1), "finished ids are unknown");
}

#[test]
fn stop_string_across_tokens_is_not_emitted() {
    let p = prompt(5, 4);
    let full: String = Letters.decode_ids(&alone(&p, 12)).unwrap();
    let stop = full[5..8].to_owned();
    let mut h = Harness::new(SchedulerConfig::default());
    let cond = StopConditions {
        max_tokens: 12,
        stop_strings: vec![stop.clone()],
        ..Default::default()
    };
    h.submit(1, p, cond).unwrap();
    h.run();
    let first = full.find(&stop).unwrap();
    assert_eq!(h.text[&1], full[..first]);
    assert_eq!(h.finished[&1].0, FinishReason::Stop);
}

#[test]
fn eos_and_stop_tokens_end_with_stop() {
    let p = prompt(6, 4);
    let out = alone(&p, 6);
    let mut h = Harness::new(SchedulerConfig::default());
    let cond = StopConditions {
        max_tokens: 6,
        stop_token_ids: vec![out[2]],
        ..Default::default()
    };
    h.submit(1, p, cond).unwrap();
    h.run();
    let first = out.iter().position(|&t| t == out[2]).unwrap();
    assert_eq!(h.tokens[&1], out[..=first]);
    assert_eq!(h.finished[&1].0, FinishReason::Stop);
}

#[test]
fn limits_are_enforced_at_submit() {
    let mut h = Harness::new(SchedulerConfig {
        max_waiting: 2,
        max_context: 16,
        ..Default::default()
    });
    assert!(matches!(
        h.submit(1, prompt(1, 16), limit(1)),
        Err(Error::PromptTooLong { .. })
    ));
    assert!(matches!(
        h.submit(1, vec![], limit(1)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        h.submit(1, prompt(1, 2), limit(0)),
        Err(Error::InvalidArgument(_))
    ));
    h.submit(1, prompt(1, 4), limit(100)).unwrap();
    h.submit(2, prompt(2, 4), limit(3)).unwrap();
    assert!(matches!(
        h.submit(3, prompt(3, 4), limit(3)),
        Err(Error::Busy(2))
    ));
    h.run();
    // The context caps generation: 16 - 4 prompt tokens.
    assert_eq!(h.tokens[&1].len(), 12);
    assert_eq!(h.finished[&1].0, FinishReason::Length);
}

#[test]
fn kv_budget_limits_admission() {
    // Room for exactly one row of 15 tokens (plus the spare step), not two.
    let budget = footprint_bytes(&LAYOUT, 1, 15, 1);
    let mut h = Harness::new(SchedulerConfig {
        max_kv_bytes: budget,
        ..Default::default()
    });
    h.submit(1, prompt(1, 5), limit(10)).unwrap();
    h.submit(2, prompt(2, 5), limit(10)).unwrap();
    h.step();
    h.step();
    assert_eq!(
        h.sched.stats().running + h.sched.stats().prefilling,
        1,
        "second waits for budget"
    );
    h.run();
    assert_eq!(h.tokens[&2], alone(&prompt(2, 5), 10));
    // A request that cannot fit alone is refused; one that fits only with fewer tokens is
    // capped to what fits.
    let limit_len = h.sched.config().kv_row_limit(&LAYOUT);
    assert_eq!(limit_len, 15);
    assert!(matches!(
        h.submit(3, prompt(3, 15), limit(1)),
        Err(Error::InvalidArgument(_))
    ));
    h.submit(4, prompt(4, 10), limit(100)).unwrap();
    h.run();
    assert_eq!(h.tokens[&4].len(), 5);
    assert_eq!(h.finished[&4].0, FinishReason::Length);
}

/// With only sliding-window layers a row's KV stops growing at its window and a pass: a
/// budget that holds that much runs rows many times longer, within the budget at every step;
/// with a full layer as well, the budget bounds the row length again.
#[test]
fn sliding_window_layers_bound_the_footprint() {
    let sliding = KvLayout {
        windows: vec![Some(32), Some(32)],
        ..KvLayout::full(2, 1, 1)
    };
    let cfg = SchedulerConfig {
        max_context: 4096,
        prefill_chunk: 16,
        prefill_chunk_decoding: 16,
        max_kv_bytes: footprint_bytes(&sliding, 2, usize::MAX, 16),
        ..Default::default()
    };
    assert_eq!(cfg.max_kv_bytes, 2 * 2 * (32 + 16 + STEP - 1) * 8);
    assert_eq!(cfg.kv_row_limit(&sliding), usize::MAX / 2);
    let mixed = KvLayout {
        windows: vec![None, Some(32)],
        ..KvLayout::full(2, 1, 1)
    };
    let longest = cfg.kv_row_limit(&mixed);
    assert!(footprint_bytes(&mixed, 1, longest, 16) <= cfg.max_kv_bytes);
    assert!(footprint_bytes(&mixed, 1, longest + 1, 16) > cfg.max_kv_bytes);
    assert!(longest < 1000);

    let mut h = Harness::with_layout(cfg, sliding);
    h.submit(1, prompt(1, 600), limit(1500)).unwrap();
    h.submit(2, prompt(2, 50), limit(900)).unwrap();
    h.run();
    assert_eq!(h.tokens[&1], alone(&prompt(1, 600), 1500));
    assert_eq!(h.tokens[&2], alone(&prompt(2, 50), 900));
    assert!(h.runner.max_bytes_seen > 0);
}

/// The hang an outside check found: a short and a long prompt prefilled as one group, the
/// long one cancelled mid-prefill while another request decodes. The short one's padding is
/// longer than what was written so far; the trim must not remove more than that.
#[test]
fn cancel_long_prompt_mid_prefill_keeps_its_group_mate_correct() {
    for chunk in [1, 7, 64, 256] {
        let mut h = Harness::new(SchedulerConfig {
            prefill_chunk: chunk,
            ..Default::default()
        });
        h.submit(1, prompt(1, 5), limit(200)).unwrap();
        h.step();
        h.step();
        h.submit(2, prompt(2, 20), limit(30)).unwrap();
        h.submit(3, prompt(3, 1000), limit(30)).unwrap();
        // Into the group's prefill, before the long prompt is done.
        for _ in 0..10 {
            if h.sched.stats().prefilling == 2 {
                break;
            }
            h.step();
        }
        h.step();
        assert_eq!(h.sched.stats().prefilling, 2, "chunk {chunk}");
        assert!(h.sched.cancel(3));
        let steps_before = h.sched.stats().steps;
        h.run();
        assert!(
            h.sched.stats().steps - steps_before < 400,
            "drains in bounded steps"
        );
        assert_eq!(h.finished[&3], (FinishReason::Cancelled, 1));
        assert_eq!(h.tokens[&2], alone(&prompt(2, 20), 30), "chunk {chunk}");
        assert_eq!(h.tokens[&1], alone(&prompt(1, 5), 200));
    }
}

/// Seeded randomness for the randomized tests (ChaCha: a stable stream for a seed).
struct Rng(rand_chacha::ChaCha8Rng);
impl Rng {
    fn new(seed: u64) -> Self {
        use rand_chacha::rand_core::SeedableRng;
        Self(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }
    fn below(&mut self, n: usize) -> usize {
        use rand_chacha::rand_core::RngCore;
        (self.0.next_u64() % n as u64) as usize
    }
}

/// Random interleavings of submits (mixed prompt lengths), cancels at any moment (queued,
/// mid-prefill of mixed-length groups, decoding, already finished) and steps, under random
/// limits and both batch modes. Every request ends exactly once; every request not cancelled
/// gets exactly the tokens it would get alone; the KV cache never exceeds its budget; the
/// scheduler drains in a bounded number of steps.
#[test]
fn randomized_operation_sequences() {
    let (mut hits, mut reused) = (0, 0);
    for seed in 1..=300u64 {
        let mut rng = Rng::new(seed);
        let mode = if rng.below(4) == 0 {
            BatchMode::Static
        } else {
            BatchMode::Continuous
        };
        let max_len = 400;
        let rows = 1 + rng.below(6);
        // Full attention, or (a third of the seeds) sliding windows on some or all layers,
        // so columns are dropped under every operation and the footprint bound counts them.
        let layout = match rng.below(6) {
            0 => KvLayout {
                windows: vec![None, Some(1 + rng.below(40)), Some(1 + rng.below(300))],
                ..KvLayout::full(3, 1, 1)
            },
            1 => KvLayout {
                windows: vec![Some(1 + rng.below(100)); 2],
                ..KvLayout::full(2, 1, 1)
            },
            _ => LAYOUT,
        };
        let cfg = SchedulerConfig {
            mode,
            max_batch_size: rows,
            max_waiting: 64,
            max_context: 512,
            prefill_chunk: 1 + rng.below(96),
            prefill_chunk_decoding: 1 + rng.below(96),
            max_prefill_group: 1 + rng.below(6),
            // Between one and several long rows' worth.
            max_kv_bytes: footprint_bytes(&layout, 1 + rng.below(rows + 2), max_len, 96),
            skip_wasted_ahead: rng.below(2) == 0,
            // Off, a few entries' worth (evicting all the time), or room for everything.
            prefix_cache_bytes: [0, 8 * (1 + rng.below(300)), 1 << 20][rng.below(3)],
        };
        let mut h = Harness::with_layout(cfg, layout.clone());
        let system = prompt(seed as u32 + 7, 1 + rng.below(120));
        let mut submitted: Vec<(RequestId, Vec<u32>, usize)> = Vec::new();
        let mut cancelled = std::collections::HashSet::new();
        let ops = 20 + rng.below(60);
        for op in 0..ops {
            match rng.below(10) {
                0..=3 => {
                    let id = op as RequestId + 1;
                    let len = match rng.below(3) {
                        0 => 1 + rng.below(4),
                        1 => 1 + rng.below(40),
                        _ => 1 + rng.below(max_len - 40),
                    };
                    let n = 1 + rng.below(24);
                    let fresh = prompt(seed as u32 + id as u32, len);
                    // Prompts that share prefixes: a system prompt, or the next turn of an
                    // earlier request (its prompt, some of its output, then new tokens).
                    let mut p = match rng.below(3) {
                        0 => system.iter().chain(&fresh).copied().collect(),
                        1 if !submitted.is_empty() => {
                            let (_, before, m) = &submitted[rng.below(submitted.len())];
                            let said = alone(before, (*m).min(512 - before.len()));
                            let mut p = before.clone();
                            p.extend_from_slice(&said[..rng.below(said.len() + 1)]);
                            p.extend_from_slice(&fresh[..rng.below(fresh.len()) + 1]);
                            p
                        }
                        _ => fresh,
                    };
                    p.truncate(max_len);
                    if h.submit(id, p.clone(), limit(n)).is_ok() {
                        submitted.push((id, p, n));
                    }
                }
                4 | 5 if !submitted.is_empty() => {
                    let id = submitted[rng.below(submitted.len())].0;
                    if h.sched.cancel(id) {
                        cancelled.insert(id);
                    }
                }
                _ => {
                    for _ in 0..1 + rng.below(4) {
                        h.step();
                    }
                }
            }
        }
        h.run();
        for (id, p, n) in &submitted {
            let (reason, count) = h.finished[id];
            assert_eq!(count, 1, "seed {seed}: request {id} ended {count} times");
            if !cancelled.contains(id) {
                // EOS (token 2) never comes out of `next_of`, so every survivor runs to n.
                let room = h.sched.config().kv_row_limit(&layout).min(512) - p.len();
                let want = alone(p, (*n).min(room));
                assert_eq!(h.tokens[id], want, "seed {seed}: request {id}");
                assert_eq!(reason, FinishReason::Length);
            } else if reason != FinishReason::Cancelled {
                // A cancel racing the last token: it finished first.
                assert_eq!(reason, FinishReason::Length);
            }
        }
        assert!(h.sched.is_idle());
        assert_eq!(h.runner.kv_bytes(), 0, "seed {seed}: cache emptied");
        hits += h.sched.stats().prefix.hits;
        reused += h.runner.reused_columns;
    }
    // The shared prefixes above were reused, not only stored.
    assert!(
        hits > 100 && reused > 1000,
        "{hits} hits, {reused} columns reused"
    );
}

#[test]
fn runner_failure_fails_active_requests_once_and_queue_survives() {
    let mut h = Harness::new(SchedulerConfig {
        max_batch_size: 1,
        ..Default::default()
    });
    h.submit(1, prompt(1, 3), limit(5)).unwrap();
    h.submit(2, prompt(2, 3), limit(5)).unwrap();
    h.step();
    h.runner.fail_next_decode = true;
    h.step();
    assert_eq!(h.finished[&1], (FinishReason::Error, 1));
    h.run();
    assert_eq!(h.tokens[&2], alone(&prompt(2, 3), 5));
    assert_eq!(h.finished[&2], (FinishReason::Length, 1));
}

#[test]
fn one_token_prompts_and_one_token_outputs() {
    let mut h = Harness::new(SchedulerConfig::default());
    h.submit(1, vec![7], limit(1)).unwrap();
    h.submit(2, vec![9], limit(3)).unwrap();
    h.run();
    assert_eq!(h.tokens[&1], alone(&[7], 1));
    assert_eq!(h.tokens[&2], alone(&[9], 3));
}

#[test]
fn split_at_stop_holds_back_possible_prefixes() {
    let stops = vec!["END".to_owned()];
    assert_eq!(split_at_stop("abcE", &stops), (3, false));
    assert_eq!(split_at_stop("abcEN", &stops), (3, false));
    assert_eq!(split_at_stop("abENDx", &stops), (2, true));
    assert_eq!(split_at_stop("abc", &stops), (3, false));
}

/// A byte-level tokenizer stand-in: ids 0..=9 are "special" (no text); 200..=203 are the 4
/// bytes of one emoji (U+1F600) and 210..=212 the 3 bytes of the euro sign, shown as U+FFFD
/// until complete; 100 is a lone space piece and 101 a " Hello" piece, and like SentencePiece
/// a decode drops the leading space of its first piece; others are letters. Counts the ids
/// decoded.
struct Tricky(std::cell::Cell<usize>);
impl TextDecoder for Tricky {
    fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        self.0.set(self.0.get() + ids.len());
        let mut bytes = Vec::new();
        for &t in ids {
            match t {
                0..=9 => {}
                100 => bytes.push(b' '),
                101 => bytes.extend_from_slice(b" Hello"),
                200..=203 => bytes.push([0xF0, 0x9F, 0x98, 0x80][(t - 200) as usize]),
                210..=212 => bytes.push([0xE2, 0x82, 0xAC][(t - 210) as usize]),
                _ => bytes.push(b'a' + (t % 26) as u8),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(text.strip_prefix(' ').map(str::to_owned).unwrap_or(text))
    }
}

fn decode_incrementally(dec: &Tricky, ids: &[u32]) -> String {
    let mut d = IncrementalDecoder::new();
    let mut out = String::new();
    for &t in ids {
        out.push_str(&d.push(dec, t).unwrap());
    }
    out + &d.flush(dec).unwrap()
}

#[test]
fn incremental_decoder_work_stays_bounded_and_text_complete() {
    let dec = Tricky(Default::default());
    // 10,000 special tokens (as with ignore_eos after EOS): linear work, no text.
    let mut ids = vec![30];
    ids.extend(std::iter::repeat_n(0, 10_000));
    ids.extend([31, 200, 201, 202, 203, 32]);
    assert_eq!(decode_incrementally(&dec, &ids), "ef\u{1F600}g");
    assert!(dec.0.get() < 40_000, "decoded {} ids", dec.0.get());
    // A character, specials, another character, then plain text: nothing is lost or stalls
    // (this sequence once left the window growing and every later letter unemitted).
    for second in [&[200u32, 201, 202, 203][..], &[210, 211, 212]] {
        let dec = Tricky(Default::default());
        let mut ids = vec![200, 201, 202, 203];
        ids.extend([0; 6]);
        ids.extend_from_slice(second);
        ids.extend((0..1000).map(|i| 30 + i % 20));
        let want = dec.decode_ids(&ids).unwrap();
        dec.0.set(0);
        assert_eq!(decode_incrementally(&dec, &ids), want);
        assert!(dec.0.get() < ids.len() * 20, "decoded {} ids", dec.0.get());
    }
    // Bytes that never complete a character are emitted lossily, not held forever.
    let dec = Tricky(Default::default());
    let text = decode_incrementally(&dec, &[200; 1000]);
    assert!(text.contains('\u{FFFD}'));
    assert!(dec.0.get() < 1000 * 20);
    // SentencePiece's first piece: a lone leading space piece shows with what follows.
    let dec = Tricky(Default::default());
    assert_eq!(decode_incrementally(&dec, &[100, 101]), " Hello");
    assert_eq!(
        decode_incrementally(&dec, &[0, 0, 100, 101, 100, 31]),
        " Hello f"
    );
}

/// Random token streams of complete characters, specials and space pieces: the incremental
/// text always equals decoding everything at once, with bounded work per token.
#[test]
fn incremental_decoder_matches_a_full_decode() {
    let units: [&[u32]; 7] = [
        &[30],
        &[47],
        &[0],
        &[200, 201, 202, 203],
        &[210, 211, 212],
        &[100],
        &[101],
    ];
    for seed in 1..=500u64 {
        let mut rng = Rng::new(seed);
        let n = rng.below(120);
        let ids: Vec<u32> = (0..n)
            .flat_map(|_| units[rng.below(units.len())].iter().copied())
            .collect();
        let dec = Tricky(Default::default());
        let want = dec.decode_ids(&ids).unwrap();
        dec.0.set(0);
        assert_eq!(
            decode_incrementally(&dec, &ids),
            want,
            "seed {seed}: {ids:?}"
        );
        assert!(dec.0.get() <= (2 * tokenizer::MAX_PENDING + 2) * (ids.len() + 1));
    }
}

/// Letters, but a window whose last id is 40 or more renders with a trailing U+FFFD, so the
/// incremental decoder holds that token's text back until the next token or the final flush.
struct LateLetters;
impl TextDecoder for LateLetters {
    fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        let mut s = Letters.decode_ids(ids)?;
        if ids.last().is_some_and(|&t| t >= 40) {
            s.push('\u{FFFD}');
        }
        Ok(s)
    }
}

#[test]
fn text_flushed_at_the_end_is_checked_for_stop_strings() {
    // A request whose last token's text only appears at the final flush, and a stop string
    // that the flushed text completes.
    let (p, out) = (1..1000)
        .map(|seed| {
            let p = prompt(seed, 4);
            let out = alone(&p, 6);
            (p, out)
        })
        .find(|(_, out)| out[5] >= 40 && out[4] < 40)
        .expect("some prompt ends that way");
    let letters = Letters.decode_ids(&out).unwrap();
    let stop = letters[4..6].to_owned();
    let mut h = Harness::new(SchedulerConfig::default());
    h.decoder = Box::new(LateLetters);
    let cond = StopConditions {
        max_tokens: 6,
        stop_strings: vec![stop.clone()],
        ..Default::default()
    };
    h.submit(1, p, cond).unwrap();
    h.run();
    let first = letters.find(&stop).unwrap();
    assert_eq!(h.text[&1], letters[..first], "stop {stop:?} in {letters:?}");
    assert_eq!(h.finished[&1].0, FinishReason::Stop);
}

/// Decode-ahead is offered only when it will be used: not on the step where every row ends by
/// length, nor on the step after which a group joins. Requests of equal length (a static
/// wave, a closed loop) and requests arriving mid-decode waste no step; without the hint,
/// both would.
#[test]
fn no_step_is_queued_ahead_only_to_be_thrown_away() {
    for skip in [true, false] {
        for mode in [BatchMode::Static, BatchMode::Continuous] {
            let mut h = Harness::new(SchedulerConfig {
                mode,
                max_batch_size: 3,
                prefill_chunk: 64,
                skip_wasted_ahead: skip,
                ..Default::default()
            });
            for id in 1..=3u64 {
                h.submit(id, prompt(id as u32, 10), limit(6)).unwrap();
            }
            h.run();
            // Arrivals while others decode, of varied lengths, some ending together.
            for id in 4..=9u64 {
                h.submit(
                    id,
                    prompt(id as u32, 3 + id as usize),
                    limit(2 + id as usize % 3),
                )
                .unwrap();
                h.step();
                h.step();
            }
            h.run();
            for id in 1..=9u64 {
                assert_eq!(h.finished[&id], (FinishReason::Length, 1));
            }
            assert!(h.runner.aheads > 0 && h.runner.joins_ahead > 0);
            if skip {
                assert_eq!(h.runner.wasted_aheads, 0, "{mode:?}");
            } else {
                assert!(
                    h.runner.wasted_aheads > 0,
                    "{mode:?}: the test reaches the cases"
                );
            }
        }
    }
}

/// The prefix cache with the fake runner: a next chat turn, a burst sharing a system prompt,
/// a prompt that is a prefix of a cached one, and a prompt cached in full each reuse what
/// was computed, and every output is the one the request would get alone.
#[test]
fn prefix_cache_reuses_prompts_and_outputs() {
    let mut h = Harness::new(SchedulerConfig {
        prefill_chunk: 16,
        ..Default::default()
    });
    let first = prompt(1, 40);
    h.submit(1, first.clone(), limit(10)).unwrap();
    h.run();
    assert_eq!(h.tokens[&1], alone(&first, 10));
    // Next turn: the whole history (prompt + output) plus new tokens.
    let mut turn = first.clone();
    turn.extend_from_slice(&h.tokens[&1]);
    turn.extend_from_slice(&prompt(2, 5));
    let before = h.runner.prefill_columns;
    h.submit(2, turn.clone(), limit(10)).unwrap();
    h.run();
    assert_eq!(h.tokens[&2], alone(&turn, 10));
    // The KV of the prompt and of all but the last output token was saved.
    assert_eq!(h.sched.running.len() + h.sched.waiting.len(), 0);
    assert_eq!(h.runner.prefill_columns - before, turn.len() - (40 + 9));
    // A prefix of a cached sequence, and a sequence cached in full: nothing computed but
    // the last prompt token (whose logits give the first token).
    for (id, p) in [(3, turn[..30].to_vec()), (4, turn.clone())] {
        let before = h.runner.prefill_columns;
        h.submit(id, p.clone(), limit(5)).unwrap();
        h.run();
        assert_eq!(h.tokens[&id], alone(&p, 5));
        assert_eq!(h.runner.prefill_columns, before + 1, "request {id}");
    }
    // A burst sharing a long system prompt: the first computes it, the rest reuse it.
    let system = prompt(9, 100);
    let burst: Vec<Vec<u32>> = (0..4)
        .map(|i| system.iter().chain(&prompt(20 + i, 8)).copied().collect())
        .collect();
    let before = h.runner.prefill_columns;
    for (i, p) in burst.iter().enumerate() {
        h.submit(10 + i as u64, p.clone(), limit(6)).unwrap();
    }
    h.run();
    for (i, p) in burst.iter().enumerate() {
        assert_eq!(h.tokens[&(10 + i as u64)], alone(p, 6));
    }
    // 108 columns for the first, then the 8 after the system prompt for each of the others.
    assert_eq!(h.runner.prefill_columns - before, 108 + 3 * 8);
    let stats = h.sched.stats().prefix;
    assert!(stats.hits >= 6, "{stats:?}");
}

/// With the cache off nothing is stored or reused.
#[test]
fn prefix_cache_off_stores_nothing() {
    let mut h = Harness::new(SchedulerConfig {
        prefix_cache_bytes: 0,
        ..Default::default()
    });
    let p = prompt(1, 40);
    for id in 1..=2 {
        h.submit(id, p.clone(), limit(4)).unwrap();
        h.run();
    }
    assert_eq!(h.runner.reused_columns, 0);
    assert!(h.runner.prefixes.is_empty());
    assert_eq!(h.sched.stats().prefix, PrefixStats::default());
}

/// A request sharing a long prefix with a running one: the prefix is copied before the
/// decode step, so the step's decode-ahead prediction already knows the group will join, and
/// no queued step is thrown away. A gain of a few tokens over the cache copies nothing.
#[test]
fn running_prefixes_are_copied_before_the_decode_step() {
    let mut h = Harness::new(SchedulerConfig {
        prefill_chunk: 64,
        ..Default::default()
    });
    let system = prompt(9, 200);
    let a: Vec<u32> = system.iter().chain(&prompt(1, 5)).copied().collect();
    h.submit(1, a.clone(), limit(40)).unwrap();
    for _ in 0..8 {
        h.step();
    }
    let b: Vec<u32> = system.iter().chain(&prompt(2, 5)).copied().collect();
    h.submit(2, b.clone(), limit(5)).unwrap();
    h.run();
    assert_eq!(h.tokens[&1], alone(&a, 40));
    assert_eq!(h.tokens[&2], alone(&b, 5));
    assert_eq!(h.runner.wasted_aheads, 0);
    assert!(h.tokens[&2].len() == 5 && h.runner.reused_columns >= 200);

    // The system prompt is cached now; a request sharing one more token with a running one
    // reuses the cache without copying the running row.
    let c: Vec<u32> = system.iter().chain(&[7, 7]).copied().collect();
    let d: Vec<u32> = system.iter().chain(&[7, 8]).copied().collect();
    h.submit(3, c.clone(), limit(30)).unwrap();
    for _ in 0..4 {
        h.step();
    }
    let held = h.sched.prefix_index().entries().len();
    let bytes = h.sched.prefix_index().bytes();
    h.submit(4, d.clone(), limit(3)).unwrap();
    h.step();
    assert_eq!(
        h.sched.prefix_index().entries().len(),
        held,
        "no copy for one token"
    );
    assert_eq!(
        h.sched.prefix_index().bytes(),
        bytes,
        "no copy for one token"
    );
    h.run();
    assert_eq!(h.tokens[&4], alone(&d, 3));
}
