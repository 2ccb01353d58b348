//! convoy-bench: continuous vs static batching, side by side, with the method of the pull
//! request convoy grew from (n requests, at most c in flight, the next submitted when one
//! finishes, fixed prompt and generation lengths, EOS ignored), plus a Poisson arrival mode
//! and a batch-1 prefill/decode benchmark of the weight paths.
//!
//! Writes a table to stdout, JSON lines to `<out>/results.jsonl` and a plot to
//! `<out>/bench.png`. Run `convoy-bench --help` for the flags.
#[path = "shared/chart.rs"]
mod chart;
#[path = "shared/compare.rs"]
mod compare;
#[path = "shared/constraint_bench.rs"]
mod constraint_bench;
#[path = "shared/font.rs"]
mod font;
#[path = "shared/prefix_bench.rs"]
mod prefix_bench;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use convoy::model::{self, LoadOptions, WeightsPolicy};
use convoy::{BatchMode, Engine, EngineConfig, Event, Prompt, Request, StopConditions};
use serde_json::json;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark convoy: continuous vs static batching on one model")]
struct Args {
    /// Model (.gguf or folder); default: the bundled test model in the cache.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output folder for results.jsonl and bench.png.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Requests per run.
    #[arg(long, default_value_t = 8)]
    n: usize,
    /// Prompt tokens per request (distinct real text).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per request (EOS ignored).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Concurrency levels (most requests in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// Modes to run.
    #[arg(long, value_delimiter = ',', default_value = "static,continuous")]
    modes: Vec<String>,
    /// Also run the Poisson arrival mode at this rate (requests per second).
    #[arg(long)]
    arrival_rate: Option<f64>,
    /// Goodput SLOs for the arrival mode: TTFT and mean inter-token latency, seconds.
    #[arg(long, default_value_t = 5.0)]
    slo_ttft: f64,
    #[arg(long, default_value_t = 0.5)]
    slo_itl: f64,
    /// Also run the batch-1 prefill/decode benchmark (float32 vs quantized weights, OpenBLAS
    /// vs MLX's reference BLAS).
    #[arg(long)]
    single: bool,
    /// Weights policy for the batching runs: auto, dequantize, quantized.
    #[arg(long, default_value = "auto")]
    weights: String,
    /// Skip the closed-loop sweep (e.g. to run only the arrival mode).
    #[arg(long)]
    no_sweep: bool,
    /// Tiny run for tests: checks the output is sane and exits non-zero if not.
    #[arg(long)]
    smoke: bool,
    /// Internal: run only the batch-1 benchmark for the dequantized path under this label.
    #[arg(long, hide = true)]
    single_only: Option<String>,

    // Side by side with mlx-lm (`make bench-compare`, scripts/bench-compare.sh).
    /// Write the float32 MLX folder of the (GGUF) model into this folder and exit.
    #[arg(long)]
    export_mlx: Option<PathBuf>,
    /// Write the comparison workloads (JSON, token ids) into this folder and exit: closed
    /// loops at each --concurrency (n = max(--n, 2c), --prompt-len, --max-tokens) and the
    /// mixed workload.
    #[arg(long)]
    write_workloads: Option<PathBuf>,
    /// Mixed workload: requests, Poisson arrival rate (req/s), batch size, prompt and
    /// output length ranges (uniform, inclusive), seed.
    #[arg(long, default_value_t = 20)]
    mixed_requests: usize,
    #[arg(long, default_value_t = 0.15)]
    mixed_rate: f64,
    #[arg(long, default_value_t = 8)]
    mixed_batch: usize,
    #[arg(long, value_delimiter = ',', default_value = "24,600")]
    mixed_prompt: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "8,128")]
    mixed_output: Vec<usize>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Run this workload file on convoy in --mode and append the raw result line to
    /// --result.
    #[arg(long)]
    run_workload: Option<PathBuf>,
    #[arg(long, default_value = "continuous")]
    mode: String,
    #[arg(long)]
    result: Option<PathBuf>,
    /// Build the side-by-side report from this results file (both engines' lines) into
    /// --out; --report-header is a file whose text goes on top.
    #[arg(long)]
    report: Option<PathBuf>,
    #[arg(long)]
    report_header: Option<PathBuf>,
    /// Time the model's decode step alone: B rows of --prompt-len cached tokens, this many
    /// steps (scripts/profile_decode_mlx_lm.py does the same for mlx-lm's model).
    #[arg(long)]
    profile_decode: Option<usize>,
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Turn optimizations off to measure what each buys (--profile-decode, --run-workload):
    /// fuse (q/k/v and gate/up as one matmul), attn (copy-free decode attention), pad
    /// (matmul rows padded to what the CPU BLAS runs fastest), exp (softmax and SiLU through
    /// the compiled multiply-add `exp` instead of MLX's CPU `exp`), rows (convoy's few-rows
    /// matmul kernel: MLX's matmul instead), cache (MLX's default
    /// 32 MiB buffer cache instead of convoy's 256 MiB; not with --interleave), ahead
    /// (decode-ahead), ajoin (decode-ahead across a join), join (skip the step queued ahead
    /// when a group joins or every row ends), prefix (the prefix cache), sync (the CPU
    /// backend's no-decode-ahead default: decode-ahead on), chunk (the 512-token prefill
    /// budget: 256) (ajoin to chunk: --run-workload only); `all-on` switches nothing off
    /// but labels the run as an ablation baseline.
    #[arg(long, value_delimiter = ',')]
    ablate: Vec<String>,
    /// With --profile-decode: alternate the steps between the --ablate form and all on, and
    /// report the median of each (attn, pad and exp switch between steps; fuse cannot).
    #[arg(long)]
    interleave: bool,
    /// Time a prefill chunk of the model alone: one row, chunks of this many tokens after
    /// --prompt-len cached tokens, --steps times (with --ablate/--interleave as for
    /// --profile-decode).
    #[arg(long)]
    profile_prefill: Option<usize>,
    /// With --run-workload: the scheduler's prefill token budget per step (default: the
    /// library's).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// With --run-workload: the prefill token budget of steps that also decode (default: the
    /// library's).
    #[arg(long)]
    prefill_chunk_decoding: Option<usize>,
    /// Run the prefix-cache benchmark instead (multi-turn chats and a burst sharing a system
    /// prompt, cache off and on; tiny sizes with --smoke): writes prefix-cache.{md,jsonl}
    /// into --out.
    #[arg(long)]
    prefix_cache: bool,
    /// Run the structured-output overhead benchmark instead (tokens/s with and without
    /// constraints at batch 1 and 8; tiny sizes with --smoke): writes constraints.{md,jsonl}
    /// into --out.
    #[arg(long)]
    constraints: bool,
}

