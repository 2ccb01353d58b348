//! Exported functions: engine life cycle, submit, poll, cancel, stats.
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::time::Duration;

use super::types::*;
use super::{
    arg, array_arg, convoy_status, copy_out_str, fail, guard, init_sized, out_arg, out_sized,
    read_sized, slice_arg, str_arg, write_sized, Failure,
};
use crate::engine::Engine;
use crate::request::{Event, Prompt, Request};
use crate::tokenizer::ChatMessage;

/// An inference engine: a model plus the background thread that runs it. Opaque.
pub struct convoy_engine {
    inner: Engine,
    /// Backing storage of `convoy_model_info`'s strings and EOS array.
    info: InfoStrings,
}

struct InfoStrings {
    name: CString,
    architecture: CString,
    weight_dtype: CString,
    backend: CString,
    eos: Vec<u32>,
}

impl InfoStrings {
    fn new(engine: &Engine) -> Self {
        let i = engine.model_info();
        let c = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
        Self {
            name: c(&i.name),
            architecture: c(&i.architecture),
            weight_dtype: c(&i.weight_dtype),
            backend: c(&i.backend),
            eos: i.eos_token_ids.clone(),
        }
    }
}

/// Fills `*config` (a struct of `struct_size` bytes: pass `sizeof(convoy_engine_config)`)
/// with the defaults: continuous batching, 8 rows, the model's context. Returns OK,
/// NULL_POINTER, or INVALID_ARGUMENT (a size below 4).
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_config_init(
    config: *mut convoy_engine_config,
    struct_size: usize,
) -> convoy_status {
    guard(|| {
        init_sized(
            config,
            struct_size,
            convoy_engine_config::default(),
            "config",
        )
    })
}

/// Fills `*params` (pass `sizeof(convoy_request_params)` as `struct_size`) with the
/// defaults: greedy decoding, max_tokens 256, no stop strings. Returns OK, NULL_POINTER or
/// INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn convoy_request_params_init(
    params: *mut convoy_request_params,
    struct_size: usize,
) -> convoy_status {
    guard(|| {
        init_sized(
            params,
            struct_size,
            convoy_request_params::default(),
            "params",
        )
    })
}

/// Prepares `*event` (pass `sizeof(convoy_event)`) for the poll functions: sets
/// `struct_size`, zeros the rest. Returns OK, NULL_POINTER or INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn convoy_event_init(
    event: *mut convoy_event,
    struct_size: usize,
) -> convoy_status {
    guard(|| init_sized(event, struct_size, empty_event(), "event"))
}

/// Prepares `*stats` (pass `sizeof(convoy_engine_stats)`) for `convoy_engine_get_stats`.
/// Returns OK, NULL_POINTER or INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_stats_init(
    stats: *mut convoy_engine_stats,
    struct_size: usize,
) -> convoy_status {
    guard(|| init_sized(stats, struct_size, convoy_engine_stats::default(), "stats"))
}

/// Prepares `*info` (pass `sizeof(convoy_model_info)`) for `convoy_engine_model_info`.
/// Returns OK, NULL_POINTER or INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn convoy_model_info_init(
    info: *mut convoy_model_info,
    struct_size: usize,
) -> convoy_status {
    guard(|| init_sized(info, struct_size, empty_info(), "info"))
}

/// Fills `*message` (pass `sizeof(convoy_chat_message)`) with `role` and `content` (stored
/// as given, not copied: they must stay valid while the message is used). Returns OK,
/// NULL_POINTER or INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn convoy_chat_message_init(
    message: *mut convoy_chat_message,
    struct_size: usize,
    role: *const c_char,
    content: *const c_char,
) -> convoy_status {
    guard(|| {
        let value = convoy_chat_message {
            struct_size: std::mem::size_of::<convoy_chat_message>() as u32,
            role,
            content,
        };
        init_sized(message, struct_size, value, "message")
    })
}

fn empty_event() -> convoy_event {
    convoy_event {
        struct_size: std::mem::size_of::<convoy_event>() as u32,
        kind: convoy_event_kind::Token,
        request_id: 0,
        token: 0,
        text: c"".as_ptr(),
        text_len: 0,
        finish_reason: convoy_finish_reason::None,
        stats: std::ptr::null(),
        error: c"".as_ptr(),
        has_logprobs: false,
        logprob: 0.0,
        top_tokens: std::ptr::null(),
        top_logprobs: std::ptr::null(),
        n_top: 0,
    }
}

