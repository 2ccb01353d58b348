// Exercises include/convoy.hpp (the C++17 wrapper) on the real model. Built with
// -std=c++17 -Wall -Wextra -Werror -pedantic and run by tests/cpp_wrapper.rs.
// Usage: wrapper_test MODEL. Prints "N passed, M failed"; exit code 0 = all passed.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "convoy.hpp"

namespace {

int passed = 0, failed = 0;

#define CHECK(cond)                                                         \
  do {                                                                      \
    if (cond) {                                                             \
      passed++;                                                             \
    } else {                                                                \
      failed++;                                                             \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                       \
  } while (0)

// Runs `f` and checks that it throws convoy::Error with `status` (and a message).
template <class F>
void expect_error(convoy::Status status, F f, const char *what) {
  try {
    f();
    failed++;
    std::fprintf(stderr, "%s: no exception (wanted %s)\n", what, convoy_status_str(status));
  } catch (const convoy::Error &e) {
    if (e.status() == status && std::string(e.what()).size() > 0) {
      passed++;
    } else {
      failed++;
      std::fprintf(stderr, "%s: status %u (%s), wanted %s\n", what, static_cast<unsigned>(e.status()),
                   e.what(), convoy_status_str(status));
    }
  }
}

const char *SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
const char *FRANCE = "What is the capital of France?";

std::vector<convoy::ChatMessage> chat(const std::string &user) {
  return {{"system", SYSTEM}, {"user", user}};
}

void test_without_engine(const std::string &) {
  CHECK(convoy::version() == CONVOY_VERSION);
  CHECK(convoy::abi_compatible());
  CHECK(convoy::backend() == "cpu" || convoy::backend() == "metal" || convoy::backend() == "cuda");
  expect_error(CONVOY_STATUS_MODEL_NOT_FOUND, [] { convoy::Engine e("/nonexistent/model.gguf"); },
               "bad model path");
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT,
               [] { convoy::Engine e("x", convoy::EngineConfig().max_batch_size(0)); },
               "max_batch_size 0");
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT,
               [] { convoy::Engine e(std::string("a\0b", 3)); }, "NUL in model path");
}

void test_model_info(const convoy::Engine &e) {
  convoy::ModelInfo m = e.model_info();
  CHECK(m.architecture == "llama");
  CHECK(m.vocab_size == 49152);
  CHECK(m.context_length > 0 && m.max_context == e.context_length());
  CHECK(m.has_chat_template);
  CHECK(!m.eos_token_ids.empty());
  CHECK(!m.name.empty() && !m.weight_dtype.empty() && m.backend == convoy::backend());
  CHECK(m.num_layers > 0 && m.hidden_size > 0 && m.num_heads > 0 && m.num_kv_heads > 0);
}

void test_tokenizer(const convoy::Engine &e) {
  std::string text = "Hello world! Tokenize, then detokenize: the round trip keeps the text.";
  std::vector<std::uint32_t> ids = e.tokenize(text, false);
  CHECK(!ids.empty() && ids.size() < text.size());
  CHECK(e.detokenize(ids, true) == text);
  // Longer than the wrapper's first 256-byte buffer: the snprintf-style retry path.
  std::string long_text;
  for (int i = 0; i < 40; i++) long_text += "The quick brown fox jumps over the lazy dog. ";
  long_text.pop_back();
  CHECK(e.detokenize(e.tokenize(long_text, false), true) == long_text);
  CHECK(e.detokenize({}, true).empty());
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT, [&] { e.detokenize({0xFFFFFFF0u}); },
               "detokenize an id outside the vocabulary");

  std::string rendered = e.render_chat(chat(long_text));
  CHECK(rendered.size() > long_text.size());  // the retry path again
  CHECK(rendered.find(long_text) != std::string::npos);
  CHECK(rendered.find(SYSTEM) != std::string::npos);
  CHECK(rendered.size() > e.render_chat(chat(long_text), false).size());  // + generation prompt
}

