//! The public safe API: an [`Engine`] owns a background thread that owns every MLX object
//! (model, caches, runner) and runs the [`Scheduler`] step by step.
//!
//! Host calls never touch MLX and never wait for model computation: `submit` tokenizes on the
//! caller's thread (the tokenizer is thread-safe), checks limits, and queues; `poll` waits on
//! the request's own event stream for at most the caller's timeout; `cancel` takes effect at
//! the next step boundary; `release` gives a request up (its events are dropped). With no work
//! the thread blocks on its command channel (no spinning). A panic on the engine thread is
//! caught: running requests end with an error event and the engine enters a failed state
//! that every later call reports. Delivery rules are in [`crate::stream`].
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TryRecvError};

use crate::constraint::{Grammars, RowConstraint};
use crate::error::{Error, Result};
use crate::kv_cache::KvLayout;
use crate::model::{self, LoadOptions, WeightsPolicy};
use crate::request::{Event, FinishReason, Prompt, Request, RequestId, RequestStats};
use crate::runner::{kv_layout, MlxRunner};
use crate::scheduler::{BatchMode, Scheduler, SchedulerConfig, SchedulerStats};
use crate::stream::{Refused, Stream, Streams};
use crate::tokenizer::Tokenizer;

/// Receives one line per finished request (the request log).
pub type LogCallback = Arc<dyn Fn(&str) + Send + Sync>;

/// Engine configuration. `Default` gives continuous batching with 8 rows.
#[derive(Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub weights: WeightsPolicy,
    /// Called on the engine thread for every finished request; keep it quick.
    pub log: Option<LogCallback>,
    /// Most requests held at once: queued, running, or ended with events not yet polled.
    /// A request is held until its terminal event is polled or it is released; submit
    /// answers busy beyond this, so a host that never polls cannot grow memory without
    /// bound. Default 1024.
    pub max_requests: usize,
    /// Performance switches, each at its default for this backend; changed only to measure
    /// what each buys.
    pub tuning: Tuning,
    /// A prefix cache saved by [`Engine::save_prefix_cache`] (a `.safetensors` file), loaded
    /// when the engine starts, so an app's relaunch keeps its warm system prompt and chats.
    /// A missing file starts the cache empty; a file made by another convoy format version,
    /// for another model or for other weights is refused: the engine is not created
    /// (`InvalidArgument`, saying why). Entries beyond `prefix_cache_bytes` are not loaded.
    pub prefix_cache_file: Option<PathBuf>,
}

/// Optimizations that can be switched off to measure them (`convoy-bench --ablate`,
/// docs/benchmarks.md). All on by default but `decode_ahead` on the CPU backend. Non-exhaustive: start from `Tuning::default()`
/// and set fields, so later switches do not break callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tuning {
    /// q/k/v and gate/up stored as one matrix each: one matmul per step instead of three
    /// and two (see [`LoadOptions`](crate::model::LoadOptions)).
    pub fuse_projections: bool,
    /// Queue the next greedy decode step before handing this step's tokens to the
    /// scheduler, so host work overlaps device work. Default: on for the Metal and CUDA
    /// backends, off for the CPU backend. There MLX's `async_eval` returns only once ~80-88%
    /// of the queued step has run (its scheduler bounds the tasks in flight; measured with
    /// `convoy-bench --profile-decode`), so queuing ahead overlapped little host work and
    /// delayed every token's delivery by most of a step (docs/benchmarks.md).
    pub decode_ahead: bool,
    /// With [`decode_ahead`](Self::decode_ahead), also queue the first decode step of a
    /// batch a prefilled group has just joined (its merged cache included) before the
    /// join's tokens go to the scheduler, so the pipeline does not restart cold at every
    /// join.
    pub decode_ahead_at_join: bool,
    /// Decode-step attention as plain matmuls over views of the cache, instead of MLX's
    /// fused attention op (which copies every layer's keys and values on the CPU backend).
    /// With [`fast_exp`](Self::fast_exp) also prefill attention, the only form that can use
    /// convoy's `exp`; off, both take MLX's fused op.
    pub copy_free_attention: bool,
    /// On the CPU backend over a multi-threaded OpenBLAS, float32 matmuls with a few rows are
    /// zero-padded to the row count OpenBLAS splits evenly between its threads (a decode
    /// step 1.06x faster at batch 8 and 1.30x at 12 on 2 cores; see docs/benchmarks.md).
    /// With [`rows_matmul`](Self::rows_matmul) (where it runs) this applies to 17-64 rows
    /// only. No effect elsewhere.
    pub pad_matmul_rows: bool,
    /// On the CPU backend on x86-64 (with AVX2 and FMA), float32 matmuls of at most 16 rows
    /// (a decode step's batch) run convoy's own kernel, which streams each weight row from
    /// memory once, instead of OpenBLAS's sgemm, which first copies (packs) both operands:
    /// for so few rows the step is bound by reading the weights, and the copy doubled that
    /// traffic (see `model/rows_matmul.cc` and docs/benchmarks.md). This matmul's output for a
    /// row is also bit-identical whatever else is in the batch. Built with GCC's OpenMP
    /// (link `-lgomp` with the static library); no effect elsewhere.
    pub rows_matmul: bool,
    /// On the CPU backend, the attention softmax and the MLP's SiLU compute `exp` with
    /// multiplies and adds in compiled MLX code instead of MLX's CPU `exp`, which calls libm
    /// for every `fma` (see `model/fast_math.rs` and docs/benchmarks.md), for operands of at
    /// least 8192 elements (below that MLX's is faster). It needs `g++` at run time (MLX's
    /// JIT, kernels under `$TMPDIR/mlx`); without a working one convoy uses MLX's `exp`. No
    /// effect on other backends.
    pub fast_exp: bool,
    /// On the CPU backend, MLX's buffer-cache limit (freed buffers kept for reuse) is raised
    /// to at least this many bytes while the engine exists, and what it was before is put
    /// back when the last such engine is dropped. MLX's limit is process-wide: a host that
    /// uses MLX itself sees it too; 0 leaves it alone. MLX's own default, 32 MiB, is smaller
    /// than one prefill chunk's temporaries, so every chunk handed them back to libc and
    /// faulted fresh pages in again. The engine still empties the cache whenever it goes
    /// idle. Default 256 MiB.
    pub mlx_cache_limit_bytes: usize,
}

