/*
 * convoy.hpp: a header-only C++17 wrapper over convoy.h (RAII, exceptions).
 *
 *   convoy::Engine engine("model.gguf");
 *   std::string answer = engine.generate_chat({{"user", "Hi!"}},
 *                                             convoy::RequestParams().max_tokens(64));
 *
 *   convoy::Request r = engine.submit_text("Once upon a time", convoy::RequestParams().max_tokens(32));
 *   for (;;) {
 *       convoy::Event ev = r.next();             // blocks until the next event
 *       std::cout << ev.text;                    // string_view: valid until this thread's next poll
 *       if (ev.finished()) break;
 *   }
 *
 * Errors: every failing call throws convoy::Error (a std::runtime_error) carrying the
 * convoy_status and convoy_last_error_message(). Polling that times out is not an error: the
 * timed next()/poll_any() return std::nullopt.
 *
 * Lifetimes:
 * - Engine is move-only; its destructor calls convoy_engine_destroy (requests still running
 *   end). Requests must not outlive their Engine.
 * - Request is move-only; if its FINISHED event has not been received through it, its
 *   destructor releases the request (convoy_engine_release: cancelled, unpolled events
 *   dropped), so abandoning a handle never leaks. detach() gives the id up instead (the
 *   request then lives until someone polls its FINISHED event, e.g. Engine::poll_any).
 * - Event::text and Event::error are std::string_view into convoy's thread-local storage:
 *   valid until the next poll (Request::next, Engine::poll_any, generate...) on the same
 *   thread. Copy them (std::string(ev.text)) to keep them. Event::stats is a copy.
 *
 * Threading: Engine's const methods may be called from any number of threads at once, like
 * the C functions they wrap. One Request handle must not be used by two threads at once.
 */
#ifndef CONVOY_HPP
#define CONVOY_HPP

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "convoy.h"

namespace convoy {

/** The status codes of convoy.h (CONVOY_STATUS_OK, CONVOY_STATUS_BUSY, ...). */
using Status = convoy_status;
/** Per-request statistics (a copy of the FINISHED event's convoy_request_stats). */
using RequestStats = convoy_request_stats;
/** Engine-wide counters (convoy_engine_get_stats). */
using EngineStats = convoy_engine_stats;

enum class EventKind : std::uint32_t {
  Token = CONVOY_EVENT_KIND_TOKEN,
  Finished = CONVOY_EVENT_KIND_FINISHED,
};

enum class FinishReason : std::uint32_t {
  None = CONVOY_FINISH_REASON_NONE,
  Length = CONVOY_FINISH_REASON_LENGTH,
  Stop = CONVOY_FINISH_REASON_STOP,
  Cancelled = CONVOY_FINISH_REASON_CANCELLED,
  Error = CONVOY_FINISH_REASON_ERROR,
};

enum class BatchMode : std::uint32_t {
  Continuous = CONVOY_BATCH_MODE_CONTINUOUS,
  Static = CONVOY_BATCH_MODE_STATIC,
};

enum class Weights : std::uint32_t {
  Auto = CONVOY_WEIGHTS_AUTO,
  Dequantize = CONVOY_WEIGHTS_DEQUANTIZE,
  KeepQuantized = CONVOY_WEIGHTS_KEEP_QUANTIZED,
};

/** A failed convoy call: status() is the convoy_status, what() the library's message. */
class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string &message)
      : std::runtime_error(message.empty() ? std::string(convoy_status_str(status)) : message),
        status_(status) {}
  Status status() const noexcept { return status_; }

 private:
  Status status_;
};

/** The library version (convoy_version()), e.g. "0.2.0". */
inline std::string_view version() { return convoy_version(); }
/** The MLX backend compiled into the library: "cpu", "metal" or "cuda". */
inline std::string_view backend() { return convoy_backend(); }
/** Whether the loaded library has the ABI this header was written for. */
inline bool abi_compatible() noexcept { return convoy_abi_version() == CONVOY_ABI_VERSION; }