fn default_model() -> PathBuf {
    let cache = std::env::var_os("CONVOY_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|d| PathBuf::from(d).join("convoy"))
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/convoy")
                })
        });
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn weights(s: &str) -> WeightsPolicy {
    match s {
        "dequantize" => WeightsPolicy::Dequantize,
        "quantized" => WeightsPolicy::KeepQuantized,
        _ => WeightsPolicy::Auto,
    }
}

/// Varied real English text; prompts are distinct windows of its tokens.
const CORPUS: &str = "The history of navigation is a story of people learning to read the sky and the sea. \
Early sailors watched the stars, the flight of birds and the color of the water to guess where land lay. \
The magnetic compass arrived in Europe in the twelfth century and changed long voyages for good. \
Bread is one of the oldest prepared foods; flour, water, salt and yeast become a loaf after kneading, rising and baking. \
In mathematics a prime number has exactly two divisors, one and itself, and there are infinitely many of them. \
Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen inside their chloroplasts. \
A symphony orchestra usually groups its players into strings, woodwinds, brass and percussion. \
The first programmable computers filled whole rooms and were built from relays and vacuum tubes. \
Volcanoes form where molten rock reaches the surface, often along the edges of tectonic plates. \
Honeybees communicate the direction and distance of flowers to their hive mates with a waggle dance. \
Rivers carve valleys over millions of years, carrying sand and silt down to deltas at the coast. \
A good night's sleep helps memory, mood and the immune system, while chronic lack of sleep harms them. \
Chess began in India around the sixth century and reached Europe through Persia and the Arab world. \
The speed of light in a vacuum is about three hundred thousand kilometres per second. \
Cities grew around markets, harbors and crossroads, where trade brought people and ideas together. \
Glaciers store most of the fresh water on Earth, and their melting raises the level of the oceans. \
Writing systems developed independently in Mesopotamia, Egypt, China and Mesoamerica. \
Vaccines train the immune system to recognize a germ without causing the disease itself. \
The violin has four strings tuned in fifths and is played with a bow strung with horsehair. \
Deserts cover about a third of the land surface and can be hot like the Sahara or cold like Antarctica.";

fn prompts(engine: &Engine, n: usize, len: usize) -> Vec<Vec<u32>> {
    let mut corpus = engine
        .tokenizer()
        .encode(CORPUS, false)
        .expect("encode corpus");
    while corpus.len() < len * 2 + n * 7 {
        let again = corpus.clone();
        corpus.extend(again);
    }
    let step = ((corpus.len() - len) / n.max(1)).max(1);
    (0..n)
        .map(|i| corpus[(i * step) % (corpus.len() - len)..][..len].to_vec())
        .collect()
}

#[derive(Debug, Default, Clone)]
struct Trace {
    submitted: Option<Instant>,
    tokens: Vec<Instant>,
    finished: Option<Instant>,
}

fn fixed_request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    let mut req = Request::new(Prompt::Tokens(prompt));
    req.stop = StopConditions {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    req
}

fn run_request(engine: &Engine, prompt: Vec<u32>, max_tokens: usize) -> Trace {
    let req = fixed_request(prompt, max_tokens);
    let id = loop {
        match engine.submit(req.clone()) {
            Ok(id) => break id,
            Err(convoy::Error::Busy(_)) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("submit failed: {e}"),
        }
    };
    follow(engine, id, Instant::now())
}

/// Polls request `id` (submitted at `submitted`) to its end.
fn follow(engine: &Engine, id: convoy::RequestId, submitted: Instant) -> Trace {
    let mut t = Trace {
        submitted: Some(submitted),
        ..Default::default()
    };
    loop {
        match engine.poll(id, Duration::from_secs(600)).expect("poll") {
            Some(Event::Token { .. }) => t.tokens.push(Instant::now()),
            Some(Event::Finished { error, .. }) => {
                assert!(error.is_none(), "request failed: {error:?}");
                t.finished = Some(Instant::now());
                return t;
            }
            None => panic!("no event in 600 s"),
        }
    }
}