/// The default of [`Tuning::mlx_cache_limit_bytes`].
pub const DEFAULT_MLX_CACHE_LIMIT_BYTES: usize = 256 << 20;

impl Default for Tuning {
    fn default() -> Self {
        Self {
            fuse_projections: true,
            decode_ahead: crate::backend() != "cpu",
            decode_ahead_at_join: true,
            copy_free_attention: true,
            pad_matmul_rows: true,
            rows_matmul: true,
            fast_exp: true,
            mlx_cache_limit_bytes: DEFAULT_MLX_CACHE_LIMIT_BYTES,
        }
    }
}

/// The default of [`EngineConfig::max_requests`].
pub const DEFAULT_MAX_REQUESTS: usize = 1024;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            weights: WeightsPolicy::default(),
            log: None,
            max_requests: DEFAULT_MAX_REQUESTS,
            tuning: Tuning::default(),
            prefix_cache_file: None,
        }
    }
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("scheduler", &self.scheduler)
            .field("weights", &self.weights)
            .field("log", &self.log.is_some())
            .field("max_requests", &self.max_requests)
            .field("tuning", &self.tuning)
            .field("prefix_cache_file", &self.prefix_cache_file)
            .finish()
    }
}

impl EngineConfig {
    pub fn mode(mut self, mode: BatchMode) -> Self {
        self.scheduler.mode = mode;
        self
    }
    pub fn max_batch_size(mut self, n: usize) -> Self {
        self.scheduler.max_batch_size = n;
        self
    }
    fn validate(&self) -> Result<()> {
        let s = &self.scheduler;
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_owned()));
        if s.max_batch_size == 0 || s.max_batch_size > 1024 {
            return bad("max_batch_size must be in 1..=1024");
        }
        if s.max_waiting == 0 {
            return bad("max_waiting must be at least 1");
        }
        if s.prefill_chunk == 0 || s.prefill_chunk_decoding == 0 || s.max_prefill_group == 0 {
            return bad(
                "prefill_chunk, prefill_chunk_decoding and max_prefill_group must be at least 1",
            );
        }
        if s.max_kv_bytes == 0 {
            return bad("max_kv_bytes must be above 0");
        }
        if self.max_requests == 0 {
            return bad("max_requests must be at least 1");
        }
        if let Some(file) = &self.prefix_cache_file {
            crate::prefix_file::check_extension(file)?;
        }
        Ok(())
    }
}

/// Engine-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    /// Requests admitted: prefilling or decoding.
    pub running: usize,
    /// Of those, requests whose prompt is still being prefilled.
    pub prefilling: usize,
    pub waiting: usize,
    pub kv_tokens: usize,
    /// Bytes the KV caches allocate now (padding and spare capacity included); at most
    /// `max_kv_bytes`.
    pub kv_bytes: usize,
    /// The most KV bytes allocated at the end of any step so far.
    pub peak_kv_bytes: usize,
    /// Requests held (queued, running, or ended with events not yet polled).
    pub requests_held: usize,
    pub steps: u64,
    pub tokens_generated: u64,
    pub requests_finished: u64,
    /// Seconds inside engine steps; the part spent in MLX work (building graphs, evaluating,
    /// sampling); and the part of that spent waiting for evaluation. `step - mlx` is the
    /// engine's own overhead (scheduling, stop checks, detokenizing, events).
    pub step_seconds: f64,
    pub mlx_seconds: f64,
    pub eval_seconds: f64,
    /// MLX's peak memory use in bytes.
    pub peak_memory_bytes: u64,
    /// MLX memory in use (weights, KV cache, temporaries) and held in MLX's buffer cache, in
    /// bytes, when the engine last published its counters (after each step and when idle).
    /// MLX keeps these per process: they include other engines in the same process.
    pub active_memory_bytes: u64,
    pub cache_memory_bytes: u64,
    /// Prefix cache: admitted requests that reused a cached prefix, the prompt tokens they
    /// did not compute, the bytes and entries held now (at most `prefix_cache_bytes`), and
    /// entries evicted to stay within it.
    pub prefix_cache_hits: u64,
    pub prefix_cache_hit_tokens: u64,
    pub prefix_cache_bytes: usize,
    pub prefix_cache_entries: usize,
    pub prefix_cache_evictions: u64,
}

