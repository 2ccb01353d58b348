//! Admission, batching policy, chunked prefill, stopping and events. Pure CPU.
//!
//! The scheduler decides; a [`Runner`] executes (the MLX one lives in `runner`, a fake one in
//! the tests below). Each [`Scheduler::step`]:
//! 1. drops cancelled requests (from the queue, the prefill group or the running batch);
//! 2. runs one decode step for every running row, streams tokens, and removes rows that
//!    finished, so they leave at once;
//! 3. advances the prefill of the admitted group by one chunk (admitting a new group when
//!    none is prefilling). When the group's last chunk is done, the logits of each
//!    prompt's last token give its first generated token (streamed at once) and the group
//!    joins the running batch. A prefix of a prompt may come from the prefix cache instead
//!    (`prefix_cache`): all but the last token at most.
//!
//! In [`BatchMode::Static`] a group is admitted only when nothing runs, and runs to completion.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::constraint::{ConstraintState, RowConstraint};
use crate::error::{Error, Result};
use crate::kv_cache::{footprint_bytes, KvLayout};
use crate::prefix_cache::{common_prefix, EntryId, PrefixIndex, PrefixStats};
use crate::request::{Event, FinishReason, RequestId, RequestStats, StopConditions, TokenLogprobs};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, TextDecoder};

/// What executes the scheduler's decisions. Row order is the scheduler's: rows appended by
/// [`join`](Runner::join) come after existing rows.
pub trait Runner {
    /// Starts prefilling a group of whole prompts (each at least one token).
    /// `cached[r] = Some((entry, n))`: row r's first n tokens are not computed but copied
    /// from prefix-cache entry `entry` (saved by [`save_prefix`](Runner::save_prefix)). The
    /// prompts are left-padded to one width as usual; every cached part ends at the same
    /// column (see [`prefix_columns`](crate::kv_cache::prefix_columns)).
    fn start_prefill(
        &mut self,
        prompts: &[&[u32]],
        cached: &[Option<(EntryId, usize)>],
    ) -> Result<()>;
    /// Prefills up to `max_columns` more columns of the group; true when the group is done.
    fn prefill_step(&mut self, max_columns: usize) -> Result<bool>;
    /// Keeps only these rows of the prefill group.
    fn retain_prefill(&mut self, rows: &[usize]) -> Result<()>;
    /// Appends the prefilled group to the running batch; returns each joining row's first
    /// generated token, chosen from the logits of its last prompt token with its sampler.
    /// `ahead`: the running rows' next inputs when the merged batch goes on decoding; a
    /// runner may then queue the merged batch's first decode step (inputs: these, then the
    /// joining rows' first tokens) before returning, as [`decode`](Runner::decode) does with
    /// `ahead`. The next `decode` then has exactly those inputs (rows that leave first are
    /// dropped from it by [`retain`](Runner::retain)).
    fn join(&mut self, samplers: &mut [&mut Sampler], ahead: Option<&[u32]>) -> Result<Vec<u32>>;
    /// One decode step: `inputs[r]` is row r's next input token; returns each row's next token.
    /// `ahead`: the rows will all go on decoding unchanged after this step, so a runner may
    /// start the next step before returning (decode-ahead). False when a group joins or every
    /// row ends this step, where a step queued ahead would be thrown away.
    fn decode(
        &mut self,
        inputs: &[u32],
        samplers: &mut [&mut Sampler],
        ahead: bool,
    ) -> Result<Vec<u32>>;
    /// Prompt columns the prefill group still has to process (0 without a group). Only a
    /// hint for `ahead`; the default (unknown) never predicts a join.
    fn prefill_remaining(&self) -> usize {
        usize::MAX
    }
    /// Keeps only these rows of the running batch.
    fn retain(&mut self, rows: &[usize]) -> Result<()>;
    /// The log-probabilities of the tokens the last [`join`](Runner::join) or
    /// [`decode`](Runner::decode) returned, one entry per row, for rows whose sampling
    /// parameters asked (`logprobs`); empty when no row asked.
    fn take_logprobs(&mut self) -> Vec<Option<TokenLogprobs>> {
        Vec::new()
    }
    /// Whether running row `row`'s KV is still held from its first token in every layer
    /// (sliding-window layers drop the columns their window has passed): only then can
    /// [`save_prefix`](Runner::save_prefix) copy a prefix of it.
    fn holds_row_start(&self, row: usize) -> bool;
    /// Saves a copy of the KV of running row `row`'s first `len` tokens as prefix-cache
    /// entry `id` (only where [`holds_row_start`](Runner::holds_row_start)).
    fn save_prefix(&mut self, id: EntryId, row: usize, len: usize) -> Result<()>;
    /// Forgets these prefix-cache entries.
    fn drop_prefixes(&mut self, ids: &[EntryId]);
    /// Drops all state (after an error).
    fn reset(&mut self);
    /// KV tokens held (running batch plus prefill group).
    fn kv_tokens(&self) -> usize;
    /// Bytes the KV caches allocate (running batch plus prefill group; padding included).
    fn kv_bytes(&self) -> usize;
    /// Time spent waiting for the device since the last call (for overhead accounting).
    fn take_eval_time(&mut self) -> Duration;
}

