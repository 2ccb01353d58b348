//! The prefix-cache benchmark (`convoy-bench --prefix-cache`, `make bench-prefix`; issue 10):
//! two workloads, each run on a fresh engine with the cache off and on, in one process.
//!
//! - *Chat*: `conversations` clients, each a chat of `turns` turns that resends the whole
//!   conversation every turn (system prompt, every question and every answer so far), as an
//!   app does. The clients start a second apart and run concurrently (their turns arrive
//!   interleaved); each turn's answer is streamed to the end before the client asks the next
//!   question. Greedy, so both runs generate the same answers and so the same prompts.
//! - *Burst*: `burst` requests sharing a long system prompt, each with its own question,
//!   handed over together.
//!
//! Per request: TTFT (submit to first token), prompt tokens and prompt tokens computed
//! (prompt minus `cached_tokens`). Writes `prefix-cache.jsonl` and `prefix-cache.md` into
//! the output folder and prints the table.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy::{ChatMessage, Engine, EngineConfig, Event, Prompt, Request, StopConditions};
use serde_json::json;

const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

const QUESTIONS: [&str; 12] = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Why is the sky blue? Answer in one sentence.",
    "What is 12 plus 30?",
    "Write a haiku about the sea.",
    "Give me a tip for sleeping better.",
    "What does a bee make?",
    "Suggest a name for a small grey cat.",
    "How many legs does a spider have?",
    "What is the opposite of cold?",
    "Tell me a fun fact about the moon.",
    "Which planet is known as the red planet?",
];

const FOLLOW_UPS: [&str; 5] = [
    "Can you explain that in more detail?",
    "Now explain it to a child, with an example.",
    "Give me three more examples, each with a short explanation.",
    "What are common misconceptions about this? Explain each one.",
    "Summarize our whole conversation in a short paragraph.",
];

/// Sizes of the two workloads.
pub struct Sizes {
    pub conversations: usize,
    pub turns: usize,
    pub answer_tokens: usize,
    pub burst: usize,
    /// Repeats of the burst's system-prompt sentence (~10 tokens each).
    pub system_repeats: usize,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            conversations: 8,
            turns: 6,
            answer_tokens: 160,
            burst: 8,
            system_repeats: 60,
        }
    }
    pub fn smoke() -> Self {
        Self {
            conversations: 2,
            turns: 2,
            answer_tokens: 4,
            burst: 2,
            system_repeats: 4,
        }
    }
}

/// One finished request of a run.
#[derive(Debug, Clone)]
struct Sample {
    conversation: usize,
    turn: usize,
    ttft: f64,
    prompt: usize,
    cached: usize,
    tokens: Vec<u32>,
}

fn request(messages: Vec<ChatMessage>, max_tokens: usize) -> Request {
    let mut r = Request::new(Prompt::Chat(messages));
    r.stop = StopConditions {
        max_tokens,
        ..Default::default()
    };
    r
}

/// Streams request `id` to its end: (TTFT from `submitted`, text, tokens, cached tokens,
/// prompt tokens).
fn follow(engine: &Engine, id: u64, submitted: Instant) -> (f64, String, Vec<u32>, usize, usize) {
    let (mut ttft, mut text, mut tokens) = (None, String::new(), Vec::new());
    loop {
        match engine.poll(id, Duration::from_secs(3600)).expect("poll") {
            Some(Event::Token { token, text: t, .. }) => {
                ttft.get_or_insert_with(|| submitted.elapsed().as_secs_f64());
                tokens.push(token);
                text.push_str(&t);
            }
            Some(Event::Finished {
                text: t,
                stats,
                error,
                ..
            }) => {
                assert!(error.is_none(), "request failed: {error:?}");
                text.push_str(&t);
                let ttft = ttft.unwrap_or_else(|| submitted.elapsed().as_secs_f64());
                return (ttft, text, tokens, stats.cached_tokens, stats.prompt_tokens);
            }
            None => panic!("request {id} made no progress for an hour"),
        }
    }
}

fn engine(model: &Path, cache: bool, batch: usize) -> Engine {
    let mut cfg = EngineConfig::default().max_batch_size(batch);
    if !cache {
        cfg.scheduler.prefix_cache_bytes = 0;
    }
    Engine::new(model, cfg).expect("create the engine")
}

fn run_chat(model: &Path, cache: bool, s: &Sizes) -> Vec<Sample> {
    let engine = Arc::new(engine(model, cache, s.conversations.max(1)));
    let _ = engine.generate(request(vec![ChatMessage::new("user", "Hi")], 2));
    let start = Instant::now();
    let clients: Vec<_> = (0..s.conversations)
        .map(|c| {
            let engine = engine.clone();
            let (turns, answer_tokens) = (s.turns, s.answer_tokens);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(c as u64).saturating_sub(start.elapsed()));
                let mut messages = vec![
                    ChatMessage::new("system", SYSTEM),
                    ChatMessage::new("user", QUESTIONS[c % QUESTIONS.len()]),
                ];
                let mut out = Vec::new();
                for turn in 0..turns {
                    let submitted = Instant::now();
                    let id = engine
                        .submit(request(messages.clone(), answer_tokens))
                        .expect("submit");
                    let (ttft, text, tokens, cached, prompt) = follow(&engine, id, submitted);
                    out.push(Sample {
                        conversation: c,
                        turn,
                        ttft,
                        prompt,
                        cached,
                        tokens,
                    });
                    messages.push(ChatMessage::new("assistant", &text));
                    messages.push(ChatMessage::new(
                        "user",
                        FOLLOW_UPS[turn % FOLLOW_UPS.len()],
                    ));
                }
                out
            })
        })
        .collect();
    clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect()
}

