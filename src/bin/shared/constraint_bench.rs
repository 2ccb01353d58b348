//! The structured-output overhead benchmark (`convoy-bench --constraints`, `make
//! bench-constraints`; issue 13): decode throughput with and without constraints at batch 1
//! and batch 8, in one process on one engine, variants interleaved and repeated.
//!
//! Every request generates exactly `max_tokens` tokens (EOS ignored, and the constraints
//! cannot complete that early: a JSON array of at least 1,000 objects, a regex of 10,000
//! characters), so every variant does the same model work and the difference is the
//! constraint's: the mask (llguidance, on the host), its upload and the masked argmax.
//! Variants:
//! - `none`: no constraint;
//! - `json`: every row under a JSON schema;
//! - `regex`: every row under a regex;
//! - `half-json` (batch 8 only): 4 rows under the schema, 4 without; reports the
//!   unconstrained rows' inter-token latency, the cost a constrained neighbour puts on them.
//!
//! Throughput is generated tokens over the wall time from submit to the last token. Writes
//! `constraints.jsonl` and `constraints.md` into the output folder and prints the table.
use std::path::Path;
use std::time::{Duration, Instant};

use convoy::{ChatMessage, Constraint, Engine, EngineConfig, Event, Prompt, Request};
use serde_json::json;

const QUESTIONS: [&str; 8] = [
    "List some people with their names and ages as JSON.",
    "Describe a few cities as JSON objects.",
    "Give me a list of fruits with their colors, in JSON.",
    "Write a JSON list of books with authors.",
    "List planets and their moons as JSON.",
    "Give a JSON array of animals and their sounds.",
    "List programming languages and their creators as JSON.",
    "Describe some rivers and their lengths in JSON.",
];

fn schema() -> String {
    json!({
        "type": "array",
        "minItems": 1000,
        "items": {"type": "object", "properties": {
            "name": {"type": "string"},
            "kind": {"type": "string"},
            "value": {"type": "integer"}},
            "required": ["name", "kind", "value"]}
    })
    .to_string()
}

const REGEX: &str = r"[A-Za-z ,.]{10000}";

/// Sizes: generated tokens per request and repetitions of each variant.
pub struct Sizes {
    pub max_tokens: usize,
    pub repeats: usize,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            max_tokens: 64,
            repeats: 3,
        }
    }

    pub fn smoke() -> Self {
        Self {
            max_tokens: 4,
            repeats: 1,
        }
    }
}

struct Measured {
    tok_s: f64,
    /// Mean inter-token latency of the unconstrained rows (seconds; 0 if none).
    free_itl: f64,
    /// Mean inter-token latency of the constrained rows (seconds; 0 if none).
    constrained_itl: f64,
}