/// What a loaded model is (see [`Engine::model_info`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// GGUF `general.name`, a folder's `_name_or_path`, or the file or folder name.
    pub name: String,
    /// Model family: "llama" (also Mistral), "qwen2", "qwen3", "phi3" or "gemma3_text".
    pub architecture: String,
    /// The model's own context length (the engine may hold requests to less; see
    /// [`Engine::context_length`]).
    pub context_length: usize,
    /// The tokenizer's vocabulary, added tokens included: valid token ids are below this
    /// (the embedding matrix may have more rows, as padding).
    pub vocab_size: usize,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// Whether the model ships a chat template (`submit` of a chat needs one).
    pub has_chat_template: bool,
    /// How the matmul weights are held in memory ("float32", "q4_g32", ...).
    pub weight_dtype: String,
    /// The MLX backend: "cpu", "metal" or "cuda".
    pub backend: String,
    /// Transformer layers, hidden size, attention heads and key/value heads.
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

/// A request on its way to the engine thread.
struct Submission {
    id: RequestId,
    prompt: Vec<u32>,
    request: Request,
    /// The request's constraint, compiled on the caller's thread.
    constraint: Option<RowConstraint>,
    events: Arc<Stream>,
    at: Instant,
}

enum Command {
    /// Requests submitted together: the engine thread takes all of them before its next step.
    Submit(Vec<Submission>),
    Cancel(RequestId),
    /// Write the prefix cache to a file; the reply is the number of entries written.
    SavePrefixCache(PathBuf, Sender<Result<usize>>),
    /// The process is exiting: stop at once and call nothing of the host's.
    Exit,
    #[cfg(feature = "fault-injection")]
    Fault(Fault),
    Shutdown,
}

/// Failures the tests inject to check the engine's failure paths (see
/// `Engine::inject_fault`, built with the `fault-injection` feature only).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Behave as if MLX failed during a step: running requests end with an error event and
    /// the engine goes on serving.
    StepError,
    /// Panic on the engine thread: the engine enters its failed state.
    Panic,
}

struct Shared {
    /// Set once the engine thread has failed; the message says why.
    failed: Mutex<Option<String>>,
    stats: Mutex<EngineStats>,
    /// Submitted but not yet admitted (for the busy answer without a round trip).
    queued: AtomicUsize,
}

/// An inference engine on one model. `Send + Sync`: share it between threads by reference or
/// `Arc`. Dropping it ends in-flight requests (cancelled) and joins the thread.
pub struct Engine {
    commands: Sender<Command>,
    shared: Arc<Shared>,
    streams: Arc<Streams>,
    tokenizer: Arc<Tokenizer>,
    /// Compiles output constraints; built at the first constrained request.
    grammars: OnceLock<std::result::Result<Grammars, String>>,
    layout: KvLayout,
    info: ModelInfo,
    next_id: AtomicU64,
    config: SchedulerConfig,
    context_length: usize,
    thread: Option<JoinHandle<()>>,
    /// Registered with the process-exit hook while this engine lives.
    _exit_gate: Arc<ExitGate>,
}

/// Lets the process-exit hook stop an engine's thread before MLX's static objects are
/// destroyed: a host that calls `exit()` (or returns from `main`) with an engine still
/// running must not crash in MLX's destructors while the engine thread is mid-step.
struct ExitGate {
    commands: Sender<Command>,
    done: Arc<Done>,
}

/// Set by the engine thread when it has stopped touching MLX.
#[derive(Default)]
struct Done {
    stopped: Mutex<bool>,
    cv: std::sync::Condvar,
    thread: Mutex<Option<std::thread::ThreadId>>,
}

