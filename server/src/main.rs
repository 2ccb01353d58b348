//! convoy-server: an OpenAI-compatible HTTP server on convoy's public Rust API.
//!
//! `POST /v1/chat/completions` and `POST /v1/completions` (SSE streaming or whole answers),
//! `GET /v1/models`, `GET /health`, `GET /metrics`. Every connection's requests go to one
//! engine and share its running batch. HTTP is axum on hyper and tokio; the engine's
//! blocking event API is bridged by one thread ([`bridge`]).
mod api;
mod bridge;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use convoy::{Engine, EngineConfig, Error, Event, FinishReason, RequestStats};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};

use api::{Defaults, Invalid, Kind};
use bridge::{Bridge, Submitted};
use metrics::Metrics;

/// An OpenAI-compatible HTTP server for convoy.
#[derive(Parser, Debug)]
#[command(name = "convoy-server", version)]
struct Args {
    /// The model: a .gguf file or a model folder.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model id clients see in /v1/models and responses (default: the model's file or
    /// folder name, without `.gguf`).
    #[arg(long)]
    model_name: Option<String>,
    /// Most requests decoded together.
    #[arg(long, default_value_t = 8)]
    max_batch_size: usize,
    /// Most requests waiting for a batch slot; beyond it requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Context length requests are held to (default: the model's, at most 8192).
    #[arg(long)]
    max_context: Option<usize>,
    /// Most bytes the running batch's KV cache may take.
    #[arg(long)]
    max_kv_bytes: Option<usize>,
    /// Prompt tokens prefilled per engine step.
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Prefix cache budget in bytes (0: off).
    #[arg(long)]
    prefix_cache_bytes: Option<usize>,
    /// A .safetensors prefix cache loaded at start (if it exists) and saved at shutdown.
    #[arg(long)]
    prefix_cache_file: Option<PathBuf>,
    /// max_tokens of requests that do not say.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Temperature of requests that do not say (0: greedy, as mlx-lm's server).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Do not print a line per finished request on stderr.
    #[arg(long)]
    quiet: bool,
}

struct App {
    bridge: Arc<Bridge>,
    metrics: Arc<Metrics>,
    model: String,
    defaults: Defaults,
    /// Unix time at start; with the engine's request id it makes response ids unique.
    started: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn main() {
    let args = Args::parse();
    if let Err(message) = run(args) {
        eprintln!("convoy-server: {message}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let mut config = EngineConfig::default();
    let s = &mut config.scheduler;
    s.max_batch_size = args.max_batch_size;
    s.max_waiting = args.max_waiting;
    if let Some(v) = args.max_context {
        s.max_context = v;
    }
    if let Some(v) = args.max_kv_bytes {
        s.max_kv_bytes = v;
    }
    if let Some(v) = args.prefill_chunk {
        s.prefill_chunk = v;
    }
    if let Some(v) = args.prefix_cache_bytes {
        s.prefix_cache_bytes = v;
    }
    // Every event is taken by the server as it comes, so held requests are those in flight.
    config.max_requests = args
        .max_waiting
        .saturating_add(args.max_batch_size)
        .max(1024);
    config.prefix_cache_file = args.prefix_cache_file.clone();
    if !args.quiet {
        // The request log, one line per request (request id, prompt and generation tokens/s,
        // total tokens, cached tokens, latency, finish reason).
        config.log = Some(Arc::new(|line: &str| eprintln!("{line}")));
    }
    let engine = Arc::new(
        Engine::new(&args.model, config)
            .map_err(|e| format!("cannot load {}: {e}", args.model.display()))?,
    );
    let model = args
        .model_name
        .clone()
        .or_else(|| {
            let path = args
                .model
                .canonicalize()
                .unwrap_or_else(|_| args.model.clone());
            let name = path.file_name()?.to_string_lossy().into_owned();
            Some(
                name.strip_suffix(".gguf")
                    .map(str::to_owned)
                    .unwrap_or(name),
            )
        })
        .unwrap_or_else(|| engine.model_info().name.clone());
    let metrics = Arc::new(Metrics::new(engine.clone()));
    let (bridge, events_thread) = Bridge::start(engine.clone(), metrics.clone());
    let app = Arc::new(App {
        bridge: bridge.clone(),
        metrics,
        model,
        defaults: Defaults {
            max_tokens: args.max_tokens,
            temperature: args.temperature,
        },
        started: now(),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("convoy-server-http")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(serve(&args, app))?;

    // Every connection has closed: in-flight requests finished or were cancelled.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !events_thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(path) = &args.prefix_cache_file {
        match engine.save_prefix_cache(path) {
            Ok(n) => eprintln!(
                "convoy-server: saved {n} prefix cache entries to {}",
                path.display()
            ),
            Err(e) => eprintln!("convoy-server: could not save the prefix cache: {e}"),
        }
    }
    eprintln!("convoy-server: stopped");
    Ok(())
}

async fn serve(args: &Args, app: Arc<App>) -> Result<(), String> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line for the port.
    println!(
        "convoy-server: listening on http://{local} (model {})",
        app.model
    );
    let bridge = app.bridge.clone();
    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(app);
    let (stopped_tx, mut stopped_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown_signal().await;
        eprintln!("convoy-server: shutting down: cancelling requests in flight");
        bridge.stop();
        let _ = stopped_tx.send(true);
    });
    // Cancelled streams end within a step, but a client that stops reading can hold its
    // connection open: after SHUTDOWN_GRACE, or at a second signal, stop waiting for it.
    let deadline = async move {
        let _ = stopped_rx.wait_for(|stopped| *stopped).await;
        tokio::select! {
            _ = tokio::time::sleep(SHUTDOWN_GRACE) => {},
            _ = shutdown_signal() => {},
        }
    };
    tokio::select! {
        result = server => result.map_err(|e| format!("server error: {e}")),
        _ = deadline => {
            eprintln!("convoy-server: closing the connections still open");
            Ok(())
        }
    }
}

/// How long a shutdown waits for connections to close after cancelling their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// An OpenAI-style error answer.
fn error_body(
    status: StatusCode,
    kind: &str,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    });
    (status, Json(body)).into_response()
}

