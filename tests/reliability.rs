//! A randomized, model-based test of the engine on the real model and the real MLX runner.
//!
//! Each sequence (one seed) starts an engine with a random configuration (both batch modes,
//! batch sizes 1-6, prefill budgets that force many chunks, tight KV budgets, a small
//! `max_requests`) and runs random operations: submits of text, token and chat prompts of
//! 1-2,000 tokens (mixed lengths, so prefill groups mix long and short rows), cancels at
//! random moments (queued, mid-prefill, decoding, finished), several pollers on one id,
//! requests never polled (released, or polled late), releases, and pauses. It ends either by
//! draining or by dropping the engine with requests in flight. Then it checks:
//! - every submitted id ended exactly once across all its pollers (never, if released);
//! - every request not cancelled or released, decoded greedily, equals its single-sequence
//!   output (tie-aware: a flip is accepted only where the reference's top-2 logit gap is below
//!   what batching can change, see `TIE`);
//! - every request ended within a bound, and dropping the engine returned within a bound;
//! - once drained, the engine does not step while idle, holds no requests and no KV bytes,
//!   never allocated more KV than its budget, and MLX's active memory is back at its baseline.
//!
//! `make test` runs a few sequences with prompts up to ~900 tokens. `make reliability` runs
//! many more with prompts up to 2,000 tokens (CONVOY_RELIABILITY_SEQUENCES,
//! CONVOY_RELIABILITY_FIRST_SEED, CONVOY_RELIABILITY_LONG=1, CONVOY_RELIABILITY_REPORT=path).
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use convoy::model::{self, LoadOptions};
use convoy::runner::generate_greedy_with_logits;
use convoy::{
    BatchMode, ChatMessage, Engine, EngineConfig, Error, Event, FinishReason, Prompt, Request,
    SamplingParams, StopConditions,
};

/// Batched and single-sequence logits differ by at most ~2e-3 on this model (see
/// tests/engine.rs); a greedy choice can only flip where the top two logits are closer than
/// twice that.
const TIE: f32 = 5e-3;
/// Every request must end (drain mode) without the engine stalling: a poller gives up when
/// the engine has made no progress at all (no token generated, no KV growth, no request
/// finished) for `STALL_BOUND`, or after `REQUEST_BOUND` in any case. Progress, not wall
/// time, so a slow or shared machine does not fail the test, while a hang or a spinning
/// engine (steps that compute nothing) does. Counters move only between steps, and one
/// static-mode step prefills a whole group (up to 6 prompts of 2,000 tokens): on 2 shared
/// cores that took over 120 s once, hence the generous bound.
const STALL_BOUND: Duration = Duration::from_secs(900);
const REQUEST_BOUND: Duration = Duration::from_secs(3600);
/// Dropping an engine with requests in flight must return within this long.
const DROP_BOUND: Duration = Duration::from_secs(30);

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn long_mode() -> bool {
    std::env::var("CONVOY_RELIABILITY_LONG").is_ok_and(|v| v == "1")
}

fn max_new() -> usize {
    if long_mode() {
        64
    } else {
        10
    }
}

/// A prompt of the pool, with its token ids and its single-sequence greedy reference.
struct Entry {
    prompt: Prompt,
    ids: Vec<u32>,
    /// Greedy tokens for up to `max_new()` steps (ends early at EOS).
    reference: Vec<u32>,
    /// Top-1 minus top-2 logit at each reference step.
    gaps: Vec<f32>,
    /// The reference ends with an end-of-sequence token.
    eos_end: bool,
}

const PARAGRAPH: &str = "The river bends twice before it reaches the old mill, where the \
    water slows and the reeds grow thick along the bank. Children used to fish there in the \
    summer, and in winter the ice would crack with a sound like distant thunder. ";

