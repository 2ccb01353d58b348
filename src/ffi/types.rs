//! Plain C structs and enums of the API, and their conversions to the safe types.
use std::ffi::{c_char, c_void};

use super::{convoy_status, fail, read_sized, slice_arg, str_arg, Failure};
use crate::constraint::Constraint;
use crate::engine::{EngineConfig, EngineStats};
use crate::model::WeightsPolicy;
use crate::request::{FinishReason, RequestStats, StopConditions};
use crate::sampling::SamplingParams;
use crate::scheduler::{BatchMode, SchedulerConfig};

/// How requests are batched.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum convoy_batch_mode {
    /// Requests join and leave the running batch at every step (the default).
    Continuous = 0,
    /// Fixed batches that run to completion (for comparison).
    Static = 1,
}

/// What `convoy_request_params.constraint` holds (structured output).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum convoy_constraint_kind {
    /// No constraint (the default).
    None = 0,
    /// A JSON Schema as JSON text: the output is one JSON value valid under it.
    JsonSchema = 1,
    /// A regular expression the whole output matches (Rust `regex` syntax).
    Regex = 2,
    /// A grammar in llguidance's Lark dialect.
    Lark = 3,
}

/// What to do with quantized weights.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum convoy_weights {
    /// Dequantize on the CPU backend, keep quantized on Metal/CUDA (the default).
    Auto = 0,
    /// Always dequantize to float32.
    Dequantize = 1,
    /// Always keep quantized weights quantized.
    KeepQuantized = 2,
}

/// Receives one line per finished request, on the engine thread. `line` is valid only during
/// the call. Must not call back into convoy for the same engine and should return quickly.
pub type convoy_log_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, line: *const c_char)>;

/// Engine configuration. Fill with `convoy_engine_config_init` first, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct convoy_engine_config {
    /// `sizeof(convoy_engine_config)` as the caller compiled it (set by the init function).
    pub struct_size: u32,
    /// A `convoy_batch_mode` value. Default CONVOY_BATCH_MODE_CONTINUOUS.
    pub mode: u32,
    /// A `convoy_weights` value. Default CONVOY_WEIGHTS_AUTO.
    pub weights: u32,
    /// Most requests decoding at once (1..=1024). Default 8.
    pub max_batch_size: u32,
    /// Most requests waiting for admission before submit answers BUSY. Default 256.
    pub max_waiting: u32,
    /// Most requests held at once: queued, running, or ended with events not yet polled
    /// (a request is held until its FINISHED event is polled or it is released with
    /// `convoy_engine_release`). Submit answers BUSY beyond it. Default 1024.
    pub max_requests: u32,
    /// Context length limit; 0 means the model's own. Default 0.
    pub max_context: u32,
    /// Prompt tokens prefilled per step over the admitted group, interleaved with decode
    /// steps. Default 512.
    pub prefill_chunk: u32,
    /// Called once per finished request with a log line; NULL for none.
    pub log_callback: convoy_log_callback,
    /// Passed to `log_callback` as is.
    pub log_user_data: *mut c_void,
    /// Most bytes the KV cache may allocate, padding and spare capacity included (the
    /// running batch plus the group being prefilled). Requests are admitted only while every
    /// admitted request fits when grown to prompt + max_tokens. Sliding-window layers
    /// (Gemma 3's local layers; every layer of Mistral 7B v0.1 and Phi-3 4k) keep at most
    /// their window plus one prefill chunk and 255 spare tokens per row, whatever the length. Default 2 GiB.
    pub max_kv_bytes: u64,
    /// CPU backend only: MLX's buffer-cache limit (freed buffers it keeps for reuse) is
    /// raised to at least this many bytes while the engine exists; the limit from before is
    /// restored when the last such engine is destroyed. The limit is process-wide (a host
    /// that uses MLX itself sees it); 0 leaves it alone. MLX's own 32 MiB made every prefill
    /// chunk fault its temporaries in afresh. Default 256 MiB.
    pub mlx_cache_limit_bytes: u64,
    /// Most bytes the prefix cache keeps: the KV of finished requests (prompt and output)
    /// and of running requests' prefixes, reused by later requests that start with the same
    /// tokens (chat turns, shared system prompts), which then skip that part of their
    /// prefill. Separate from `max_kv_bytes`; least recently used entries are evicted.
    /// 0 turns the cache off. Default 512 MiB.
    pub prefix_cache_bytes: u64,
    /// NUL-terminated UTF-8 path of a prefix-cache file written by
    /// `convoy_engine_save_prefix_cache` (a `.safetensors` name), loaded while the engine is
    /// created; NULL for none (the default). A missing file starts the cache empty; a file
    /// made by another format version, for another model or for other weights makes
    /// `convoy_engine_create` fail with INVALID_ARGUMENT and a message saying why. Read
    /// during `convoy_engine_create` only.
    pub prefix_cache_path: *const c_char,
}