fn empty_info() -> convoy_model_info {
    convoy_model_info {
        struct_size: std::mem::size_of::<convoy_model_info>() as u32,
        context_length: 0,
        name: c"".as_ptr(),
        architecture: c"".as_ptr(),
        vocab_size: 0,
        has_bos_token: false,
        bos_token_id: 0,
        eos_token_ids: std::ptr::null(),
        n_eos_token_ids: 0,
        has_chat_template: false,
        weight_dtype: c"".as_ptr(),
        backend: c"".as_ptr(),
        num_layers: 0,
        hidden_size: 0,
        num_heads: 0,
        num_kv_heads: 0,
        max_context: 0,
    }
}

/// Loads a model and starts an engine on it. Blocks while the model loads (seconds).
///
/// - `model_path` (in): NUL-terminated UTF-8 path to a `.gguf` file or an MLX/Hugging Face
///   model folder.
/// - `config` (in, may be NULL for the defaults): read during the call only.
/// - `out_engine` (out): receives the engine on success; untouched on failure. Free it with
///   `convoy_engine_destroy`.
///
/// Returns OK, NULL_POINTER, INVALID_UTF8, INVALID_ARGUMENT (config values), MODEL_NOT_FOUND,
/// CORRUPT_MODEL, UNSUPPORTED_MODEL, TOKENIZER_ERROR, TEMPLATE_ERROR, MLX_ERROR, PANIC.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_create(
    model_path: *const c_char,
    config: *const convoy_engine_config,
    out_engine: *mut *mut convoy_engine,
) -> convoy_status {
    guard(|| {
        let path = str_arg(model_path, "model_path")?;
        let out_engine = out_arg(out_engine, "out_engine")?;
        let config = if config.is_null() {
            convoy_engine_config::default()
        } else {
            read_sized(config, convoy_engine_config::default(), "config")?
        };
        let mut engine_config = config.to_engine_config()?;
        if !config.prefix_cache_path.is_null() {
            engine_config.prefix_cache_file =
                Some(str_arg(config.prefix_cache_path, "prefix_cache_path")?.into());
        }
        let engine = Engine::new(path, engine_config)?;
        let info = InfoStrings::new(&engine);
        out_engine.write(Box::into_raw(Box::new(convoy_engine {
            inner: engine,
            info,
        })));
        Ok(())
    })
}

/// Stops the engine and frees it. Requests still running end (their remaining events are
/// discarded); returns within about one engine step. NULL is a no-op. `engine` must not be
/// used by any thread during or after this call.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_destroy(engine: *mut convoy_engine) {
    if !engine.is_null() {
        let _ =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(engine))));
    }
}

unsafe fn submit(
    engine: *const convoy_engine,
    params: *const convoy_request_params,
    out_id: *mut u64,
    prompt: impl FnOnce() -> Result<Prompt, Failure>,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let out_id = out_arg(out_id, "out_id")?;
        let (sampling, stop, constraint) = convoy_request_params::read(params)?;
        let id = engine.inner.submit(Request {
            prompt: prompt()?,
            sampling,
            stop,
            constraint,
        })?;
        out_id.write(id);
        Ok(())
    })
}

/// Submits a text prompt (tokenized as is; BOS added if the model wants one).
///
/// - `prompt` (in): NUL-terminated UTF-8.
/// - `params` (in, may be NULL for the defaults): read during the call only.
/// - `out_id` (out): the request id on success (ids start at 1 and are never reused within
///   an engine).
///
/// Returns at once (never waits for the model): OK, NULL_POINTER, INVALID_UTF8,
/// INVALID_ARGUMENT, BUSY (queue full: retry later), PROMPT_TOO_LONG, TOKENIZER_ERROR,
/// ENGINE_FAILED, SHUT_DOWN, PANIC. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_submit_text(
    engine: *const convoy_engine,
    prompt: *const c_char,
    params: *const convoy_request_params,
    out_id: *mut u64,
) -> convoy_status {
    submit(engine, params, out_id, || {
        Ok(Prompt::Text(str_arg(prompt, "prompt")?.to_owned()))
    })
}