namespace detail {

/** convoy_last_error_message() of this thread as a std::string. */
inline std::string last_error_message() {
  std::string s(convoy_last_error_message(nullptr, 0) + 1, '\0');
  std::size_t n = convoy_last_error_message(&s[0], s.size());
  s.resize(std::min(n, s.size() - 1));
  return s;
}

inline void check(convoy_status status) {
  if (status != CONVOY_STATUS_OK) throw Error(status, last_error_message());
}

/** A string for a NUL-terminated C parameter (an embedded NUL would cut it silently). */
inline const char *c_str(const std::string &s, const char *what) {
  if (s.find('\0') != std::string::npos)
    throw Error(CONVOY_STATUS_INVALID_ARGUMENT, std::string(what) + " contains a NUL byte");
  return s.c_str();
}

inline std::uint32_t timeout_ms(std::chrono::milliseconds timeout) {
  auto ms = timeout.count();
  if (ms <= 0) return 0;
  return ms > 0xFFFFFFFELL ? 0xFFFFFFFEu : static_cast<std::uint32_t>(ms);
}

/** Calls an snprintf-style function `f(buf, len, &out_len)`, growing the buffer once. */
template <class F>
std::string snprintf_string(F f) {
  std::string s(256, '\0');
  std::size_t n = 0;
  check(f(&s[0], s.size(), &n));
  if (n >= s.size()) {
    s.assign(n + 1, '\0');
    check(f(&s[0], s.size(), &n));
  }
  s.resize(std::min(n, s.size() - 1));
  return s;
}

inline void log_trampoline(void *user_data, const char *line) noexcept {
  try {
    (*static_cast<std::function<void(std::string_view)> *>(user_data))(line ? line : "");
  } catch (...) {
    // Never let an exception cross into the engine thread.
  }
}

}  // namespace detail

/** One chat message. */
struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

/** One event of a request. */
struct Event {
  EventKind kind = EventKind::Token;
  std::uint64_t request_id = 0;
  std::uint32_t token = 0;  // TOKEN events
  /** Text this event adds; valid until this thread's next poll. */
  std::string_view text;
  FinishReason finish_reason = FinishReason::None;
  /** The error message of a FINISHED event with reason Error; valid until the next poll. */
  std::string_view error;
  /** FINISHED events: the request's statistics (copied; fields the library lacks are 0). */
  std::optional<RequestStats> stats;

  bool finished() const noexcept { return kind == EventKind::Finished; }

  static Event from_c(const convoy_event &ev) {
    Event e;
    e.kind = static_cast<EventKind>(ev.kind);
    e.request_id = ev.request_id;
    e.token = ev.token;
    if (ev.text != nullptr) e.text = std::string_view(ev.text, ev.text_len);
    e.finish_reason = static_cast<FinishReason>(ev.finish_reason);
    if (ev.error != nullptr) e.error = ev.error;
    if (ev.stats != nullptr) {
      RequestStats s;
      std::memset(&s, 0, sizeof s);
      std::memcpy(&s, ev.stats, std::min<std::size_t>(ev.stats->struct_size, sizeof s));
      s.struct_size = static_cast<std::uint32_t>(sizeof s);
      e.stats = s;
    }
    return e;
  }
};

/** Sampling and stopping parameters (convoy_request_params); chainable setters. */
class RequestParams {
 public:
  RequestParams() { detail::check(convoy_request_params_init(&p_, sizeof p_)); }

  RequestParams &max_tokens(std::uint32_t v) { p_.max_tokens = v; return *this; }
  RequestParams &temperature(float v) { p_.temperature = v; return *this; }
  RequestParams &top_k(std::uint32_t v) { p_.top_k = v; return *this; }
  RequestParams &top_p(float v) { p_.top_p = v; return *this; }
  RequestParams &min_p(float v) { p_.min_p = v; return *this; }
  RequestParams &repetition_penalty(float v) { p_.repetition_penalty = v; return *this; }
  RequestParams &presence_penalty(float v) { p_.presence_penalty = v; return *this; }
  RequestParams &frequency_penalty(float v) { p_.frequency_penalty = v; return *this; }
  RequestParams &seed(std::uint64_t v) { p_.has_seed = true; p_.seed = v; return *this; }
  RequestParams &ignore_eos(bool v = true) { p_.ignore_eos = v; return *this; }
  RequestParams &stop_token_ids(std::vector<std::uint32_t> ids) {
    stop_ids_ = std::move(ids);
    return *this;
  }
  RequestParams &stop_strings(std::vector<std::string> s) {
    stop_strings_ = std::move(s);
    return *this;
  }