/// Sampling and stopping parameters of one request. Fill with `convoy_request_params_init`
/// (greedy, 256 tokens) first, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct convoy_request_params {
    /// `sizeof(convoy_request_params)` as the caller compiled it (set by the init function).
    pub struct_size: u32,
    /// Most tokens to generate (>= 1).
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: u32,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    /// 0 disables.
    pub presence_penalty: f32,
    /// 0 disables.
    pub frequency_penalty: f32,
    /// Use `seed` for sampling (reproducible output); otherwise a clock seed.
    pub has_seed: bool,
    pub seed: u64,
    /// Do not stop at end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Extra token ids that stop generation; may be NULL when `n_stop_token_ids` is 0.
    pub stop_token_ids: *const u32,
    pub n_stop_token_ids: usize,
    /// NUL-terminated UTF-8 stop strings; may be NULL when `n_stop_strings` is 0. The stop
    /// string itself is not emitted.
    pub stop_strings: *const *const c_char,
    pub n_stop_strings: usize,
    /// Each TOKEN event carries the token's log-probability and the `top_logprobs` most
    /// likely tokens (see `convoy_event`). Default false.
    pub logprobs: bool,
    /// How many alternatives with `logprobs` (0 to 20: more is INVALID_ARGUMENT when
    /// `logprobs` is set; ignored otherwise). At most the vocabulary size are given.
    pub top_logprobs: u32,
    /// Structured output: a `convoy_constraint_kind` value saying what `constraint` holds.
    /// Default CONVOY_CONSTRAINT_KIND_NONE. An invalid constraint is INVALID_ARGUMENT at
    /// submit, with the parser's message. A constrained request ends with STOP once its
    /// output is complete, with LENGTH if `max_tokens` comes first.
    pub constraint_kind: u32,
    /// NUL-terminated UTF-8: the JSON schema, regex or grammar (read during the submit call
    /// only). NULL when `constraint_kind` is NONE.
    pub constraint: *const c_char,
}

/// One chat message for `convoy_engine_submit_chat` and `convoy_engine_render_chat`. Set
/// `struct_size` to `sizeof(convoy_chat_message)` in every element (or use
/// `convoy_chat_message_init`); an array is read with the first element's size as stride.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct convoy_chat_message {
    pub struct_size: u32,
    /// "system", "user" or "assistant" (NUL-terminated UTF-8).
    pub role: *const c_char,
    /// NUL-terminated UTF-8.
    pub content: *const c_char,
}

/// One request of a batch for `convoy_engine_submit_batch`. Set exactly one prompt: `text`,
/// or `tokens` with `n_tokens` >= 1, or `messages` with `n_messages` >= 1 (the others NULL
/// and 0). Set `struct_size` to `sizeof(convoy_batch_request)` in every element (or use
/// `convoy_batch_request_init`); an array is read with the first element's size as stride.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct convoy_batch_request {
    pub struct_size: u32,
    /// A text prompt (NUL-terminated UTF-8), tokenized as `convoy_engine_submit_text` does.
    pub text: *const c_char,
    /// A prompt as token ids, as `convoy_engine_submit_tokens` takes it.
    pub tokens: *const u32,
    pub n_tokens: usize,
    /// A chat, rendered as `convoy_engine_submit_chat` does.
    pub messages: *const convoy_chat_message,
    pub n_messages: usize,
    /// This request's parameters; NULL for the defaults.
    pub params: *const convoy_request_params,
}

/// Kind of an event returned by `convoy_engine_poll`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum convoy_event_kind {
    /// A generated token (`token`, `text`).
    Token = 1,
    /// The request ended (`finish_reason`, `stats`, `text` holds any last text); the last
    /// event of every request, delivered exactly once.
    Finished = 2,
}