/// Submits a prompt given as token ids (`n_tokens` >= 1 ids below the vocabulary size).
/// Same parameters, statuses and threading as `convoy_engine_submit_text`.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_submit_tokens(
    engine: *const convoy_engine,
    tokens: *const u32,
    n_tokens: usize,
    params: *const convoy_request_params,
    out_id: *mut u64,
) -> convoy_status {
    submit(engine, params, out_id, || {
        Ok(Prompt::Tokens(
            slice_arg(tokens, n_tokens, "tokens")?.to_vec(),
        ))
    })
}

/// Submits a chat, rendered with the model's chat template and its generation prompt.
/// `messages` holds `n_messages` (>= 1) messages, read during the call only. Same statuses as
/// `convoy_engine_submit_text`, plus TEMPLATE_ERROR. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_submit_chat(
    engine: *const convoy_engine,
    messages: *const convoy_chat_message,
    n_messages: usize,
    params: *const convoy_request_params,
    out_id: *mut u64,
) -> convoy_status {
    submit(engine, params, out_id, || {
        Ok(Prompt::Chat(read_messages(messages, n_messages)?))
    })
}

/// Sets `*request` (pass `sizeof(convoy_batch_request)`) to an empty batch request: no
/// prompt, default parameters, bytes past the fields this library knows zeroed, and
/// `struct_size` set to the size passed (an array's stride). Returns OK, NULL_POINTER, or
/// INVALID_ARGUMENT (size below 4).
#[no_mangle]
pub unsafe extern "C" fn convoy_batch_request_init(
    request: *mut convoy_batch_request,
    struct_size: usize,
) -> convoy_status {
    guard(|| init_sized(request, struct_size, empty_batch_request(), "request"))
}

fn empty_batch_request() -> convoy_batch_request {
    convoy_batch_request {
        struct_size: std::mem::size_of::<convoy_batch_request>() as u32,
        text: std::ptr::null(),
        tokens: std::ptr::null(),
        n_tokens: 0,
        messages: std::ptr::null(),
        n_messages: 0,
        params: std::ptr::null(),
    }
}

/// Submits several requests as one: all are checked first and either all are queued or none
/// is, and the engine takes them together before its next step, so they start as one batch
/// as far as `max_batch_size` and the KV budget allow (static batching, offline jobs, a fair
/// benchmark baseline).
///
/// - `requests` (in): `n_requests` (>= 1) requests, each with exactly one prompt (see
///   `convoy_batch_request`), read during the call only.
/// - `out_ids` (out): an array of `n_requests` ids, written in order on OK only.
///
/// Returns at once: OK; NULL_POINTER, INVALID_UTF8, INVALID_ARGUMENT, PROMPT_TOO_LONG,
/// TOKENIZER_ERROR, TEMPLATE_ERROR for a bad request (in a batch of more than one, the
/// message names its index, e.g. "request 2 of the batch: ..."; PROMPT_TOO_LONG's gives the
/// prompt's length); INVALID_ARGUMENT when the batch is larger than the
/// engine's `max_waiting` or `max_requests` (it could never fit); BUSY when it does not fit
/// whole now (nothing was queued: retry later); ENGINE_FAILED, SHUT_DOWN, PANIC.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_submit_batch(
    engine: *const convoy_engine,
    requests: *const convoy_batch_request,
    n_requests: usize,
    out_ids: *mut u64,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        if n_requests == 0 {
            return Err(fail(
                convoy_status::InvalidArgument,
                "a batch needs at least one request",
            ));
        }
        let out_ids = out_arg(out_ids, "out_ids")?;
        let first = read_sized(requests, empty_batch_request(), "requests")?;
        let stride = first.struct_size as usize;
        array_arg(
            requests as *const u8,
            n_requests.saturating_mul(stride),
            "requests",
        )?;
        let batch = (0..n_requests)
            .map(|i| {
                let ptr = (requests as *const u8).add(i * stride) as *const convoy_batch_request;
                read_batch_request(ptr, stride).map_err(|Failure(status, m)| match n_requests {
                    1 => fail(status, m),
                    _ => fail(status, format!("request {i} of the batch: {m}")),
                })
            })
            .collect::<Result<Vec<Request>, Failure>>()?;
        // Checked before anything is queued: the ids are written only on success.
        array_arg(out_ids as *const u64, n_requests, "out_ids")?;
        let ids = engine.inner.submit_batch(batch)?;
        std::ptr::copy_nonoverlapping(ids.as_ptr(), out_ids, ids.len());
        Ok(())
    })
}

