//! convoy against mlx-lm on identical workloads (`make bench-compare`, issue 9).
//!
//! - [`write_workloads`]: the workloads as JSON files (token ids, so both engines get exactly
//!   the same prompts): closed loops at each concurrency and a mixed open-loop workload.
//! - [`run_convoy`]: runs one workload on convoy in one mode (one process per run, so peak
//!   RSS is the run's own) and appends a result line of raw per-request timings.
//!   `scripts/bench_mlx_lm.py` does the same for mlx-lm's `BatchGenerator`.
//! - [`report`]: computes every metric from the raw timings of both engines with one piece of
//!   code, and writes the side-by-side tables, `summary.jsonl` and `compare.png`.
//! - [`export_mlx_folder`]: the float32 MLX folder both engines load.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use convoy::mlx_rs::{io::GgufFile, Array};
use convoy::{BatchMode, Engine, EngineConfig, Event, Prompt, Request, StopConditions};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// One request of a workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Seconds after the start (open-loop workloads; 0 for closed loops).
    pub arrival_s: f64,
}

/// A workload: `closed` keeps `concurrency` requests in flight (static mode: waves of
/// `concurrency` handed over together); `open` submits each request at its arrival time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    pub kind: String,
    pub concurrency: usize,
    /// The engine's batch size (most rows decoding at once).
    pub batch: usize,
    pub requests: Vec<Item>,
}

/// What a run observed of one request, in seconds since the run started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Trace {
    /// When the request was due (open-loop workloads: its arrival time, whether or not the
    /// driver was free to submit it then); latencies count from here.
    #[serde(default)]
    pub arrived: Option<f64>,
    pub submitted: f64,
    pub tokens: Vec<f64>,
    pub finished: f64,
}

/// Parameters of the generated workloads.
pub struct Spec {
    pub concurrency: Vec<usize>,
    pub min_requests: usize,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub mixed_requests: usize,
    pub mixed_rate: f64,
    pub mixed_batch: usize,
    pub mixed_prompt: (usize, usize),
    pub mixed_output: (usize, usize),
    pub seed: u64,
}

/// xorshift64*: a fixed-seed generator, so both engines and every rerun get one workload.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + ((hi - lo + 1) as f64 * self.next_f64()) as usize
    }
}

/// Writes one JSON file per workload into `dir`; `corpus` is tokenized text to cut prompts
/// from (distinct windows).
pub fn write_workloads(dir: &Path, corpus: &[u32], spec: &Spec) -> Vec<Workload> {
    std::fs::create_dir_all(dir).expect("create the workload folder");
    let window = |i: usize, len: usize| -> Vec<u32> {
        let mut c = corpus.to_vec();
        while c.len() < len * 2 + 64 {
            c.extend_from_slice(corpus);
        }
        let start = (i * 7919) % (c.len() - len);
        c[start..start + len].to_vec()
    };
    let mut out = Vec::new();
    for &c in &spec.concurrency {
        // At least two waves, so continuous and static batching differ.
        let n = spec.min_requests.max(2 * c);
        out.push(Workload {
            name: format!("closed-c{c}"),
            kind: "closed".into(),
            concurrency: c,
            batch: c,
            requests: (0..n)
                .map(|i| Item {
                    prompt: window(i, spec.prompt_len),
                    max_tokens: spec.max_tokens,
                    arrival_s: 0.0,
                })
                .collect(),
        });
    }
    if spec.mixed_requests > 0 {
        let mut rng = Rng(spec.seed | 1);
        let mut at = 0.0;
        let requests = (0..spec.mixed_requests)
            .map(|i| {
                if i > 0 {
                    at += -(1.0 - rng.next_f64()).ln() / spec.mixed_rate;
                }
                let len = rng.range(spec.mixed_prompt.0, spec.mixed_prompt.1);
                Item {
                    prompt: window(1000 + i, len),
                    max_tokens: rng.range(spec.mixed_output.0, spec.mixed_output.1),
                    arrival_s: at,
                }
            })
            .collect();
        out.push(Workload {
            name: "mixed".into(),
            kind: "open".into(),
            concurrency: spec.mixed_batch,
            batch: spec.mixed_batch,
            requests,
        });
    }
    for w in &out {
        let text = serde_json::to_string(w).expect("serialize workload");
        std::fs::write(dir.join(format!("{}.json", w.name)), text).expect("write workload");
    }
    out
}