/// Why a request ended.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum convoy_finish_reason {
    /// Not finished (token events).
    None = 0,
    /// max_tokens or the context limit.
    Length = 1,
    /// End of sequence, a stop token or a stop string.
    Stop = 2,
    /// Cancelled by `convoy_engine_cancel` or engine destruction.
    Cancelled = 3,
    /// The engine failed while running the request (see `error`).
    Error = 4,
}

/// Per-request statistics, pointed to by FINISHED events. Owned by convoy; `struct_size` is
/// the library's size: read a field only if `CONVOY_HAS_FIELD(stats, convoy_request_stats,
/// field)` (always true for the fields of ABI 1.0).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct convoy_request_stats {
    pub struct_size: u32,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// Seconds from submit to the first generated token.
    pub time_to_first_token: f64,
    /// Seconds waiting before admission.
    pub queue_time: f64,
    /// Prompt tokens computed per second of prefill (admission to first token); tokens taken
    /// from the prefix cache (`cached_tokens`) are not counted.
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
    /// Seconds from submit to the end.
    pub total_latency: f64,
    /// Prompt tokens taken from the prefix cache instead of being computed.
    pub cached_tokens: u32,
}

/// An event of one request. Set `struct_size` (`convoy_event_init` or
/// `sizeof(convoy_event)`) before polling; convoy writes at most that many bytes and sets
/// `struct_size` to the number it wrote.
///
/// `text`, `error`, `stats`, `top_tokens` and `top_logprobs` point to thread-local storage
/// owned by convoy: valid until the next `convoy_engine_poll` or `convoy_engine_poll_any`
/// call on the same thread. Copy them to keep them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct convoy_event {
    pub struct_size: u32,
    pub kind: convoy_event_kind,
    pub request_id: u64,
    /// The token id (TOKEN events).
    pub token: u32,
    /// UTF-8 text this event adds to the output, NUL-terminated (never NULL; may be empty
    /// while a multi-byte character or a possible stop string is held back).
    pub text: *const c_char,
    /// Length of `text` in bytes.
    pub text_len: usize,
    pub finish_reason: convoy_finish_reason,
    /// The request's statistics (FINISHED events); NULL for TOKEN events.
    pub stats: *const convoy_request_stats,
    /// Error message for `CONVOY_FINISH_REASON_ERROR`, else an empty string (never NULL).
    pub error: *const c_char,
    /// TOKEN events of a request submitted with `logprobs`: true, and the next fields are set.
    /// Log-probabilities are under the step's raw distribution (log-softmax of the logits,
    /// before temperature, penalties or truncation).
    pub has_logprobs: bool,
    /// The token's log-probability (0 without `has_logprobs`).
    pub logprob: f32,
    /// The `n_top` most likely tokens and their log-probabilities, most likely first
    /// (`top_logprobs` of the request's parameters); NULL when `n_top` is 0.
    pub top_tokens: *const u32,
    pub top_logprobs: *const f32,
    pub n_top: usize,
}

/// Engine-wide counters. Set `struct_size` (`convoy_engine_stats_init` or
/// `sizeof(convoy_engine_stats)`) first; convoy writes at most that many bytes and sets
/// `struct_size` to the number it wrote.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct convoy_engine_stats {
    pub struct_size: u32,
    /// Requests prefilling or decoding.
    pub running: u32,
    pub waiting: u32,
    pub kv_tokens: u64,
    pub steps: u64,
    pub tokens_generated: u64,
    pub requests_finished: u64,
    /// Seconds inside engine steps; the part spent in MLX work (graphs, evaluation,
    /// sampling); the part of that spent waiting for evaluation.
    pub step_seconds: f64,
    pub mlx_seconds: f64,
    pub eval_seconds: f64,
    pub peak_memory_bytes: u64,
    /// Bytes the KV cache allocates now (at most `max_kv_bytes`).
    pub kv_bytes: u64,
    /// Requests held (queued, running, or ended with events not yet polled).
    pub requests_held: u64,
    /// MLX memory in use and in MLX's buffer cache, in bytes (per process: other engines in
    /// the same process are included).
    pub active_memory_bytes: u64,
    pub cache_memory_bytes: u64,
    /// Of `running`, requests whose prompt is still being prefilled.
    pub prefilling: u32,
    /// Prefix cache: requests that reused a cached prefix, the prompt tokens they did not
    /// compute, bytes and entries held now (at most `prefix_cache_bytes`), and entries
    /// evicted to stay within it.
    pub prefix_cache_hits: u64,
    pub prefix_cache_hit_tokens: u64,
    pub prefix_cache_bytes: u64,
    pub prefix_cache_entries: u64,
    pub prefix_cache_evictions: u64,
}