unsafe fn read_batch_request(
    ptr: *const convoy_batch_request,
    stride: usize,
) -> Result<Request, Failure> {
    let r = read_sized(ptr, empty_batch_request(), "request")?;
    if r.struct_size as usize != stride {
        return Err(fail(
            convoy_status::InvalidArgument,
            format!(
                "struct_size is {} but requests[0]'s is {stride}",
                r.struct_size
            ),
        ));
    }
    let given = [
        !r.text.is_null(),
        r.n_tokens > 0 || !r.tokens.is_null(),
        r.n_messages > 0 || !r.messages.is_null(),
    ];
    let prompt = match given {
        [true, false, false] => Prompt::Text(str_arg(r.text, "text")?.to_owned()),
        [false, true, false] => Prompt::Tokens(slice_arg(r.tokens, r.n_tokens, "tokens")?.to_vec()),
        [false, false, true] => Prompt::Chat(read_messages(r.messages, r.n_messages)?),
        _ => {
            return Err(fail(
                convoy_status::InvalidArgument,
                "set exactly one prompt: text, tokens or messages",
            ))
        }
    };
    let (sampling, stop, constraint) = convoy_request_params::read(r.params)?;
    Ok(Request {
        prompt,
        sampling,
        stop,
        constraint,
    })
}

/// Reads a caller's array of chat messages: the first element's `struct_size` is the stride,
/// and every element must carry the same size.
unsafe fn read_messages(
    messages: *const convoy_chat_message,
    n: usize,
) -> Result<Vec<ChatMessage>, Failure> {
    if n == 0 {
        return Err(fail(
            convoy_status::InvalidArgument,
            "a chat needs at least one message",
        ));
    }
    let first = read_sized(messages, empty_message(), "messages")?;
    let stride = first.struct_size as usize;
    // The whole array must be addressable.
    array_arg(messages as *const u8, n.saturating_mul(stride), "messages")?;
    (0..n)
        .map(|i| {
            let ptr = (messages as *const u8).add(i * stride) as *const convoy_chat_message;
            let m = read_sized(ptr, empty_message(), "a message")?;
            if m.struct_size as usize != stride {
                return Err(fail(
                    convoy_status::InvalidArgument,
                    format!(
                        "messages[{i}].struct_size is {} but messages[0]'s is {stride}",
                        m.struct_size
                    ),
                ));
            }
            Ok(ChatMessage::new(
                str_arg(m.role, &format!("messages[{i}].role"))?,
                str_arg(m.content, &format!("messages[{i}].content"))?,
            ))
        })
        .collect()
}

fn empty_message() -> convoy_chat_message {
    convoy_chat_message {
        struct_size: 0,
        role: std::ptr::null(),
        content: std::ptr::null(),
    }
}

/// What the last event polled on a thread points to.
#[derive(Default)]
struct EventData {
    text: CString,
    error: CString,
    stats: convoy_request_stats,
    top_tokens: Vec<u32>,
    top_logprobs: Vec<f32>,
}

thread_local! {
    /// Backing storage for the strings and stats of the last event polled on this thread.
    static EVENT_DATA: RefCell<EventData> = RefCell::new(Default::default());
}

/// Waits up to `timeout_ms` milliseconds (0 = don't wait) for the next event of request `id`
/// and writes it to `*out_event`. Every request yields TOKEN events then exactly one FINISHED
/// event, handed to exactly one caller even when several threads poll the same id; after
/// FINISHED has been returned (or the request was released) the id is unknown, and threads
/// still waiting on it return UNKNOWN_REQUEST. Queued events are still delivered after an
/// engine failure or during shutdown; every request ends.
///
/// Returns OK (event written), TIMEOUT (nothing yet; `*out_event` untouched), NULL_POINTER,
/// INVALID_ARGUMENT (`out_event->struct_size` too small to hold `kind` and `request_id`),
/// UNKNOWN_REQUEST, PANIC. Blocks for at most the timeout. Thread-safe; the event's strings
/// live in thread-local storage until this thread's next poll.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_poll(
    engine: *const convoy_engine,
    id: u64,
    timeout_ms: u32,
    out_event: *mut convoy_event,
) -> convoy_status {
    poll_with(engine, out_event, |e| {
        e.poll(id, Duration::from_millis(timeout_ms as u64))
    })
}