  /** The C struct, pointing into this object and `scratch` (both must outlive its use). */
  convoy_request_params to_c(std::vector<const char *> &scratch) const {
    convoy_request_params p = p_;
    scratch.clear();
    for (const std::string &s : stop_strings_) scratch.push_back(detail::c_str(s, "stop string"));
    p.stop_token_ids = stop_ids_.empty() ? nullptr : stop_ids_.data();
    p.n_stop_token_ids = stop_ids_.size();
    p.stop_strings = scratch.empty() ? nullptr : scratch.data();
    p.n_stop_strings = scratch.size();
    return p;
  }

 private:
  convoy_request_params p_;
  std::vector<std::uint32_t> stop_ids_;
  std::vector<std::string> stop_strings_;
};

/** Engine configuration (convoy_engine_config); chainable setters. */
class EngineConfig {
 public:
  using LogCallback = std::function<void(std::string_view line)>;

  EngineConfig() { detail::check(convoy_engine_config_init(&c_, sizeof c_)); }

  EngineConfig &mode(BatchMode v) { c_.mode = static_cast<std::uint32_t>(v); return *this; }
  EngineConfig &weights(Weights v) { c_.weights = static_cast<std::uint32_t>(v); return *this; }
  EngineConfig &max_batch_size(std::uint32_t v) { c_.max_batch_size = v; return *this; }
  EngineConfig &max_waiting(std::uint32_t v) { c_.max_waiting = v; return *this; }
  EngineConfig &max_requests(std::uint32_t v) { c_.max_requests = v; return *this; }
  EngineConfig &max_context(std::uint32_t v) { c_.max_context = v; return *this; }
  EngineConfig &prefill_chunk(std::uint32_t v) { c_.prefill_chunk = v; return *this; }
  EngineConfig &max_kv_bytes(std::uint64_t v) { c_.max_kv_bytes = v; return *this; }
  /** CPU backend: MLX's process-wide buffer-cache limit while the engine exists (0 = leave
   *  MLX's alone). */
  EngineConfig &mlx_cache_limit_bytes(std::uint64_t v) { c_.mlx_cache_limit_bytes = v; return *this; }
  /** Most bytes of KV the prefix cache keeps for later requests that start with the same
   *  tokens (0 turns it off; default 512 MiB). */
  EngineConfig &prefix_cache_bytes(std::uint64_t v) { c_.prefix_cache_bytes = v; return *this; }
  /** A prefix-cache file written by Engine::save_prefix_cache (a `.safetensors` name),
   *  loaded when the engine is created; a missing file starts the cache empty, a foreign one
   *  makes the Engine constructor throw INVALID_ARGUMENT. The path is copied. */
  EngineConfig &prefix_cache_path(std::string path) { prefix_cache_path_ = std::move(path); return *this; }
  /** Called on the engine thread with one line per finished request. It must not call
   *  into convoy for the same engine; exceptions it throws are swallowed. */
  EngineConfig &log(LogCallback cb) { log_ = std::move(cb); return *this; }

  /** The C struct without the pointers this object owns (log callback, prefix cache path):
   *  the Engine constructor sets those. */
  const convoy_engine_config &c_config() const noexcept { return c_; }
  const LogCallback &log_callback() const noexcept { return log_; }
  const std::optional<std::string> &prefix_cache_path() const noexcept { return prefix_cache_path_; }

 private:
  convoy_engine_config c_;
  LogCallback log_;
  std::optional<std::string> prefix_cache_path_;
};

/** What a request produced (Request::wait). */
struct Completion {
  std::string text;
  std::vector<std::uint32_t> tokens;
  FinishReason finish_reason = FinishReason::None;
  std::string error;  // reason Error
  RequestStats stats{};
};

/** What the engine's model is (copied from convoy_model_info). */
struct ModelInfo {
  std::string name, architecture, weight_dtype, backend;
  std::uint32_t context_length = 0, max_context = 0, vocab_size = 0;
  std::optional<std::uint32_t> bos_token_id;
  std::vector<std::uint32_t> eos_token_ids;
  bool has_chat_template = false;
  std::uint32_t num_layers = 0, hidden_size = 0, num_heads = 0, num_kv_heads = 0;
};

/**
 * A submitted request. Move-only. Destroying a handle whose FINISHED event it has not
 * received releases the request (see the file comment); detach() to keep it alive instead.
 */