impl Done {
    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Waits until set or `deadline`.
    fn wait(&self, deadline: Instant) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            stopped = self
                .cv
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Engines alive in this process (weakly held), for [`stop_engines_at_exit`].
static LIVE_ENGINES: Mutex<Vec<std::sync::Weak<ExitGate>>> = Mutex::new(Vec::new());
/// The exit hook is registered after MLX's first evaluation (which creates most of MLX's
/// static objects) and again after the first engine step (for objects created lazily by
/// the first forward pass), so that it runs before their destructors: exit handlers run in
/// reverse order of registration. Running it more than once is harmless.
static EXIT_HOOK_AFTER_INIT: std::sync::Once = std::sync::Once::new();
static EXIT_HOOK_AFTER_STEP: std::sync::Once = std::sync::Once::new();
/// Set by the exit hook: engine threads stop calling into the host.
static EXITING: AtomicBool = AtomicBool::new(false);
/// How long the exit hook waits for engine threads to finish their step.
const EXIT_WAIT: Duration = Duration::from_secs(10);

fn register_exit_hook(once: &std::sync::Once) {
    once.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` that never unwinds.
        unsafe {
            libc::atexit(stop_engines_at_exit);
        }
    });
}

/// Runs at process exit: asks every live engine thread (loading, running or idle) to stop,
/// without calling back into the host from then on, and waits a bounded time for each to
/// finish its step and release its MLX work.
extern "C" fn stop_engines_at_exit() {
    EXITING.store(true, Ordering::SeqCst);
    let _ = catch_unwind(|| {
        let gates: Vec<Arc<ExitGate>> = LIVE_ENGINES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let me = std::thread::current().id();
        let on_engine_thread =
            |g: &ExitGate| *g.done.thread.lock().unwrap_or_else(|p| p.into_inner()) == Some(me);
        for g in &gates {
            let _ = g.commands.send(Command::Exit);
        }
        let deadline = Instant::now() + EXIT_WAIT;
        for g in gates.iter().filter(|g| !on_engine_thread(g)) {
            g.done.wait(deadline);
        }
    });
}

impl Engine {
    /// Loads the model at `path` (a `.gguf` file or a model folder) on a new engine thread.
    /// Blocks until the model is loaded.
    pub fn new(path: impl Into<PathBuf>, config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let path = path.into();
        let (tx, rx) = channel::unbounded::<Command>();
        let (ready_tx, ready_rx) = channel::bounded::<Result<Ready>>(1);
        let shared = Arc::new(Shared {
            failed: Mutex::new(None),
            stats: Mutex::new(EngineStats::default()),
            queued: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        let thread_config = config.clone();
        let streams = Arc::new(Streams::new(config.max_requests));
        let thread_streams = streams.clone();
        let done = Arc::new(Done::default());
        // Known to the exit hook before the thread starts, so an exit while it loads waits.
        let exit_gate = Arc::new(ExitGate {
            commands: tx.clone(),
            done: done.clone(),
        });
        {
            let mut live = LIVE_ENGINES.lock().unwrap_or_else(|p| p.into_inner());
            live.retain(|w| w.strong_count() > 0);
            live.push(Arc::downgrade(&exit_gate));
        }
        let thread_done = done.clone();
        let thread = std::thread::Builder::new()
            .name("convoy-engine".into())
            .spawn(move || {
                *thread_done.thread.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(std::thread::current().id());
                // Marks the thread done however it ends (an unwind included).
                struct SetOnDrop(Arc<Done>);
                impl Drop for SetOnDrop {
                    fn drop(&mut self) {
                        self.0.set();
                    }
                }
                let _done = SetOnDrop(thread_done);
                engine_thread(
                    path,
                    thread_config,
                    rx,
                    ready_tx,
                    thread_shared,
                    thread_streams,
                );
            })
            .map_err(|e| Error::EngineFailed(format!("cannot spawn the engine thread: {e}")))?;
        let Ready {
            tokenizer,
            context: model_context,
            layout,
            info,
        } = match ready_rx.recv() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::EngineFailed(
                    "the engine thread died while loading".into(),
                ));
            }
        };
        let mut sched = config.scheduler.clone();
        sched.max_context = sched.max_context.min(model_context).max(2);
        Ok(Self {
            commands: tx,
            shared,
            streams,
            tokenizer,
            grammars: OnceLock::new(),
            layout,
            info,
            next_id: AtomicU64::new(1),
            context_length: sched.max_context,
            config: sched,
            thread: Some(thread),
            _exit_gate: exit_gate,
        })
    }

    /// The model's tokenizer (thread-safe).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The context length requests are held to.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// What the loaded model is.
    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokenizes `text` as a text prompt would be (`add_special`: with the BOS token the
    /// model asks for).
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, add_special)
    }

    /// Turns token ids back into text (`skip_special`: leave out special tokens such as
    /// end-of-turn markers). Ids outside the vocabulary are `InvalidArgument`.
    pub fn detokenize(&self, tokens: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer.decode_with(tokens, skip_special)
    }

    /// Renders a chat with the model's chat template, as `submit` of a chat does when
    /// `add_generation_prompt` is true. `Template` error if the model has no template.
    pub fn render_chat(
        &self,
        messages: &[crate::tokenizer::ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.tokenizer
            .apply_chat_template(messages, add_generation_prompt)
    }

    /// `Ok` while the engine serves requests; `EngineFailed` (saying why) once its thread
    /// has failed. For health checks: a failed engine must be recreated.
    pub fn health(&self) -> Result<()> {
        self.check_alive()
    }

    fn check_alive(&self) -> Result<()> {
        match &*self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(msg) => Err(Error::EngineFailed(msg.clone())),
            None => Ok(()),
        }
    }

    /// Tokenizes a prompt as `submit` would.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true),
            Prompt::Tokens(ids) => {
                let vocab = self.tokenizer.vocab_size() as u32;
                match ids.iter().find(|&&t| t >= vocab) {
                    Some(bad) => Err(Error::InvalidArgument(format!(
                        "token id {bad} is outside the vocabulary of {vocab}"
                    ))),
                    None => Ok(ids.clone()),
                }
            }
            Prompt::Chat(messages) => self.tokenizer.encode_chat(messages),
        }
    }

    /// Queues a request and returns its id at once. Errors: `Busy` when `max_waiting`
    /// requests are queued or `max_requests` are held, `PromptTooLong`, `InvalidArgument`,
    /// `EngineFailed`, `ShutDown`.
    pub fn submit(&self, request: Request) -> Result<RequestId> {
        Ok(self.submit_batch(vec![request])?[0])
    }

    /// Queues several requests as one: all are checked first and either all are queued or
    /// none is (the error says why), and the engine thread takes them together, before its
    /// next step. So a batch reaches the scheduler as one group of arrivals, as when a
    /// caller hands a whole batch over at once (static batching, offline jobs). Returns the
    /// ids in order. Errors as [`submit`](Self::submit) (for a bad request, the message
    /// names its index); `Busy` when the batch does not fit whole under `max_waiting` or
    /// `max_requests` now; `InvalidArgument` for an empty batch or one larger than those
    /// limits (it could never fit).
    pub fn submit_batch(&self, requests: Vec<Request>) -> Result<Vec<RequestId>> {
        self.check_alive()?;
        if requests.is_empty() {
            return Err(Error::InvalidArgument("the batch has no requests".into()));
        }
        let limit = self.config.max_waiting.min(self.streams.capacity());
        if requests.len() > limit {
            // Busy would invite a retry that can never succeed.
            return Err(Error::InvalidArgument(format!(
                "a batch of {} requests can never fit: at most {limit} can be queued \
                 (max_waiting and max_requests)",
                requests.len()
            )));
        }
        let many = requests.len() > 1;
        let mut checked = Vec::with_capacity(requests.len());
        for (i, request) in requests.into_iter().enumerate() {
            let check = self.prompt_tokens(&request.prompt).and_then(|prompt| {
                // Same checks the scheduler makes, answered here without a round trip.
                self.config
                    .check(prompt.len(), &request.stop, &request.sampling, &self.layout)?;
                let constraint = request
                    .constraint
                    .as_ref()
                    .map(|c| self.grammars()?.compile(c))
                    .transpose()?;
                Ok((prompt, constraint))
            });
            match check {
                Ok((prompt, constraint)) => checked.push((prompt, request, constraint)),
                Err(e) if many => return Err(e.in_batch(i)),
                Err(e) => return Err(e),
            }
        }
        let n = checked.len();
        let queued = self.shared.queued.fetch_add(n, Ordering::SeqCst);
        if queued.saturating_add(n) > self.config.max_waiting {
            self.shared.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(Error::Busy(queued));
        }
        let first = self.next_id.fetch_add(n as u64, Ordering::Relaxed);
        let ids: Vec<RequestId> = (first..first + n as u64).collect();
        let at = Instant::now();
        let registered = self.streams.register_many(&ids, |streams| {
            let batch = ids
                .iter()
                .zip(checked)
                .zip(streams)
                .map(
                    |((&id, (prompt, request, constraint)), events)| Submission {
                        id,
                        prompt,
                        request,
                        constraint,
                        events,
                        at,
                    },
                )
                .collect();
            // The command comes back in the error if the thread is gone: drop it here.
            self.commands.send(Command::Submit(batch)).map_err(drop)
        });
        match registered {
            Ok(()) => Ok(ids),
            Err(refused) => {
                self.shared.queued.fetch_sub(n, Ordering::SeqCst);
                self.check_alive()?;
                match refused {
                    Ok(Refused::Full(held)) => Err(Error::Busy(held)),
                    Ok(Refused::Stopped) | Err(_) => Err(Error::ShutDown),
                }
            }
        }
    }

    /// The constraint compiler for this model's tokenizer (built once, at first use).
    fn grammars(&self) -> Result<&Grammars> {
        self.grammars
            .get_or_init(|| Grammars::new(self.tokenizer.clone()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|m| Error::InvalidArgument(m.clone()))
    }

    /// Waits up to `timeout` for the request's next event; `Ok(None)` on timeout. Every
    /// request yields `Token` events and then exactly one `Finished`, handed to exactly one
    /// poller; after that (or after [`release`](Self::release)) the id is unknown
    /// (`UnknownRequest`), also for other threads polling it at the same time.
    pub fn poll(&self, id: RequestId, timeout: Duration) -> Result<Option<Event>> {
        self.streams.poll(id, Some(timeout))
    }

    /// Waits up to `timeout` for the next event of any request this engine holds (see
    /// [`Event::request_id`]); `Ok(None)` on timeout. Requests take turns: after an event of
    /// one request, other requests with events waiting come first. The same exactly-once
    /// rules as [`poll`](Self::poll) hold, also when both are used on one request: each event
    /// goes to one caller, so a request consumed per id ([`poll`](Self::poll),
    /// [`generate`](Self::generate)) loses events to a concurrent `poll_any`, and with several
    /// `poll_any` threads one request's events may be handled by different threads at once.
    /// Once the engine thread has stopped (failure or shutdown) and every event has been
    /// taken, returns `EngineFailed` or `ShutDown` at once instead of waiting.
    pub fn poll_any(&self, timeout: Duration) -> Result<Option<Event>> {
        match self.streams.poll_any(Some(timeout)) {
            Err(Error::ShutDown) => {
                self.check_alive()?;
                Err(Error::ShutDown)
            }
            other => other,
        }
    }

    /// Asks for a request to end; it ends with `Cancelled` at the next step boundary (its
    /// terminal event still arrives through `poll`). Cancelling a request whose terminal
    /// event is already queued is harmless. Errors: `UnknownRequest`, `EngineFailed`.
    pub fn cancel(&self, id: RequestId) -> Result<()> {
        self.check_alive()?;
        if self.streams.is_open(id)? && self.commands.send(Command::Cancel(id)).is_err() {
            self.check_alive()?;
            return Err(Error::ShutDown);
        }
        Ok(())
    }

    /// Writes the prefix cache (every entry's tokens and KV) to `path`, a `.safetensors`
    /// file, replacing it atomically; returns how many entries it holds. Load it again with
    /// [`EngineConfig::prefix_cache_file`]. Runs on the engine thread between two steps.
    /// Errors: `InvalidArgument` (bad name, cannot write), `EngineFailed`, `ShutDown`.
    pub fn save_prefix_cache(&self, path: impl Into<PathBuf>) -> Result<usize> {
        self.check_alive()?;
        let engine_thread = *self
            ._exit_gate
            .done
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if engine_thread == Some(std::thread::current().id()) {
            // From the log callback: the engine thread would wait for itself.
            return Err(Error::InvalidArgument(
                "save_prefix_cache cannot be called from the engine's log callback".into(),
            ));
        }
        let (tx, rx) = channel::bounded(1);
        if self
            .commands
            .send(Command::SavePrefixCache(path.into(), tx))
            .is_err()
        {
            self.check_alive()?;
            return Err(Error::ShutDown);
        }
        match rx.recv() {
            Ok(result) => result,
            Err(_) => {
                self.check_alive()?;
                Err(Error::ShutDown)
            }
        }
    }

    /// Gives request `id` up: it is cancelled if still running, its unpolled events are
    /// dropped, and the id becomes unknown at once (pollers waiting on it get
    /// `UnknownRequest`). Use it for requests whose output is no longer wanted; a request
    /// that is neither polled to its end nor released stays held (see `max_requests`).
    /// Errors: `UnknownRequest`.
    pub fn release(&self, id: RequestId) -> Result<()> {
        if self.streams.release(id)? {
            // The engine thread may be gone (failed or shutting down): nothing left to stop.
            let _ = self.commands.send(Command::Cancel(id));
        }
        Ok(())
    }

    /// Requests held now (queued, running, or ended with events not yet polled).
    pub fn requests_held(&self) -> usize {
        self.streams.len()
    }

    /// Test hook: injects a failure on the engine thread at the next step boundary.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) -> Result<()> {
        self.commands
            .send(Command::Fault(fault))
            .map_err(|_| Error::ShutDown)
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> EngineStats {
        let mut stats = *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.requests_held = self.streams.len();
        stats
    }

    /// Submits and waits for the whole answer: (token ids, text, finish reason, stats).
    pub fn generate(&self, request: Request) -> Result<Completion> {
        let id = self.submit(request)?;
        let mut c = Completion::default();
        loop {
            match self.poll(id, Duration::from_secs(3600))? {
                Some(Event::Token { token, text, .. }) => {
                    c.tokens.push(token);
                    c.text.push_str(&text);
                }
                Some(Event::Finished {
                    reason,
                    text,
                    stats,
                    error,
                    ..
                }) => {
                    c.text.push_str(&text);
                    if let (FinishReason::Error, Some(e)) = (reason, &error) {
                        return Err(Error::EngineFailed(e.clone()));
                    }
                    c.reason = Some(reason);
                    c.stats = stats;
                    return Ok(c);
                }
                None => {}
            }
        }
    }
}

/// A finished generation (see [`Engine::generate`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: Option<FinishReason>,
    pub stats: RequestStats,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Formats the request log line for a finished request.
fn log_line(id: RequestId, reason: FinishReason, s: &RequestStats) -> String {
    let total_tps = if s.total_latency > 0.0 {
        (s.prompt_tokens + s.generated_tokens) as f64 / s.total_latency
    } else {
        0.0
    };
    format!(
        "request_id={id} prompt_tps={:.1} generation_tps={:.1} total_tps={:.1} total_tokens={} cached_tokens={} latency_ms={:.1} finish_reason={}",
        s.prompt_tps,
        s.generation_tps,
        total_tps,
        s.prompt_tokens + s.generated_tokens,
        s.cached_tokens,
        s.total_latency * 1e3,
        reason.as_str()
    )
}

struct Loop {
    sched: Scheduler,
    runner: MlxRunner,
    senders: HashMap<RequestId, Arc<Stream>>,
    shared: Arc<Shared>,
    log: Option<LogCallback>,
    tokenizer: Arc<Tokenizer>,
    finished: u64,
    /// The model's probe state for prefix-cache files (computed once, when first needed).
    probe: Option<Vec<f32>>,
}

impl Loop {
    fn probe(&mut self) -> Result<&[f32]> {
        if self.probe.is_none() {
            let model = &self.runner.model().model;
            self.probe = Some(crate::prefix_file::probe(model, kv_layout(model))?);
        }
        Ok(self.probe.as_deref().expect("set above"))
    }

    /// Loads a prefix-cache file into the (empty) cache; returns the entries adopted.
    fn load_prefix_cache(&mut self, path: &std::path::Path) -> Result<usize> {
        if !self.sched.prefix_index().enabled() {
            return Ok(0);
        }
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(Error::InvalidArgument(format!(
                    "prefix cache file {}: {e}",
                    path.display()
                )))
            }
            Ok(_) => {}
        }
        let model = &self.runner.model().model;
        let (layout, vocab) = (kv_layout(model), model.config.vocab_size);
        let probe = self.probe()?.to_vec();
        let entries = crate::prefix_file::load(path, layout, &probe, vocab)?;
        // Oldest first, as saved: the most recently used end up newest here too. The index
        // decides first which entries stay (and how much of each) within this engine's
        // budget; only those are read from the file (MLX loads lazily).
        let mut kept: Vec<(crate::prefix_cache::EntryId, usize, usize)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if let Some((id, len)) = self.sched.adopt_prefix(&mut self.runner, &e.tokens) {
                kept.push((id, i, len));
            }
        }
        let index = self.sched.prefix_index();
        kept.retain(|&(id, _, _)| index.tokens(id).is_some());
        let mut entries: Vec<Option<crate::prefix_file::SavedEntry>> =
            entries.into_iter().map(Some).collect();
        for &(id, i, len) in &kept {
            let e = entries[i].take().expect("each entry is adopted once");
            self.runner.put_prefix(id, e.kv, len)?;
        }
        Ok(kept.len())
    }

    fn save_prefix_cache(&mut self, path: &std::path::Path) -> Result<usize> {
        let model = &self.runner.model().model;
        let layout = kv_layout(model);
        let probe = self.probe()?.to_vec();
        let index = self.sched.prefix_index();
        let mut entries = Vec::new();
        for (id, tokens) in index.entries() {
            let kv = self
                .runner
                .prefix_kv(id)
                .ok_or_else(|| Error::EngineFailed(format!("prefix-cache entry {id} has no KV")))?;
            entries.push((tokens, kv));
        }
        crate::prefix_file::save(path, layout, &probe, &entries)?;
        Ok(entries.len())
    }
    /// Sends events to their requests. Stats are published first, so a caller that has seen
    /// a terminal event also sees it counted.
    fn deliver(&mut self, events: Vec<Event>) {
        self.finished += events
            .iter()
            .filter(|e| matches!(e, Event::Finished { .. }))
            .count() as u64;
        self.publish_stats();
        for e in events {
            let id = e.request_id();
            let Some(stream) = self.senders.get(&id) else {
                continue;
            };
            let line = match &e {
                Event::Finished { reason, stats, .. } => Some(log_line(id, *reason, stats)),
                Event::Token { .. } => None,
            };
            stream.push(e);
            if let Some(line) = line {
                self.senders.remove(&id);
                if let Some(log) = self
                    .log
                    .as_ref()
                    .filter(|_| !EXITING.load(Ordering::SeqCst))
                {
                    log(&line);
                }
            }
        }
    }

    /// Hands a submitted request to the scheduler, or ends it at once if refused.
    fn admit(&mut self, sub: Submission) {
        let Submission {
            id,
            prompt,
            request,
            constraint,
            events,
            at,
        } = sub;
        let eos = self.runner.model().tokenizer.eos_ids().to_vec();
        match self.sched.submit_constrained(
            id,
            prompt,
            request.sampling,
            request.stop,
            eos,
            at,
            constraint,
        ) {
            Ok(()) => {
                self.senders.insert(id, events);
            }
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                events.push(Event::Finished {
                    id,
                    reason: FinishReason::Error,
                    text: String::new(),
                    stats: RequestStats::default(),
                    error: Some(e.to_string()),
                });
            }
        }
    }

    /// Applies one command; returns false on shutdown.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(batch) => {
                for sub in batch {
                    self.admit(sub);
                }
            }
            Command::Cancel(id) => {
                self.sched.cancel(id);
            }
            Command::SavePrefixCache(path, reply) => {
                let _ = reply.send(self.save_prefix_cache(&path));
            }
            #[cfg(feature = "fault-injection")]
            Command::Fault(Fault::StepError) => {
                self.sched.reset_runner(&mut self.runner);
                let mut events = Vec::new();
                self.sched
                    .fail_active("MLX error: injected step failure", &mut events);
                self.deliver(events);
            }
            #[cfg(feature = "fault-injection")]
            Command::Fault(Fault::Panic) => panic!("injected engine-thread panic"),
            Command::Shutdown => return false,
            Command::Exit => {
                self.log = None;
                return false;
            }
        }
        true
    }

    fn publish_stats(&self) {
        let s: SchedulerStats = self.sched.stats();
        let mut out = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        *out = EngineStats {
            running: s.running + s.prefilling,
            prefilling: s.prefilling,
            waiting: s.waiting,
            kv_tokens: s.kv_tokens,
            kv_bytes: s.kv_bytes,
            peak_kv_bytes: s.peak_kv_bytes,
            requests_held: 0,
            steps: s.steps,
            tokens_generated: s.tokens_generated,
            requests_finished: self.finished,
            step_seconds: s.step_seconds,
            mlx_seconds: s.mlx_seconds,
            eval_seconds: s.eval_seconds,
            peak_memory_bytes: mlx_rs::memory::peak_memory().unwrap_or(0) as u64,
            active_memory_bytes: mlx_rs::memory::active_memory().unwrap_or(0) as u64,
            cache_memory_bytes: mlx_rs::memory::cache_memory().unwrap_or(0) as u64,
            prefix_cache_hits: s.prefix.hits,
            prefix_cache_hit_tokens: s.prefix.hit_tokens,
            prefix_cache_bytes: s.prefix.bytes,
            prefix_cache_entries: s.prefix.entries,
            prefix_cache_evictions: s.prefix.evictions,
        };
    }

    fn run(&mut self, commands: &Receiver<Command>) {
        loop {
            // Sleep until work arrives when idle; otherwise take what is there and step.
            if self.sched.is_idle() {
                // Idle: give MLX's buffer cache back to the system, so a host's memory returns
                // to its baseline between bursts (the next step re-allocates what it needs).
                let _ = mlx_rs::memory::clear_cache();
                self.publish_stats();
                match commands.recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if self.sched.is_idle() {
                continue;
            }
            let waiting_before = self.sched.waiting_len();
            let mut events = Vec::new();
            self.sched
                .step(&mut self.runner, &*self.tokenizer, &mut events);
            register_exit_hook(&EXIT_HOOK_AFTER_STEP);
            let left = waiting_before.saturating_sub(self.sched.waiting_len());
            self.shared.queued.fetch_sub(left, Ordering::SeqCst);
            self.deliver(events);
        }
    }
}

/// What the engine thread reports once the model is loaded.
struct Ready {
    tokenizer: Arc<Tokenizer>,
    context: usize,
    layout: KvLayout,
    info: ModelInfo,
}

fn engine_thread(
    path: PathBuf,
    config: EngineConfig,
    commands: Receiver<Command>,
    ready: Sender<Result<Ready>>,
    shared: Arc<Shared>,
    streams: Arc<Streams>,
) {
    // Dropped last, after the runner: compiled functions are freed before the thread reports
    // itself done (see `model::release_compiled_state`).
    struct ReleaseCompiled;
    impl Drop for ReleaseCompiled {
        fn drop(&mut self) {
            let _ = catch_unwind(model::release_compiled_state);
        }
    }
    let _release_compiled = ReleaseCompiled;
    // A first evaluation creates MLX's static objects (device, scheduler, allocator), and a
    // first compiled function those of its compiler and JIT; the exit hook registered after
    // them runs before their destructors.
    let _ = catch_unwind(|| {
        let one = mlx_rs::Array::from_f32(1.0);
        mlx_rs::ops::add(&one, &one).and_then(|two| two.eval())
    });
    if crate::backend() == "cpu" && config.tuning.fast_exp {
        let _ = catch_unwind(model::warm_up_compiler);
    }
    register_exit_hook(&EXIT_HOOK_AFTER_INIT);
    let loaded = catch_unwind(|| {
        model::load(
            &path,
            LoadOptions {
                weights: config.weights,
                fuse_projections: config.tuning.fuse_projections,
                fast_exp: config.tuning.fast_exp,
            },
        )
    });
    let lm = match loaded {
        Ok(Ok(lm)) => lm,
        Ok(Err(e)) => {
            let _ = ready.send(Err(e));
            return;
        }
        Err(_) => {
            let _ = ready.send(Err(Error::EngineFailed(
                "panic while loading the model".into(),
            )));
            return;
        }
    };
    // Held until this thread ends (dropped after the runner). Best effort: a failure here
    // costs speed, not correctness.
    let _cache_limit = (crate::backend() == "cpu" && config.tuning.mlx_cache_limit_bytes > 0)
        .then(|| crate::runner::raise_cache_limit(config.tuning.mlx_cache_limit_bytes).ok())
        .flatten();
    let context = lm.model.config.max_position_embeddings;
    let layout = kv_layout(&lm.model);
    let tokenizer = lm.tokenizer.clone();
    let c = &lm.model.config;
    let info = ModelInfo {
        name: lm.name.clone(),
        architecture: c.architecture.as_str().into(),
        context_length: context,
        vocab_size: tokenizer.vocab_size(),
        eos_token_ids: tokenizer.eos_ids().to_vec(),
        bos_token_id: tokenizer.bos_id(),
        has_chat_template: tokenizer.has_chat_template(),
        weight_dtype: lm.model.weight_dtype(),
        backend: crate::backend().into(),
        num_layers: c.num_layers,
        hidden_size: c.hidden_size,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
    };
    let mut sched_cfg = config.scheduler.clone();
    sched_cfg.max_context = sched_cfg.max_context.min(context).max(2);
    let mut state = Loop {
        sched: Scheduler::new(sched_cfg, layout.clone()),
        runner: {
            let mut lm = lm;
            lm.model
                .set_copy_free_decode_attention(config.tuning.copy_free_attention);
            if !config.tuning.rows_matmul {
                lm.model.set_rows_matmul(false);
            }
            if !config.tuning.pad_matmul_rows {
                lm.model.set_pad_matmul_rows(false);
            }
            let mut runner = MlxRunner::new(lm);
            runner.set_pipelining(config.tuning.decode_ahead);
            runner.set_pipelining_at_join(config.tuning.decode_ahead_at_join);
            runner
        },
        senders: HashMap::new(),
        shared: shared.clone(),
        log: config.log.clone(),
        tokenizer: tokenizer.clone(),
        finished: 0,
        probe: None,
    };
    if let Some(file) = &config.prefix_cache_file {
        let loaded = catch_unwind(AssertUnwindSafe(|| state.load_prefix_cache(file)));
        let failed = match loaded {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(Error::EngineFailed(
                "panic while loading the prefix cache".into(),
            )),
        };
        if let Some(e) = failed {
            drop(state);
            let _ = ready.send(Err(e));
            return;
        }
    }
    state.publish_stats();
    let _ = ready.send(Ok(Ready {
        tokenizer,
        context,
        layout,
        info,
    }));
    let outcome = catch_unwind(AssertUnwindSafe(|| state.run(&commands)));
    let mut events = Vec::new();
    let (reason, message) = match outcome {
        Ok(()) => (FinishReason::Cancelled, None),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let msg = format!("engine thread panicked: {msg}");
            *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
            (FinishReason::Error, Some(msg))
        }
    };
    // Scheduler-side requests end with their stats; then every stream still open (requests
    // whose submit command was never processed, or a delivery cut short by a panic) ends here,
    // and no new request is accepted. Every request ends exactly once.
    let ended = catch_unwind(AssertUnwindSafe(|| {
        state.sched.end_all(reason, message.as_deref(), &mut events);
        state.deliver(events);
    }));
    if ended.is_err() && message.is_none() {
        *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) =
            Some("engine thread panicked while shutting down".into());
    }
    streams.close_all(reason, message.as_deref());
    drop(commands);
}

// Hosts share one engine between threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
};