/// What the engine's model is (`convoy_engine_model_info`). Set `struct_size`
/// (`convoy_model_info_init` or `sizeof(convoy_model_info)`) first; convoy writes at most
/// that many bytes and sets `struct_size` to the number it wrote. Strings and the EOS array
/// are owned by the engine and valid until `convoy_engine_destroy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct convoy_model_info {
    pub struct_size: u32,
    /// The model's own context length in tokens.
    pub context_length: u32,
    /// GGUF `general.name`, a folder's `_name_or_path`, or the file or folder name.
    pub name: *const c_char,
    /// Model family: "llama" (also Mistral), "qwen2", "qwen3", "phi3" or "gemma3_text".
    pub architecture: *const c_char,
    /// The tokenizer's vocabulary (added tokens included): valid token ids are below this.
    pub vocab_size: u32,
    /// Whether `bos_token_id` is set.
    pub has_bos_token: bool,
    pub bos_token_id: u32,
    /// Ids that end generation (`n_eos_token_ids` of them).
    pub eos_token_ids: *const u32,
    pub n_eos_token_ids: usize,
    /// Whether the model has a chat template (needed by submit_chat and render_chat).
    pub has_chat_template: bool,
    /// How the matmul weights are held in memory: "float32", "float16", "bfloat16", or
    /// "q<bits>_g<group>" (MLX affine quantization, e.g. "q4_g32").
    pub weight_dtype: *const c_char,
    /// The MLX backend: "cpu", "metal" or "cuda".
    pub backend: *const c_char,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    /// The context length this engine holds requests to (the model's, or `max_context`).
    pub max_context: u32,
}

impl Default for convoy_engine_config {
    fn default() -> Self {
        let s = SchedulerConfig::default();
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            mode: convoy_batch_mode::Continuous as u32,
            weights: convoy_weights::Auto as u32,
            max_batch_size: s.max_batch_size as u32,
            max_waiting: s.max_waiting as u32,
            max_requests: crate::engine::DEFAULT_MAX_REQUESTS as u32,
            max_kv_bytes: s.max_kv_bytes as u64,
            max_context: 0,
            prefill_chunk: s.prefill_chunk as u32,
            log_callback: None,
            log_user_data: std::ptr::null_mut(),
            mlx_cache_limit_bytes: crate::engine::DEFAULT_MLX_CACHE_LIMIT_BYTES as u64,
            prefix_cache_bytes: s.prefix_cache_bytes as u64,
            prefix_cache_path: std::ptr::null(),
        }
    }
}

impl Default for convoy_request_params {
    fn default() -> Self {
        let s = SamplingParams::default();
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            max_tokens: StopConditions::default().max_tokens as u32,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            has_seed: false,
            seed: 0,
            ignore_eos: false,
            stop_token_ids: std::ptr::null(),
            n_stop_token_ids: 0,
            stop_strings: std::ptr::null(),
            n_stop_strings: 0,
            logprobs: false,
            top_logprobs: 0,
            constraint_kind: convoy_constraint_kind::None as u32,
            constraint: std::ptr::null(),
        }
    }
}

/// The log callback and its user data, made sendable to the engine thread.
struct LogTarget(
    unsafe extern "C" fn(*mut c_void, *const c_char),
    *mut c_void,
);
// SAFETY: the header documents that the callback is invoked on the engine thread with the
// caller's user data; making that safe is the caller's contract, as with any C callback.
unsafe impl Send for LogTarget {}
unsafe impl Sync for LogTarget {}

impl LogTarget {
    fn call(&self, line: &str) {
        let c = std::ffi::CString::new(line.replace('\0', " ")).unwrap_or_default();
        // SAFETY: see above; `c` outlives the call.
        unsafe { (self.0)(self.1, c.as_ptr()) }
    }
}

