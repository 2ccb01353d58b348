//! Executes the scheduler's decisions on MLX: batched chunked prefill, batched decode, and
//! sampling. Owns the model and both KV caches (the running batch and the group being
//! prefilled). Everything here runs on the engine thread: MLX arrays are not Send.
use std::time::{Duration, Instant};

use mlx_rs::ops::indexing::{argmax_axis, TryIndexOp};
use mlx_rs::Array;

use crate::error::Result;
use crate::kv_cache::{prefix_columns, BatchKvCache, KvLayout, PrefillTokens};
use crate::model::{LoadedModel, Model};
use crate::prefix_cache::EntryId;
use crate::request::TokenLogprobs;
use crate::sampling::Sampler;
use crate::scheduler::Runner;

/// Returns the MLX buffer cache to the system every this many decode steps.
const CLEAR_CACHE_EVERY: u64 = 256;

/// The KV layout a model needs.
pub fn kv_layout(model: &Model) -> KvLayout {
    KvLayout {
        layers: model.config.num_layers,
        kv_heads: model.config.num_kv_heads,
        head_dim: model.config.head_dim,
        windows: model.config.layer_windows.clone(),
    }
}

/// Guards alive, the limit found before the first, and the limit convoy last set.
static CACHE_LIMIT: std::sync::Mutex<(usize, usize, usize)> = std::sync::Mutex::new((0, 0, 0));

/// Keeps MLX's buffer-cache limit (process-wide) at least at the bytes given to
/// [`raise_cache_limit`]; when the last guard drops, the limit found before the first is put
/// back (unless the host changed it in the meantime: then the host's stays).
pub struct CacheLimitGuard(());

/// Raises MLX's buffer-cache limit to at least `bytes` (never lowers it) until the returned
/// guard drops. Guards nest across engines: the limit in place before the first one is
/// restored after the last one.
pub fn raise_cache_limit(bytes: usize) -> Result<CacheLimitGuard> {
    let mut held = CACHE_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let previous = mlx_rs::memory::set_cache_limit(bytes)?;
    let now = bytes.max(previous);
    if previous > bytes {
        mlx_rs::memory::set_cache_limit(previous)?;
    }
    if held.0 == 0 {
        held.1 = previous;
    }
    held.0 += 1;
    held.2 = now;
    Ok(CacheLimitGuard(()))
}

impl Drop for CacheLimitGuard {
    fn drop(&mut self) {
        let mut held = CACHE_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
        held.0 -= 1;
        if held.0 == 0 {
            if let Ok(current) = mlx_rs::memory::set_cache_limit(held.1) {
                if current != held.2 {
                    // The host set its own limit while convoy's was in place: keep it.
                    let _ = mlx_rs::memory::set_cache_limit(current);
                }
            }
        }
    }
}

/// A decode step queued on the device before the previous step's tokens were handed to the
/// scheduler (decode-ahead): its inputs are the previous step's greedy tokens, still on device.
struct Pending {
    tokens: Array,
    logits: Array,
}

struct PrefillGroup {
    cache: BatchKvCache,
    /// Left-padded prompts, one row per request.
    tokens: PrefillTokens,
    /// The hidden state of the last column prefilled (`[B, hidden]`): once the group is
    /// done, each row's last prompt token, whose logits give its first generated token.
    last_hidden: Option<Array>,
}

/// The MLX implementation of [`Runner`].
pub struct MlxRunner {
    lm: LoadedModel,
    batch: BatchKvCache,
    group: Option<PrefillGroup>,
    eval_time: Duration,
    decode_steps: u64,
    keep_logits: bool,
    last_logits: Option<Array>,
    pipeline: bool,
    /// Decode-ahead across a join as well (with `pipeline`).
    pipeline_join: bool,
    pending: Option<Pending>,
    /// The prefix cache's KV, per entry and layer (`[1, kv_heads, len, head_dim]`).
    prefixes: std::collections::HashMap<EntryId, Vec<(Array, Array)>>,
    /// Log-probabilities of the last join's or decode's rows (empty: no row asked).
    logprobs: Vec<Option<TokenLogprobs>>,
}