// Greedy generate() equals the concatenated stream of the same request; chat's known answer.
void test_generate_and_stream(const convoy::Engine &e) {
  // Everything is submitted first so that the requests share batches (cheaper on a CPU; the
  // outputs do not depend on batch companions).
  auto params = convoy::RequestParams().max_tokens(6);
  convoy::Request r = e.submit_text("The capital of France is", params);
  auto chat_params = convoy::RequestParams().max_tokens(20);
  convoy::Request chat_request = e.submit_chat(chat(FRANCE), chat_params);
  std::vector<std::uint32_t> prompt = e.tokenize(e.render_chat(chat(FRANCE)), false);
  CHECK(prompt.size() == 37);
  convoy::Request tokens_request = e.submit_tokens(prompt, chat_params);
  convoy::Request stop_request =
      e.submit_chat(chat(FRANCE), convoy::RequestParams().max_tokens(20).stop_strings({" Paris"}));
  std::string full = e.generate("The capital of France is", params);
  CHECK(!full.empty());

  // Streaming the same greedy request gives generate()'s text.
  CHECK(r.active());
  std::string streamed;
  int tokens = 0, finished = 0;
  std::optional<convoy::RequestStats> stats;
  convoy::FinishReason reason = convoy::FinishReason::None;
  while (r.active()) {
    std::optional<convoy::Event> ev = r.next(std::chrono::seconds(60));
    if (!ev) continue;
    CHECK(ev->request_id == r.id());
    streamed += ev->text;  // copy now: the view lives until the next poll
    if (ev->finished()) {
      finished++;
      reason = ev->finish_reason;
      stats = ev->stats;
      CHECK(ev->error.empty());
    } else {
      tokens++;
      CHECK(!ev->stats);
    }
  }
  CHECK(streamed == full);
  CHECK(finished == 1);
  CHECK(reason == convoy::FinishReason::Length || reason == convoy::FinishReason::Stop);
  CHECK(stats && stats->generated_tokens == static_cast<std::uint32_t>(tokens));
  CHECK(stats && stats->prompt_tokens > 0 && stats->total_latency >= stats->time_to_first_token);
  // Polling a finished handle throws UNKNOWN_REQUEST; cancel says it already ended.
  expect_error(CONVOY_STATUS_UNKNOWN_REQUEST, [&] { r.next(std::chrono::milliseconds(0)); },
               "next after FINISHED");
  CHECK(!r.cancel());

  // Chat: the known answer; the same prompt as tokens gives the same output.
  convoy::Completion c = chat_request.wait();
  CHECK(c.text == "The capital of France is Paris.");
  CHECK(c.finish_reason == convoy::FinishReason::Stop);
  CHECK(c.stats.prompt_tokens == 37 && c.stats.generated_tokens == 8);
  convoy::Completion t = tokens_request.wait();
  CHECK(t.tokens == c.tokens && t.text == c.text);

  // A stop string ends the request early; it is not emitted.
  convoy::Completion stopped = stop_request.wait();
  CHECK(stopped.text == "The capital of France is");
  CHECK(stopped.finish_reason == convoy::FinishReason::Stop);

  // A batch of text prompts: handles in order, each the same greedy text as generate().
  std::vector<convoy::Request> batch =
      e.submit_text_batch({"The capital of France is", "Hi"}, params);
  CHECK(batch.size() == 2 && batch[1].id() == batch[0].id() + 1);
  CHECK(batch[0].wait().text == full);
  CHECK(batch[1].wait().text == e.generate("Hi", params));
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT, [&] { e.submit_text_batch({}, params); },
               "empty batch");
}

// Text prompts of different lengths for the one-thread serving test (short: prefill is the
// slow part on a CPU).
const char *PROMPTS[4] = {
    "The capital of France is",
    "Hi",
    "def fibonacci(n):",
    "The sky is blue because sunlight is scattered by the molecules of the air, and",
};