class Request {
 public:
  Request() noexcept = default;
  Request(const convoy_engine *engine, std::uint64_t id) noexcept : engine_(engine), id_(id) {}
  Request(const Request &) = delete;
  Request &operator=(const Request &) = delete;
  Request(Request &&o) noexcept : engine_(std::exchange(o.engine_, nullptr)), id_(o.id_) {}
  Request &operator=(Request &&o) noexcept {
    if (this != &o) {
      reset();
      engine_ = std::exchange(o.engine_, nullptr);
      id_ = o.id_;
    }
    return *this;
  }
  ~Request() { reset(); }

  std::uint64_t id() const noexcept { return id_; }
  /** False once the FINISHED event was received through this handle (or after detach). */
  bool active() const noexcept { return engine_ != nullptr; }

  /** The next event within `timeout`, or std::nullopt if none came. Throws Error
   *  (UNKNOWN_REQUEST once the request ended or was released elsewhere). */
  std::optional<Event> next(std::chrono::milliseconds timeout) {
    if (engine_ == nullptr)
      throw Error(CONVOY_STATUS_UNKNOWN_REQUEST, "request handle is finished, detached or empty");
    convoy_event ev;
    detail::check(convoy_event_init(&ev, sizeof ev));
    convoy_status st = convoy_engine_poll(engine_, id_, detail::timeout_ms(timeout), &ev);
    if (st == CONVOY_STATUS_TIMEOUT) return std::nullopt;
    if (st == CONVOY_STATUS_UNKNOWN_REQUEST) engine_ = nullptr;  // nothing left to release
    detail::check(st);
    if (ev.kind == CONVOY_EVENT_KIND_FINISHED) engine_ = nullptr;
    return Event::from_c(ev);
  }

  /** The next event, waiting as long as it takes (every request ends). */
  Event next() {
    for (;;) {
      if (std::optional<Event> ev = next(std::chrono::seconds(1))) return *ev;
    }
  }

  /** Polls to the end and returns everything the request produced. */
  Completion wait() {
    Completion c;
    for (;;) {
      Event ev = next();
      c.text += ev.text;
      if (!ev.finished()) {
        c.tokens.push_back(ev.token);
        continue;
      }
      c.finish_reason = ev.finish_reason;
      c.error = std::string(ev.error);
      if (ev.stats) c.stats = *ev.stats;
      return c;
    }
  }

  /** Asks the request to stop (it still ends with a FINISHED event, reason Cancelled).
   *  Returns false if the request already ended (its FINISHED event was polled). */
  bool cancel() {
    if (engine_ == nullptr) return false;
    convoy_status st = convoy_engine_cancel(engine_, id_);
    if (st == CONVOY_STATUS_UNKNOWN_REQUEST) return false;
    detail::check(st);
    return true;
  }

  /** Gives up ownership without releasing: the request lives until its FINISHED event is
   *  polled (e.g. by Engine::poll_any) or it is released by id. Returns the id. */
  std::uint64_t detach() noexcept {
    engine_ = nullptr;
    return id_;
  }

 private:
  void reset() noexcept {
    // UNKNOWN_REQUEST (already finished through poll_any, say) is fine: nothing to free.
    if (engine_ != nullptr) (void)convoy_engine_release(engine_, id_);
    engine_ = nullptr;
  }

  const convoy_engine *engine_ = nullptr;
  std::uint64_t id_ = 0;
};

/** An inference engine: a loaded model and its background thread. Move-only. */
class Engine {
 public:
  /** Loads the model (blocks for seconds). Throws Error (e.g. MODEL_NOT_FOUND). */
  explicit Engine(const std::string &model_path, const EngineConfig &config = EngineConfig()) {
    convoy_engine_config c = config.c_config();
    if (config.log_callback()) {
      log_ = std::make_unique<EngineConfig::LogCallback>(config.log_callback());
      c.log_callback = &detail::log_trampoline;
      c.log_user_data = log_.get();
    }
    if (config.prefix_cache_path())  // read during convoy_engine_create only
      c.prefix_cache_path = detail::c_str(*config.prefix_cache_path(), "prefix cache path");
    detail::check(convoy_engine_create(detail::c_str(model_path, "model path"), &c, &engine_));
  }
  Engine(const Engine &) = delete;
  Engine &operator=(const Engine &) = delete;
  Engine(Engine &&o) noexcept
      : engine_(std::exchange(o.engine_, nullptr)), log_(std::move(o.log_)) {}
  Engine &operator=(Engine &&o) noexcept {
    if (this != &o) {
      convoy_engine_destroy(engine_);
      engine_ = std::exchange(o.engine_, nullptr);
      log_ = std::move(o.log_);
    }
    return *this;
  }
  /** Stops the engine (requests still running end) and frees it. */
  ~Engine() { convoy_engine_destroy(engine_); }

