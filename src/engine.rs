//! The public safe API: an [`Engine`] owns a background thread that owns every MLX object
//! (model, caches, runner) and runs the [`Scheduler`] step by step.
//!
//! Host calls never touch MLX and never wait for model computation: `submit` tokenizes on the
//! caller's thread (the tokenizer is thread-safe), checks limits, and queues; `poll` waits on
//! the request's own event channel for at most the caller's timeout; `cancel` takes effect at
//! the next step boundary. With no work the thread blocks on its command channel (no spinning).
//! A panic on the engine thread is caught: running requests end with an error event and the
//! engine enters a failed state that every later call reports.
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::error::{Error, Result};
use crate::model::{self, LoadOptions, WeightsPolicy};
use crate::request::{Event, FinishReason, Prompt, Request, RequestId, RequestStats};
use crate::runner::MlxRunner;
use crate::scheduler::{BatchMode, Scheduler, SchedulerConfig, SchedulerStats};
use crate::tokenizer::Tokenizer;

/// Receives one line per finished request (the request log).
pub type LogCallback = Arc<dyn Fn(&str) + Send + Sync>;

/// Engine configuration. `Default` gives continuous batching with 8 rows.
#[derive(Clone, Default)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub weights: WeightsPolicy,
    /// Called on the engine thread for every finished request; keep it quick.
    pub log: Option<LogCallback>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("scheduler", &self.scheduler)
            .field("weights", &self.weights)
            .field("log", &self.log.is_some())
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
        if s.prefill_chunk == 0 || s.max_prefill_group == 0 {
            return bad("prefill_chunk and max_prefill_group must be at least 1");
        }
        if s.max_kv_tokens < 2 {
            return bad("max_kv_tokens must be at least 2");
        }
        Ok(())
    }
}

/// Engine-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_tokens: usize,
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
}

enum Command {
    Submit {
        id: RequestId,
        prompt: Vec<u32>,
        request: Request,
        events: Sender<Event>,
        at: Instant,
    },
    Cancel(RequestId),
    Fault(Fault),
    Shutdown,
}

/// Failures the tests inject to check the engine's failure paths (see
/// [`Engine::inject_fault`]).
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

/// Receiving ends of live requests' event channels.
type Streams = Mutex<HashMap<RequestId, Receiver<Event>>>;

/// An inference engine on one model. `Send + Sync`: share it between threads by reference or
/// `Arc`. Dropping it ends in-flight requests (cancelled) and joins the thread.
pub struct Engine {
    commands: Sender<Command>,
    shared: Arc<Shared>,
    streams: Streams,
    tokenizer: Arc<Tokenizer>,
    next_id: AtomicU64,
    config: SchedulerConfig,
    context_length: usize,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Loads the model at `path` (a `.gguf` file or a model folder) on a new engine thread.
    /// Blocks until the model is loaded.
    pub fn new(path: impl Into<PathBuf>, config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let path = path.into();
        let (tx, rx) = channel::unbounded::<Command>();
        let (ready_tx, ready_rx) = channel::bounded::<Result<(Arc<Tokenizer>, usize)>>(1);
        let shared = Arc::new(Shared {
            failed: Mutex::new(None),
            stats: Mutex::new(EngineStats::default()),
            queued: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        let thread_config = config.clone();
        let thread = std::thread::Builder::new()
            .name("convoy-engine".into())
            .spawn(move || engine_thread(path, thread_config, rx, ready_tx, thread_shared))
            .map_err(|e| Error::EngineFailed(format!("cannot spawn the engine thread: {e}")))?;
        let (tokenizer, model_context) = match ready_rx.recv() {
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
            streams: Mutex::new(HashMap::new()),
            tokenizer,
            next_id: AtomicU64::new(1),
            context_length: sched.max_context,
            config: sched,
            thread: Some(thread),
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
    /// requests are already queued, `PromptTooLong`, `InvalidArgument`, `EngineFailed`.
    pub fn submit(&self, request: Request) -> Result<RequestId> {
        self.check_alive()?;
        let prompt = self.prompt_tokens(&request.prompt)?;
        // Same checks the scheduler makes, answered here without a round trip.
        self.config
            .check(prompt.len(), &request.stop, &request.sampling)?;
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.config.max_waiting {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Busy(queued));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel::unbounded();
        self.lock_streams().insert(id, rx);
        let cmd = Command::Submit {
            id,
            prompt,
            request,
            events: tx,
            at: Instant::now(),
        };
        if self.commands.send(cmd).is_err() {
            self.lock_streams().remove(&id);
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            self.check_alive()?;
            return Err(Error::ShutDown);
        }
        Ok(id)
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Receiver<Event>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for the request's next event. `Ok(None)` on timeout. After the
    /// terminal event has been returned, the id is unknown (`UnknownRequest`).
    pub fn poll(&self, id: RequestId, timeout: Duration) -> Result<Option<Event>> {
        let rx = self
            .lock_streams()
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownRequest(id))?;
        let event = match rx.recv_timeout(timeout) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => return Ok(None),
            // The engine thread went away without a terminal event: report one.
            Err(RecvTimeoutError::Disconnected) => Event::Finished {
                id,
                reason: FinishReason::Error,
                text: String::new(),
                stats: RequestStats::default(),
                error: Some(
                    self.check_alive()
                        .err()
                        .map_or("engine stopped".into(), |e| e.to_string()),
                ),
            },
        };
        if matches!(event, Event::Finished { .. }) {
            self.lock_streams().remove(&id);
        }
        Ok(Some(event))
    }

    /// Asks for a request to end; it ends with `Cancelled` at the next step boundary (its
    /// terminal event still arrives through `poll`). Cancelling a request whose terminal
    /// event is already queued is harmless.
    pub fn cancel(&self, id: RequestId) -> Result<()> {
        if !self.lock_streams().contains_key(&id) {
            return Err(Error::UnknownRequest(id));
        }
        self.commands
            .send(Command::Cancel(id))
            .map_err(|_| Error::ShutDown)
    }

    /// Test hook: injects a failure on the engine thread at the next step boundary.
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) -> Result<()> {
        self.commands
            .send(Command::Fault(fault))
            .map_err(|_| Error::ShutDown)
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> EngineStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
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
        "request_id={id} prompt_tps={:.1} generation_tps={:.1} total_tps={:.1} total_tokens={} latency_ms={:.1} finish_reason={}",
        s.prompt_tps,
        s.generation_tps,
        total_tps,
        s.prompt_tokens + s.generated_tokens,
        s.total_latency * 1e3,
        reason.as_str()
    )
}

struct Loop {
    sched: Scheduler,
    runner: MlxRunner,
    senders: HashMap<RequestId, Sender<Event>>,
    shared: Arc<Shared>,
    log: Option<LogCallback>,
    tokenizer: Arc<Tokenizer>,
    finished: u64,
}

impl Loop {
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
            let Some(tx) = self.senders.get(&id) else {
                continue;
            };
            let _ = tx.send(e.clone());
            if let Event::Finished { reason, stats, .. } = &e {
                self.senders.remove(&id);
                if let Some(log) = &self.log {
                    log(&log_line(id, *reason, stats));
                }
            }
        }
    }