#[derive(Debug, Clone)]
struct RunResult {
    mode: &'static str,
    concurrency: usize,
    wall: f64,
    generated: usize,
    ttft_stream: Vec<f64>,
    /// The seed's static TTFT: when the caller got the batch back (static does not stream
    /// for mlx-lm's batch_generate). For continuous runs this equals the streamed TTFT.
    ttft_return: Vec<f64>,
    itl: Vec<f64>,
    mean_itl_per_request: Vec<f64>,
    peak_mlx_bytes: u64,
    step_seconds: f64,
    mlx_seconds: f64,
    eval_seconds: f64,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0 * (s.len() - 1) as f64).round() as usize;
    s[rank.min(s.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn summarize(
    mode: &'static str,
    c: usize,
    engine: &Engine,
    traces: &[Trace],
    wall: f64,
    static_mode: bool,
) -> RunResult {
    let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
    let mut r = RunResult {
        mode,
        concurrency: c,
        wall,
        generated: traces.iter().map(|t| t.tokens.len()).sum(),
        ttft_stream: Vec::new(),
        ttft_return: Vec::new(),
        itl: Vec::new(),
        mean_itl_per_request: Vec::new(),
        peak_mlx_bytes: engine.stats().peak_memory_bytes,
        step_seconds: engine.stats().step_seconds,
        mlx_seconds: engine.stats().mlx_seconds,
        eval_seconds: engine.stats().eval_seconds,
    };
    for t in traces {
        let sub = t.submitted.expect("submitted");
        let first = t.tokens.first().copied().unwrap_or(sub);
        r.ttft_stream.push(secs(sub, first));
        r.ttft_return.push(if static_mode {
            secs(sub, t.finished.expect("finished"))
        } else {
            secs(sub, first)
        });
        let gaps: Vec<f64> = t.tokens.windows(2).map(|w| secs(w[0], w[1])).collect();
        r.mean_itl_per_request.push(mean(&gaps));
        r.itl.extend(gaps);
    }
    r
}

fn engine_for(args: &Args, model: &Path, mode: BatchMode, batch: usize) -> Engine {
    let mut cfg = EngineConfig::default().mode(mode).max_batch_size(batch);
    cfg.weights = weights(&args.weights);
    Engine::new(model, cfg)
        .unwrap_or_else(|e| panic!("cannot create the engine on {}: {e}", model.display()))
}

/// n requests, at most c in flight. Continuous: c client threads each take the next request
/// when theirs finishes. Static: waves of c requests handed over together
/// ([`Engine::submit_batch`]), each wave run to completion before the next, as mlx-lm's
/// `batch_generate` does with each call (a static batch is never starved of its requests).
fn closed_loop(args: &Args, model: &Path, mode: BatchMode, c: usize) -> RunResult {
    let engine = Arc::new(engine_for(args, model, mode, c));
    let prompts = Arc::new(prompts(&engine, args.n, args.prompt_len));
    let next = Arc::new(AtomicUsize::new(0));
    let traces = Arc::new(Mutex::new(vec![Trace::default(); args.n]));
    let start = Instant::now();
    if mode == BatchMode::Static {
        for wave in (0..args.n).collect::<Vec<_>>().chunks(c) {
            let reqs = wave
                .iter()
                .map(|&i| fixed_request(prompts[i].clone(), args.max_tokens))
                .collect();
            let ids = engine.submit_batch(reqs).expect("submit a wave");
            let at = Instant::now();
            let handles: Vec<_> = ids
                .into_iter()
                .map(|id| {
                    let engine = engine.clone();
                    std::thread::spawn(move || follow(&engine, id, at))
                })
                .collect();
            for (&i, h) in wave.iter().zip(handles) {
                traces.lock().unwrap()[i] = h.join().expect("wave thread");
            }
        }
    } else {
        let clients: Vec<_> = (0..c)
            .map(|_| {
                let (engine, prompts, next, traces) = (
                    engine.clone(),
                    prompts.clone(),
                    next.clone(),
                    traces.clone(),
                );
                let max_tokens = args.max_tokens;
                std::thread::spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= prompts.len() {
                        return;
                    }
                    let t = run_request(&engine, prompts[i].clone(), max_tokens);
                    traces.lock().unwrap()[i] = t;
                })
            })
            .collect();
        for h in clients {
            h.join().expect("client thread");
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let traces = traces.lock().unwrap().clone();
    let name = if mode == BatchMode::Static {
        "static"
    } else {
        "continuous"
    };
    summarize(name, c, &engine, &traces, wall, mode == BatchMode::Static)
}

/// Requests arrive as a Poisson process at `rate` per second (like vLLM's serving benchmark).
fn poisson(args: &Args, model: &Path, mode: BatchMode, rate: f64) -> RunResult {
    let batch = args.concurrency.iter().copied().max().unwrap_or(8);
    let engine = Arc::new(engine_for(args, model, mode, batch));
    let prompts = prompts(&engine, args.n, args.prompt_len);
    // Exponential inter-arrival times from a fixed-seed xorshift, so runs are comparable.
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut at = 0.0;
    let start = Instant::now();
    let mut handles = Vec::new();
    for p in prompts {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        at += -(1.0 - u).ln() / rate;
        let due = start + Duration::from_secs_f64(at);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let engine = engine.clone();
        let max_tokens = args.max_tokens;
        handles.push(std::thread::spawn(move || {
            run_request(&engine, p, max_tokens)
        }));
    }
    let traces: Vec<Trace> = handles
        .into_iter()
        .map(|h| h.join().expect("request thread"))
        .collect();
    let wall = start.elapsed().as_secs_f64();
    let name = if mode == BatchMode::Static {
        "static"
    } else {
        "continuous"
    };
    summarize(
        name,
        batch,
        &engine,
        &traces,
        wall,
        mode == BatchMode::Static,
    )
}

fn max_rss_bytes() -> u64 {
    // SAFETY: getrusage writes into the struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        (u.ru_maxrss as u64) * if cfg!(target_os = "macos") { 1 } else { 1024 }
    }
}

fn result_json(r: &RunResult, extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({
        "bench": "closed_loop",
        "mode": r.mode,
        "concurrency": r.concurrency,
        "wall_s": r.wall,
        "generated_tokens": r.generated,
        "throughput_tok_s": r.generated as f64 / r.wall,
        "ttft_stream_mean_s": mean(&r.ttft_stream),
        "ttft_stream_p50_s": percentile(&r.ttft_stream, 50.0),
        "ttft_stream_p95_s": percentile(&r.ttft_stream, 95.0),
        "ttft_seed_mean_s": mean(&r.ttft_return),
        "ttft_seed_p50_s": percentile(&r.ttft_return, 50.0),
        "ttft_seed_p95_s": percentile(&r.ttft_return, 95.0),
        "itl_mean_s": mean(&r.itl),
        "itl_p95_s": percentile(&r.itl, 95.0),
        "peak_mlx_memory_bytes": r.peak_mlx_bytes,
        "engine_step_s": r.step_seconds,
        "engine_mlx_s": r.mlx_seconds,
        "engine_eval_wait_s": r.eval_seconds,
        "engine_overhead_share": if r.step_seconds > 0.0 { (r.step_seconds - r.mlx_seconds) / r.step_seconds } else { 0.0 },
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

/// Batch-1 prefill and decode speed of one weights policy (issue: first benchmark).
fn single(
    model: &Path,
    policy: WeightsPolicy,
    prompt_len: usize,
    label: &str,
) -> serde_json::Value {
    let lm = model::load(
        model,
        LoadOptions {
            weights: policy,
            ..Default::default()
        },
    )
    .expect("load model");
    let mut corpus = lm.tokenizer.encode(CORPUS, false).unwrap();
    corpus.truncate(prompt_len);
    let layout = convoy::runner::kv_layout(&lm.model);
    let run_prefill = || {
        let mut cache = convoy::kv_cache::BatchKvCache::with_padding(layout.clone(), vec![0]);
        let ids: Vec<i32> = corpus.iter().map(|&t| t as i32).collect();
        let input = convoy::mlx_rs::Array::from_slice(&ids, &[1, ids.len() as i32]);
        let t = Instant::now();
        let h = lm.model.forward_last(&input, &mut cache).unwrap();
        let logits = lm.model.logits(&h).unwrap();
        logits.eval().unwrap();
        t.elapsed().as_secs_f64()
    };
    run_prefill(); // warm-up
    let prefill = (0..3).map(|_| run_prefill()).fold(f64::MAX, f64::min);
    let decode_tokens = 32;
    let t = Instant::now();
    let out = convoy::runner::generate_greedy(&lm, &corpus[..8], decode_tokens + 1).unwrap();
    let total = t.elapsed().as_secs_f64();
    let decode_tps = (out.len() as f64 - 1.0) / total.max(1e-9);
    json!({
        "bench": "single",
        "weights": if lm.model.is_quantized() { "quantized (MLX affine)" } else { "float32 (dequantized)" },
        "blas": label,
        "prompt_tokens": corpus.len(),
        "prefill_tok_s": corpus.len() as f64 / prefill,
        "decode_tok_s": decode_tps,
    })
}

/// The switches of the model-alone profiles that `--ablate` left on.
struct ProfileSwitches {
    fuse: bool,
    attn: bool,
    pad: bool,
    exp: bool,
    rows: bool,
}

/// Checks `--ablate`/`--interleave` for a model-alone profile, raises MLX's buffer cache as
/// the engine does (unless `cache` is ablated; the guard must outlive the run), and loads the
/// model with the ablated switches off.
fn profile_setup(
    model: &Path,
    ablate: &[String],
    interleave: bool,
) -> (
    convoy::model::LoadedModel,
    ProfileSwitches,
    Option<convoy::runner::CacheLimitGuard>,
) {
    check_model_ablations(ablate);
    let on = |name: &str| !ablate.iter().any(|a| a == name);
    assert!(
        !interleave || (on("fuse") && on("cache")),
        "--interleave switches between steps; fuse is fixed at load and cache is process-wide (run them without --interleave)"
    );
    let switches = ProfileSwitches {
        fuse: on("fuse"),
        attn: on("attn"),
        pad: on("pad"),
        exp: on("exp"),
        rows: on("rows"),
    };
    let cache_limit = on("cache").then(|| {
        convoy::runner::raise_cache_limit(convoy::engine::DEFAULT_MLX_CACHE_LIMIT_BYTES).unwrap()
    });
    let options = LoadOptions {
        fuse_projections: switches.fuse,
        ..Default::default()
    };
    let mut lm = model::load(model, options).expect("load model");
    // (--ablate attn: MLX's fused attention op for decode steps too.)
    lm.model.set_copy_free_decode_attention(switches.attn);
    lm.model.set_pad_matmul_rows(switches.pad);
    lm.model.set_fast_exp(switches.exp);
    lm.model.set_rows_matmul(switches.rows);
    (lm, switches, cache_limit)
}

/// Milliseconds per decode step of the model alone (no engine) at batch `b` with `t` cached
/// tokens per row: prefill, 3 warm-up steps, then `steps` timed greedy steps, each evaluated.
fn profile_decode(
    model: &Path,
    b: usize,
    t: usize,
    steps: usize,
    ablate: &[String],
    interleave: bool,
) {
    let (mut lm, on, _cache_limit) = profile_setup(model, ablate, interleave);
    let (fuse, attn, pad, exp, rows) = (on.fuse, on.attn, on.pad, on.exp, on.rows);
    use convoy::mlx_rs::ops::indexing::argmax_axis;
    use convoy::mlx_rs::Array;
    let mut corpus = lm.tokenizer.encode(CORPUS, false).unwrap();
    while corpus.len() < t + b * 7 {
        let again = corpus.clone();
        corpus.extend(again);
    }
    let layout = convoy::runner::kv_layout(&lm.model);
    let mut cache = convoy::kv_cache::BatchKvCache::with_padding(layout, vec![0; b]);
    let ids: Vec<i32> = (0..b)
        .flat_map(|r| corpus[r * 7..r * 7 + t].iter().map(|&x| x as i32))
        .collect();
    let prompt = Array::from_slice(&ids, &[b as i32, t as i32]);
    let start = Instant::now();
    let h = lm.model.forward_last(&prompt, &mut cache).unwrap();
    h.eval().unwrap();
    let prefill = start.elapsed().as_secs_f64();
    let mut input = Array::from_slice(&vec![1i32; b], &[b as i32, 1]);
    let step = |model: &convoy::model::Model,
                cache: &mut convoy::kv_cache::BatchKvCache,
                input: &Array|
     -> (Array, f64) {
        let start = Instant::now();
        let h = model.forward_last(input, cache).unwrap();
        let logits = model.logits(&h).unwrap();
        let next = argmax_axis(&logits, -1, None).unwrap();
        next.eval().unwrap();
        (
            next.reshape(&[b as i32, 1]).unwrap(),
            start.elapsed().as_secs_f64(),
        )
    };
    for _ in 0..3 {
        input = step(&lm.model, &mut cache, &input).0;
    }
    // With --interleave, steps alternate between the ablated form and all on (switches that
    // can change between steps: attn, pad), so both see the same machine noise.
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..steps {
        let ablated = !interleave || i % 2 == 0;
        lm.model.set_copy_free_decode_attention(attn || !ablated);
        lm.model.set_pad_matmul_rows(pad || !ablated);
        lm.model.set_fast_exp(exp || !ablated);
        lm.model.set_rows_matmul(rows || !ablated);
        let (next, secs) = step(&lm.model, &mut cache, &input);
        input = next;
        times[usize::from(ablated)].push(secs);
    }
    let median = |v: &mut Vec<f64>| -> Option<f64> {
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2] * 1e3)
    };
    let per = times[1].iter().sum::<f64>() / times[1].len() as f64;
    // How asynchronous `async_eval` is on this backend: the share of a step's time spent
    // before it returns (decode-ahead overlaps host work only with the rest).
    let (mut built, mut blocked) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let start = Instant::now();
        let h = lm.model.forward_last(&input, &mut cache).unwrap();
        let logits = lm.model.logits(&h).unwrap();
        let next = argmax_axis(&logits, -1, None).unwrap();
        let graph = start.elapsed().as_secs_f64();
        convoy::mlx_rs::transforms::async_eval([&next]).unwrap();
        let queued = start.elapsed().as_secs_f64();
        next.eval().unwrap();
        let total = start.elapsed().as_secs_f64();
        built.push(graph / total);
        blocked.push(queued / total);
        input = next.reshape(&[b as i32, 1]).unwrap();
    }
    built.sort_by(f64::total_cmp);
    blocked.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({"engine": "convoy", "fuse": fuse, "attn": attn, "pad": pad, "exp": exp, "rows": rows, "batch": b, "context": t, "prefill_s": prefill,
               "prefill_tok_s": (b * t) as f64 / prefill, "decode_step_ms": per * 1e3,
               "decode_tok_s": b as f64 / per, "median_step_ms": median(&mut times[1]),
               "interleaved_all_on_median_step_ms": median(&mut times[0]),
               "graph_built_at": built[built.len() / 2],
               "async_eval_returns_at": blocked[blocked.len() / 2]})
    );
}