impl MlxRunner {
    pub fn new(lm: LoadedModel) -> Self {
        let batch = BatchKvCache::new(kv_layout(&lm.model));
        Self {
            lm,
            batch,
            group: None,
            eval_time: Duration::ZERO,
            decode_steps: 0,
            keep_logits: false,
            last_logits: None,
            pipeline: true,
            pipeline_join: true,
            pending: None,
            prefixes: Default::default(),
            logprobs: Vec::new(),
        }
    }

    /// The KV of prefix-cache entry `id` (per layer, `[1, kv_heads, len, head_dim]`).
    pub fn prefix_kv(&self, id: EntryId) -> Option<&[(Array, Array)]> {
        self.prefixes.get(&id).map(Vec::as_slice)
    }

    /// Stores KV made elsewhere (a cache file) as entry `id`, keeping its first `len` tokens.
    pub fn put_prefix(&mut self, id: EntryId, kv: Vec<(Array, Array)>, len: usize) -> Result<()> {
        let cut = kv
            .into_iter()
            .map(|(k, v)| -> Result<(Array, Array)> {
                let n = len as i32;
                Ok((
                    k.try_index((.., .., ..n))?.contiguous()?,
                    v.try_index((.., .., ..n))?.contiguous()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let arrays: Vec<&Array> = cut.iter().flat_map(|(k, v)| [k, v]).collect();
        mlx_rs::transforms::eval(arrays)?;
        self.prefixes.insert(id, cut);
        Ok(())
    }

    /// Decode-ahead (on by default): when every row decodes greedily, the next step is queued
    /// on the device before this step's tokens go back to the scheduler, so host work
    /// (streaming, detokenizing, events) overlaps device work.
    pub fn set_pipelining(&mut self, on: bool) {
        self.pipeline = on;
    }

    /// Decode-ahead across a join (on by default, only with [`set_pipelining`]): when a
    /// prefilled group joins the running batch, the merged batch's first decode step is queued
    /// before the join returns, instead of starting cold in the next engine step.
    pub fn set_pipelining_at_join(&mut self, on: bool) {
        self.pipeline_join = on;
    }

    /// Builds one decode step's graph; returns (greedy tokens `[B]`, logits `[B, vocab]`).
    fn decode_graph(&mut self, input: &Array) -> Result<(Array, Array)> {
        let hidden = self.lm.model.forward_last(input, &mut self.batch)?;
        let logits = self.lm.model.logits(&hidden)?;
        let greedy = argmax_axis(&logits, -1, None)?;
        Ok((greedy, logits))
    }

    /// Queues the decode step for `input` (`[B, 1]`) as the pending step (decode-ahead).
    fn queue_step(&mut self, input: &Array) -> Result<()> {
        let (tokens, logits) = self.decode_graph(input)?;
        mlx_rs::transforms::async_eval([&tokens])?;
        self.pending = Some(Pending { tokens, logits });
        Ok(())
    }

    /// Waits for all queued device work. MLX runs it on a stream thread that outlives this
    /// thread's MLX state, so the engine thread must not exit (or drop the model) with work in
    /// flight: that is a use-after-free in MLX.
    pub fn synchronize(&mut self) {
        if let Some(p) = &self.pending {
            let _ = p.tokens.eval();
        }
        // SAFETY: plain FFI call without arguments; waits for this thread's default stream.
        unsafe {
            mlx_sys::mlx_synchronize_default();
        }
    }

    /// Forgets a queued step (its cache column is dropped).
    fn discard_pending(&mut self) {
        if self.pending.take().is_some() {
            self.batch.rollback(1);
        }
    }

    pub fn model(&self) -> &LoadedModel {
        &self.lm
    }

    /// Keep each decode step's logits for [`last_logits`](Self::last_logits) (parity tests).
    pub fn keep_logits(&mut self, keep: bool) {
        self.keep_logits = keep;
    }

    /// The `[B, vocab]` logits of the last decode step, if kept.
    pub fn last_logits(&self) -> Option<&Array> {
        self.last_logits.as_ref()
    }

    /// The running batch's cache (for inspection).
    pub fn batch_cache(&self) -> &BatchKvCache {
        &self.batch
    }

    /// Each row's next token: its argmax (`greedy`), or for rows with sampling parameters a
    /// draw from its sampler over its logits (only those rows' logits reach the host). Rows
    /// with a constraint choose among the tokens it allows: greedy ones on the device (their
    /// mask goes up as one `[rows, vocab]` bool array), sampled ones on the host. Masks are
    /// computed on the host while the device computes the logits. Rows that asked for
    /// log-probabilities get them in [`logprobs`](Self::logprobs), computed on the device in
    /// the same evaluation: only their top entries reach the host. Also returns the chosen
    /// tokens as a device array (`[B]`, the next step's input when no row is sampled).
    fn choose(
        &mut self,
        greedy: &Array,
        logits: &Array,
        samplers: &mut [&mut Sampler],
    ) -> Result<(Vec<u32>, Array)> {
        let sampled_rows: Vec<usize> = (0..samplers.len())
            .filter(|&r| !samplers[r].params().is_plain_greedy())
            .collect();
        let asked: Vec<(usize, usize)> = (0..samplers.len())
            .filter_map(|r| samplers[r].params().logprobs.map(|n| (r, n)))
            .collect();
        let vocab = logits.shape()[1] as usize;
        let mut masks: Vec<Option<Vec<bool>>> = Vec::new();
        if samplers.iter().any(|s| s.constraint().is_some()) {
            // Start the forward pass (if not queued already) and compute the masks meanwhile.
            mlx_rs::transforms::async_eval([greedy, logits])?;
            masks = samplers.iter_mut().map(|s| s.allowed(vocab)).collect();
        }
        let device_masked: Vec<usize> = (0..masks.len())
            .filter(|&r| masks[r].is_some() && samplers[r].params().is_plain_greedy())
            .collect();
        let chosen = if device_masked.is_empty() {
            greedy.clone()
        } else {
            masked_argmax(greedy, logits, &device_masked, &masks)?
        };
        let lp = if asked.is_empty() {
            None
        } else {
            Some(LogprobGraph::new(logits, &chosen, &asked)?)
        };
        let mut arrays = vec![&chosen];
        if let Some(g) = &lp {
            arrays.extend([&g.lse, &g.chosen]);
            if let Some((idx, val)) = &g.top {
                arrays.extend([idx, val]);
            }
        }
        let host_logits = if sampled_rows.is_empty() {
            self.timed_eval(&arrays)?;
            None
        } else {
            let idx: Vec<i32> = sampled_rows.iter().map(|&r| r as i32).collect();
            let rows = logits.take_axis(Array::from_slice(&idx, &[idx.len() as i32]), 0)?;
            arrays.push(&rows);
            self.timed_eval(&arrays)?;
            Some(rows)
        };
        let mut tokens: Vec<u32> = host_slice::<u32>(&chosen)?.to_vec();
        let mut sampled_logit: Vec<Option<f32>> = vec![None; samplers.len()];
        if let Some(rows) = host_logits {
            let width = rows.shape()[1] as usize;
            let flat = host_slice::<f32>(&rows)?;
            for (k, &r) in sampled_rows.iter().enumerate() {
                let raw = &flat[k * width..(k + 1) * width];
                let mut row = raw.to_vec();
                if let Some(Some(allowed)) = masks.get(r) {
                    for (x, &ok) in row.iter_mut().zip(allowed) {
                        if !ok {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                tokens[r] = samplers[r].sample(&mut row);
                sampled_logit[r] = raw.get(tokens[r] as usize).copied();
            }
        }
        self.logprobs = match lp {
            None => Vec::new(),
            Some(g) => g.read(samplers.len(), &asked, &sampled_logit)?,
        };
        Ok((tokens, chosen))
    }

    fn timed_eval(&mut self, arrays: &[&Array]) -> Result<()> {
        let start = Instant::now();
        mlx_rs::transforms::eval(arrays.iter().copied())?;
        self.eval_time += start.elapsed();
        Ok(())
    }
}

/// An evaluated array's data on the host (an error, not a panic, if it is not contiguous).
fn host_slice<T: mlx_rs::ArrayElement>(a: &Array) -> Result<&[T]> {
    a.try_as_slice::<T>()
        .map_err(|e| crate::Error::Mlx(format!("reading results: {e}")))
}

/// `greedy` (`[B]`) with rows `rows` replaced by the argmax of their logits over the tokens
/// `masks[r]` allows.
fn masked_argmax(
    greedy: &Array,
    logits: &Array,
    rows: &[usize],
    masks: &[Option<Vec<bool>>],
) -> Result<Array> {
    let vocab = logits.shape()[1];
    let flat: Vec<bool> = rows
        .iter()
        .flat_map(|&r| masks[r].as_deref().unwrap_or_default().iter().copied())
        .collect();
    let mask = Array::from_slice(&flat, &[rows.len() as i32, vocab]);
    let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
    let picked = logits.take_axis(Array::from_slice(&idx, &[idx.len() as i32]), 0)?;
    let floor = Array::from_f32(f32::NEG_INFINITY).as_dtype(picked.dtype())?;
    let best = argmax_axis(&mlx_rs::ops::select(&mask, &picked, &floor)?, -1, None)?;
    // Scatter back: row r takes best[pos[r]] where it is masked, its greedy token elsewhere.
    let b = greedy.shape()[0] as usize;
    let mut pos = vec![0i32; b];
    let mut is_masked = vec![false; b];
    for (k, &r) in rows.iter().enumerate() {
        pos[r] = k as i32;
        is_masked[r] = true;
    }
    let spread = best.take_axis(Array::from_slice(&pos, &[b as i32]), 0)?;
    let is_masked = Array::from_slice(&is_masked, &[b as i32]);
    Ok(mlx_rs::ops::select(&is_masked, &spread, greedy)?)
}

/// The device side of log-probabilities for the rows that asked: their log-sum-exp, the
/// greedy token's log-probability, and their top entries (unordered), from the full logits
/// without copying them to the host.
struct LogprobGraph {
    /// `[R, 1]` float32.
    lse: Array,
    /// `[R, 1]`: the log-probability of the row's greedy token.
    chosen: Array,
    /// `[R, k]` token ids and log-probabilities of the k most likely (k = the most asked,
    /// at most the vocabulary); `None` when every row asked for the chosen token's only.
    top: Option<(Array, Array)>,
}

impl LogprobGraph {
    fn new(logits: &Array, greedy: &Array, asked: &[(usize, usize)]) -> Result<Self> {
        let idx: Vec<i32> = asked.iter().map(|&(r, _)| r as i32).collect();
        let idx = Array::from_slice(&idx, &[idx.len() as i32]);
        let rows = logits
            .take_axis(&idx, 0)?
            .as_dtype(mlx_rs::Dtype::Float32)?;
        let lse = logsumexp_rows(&rows)?;
        let greedy = greedy
            .take_axis(&idx, 0)?
            .as_dtype(mlx_rs::Dtype::Int32)?
            .reshape(&[-1, 1])?;
        // Only the values read are shifted by the log-sum-exp (no [R, vocab] copy).
        let chosen = rows.take_along_axis(&greedy, -1)?.subtract(&lse)?;
        let vocab = rows.shape()[1];
        let k = (asked.iter().map(|&(_, n)| n).max().unwrap_or(0) as i32).min(vocab);
        let top = if k == 0 {
            None
        } else {
            let top_idx = mlx_rs::ops::argpartition_axis(rows.negative()?, k - 1, -1)?
                .try_index((.., ..k))?
                .contiguous()?;
            let top_val = rows.take_along_axis(&top_idx, -1)?.subtract(&lse)?;
            Some((top_idx, top_val))
        };
        Ok(Self { lse, chosen, top })
    }

    /// Per row of the batch (`rows`), its log-probabilities if it asked. `sampled_logit[r]`:
    /// the raw logit of the token a sampled row drew (its greedy token's otherwise).
    fn read(
        &self,
        rows: usize,
        asked: &[(usize, usize)],
        sampled_logit: &[Option<f32>],
    ) -> Result<Vec<Option<TokenLogprobs>>> {
        let lse = host_slice::<f32>(&self.lse)?;
        let chosen = host_slice::<f32>(&self.chosen)?;
        let (k, ids, vals) = match &self.top {
            Some((idx, val)) => (
                idx.shape()[1] as usize,
                host_slice::<u32>(idx)?,
                host_slice::<f32>(val)?,
            ),
            None => (0, &[][..], &[][..]),
        };
        let mut out = vec![None; rows];
        for (i, &(r, n)) in asked.iter().enumerate() {
            let mut top: Vec<(u32, f32)> =
                (0..k).map(|j| (ids[i * k + j], vals[i * k + j])).collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            top.truncate(n);
            let logprob = match sampled_logit[r] {
                Some(x) => x - lse[i],
                None => chosen[i],
            };
            out[r] = Some(TokenLogprobs { logprob, top });
        }
        Ok(out)
    }
}

/// log(sum(exp(x))) of each row of `[R, V]` float32, summed in two levels (blocks of 256,
/// then the blocks): MLX's single float32 sum over SmolLM2's 49,152 logits was off by 1.7e-4
/// in the result, two levels by about 1e-6.
fn logsumexp_rows(rows: &Array) -> Result<Array> {
    const BLOCK: i32 = 256;
    let (r, v) = (rows.shape()[0], rows.shape()[1]);
    let max = rows.max_axis(-1, true)?;
    let mut e = rows.subtract(&max)?.exp()?;
    let pad = (BLOCK - v % BLOCK) % BLOCK;
    if pad > 0 {
        let zeros = mlx_rs::ops::zeros::<f32>(&[r, pad])?;
        e = mlx_rs::ops::concatenate(&[e, zeros], 1)?;
    }
    let sum = e
        .reshape(&[r, -1, BLOCK])?
        .sum_axis(-1, false)?
        .sum_axis(-1, true)?;
    Ok(sum.log()?.add(&max)?)
}

fn token_matrix(rows: &[&[u32]]) -> Array {
    let width = rows.first().map_or(0, |r| r.len());
    let flat: Vec<i32> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&t| t as i32))
        .collect();
    Array::from_slice(&flat, &[rows.len() as i32, width as i32])
}

impl Runner for MlxRunner {
    fn start_prefill(
        &mut self,
        prompts: &[&[u32]],
        cached: &[Option<(EntryId, usize)>],
    ) -> Result<()> {
        let columns = prefix_columns(prompts, cached)?;
        let (mut tokens, geometry) = PrefillTokens::new(prompts);
        let layout = kv_layout(&self.lm.model);
        let mut cache = BatchKvCache::with_geometry(layout.clone(), geometry);
        if columns > 0 {
            // The cached parts, right-aligned at `columns` (zeros before them are padding).
            let zeros = |n: usize| {
                mlx_rs::ops::zeros::<f32>(&[
                    1,
                    layout.kv_heads as i32,
                    n as i32,
                    layout.head_dim as i32,
                ])
            };
            for layer in 0..layout.layers {
                let mut keys = Vec::with_capacity(prompts.len());
                let mut values = Vec::with_capacity(prompts.len());
                for c in cached {
                    let reuse = c.filter(|c| c.1 > 0);
                    let Some((id, n)) = reuse else {
                        keys.push(zeros(columns)?);
                        values.push(zeros(columns)?);
                        continue;
                    };
                    let entry = self.prefixes.get(&id).ok_or_else(|| {
                        crate::Error::EngineFailed(format!("prefix-cache entry {id} is gone"))
                    })?;
                    let (k, v) = &entry[layer];
                    let part = |a: &Array| -> Result<Array> {
                        let a = a.try_index((.., .., ..n as i32))?;
                        Ok(if n < columns {
                            mlx_rs::ops::concatenate(&[zeros(columns - n)?, a], 2)?
                        } else {
                            a
                        })
                    };
                    keys.push(part(k)?);
                    values.push(part(v)?);
                }
                let k = mlx_rs::ops::concatenate(&keys, 0)?;
                let v = mlx_rs::ops::concatenate(&values, 0)?;
                cache.restore(layer, &k, &v)?;
            }
            cache.advance(columns);
            tokens.advance(columns);
        }
        self.group = Some(PrefillGroup {
            cache,
            tokens,
            last_hidden: None,
        });
        Ok(())
    }

    fn prefill_step(&mut self, max_columns: usize) -> Result<bool> {
        let Some(group) = self.group.as_mut() else {
            return Ok(true);
        };
        if !group.tokens.is_done() {
            let rows = group.tokens.next_chunk(max_columns);
            let n = rows.first().map_or(0, |r| r.len());
            let input = token_matrix(&rows);
            let hidden = self.lm.model.forward_last(&input, &mut group.cache)?;
            group.tokens.advance(n);
            // The hidden state depends on every layer's cache write, so this evaluates them.
            let start = Instant::now();
            mlx_rs::transforms::eval([&hidden])?;
            self.eval_time += start.elapsed();
            group.last_hidden = Some(hidden);
        }
        Ok(self.group.as_ref().is_none_or(|g| g.tokens.is_done()))
    }

    fn retain_prefill(&mut self, rows: &[usize]) -> Result<()> {
        let Some(group) = self.group.as_mut() else {
            return Ok(());
        };
        let trim = group.cache.filter(rows)?;
        group.tokens.retain(rows, trim);
        group.last_hidden = None;
        if rows.is_empty() {
            self.group = None;
        }
        Ok(())
    }

    fn join(&mut self, samplers: &mut [&mut Sampler], ahead: Option<&[u32]>) -> Result<Vec<u32>> {
        let Some(group) = self.group.take() else {
            return Ok(Vec::new());
        };
        let hidden = group.last_hidden.ok_or_else(|| {
            crate::Error::EngineFailed("a prefill group joined before its last column".into())
        })?;
        let logits = self.lm.model.logits(&hidden)?;
        let greedy = argmax_axis(&logits, -1, None)?;
        let (tokens, _) = self.choose(&greedy, &logits, samplers)?;
        if self.keep_logits {
            self.last_logits = Some(logits);
        }
        // The joining rows have no queued step: drop it for everyone (one wasted step).
        self.discard_pending();
        let queue = ahead.filter(|_| self.pipeline && self.pipeline_join);
        if let Some(inputs) = queue {
            if inputs.len() != self.batch.batch_size() {
                return Err(crate::Error::EngineFailed(format!(
                    "{} inputs to queue ahead for {} running rows",
                    inputs.len(),
                    self.batch.batch_size()
                )));
            }
        }
        self.batch.extend(group.cache)?;
        if let Some(inputs) = queue {
            // The merged batch's first step, queued now. Every row's input is known on the
            // host (the running rows' from the scheduler, the joining rows' just chosen), so
            // this holds for sampled rows too: their next step samples from its logits.
            let all: Vec<u32> = inputs.iter().chain(&tokens).copied().collect();
            self.queue_step(&Array::from_slice(&all, &[all.len() as i32, 1]))?;
        }
        Ok(tokens)
    }

    fn prefill_remaining(&self) -> usize {
        self.group
            .as_ref()
            .map_or(0, |g| g.tokens.width().saturating_sub(g.tokens.done()))
    }

    fn decode(
        &mut self,
        inputs: &[u32],
        samplers: &mut [&mut Sampler],
        ahead: bool,
    ) -> Result<Vec<u32>> {
        let (greedy, logits) = match self.pending.take() {
            // Queued last step with exactly these inputs (the rows' greedy tokens).
            Some(p) if p.tokens.shape()[0] as usize == inputs.len() => (p.tokens, p.logits),
            Some(p) => {
                return Err(crate::Error::EngineFailed(format!(
                    "a step queued for {} rows, {} inputs",
                    p.tokens.shape()[0],
                    inputs.len()
                )));
            }
            None => {
                let column: Vec<&[u32]> = inputs.iter().map(std::slice::from_ref).collect();
                self.decode_graph(&token_matrix(&column))?
            }
        };
        let all_greedy = samplers.iter().all(|s| s.params().is_plain_greedy());
        let (tokens, chosen) = self.choose(&greedy, &logits, samplers)?;
        if all_greedy && self.pipeline && ahead {
            // Every row is greedy (constrained ones included: their masked argmax), so the
            // next inputs are `chosen` itself: queue that step now. A constrained row's mask
            // for it is computed while it runs.
            self.queue_step(&chosen.reshape(&[tokens.len() as i32, 1])?)?;
        }
        if self.keep_logits {
            self.last_logits = Some(logits);
        }
        self.decode_steps += 1;
        if self.decode_steps.is_multiple_of(CLEAR_CACHE_EVERY) {
            mlx_rs::memory::clear_cache()?;
        }
        Ok(tokens)
    }

    fn retain(&mut self, rows: &[usize]) -> Result<()> {
        // A queued step stays valid for the rows that remain: keep their part of it.
        if let Some(p) = self.pending.take() {
            if !rows.is_empty() {
                let idx = Array::from_slice(
                    &rows.iter().map(|&r| r as i32).collect::<Vec<_>>(),
                    &[rows.len() as i32],
                );
                self.pending = Some(Pending {
                    tokens: p.tokens.take_axis(&idx, 0)?,
                    logits: p.logits.take_axis(&idx, 0)?,
                });
            }
        }
        self.batch.filter(rows)?;
        Ok(())
    }

    fn holds_row_start(&self, row: usize) -> bool {
        self.batch.holds_row_start(row)
    }

    fn save_prefix(&mut self, id: EntryId, row: usize, len: usize) -> Result<()> {
        let kv = self.batch.row_prefix(row, len)?;
        self.prefixes.insert(id, kv);
        Ok(())
    }

    fn drop_prefixes(&mut self, ids: &[EntryId]) {
        for id in ids {
            self.prefixes.remove(id);
        }
    }

    fn reset(&mut self) {
        self.synchronize();
        self.batch = BatchKvCache::new(kv_layout(&self.lm.model));
        self.group = None;
        self.prefixes.clear();
        self.last_logits = None;
        self.pending = None;
        self.logprobs.clear();
        let _ = mlx_rs::memory::clear_cache();
    }

    fn kv_tokens(&self) -> usize {
        self.batch.tokens() + self.group.as_ref().map_or(0, |g| g.cache.tokens())
    }

    fn kv_bytes(&self) -> usize {
        self.batch.allocated_bytes() + self.group.as_ref().map_or(0, |g| g.cache.allocated_bytes())
    }

    fn take_eval_time(&mut self) -> Duration {
        std::mem::take(&mut self.eval_time)
    }

    fn take_logprobs(&mut self) -> Vec<Option<TokenLogprobs>> {
        std::mem::take(&mut self.logprobs)
    }
}

impl Drop for MlxRunner {
    fn drop(&mut self) {
        self.synchronize();
    }
}

/// Greedy decoding of one sequence without the engine: returns the generated ids, stopping
/// after `max_tokens` or at (and including) an end-of-sequence token.
pub fn generate_greedy(lm: &LoadedModel, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
    Ok(generate_greedy_with_logits(lm, prompt, max_tokens, false)?.0)
}

/// Like [`generate_greedy`], also returning each step's logits (`[vocab]` float32) when asked.
pub fn generate_greedy_with_logits(
    lm: &LoadedModel,
    prompt: &[u32],
    max_tokens: usize,
    keep_logits: bool,
) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let model = &lm.model;
    let mut cache = BatchKvCache::with_padding(kv_layout(model), vec![0]);
    let mut input = token_matrix(&[prompt]);
    let (mut out, mut all_logits) = (Vec::new(), Vec::new());
    while out.len() < max_tokens {
        let hidden = model.forward_last(&input, &mut cache)?;
        let logits = model.logits(&hidden)?;
        let next = argmax_axis(&logits, -1, None)?;
        mlx_rs::transforms::eval([&next, &logits])?;
        let token = host_slice::<u32>(&next)?[0];
        if keep_logits {
            all_logits.push(host_slice::<f32>(&logits)?.to_vec());
        }
        out.push(token);
        if lm.tokenizer.eos_ids().contains(&token) {
            break;
        }
        input = token_matrix(&[&[token]]);
    }
    Ok((out, all_logits))
}