/// How requests are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u32)]
pub enum BatchMode {
    /// Requests join and leave the running batch at every step.
    #[default]
    Continuous = 0,
    /// Fixed batches that run to completion before the next one starts (like mlx-lm's
    /// `batch_generate`); for comparison and parity tests.
    Static = 1,
}

/// Limits and policy knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub mode: BatchMode,
    /// Most rows decoding at once.
    pub max_batch_size: usize,
    /// Most requests waiting for admission; more are refused as busy.
    pub max_waiting: usize,
    /// Most bytes the KV caches may allocate (running batch plus prefill group, padding and
    /// spare capacity included). A request is admitted only if the cache, with every admitted
    /// request grown to its prompt + max_tokens, stays within it; see
    /// [`footprint_bytes`](crate::kv_cache::footprint_bytes).
    pub max_kv_bytes: usize,
    /// Context length; prompts must leave room for one generated token.
    pub max_context: usize,
    /// Prompt tokens prefilled per step, over all rows of the prefill group (a token budget,
    /// like vLLM's max_num_batched_tokens). In continuous mode a group is only as large as
    /// fits this budget (at least one request), so the first requests of a burst start
    /// streaming before the whole burst is prefilled.
    pub prefill_chunk: usize,
    /// The prefill token budget of a step while other rows are decoding (at most
    /// `prefill_chunk`): every such step makes each decoding row wait for the chunk, so a
    /// smaller chunk there shortens the longest gaps between a stream's tokens, at the cost
    /// of more steps to a prompt's first token. With no row decoding, `prefill_chunk`
    /// applies.
    pub prefill_chunk_decoding: usize,
    /// Most requests prefilled together in one group.
    pub max_prefill_group: usize,
    /// Do not let the runner queue a decode step ahead when it would be thrown away (a
    /// group joins, or every row ends by length). Default true; off only to measure it.
    pub skip_wasted_ahead: bool,
    /// Most bytes the prefix cache keeps (KV of finished requests' prompts and outputs, and
    /// of running requests' prefixes, reused by later requests that start with the same
    /// tokens); 0 turns it off. Separate from `max_kv_bytes`.
    pub prefix_cache_bytes: usize,
}