fn request(item: &Item) -> Request {
    let mut r = Request::new(Prompt::Tokens(item.prompt.clone()));
    r.stop = StopConditions {
        max_tokens: item.max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    r
}

/// Drives one workload through `engine` from this one thread (submissions and `poll_any`),
/// as a host serving many requests would.
fn drive(engine: &Engine, w: &Workload, static_mode: bool) -> Vec<Trace> {
    let n = w.requests.len();
    let mut traces = vec![Trace::default(); n];
    let mut index: HashMap<u64, usize> = HashMap::new();
    let start = Instant::now();
    let now = |start: Instant| start.elapsed().as_secs_f64();
    let (mut next, mut done, mut in_flight) = (0usize, 0usize, 0usize);
    let submit = |batch: Vec<usize>, index: &mut HashMap<u64, usize>, t: &mut [Trace]| {
        let ids = engine
            .submit_batch(batch.iter().map(|&i| request(&w.requests[i])).collect())
            .expect("submit");
        let at = now(start);
        for (id, i) in ids.into_iter().zip(batch) {
            index.insert(id, i);
            t[i].submitted = at;
            if w.kind == "open" {
                t[i].arrived = Some(w.requests[i].arrival_s);
            }
        }
    };
    while done < n {
        // Hand over whatever may start now.
        if w.kind == "open" {
            let mut due = Vec::new();
            while next < n && w.requests[next].arrival_s <= now(start) {
                due.push(next);
                next += 1;
            }
            if !due.is_empty() {
                in_flight += due.len();
                submit(due, &mut index, &mut traces);
            }
        } else if static_mode {
            if in_flight == 0 && next < n {
                let wave: Vec<usize> = (next..n.min(next + w.concurrency)).collect();
                next += wave.len();
                in_flight += wave.len();
                submit(wave, &mut index, &mut traces);
            }
        } else if in_flight < w.concurrency && next < n {
            // Every free slot at once (the first c requests start together, as mlx-lm's
            // driver inserts them all before its first step; so do the replacements of
            // requests that ended in the same step).
            let batch: Vec<usize> = (next..n.min(next + w.concurrency - in_flight)).collect();
            next += batch.len();
            in_flight += batch.len();
            submit(batch, &mut index, &mut traces);
        }
        let wait = if w.kind == "open" && next < n {
            (w.requests[next].arrival_s - now(start)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        // Everything that is ready, before refilling: the requests that ended in one step
        // are replaced by one batch, as mlx-lm's driver handles all of a tick's responses
        // before it inserts.
        let mut timeout = Duration::from_secs_f64(wait);
        while let Some(event) = engine.poll_any(timeout).expect("poll") {
            timeout = Duration::ZERO;
            match event {
                Event::Token { id, .. } => traces[index[&id]].tokens.push(now(start)),
                Event::Finished { id, error, .. } => {
                    assert!(error.is_none(), "request failed: {error:?}");
                    traces[index[&id]].finished = now(start);
                    done += 1;
                    in_flight -= 1;
                }
            }
        }
    }
    traces
}

fn max_rss_bytes() -> u64 {
    // SAFETY: getrusage writes into the struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        (u.ru_maxrss as u64) * if cfg!(target_os = "macos") { 1 } else { 1024 }
    }
}

/// Runs `workload` on convoy and appends its result line to `result`.
pub fn run_convoy(
    model: &Path,
    workload: &Path,
    mode: &str,
    result: &Path,
    ablate: &[String],
    prefill_chunk: Option<usize>,
    prefill_chunk_decoding: Option<usize>,
) {
    let w: Workload = serde_json::from_slice(&std::fs::read(workload).expect("read workload"))
        .expect("parse workload");
    let static_mode = mode == "static";
    let mut cfg = EngineConfig::default()
        .mode(if static_mode {
            BatchMode::Static
        } else {
            BatchMode::Continuous
        })
        .max_batch_size(w.batch);
    const NAMES: [&str; 13] = [
        "fuse", "attn", "pad", "exp", "rows", "cache", "ahead", "ajoin", "join", "prefix", "sync",
        "chunk", "all-on",
    ];
    for a in ablate {
        assert!(
            NAMES.contains(&a.as_str()),
            "--ablate takes {}, not {a}",
            NAMES.join(", ")
        );
    }
    // Each switch from the library's defaults (what a host gets).
    let off = |name: &str| ablate.iter().any(|a| a == name);
    cfg.tuning.fuse_projections &= !off("fuse");
    cfg.tuning.decode_ahead &= !off("ahead");
    // `sync`: the CPU backend's policy of no decode-ahead (MLX's CPU `async_eval` runs most
    // of a step before returning) switched off, i.e. decode-ahead on there too.
    if off("sync") {
        cfg.tuning.decode_ahead = true;
    }
    cfg.tuning.decode_ahead_at_join &= !off("ajoin");
    cfg.tuning.copy_free_attention &= !off("attn");
    cfg.tuning.pad_matmul_rows &= !off("pad");
    cfg.tuning.rows_matmul &= !off("rows");
    cfg.tuning.fast_exp &= !off("exp");
    if off("cache") {
        cfg.tuning.mlx_cache_limit_bytes = 0;
    }
    cfg.scheduler.skip_wasted_ahead &= !off("join");
    if off("prefix") {
        cfg.scheduler.prefix_cache_bytes = 0;
    }
    // `chunk`: the prefill budget of 512 tokens per step switched off (256, the old default).
    if off("chunk") {
        cfg.scheduler.prefill_chunk = 256;
        cfg.scheduler.prefill_chunk_decoding = 256;
    }
    if let Some(chunk) = prefill_chunk {
        cfg.scheduler.prefill_chunk = chunk;
    }
    if let Some(chunk) = prefill_chunk_decoding {
        cfg.scheduler.prefill_chunk_decoding = chunk;
    }
    let cfg_chunk = cfg.scheduler.prefill_chunk;
    let cfg_chunk_decoding = cfg.scheduler.prefill_chunk_decoding;
    let engine = Engine::new(model, cfg).expect("create the engine");
    // Warm-up (first allocations, BLAS threads), as the mlx-lm driver does.
    let warm = Item {
        prompt: w.requests[0].prompt[..8.min(w.requests[0].prompt.len())].to_vec(),
        max_tokens: 2,
        arrival_s: 0.0,
    };
    engine.generate(request(&warm)).expect("warm-up");
    // Peak memory counts from here, as mlx-lm's driver resets it after its warm-up.
    convoy::mlx_rs::memory::reset_peak_memory().expect("reset peak memory");
    let traces = drive(&engine, &w, static_mode);
    let stats = engine.stats();
    let line = json!({
        "engine": match ablate {
            [] => "convoy".to_owned(),
            [a] if a == "all-on" => "convoy-all-on".to_owned(),
            _ => format!("convoy-no-{}", ablate.join("-")),
        },
        "version": env!("CARGO_PKG_VERSION"),
        "workload": w.name, "kind": w.kind, "mode": mode,
        "concurrency": w.concurrency, "batch": w.batch,
        "prefill_chunk": cfg_chunk,
        "prefill_chunk_decoding": cfg_chunk_decoding,
        "peak_mlx_memory_bytes": stats.peak_memory_bytes,
        "peak_rss_bytes": max_rss_bytes(),
        "peak_kv_bytes": stats.peak_kv_bytes,
        "traces": traces,
    });
    append_line(result, &line);
}

pub fn append_line(path: &Path, line: &serde_json::Value) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the results file");
    writeln!(f, "{line}").expect("write a result line");
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0 * (s.len() - 1) as f64).round() as usize;
    s[rank.min(s.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Metrics of one run, from its raw traces (the same code for both engines).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub engine: String,
    pub workload: String,
    pub kind: String,
    pub mode: String,
    pub concurrency: usize,
    pub requests: usize,
    pub generated_tokens: usize,
    pub wall_s: f64,
    pub throughput_tok_s: f64,
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    pub ttft_p99_s: f64,
    /// Submit to the request's last token (what a non-streaming batch call returns after).
    pub latency_mean_s: f64,
    pub itl_mean_s: f64,
    pub itl_p50_s: f64,
    pub itl_p95_s: f64,
    pub itl_p99_s: f64,
    pub goodput_req_s: f64,
    pub slo_met: usize,
    pub peak_mlx_memory_mb: f64,
    pub peak_rss_mb: f64,
    pub peak_kv_mb: Option<f64>,
}

pub struct Slo {
    pub ttft: f64,
    pub itl: f64,
}

fn summarize(line: &serde_json::Value, slo: &Slo) -> Summary {
    let traces: Vec<Trace> =
        serde_json::from_value(line["traces"].clone()).expect("traces in a result line");
    // Latencies count from when a request was due (open loops) or handed over (closed).
    let since = |t: &Trace| t.arrived.unwrap_or(t.submitted).min(t.submitted);
    let first_submit = traces.iter().map(since).fold(f64::INFINITY, f64::min);
    let last = traces.iter().map(|t| t.finished).fold(0.0, f64::max);
    let wall = last - first_submit.min(last);
    let generated: usize = traces.iter().map(|t| t.tokens.len()).sum();
    let ttft: Vec<f64> = traces
        .iter()
        .filter_map(|t| t.tokens.first().map(|f| f - since(t)))
        .collect();
    let latency: Vec<f64> = traces
        .iter()
        .filter_map(|t| t.tokens.last().map(|l| l - since(t)))
        .collect();
    let mut itl = Vec::new();
    let mut good = 0;
    for t in &traces {
        let gaps: Vec<f64> = t.tokens.windows(2).map(|w| w[1] - w[0]).collect();
        let first = t.tokens.first().map(|f| f - since(t));
        if first.is_some_and(|f| f <= slo.ttft) && (gaps.is_empty() || mean(&gaps) <= slo.itl) {
            good += 1;
        }
        itl.extend(gaps);
    }
    let s = |k: &str| line[k].as_str().unwrap_or("").to_owned();
    let mb = |k: &str| line[k].as_f64().map(|b| b / 1e6);
    Summary {
        engine: s("engine"),
        workload: s("workload"),
        kind: s("kind"),
        mode: s("mode"),
        concurrency: line["concurrency"].as_u64().unwrap_or(0) as usize,
        requests: traces.len(),
        generated_tokens: generated,
        wall_s: wall,
        throughput_tok_s: generated as f64 / wall.max(1e-9),
        ttft_mean_s: mean(&ttft),
        ttft_p50_s: percentile(&ttft, 50.0),
        ttft_p95_s: percentile(&ttft, 95.0),
        ttft_p99_s: percentile(&ttft, 99.0),
        latency_mean_s: mean(&latency),
        itl_mean_s: mean(&itl),
        itl_p50_s: percentile(&itl, 50.0),
        itl_p95_s: percentile(&itl, 95.0),
        itl_p99_s: percentile(&itl, 99.0),
        goodput_req_s: good as f64 / wall.max(1e-9),
        slo_met: good,
        peak_mlx_memory_mb: mb("peak_mlx_memory_bytes").unwrap_or(f64::NAN),
        peak_rss_mb: mb("peak_rss_bytes").unwrap_or(f64::NAN),
        peak_kv_mb: mb("peak_kv_bytes"),
    }
}

/// Reads every result line in `results`, writes `report.md`, `summary.jsonl` and
/// `compare.png` into `out`, and returns the report's text (also printed).
pub fn report(results: &Path, out: &Path, slo: &Slo, header: &str) -> String {
    let text = std::fs::read_to_string(results).expect("read the results");
    let runs: Vec<Summary> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| summarize(&serde_json::from_str(l).expect("a JSON result line"), slo))
        .collect();
    let find = |engine: &str, workload: &str, mode: &str| {
        runs.iter()
            .rev()
            .find(|r| r.engine == engine && r.workload == workload && r.mode == mode)
    };
    let mut cs: Vec<usize> = runs
        .iter()
        .filter(|r| r.kind == "closed" && (r.engine == "convoy" || r.engine == "mlx-lm"))
        .map(|r| r.concurrency)
        .collect();
    cs.sort();
    cs.dedup();
    let mut md = String::new();
    let mut summary_lines: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    md.push_str(header);
    md.push_str("\n### Closed loop (aggregate generated tok/s; TTFT mean, s)\n\n");
    md.push_str("| c | n | mlx-lm static | mlx-lm continuous | convoy static | convoy continuous | convoy/mlx-lm continuous | convoy/mlx-lm static | TTFT mlx-lm / convoy (continuous) | ITL p95 mlx-lm / convoy |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let fmt = |r: Option<&Summary>| r.map_or("-".into(), |r| format!("{:.1}", r.throughput_tok_s));
    let mut ratio_pts = Vec::new();
    for &c in &cs {
        let w = format!("closed-c{c}");
        let (ms, mc, cs_, cc) = (
            find("mlx-lm", &w, "static"),
            find("mlx-lm", &w, "continuous"),
            find("convoy", &w, "static"),
            find("convoy", &w, "continuous"),
        );
        let ratio = |a: Option<&Summary>, b: Option<&Summary>| match (a, b) {
            (Some(a), Some(b)) => Some(a.throughput_tok_s / b.throughput_tok_s),
            _ => None,
        };
        let rc = ratio(cc, mc);
        let rs = ratio(cs_, ms);
        ratio_pts.push((c, rc, rs));
        let n = [ms, mc, cs_, cc]
            .iter()
            .flatten()
            .map(|r| r.requests)
            .next();
        md.push_str(&format!(
            "| {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            n.map_or("-".into(), |n| n.to_string()),
            fmt(ms),
            fmt(mc),
            fmt(cs_),
            fmt(cc),
            rc.map_or("-".into(), |r| format!("**{r:.2}**")),
            rs.map_or("-".into(), |r| format!("{r:.2}")),
            match (mc, cc) {
                (Some(m), Some(k)) => format!("{:.2} / {:.2}", m.ttft_mean_s, k.ttft_mean_s),
                _ => "-".into(),
            },
            match (mc, cc) {
                (Some(m), Some(k)) => format!("{:.3} / {:.3}", m.itl_p95_s, k.itl_p95_s),
                _ => "-".into(),
            },
        ));
        if let Some(r) = rc {
            summary_lines.push(json!({"ratio": "throughput_convoy_over_mlx_lm", "workload": w, "mode": "continuous", "concurrency": c, "value": r}));
        }
        if let Some(r) = rs {
            summary_lines.push(json!({"ratio": "throughput_convoy_over_mlx_lm", "workload": w, "mode": "static", "concurrency": c, "value": r}));
        }
    }
    md.push_str("\n### Static and continuous batching, side by side (the same closed loops)\n\nStatic: waves of c requests handed over together, each run to completion (what `batch_generate` does per call). TTFT is the streamed first token; \"last token\" is when a non-streaming batch call returns.\n\n| c | engine | tok/s continuous / static | TTFT mean continuous / static | last token mean continuous / static |\n|---:|---|---:|---:|---:|\n");
    for &c in &cs {
        let w = format!("closed-c{c}");
        for engine in ["mlx-lm", "convoy"] {
            if let (Some(k), Some(st)) =
                (find(engine, &w, "continuous"), find(engine, &w, "static"))
            {
                md.push_str(&format!(
                    "| {c} | {engine} | {:.1} / {:.1} ({:.2}x) | {:.2} / {:.2} s | {:.2} / {:.2} s |\n",
                    k.throughput_tok_s,
                    st.throughput_tok_s,
                    k.throughput_tok_s / st.throughput_tok_s,
                    k.ttft_mean_s,
                    st.ttft_mean_s,
                    k.latency_mean_s,
                    st.latency_mean_s
                ));
            }
        }
    }
    let mixed: Vec<&Summary> = ["mlx-lm", "convoy"]
        .iter()
        .filter_map(|e| find(e, "mixed", "continuous"))
        .collect();
    if !mixed.is_empty() {
        md.push_str(&format!(
            "\n### Mixed workload (open loop, continuous batching; goodput: TTFT <= {} s and mean ITL <= {} s)\n\n",
            slo.ttft, slo.itl
        ));
        md.push_str("| engine | requests | tok/s | TTFT p50 | TTFT p95 | TTFT p99 | ITL p50 | ITL p95 | ITL p99 | goodput req/s (met) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &mixed {
            md.push_str(&format!(
                "| {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} ({}/{}) |\n",
                r.engine, r.requests, r.throughput_tok_s, r.ttft_p50_s, r.ttft_p95_s, r.ttft_p99_s,
                r.itl_p50_s, r.itl_p95_s, r.itl_p99_s, r.goodput_req_s, r.slo_met, r.requests
            ));
        }
        if let (Some(m), Some(k)) = (
            find("mlx-lm", "mixed", "continuous"),
            find("convoy", "mixed", "continuous"),
        ) {
            let v = json!({"ratio": "mixed_convoy_over_mlx_lm",
                "throughput": k.throughput_tok_s / m.throughput_tok_s,
                "ttft_p95": k.ttft_p95_s / m.ttft_p95_s,
                "itl_p95": k.itl_p95_s / m.itl_p95_s});
            md.push_str(&format!(
                "\nconvoy / mlx-lm: throughput {:.2}, TTFT p95 {:.2}, ITL p95 {:.2}.\n",
                v["throughput"].as_f64().unwrap(),
                v["ttft_p95"].as_f64().unwrap(),
                v["itl_p95"].as_f64().unwrap()
            ));
            summary_lines.push(v);
        }
    }
    let ablations: Vec<&Summary> = runs
        .iter()
        .filter(|r| r.engine.starts_with("convoy-no-"))
        .collect();
    if !ablations.is_empty() {
        md.push_str("\n### What each optimization buys (convoy with the library's defaults, mean of the runs just before and after / with one switched off; same workload, same run)\n\n| switched off | workload | tok/s with | tok/s without | throughput ratio | TTFT mean with / without | ITL p95 with / without |\n|---|---|---:|---:|---:|---:|---:|\n");
        for a in ablations {
            // The all-on runs around the ablations (mean), else the main convoy run.
            let around: Vec<&Summary> = runs
                .iter()
                .filter(|r| {
                    r.engine == "convoy-all-on" && r.workload == a.workload && r.mode == a.mode
                })
                .collect();
            let mean_of = |f: fn(&Summary) -> f64| {
                around.iter().map(|r| f(r)).sum::<f64>() / around.len() as f64
            };
            let full = if around.is_empty() {
                match find("convoy", &a.workload, &a.mode) {
                    Some(f) => f.clone(),
                    None => continue,
                }
            } else {
                let mut f = around[0].clone();
                f.throughput_tok_s = mean_of(|r| r.throughput_tok_s);
                f.ttft_mean_s = mean_of(|r| r.ttft_mean_s);
                f.itl_p95_s = mean_of(|r| r.itl_p95_s);
                f
            };
            let what = a.engine.trim_start_matches("convoy-no-");
            let ratio = full.throughput_tok_s / a.throughput_tok_s;
            md.push_str(&format!(
                "| {what} | {} {} | {:.1} | {:.1} | **{ratio:.3}** | {:.2} / {:.2} | {:.3} / {:.3} |\n",
                a.workload, a.mode, full.throughput_tok_s, a.throughput_tok_s,
                full.ttft_mean_s, a.ttft_mean_s, full.itl_p95_s, a.itl_p95_s
            ));
            summary_lines.push(json!({"ratio": "optimization", "switched_off": what, "workload": a.workload, "mode": a.mode, "throughput_with_over_without": ratio}));
        }
    }
    md.push_str("\n### Memory (per run, each in its own process)\n\n| engine | workload | mode | peak MLX MB | peak RSS MB | peak KV MB |\n|---|---|---|---:|---:|---:|\n");
    let mut sorted: Vec<&Summary> = runs.iter().collect();
    sorted.sort_by(|a, b| {
        (
            a.kind.as_str(),
            a.concurrency,
            a.mode.as_str(),
            a.engine.as_str(),
        )
            .cmp(&(
                b.kind.as_str(),
                b.concurrency,
                b.mode.as_str(),
                b.engine.as_str(),
            ))
    });
    for r in sorted {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {} |\n",
            r.engine,
            r.workload,
            r.mode,
            r.peak_mlx_memory_mb,
            r.peak_rss_mb,
            r.peak_kv_mb.map_or("-".into(), |v| format!("{v:.1}"))
        ));
    }
    std::fs::create_dir_all(out).expect("create the report folder");
    std::fs::write(out.join("report.md"), &md).expect("write report.md");
    let jl: String = summary_lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(out.join("summary.jsonl"), jl).expect("write summary.jsonl");
    if let Err(e) = plot(&out.join("compare.png"), &runs, &cs, &ratio_pts) {
        eprintln!("plot skipped: {e}");
    }
    md
}