/// Prompts of very different lengths and all three kinds.
fn pool() -> &'static Vec<Entry> {
    static POOL: OnceLock<Vec<Entry>> = OnceLock::new();
    POOL.get_or_init(|| {
        std::thread::spawn(|| {
            let lm = model::load(model_path(), LoadOptions::default()).unwrap();
            let tok = &lm.tokenizer;
            let mut prompts = vec![
                Prompt::Tokens(vec![tok.encode("Hello", false).unwrap()[0]]),
                Prompt::Text("Hi".into()),
                Prompt::Text("The capital of Italy is".into()),
                Prompt::Chat(chat(QUESTIONS[0])),
                Prompt::Chat(chat(QUESTIONS[3])),
                Prompt::Chat(vec![ChatMessage::new("user", QUESTIONS[6])]),
                Prompt::Text(PARAGRAPH.repeat(2)),
                Prompt::Chat(chat(&format!("Summarize: {}", PARAGRAPH.repeat(4)))),
                Prompt::Text(PARAGRAPH.repeat(9)),
            ];
            let long_lens: &[usize] = if long_mode() { &[1200, 2000] } else { &[] };
            for &n in long_lens {
                // Token prompts of exactly n tokens, cut from natural text.
                let ids = tok.encode(&PARAGRAPH.repeat(n / 40 + 2), true).unwrap();
                prompts.push(Prompt::Tokens(ids[..n].to_vec()));
            }
            // Prompts that share prefixes with others (the prefix cache reuses them): a longer
            // text, and the next turn of a chat, made below once its first answer is known.
            prompts.push(Prompt::Text(format!("{}The mill", PARAGRAPH.repeat(2))));
            let mut pool: Vec<Entry> = prompts
                .into_iter()
                .map(|prompt| {
                    let ids = match &prompt {
                        Prompt::Text(t) => tok.encode(t, true).unwrap(),
                        Prompt::Tokens(ids) => ids.clone(),
                        Prompt::Chat(m) => tok.encode_chat(m).unwrap(),
                    };
                    let (reference, logits) =
                        generate_greedy_with_logits(&lm, &ids, max_new(), true).unwrap();
                    entry_of(prompt, ids, reference, &logits, tok)
                })
                .collect();
            let answer = tok.decode(&pool[3].reference).unwrap();
            let mut turn = chat(QUESTIONS[0]);
            turn.push(ChatMessage::new("assistant", &answer));
            turn.push(ChatMessage::new("user", "Say that again in fewer words."));
            let ids = tok.encode_chat(&turn).unwrap();
            let (reference, logits) =
                generate_greedy_with_logits(&lm, &ids, max_new(), true).unwrap();
            pool.push(entry_of(Prompt::Chat(turn), ids, reference, &logits, tok));
            pool
        })
        .join()
        .unwrap()
    })
}

fn entry_of(
    prompt: Prompt,
    ids: Vec<u32>,
    reference: Vec<u32>,
    logits: &[Vec<f32>],
    tok: &convoy::tokenizer::Tokenizer,
) -> Entry {
    let gaps = logits
        .iter()
        .map(|l| {
            let (mut a, mut b) = (f32::MIN, f32::MIN);
            for &x in l {
                if x > a {
                    b = a;
                    a = x;
                } else if x > b {
                    b = x;
                }
            }
            a - b
        })
        .collect();
    let eos_end = reference.last().is_some_and(|t| tok.eos_ids().contains(t));
    Entry {
        prompt,
        ids,
        reference,
        gaps,
        eos_end,
    }
}

/// Seeded randomness (ChaCha: a stable stream for a seed).
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
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// What one poller thread saw.
#[derive(Default, Debug)]
struct Seen {
    tokens: Vec<u32>,
    finished: Vec<(FinishReason, usize)>,
    /// Ended by UnknownRequest (another poller took the end, or the id was released).
    unknown: bool,
    /// Gave up at the deadline (a hang).
    timed_out: bool,
}

fn spawn_poller(
    engine: Arc<Engine>,
    id: u64,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        let progress = |e: &Engine| {
            let s = e.stats();
            (
                s.tokens_generated,
                s.kv_tokens,
                s.requests_finished,
                s.prefilling,
            )
        };
        let mut last = progress(&engine);
        let mut last_change = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                return seen;
            }
            let now = progress(&engine);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            if Instant::now() > deadline || last_change.elapsed() > STALL_BOUND {
                seen.timed_out = true;
                return seen;
            }
            match engine.poll(id, Duration::from_millis(50)) {
                Ok(None) => {}
                Ok(Some(Event::Token { token, .. })) => seen.tokens.push(token),
                Ok(Some(Event::Finished { reason, stats, .. })) => {
                    seen.finished.push((reason, stats.generated_tokens))
                }
                Err(Error::UnknownRequest(_)) => {
                    seen.unknown = true;
                    return seen;
                }
                Err(e) => panic!("poll {id}: {e}"),
            }
        }
    })
}