  /** The C handle, for calls this wrapper does not cover. */
  convoy_engine *get() const noexcept { return engine_; }

  Request submit_text(const std::string &prompt, const RequestParams &params = RequestParams()) const {
    std::vector<const char *> scratch;
    convoy_request_params p = params.to_c(scratch);
    std::uint64_t id = 0;
    detail::check(convoy_engine_submit_text(engine_, detail::c_str(prompt, "prompt"), &p, &id));
    return Request(engine_, id);
  }

  Request submit_tokens(const std::vector<std::uint32_t> &tokens,
                        const RequestParams &params = RequestParams()) const {
    std::vector<const char *> scratch;
    convoy_request_params p = params.to_c(scratch);
    std::uint64_t id = 0;
    detail::check(convoy_engine_submit_tokens(engine_, tokens.data(), tokens.size(), &p, &id));
    return Request(engine_, id);
  }

  Request submit_chat(const std::vector<ChatMessage> &messages,
                      const RequestParams &params = RequestParams()) const {
    std::vector<convoy_chat_message> msgs = c_messages(messages);
    std::vector<const char *> scratch;
    convoy_request_params p = params.to_c(scratch);
    std::uint64_t id = 0;
    detail::check(convoy_engine_submit_chat(engine_, msgs.data(), msgs.size(), &p, &id));
    return Request(engine_, id);
  }

  /** Text prompts queued as one batch (convoy_engine_submit_batch): all or none, and the
   *  engine takes them together (they start as one batch where max_batch_size allows).
   *  Handles in the prompts' order. */
  std::vector<Request> submit_text_batch(const std::vector<std::string> &prompts,
                                         const RequestParams &params = RequestParams()) const {
    std::vector<const char *> scratch;
    convoy_request_params p = params.to_c(scratch);
    std::vector<convoy_batch_request> batch(prompts.size());
    for (std::size_t i = 0; i < prompts.size(); i++) {
      detail::check(convoy_batch_request_init(&batch[i], sizeof batch[i]));
      batch[i].text = detail::c_str(prompts[i], "prompt");
      batch[i].params = &p;
    }
    std::vector<std::uint64_t> ids(prompts.size());
    detail::check(convoy_engine_submit_batch(engine_, batch.data(), batch.size(), ids.data()));
    std::vector<Request> out;
    out.reserve(ids.size());
    for (std::uint64_t id : ids) out.push_back(Request(engine_, id));
    return out;
  }

  /** Generates to the end and returns the text. Throws Error if the request failed
   *  (FINISHED with reason Error: status ENGINE_FAILED, the event's message). */
  std::string generate(const std::string &prompt, const RequestParams &params = RequestParams()) const {
    return text_of(submit_text(prompt, params).wait());
  }
  std::string generate_chat(const std::vector<ChatMessage> &messages,
                            const RequestParams &params = RequestParams()) const {
    return text_of(submit_chat(messages, params).wait());
  }

  /** The next event of any request within `timeout` (ev.request_id says whose), or
   *  std::nullopt. One thread can serve every request this way; keep each Request handle
   *  alive (or detach() it) until its FINISHED event arrives. */
  std::optional<Event> poll_any(std::chrono::milliseconds timeout) const {
    convoy_event ev;
    detail::check(convoy_event_init(&ev, sizeof ev));
    convoy_status st = convoy_engine_poll_any(engine_, detail::timeout_ms(timeout), &ev);
    if (st == CONVOY_STATUS_TIMEOUT) return std::nullopt;
    detail::check(st);
    return Event::from_c(ev);
  }

  /** Cancels a request by id; false if it already ended. */
  bool cancel(std::uint64_t id) const {
    convoy_status st = convoy_engine_cancel(engine_, id);
    if (st == CONVOY_STATUS_UNKNOWN_REQUEST) return false;
    detail::check(st);
    return true;
  }

  /** Releases a request by id (for detached requests); false if it already ended. */
  bool release(std::uint64_t id) const {
    convoy_status st = convoy_engine_release(engine_, id);
    if (st == CONVOY_STATUS_UNKNOWN_REQUEST) return false;
    detail::check(st);
    return true;
  }