// 32 requests served from one thread through poll_any equal sequential generate() outputs.
// The engine is built with a log callback and moved before use: both must survive the move.
void test_poll_any(const std::string &model) {
  std::mutex mu;
  std::size_t log_lines = 0;
  convoy::Engine a(model, convoy::EngineConfig().max_batch_size(32).log([&](std::string_view line) {
    std::lock_guard<std::mutex> lock(mu);
    log_lines += !line.empty();
  }));
  convoy::Engine e = std::move(a);
  CHECK(a.get() == nullptr && e.get() != nullptr);
  expect_error(CONVOY_STATUS_NULL_POINTER, [&] { a.stats(); }, "moved-from engine");

  auto params = convoy::RequestParams().max_tokens(6);
  std::vector<std::string> expected;
  for (const char *p : PROMPTS) expected.push_back(e.generate(p, params));

  const int n = 32;
  std::vector<convoy::Request> requests;
  std::map<std::uint64_t, int> index;  // request id -> prompt
  for (int i = 0; i < n; i++) {
    requests.push_back(e.submit_text(PROMPTS[i % 4], params));
    index[requests.back().id()] = i % 4;
  }
  std::map<std::uint64_t, std::string> text;
  std::map<std::uint64_t, int> finished;
  int done = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (done < n && std::chrono::steady_clock::now() < deadline) {
    std::optional<convoy::Event> ev = e.poll_any(std::chrono::seconds(1));
    if (!ev) continue;
    CHECK(index.count(ev->request_id) == 1);
    text[ev->request_id] += ev->text;  // copy: the view lives until the next poll
    if (ev->finished()) {
      finished[ev->request_id]++;
      done++;
    }
  }
  CHECK(done == n);
  int equal = 0;
  for (const auto &kv : index) {
    const std::string &want = expected[static_cast<std::size_t>(kv.second)];
    if (finished[kv.first] == 1 && text[kv.first] == want) {
      equal++;
    } else {
      std::fprintf(stderr, "request %llu: \"%s\" != \"%s\"\n",
                   static_cast<unsigned long long>(kv.first), text[kv.first].c_str(), want.c_str());
    }
  }
  CHECK(equal == n);
  // Nothing more to poll; the handles' destructors release nothing (already finished).
  CHECK(!e.poll_any(std::chrono::milliseconds(0)));
  requests.clear();
  CHECK(e.stats().requests_held == 0);

  // A detached request lives on and is served by poll_any.
  std::uint64_t id = e.submit_text("Hello", convoy::RequestParams().max_tokens(2)).detach();
  int events = 0;
  for (;;) {
    std::optional<convoy::Event> ev = e.poll_any(std::chrono::seconds(30));
    CHECK(ev.has_value());
    if (!ev) break;
    CHECK(ev->request_id == id);
    events++;
    if (ev->finished()) break;
  }
  CHECK(events >= 1 && events <= 3);
  CHECK(e.stats().requests_held == 0);

  // One log line per finished request, written on the engine thread (maybe just after the
  // FINISHED event is delivered).
  const std::size_t want_lines = 4 + n + 1;
  for (int i = 0; i < 100; i++) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (log_lines >= want_lines) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::lock_guard<std::mutex> lock(mu);
  CHECK(log_lines == want_lines);
}

void test_cancel_abandon_and_errors(const convoy::Engine &e) {
  auto long_params = convoy::RequestParams().max_tokens(500).ignore_eos();
  // Cancel after the first token: FINISHED with reason Cancelled, exactly once.
  convoy::Request r = e.submit_text("Count from one to one thousand:", long_params);
  convoy::Event first = r.next();
  CHECK(first.kind == convoy::EventKind::Token);
  CHECK(r.cancel());
  convoy::Completion c = r.wait();
  CHECK(c.finish_reason == convoy::FinishReason::Cancelled);
  CHECK(c.stats.generated_tokens < 500);
  CHECK(!r.active() && !r.cancel());
  // Engine::cancel by id on a finished request.
  CHECK(!e.cancel(r.id()));

  // Abandoning handles releases their requests: one mid-decode, one never polled, one
  // moved-from (the move target is abandoned).
  {
    convoy::Request a = e.submit_text("Count from one to one thousand:", long_params);
    convoy::Request b = e.submit_text("Tell me a long story.", long_params);
    convoy::Request moved = e.submit_text("Another long one.", long_params);
    convoy::Request target = std::move(moved);
    CHECK(!moved.active() && target.active());
    a.next();
    CHECK(e.stats().requests_held == 3);
  }
  CHECK(e.stats().requests_held == 0);
  // Move assignment releases the overwritten request.
  {
    convoy::Request a = e.submit_text("One", long_params);
    std::uint64_t old_id = a.id();
    a = e.submit_text("Two", long_params);
    CHECK(a.id() != old_id && !e.cancel(old_id));
    CHECK(e.stats().requests_held == 1);
  }
  CHECK(e.stats().requests_held == 0);
  convoy::EngineStats s = e.stats();
  CHECK(CONVOY_HAS_FIELD(&s, convoy_engine_stats, prefilling) && s.struct_size <= sizeof(convoy::EngineStats) && s.requests_finished > 0);

  // Errors carry the status and the library's message.
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT,
               [&] { e.submit_text("Hi", convoy::RequestParams().max_tokens(0)); },
               "max_tokens 0");
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT, [&] { e.generate(std::string("a\0b", 3)); },
               "NUL in prompt");
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT,
               [&] { e.submit_tokens({1, 0xFFFFFFF0u}, convoy::RequestParams().max_tokens(2)); },
               "token outside the vocabulary");
  try {
    e.submit_text("Hi", convoy::RequestParams().max_tokens(0));
  } catch (const convoy::Error &err) {
    CHECK(std::string(err.what()).find("max_tokens") != std::string::npos);
  }
  convoy::Request empty;
  expect_error(CONVOY_STATUS_UNKNOWN_REQUEST, [&] { empty.next(std::chrono::milliseconds(0)); },
               "next on an empty handle");
}