impl convoy_engine_config {
    pub(crate) fn to_engine_config(self) -> Result<EngineConfig, Failure> {
        let mode = match self.mode {
            0 => BatchMode::Continuous,
            1 => BatchMode::Static,
            m => {
                return Err(fail(
                    super::convoy_status::InvalidArgument,
                    format!("unknown batch mode {m}"),
                ))
            }
        };
        let weights = match self.weights {
            0 => WeightsPolicy::Auto,
            1 => WeightsPolicy::Dequantize,
            2 => WeightsPolicy::KeepQuantized,
            w => {
                return Err(fail(
                    super::convoy_status::InvalidArgument,
                    format!("unknown weights policy {w}"),
                ))
            }
        };
        let log = self.log_callback.map(|cb| {
            let target = LogTarget(cb, self.log_user_data);
            std::sync::Arc::new(move |line: &str| target.call(line)) as crate::engine::LogCallback
        });
        let mut scheduler = SchedulerConfig {
            mode,
            max_batch_size: self.max_batch_size as usize,
            max_waiting: self.max_waiting as usize,
            max_kv_bytes: usize::try_from(self.max_kv_bytes).unwrap_or(usize::MAX),
            prefill_chunk: self.prefill_chunk as usize,
            prefix_cache_bytes: usize::try_from(self.prefix_cache_bytes).unwrap_or(usize::MAX),
            ..SchedulerConfig::default()
        };
        if self.max_context > 0 {
            scheduler.max_context = self.max_context as usize;
        } else {
            scheduler.max_context = usize::MAX;
        }
        let tuning = crate::engine::Tuning {
            mlx_cache_limit_bytes: usize::try_from(self.mlx_cache_limit_bytes)
                .unwrap_or(usize::MAX),
            ..Default::default()
        };
        Ok(EngineConfig {
            scheduler,
            weights,
            log,
            max_requests: self.max_requests as usize,
            tuning,
            // Read by `convoy_engine_create` (a pointer to read).
            prefix_cache_file: None,
        })
    }
}

/// `convoy_request_params` as the library reads it from caller memory: the same layout with
/// each `bool` read as a byte, so any value a C host stores there is read soundly (nonzero =
/// true) instead of being undefined behaviour in Rust.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawRequestParams {
    struct_size: u32,
    max_tokens: u32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    has_seed: u8,
    seed: u64,
    ignore_eos: u8,
    stop_token_ids: *const u32,
    n_stop_token_ids: usize,
    stop_strings: *const *const c_char,
    n_stop_strings: usize,
    logprobs: u8,
    top_logprobs: u32,
    constraint_kind: u32,
    constraint: *const c_char,
}

// The mirror must match the public struct field for field.
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    type P = convoy_request_params;
    type R = RawRequestParams;
    assert!(size_of::<P>() == size_of::<R>() && align_of::<P>() == align_of::<R>());
    macro_rules! same {
        ($($f:ident),*) => { $(assert!(offset_of!(P, $f) == offset_of!(R, $f));)* };
    }
    same!(
        struct_size,
        max_tokens,
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        has_seed,
        seed,
        ignore_eos,
        stop_token_ids,
        n_stop_token_ids,
        stop_strings,
        n_stop_strings,
        logprobs,
        top_logprobs,
        constraint_kind,
        constraint
    );
};

impl From<convoy_request_params> for RawRequestParams {
    fn from(p: convoy_request_params) -> Self {
        Self {
            struct_size: p.struct_size,
            max_tokens: p.max_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            has_seed: p.has_seed as u8,
            seed: p.seed,
            ignore_eos: p.ignore_eos as u8,
            stop_token_ids: p.stop_token_ids,
            n_stop_token_ids: p.n_stop_token_ids,
            stop_strings: p.stop_strings,
            n_stop_strings: p.n_stop_strings,
            logprobs: p.logprobs as u8,
            top_logprobs: p.top_logprobs,
            constraint_kind: p.constraint_kind,
            constraint: p.constraint,
        }
    }
}

/// What a request's parameters say: sampling, stopping, and the output constraint.
pub(crate) type RequestParts = (SamplingParams, StopConditions, Option<Constraint>);

