//! Per-request sampling: llama.cpp's knobs over one row of logits on the host.
//!
//! Greedy rows without penalties never come here: the runner takes their argmax on the device
//! and copies back one id. A sampler owns its own RNG (ChaCha8, seeded per request), so a
//! seeded request draws the same tokens whatever else shares its batch.
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::constraint::RowConstraint;
use crate::error::{Error, Result};

/// Penalties look at this many most recent tokens (prompt and output), like llama.cpp.
pub(crate) const PENALTY_WINDOW: usize = 64;

/// Sampling parameters of one request. The defaults are greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one; 0 disables.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recent tokens; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted from the logits of tokens seen recently; 0 disables.
    pub presence_penalty: f32,
    /// Subtracted once per recent occurrence; 0 disables.
    pub frequency_penalty: f32,
    /// RNG seed; `None` picks one from the clock.
    pub seed: Option<u64>,
    /// Report each generated token's log-probability and the `n` most likely alternatives
    /// (`Some(n)`, n at most [`MAX_TOP_LOGPROBS`]) with its event; `None`: none (rows that
    /// do not ask cost nothing).
    pub logprobs: Option<usize>,
}

/// The most alternatives [`SamplingParams::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Rejects values that make no sense (NaN, negative temperature, p outside [0, 1]...).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_owned()));
        let finite = [
            self.temperature,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
        ]
        .iter()
        .all(|v| v.is_finite());
        if !finite {
            return bad("sampling parameters must be finite numbers");
        }
        if !(0.0..=100.0).contains(&self.temperature) {
            return bad("temperature must be in [0, 100]");
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty must be > 0");
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return bad("logprobs asks for at most 20 alternatives");
        }
        Ok(())
    }

    /// Whether any penalty is active.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Greedy with no penalties: the argmax can be taken on the device.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && !self.has_penalties()
    }
}

/// Sampling state of one request.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    recent: std::collections::VecDeque<u32>,
    /// The request's output constraint (structured output), if any.
    constraint: Option<Box<RowConstraint>>,
}

impl Sampler {
    /// A sampler whose penalty window starts with the end of `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let start = prompt.len().saturating_sub(PENALTY_WINDOW);
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            recent: prompt[start..].iter().copied().collect(),
            constraint: None,
        }
    }

    /// Restricts the tokens this row may generate to what `constraint` allows.
    pub fn with_constraint(mut self, constraint: Option<RowConstraint>) -> Self {
        self.constraint = constraint.map(Box::new);
        self
    }

    /// The row's constraint, if it has one.
    pub fn constraint(&self) -> Option<&RowConstraint> {
        self.constraint.as_deref()
    }

    /// The tokens the row's constraint allows next (one flag per id of a `vocab`-wide
    /// logits row); `None` without a constraint.
    pub fn allowed(&mut self, vocab: usize) -> Option<Vec<bool>> {
        self.constraint.as_mut().map(|c| c.mask(vocab))
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a generated token (for penalties and the constraint).
    pub fn accept(&mut self, token: u32) {
        if let Some(c) = &mut self.constraint {
            c.consume(token);
        }
        if self.recent.len() == PENALTY_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    /// Picks the next token from one row of logits (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let p = self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, best first; top-k cuts before sorting everything.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if p.top_k > 0 && (p.top_k as usize) < idx.len() {
            idx.select_nth_unstable_by(p.top_k as usize - 1, by_logit);
            idx.truncate(p.top_k as usize);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        // min-p relative to the best candidate, then top-p over the sorted list.
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut n = 0;
            for q in &probs[..keep] {
                cum += q;
                n += 1;
                if cum >= p.top_p as f64 {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut r = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * mass;
        for (k, q) in probs[..keep].iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return idx[k];
            }
        }
        idx[keep - 1]
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = self.params;
        if !p.has_penalties() {
            return;
        }
        let mut counts: std::collections::HashMap<u32, u32> = Default::default();
        for &t in &self.recent {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &c) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
            *l -= p.presence_penalty + p.frequency_penalty * c as f32;
        }
    }
}

/// Index of the largest value (first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 5.0;
                p.top_k = 1
            }),
            &[],
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9]), 1);
        }
    }

    #[test]
    fn same_seed_same_draws_and_top_p_limits_support() {
        let run = || {
            let mut s = Sampler::new(
                params(|p| {
                    p.temperature = 1.0;
                    p.top_p = 0.9
                }),
                &[],
            );
            (0..200)
                .map(|_| s.sample(&mut [2.0, 2.0, 2.0, -10.0, -10.0]))
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(
            a.iter().all(|&t| t < 3),
            "top-p must drop the unlikely tail"
        );
        assert!(
            (0..3).all(|t| a.contains(&t)),
            "all three likely tokens are drawn"
        );
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 1.0;
                p.min_p = 0.5
            }),
            &[],
        );
        for _ in 0..100 {
            // exp(-1) ~ 0.37 < 0.5 of the best: token 1 is never drawn.
            assert_eq!(s.sample(&mut [1.0, 0.0]), 0);
        }
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0), &[0]);
        assert_eq!(s.sample(&mut [3.0, 2.0]), 1);
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.6), &[0, 0]);
        assert_eq!(s.sample(&mut [3.0, 2.0]), 1);
        let mut s = Sampler::new(params(|p| p.presence_penalty = 0.5), &[0, 0]);
        assert_eq!(s.sample(&mut [3.0, 2.9]), 1);
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(params(|p| p.temperature = f32::NAN).validate().is_err());
        assert!(params(|p| p.temperature = -1.0).validate().is_err());
        assert!(params(|p| p.top_p = 0.0).validate().is_err());
        assert!(params(|p| p.min_p = 2.0).validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