/// The switches the model-alone profiles know (engine-level ones, ahead and join, have no
/// effect there).
fn check_model_ablations(ablate: &[String]) {
    for a in ablate {
        assert!(
            ["fuse", "attn", "pad", "exp", "rows", "cache", "all-on"].contains(&a.as_str()),
            "--ablate with --profile-decode/--profile-prefill takes fuse, attn, pad, exp, rows, \
             cache or all-on, not {a}"
        );
    }
}

/// Milliseconds per prefill chunk of the model alone: one row with `t` cached tokens, then a
/// chunk of `chunk` tokens evaluated `steps` times (the cache rolled back after each), after
/// two warm-up chunks. With `interleave`, chunks alternate between the ablated form and all on.
fn profile_prefill(
    model: &Path,
    chunk: usize,
    t: usize,
    steps: usize,
    ablate: &[String],
    interleave: bool,
) {
    let (mut lm, on, _cache_limit) = profile_setup(model, ablate, interleave);
    let (fuse, attn, pad, exp, rows) = (on.fuse, on.attn, on.pad, on.exp, on.rows);
    use convoy::mlx_rs::Array;
    let mut corpus = lm.tokenizer.encode(CORPUS, false).unwrap();
    while corpus.len() < t + chunk {
        let again = corpus.clone();
        corpus.extend(again);
    }
    let ids: Vec<i32> = corpus.iter().map(|&x| x as i32).collect();
    let layout = convoy::runner::kv_layout(&lm.model);
    let mut cache = convoy::kv_cache::BatchKvCache::with_padding(layout, vec![0]);
    if t > 0 {
        let context = Array::from_slice(&ids[..t], &[1, t as i32]);
        lm.model
            .forward_last(&context, &mut cache)
            .unwrap()
            .eval()
            .unwrap();
    }
    let input = Array::from_slice(&ids[t..t + chunk], &[1, chunk as i32]);
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..steps + 2 {
        let ablated = !interleave || i % 2 == 0;
        lm.model.set_copy_free_decode_attention(attn || !ablated);
        lm.model.set_pad_matmul_rows(pad || !ablated);
        lm.model.set_fast_exp(exp || !ablated);
        lm.model.set_rows_matmul(rows || !ablated);
        let start = Instant::now();
        let h = lm.model.forward_last(&input, &mut cache).unwrap();
        h.eval().unwrap();
        let secs = start.elapsed().as_secs_f64();
        cache.rollback(chunk);
        if i >= 2 {
            times[usize::from(ablated)].push(secs);
        }
    }
    let median = |v: &mut Vec<f64>| -> Option<f64> {
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2] * 1e3)
    };
    let ms = median(&mut times[1]);
    println!(
        "{}",
        json!({"engine": "convoy", "fuse": fuse, "attn": attn, "pad": pad, "exp": exp, "rows": rows, "chunk": chunk, "context": t,
               "median_chunk_ms": ms, "prefill_tok_s": ms.map(|ms| chunk as f64 / ms * 1e3),
               "interleaved_all_on_median_chunk_ms": median(&mut times[0])})
    );
}