impl SchedulerConfig {
    /// The longest row (prompt + generated tokens) that fits the KV budget alone (at most
    /// `usize::MAX / 2`: with only sliding-window layers, a row's KV stops growing).
    pub fn kv_row_limit(&self, layout: &KvLayout) -> usize {
        let fits = |n: usize| footprint_bytes(layout, 1, n, self.max_pass()) <= self.max_kv_bytes;
        // The footprint grows with the length: the largest length that fits, by bisection.
        let (mut lo, mut hi) = (0usize, usize::MAX / 2);
        if fits(hi) {
            return hi;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Most columns one forward pass writes: a prefill chunk (in static mode, a whole
    /// prompt). Bounds what a sliding-window layer holds (see
    /// [`footprint_bytes`](crate::kv_cache::footprint_bytes)).
    pub fn max_pass(&self) -> usize {
        match self.mode {
            BatchMode::Continuous => self.prefill_chunk.max(1),
            BatchMode::Static => usize::MAX,
        }
    }

    /// Checks a request against the limits without queueing it.
    pub fn check(
        &self,
        prompt_len: usize,
        stop: &StopConditions,
        sampling: &SamplingParams,
        layout: &KvLayout,
    ) -> Result<()> {
        sampling.validate()?;
        if stop.max_tokens == 0 {
            return Err(Error::InvalidArgument(
                "max_tokens must be at least 1".into(),
            ));
        }
        if prompt_len == 0 {
            return Err(Error::InvalidArgument("the prompt is empty".into()));
        }
        if prompt_len >= self.max_context {
            return Err(Error::PromptTooLong {
                prompt: prompt_len,
                context: self.max_context,
            });
        }
        let limit = self.kv_row_limit(layout);
        if prompt_len + 1 > limit {
            return Err(Error::InvalidArgument(format!(
                "a prompt of {prompt_len} tokens does not fit the KV budget of {} bytes \
                 (room for {limit} tokens in one row)",
                self.max_kv_bytes
            )));
        }
        Ok(())
    }
}

/// The default of [`SchedulerConfig::prefill_chunk_decoding`] (see docs/benchmarks.md).
pub const DEFAULT_PREFILL_CHUNK_DECODING: usize = 512;

/// The default of [`SchedulerConfig::prefill_chunk`] (see docs/benchmarks.md).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// The default KV budget: 2 GiB.
pub const DEFAULT_MAX_KV_BYTES: usize = 2 << 30;

/// The default prefix-cache budget: 512 MiB.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 512 << 20;

/// A waiting request that shares at least this many more tokens with a prompt being admitted
/// than the prefix cache holds waits for that prompt's prefill, then reuses it.
const DEFER_FOR_SHARED: usize = 32;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            mode: BatchMode::Continuous,
            max_batch_size: 8,
            max_waiting: 256,
            max_kv_bytes: DEFAULT_MAX_KV_BYTES,
            max_context: 8192,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            prefill_chunk_decoding: DEFAULT_PREFILL_CHUNK_DECODING,
            max_prefill_group: 8,
            skip_wasted_ahead: true,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

struct Seq {
    id: RequestId,
    prompt: Vec<u32>,
    sampler: Sampler,
    stop: StopConditions,
    eos: Vec<u32>,
    generated: usize,
    next_input: u32,
    /// Generated token ids (the history after the prompt, for the prefix cache).
    generated_ids: Vec<u32>,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    decoder: IncrementalDecoder,
    held_text: String,
    cancelled: bool,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

impl Seq {
    /// The longest this request's KV row can grow.
    fn final_len(&self) -> usize {
        self.prompt.len() + self.stop.max_tokens
    }

    /// Tokens whose KV a running row holds: the prompt, then every generated token but the
    /// last (which is the next step's input).
    fn kv_len(&self) -> usize {
        self.prompt.len() - 1 + self.generated
    }

    /// The first `n` tokens of the history (prompt, then generated tokens).
    fn history(&self, n: usize) -> Vec<u32> {
        self.prompt
            .iter()
            .chain(&self.generated_ids)
            .take(n)
            .copied()
            .collect()
    }

    /// How many of the first `kv_len` history tokens `tokens` starts with.
    fn shared_with(&self, tokens: &[u32]) -> usize {
        let limit = self.kv_len().min(tokens.len());
        let p = common_prefix(&self.prompt[..self.prompt.len().min(limit)], tokens);
        if p < self.prompt.len() || p >= limit {
            return p.min(limit);
        }
        p + common_prefix(&self.generated_ids, &tokens[p..limit])
    }
}

/// A group chosen for admission: how many requests from the head of the queue, each one's
/// cached prefix (entry and tokens reused), and the columns left to compute.
struct GroupPlan {
    take: usize,
    cached: Vec<Option<(EntryId, usize)>>,
    computed: usize,
}

/// Counters for engine stats.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    pub running: usize,
    pub prefilling: usize,
    pub waiting: usize,
    pub kv_tokens: usize,
    pub kv_bytes: usize,
    /// The most `kv_bytes` seen at the end of a step.
    pub peak_kv_bytes: usize,
    pub steps: u64,
    pub tokens_generated: u64,
    /// Seconds inside steps; the part spent in the runner (building MLX graphs, evaluating,
    /// sampling); and the part of that spent waiting for evaluation.
    pub step_seconds: f64,
    pub mlx_seconds: f64,
    pub eval_seconds: f64,
    /// Prefix-cache counters.
    pub prefix: PrefixStats,
}

/// Measures the time spent inside the runner, so the rest of a step (scheduling, stop
/// checks, detokenizing, events) can be reported as the engine's own overhead.
struct TimedRunner<'a> {
    inner: &'a mut dyn Runner,
    spent: Duration,
}

impl TimedRunner<'_> {
    fn time<T>(&mut self, f: impl FnOnce(&mut dyn Runner) -> T) -> T {
        let start = Instant::now();
        let out = f(&mut *self.inner);
        self.spent += start.elapsed();
        out
    }
}

impl Runner for TimedRunner<'_> {
    fn start_prefill(
        &mut self,
        prompts: &[&[u32]],
        cached: &[Option<(EntryId, usize)>],
    ) -> Result<()> {
        self.time(|r| r.start_prefill(prompts, cached))
    }
    fn holds_row_start(&self, row: usize) -> bool {
        self.inner.holds_row_start(row)
    }
    fn save_prefix(&mut self, id: EntryId, row: usize, len: usize) -> Result<()> {
        self.time(|r| r.save_prefix(id, row, len))
    }
    fn drop_prefixes(&mut self, ids: &[EntryId]) {
        self.time(|r| r.drop_prefixes(ids))
    }
    fn prefill_step(&mut self, max_columns: usize) -> Result<bool> {
        self.time(|r| r.prefill_step(max_columns))
    }
    fn retain_prefill(&mut self, rows: &[usize]) -> Result<()> {
        self.time(|r| r.retain_prefill(rows))
    }
    fn join(&mut self, samplers: &mut [&mut Sampler], ahead: Option<&[u32]>) -> Result<Vec<u32>> {
        self.time(|r| r.join(samplers, ahead))
    }
    fn decode(
        &mut self,
        inputs: &[u32],
        samplers: &mut [&mut Sampler],
        ahead: bool,
    ) -> Result<Vec<u32>> {
        self.time(|r| r.decode(inputs, samplers, ahead))
    }
    fn prefill_remaining(&self) -> usize {
        self.inner.prefill_remaining()
    }
    fn take_logprobs(&mut self) -> Vec<Option<TokenLogprobs>> {
        self.inner.take_logprobs()
    }
    fn retain(&mut self, rows: &[usize]) -> Result<()> {
        self.time(|r| r.retain(rows))
    }
    fn reset(&mut self) {
        self.time(|r| r.reset())
    }
    fn kv_tokens(&self) -> usize {
        self.inner.kv_tokens()
    }
    fn kv_bytes(&self) -> usize {
        self.inner.kv_bytes()
    }
    fn take_eval_time(&mut self) -> Duration {
        self.inner.take_eval_time()
    }
}