impl convoy_request_params {
    /// Reads caller-provided parameters (NULL: the defaults) without trusting `bool` bytes.
    pub(crate) unsafe fn read(
        params: *const convoy_request_params,
    ) -> Result<RequestParts, Failure> {
        if params.is_null() {
            return Self::default().to_parts();
        }
        let raw = read_sized(
            params as *const RawRequestParams,
            RawRequestParams::from(Self::default()),
            "params",
        )?;
        Self {
            struct_size: raw.struct_size,
            max_tokens: raw.max_tokens,
            temperature: raw.temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
            min_p: raw.min_p,
            repetition_penalty: raw.repetition_penalty,
            presence_penalty: raw.presence_penalty,
            frequency_penalty: raw.frequency_penalty,
            has_seed: raw.has_seed != 0,
            seed: raw.seed,
            ignore_eos: raw.ignore_eos != 0,
            stop_token_ids: raw.stop_token_ids,
            n_stop_token_ids: raw.n_stop_token_ids,
            stop_strings: raw.stop_strings,
            n_stop_strings: raw.n_stop_strings,
            logprobs: raw.logprobs != 0,
            top_logprobs: raw.top_logprobs,
            constraint_kind: raw.constraint_kind,
            constraint: raw.constraint,
        }
        .to_parts()
    }

    unsafe fn to_parts(self) -> Result<RequestParts, Failure> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.has_seed.then_some(self.seed),
            logprobs: self.logprobs.then_some(self.top_logprobs as usize),
        };
        let ids = slice_arg(
            self.stop_token_ids,
            self.n_stop_token_ids,
            "params->stop_token_ids",
        )?;
        let strings = slice_arg(
            self.stop_strings,
            self.n_stop_strings,
            "params->stop_strings",
        )?;
        let stop_strings = strings
            .iter()
            .map(|&s| str_arg(s, "a stop string").map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()?;
        let stop = StopConditions {
            max_tokens: self.max_tokens as usize,
            ignore_eos: self.ignore_eos,
            stop_token_ids: ids.to_vec(),
            stop_strings,
        };
        let text = || -> Result<String, Failure> {
            Ok(str_arg(self.constraint, "params->constraint")?.to_owned())
        };
        let constraint = match self.constraint_kind {
            k if k == convoy_constraint_kind::None as u32 => None,
            k if k == convoy_constraint_kind::JsonSchema as u32 => {
                Some(Constraint::JsonSchema(text()?))
            }
            k if k == convoy_constraint_kind::Regex as u32 => Some(Constraint::Regex(text()?)),
            k if k == convoy_constraint_kind::Lark as u32 => Some(Constraint::Lark(text()?)),
            k => {
                return Err(fail(
                    convoy_status::InvalidArgument,
                    format!("params->constraint_kind {k} is not a convoy_constraint_kind"),
                ))
            }
        };
        Ok((sampling, stop, constraint))
    }
}

impl From<FinishReason> for convoy_finish_reason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Length => Self::Length,
            FinishReason::Stop => Self::Stop,
            FinishReason::Cancelled => Self::Cancelled,
            FinishReason::Error => Self::Error,
        }
    }
}

impl From<&RequestStats> for convoy_request_stats {
    fn from(s: &RequestStats) -> Self {
        Self {
            struct_size: <Self as super::AbiStruct>::SIZE as u32,
            prompt_tokens: s.prompt_tokens as u32,
            generated_tokens: s.generated_tokens as u32,
            time_to_first_token: s.time_to_first_token,
            queue_time: s.queue_time,
            prompt_tokens_per_second: s.prompt_tps,
            generation_tokens_per_second: s.generation_tps,
            total_latency: s.total_latency,
            cached_tokens: s.cached_tokens as u32,
        }
    }
}

impl From<EngineStats> for convoy_engine_stats {
    fn from(s: EngineStats) -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            running: s.running as u32,
            waiting: s.waiting as u32,
            kv_tokens: s.kv_tokens as u64,
            steps: s.steps,
            tokens_generated: s.tokens_generated,
            requests_finished: s.requests_finished,
            step_seconds: s.step_seconds,
            mlx_seconds: s.mlx_seconds,
            eval_seconds: s.eval_seconds,
            peak_memory_bytes: s.peak_memory_bytes,
            kv_bytes: s.kv_bytes as u64,
            requests_held: s.requests_held as u64,
            active_memory_bytes: s.active_memory_bytes,
            cache_memory_bytes: s.cache_memory_bytes,
            prefilling: s.prefilling as u32,
            prefix_cache_hits: s.prefix_cache_hits,
            prefix_cache_hit_tokens: s.prefix_cache_hit_tokens,
            prefix_cache_bytes: s.prefix_cache_bytes as u64,
            prefix_cache_entries: s.prefix_cache_entries as u64,
            prefix_cache_evictions: s.prefix_cache_evictions,
        }
    }
}