type RatioPoint = (usize, Option<f64>, Option<f64>);

fn plot(path: &Path, runs: &[Summary], cs: &[usize], ratios: &[RatioPoint]) -> Result<(), String> {
    use plotters::prelude::*;
    super::font::register_sans_serif()?;
    let root = BitMapBackend::new(path, (1500, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((1, 3));
    let xs = |c: usize| (c as f64).log2();
    let xmax = cs.iter().map(|&c| xs(c)).fold(0.0, f64::max) + 0.3;
    let series = [
        ("mlx-lm", "static", RGBColor(255, 150, 150)),
        ("mlx-lm", "continuous", RED),
        ("convoy", "static", RGBColor(150, 150, 255)),
        ("convoy", "continuous", BLUE),
    ];
    type Metric = fn(&Summary) -> f64;
    let panels: [(&str, &str, Metric); 2] = [
        ("Aggregate throughput", "tokens/s", |r| r.throughput_tok_s),
        ("Time to first token (mean)", "seconds", |r| r.ttft_mean_s),
    ];
    for (area, (title, unit, metric)) in areas.iter().zip(panels) {
        let ymax = runs
            .iter()
            .filter(|r| r.kind == "closed")
            .map(metric)
            .fold(0.0, f64::max)
            * 1.15
            + 1e-9;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.3..xmax, 0.0..ymax)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("concurrency")
            .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
            .y_desc(unit)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
        for (engine, mode, color) in series {
            let mut pts: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.kind == "closed" && r.engine == engine && r.mode == mode)
                .map(|r| (xs(r.concurrency), metric(r)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if pts.is_empty() {
                continue;
            }
            super::chart::series(&mut chart, &pts, color, format!("{engine} {mode}"))?;
        }
        super::chart::legend(&mut chart, 13, SeriesLabelPosition::UpperLeft)?;
    }
    let ymax = ratios
        .iter()
        .flat_map(|r| [r.1, r.2])
        .flatten()
        .fold(1.3, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&areas[2])
        .caption("convoy / mlx-lm throughput", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.3..xmax, 0.0..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("concurrency")
        .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
        .y_desc("ratio")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    for (target, color) in [(1.0, BLACK), (1.25, RGBColor(0, 150, 0))] {
        chart
            .draw_series(LineSeries::new(
                vec![(-0.3, target), (xmax, target)],
                color.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
    }
    type Pick = fn(&RatioPoint) -> Option<f64>;
    let picks: [(&str, RGBColor, Pick); 2] = [
        ("continuous", BLUE, |r| r.1),
        ("static", RGBColor(150, 150, 255), |r| r.2),
    ];
    for (label, color, pick) in picks {
        let pts: Vec<(f64, f64)> = ratios
            .iter()
            .filter_map(|r| pick(r).map(|v| (xs(r.0), v)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        super::chart::series(&mut chart, &pts, color, label)?;
    }
    super::chart::legend(&mut chart, 13, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(|e| e.to_string())
}

/// GGUF tensor names to the Hugging Face / MLX names mlx-lm's llama model loads.
fn hf_name(name: &str) -> Option<String> {
    let map = |part: &str| {
        Some(match part {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            _ => return None,
        })
    };
    if let Some(rest) = name.strip_prefix("blk.") {
        let mut it = rest.splitn(3, '.');
        let (layer, part, suffix) = (it.next()?, it.next()?, it.next()?);
        Some(format!("model.layers.{layer}.{}.{suffix}", map(part)?))
    } else if let Some(s) = name.strip_prefix("token_embd.") {
        Some(format!("model.embed_tokens.{s}"))
    } else if let Some(s) = name.strip_prefix("output_norm.") {
        Some(format!("model.norm.{s}"))
    } else {
        name.strip_prefix("output.").map(|s| format!("lm_head.{s}"))
    }
}

/// Writes the float32 MLX folder of a llama-architecture GGUF model (dequantized weights,
/// `rope_traditional` kept as GGUF stores Q/K, config, tokenizer): what both engines load.
pub fn export_mlx_folder(gguf: &Path, dir: &Path) -> Result<(), String> {
    use convoy::model::{LoadOptions, WeightsPolicy};
    let lm = convoy::model::load(
        gguf,
        LoadOptions {
            weights: WeightsPolicy::KeepQuantized,
            fuse_projections: false,
            fast_exp: false,
        },
    )
    .map_err(|e| e.to_string())?;
    let file = GgufFile::load(gguf).map_err(|e| e.to_string())?;
    let mut tensors: BTreeMap<String, Array> = BTreeMap::new();
    for (name, a) in file.arrays().map_err(|e| e.to_string())? {
        let hf = hf_name(&name).ok_or_else(|| format!("unexpected tensor {name}"))?;
        tensors.insert(hf, a);
    }
    let scales: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with(".scales"))
        .cloned()
        .collect();
    for s in scales {
        let base = s.trim_end_matches(".scales").to_owned();
        let w = tensors
            .remove(&format!("{base}.weight"))
            .ok_or("no weight")?;
        let scales = tensors.remove(&s).ok_or("no scales")?;
        let biases = tensors
            .remove(&format!("{base}.biases"))
            .ok_or("no biases")?;
        let bits = w.shape()[1] * 32 / (scales.shape()[1] * 32);
        let d = convoy::mlx_rs::ops::dequantize(&w, &scales, &biases, 32, bits)
            .and_then(|d| d.as_type::<f32>())
            .map_err(|e| e.to_string())?;
        tensors.insert(format!("{base}.weight"), d);
    }
    for a in tensors.values_mut() {
        if a.dtype() != convoy::mlx_rs::Dtype::Float32 {
            *a = a.as_type::<f32>().map_err(|e| e.to_string())?;
        }
    }
    let c = &lm.model.config;
    let config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_traditional": c.rope_traditional,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "eos_token_id": lm.tokenizer.eos_ids(), "torch_dtype": "float32",
    });
    // Written beside the target and renamed last, so the folder is complete or absent.
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    Array::save_safetensors(&tensors, None, tmp.join("model.safetensors"))
        .map_err(|e| e.to_string())?;
    std::fs::write(tmp.join("config.json"), config.to_string()).map_err(|e| e.to_string())?;
    std::fs::write(
        tmp.join("tokenizer.json"),
        lm.tokenizer.to_json().map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        tmp.join("tokenizer_config.json"),
        json!({"add_bos_token": false}).to_string(),
    )
    .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dir).map_err(|e| e.to_string())
}