/// See the module docs.
pub struct Scheduler {
    cfg: SchedulerConfig,
    layout: KvLayout,
    waiting: VecDeque<Seq>,
    prefilling: Vec<Seq>,
    running: Vec<Seq>,
    stats: SchedulerStats,
    prefix: PrefixIndex,
}

impl Scheduler {
    /// A scheduler for a model whose KV cache has this layout.
    pub fn new(cfg: SchedulerConfig, layout: KvLayout) -> Self {
        Self {
            prefix: PrefixIndex::new(cfg.prefix_cache_bytes, layout.column_bytes()),
            cfg,
            layout,
            waiting: VecDeque::new(),
            prefilling: Vec::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request. `eos` are the ids that end it (empty to ignore EOS).
    pub fn submit(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        sampling: SamplingParams,
        stop: StopConditions,
        eos: Vec<u32>,
        submitted: Instant,
    ) -> Result<()> {
        self.submit_constrained(id, prompt, sampling, stop, eos, submitted, None)
    }

    /// [`submit`](Self::submit) with an output constraint (compiled for this request).
    #[allow(clippy::too_many_arguments)]
    pub fn submit_constrained(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        sampling: SamplingParams,
        mut stop: StopConditions,
        eos: Vec<u32>,
        submitted: Instant,
        constraint: Option<RowConstraint>,
    ) -> Result<()> {
        self.cfg
            .check(prompt.len(), &stop, &sampling, &self.layout)?;
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(Error::Busy(self.waiting.len()));
        }
        // The context limit and the KV budget cap what a request may generate.
        let room = self
            .cfg
            .max_context
            .min(self.cfg.kv_row_limit(&self.layout))
            - prompt.len();
        stop.max_tokens = stop.max_tokens.min(room);
        let eos = if stop.ignore_eos { Vec::new() } else { eos };
        self.waiting.push_back(Seq {
            id,
            sampler: Sampler::new(sampling, &prompt).with_constraint(constraint),
            next_input: *prompt.last().expect("checked non-empty"),
            prompt,
            stop,
            eos,
            generated: 0,
            generated_ids: Vec::new(),
            cached: 0,
            decoder: IncrementalDecoder::new(),
            held_text: String::new(),
            cancelled: false,
            submitted,
            admitted: None,
            first_token: None,
        });
        Ok(())
    }

    /// Marks a request cancelled; it leaves at the next step. False if unknown or finished.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let all = self
            .waiting
            .iter_mut()
            .chain(self.prefilling.iter_mut())
            .chain(self.running.iter_mut());
        for seq in all {
            if seq.id == id {
                seq.cancelled = true;
                return true;
            }
        }
        false
    }