// The ABI's size-prefixed structs, field by field (see `AbiStruct`).
super::abi_struct!(convoy_engine_config {
    struct_size: u32,
    mode: u32,
    weights: u32,
    max_batch_size: u32,
    max_waiting: u32,
    max_requests: u32,
    max_context: u32,
    prefill_chunk: u32,
    log_callback: convoy_log_callback,
    log_user_data: *mut c_void,
    max_kv_bytes: u64,
    mlx_cache_limit_bytes: u64,
    prefix_cache_bytes: u64,
    prefix_cache_path: *const c_char,
});
super::abi_struct!(convoy_request_params {
    struct_size: u32,
    max_tokens: u32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    has_seed: bool,
    seed: u64,
    ignore_eos: bool,
    stop_token_ids: *const u32,
    n_stop_token_ids: usize,
    stop_strings: *const *const c_char,
    n_stop_strings: usize,
    logprobs: bool,
    top_logprobs: u32,
    constraint_kind: u32,
    constraint: *const c_char,
});
// The mirror has the public struct's layout (asserted field by field above).
impl super::AbiStruct for RawRequestParams {
    const FIELD_ENDS: &'static [usize] = <convoy_request_params as super::AbiStruct>::FIELD_ENDS;
}
super::abi_struct!(convoy_chat_message {
    struct_size: u32,
    role: *const c_char,
    content: *const c_char,
});
super::abi_struct!(convoy_batch_request {
    struct_size: u32,
    text: *const c_char,
    tokens: *const u32,
    n_tokens: usize,
    messages: *const convoy_chat_message,
    n_messages: usize,
    params: *const convoy_request_params,
});
// An event that cannot say whose it is or what it is would lose the request's ending.
super::abi_struct!(convoy_event {
    struct_size: u32,
    kind: convoy_event_kind,
    request_id: u64,
    token: u32,
    text: *const c_char,
    text_len: usize,
    finish_reason: convoy_finish_reason,
    stats: *const convoy_request_stats,
    error: *const c_char,
    has_logprobs: bool,
    logprob: f32,
    top_tokens: *const u32,
    top_logprobs: *const f32,
    n_top: usize,
} min = std::mem::offset_of!(convoy_event, request_id) + 8);
super::abi_struct!(convoy_request_stats {
    struct_size: u32,
    prompt_tokens: u32,
    generated_tokens: u32,
    time_to_first_token: f64,
    queue_time: f64,
    prompt_tokens_per_second: f64,
    generation_tokens_per_second: f64,
    total_latency: f64,
    cached_tokens: u32,
});
super::abi_struct!(convoy_engine_stats {
    struct_size: u32,
    running: u32,
    waiting: u32,
    kv_tokens: u64,
    steps: u64,
    tokens_generated: u64,
    requests_finished: u64,
    step_seconds: f64,
    mlx_seconds: f64,
    eval_seconds: f64,
    peak_memory_bytes: u64,
    kv_bytes: u64,
    requests_held: u64,
    active_memory_bytes: u64,
    cache_memory_bytes: u64,
    prefilling: u32,
    prefix_cache_hits: u64,
    prefix_cache_hit_tokens: u64,
    prefix_cache_bytes: u64,
    prefix_cache_entries: u64,
    prefix_cache_evictions: u64,
});
super::abi_struct!(convoy_model_info {
    struct_size: u32,
    context_length: u32,
    name: *const c_char,
    architecture: *const c_char,
    vocab_size: u32,
    has_bos_token: bool,
    bos_token_id: u32,
    eos_token_ids: *const u32,
    n_eos_token_ids: usize,
    has_chat_template: bool,
    weight_dtype: *const c_char,
    backend: *const c_char,
    num_layers: u32,
    hidden_size: u32,
    num_heads: u32,
    num_kv_heads: u32,
    max_context: u32,
});
