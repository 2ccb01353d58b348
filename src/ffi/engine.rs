//! Exported functions: engine life cycle, submit, poll, cancel, stats.
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::time::Duration;

use super::types::*;
use super::{arg, convoy_status, fail, guard, out_arg, slice_arg, str_arg, Failure};
use crate::engine::Engine;
use crate::request::{Event, Prompt, Request};
use crate::tokenizer::ChatMessage;

/// An inference engine: a model plus the background thread that runs it. Opaque.
pub struct convoy_engine {
    inner: Engine,
}

/// Fills `*config` with the defaults (continuous batching, 8 rows, model context).
///
/// Returns CONVOY_STATUS_NULL_POINTER if `config` is NULL, else CONVOY_STATUS_OK.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_config_init(
    config: *mut convoy_engine_config,
) -> convoy_status {
    guard(|| {
        out_arg(config, "config")?.write(convoy_engine_config::default());
        Ok(())
    })
}

/// Fills `*params` with the defaults: greedy decoding, max_tokens 256, no stop strings.
///
/// Returns CONVOY_STATUS_NULL_POINTER if `params` is NULL, else CONVOY_STATUS_OK.
#[no_mangle]
pub unsafe extern "C" fn convoy_request_params_init(
    params: *mut convoy_request_params,
) -> convoy_status {
    guard(|| {
        out_arg(params, "params")?.write(convoy_request_params::default());
        Ok(())
    })
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
        let config = match config.as_ref() {
            Some(c) => c.to_engine_config()?,
            None => convoy_engine_config::default().to_engine_config()?,
        };
        let engine = Engine::new(path, config)?;
        out_engine.write(Box::into_raw(Box::new(convoy_engine { inner: engine })));
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
        let (sampling, stop) = convoy_request_params::read(params)?;
        let id = engine.inner.submit(Request {
            prompt: prompt()?,
            sampling,
            stop,
        })?;
        out_id.write(id);
        Ok(())
    })
}

/// Submits a text prompt (tokenized as is; BOS added if the model wants one).
///
/// - `prompt` (in): NUL-terminated UTF-8.
/// - `params` (in, may be NULL for the defaults): read during the call only.
/// - `out_id` (out): the request id on success.
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
        let msgs = slice_arg(messages, n_messages, "messages")?;
        if msgs.is_empty() {
            return Err(fail(
                convoy_status::InvalidArgument,
                "a chat needs at least one message",
            ));
        }
        let chat = msgs
            .iter()
            .map(|m| {
                Ok(ChatMessage::new(
                    str_arg(m.role, "message role")?,
                    str_arg(m.content, "message content")?,
                ))
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        Ok(Prompt::Chat(chat))
    })
}

thread_local! {
    /// Backing storage for the strings of the last event polled on this thread.
    static EVENT_TEXT: RefCell<(CString, CString)> = RefCell::new(Default::default());
}

/// Waits up to `timeout_ms` milliseconds (0 = don't wait) for the next event of request `id`
/// and writes it to `*out_event`. Every request yields TOKEN events then exactly one FINISHED
/// event, handed to exactly one caller even when several threads poll the same id; after
/// FINISHED has been returned (or the request was released) the id is unknown, and threads
/// still waiting on it return UNKNOWN_REQUEST. Queued events are still delivered after an
/// engine failure or during shutdown; every request ends.
///
/// Returns OK (event written), TIMEOUT (nothing yet; `*out_event` untouched), NULL_POINTER,
/// UNKNOWN_REQUEST, PANIC. Blocks for at most the timeout. Thread-safe; the event's strings
/// live in thread-local storage until this thread's next poll.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_poll(
    engine: *const convoy_engine,
    id: u64,
    timeout_ms: u32,
    out_event: *mut convoy_event,
) -> convoy_status {
    let mut timed_out = false;
    let status = guard(|| {
        let engine = arg(engine, "engine")?;
        let out_event = out_arg(out_event, "out_event")?;
        let Some(event) = engine
            .inner
            .poll(id, Duration::from_millis(timeout_ms as u64))?
        else {
            timed_out = true;
            return Ok(());
        };
        out_event.write(to_c_event(event));
        Ok(())
    });
    if timed_out {
        convoy_status::Timeout
    } else {
        status
    }
}

fn to_c_event(event: Event) -> convoy_event {
    let (kind, request_id, token, text, reason, stats, error) = match event {
        Event::Token { id, token, text } => (
            convoy_event_kind::Token,
            id,
            token,
            text,
            convoy_finish_reason::None,
            Default::default(),
            String::new(),
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
        ),
    };
    EVENT_TEXT.with(|slot| {
        let mut slot = slot.borrow_mut();
        // Model text can contain NUL bytes; C strings cannot: replace them.
        slot.0 = CString::new(text.replace('\0', "\u{FFFD}")).unwrap_or_default();
        slot.1 = CString::new(error.replace('\0', " ")).unwrap_or_default();
        convoy_event {
            kind,
            request_id,
            token,
            text: slot.0.as_ptr(),
            text_len: slot.0.as_bytes().len(),
            finish_reason: reason,
            stats,
            error: slot.1.as_ptr(),
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

/// Writes a snapshot of the engine's counters to `*out_stats`. Returns OK, NULL_POINTER,
/// PANIC. Never blocks on the model; thread-safe.
#[no_mangle]
pub unsafe extern "C" fn convoy_engine_get_stats(
    engine: *const convoy_engine,
    out_stats: *mut convoy_engine_stats,
) -> convoy_status {
    guard(|| {
        let engine = arg(engine, "engine")?;
        let out_stats = out_arg(out_stats, "out_stats")?;
        out_stats.write(engine.inner.stats().into());
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