impl App {
    fn invalid(&self, e: Invalid) -> Response {
        self.metrics.http_error(400);
        error_body(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &e.message,
            e.param.as_deref(),
            None,
        )
    }

    /// Maps an engine error to an HTTP answer.
    fn engine_error(&self, e: Error) -> Response {
        let message = e.to_string();
        let (status, kind, code) = match &e {
            Error::PromptTooLong { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            Error::InvalidArgument(_) | Error::Template(_) | Error::Tokenizer(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Error::Busy(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("overloaded"),
            ),
            Error::ShutDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("shutting_down"),
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        self.metrics.http_error(status.as_u16());
        let mut response = error_body(status, kind, &message, None, code);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    generate(app, Kind::Chat, body).await
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    generate(app, Kind::Completion, body).await
}

async fn generate(app: Arc<App>, kind: Kind, body: Bytes) -> Response {
    let parsed = match api::parse(&body).and_then(|b| b.into_request(kind, app.defaults)) {
        Ok(p) => p,
        Err(e) => return app.invalid(e),
    };
    // Tokenizing and rendering the chat template are CPU work: off the async workers' hands.
    let submitted = match tokio::task::block_in_place(|| app.bridge.submit(parsed.request)) {
        Ok(s) => s,
        Err(e) => return app.engine_error(e),
    };
    let reply = Reply {
        kind,
        id: format!(
            "{}-{:x}-{}",
            match kind {
                Kind::Chat => "chatcmpl",
                Kind::Completion => "cmpl",
            },
            app.started,
            submitted.id
        ),
        created: now(),
        model: app.model.clone(),
    };
    if parsed.stream {
        stream_reply(reply, submitted, parsed.include_usage).into_response()
    } else {
        whole_reply(&app, reply, submitted).await
    }
}

/// What every chunk or answer of one request carries.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

fn finish_str(reason: FinishReason) -> &'static str {
    reason.as_str()
}

fn usage(s: &RequestStats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

impl Reply {
    fn object(&self, streaming: bool) -> &'static str {
        match (self.kind, streaming) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// A streamed chunk: text (chat: a delta, `role` in the first), and the finish reason in
    /// the last.
    fn chunk(
        &self,
        text: Option<&str>,
        first: bool,
        finish: Option<&str>,
        usage_field: bool,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let mut v = json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        });
        if usage_field {
            v["usage"] = Value::Null;
        }
        v
    }

    fn usage_chunk(&self, s: &RequestStats) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [], "usage": usage(s),
        })
    }

    fn whole(&self, text: &str, reason: FinishReason, s: &RequestStats) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": finish_str(reason),
            }),
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish_str(reason),
            }),
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created,
            "model": self.model, "choices": [choice], "usage": usage(s),
        })
    }
}