fn run_once(engine: &Engine, batch: usize, variant: &str, max_tokens: usize) -> Measured {
    let requests: Vec<Request> = (0..batch)
        .map(|i| {
            let chat = vec![
                ChatMessage::new("system", "You answer in JSON."),
                ChatMessage::new("user", QUESTIONS[i % QUESTIONS.len()]),
            ];
            let mut r = Request::new(Prompt::Chat(chat)).max_tokens(max_tokens);
            r.stop.ignore_eos = true;
            r.constraint = match variant {
                "json" => Some(Constraint::JsonSchema(schema())),
                "half-json" if i % 2 == 0 => Some(Constraint::JsonSchema(schema())),
                "regex" => Some(Constraint::Regex(REGEX.into())),
                _ => None,
            };
            r
        })
        .collect();
    let constrained: Vec<bool> = requests.iter().map(|r| r.constraint.is_some()).collect();
    let start = Instant::now();
    let ids = engine.submit_batch(requests).expect("submit");
    let mut times: Vec<Vec<Instant>> = vec![Vec::new(); ids.len()];
    let mut done = 0;
    while done < ids.len() {
        let ev = engine
            .poll_any(Duration::from_secs(600))
            .expect("poll")
            .expect("an event within 600 s");
        let k = ids.iter().position(|&id| id == ev.request_id()).unwrap();
        match ev {
            Event::Token { .. } => times[k].push(Instant::now()),
            Event::Finished { error, .. } => {
                assert!(error.is_none(), "request failed: {error:?}");
                done += 1;
            }
        }
    }
    let last = times.iter().filter_map(|t| t.last()).max().copied();
    let wall = last.map_or(0.0, |l| (l - start).as_secs_f64());
    let generated: usize = times.iter().map(Vec::len).sum();
    // The premise: every variant does the same model work.
    assert_eq!(
        generated,
        batch * max_tokens,
        "{variant}: a request ended early"
    );
    let itl = |want: bool| {
        let gaps: Vec<f64> = times
            .iter()
            .zip(&constrained)
            .filter(|(_, &c)| c == want)
            .flat_map(|(t, _)| t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
            .collect();
        if gaps.is_empty() {
            0.0
        } else {
            gaps.iter().sum::<f64>() / gaps.len() as f64
        }
    };
    Measured {
        tok_s: generated as f64 / wall.max(1e-9),
        free_itl: itl(false),
        constrained_itl: itl(true),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark; returns the markdown table.
pub fn run(model: &Path, out: &Path, sizes: &Sizes) -> String {
    let engine = Engine::new(model, EngineConfig::default().max_batch_size(8)).expect("engine");
    // Warm-up: MLX's first steps and the constraint compiler's vocabulary walk (once per
    // engine, at the first constrained request) are not what is measured.
    run_once(&engine, 2, "json", 2);
    run_once(&engine, 2, "none", 2);
    std::fs::create_dir_all(out).expect("output folder");
    let mut lines = Vec::new();
    let mut table = String::from(
        "| batch | variant | tok/s | vs none | ITL unconstrained rows (ms) | ITL constrained rows (ms) |\n\
         |---|---|---|---|---|---|\n",
    );
    for batch in [1usize, 8] {
        let variants: &[&str] = if batch == 1 {
            &["none", "json", "regex"]
        } else {
            &["none", "json", "regex", "half-json"]
        };
        let mut results: Vec<Vec<Measured>> = variants.iter().map(|_| Vec::new()).collect();
        // Interleaved: drift (thermal, the page cache) hits every variant alike.
        for _ in 0..sizes.repeats {
            for (v, variant) in variants.iter().enumerate() {
                results[v].push(run_once(&engine, batch, variant, sizes.max_tokens));
            }
        }
        let base = median(results[0].iter().map(|m| m.tok_s).collect());
        for (v, variant) in variants.iter().enumerate() {
            let tok_s = median(results[v].iter().map(|m| m.tok_s).collect());
            let free = median(results[v].iter().map(|m| m.free_itl).collect());
            let con = median(results[v].iter().map(|m| m.constrained_itl).collect());
            let ms = |x: f64| {
                if x > 0.0 {
                    format!("{:.1}", x * 1e3)
                } else {
                    "-".into()
                }
            };
            table.push_str(&format!(
                "| {batch} | {variant} | {tok_s:.1} | {:.3} | {} | {} |\n",
                tok_s / base,
                ms(free),
                ms(con)
            ));
            lines.push(
                json!({
                    "bench": "constraints", "batch": batch, "variant": variant,
                    "max_tokens": sizes.max_tokens, "repeats": sizes.repeats,
                    "tok_s": tok_s, "ratio_vs_none": tok_s / base,
                    "itl_unconstrained_s": free, "itl_constrained_s": con,
                    "runs_tok_s": results[v].iter().map(|m| m.tok_s).collect::<Vec<_>>(),
                })
                .to_string(),
            );
        }
    }
    std::fs::write(out.join("constraints.jsonl"), lines.join("\n") + "\n").expect("write");
    std::fs::write(out.join("constraints.md"), &table).expect("write");
    table
}