struct Tracked {
    entry: usize,
    max_tokens: usize,
    greedy: bool,
    pollers: Vec<JoinHandle<Seen>>,
    cancelled: bool,
    released: bool,
}

#[derive(Default, Debug, Clone, Copy)]
struct Totals {
    sequences: usize,
    requests: usize,
    compared: usize,
    ties: usize,
    cancels: usize,
    releases: usize,
    busy: usize,
    late_polls: usize,
    multi_polled: usize,
    drops_in_flight: usize,
    prefix_hits: usize,
}

fn compare(
    e: &Entry,
    max_tokens: usize,
    got: &[u32],
    reason: FinishReason,
) -> Result<bool, String> {
    let want = &e.reference[..e.reference.len().min(max_tokens)];
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None if got.len() == want.len() => {
            let ended_eos = e.eos_end && want.len() == e.reference.len();
            let ok = if ended_eos {
                reason == FinishReason::Stop
            } else {
                reason == FinishReason::Length
            };
            ok.then_some(false)
                .ok_or_else(|| format!("reason {reason:?} for {} tokens", got.len()))
        }
        None => Err(format!("got {got:?}, want {want:?}")),
        Some(i) if e.gaps[i] < TIE => Ok(true),
        Some(i) => Err(format!(
            "diverged at {i} (gap {:.4}): got {got:?}, want {want:?}",
            e.gaps[i]
        )),
    }
}