/// Why a request ended without an answer, as an error object.
fn ended_badly(reason: FinishReason, error: Option<String>) -> (StatusCode, Value) {
    let (status, message, code) = match reason {
        FinishReason::Cancelled => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the request was cancelled: the server is shutting down".to_string(),
            "cancelled",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the engine failed: {}", error.unwrap_or_default()),
            "engine_error",
        ),
    };
    (
        status,
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}}),
    )
}

fn engine_stopped() -> (StatusCode, Value) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"error": {"message": "the engine stopped before the request ended",
                          "type": "server_error", "param": null, "code": "engine_error"}}),
    )
}

async fn whole_reply(app: &App, reply: Reply, mut submitted: Submitted) -> Response {
    let mut text = String::new();
    loop {
        match submitted.events.recv().await {
            Some(Event::Token { text: t, .. }) => text.push_str(&t),
            Some(Event::Finished {
                reason,
                text: t,
                stats,
                error,
                ..
            }) => {
                submitted.finished();
                text.push_str(&t);
                if matches!(reason, FinishReason::Length | FinishReason::Stop) {
                    return Json(reply.whole(&text, reason, &stats)).into_response();
                }
                let (status, body) = ended_badly(reason, error);
                app.metrics.http_error(status.as_u16());
                return (status, Json(body)).into_response();
            }
            None => {
                submitted.finished();
                let (status, body) = engine_stopped();
                app.metrics.http_error(status.as_u16());
                return (status, Json(body)).into_response();
            }
        }
    }
}

/// The SSE answer: a chunk per token that completes text, a last chunk with the finish
/// reason, the usage chunk if asked for, then `[DONE]`, exactly once. Dropping the stream
/// (the client went away) cancels the request.
fn stream_reply(
    reply: Reply,
    submitted: Submitted,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    struct St {
        reply: Reply,
        submitted: Submitted,
        include_usage: bool,
        first: bool,
        queue: std::collections::VecDeque<SseEvent>,
        done: bool,
    }
    let data = |v: &Value| SseEvent::default().data(v.to_string());
    let st = St {
        reply,
        submitted,
        include_usage,
        first: true,
        queue: Default::default(),
        done: false,
    };
    let events = stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            let usage_field = st.include_usage;
            match st.submitted.events.recv().await {
                Some(Event::Token { text, .. }) => {
                    // Chat: the first chunk carries the role (and no text yet), as OpenAI's.
                    if st.first && st.reply.kind == Kind::Chat {
                        st.queue.push_back(data(&st.reply.chunk(
                            Some(""),
                            true,
                            None,
                            usage_field,
                        )));
                    }
                    st.first = false;
                    if !text.is_empty() {
                        st.queue.push_back(data(&st.reply.chunk(
                            Some(&text),
                            false,
                            None,
                            usage_field,
                        )));
                    }
                }
                Some(Event::Finished {
                    reason,
                    text,
                    stats,
                    error,
                    ..
                }) => {
                    st.submitted.finished();
                    st.done = true;
                    if matches!(reason, FinishReason::Length | FinishReason::Stop) {
                        let first = st.first && st.reply.kind == Kind::Chat;
                        let text = (!text.is_empty()).then_some(text.as_str());
                        if first || text.is_some() {
                            st.queue.push_back(data(&st.reply.chunk(
                                text.or(Some("")),
                                first,
                                None,
                                usage_field,
                            )));
                        }
                        let last =
                            st.reply
                                .chunk(None, false, Some(finish_str(reason)), usage_field);
                        st.queue.push_back(data(&last));
                        if st.include_usage {
                            st.queue.push_back(data(&st.reply.usage_chunk(&stats)));
                        }
                    } else {
                        st.queue.push_back(data(&ended_badly(reason, error).1));
                    }
                    st.queue.push_back(SseEvent::default().data("[DONE]"));
                }
                None => {
                    st.submitted.finished();
                    st.done = true;
                    st.queue.push_back(data(&engine_stopped().1));
                    st.queue.push_back(SseEvent::default().data("[DONE]"));
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.model, "object": "model", "created": app.started, "owned_by": "convoy"}],
    }))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.bridge.stopping() {
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
            None,
            Some("shutting_down"),
        );
    }
    match app.bridge.engine().health() {
        Ok(()) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            &e.to_string(),
            None,
            None,
        ),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
        None,
        Some("not_found"),
    )
}