    /// True when nothing is queued, prefilling or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.prefilling.is_empty() && self.running.is_empty()
    }

    /// Requests not yet admitted.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            prefilling: self.prefilling.len(),
            waiting: self.waiting.len(),
            prefix: self.prefix.stats(),
            ..self.stats
        }
    }

    /// The prefix cache's index (entries and their tokens).
    pub fn prefix_index(&self) -> &PrefixIndex {
        &self.prefix
    }

    /// Registers KV the runner already holds under a new entry (a cache loaded from disk):
    /// returns its id, or None when it is not stored (see [`PrefixIndex::insert`]).
    pub fn adopt_prefix(
        &mut self,
        runner: &mut dyn Runner,
        tokens: &[u32],
    ) -> Option<(EntryId, usize)> {
        let ins = self.prefix.insert(tokens, &[])?;
        runner.drop_prefixes(&ins.evict);
        Some((ins.id, ins.len))
    }

    /// Runs one step (see the module docs), appending events. On a runner error the requests
    /// it touched (running and prefilling) end with an error event, the runner is reset, and
    /// queued requests stay queued.
    pub fn step(
        &mut self,
        runner: &mut dyn Runner,
        text: &dyn TextDecoder,
        events: &mut Vec<Event>,
    ) {
        let start = Instant::now();
        let mut timed = TimedRunner {
            inner: runner,
            spent: Duration::ZERO,
        };
        if let Err(e) = self.try_step(&mut timed, text, events) {
            self.reset_runner(&mut timed);
            self.fail_active(&e.to_string(), events);
        }
        let mlx = timed.spent;
        self.stats.steps += 1;
        self.stats.kv_tokens = runner.kv_tokens();
        self.stats.kv_bytes = runner.kv_bytes();
        self.stats.peak_kv_bytes = self.stats.peak_kv_bytes.max(self.stats.kv_bytes);
        self.stats.step_seconds += start.elapsed().as_secs_f64();
        self.stats.mlx_seconds += mlx.as_secs_f64();
        self.stats.eval_seconds += runner.take_eval_time().as_secs_f64();
    }

    fn try_step(
        &mut self,
        runner: &mut dyn Runner,
        text: &dyn TextDecoder,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        self.reap_cancelled(runner, events)?;
        if self.prefilling.is_empty() {
            // Before the decode step, so its decode-ahead prediction (`join_expected`) plans
            // with the prefixes a group admitted in this step will reuse.
            let n = self.waiting.len().min(self.cfg.max_prefill_group);
            self.snapshot_running_prefixes(runner, n)?;
        }
        if !self.running.is_empty() {
            self.decode(runner, text, events)?;
        }
        if self.prefilling.is_empty() {
            self.admit(runner)?;
        }
        if !self.prefilling.is_empty()
            && runner.prefill_step(self.chunk(self.prefilling.len(), !self.running.is_empty()))?
        {
            self.join(runner, text, events)?;
        }
        Ok(())
    }

    /// The prefill group joins the running batch with its first tokens (from the logits of
    /// each prompt's last token); rows those end leave at once.
    fn join(
        &mut self,
        runner: &mut dyn Runner,
        text: &dyn TextDecoder,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        // The merged batch's first decode step can be queued now (decode-ahead across the
        // join) when some row goes on after the join (the running rows all do: those that
        // ended this step have left).
        let goes_on =
            !self.running.is_empty() || self.prefilling.iter().any(|s| s.stop.max_tokens > 1);
        let ahead: Option<Vec<u32>> =
            goes_on.then(|| self.running.iter().map(|s| s.next_input).collect());
        let mut samplers: Vec<&mut Sampler> =
            self.prefilling.iter_mut().map(|s| &mut s.sampler).collect();
        let tokens = runner.join(&mut samplers, ahead.as_deref())?;
        if tokens.len() != self.prefilling.len() {
            return Err(Error::EngineFailed(format!(
                "runner returned {} first tokens for {} rows",
                tokens.len(),
                self.prefilling.len()
            )));
        }
        let before = self.running.len();
        self.running.append(&mut self.prefilling);
        self.accept_tokens(runner, before, &tokens, text, events)
    }

    /// Streams `tokens` to the running rows from `first` on (one each); rows that end leave.
    fn accept_tokens(
        &mut self,
        runner: &mut dyn Runner,
        first: usize,
        tokens: &[u32],
        text: &dyn TextDecoder,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        if tokens.len() != self.running.len() - first {
            return Err(Error::EngineFailed(format!(
                "runner returned {} tokens for {} rows",
                tokens.len(),
                self.running.len() - first
            )));
        }
        let now = Instant::now();
        let logprobs = runner.take_logprobs();
        if !logprobs.is_empty() && logprobs.len() != tokens.len() {
            return Err(Error::EngineFailed(format!(
                "runner returned log-probabilities for {} of {} rows",
                logprobs.len(),
                tokens.len()
            )));
        }
        let mut logprobs = logprobs.into_iter();
        let mut done = vec![None; first];
        for (seq, &token) in self.running[first..].iter_mut().zip(tokens) {
            let lp = logprobs.next().flatten();
            done.push(accept_token(seq, token, lp, text, now, events)?);
        }
        self.stats.tokens_generated += tokens.len() as u64;
        if done.iter().any(Option::is_some) {
            self.remove_rows(runner, done, events)?;
        }
        Ok(())
    }

    fn reap_cancelled(&mut self, runner: &mut dyn Runner, events: &mut Vec<Event>) -> Result<()> {
        let (gone, kept): (Vec<Seq>, Vec<Seq>) = self.waiting.drain(..).partition(|s| s.cancelled);
        self.waiting = kept.into();
        for seq in gone {
            self.finish(seq, FinishReason::Cancelled, None, events);
        }
        if self.prefilling.iter().any(|s| s.cancelled) {
            let rows: Vec<usize> = (0..self.prefilling.len())
                .filter(|&r| !self.prefilling[r].cancelled)
                .collect();
            runner.retain_prefill(&rows)?;
            let (gone, kept): (Vec<Seq>, Vec<Seq>) =
                self.prefilling.drain(..).partition(|s| s.cancelled);
            self.prefilling = kept;
            for seq in gone {
                self.finish(seq, FinishReason::Cancelled, None, events);
            }
        }
        if self.running.iter().any(|s| s.cancelled) {
            let done: Vec<Option<FinishReason>> = self
                .running
                .iter()
                .map(|s| s.cancelled.then_some(FinishReason::Cancelled))
                .collect();
            self.remove_rows(runner, done, events)?;
        }
        Ok(())
    }

    /// Prompt columns prefilled per step for a group of `rows`, with or without rows
    /// `decoding` in the same step.
    fn chunk(&self, rows: usize, decoding: bool) -> usize {
        let budget = if decoding {
            self.cfg.prefill_chunk_decoding.min(self.cfg.prefill_chunk)
        } else {
            self.cfg.prefill_chunk
        };
        match self.cfg.mode {
            BatchMode::Continuous => (budget / rows.max(1)).max(1),
            BatchMode::Static => usize::MAX,
        }
    }

    /// How many requests from the head of the queue a group admitted now would take, if
    /// `leaving` running rows were gone.
    fn admissible(&self, leaving: usize) -> usize {
        if !self.prefilling.is_empty() {
            return 0;
        }
        let staying = self.running.len() - leaving;
        let room = match self.cfg.mode {
            BatchMode::Static if staying > 0 => return 0,
            BatchMode::Static => self.cfg.max_batch_size,
            BatchMode::Continuous => self
                .cfg
                .max_batch_size
                .saturating_sub(staying)
                .min(self.cfg.max_prefill_group),
        };
        // The KV footprint if every admitted request grows to its limit (FIFO: the head of
        // the queue waits for room rather than being overtaken).
        // (With rows leaving, this over-counts the footprint: a prediction may say no where
        // admission then says yes; admission itself is always called with none leaving.)
        let rows = self.running.len();
        let mut max_len = self.running.iter().map(Seq::final_len).max().unwrap_or(0);
        let mut n = 0;
        for next in self.waiting.iter().take(room) {
            let len = max_len.max(next.final_len());
            let bytes = footprint_bytes(&self.layout, rows + n + 1, len, self.cfg.max_pass());
            if bytes > self.cfg.max_kv_bytes {
                break;
            }
            max_len = len;
            n += 1;
        }
        n
    }

    /// Whether a prefill group will join the running batch at the end of this step, with
    /// `leaving` rows ending in its decode (the group now prefilling finishes with this
    /// step's chunk, or a group admitted this step fits in one chunk).
    fn join_expected(&self, runner: &dyn Runner, leaving: usize) -> bool {
        // Rows still decoding after this step's decode (ends other than by length are not
        // foreseen: then the prediction is only less exact, never wrong in effect).
        let decoding = self.running.len() > leaving;
        if !self.prefilling.is_empty() {
            return runner.prefill_remaining() <= self.chunk(self.prefilling.len(), decoding);
        }
        let plan = self.plan_group(self.admissible(leaving));
        plan.take > 0 && plan.computed <= self.chunk(plan.take, decoding)
    }

    /// Chooses the group to admit from the first `n` waiting requests (see [`GroupPlan`]).
    ///
    /// Each row computes as many columns as the group's longest uncached remainder (shorter
    /// prompts are left-padded; a row with a cached prefix reuses all of it but what
    /// exceeds that width). In continuous mode the group stops before a request that would
    /// make the padded work more than twice the useful work (beyond one chunk), and before
    /// one that shares [`DEFER_FOR_SHARED`] more tokens with a group member than the cache
    /// holds (and, with sliding-window layers, no more than the smallest window: longer
    /// prefixes are not kept whole): it waits for that member's prefill and reuses it. A
    /// static wave takes all `n`.
    fn plan_group(&self, n: usize) -> GroupPlan {
        let continuous = self.cfg.mode == BatchMode::Continuous;
        let mut hits: Vec<Option<(EntryId, usize)>> = Vec::with_capacity(n);
        let (mut widest, mut useful) = (0, 0);
        // A sliding-window layer drops a running row's first columns once it is past the
        // window, so a longer shared prefix could not be copied.
        let copyable = self.layout.window_sizes().first().copied();
        for (k, seq) in self.waiting.iter().take(n).enumerate() {
            // At most all but the last prompt token come from the cache: its logits give
            // the first generated token.
            let body = &seq.prompt[..seq.prompt.len() - 1];
            let hit = self.prefix.longest(body);
            let cached = hit.map_or(0, |h| h.1);
            let remainder = seq.prompt.len() - cached;
            if continuous && k > 0 {
                if self.prefix.enabled() {
                    let shared = self
                        .waiting
                        .iter()
                        .take(k)
                        .map(|m| common_prefix(&m.prompt[..m.prompt.len() - 1], body))
                        .max()
                        .unwrap_or(0);
                    if shared >= cached + DEFER_FOR_SHARED && copyable.is_none_or(|w| shared <= w) {
                        break;
                    }
                }
                let padded = (k + 1) * widest.max(remainder);
                if padded > (2 * (useful + remainder)).max(self.cfg.prefill_chunk) {
                    break;
                }
            }
            widest = widest.max(remainder);
            useful += remainder;
            hits.push(hit);
        }
        let cached = self
            .waiting
            .iter()
            .zip(&hits)
            .map(|(seq, hit)| {
                let reuse = seq.prompt.len().saturating_sub(widest);
                hit.filter(|_| reuse > 0).map(|(id, _)| (id, reuse))
            })
            .collect();
        GroupPlan {
            take: hits.len(),
            cached,
            computed: widest,
        }
    }

    /// Copies into the prefix cache the prefixes of running rows that waiting requests (the
    /// first `n`) share beyond what the cache holds (by [`DEFER_FOR_SHARED`] tokens or more:
    /// a copy for a few tokens costs more than it saves), so they can be reused like any
    /// entry.
    fn snapshot_running_prefixes(&mut self, runner: &mut dyn Runner, n: usize) -> Result<()> {
        if !self.prefix.enabled() || self.running.is_empty() {
            return Ok(());
        }
        for k in 0..n {
            let body = &self.waiting[k].prompt[..self.waiting[k].prompt.len() - 1];
            let cached = self.prefix.longest(body).map_or(0, |h| h.1);
            let best = self
                .running
                .iter()
                .enumerate()
                .map(|(r, seq)| (seq.shared_with(body), r))
                .max();
            let gain = |&(shared, _): &(usize, usize)| shared >= cached + DEFER_FOR_SHARED;
            let Some((shared, row)) = best.filter(gain) else {
                continue;
            };
            let tokens = self.running[row].history(shared);
            self.store(runner, row, &tokens)?;
        }
        Ok(())
    }

    /// Saves running row `row`'s KV of `tokens` (its history's first tokens) in the cache.
    fn store(&mut self, runner: &mut dyn Runner, row: usize, tokens: &[u32]) -> Result<()> {
        if !runner.holds_row_start(row) {
            // A sliding window dropped the row's first columns: nothing to copy.
            return Ok(());
        }
        let Some(ins) = self.prefix.insert(tokens, &[]) else {
            return Ok(());
        };
        runner.drop_prefixes(&ins.evict);
        if let Err(e) = runner.save_prefix(ins.id, row, ins.len) {
            self.prefix.remove(ins.id);
            return Err(e);
        }
        Ok(())
    }

    fn admit(&mut self, runner: &mut dyn Runner) -> Result<()> {
        let n = self.admissible(0);
        if n == 0 {
            return Ok(());
        }
        let plan = self.plan_group(n);
        let now = Instant::now();
        for cached in plan.cached.iter().take(plan.take) {
            let mut seq = self.waiting.pop_front().expect("counted above");
            seq.admitted = Some(now);
            if let Some((id, tokens)) = *cached {
                seq.cached = tokens;
                self.prefix.record_hit(id, tokens);
            }
            self.prefilling.push(seq);
        }
        let prompts: Vec<&[u32]> = self.prefilling.iter().map(|s| &s.prompt[..]).collect();
        runner.start_prefill(&prompts, &plan.cached[..plan.take])
    }

    fn decode(
        &mut self,
        runner: &mut dyn Runner,
        text: &dyn TextDecoder,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let inputs: Vec<u32> = self.running.iter().map(|s| s.next_input).collect();
        // A step queued ahead is wasted if every row ends now (by length) or a group joins.
        let leaving = self
            .running
            .iter()
            .filter(|s| s.generated + 1 >= s.stop.max_tokens)
            .count();
        let ahead = !self.cfg.skip_wasted_ahead
            || (leaving < self.running.len() && !self.join_expected(&*runner, leaving));
        let mut samplers: Vec<&mut Sampler> =
            self.running.iter_mut().map(|s| &mut s.sampler).collect();
        let tokens = runner.decode(&inputs, &mut samplers, ahead)?;
        self.accept_tokens(runner, 0, &tokens, text, events)
    }

    /// Removes rows whose entry is `Some(reason)` and ends those requests.
    fn remove_rows(
        &mut self,
        runner: &mut dyn Runner,
        done: Vec<Option<FinishReason>>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        // What the leaving rows computed stays in the prefix cache for later requests.
        if self.prefix.enabled() {
            for (row, reason) in done.iter().enumerate() {
                if reason.is_some() {
                    let seq = &self.running[row];
                    let tokens = seq.history(seq.kv_len());
                    self.store(runner, row, &tokens)?;
                }
            }
        }
        let keep: Vec<usize> = (0..done.len()).filter(|&r| done[r].is_none()).collect();
        runner.retain(&keep)?;
        let rows = std::mem::take(&mut self.running);
        for (seq, reason) in rows.into_iter().zip(done) {
            match reason {
                None => self.running.push(seq),
                Some(reason) => {
                    let error = match seq.sampler.constraint().map(RowConstraint::state) {
                        Some(ConstraintState::Failed(m)) => Some(m.clone()),
                        _ => None,
                    };
                    self.finish(seq, reason, error, events)
                }
            }
        }
        Ok(())
    }

    /// Resets the runner after a failure (dropping all its state, the prefix cache's KV
    /// included) and forgets the prefix cache's entries with it. Follow with
    /// [`fail_active`](Self::fail_active).
    pub fn reset_runner(&mut self, runner: &mut dyn Runner) {
        runner.reset();
        self.prefix.clear();
    }

    /// Ends every request that is prefilling or running with an error.
    pub fn fail_active(&mut self, message: &str, events: &mut Vec<Event>) {
        let seqs: Vec<Seq> = self
            .prefilling
            .drain(..)
            .chain(self.running.drain(..))
            .collect();
        for seq in seqs {
            self.finish(seq, FinishReason::Error, Some(message.to_owned()), events);
        }
    }

    /// Ends every request, queued ones included (shutdown or engine failure).
    pub fn end_all(
        &mut self,
        reason: FinishReason,
        message: Option<&str>,
        events: &mut Vec<Event>,
    ) {
        let seqs: Vec<Seq> = self
            .waiting
            .drain(..)
            .chain(self.prefilling.drain(..))
            .chain(self.running.drain(..))
            .collect();
        for seq in seqs {
            self.finish(seq, reason, message.map(str::to_owned), events);
        }
    }

    fn finish(
        &mut self,
        mut seq: Seq,
        reason: FinishReason,
        error: Option<String>,
        events: &mut Vec<Event>,
    ) {
        let now = Instant::now();
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let mut stats = RequestStats {
            prompt_tokens: seq.prompt.len(),
            cached_tokens: seq.cached,
            generated_tokens: seq.generated,
            total_latency: secs(seq.submitted, now),
            queue_time: seq
                .admitted
                .map_or(secs(seq.submitted, now), |a| secs(seq.submitted, a)),
            ..Default::default()
        };
        if let (Some(first), Some(admitted)) = (seq.first_token, seq.admitted) {
            stats.time_to_first_token = secs(seq.submitted, first);
            let prefill = secs(admitted, first);
            // Tokens computed (the cached ones cost nothing) per second of prefill.
            stats.prompt_tps = if prefill > 0.0 {
                (seq.prompt.len() - seq.cached) as f64 / prefill
            } else {
                0.0
            };
            let gen = secs(first, now);
            stats.generation_tps = if gen > 0.0 {
                (seq.generated - 1) as f64 / gen
            } else {
                0.0
            };
        }
        let text = std::mem::take(&mut seq.held_text);
        events.push(Event::Finished {
            id: seq.id,
            reason,
            text,
            stats,
            error,
        });
    }
}