/// The same batch-1 float32 benchmark with MLX's bundled reference BLAS preloaded over
/// OpenBLAS, in a child process.
fn single_reference_blas(args: &Args, model: &Path) -> Option<serde_json::Value> {
    let mlx_lib = PathBuf::from(option_env!("CONVOY_MLX_LIB_DIR")?);
    let libs = mlx_lib.join("../../mlx_cpu.libs");
    let blas = std::fs::read_dir(&libs)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libblas"))
        })?;
    let out = std::process::Command::new(std::env::current_exe().ok()?)
        .env("LD_PRELOAD", &blas)
        .args(["--single-only", "MLX reference BLAS", "--model"])
        .arg(model)
        .args(["--prompt-len", &args.prompt_len.to_string()])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .to_owned();
    serde_json::from_str(&line).ok()
}

fn plot(path: &Path, results: &[RunResult]) -> Result<(), String> {
    use plotters::prelude::*;
    font::register_sans_serif()?;
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(600);
    let cs: Vec<usize> = {
        let mut v: Vec<usize> = results.iter().map(|r| r.concurrency).collect();
        v.sort();
        v.dedup();
        v
    };
    let max_c = *cs.last().unwrap_or(&1) as f64;
    type Metric = fn(&RunResult) -> f64;
    type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
    type Panel<'a, 'b> = (&'b Area<'a>, &'static str, &'static str, Metric, Metric);
    let panels: [Panel; 2] = [
        (
            &left,
            "Aggregate throughput",
            "tokens/s",
            |r| r.generated as f64 / r.wall,
            |r| r.generated as f64 / r.wall,
        ),
        (
            &right,
            "Time to first token (mean)",
            "seconds",
            |r| mean(&r.ttft_return),
            |r| mean(&r.ttft_stream),
        ),
    ];
    for (area, title, unit, seed_metric, stream_metric) in panels {
        let ymax = results
            .iter()
            .map(|r| seed_metric(r).max(stream_metric(r)))
            .fold(0.0, f64::max)
            * 1.15
            + 1e-9;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5..max_c + 0.5, 0.0..ymax)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("concurrency")
            .y_desc(unit)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        let series: Vec<(&str, RGBColor, Metric)> = vec![
            ("static (batch returned)", RED, seed_metric),
            (
                "static (first streamed token)",
                RGBColor(255, 160, 160),
                stream_metric,
            ),
            ("continuous", BLUE, stream_metric),
        ];
        for (label, color, metric) in series {
            let mode = if label.starts_with("static") {
                "static"
            } else {
                "continuous"
            };
            if title.starts_with("Aggregate") && label.contains("streamed") {
                continue;
            }
            let pts: Vec<(f64, f64)> = results
                .iter()
                .filter(|r| r.mode == mode)
                .map(|r| (r.concurrency as f64, metric(r)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let name = if title.starts_with("Aggregate") {
                mode.to_string()
            } else {
                label.to_string()
            };
            chart::series(&mut chart, &pts, color, name)?;
        }
        chart::legend(&mut chart, 14, SeriesLabelPosition::UpperLeft)?;
    }
    root.present().map_err(|e| e.to_string())
}

fn main() {
    let args = Args::parse();
    let model = args.model.clone().unwrap_or_else(default_model);
    if args.constraints {
        let sizes = if args.smoke {
            constraint_bench::Sizes::smoke()
        } else {
            constraint_bench::Sizes::full()
        };
        print!("{}", constraint_bench::run(&model, &args.out, &sizes));
        return;
    }
    if args.prefix_cache {
        let sizes = if args.smoke {
            prefix_bench::Sizes::smoke()
        } else {
            prefix_bench::Sizes::full()
        };
        print!("{}", prefix_bench::run(&model, &args.out, &sizes));
        return;
    }
    if let Some(dir) = &args.export_mlx {
        if let Err(e) = compare::export_mlx_folder(&model, dir) {
            eprintln!("export failed: {e}");
            std::process::exit(1);
        }
        println!("wrote {}", dir.display());
        return;
    }
    if let Some(dir) = &args.write_workloads {
        let lm = model::load(&model, LoadOptions::default()).expect("load the model");
        let corpus = lm.tokenizer.encode(CORPUS, false).expect("encode corpus");
        let pair = |v: &[usize], what: &str| match v {
            [a, b] if a <= b && *a > 0 => (*a, *b),
            _ => panic!("--{what} takes two lengths, low,high"),
        };
        let spec = compare::Spec {
            concurrency: args.concurrency.clone(),
            min_requests: args.n,
            prompt_len: args.prompt_len,
            max_tokens: args.max_tokens,
            mixed_requests: args.mixed_requests,
            mixed_rate: args.mixed_rate,
            mixed_batch: args.mixed_batch,
            mixed_prompt: pair(&args.mixed_prompt, "mixed-prompt"),
            mixed_output: pair(&args.mixed_output, "mixed-output"),
            seed: args.seed,
        };
        for w in compare::write_workloads(dir, &corpus, &spec) {
            println!(
                "{}/{}.json: {} requests",
                dir.display(),
                w.name,
                w.requests.len()
            );
        }
        return;
    }
    if let Some(w) = &args.run_workload {
        let result = args.result.clone().expect("--run-workload needs --result");
        compare::run_convoy(
            &model,
            w,
            &args.mode,
            &result,
            &args.ablate,
            args.prefill_chunk,
            args.prefill_chunk_decoding,
        );
        return;
    }
    if let Some(results) = &args.report {
        let header = args
            .report_header
            .as_ref()
            .map(|p| std::fs::read_to_string(p).expect("read the report header"))
            .unwrap_or_default();
        let slo = compare::Slo {
            ttft: args.slo_ttft,
            itl: args.slo_itl,
        };
        print!("{}", compare::report(results, &args.out, &slo, &header));
        return;
    }
    if let Some(chunk) = args.profile_prefill {
        profile_prefill(
            &model,
            chunk,
            args.prompt_len,
            args.steps,
            &args.ablate,
            args.interleave,
        );
        return;
    }
    if let Some(b) = args.profile_decode {
        profile_decode(
            &model,
            b,
            args.prompt_len,
            args.steps,
            &args.ablate,
            args.interleave,
        );
        return;
    }
    if let Some(label) = &args.single_only {
        println!(
            "{}",
            single(&model, WeightsPolicy::Dequantize, args.prompt_len, label)
        );
        return;
    }
    std::fs::create_dir_all(&args.out).expect("create the output folder");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let machine = json!({
        "backend": convoy::backend(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "n": args.n, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    println!(
        "convoy-bench: model {} | backend {} | n={} prompt_len={} max_tokens={}",
        model.display(),
        convoy::backend(),
        args.n,
        args.prompt_len,
        args.max_tokens
    );

    if args.single {
        println!(
            "\nbatch-1 prefill/decode ({} prompt tokens):",
            args.prompt_len
        );
        let mut rows = vec![
            single(
                &model,
                WeightsPolicy::Dequantize,
                args.prompt_len,
                "OpenBLAS",
            ),
            single(&model, WeightsPolicy::KeepQuantized, args.prompt_len, "n/a"),
        ];
        if convoy::backend() == "cpu" {
            rows.extend(single_reference_blas(&args, &model));
        }
        for r in rows {
            println!(
                "  {:<24} blas {:<20} prefill {:>8.1} tok/s   decode {:>6.1} tok/s",
                r["weights"].as_str().unwrap_or(""),
                r["blas"].as_str().unwrap_or(""),
                r["prefill_tok_s"].as_f64().unwrap_or(0.0),
                r["decode_tok_s"].as_f64().unwrap_or(0.0)
            );
            lines.push(r);
        }
    }

    let mut results = Vec::new();
    for mode_name in args.modes.iter().filter(|_| !args.no_sweep) {
        let mode = if mode_name == "static" {
            BatchMode::Static
        } else {
            BatchMode::Continuous
        };
        for &c in &args.concurrency {
            let r = closed_loop(&args, &model, mode, c);
            results.push(r);
        }
    }
    println!(
        "\n{:<11} {:>3} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}",
        "mode",
        "c",
        "tok/s",
        "wall s",
        "TTFT seed",
        "TTFT str",
        "TTFT p50",
        "TTFT p95",
        "ITL mean",
        "ITL p95",
        "overhd%",
        "MLX MB"
    );
    for r in &results {
        let j = result_json(r, json!({}));
        println!(
            "{:<11} {:>3} {:>9.1} {:>8.2} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.4} {:>8.4} {:>8.2} {:>9.1}",
            r.mode, r.concurrency, j["throughput_tok_s"].as_f64().unwrap(), r.wall, mean(&r.ttft_return), mean(&r.ttft_stream),
            percentile(&r.ttft_stream, 50.0), percentile(&r.ttft_stream, 95.0), mean(&r.itl), percentile(&r.itl, 95.0),
            j["engine_overhead_share"].as_f64().unwrap() * 100.0, r.peak_mlx_bytes as f64 / 1e6
        );
        lines.push(result_json(r, machine.clone()));
    }
    let mut ratios = Vec::new();
    for &c in &args.concurrency {
        let find = |m: &str| results.iter().find(|r| r.mode == m && r.concurrency == c);
        if let (Some(s), Some(k)) = (find("static"), find("continuous")) {
            let tput = |r: &RunResult| r.generated as f64 / r.wall;
            let v = json!({
                "bench": "ratio", "concurrency": c,
                "throughput_continuous_over_static": tput(k) / tput(s),
                "ttft_static_seed_over_continuous": mean(&s.ttft_return) / mean(&k.ttft_stream),
                "ttft_static_stream_over_continuous": mean(&s.ttft_stream) / mean(&k.ttft_stream),
            });
            ratios.push(v);
        }
    }
    if !ratios.is_empty() {
        println!("\n  c  throughput cont/static  TTFT static(seed)/cont  TTFT static(stream)/cont");
        for v in &ratios {
            println!(
                "{:>3} {:>23.3} {:>23.2} {:>25.2}",
                v["concurrency"],
                v["throughput_continuous_over_static"].as_f64().unwrap(),
                v["ttft_static_seed_over_continuous"].as_f64().unwrap(),
                v["ttft_static_stream_over_continuous"].as_f64().unwrap()
            );
        }
        lines.extend(ratios);
    }

    if let Some(rate) = args.arrival_rate {
        println!(
            "\nPoisson arrivals at {rate} req/s (SLO: TTFT <= {} s, mean ITL <= {} s):",
            args.slo_ttft, args.slo_itl
        );
        for mode_name in &args.modes {
            let mode = if mode_name == "static" {
                BatchMode::Static
            } else {
                BatchMode::Continuous
            };
            let r = poisson(&args, &model, mode, rate);
            let good = r
                .ttft_return
                .iter()
                .zip(&r.mean_itl_per_request)
                .filter(|(t, i)| **t <= args.slo_ttft && **i <= args.slo_itl)
                .count();
            let v = result_json(
                &r,
                json!({"bench": "poisson", "rate": rate, "goodput_req_s": good as f64 / r.wall, "slo_met": good, "ttft_p99_s": percentile(&r.ttft_return, 99.0), "itl_p50_s": percentile(&r.itl, 50.0)}),
            );
            println!(
                "  {:<11} TTFT p50 {:.3} p95 {:.3} p99 {:.3} s | ITL p50 {:.4} p95 {:.4} s | {:.1} tok/s | goodput {:.3} req/s ({good}/{})",
                r.mode, percentile(&r.ttft_return, 50.0), percentile(&r.ttft_return, 95.0), percentile(&r.ttft_return, 99.0),
                percentile(&r.itl, 50.0), percentile(&r.itl, 95.0), r.generated as f64 / r.wall, good as f64 / r.wall, args.n
            );
            lines.push(v);
        }
    }
    println!("\nprocess peak RSS: {:.1} MB", max_rss_bytes() as f64 / 1e6);

    let jsonl = args.out.join("results.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&jsonl, text).expect("write results.jsonl");
    println!("wrote {}", jsonl.display());
    let png = args.out.join("bench.png");
    if !results.is_empty() {
        match plot(&png, &results) {
            Ok(()) => println!("wrote {}", png.display()),
            Err(e) => eprintln!("plot skipped: {e}"),
        }
    }

    if args.smoke {
        let expect = args.n * args.max_tokens;
        let ok = results.iter().all(|r| {
            r.generated == expect && r.wall > 0.0 && r.ttft_stream.iter().all(|t| *t > 0.0)
        }) && std::fs::metadata(&png)
            .map(|m| m.len() > 1000)
            .unwrap_or(false)
            && lines.iter().all(|l| l["bench"].is_string());
        println!("smoke check: {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            std::process::exit(1);
        }
    }
}
