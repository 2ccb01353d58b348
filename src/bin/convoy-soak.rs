//! convoy-soak: many requests from many threads with random cancels, releases and poll
//! timing, while the process's RSS and MLX's memory are sampled; checks that memory is flat
//! after warm-up and that every request ends exactly once.
//!
//! Writes `<out>/soak.jsonl` (one sample per line, then a summary line) and `<out>/soak.png`
//! (RSS, MLX active and cache memory, and KV bytes over time). Exits non-zero if a request
//! was lost or ended twice, or memory grew after warm-up by more than `--max-growth-mb`.
#[path = "shared/font.rs"]
mod font;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use convoy::{ChatMessage, Engine, EngineConfig, Error, Event, Prompt, Request};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Soak test: memory stays flat and every request ends exactly once")]
struct Args {
    /// Model (.gguf or folder).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// Requests in all.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Host threads submitting and polling.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Most tokens per request (each gets 1..=this).
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 1.0)]
    sample_every: f64,
    /// Fraction of the run treated as warm-up.
    #[arg(long, default_value_t = 0.2)]
    warmup: f64,
    /// Largest allowed growth of RSS (mean of the last fifth over the first fifth after
    /// warm-up), MB.
    #[arg(long, default_value_t = 64.0)]
    max_growth_mb: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Seeded randomness (ChaCha: a stable stream for a seed).