/// Streams one token of `seq`; returns the finish reason if the request is done.
fn accept_token(
    seq: &mut Seq,
    token: u32,
    logprobs: Option<TokenLogprobs>,
    text: &dyn TextDecoder,
    now: Instant,
    events: &mut Vec<Event>,
) -> Result<Option<FinishReason>> {
    seq.generated += 1;
    seq.generated_ids.push(token);
    seq.first_token.get_or_insert(now);
    seq.sampler.accept(token);
    seq.next_input = token;
    let stop_token = seq.eos.contains(&token) || seq.stop.stop_token_ids.contains(&token);
    let mut delta = if stop_token {
        String::new()
    } else {
        seq.decoder.push(text, token)?
    };
    let mut reason = None;
    let mut hit_stop_string = false;
    if !seq.stop.stop_strings.is_empty() {
        seq.held_text.push_str(&delta);
        let (emit, hit) = split_at_stop(&seq.held_text, &seq.stop.stop_strings);
        delta = seq.held_text[..emit].to_owned();
        if hit {
            seq.held_text.clear();
            hit_stop_string = true;
            reason = Some(FinishReason::Stop);
        } else {
            seq.held_text.drain(..emit);
        }
    }
    let constraint = seq.sampler.constraint().map(RowConstraint::state);
    if let Some(ConstraintState::Failed(_)) = constraint {
        reason = Some(FinishReason::Error);
    } else if stop_token || constraint == Some(&ConstraintState::Complete) {
        reason = Some(FinishReason::Stop);
    } else if reason.is_none() && seq.generated >= seq.stop.max_tokens {
        reason = Some(FinishReason::Length);
    }
    if reason.is_some() && !hit_stop_string {
        // Text still held (a partial character, a possible stop-string prefix) goes out with
        // the terminal event, so none is lost; it is checked for stop strings like the rest.
        let rest = seq.decoder.flush(text)?;
        seq.held_text.push_str(&rest);
        if !seq.stop.stop_strings.is_empty() {
            let (emit, hit) = split_at_stop(&seq.held_text, &seq.stop.stop_strings);
            if hit {
                seq.held_text.truncate(emit);
                reason = Some(FinishReason::Stop);
            }
        }
    }
    events.push(Event::Token {
        id: seq.id,
        token,
        text: delta,
        logprobs,
    });
    Ok(reason)
}

/// How much of `text` can be emitted: up to the first stop string (`true`), or all but the
/// longest tail that could still grow into a stop string (`false`).
fn split_at_stop(text: &str, stops: &[String]) -> (usize, bool) {
    if let Some(pos) = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        return (pos, true);
    }
    let mut emit = text.len();
    for s in stops {
        for (i, _) in text.char_indices() {
            if i < emit && s.starts_with(&text[i..]) {
                emit = i;
                break;
            }
        }
    }
    (emit, false)
}

#[cfg(test)]
mod tests;