/// Waits up to `timeout_ms` milliseconds (0 = don't wait) for the next event of *any*
/// request of this engine and writes it to `*out_event` (`request_id` says whose). One host
/// thread can serve every request this way. Requests take turns: after an event of one
/// request, other requests with events waiting come first. The rules of
/// `convoy_engine_poll` hold: each event (and each request's one FINISHED event) goes to
/// exactly one caller, also when several threads call this or mix it with
/// `convoy_engine_poll`. So: a request consumed with `convoy_engine_poll` loses events to a
/// concurrent poll_any (use one way per request), and with several poll_any threads one
/// request's events may be handled by different threads at once (its FINISHED possibly
/// before another thread has handled its last TOKEN): serialize per request if order matters.
///
/// Returns OK (event written), TIMEOUT (nothing yet; `*out_event` untouched),
/// ENGINE_FAILED or SHUT_DOWN (the engine thread has stopped and every event has been
/// taken: nothing more will come; returned at once), NULL_POINTER, INVALID_ARGUMENT
/// (`struct_size`), PANIC. Thread-safe; strings and stats live in thread-local storage until
/// this thread's next poll.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_poll_any(
    engine: *const convoy_engine,
    timeout_ms: u32,
    out_event: *mut convoy_event,
) -> convoy_status {
    poll_with(engine, out_event, |e| {
        e.poll_any(Duration::from_millis(timeout_ms as u64))
    })
}

unsafe fn poll_with(
    engine: *const convoy_engine,
    out_event: *mut convoy_event,
    poll: impl FnOnce(&Engine) -> crate::error::Result<Option<Event>>,
) -> convoy_status {
    let mut timed_out = false;
    let status = guard(|| {
        let engine = arg(engine, "engine")?;
        let out_event = out_sized(out_event, "out_event")?;
        let Some(event) = poll(&engine.inner)? else {
            timed_out = true;
            return Ok(());
        };
        write_sized(out_event, to_c_event(event));
        Ok(())
    });
    if timed_out {
        convoy_status::Timeout
    } else {
        status
    }
}

fn to_c_event(event: Event) -> convoy_event {
    let (kind, request_id, token, text, reason, stats, error, logprobs) = match event {
        Event::Token {
            id,
            token,
            text,
            logprobs,
        } => (
            convoy_event_kind::Token,
            id,
            token,
            text,
            convoy_finish_reason::None,
            Default::default(),
            String::new(),
            logprobs,
        ),
        Event::Finished {
            id,
            reason,
            text,
            stats,
            error,
        } => (
            convoy_event_kind::Finished,
            id,
            0,
            text,
            reason.into(),
            (&stats).into(),
            error.unwrap_or_default(),
            None,
        ),
    };
    EVENT_DATA.with(|slot| {
        let mut slot = slot.borrow_mut();
        // Model text can contain NUL bytes; C strings cannot: replace them.
        slot.text = CString::new(text.replace('\0', "\u{FFFD}")).unwrap_or_default();
        slot.error = CString::new(error.replace('\0', " ")).unwrap_or_default();
        slot.stats = stats;
        let (has_logprobs, logprob) = match &logprobs {
            Some(lp) => (true, lp.logprob),
            None => (false, 0.0),
        };
        let top = logprobs.map(|lp| lp.top).unwrap_or_default();
        slot.top_tokens = top.iter().map(|t| t.0).collect();
        slot.top_logprobs = top.iter().map(|t| t.1).collect();
        let n_top = top.len();
        let or_null = |p: *const u32| if n_top > 0 { p } else { std::ptr::null() };
        convoy_event {
            struct_size: std::mem::size_of::<convoy_event>() as u32,
            kind,
            request_id,
            token,
            text: slot.text.as_ptr(),
            text_len: slot.text.as_bytes().len(),
            finish_reason: reason,
            stats: if kind == convoy_event_kind::Finished {
                &slot.stats
            } else {
                std::ptr::null()
            },
            error: slot.error.as_ptr(),
            has_logprobs,
            logprob,
            top_tokens: or_null(slot.top_tokens.as_ptr()),
            top_logprobs: if n_top > 0 {
                slot.top_logprobs.as_ptr()
            } else {
                std::ptr::null()
            },
            n_top,
        }
    })
}