struct Rng(rand_chacha::ChaCha8Rng);
impl Rng {
    fn new(seed: u64) -> Self {
        use rand_chacha::rand_core::SeedableRng;
        Self(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        use rand_chacha::rand_core::RngCore;
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Resident set size of this process in bytes (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    rss: u64,
    active: u64,
    cache: u64,
    kv: u64,
    finished: u64,
}

const TOPICS: [&str; 8] = [
    "the sea",
    "a mountain village",
    "how bread is made",
    "the history of clocks",
    "why cats purr",
    "a city at night",
    "the water cycle",
    "learning to ride a bicycle",
];

fn prompt(rng: &mut Rng) -> Prompt {
    let topic = TOPICS[rng.below(TOPICS.len())];
    // Prompts of about 8-50 tokens (and token prompts of 1-64): the soak is about many
    // requests and their life cycles, not prefill throughput (2 CPU cores prefill ~130 tok/s).
    let repeat = 1 + rng.below(6);
    let body = format!("Tell me about {topic}. ").repeat(repeat);
    match rng.below(3) {
        0 => Prompt::Text(body),
        1 => Prompt::Chat(vec![ChatMessage::new("user", body)]),
        _ => Prompt::Tokens(
            (0..1 + rng.below(64))
                .map(|i| 1000 + i as u32 * 7)
                .collect(),
        ),
    }
}

#[derive(Default)]
struct Counts {
    submitted: usize,
    ended: usize,
    double_ends: usize,
    released: usize,
    cancelled: usize,
    busy: usize,
}

fn client(engine: &Engine, args: &Args, k: usize, next: &AtomicUsize, counts: &Mutex<Counts>) {
    let mut rng = Rng::new(args.seed.wrapping_mul(1000).wrapping_add(k as u64));
    while next.fetch_add(1, Ordering::SeqCst) < args.requests {
        let mut req = Request::new(prompt(&mut rng)).max_tokens(1 + rng.below(args.max_tokens));
        if rng.below(4) == 0 {
            req.sampling.temperature = 0.8;
            req.sampling.seed = Some(rng.next());
        }
        let id = loop {
            match engine.submit(req.clone()) {
                Ok(id) => break id,
                Err(Error::Busy(_)) => {
                    counts.lock().unwrap().busy += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("submit: {e}"),
            }
        };
        counts.lock().unwrap().submitted += 1;
        let action = rng.below(100);
        if action < 10 {
            // Given up without polling, at a random moment.
            std::thread::sleep(Duration::from_millis(rng.below(500) as u64));
            match engine.release(id) {
                Ok(()) | Err(Error::UnknownRequest(_)) => {}
                Err(e) => panic!("release: {e}"),
            }
            counts.lock().unwrap().released += 1;
            continue;
        }
        let cancel_after = (action < 25).then(|| rng.below(30));
        let mut events = 0;
        let mut ends = 0;
        loop {
            let timeout = Duration::from_millis([0, 1, 10, 50, 200][rng.below(5)]);
            match engine.poll(id, timeout) {
                Ok(Some(Event::Token { .. })) => {
                    events += 1;
                    if cancel_after == Some(events) {
                        engine.cancel(id).ok();
                        counts.lock().unwrap().cancelled += 1;
                    }
                }
                Ok(Some(Event::Finished { .. })) => ends += 1,
                Ok(None) => {
                    if rng.below(8) == 0 {
                        std::thread::sleep(Duration::from_millis(rng.below(30) as u64));
                    }
                }
                Err(Error::UnknownRequest(_)) => break,
                Err(e) => panic!("poll: {e}"),
            }
        }
        let mut c = counts.lock().unwrap();
        c.ended += (ends == 1) as usize;
        c.double_ends += (ends > 1) as usize;
    }
}

fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out).expect("create the output folder");
    let engine = Engine::new(&args.model, EngineConfig::default()).expect("load the model");
    // MLX memory with the engine idle (weights only), before any request.
    std::thread::sleep(Duration::from_millis(300));
    let idle_before = engine.stats().active_memory_bytes;
    let start = Instant::now();
    let clients_done = Mutex::new(None::<f64>);
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let next = AtomicUsize::new(0);
    let counts = Mutex::new(Counts::default());
    std::thread::scope(|s| {
        let sampler = {
            let (samples, done, engine) = (samples.clone(), done.clone(), &engine);
            let every = Duration::from_secs_f64(args.sample_every);
            s.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let st = engine.stats();
                    samples.lock().unwrap().push(Sample {
                        t: start.elapsed().as_secs_f64(),
                        rss: rss_bytes(),
                        active: st.active_memory_bytes,
                        cache: st.cache_memory_bytes,
                        kv: st.kv_bytes as u64,
                        finished: st.requests_finished,
                    });
                    std::thread::sleep(every);
                }
            })
        };
        let clients: Vec<_> = (0..args.threads)
            .map(|k| {
                let (engine, args, next, counts) = (&engine, &args, &next, &counts);
                s.spawn(move || client(engine, args, k, next, counts))
            })
            .collect();
        for c in clients {
            c.join().expect("client thread");
        }
        *clients_done.lock().unwrap() = Some(start.elapsed().as_secs_f64());
        // A last sample once idle.
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, Ordering::SeqCst);
        sampler.join().expect("sampler thread");
    });
    let st = engine.stats();
    let samples = samples.lock().unwrap().clone();
    let c = counts.lock().unwrap();
    let wall = start.elapsed().as_secs_f64();

    // Memory after warm-up and before the wind-down (the last requests draining): mean of the
    // first and the last fifth of those samples.
    let clients_end = clients_done.lock().unwrap().unwrap_or(wall);
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= args.warmup * clients_end && s.t <= clients_end * 0.95)
        .collect();
    let fifth = (after.len() / 5).max(1);
    let mean = |xs: &[&Sample], f: fn(&Sample) -> u64| {
        xs.iter().map(|s| f(s) as f64).sum::<f64>() / xs.len().max(1) as f64
    };
    let (early, late) = (
        &after[..fifth.min(after.len())],
        &after[after.len() - fifth.min(after.len())..],
    );
    let mb = |b: f64| b / (1 << 20) as f64;
    let rss_growth = mb(mean(late, |s| s.rss) - mean(early, |s| s.rss));
    let active_growth = mb(mean(late, |s| s.active) - mean(early, |s| s.active));
    let peak_rss = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let lost = c.submitted - c.ended - c.double_ends - c.released;
    // Idle again: MLX's active memory must be back to what it was before the first request
    // (a per-request leak of MLX arrays shows here, however small).
    std::thread::sleep(Duration::from_millis(300));
    let idle_after = engine.stats().active_memory_bytes;
    let idle_growth = idle_after as f64 - idle_before as f64;
    let summary = json!({
        "summary": true,
        "requests": c.submitted, "threads": args.threads, "ended_once": c.ended,
        "ended_twice": c.double_ends, "released": c.released, "cancelled": c.cancelled,
        "busy_retries": c.busy, "lost": lost, "wall_s": wall,
        "tokens_generated": st.tokens_generated, "requests_held_at_end": engine.requests_held(),
        "rss_growth_mb_after_warmup": rss_growth, "mlx_active_growth_mb_after_warmup": active_growth,
        "peak_rss_mb": mb(peak_rss as f64), "final_rss_mb": mb(samples.last().map_or(0, |s| s.rss) as f64),
        "final_mlx_active_mb": mb(st.active_memory_bytes as f64),
        "peak_kv_mb": mb(st.peak_kv_bytes as f64), "samples": samples.len(),
        "mlx_active_idle_before_mb": mb(idle_before as f64),
        "mlx_active_idle_after_mb": mb(idle_after as f64),
        "mlx_active_idle_growth_bytes": idle_growth,
    });
    let mut lines: Vec<String> = samples
        .iter()
        .map(|s| {
            json!({"t": s.t, "rss": s.rss, "mlx_active": s.active, "mlx_cache": s.cache,
                   "kv_bytes": s.kv, "finished": s.finished})
            .to_string()
        })
        .collect();
    lines.push(summary.to_string());
    std::fs::write(args.out.join("soak.jsonl"), lines.join("\n") + "\n").expect("write jsonl");
    if let Err(e) = plot(&args.out.join("soak.png"), &samples, args.warmup * wall) {
        eprintln!("plot skipped: {e}");
    }
    println!("{summary:#}");
    let ok = lost == 0
        && c.double_ends == 0
        && engine.requests_held() == 0
        && rss_growth <= args.max_growth_mb
        && active_growth <= args.max_growth_mb
        && idle_growth <= (1u64 << 20) as f64;
    drop(engine);
    if !ok {
        eprintln!("soak FAILED");
        std::process::exit(1);
    }
    println!("soak passed");
}

fn plot(path: &Path, samples: &[Sample], warmup_end: f64) -> Result<(), String> {
    use plotters::prelude::*;
    font::register_sans_serif()?;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let tmax = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    let ymax = samples
        .iter()
        .map(|s| mb(s.rss).max(mb(s.active + s.cache)))
        .fold(0.0, f64::max)
        * 1.1
        + 1.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("convoy soak: memory over time", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..tmax, 0.0..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    type Metric = fn(&Sample) -> u64;
    let series: [(&str, RGBColor, Metric); 4] = [
        ("process RSS", RED, |s| s.rss),
        ("MLX active", BLUE, |s| s.active),
        ("MLX buffer cache", GREEN, |s| s.cache),
        ("KV cache allocated", BLACK, |s| s.kv),
    ];
    for (label, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t, mb(f(s)))),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(warmup_end, 0.0), (warmup_end, ymax)],
            RGBColor(150, 150, 150),
        )))
        .map_err(|e| e.to_string())?
        .label("end of warm-up")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(150, 150, 150)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