fn run_burst(model: &Path, cache: bool, s: &Sizes) -> Vec<Sample> {
    let engine = engine(model, cache, s.burst.max(1));
    let _ = engine.generate(request(vec![ChatMessage::new("user", "Hi")], 2));
    let system = format!(
        "{SYSTEM}. {}",
        "Follow the house rules: be brief, be kind, cite sources when you can. "
            .repeat(s.system_repeats)
    );
    let requests: Vec<Request> = (0..s.burst)
        .map(|i| {
            request(
                vec![
                    ChatMessage::new("system", &system),
                    ChatMessage::new("user", QUESTIONS[i % QUESTIONS.len()]),
                ],
                16,
            )
        })
        .collect();
    let submitted = Instant::now();
    let ids = engine.submit_batch(requests).expect("submit the burst");
    // One thread per request, so each first token is seen when it comes.
    let engine = Arc::new(engine);
    let followers: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let (ttft, _, tokens, cached, prompt) = follow(&engine, id, submitted);
                Sample {
                    conversation: i,
                    turn: 0,
                    ttft,
                    prompt,
                    cached,
                    tokens,
                }
            })
        })
        .collect();
    followers
        .into_iter()
        .map(|f| f.join().expect("follower"))
        .collect()
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Which samples a table row summarizes.
type Pick = Box<dyn Fn(&Sample) -> bool>;

struct Summary {
    requests: usize,
    ttft_p50: f64,
    ttft_p95: f64,
    prompt: usize,
    computed: usize,
}

fn summarize<'a>(samples: impl Iterator<Item = &'a Sample>) -> Summary {
    let v: Vec<&Sample> = samples.collect();
    Summary {
        requests: v.len(),
        ttft_p50: quantile(v.iter().map(|s| s.ttft).collect(), 0.5),
        ttft_p95: quantile(v.iter().map(|s| s.ttft).collect(), 0.95),
        prompt: v.iter().map(|s| s.prompt).sum(),
        computed: v.iter().map(|s| s.prompt - s.cached).sum(),
    }
}

/// Runs both workloads with the cache off and on; writes the results; returns the table.
pub fn run(model: &Path, out: &Path, sizes: &Sizes) -> String {
    std::fs::create_dir_all(out).expect("create the output folder");
    let mut lines = Vec::new();
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for workload in ["chat", "burst"] {
        let mut by_cache = Vec::new();
        for cache in [false, true] {
            eprintln!(
                "prefix-cache bench: {workload}, cache {}",
                if cache { "on" } else { "off" }
            );
            let samples = if workload == "chat" {
                run_chat(model, cache, sizes)
            } else {
                run_burst(model, cache, sizes)
            };
            for s in &samples {
                lines.push(json!({
                    "workload": workload, "cache": cache, "conversation": s.conversation,
                    "turn": s.turn, "ttft_s": s.ttft, "prompt_tokens": s.prompt,
                    "cached_tokens": s.cached,
                }));
            }
            by_cache.push(samples);
        }
        let (off, on) = (&by_cache[0], &by_cache[1]);
        // Greedy: the cache must not change a single token.
        let key = |s: &Sample| (s.conversation, s.turn);
        let mut a: Vec<_> = off.iter().map(|s| (key(s), &s.tokens)).collect();
        let mut b: Vec<_> = on.iter().map(|s| (key(s), &s.tokens)).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{workload}: outputs differ with the cache on");
        let groups: Vec<(&str, Pick)> = if workload == "chat" {
            vec![
                ("chat, turn 1", Box::new(|s: &Sample| s.turn == 0)),
                ("chat, turns 2+", Box::new(|s: &Sample| s.turn > 0)),
            ]
        } else {
            vec![("burst, shared system prompt", Box::new(|_: &Sample| true))]
        };
        for (name, pick) in &groups {
            let (x, y) = (
                summarize(off.iter().filter(|s| pick(s))),
                summarize(on.iter().filter(|s| pick(s))),
            );
            let ratio = x.ttft_p50 / y.ttft_p50;
            ratios.push((name.to_string(), ratio, x.ttft_p95 / y.ttft_p95));
            rows.push(format!(
                "| {name} | {} | {:.2} / {:.2} | {:.2} / {:.2} | **{ratio:.1}x** / {:.1}x | {} | {} / {} |",
                x.requests,
                x.ttft_p50,
                y.ttft_p50,
                x.ttft_p95,
                y.ttft_p95,
                x.ttft_p95 / y.ttft_p95,
                x.prompt,
                x.computed,
                y.computed,
            ));
        }
    }
    let mut table = String::from(
        "| workload | requests | TTFT p50 off / on (s) | TTFT p95 off / on (s) | TTFT off / on (p50 / p95) | prompt tokens | computed off / on |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        table.push_str(&r);
        table.push('\n');
    }
    let jsonl: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(out.join("prefix-cache.jsonl"), jsonl).expect("write prefix-cache.jsonl");
    let summary: String = ratios
        .iter()
        .map(|(n, p50, p95)| {
            format!("{n}: TTFT p50 {p50:.2}x lower, p95 {p95:.2}x lower with the cache\n")
        })
        .collect();
    std::fs::write(out.join("prefix-cache.md"), format!("{table}\n{summary}"))
        .expect("write prefix-cache.md");
    format!("{table}\n{summary}")
}