// The prefix cache: a repeated chat reuses its cached prompt; a saved cache warms a new
// engine (the config copies the path); a wrong file name is refused.
void test_prefix_cache(const std::string &model) {
  std::string dir = (std::filesystem::temp_directory_path() / "convoy-wrapper-XXXXXX").string();
  CHECK(mkdtemp(&dir[0]) != nullptr);
  const std::string file = dir + "/cache.safetensors";
  auto params = convoy::RequestParams().max_tokens(20);
  std::uint64_t entries = 0;
  {
    convoy::Engine e(model, convoy::EngineConfig().prefix_cache_bytes(std::uint64_t{64} << 20));
    convoy::Completion first = e.submit_chat(chat(FRANCE), params).wait();
    convoy::Completion again = e.submit_chat(chat(FRANCE), params).wait();
    CHECK(first.stats.cached_tokens == 0);
    CHECK(again.stats.cached_tokens > 0 && again.stats.cached_tokens < again.stats.prompt_tokens);
    CHECK(again.tokens == first.tokens && again.text == "The capital of France is Paris.");
    convoy::EngineStats s = e.stats();
    CHECK(CONVOY_HAS_FIELD(&s, convoy_engine_stats, prefix_cache_evictions));
    CHECK(s.prefix_cache_hits >= 1 && s.prefix_cache_hit_tokens >= again.stats.cached_tokens);
    CHECK(s.prefix_cache_entries > 0 && s.prefix_cache_bytes > 0 && s.prefix_cache_bytes <= (64u << 20));
    entries = e.save_prefix_cache(file);
    CHECK(entries > 0 && std::filesystem::is_regular_file(file));
    expect_error(CONVOY_STATUS_INVALID_ARGUMENT, [&] { e.save_prefix_cache(dir + "/x.bin"); },
                 "save_prefix_cache to x.bin");
  }
  {
    convoy::EngineConfig config;
    {
      std::string path = file;  // gone before the engine is created: the config keeps a copy
      config.prefix_cache_path(path);
    }
    convoy::Engine warm(model, config);
    CHECK(warm.stats().prefix_cache_entries == entries);
    convoy::Completion c = warm.submit_chat(chat(FRANCE), params).wait();
    CHECK(c.text == "The capital of France is Paris." && c.stats.cached_tokens > 0);
  }
  expect_error(CONVOY_STATUS_INVALID_ARGUMENT,
               [&] { convoy::Engine e(model, convoy::EngineConfig().prefix_cache_path(dir + "/x.bin")); },
               "prefix_cache_path x.bin");
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace

int main(int argc, char **argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL\n", argv[0]);
    return 2;
  }
  std::string model = argv[1];
  auto timed = [](const char *name, auto f) {
    auto t0 = std::chrono::steady_clock::now();
    try {
      f();
    } catch (const std::exception &ex) {
      failed++;
      std::fprintf(stderr, "%s: unexpected exception: %s\n", name, ex.what());
    }
    std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    std::printf("%-28s %6.2f s\n", name, dt.count());
    std::fflush(stdout);
  };
  timed("without engine", [&] { test_without_engine(model); });
  convoy::Engine engine(model);
  timed("model info", [&] { test_model_info(engine); });
  timed("tokenizer", [&] { test_tokenizer(engine); });
  timed("generate and stream", [&] { test_generate_and_stream(engine); });
  timed("cancel, abandon, errors", [&] { test_cancel_abandon_and_errors(engine); });
  timed("poll_any: 32 requests, log", [&] { test_poll_any(model); });
  timed("prefix cache: save, reload", [&] { test_prefix_cache(model); });
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