fn run_sequence(seed: u64, totals: &mut Totals) {
    let pool = pool();
    let mut rng = Rng::new(seed);
    let mut config = EngineConfig::default();
    let s = &mut config.scheduler;
    s.mode = if rng.chance(25) {
        BatchMode::Static
    } else {
        BatchMode::Continuous
    };
    s.max_batch_size = 1 + rng.below(6);
    s.prefill_chunk = [8, 16, 48, 128, 256, 512][rng.below(6)];
    s.max_prefill_group = 1 + rng.below(4);
    s.max_waiting = 4 + rng.below(20);
    if rng.chance(30) {
        // Tight: room for about two long rows.
        s.max_kv_bytes = 2 * (2300 + 256) * 2 * 30 * 3 * 64 * 4;
    }
    config.max_requests = if rng.chance(30) { 6 } else { 1024 };
    // Prefix cache: off, room for a few short prefixes (evicting all the time), or the
    // default.
    s.prefix_cache_bytes = [0, 200 * 46_080, s.prefix_cache_bytes][rng.below(3)];
    // Decode-ahead (off by default on the CPU backend, on for Metal and CUDA), with and
    // without queuing across joins: the pipelined path meets cancels, leaves and joins too.
    config.tuning.decode_ahead = rng.chance(50);
    config.tuning.decode_ahead_at_join = rng.chance(50);
    let ahead = (
        config.tuning.decode_ahead,
        config.tuning.decode_ahead_at_join,
    );
    let s = &mut config.scheduler;
    let summary = format!(
        "seed {seed}: {:?} batch {} chunk {} group {} waiting {} kv {} held {} prefix cache {} \
         ahead {ahead:?}",
        s.mode,
        s.max_batch_size,
        s.prefill_chunk,
        s.max_prefill_group,
        s.max_waiting,
        s.max_kv_bytes,
        config.max_requests,
        s.prefix_cache_bytes
    );
    let prefix_budget = s.prefix_cache_bytes;
    eprintln!("{summary}");
    let kv_budget = s.max_kv_bytes;
    let engine = Arc::new(Engine::new(model_path(), config).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    let baseline = engine.stats().active_memory_bytes;

    let stop = Arc::new(AtomicBool::new(false));
    let mut reqs: HashMap<u64, Tracked> = HashMap::new();
    let mut order: Vec<u64> = Vec::new();
    let ops = 8 + rng.below(18);
    for _ in 0..ops {
        match rng.below(10) {
            0..=4 => {
                let entry = rng.below(pool.len());
                let max_tokens = 1 + rng.below(max_new());
                let greedy = !rng.chance(15);
                let mut req = Request::new(pool[entry].prompt.clone());
                req.stop = StopConditions {
                    max_tokens,
                    ..Default::default()
                };
                if !greedy {
                    req.sampling = SamplingParams {
                        temperature: 0.8,
                        top_p: 0.9,
                        seed: Some(seed),
                        ..Default::default()
                    };
                }
                match engine.submit(req) {
                    Ok(id) => {
                        totals.requests += 1;
                        let n_pollers = [0, 1, 1, 1, 2, 3][rng.below(6)];
                        if n_pollers > 1 {
                            totals.multi_polled += 1;
                        }
                        let deadline = Instant::now() + REQUEST_BOUND;
                        let pollers = (0..n_pollers)
                            .map(|_| spawn_poller(engine.clone(), id, stop.clone(), deadline))
                            .collect();
                        reqs.insert(
                            id,
                            Tracked {
                                entry,
                                max_tokens,
                                greedy,
                                pollers,
                                cancelled: false,
                                released: false,
                            },
                        );
                        order.push(id);
                    }
                    Err(Error::Busy(_)) => totals.busy += 1,
                    Err(e) => panic!("{summary}: submit: {e}"),
                }
            }
            5 | 6 if !order.is_empty() => {
                let id = order[rng.below(order.len())];
                match engine.cancel(id) {
                    Ok(()) => {
                        reqs.get_mut(&id).unwrap().cancelled = true;
                        totals.cancels += 1;
                    }
                    Err(Error::UnknownRequest(_)) => {}
                    Err(e) => panic!("{summary}: cancel: {e}"),
                }
            }
            7 if !order.is_empty() => {
                let id = order[rng.below(order.len())];
                match engine.release(id) {
                    Ok(()) => {
                        reqs.get_mut(&id).unwrap().released = true;
                        totals.releases += 1;
                    }
                    Err(Error::UnknownRequest(_)) => {}
                    Err(e) => panic!("{summary}: release: {e}"),
                }
            }
            _ => std::thread::sleep(Duration::from_millis(rng.below(400) as u64)),
        }
    }

    if rng.chance(20) {
        // Destroy with requests in flight: pollers stop, the engine is dropped mid-work.
        totals.drops_in_flight += 1;
        stop.store(true, Ordering::Relaxed);
        for t in reqs.values_mut() {
            for p in t.pollers.drain(..) {
                let seen = p.join().unwrap();
                assert!(seen.finished.len() <= 1, "{summary}: {seen:?}");
            }
        }
        let engine = Arc::into_inner(engine).expect("only owner left");
        let start = Instant::now();
        drop(engine);
        assert!(
            start.elapsed() < DROP_BOUND,
            "{summary}: drop took {:?}",
            start.elapsed()
        );
        totals.sequences += 1;
        return;
    }

    // Requests nobody polled: most are polled late, some stay released.
    for (&id, t) in reqs.iter_mut() {
        if t.pollers.is_empty() && !t.released {
            totals.late_polls += 1;
            let deadline = Instant::now() + REQUEST_BOUND;
            t.pollers
                .push(spawn_poller(engine.clone(), id, stop.clone(), deadline));
        }
    }
    for id in order {
        let t = reqs.remove(&id).unwrap();
        let seen: Vec<Seen> = t.pollers.into_iter().map(|p| p.join().unwrap()).collect();
        assert!(
            seen.iter().all(|s| !s.timed_out),
            "{summary}: request {id} did not end: the engine made no progress for \
             {STALL_BOUND:?}, or {REQUEST_BOUND:?} passed"
        );
        let ends: Vec<(FinishReason, usize)> =
            seen.iter().flat_map(|s| s.finished.clone()).collect();
        let tokens: usize = seen.iter().map(|s| s.tokens.len()).sum();
        if t.released {
            assert!(ends.len() <= 1, "{summary}: request {id} ended {ends:?}");
            continue;
        }
        assert_eq!(ends.len(), 1, "{summary}: request {id} ended {ends:?}");
        let (reason, generated) = ends[0];
        assert_eq!(
            tokens, generated,
            "{summary}: request {id}: token events vs stats"
        );
        assert_ne!(reason, FinishReason::Error, "{summary}: request {id}");
        if t.cancelled && reason == FinishReason::Cancelled {
            continue;
        }
        if t.greedy && seen.len() == 1 {
            let e = &pool[t.entry];
            match compare(e, t.max_tokens, &seen[0].tokens, reason) {
                Ok(tie) => {
                    totals.compared += 1;
                    totals.ties += tie as usize;
                }
                Err(msg) => panic!(
                    "{summary}: request {id} ({} prompt tokens, max {}): {msg}",
                    e.ids.len(),
                    t.max_tokens
                ),
            }
        }
    }

    // Drained: nothing held, no KV, no steps while idle, memory back at the baseline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = engine.stats();
    while (s.running > 0 || s.waiting > 0 || s.kv_bytes > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        s = engine.stats();
    }
    assert_eq!((s.running, s.waiting, s.kv_bytes), (0, 0, 0), "{summary}");
    assert_eq!(engine.requests_held(), 0, "{summary}");
    std::thread::sleep(Duration::from_millis(300));
    let later = engine.stats();
    assert_eq!(later.steps, s.steps, "{summary}: steps while idle");
    // What stays is the prefix cache's KV, within its budget.
    assert!(
        later.prefix_cache_bytes <= prefix_budget,
        "{summary}: prefix cache over budget"
    );
    assert!(
        later.active_memory_bytes <= baseline + later.prefix_cache_bytes as u64 + (1 << 20),
        "{summary}: MLX active memory {} after draining, baseline {baseline}, prefix cache {}",
        later.active_memory_bytes,
        later.prefix_cache_bytes
    );
    totals.prefix_hits += later.prefix_cache_hits as usize;
    assert!(
        later.peak_kv_bytes <= kv_budget,
        "{summary}: KV peak over budget"
    );
    totals.sequences += 1;
}

#[test]
fn randomized_sequences_on_the_real_model() {
    let n = env_usize("CONVOY_RELIABILITY_SEQUENCES", 4);
    let first = env_usize("CONVOY_RELIABILITY_FIRST_SEED", 1) as u64;
    let started = Instant::now();
    let _ = pool();
    eprintln!("references computed in {:.1?}", started.elapsed());
    let totals = Arc::new(Mutex::new(Totals::default()));
    for seed in first..first + n as u64 {
        let t0 = Instant::now();
        let mut t = *totals.lock().unwrap();
        run_sequence(seed, &mut t);
        *totals.lock().unwrap() = t;
        eprintln!("  seed {seed} passed in {:.1?}", t0.elapsed());
    }
    let t = *totals.lock().unwrap();
    let line = format!(
        "{{\"first_seed\":{first},\"sequences\":{},\"requests\":{},\"compared\":{},\"ties\":{},\"cancels\":{},\"releases\":{},\"busy\":{},\"late_polls\":{},\"multi_polled\":{},\"drops_in_flight\":{},\"prefix_hits\":{},\"long\":{},\"seconds\":{:.1}}}",
        t.sequences,
        t.requests,
        t.compared,
        t.ties,
        t.cancels,
        t.releases,
        t.busy,
        t.late_polls,
        t.multi_polled,
        t.drops_in_flight,
        t.prefix_hits,
        long_mode(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("{line}");
    if let Ok(path) = std::env::var("CONVOY_RELIABILITY_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
    assert!(t.compared > 0, "some outputs were compared");
    // Near-ties are rare on natural prompts; many of them would mean real divergence hidden
    // behind the tie rule.
    assert!(
        t.ties * 10 <= t.compared + 10,
        "{} of {} compared outputs diverged at a near-tie",
        t.ties,
        t.compared
    );
}