/// Asks request `id` to stop; it ends with a FINISHED event (reason CANCELLED) at the next
/// step boundary, still delivered by `convoy_engine_poll`. Cancelling a request whose
/// FINISHED event is already queued is harmless (OK). Returns OK, NULL_POINTER,
/// UNKNOWN_REQUEST (never submitted, FINISHED already polled, or released), ENGINE_FAILED,
/// SHUT_DOWN (the engine is being destroyed), PANIC. Never blocks; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_cancel(
    engine: *const convoy_engine,
    id: u64,
) -> convoy_status {
    guard(|| {
        arg(engine, "engine")?.inner.cancel(id)?;
        Ok(())
    })
}

/// Writes the engine's prefix cache (every entry's tokens and KV) to `path`, a
/// NUL-terminated UTF-8 path ending in `.safetensors`, replacing the file atomically; load it
/// into a later engine with `convoy_engine_config.prefix_cache_path`. `out_entries` (may be
/// NULL) receives how many entries were written. Blocks until the engine thread has written
/// it between two steps (about one step, plus the write). Returns OK, NULL_POINTER,
/// INVALID_UTF8, INVALID_ARGUMENT (bad name, cannot write: see the message), ENGINE_FAILED,
/// SHUT_DOWN, PANIC. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_save_prefix_cache(
    engine: *const convoy_engine,
    path: *const c_char,
    out_entries: *mut u64,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let path = str_arg(path, "path")?;
        let n = engine.inner.save_prefix_cache(path)?;
        if !out_entries.is_null() {
            out_entries.write(n as u64);
        }
        Ok(())
    })
}

/// Gives request `id` up: it is cancelled if still running, events not yet polled are
/// dropped, and the id becomes unknown at once (threads polling it get UNKNOWN_REQUEST; no
/// FINISHED event is delivered after this call). Use it for requests whose output is no
/// longer wanted: a request is held, with its unpolled events, until its FINISHED event is
/// polled or it is released, and at most `max_requests` are held (submit answers BUSY).
/// Works after an engine failure too. Returns OK, NULL_POINTER, UNKNOWN_REQUEST, PANIC.
/// Never blocks; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_release(
    engine: *const convoy_engine,
    id: u64,
) -> convoy_status {
    guard(|| {
        arg(engine, "engine")?.inner.release(id)?;
        Ok(())
    })
}

/// Writes a snapshot of the engine's counters to `*out_stats` (set its `struct_size` first).
/// Returns OK, NULL_POINTER, INVALID_ARGUMENT (`struct_size`), PANIC. Never blocks on the model; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_get_stats(
    engine: *const convoy_engine,
    out_stats: *mut convoy_engine_stats,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let out_stats = out_sized(out_stats, "out_stats")?;
        write_sized(out_stats, engine.inner.stats().into());
        Ok(())
    })
}

/// Writes what the engine's model is to `*out_info` (set its `struct_size` first). Its
/// strings and EOS array are owned by the engine and valid until `convoy_engine_destroy`.
/// Returns OK, NULL_POINTER, INVALID_ARGUMENT (`struct_size`), PANIC. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_model_info(
    engine: *const convoy_engine,
    out_info: *mut convoy_model_info,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let out_info = out_sized(out_info, "out_info")?;
        let i = engine.inner.model_info();
        let s = &engine.info;
        let u32_of = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        write_sized(
            out_info,
            convoy_model_info {
                struct_size: std::mem::size_of::<convoy_model_info>() as u32,
                context_length: u32_of(i.context_length),
                name: s.name.as_ptr(),
                architecture: s.architecture.as_ptr(),
                vocab_size: u32_of(i.vocab_size),
                has_bos_token: i.bos_token_id.is_some(),
                bos_token_id: i.bos_token_id.unwrap_or(0),
                eos_token_ids: if s.eos.is_empty() {
                    std::ptr::null()
                } else {
                    s.eos.as_ptr()
                },
                n_eos_token_ids: s.eos.len(),
                has_chat_template: i.has_chat_template,
                weight_dtype: s.weight_dtype.as_ptr(),
                backend: s.backend.as_ptr(),
                num_layers: u32_of(i.num_layers),
                hidden_size: u32_of(i.hidden_size),
                num_heads: u32_of(i.num_heads),
                num_kv_heads: u32_of(i.num_kv_heads),
                max_context: u32_of(engine.inner.context_length()),
            },
        );
        Ok(())
    })
}