    /// Applies one command; returns false on shutdown.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit {
                id,
                prompt,
                request,
                events,
                at,
            } => {
                let eos = self.runner.model().tokenizer.eos_ids().to_vec();
                match self
                    .sched
                    .submit(id, prompt, request.sampling, request.stop, eos, at)
                {
                    Ok(()) => {
                        self.senders.insert(id, events);
                    }
                    Err(e) => {
                        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                        let _ = events.send(Event::Finished {
                            id,
                            reason: FinishReason::Error,
                            text: String::new(),
                            stats: RequestStats::default(),
                            error: Some(e.to_string()),
                        });
                    }
                }
            }
            Command::Cancel(id) => {
                self.sched.cancel(id);
            }
            Command::Fault(Fault::StepError) => {
                use crate::scheduler::Runner;
                self.runner.reset();
                let mut events = Vec::new();
                self.sched
                    .fail_active("MLX error: injected step failure", &mut events);
                self.deliver(events);
            }
            Command::Fault(Fault::Panic) => panic!("injected engine-thread panic"),
            Command::Shutdown => return false,
        }
        true
    }

    fn publish_stats(&self) {
        let s: SchedulerStats = self.sched.stats();
        let mut out = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        *out = EngineStats {
            running: s.running + s.prefilling,
            waiting: s.waiting,
            kv_tokens: s.kv_tokens,
            steps: s.steps,
            tokens_generated: s.tokens_generated,
            requests_finished: self.finished,
            step_seconds: s.step_seconds,
            mlx_seconds: s.mlx_seconds,
            eval_seconds: s.eval_seconds,
            peak_memory_bytes: mlx_rs::memory::peak_memory().unwrap_or(0) as u64,
        };
    }

    fn run(&mut self, commands: &Receiver<Command>) {
        loop {
            // Sleep until work arrives when idle; otherwise take what is there and step.
            if self.sched.is_idle() {
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
            let left = waiting_before.saturating_sub(self.sched.waiting_len());
            self.shared.queued.fetch_sub(left, Ordering::SeqCst);
            self.deliver(events);
        }
    }
}

fn engine_thread(
    path: PathBuf,
    config: EngineConfig,
    commands: Receiver<Command>,
    ready: Sender<Result<(Arc<Tokenizer>, usize)>>,
    shared: Arc<Shared>,
) {
    let loaded = catch_unwind(|| {
        model::load(
            &path,
            LoadOptions {
                weights: config.weights,
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
    let context = lm.model.config.max_position_embeddings;
    let tokenizer = lm.tokenizer.clone();
    let mut sched_cfg = config.scheduler.clone();
    sched_cfg.max_context = sched_cfg.max_context.min(context).max(2);
    let mut state = Loop {
        sched: Scheduler::new(sched_cfg),
        runner: MlxRunner::new(lm),
        senders: HashMap::new(),
        shared: shared.clone(),
        log: config.log.clone(),
        tokenizer: tokenizer.clone(),
        finished: 0,
    };
    let _ = ready.send(Ok((tokenizer, context)));
    let outcome = catch_unwind(AssertUnwindSafe(|| state.run(&commands)));
    let mut events = Vec::new();
    match outcome {
        Ok(()) => state
            .sched
            .end_all(FinishReason::Cancelled, None, &mut events),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let msg = format!("engine thread panicked: {msg}");
            *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
            state
                .sched
                .end_all(FinishReason::Error, Some(&msg), &mut events);
        }
    }
    state.deliver(events);
    // Requests still in the channel get their terminal event from `poll` (disconnected).
}

// Hosts share one engine between threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
};