  /** Writes the prefix cache to `path` (a `.safetensors` name), replacing the file
   *  atomically; EngineConfig::prefix_cache_path loads it into a later engine. Returns the
   *  number of entries written. Blocks about one engine step, plus the write. Throws Error
   *  (INVALID_ARGUMENT for another name or a file that cannot be written). */
  std::uint64_t save_prefix_cache(const std::string &path) const {
    std::uint64_t entries = 0;
    detail::check(convoy_engine_save_prefix_cache(engine_, detail::c_str(path, "path"), &entries));
    return entries;
  }

  EngineStats stats() const {
    EngineStats s;
    detail::check(convoy_engine_stats_init(&s, sizeof s));
    detail::check(convoy_engine_get_stats(engine_, &s));
    return s;
  }

  ModelInfo model_info() const {
    convoy_model_info c;
    detail::check(convoy_model_info_init(&c, sizeof c));
    detail::check(convoy_engine_model_info(engine_, &c));
    auto str = [](const char *s) { return std::string(s != nullptr ? s : ""); };
    ModelInfo m;
    m.name = str(c.name);
    m.architecture = str(c.architecture);
    m.weight_dtype = str(c.weight_dtype);
    m.backend = str(c.backend);
    m.context_length = c.context_length;
    m.max_context = c.max_context;
    m.vocab_size = c.vocab_size;
    if (c.has_bos_token) m.bos_token_id = c.bos_token_id;
    if (c.eos_token_ids != nullptr)
      m.eos_token_ids.assign(c.eos_token_ids, c.eos_token_ids + c.n_eos_token_ids);
    m.has_chat_template = c.has_chat_template;
    m.num_layers = c.num_layers;
    m.hidden_size = c.hidden_size;
    m.num_heads = c.num_heads;
    m.num_kv_heads = c.num_kv_heads;
    return m;
  }

  /** The context length requests are held to. */
  std::uint32_t context_length() const noexcept { return convoy_engine_context_length(engine_); }

  std::vector<std::uint32_t> tokenize(const std::string &text, bool add_special = true) const {
    const char *t = detail::c_str(text, "text");
    std::vector<std::uint32_t> ids(text.size() + 8);
    std::size_t n = 0;
    detail::check(convoy_engine_tokenize(engine_, t, add_special, ids.data(), ids.size(), &n));
    if (n > ids.size()) {
      ids.resize(n);
      detail::check(convoy_engine_tokenize(engine_, t, add_special, ids.data(), ids.size(), &n));
    }
    ids.resize(std::min(n, ids.size()));
    return ids;
  }

  std::string detokenize(const std::vector<std::uint32_t> &tokens, bool skip_special = false) const {
    static const std::uint32_t none = 0;  // a non-NULL pointer for an empty list
    const std::uint32_t *ids = tokens.empty() ? &none : tokens.data();
    return detail::snprintf_string([&](char *buf, std::size_t len, std::size_t *out) {
      return convoy_engine_detokenize(engine_, ids, tokens.size(), skip_special, buf, len, out);
    });
  }

  std::string render_chat(const std::vector<ChatMessage> &messages,
                          bool add_generation_prompt = true) const {
    std::vector<convoy_chat_message> msgs = c_messages(messages);
    return detail::snprintf_string([&](char *buf, std::size_t len, std::size_t *out) {
      return convoy_engine_render_chat(engine_, msgs.data(), msgs.size(), add_generation_prompt,
                                       buf, len, out);
    });
  }

 private:
  static std::vector<convoy_chat_message> c_messages(const std::vector<ChatMessage> &messages) {
    std::vector<convoy_chat_message> msgs(messages.size());
    for (std::size_t i = 0; i < messages.size(); i++) {
      detail::check(convoy_chat_message_init(&msgs[i], sizeof msgs[i],
                                             detail::c_str(messages[i].role, "role"),
                                             detail::c_str(messages[i].content, "content")));
    }
    return msgs;
  }

  static std::string text_of(Completion c) {
    if (c.finish_reason == FinishReason::Error) throw Error(CONVOY_STATUS_ENGINE_FAILED, c.error);
    return std::move(c.text);
  }

  convoy_engine *engine_ = nullptr;
  std::unique_ptr<EngineConfig::LogCallback> log_;
};

}  // namespace convoy

#endif  // CONVOY_HPP