/// Tokenizes `text` (NUL-terminated UTF-8) the way a text prompt is, with the model's BOS
/// token first when `add_special` is true and the model wants one. Writes at most
/// `capacity` ids to `out_tokens` (may be NULL when `capacity` is 0) and the full count to
/// `*out_count`, like `snprintf`: if `*out_count > capacity` the output was cut; call again
/// with a larger buffer. Returns OK, NULL_POINTER, INVALID_UTF8, TOKENIZER_ERROR, PANIC.
/// Never waits for the model; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_tokenize(
    engine: *const convoy_engine,
    text: *const c_char,
    add_special: bool,
    out_tokens: *mut u32,
    capacity: usize,
    out_count: *mut usize,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let text = str_arg(text, "text")?;
        let out_count = out_arg(out_count, "out_count")?;
        if capacity > 0 && out_tokens.is_null() {
            return Err(fail(
                convoy_status::NullPointer,
                format!("out_tokens is NULL but capacity is {capacity}"),
            ));
        }
        let ids = engine.inner.tokenize(text, add_special)?;
        let n = ids.len().min(capacity);
        if n > 0 {
            std::ptr::copy_nonoverlapping(ids.as_ptr(), out_tokens, n);
        }
        out_count.write(ids.len());
        Ok(())
    })
}

/// Turns `n_tokens` token ids back into UTF-8 text; special tokens (such as end-of-turn
/// markers) are left out when `skip_special` is true. Writes at most `len - 1` bytes and a
/// NUL to `buf` (may be NULL when `len` is 0) and the full length in bytes, without the NUL,
/// to `*out_len`, like `snprintf`. Returns OK, NULL_POINTER, INVALID_ARGUMENT (an id outside
/// the vocabulary), TOKENIZER_ERROR, PANIC. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_detokenize(
    engine: *const convoy_engine,
    tokens: *const u32,
    n_tokens: usize,
    skip_special: bool,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let ids = slice_arg(tokens, n_tokens, "tokens")?;
        let out_len = out_arg(out_len, "out_len")?;
        let text = engine.inner.detokenize(ids, skip_special)?;
        let text = text.replace('\0', "\u{FFFD}");
        out_len.write(copy_out_str(text.as_bytes(), buf, len, "buf")?);
        Ok(())
    })
}

/// Renders `n_messages` chat messages with the model's chat template, followed by the
/// assistant's generation prompt when `add_generation_prompt` is true (what
/// `convoy_engine_submit_chat` tokenizes). Output as `convoy_engine_detokenize`. Returns OK,
/// NULL_POINTER, INVALID_UTF8, INVALID_ARGUMENT, TEMPLATE_ERROR (no template, or it
/// failed), PANIC. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_render_chat(
    engine: *const convoy_engine,
    messages: *const convoy_chat_message,
    n_messages: usize,
    add_generation_prompt: bool,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let out_len = out_arg(out_len, "out_len")?;
        let chat = read_messages(messages, n_messages)?;
        let text = engine.inner.render_chat(&chat, add_generation_prompt)?;
        let text = text.replace('\0', "\u{FFFD}");
        out_len.write(copy_out_str(text.as_bytes(), buf, len, "buf")?);
        Ok(())
    })
}

/// The context length requests are held to (model context or the configured limit), or 0
/// if `engine` is NULL. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_context_length(engine: *const convoy_engine) -> u32 {
    engine
        .as_ref()
        .map_or(0, |e| e.inner.context_length() as u32)
}
