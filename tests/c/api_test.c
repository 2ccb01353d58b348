/* Exercises the C API through the generated header only. Compiled as C11 and as C++17 with
 * warnings as errors, linked against the shared and the static library (tests/c_api.rs).
 * Exit code 0 = all checks passed; prints "N passed, M failed". */
#define _POSIX_C_SOURCE 200809L /* mkdtemp under -std=c11 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convoy.h"

static int passed = 0, failed = 0;
#define CHECK(cond)                                                   \
  do {                                                                \
    if (cond) {                                                       \
      passed++;                                                       \
    } else {                                                          \
      failed++;                                                       \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                 \
  } while (0)

static const char *SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

typedef struct {
  int tokens;
  int finished;
  convoy_finish_reason reason;
  uint32_t generated; /* from the FINISHED event's stats */
  uint32_t cached;    /* its cached_tokens, if the library has the field */
  int has_cached;
  char text[2048];
} outcome;

/* Polls until FINISHED; counts events. Returns the last poll status. */
static convoy_status drain(const convoy_engine *e, uint64_t id, outcome *o) {
  memset(o, 0, sizeof *o);
  for (int spins = 0; spins < 600; spins++) {
    convoy_event ev;
    convoy_event_init(&ev, sizeof ev);
    convoy_status st = convoy_engine_poll(e, id, 1000, &ev);
    if (st == CONVOY_STATUS_TIMEOUT) continue;
    if (st != CONVOY_STATUS_OK) return st;
    CHECK(ev.request_id == id);
    CHECK(ev.text != NULL && ev.error != NULL && strlen(ev.text) == ev.text_len);
    strncat(o->text, ev.text, sizeof(o->text) - strlen(o->text) - 1);
    if (ev.kind == CONVOY_EVENT_KIND_TOKEN) {
      o->tokens++;
      CHECK(ev.stats == NULL);
      /* Not asked for: none (this file's requests ask only in test_logprobs). */
      CHECK(!ev.has_logprobs && ev.n_top == 0 && ev.top_tokens == NULL && ev.top_logprobs == NULL);
    }
    if (ev.kind == CONVOY_EVENT_KIND_FINISHED) {
      o->finished++;
      o->reason = ev.finish_reason;
      /* The library has every field of this header (its size ends at the last field:
       * tail padding never counts). */
      CHECK(ev.stats != NULL && CONVOY_HAS_FIELD(ev.stats, convoy_request_stats, cached_tokens));
      o->generated = ev.stats->generated_tokens;
      o->has_cached = CONVOY_HAS_FIELD(ev.stats, convoy_request_stats, cached_tokens);
      if (o->has_cached) o->cached = ev.stats->cached_tokens;
      /* Exactly one terminal event: the id is unknown afterwards. */
      CHECK(convoy_engine_poll(e, id, 0, &ev) == CONVOY_STATUS_UNKNOWN_REQUEST);
      CHECK(convoy_engine_cancel(e, id) == CONVOY_STATUS_UNKNOWN_REQUEST);
      return CONVOY_STATUS_OK;
    }
  }
  return CONVOY_STATUS_TIMEOUT;
}

static void test_without_engine(void) {
  CHECK(strcmp(convoy_version(), CONVOY_VERSION) == 0);
  CHECK(strcmp(convoy_status_str(CONVOY_STATUS_BUSY), "engine busy: the waiting queue is full") == 0);
  CHECK(strcmp(convoy_status_str(9999), "unknown status") == 0);
  convoy_engine *e = (convoy_engine *)0x1;
  CHECK(convoy_engine_create(NULL, NULL, &e) == CONVOY_STATUS_NULL_POINTER);
  CHECK(e == (convoy_engine *)0x1); /* out-param untouched on failure */
  char msg[256];
  CHECK(convoy_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "model_path") != NULL);
  CHECK(convoy_engine_create("/nonexistent/model.gguf", NULL, &e) == CONVOY_STATUS_MODEL_NOT_FOUND);
  const char bad_utf8[] = {'/', 't', 'm', 'p', '/', (char)0xff, (char)0xfe, 0};
  CHECK(convoy_engine_create(bad_utf8, NULL, &e) == CONVOY_STATUS_INVALID_UTF8);
  CHECK(convoy_engine_create("x", NULL, NULL) == CONVOY_STATUS_NULL_POINTER);
  convoy_engine_config cfg;
  CHECK(convoy_engine_config_init(&cfg, sizeof cfg) == CONVOY_STATUS_OK);
  CHECK(convoy_engine_config_init(NULL, sizeof cfg) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_config_init(&cfg, 3) == CONVOY_STATUS_INVALID_ARGUMENT);
  CHECK(cfg.prefix_cache_bytes == 512u << 20 && cfg.prefix_cache_path == NULL);
  cfg.mode = 99;
  CHECK(convoy_engine_create("x", &cfg, &e) == CONVOY_STATUS_INVALID_ARGUMENT);
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.max_batch_size = 0;
  CHECK(convoy_engine_create("x", &cfg, &e) == CONVOY_STATUS_INVALID_ARGUMENT);
  /* A config whose struct_size was never set is refused, not read blindly. */
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.struct_size = 0;
  CHECK(convoy_engine_create("x", &cfg, &e) == CONVOY_STATUS_INVALID_ARGUMENT);
  CHECK(convoy_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "struct_size") != NULL);
  CHECK(convoy_abi_version() == CONVOY_ABI_VERSION);
  /* Calls on a NULL engine. */
  uint64_t id;
  convoy_event ev;
  convoy_event_init(&ev, sizeof ev);
  convoy_engine_stats stats;
  convoy_engine_stats_init(&stats, sizeof stats);
  CHECK(convoy_engine_poll_any(NULL, 0, &ev) == CONVOY_STATUS_NULL_POINTER);
  size_t n = 0;
  CHECK(convoy_engine_tokenize(NULL, "hi", true, NULL, 0, &n) == CONVOY_STATUS_NULL_POINTER);
  convoy_model_info info;
  CHECK(convoy_model_info_init(&info, sizeof info) == CONVOY_STATUS_OK);
  CHECK(convoy_engine_model_info(NULL, &info) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_submit_text(NULL, "hi", NULL, &id) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_poll(NULL, 1, 0, &ev) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_cancel(NULL, 1) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_get_stats(NULL, &stats) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_save_prefix_cache(NULL, "cache.safetensors", NULL) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_context_length(NULL) == 0);
  convoy_engine_destroy(NULL); /* harmless */
  convoy_last_error_message(NULL, 0);
}

/* Tokenize, detokenize, render a chat, model info: snprintf-style buffers. */
static void test_utilities(const convoy_engine *e) {
  size_t n = 0;
  CHECK(convoy_engine_tokenize(e, "Hello world", false, NULL, 0, &n) == CONVOY_STATUS_OK && n == 2);
  uint32_t ids[8] = {0};
  uint32_t canary = 0xdeadbeef;
  ids[1] = canary;
  CHECK(convoy_engine_tokenize(e, "Hello world", false, ids, 1, &n) == CONVOY_STATUS_OK && n == 2);
  CHECK(ids[1] == canary); /* cut at the capacity */
  CHECK(convoy_engine_tokenize(e, "Hello world", false, ids, 8, &n) == CONVOY_STATUS_OK && n == 2);
  CHECK(convoy_engine_tokenize(e, "Hello", false, NULL, 3, &n) == CONVOY_STATUS_NULL_POINTER);
  char text[64];
  size_t len = 0;
  CHECK(convoy_engine_detokenize(e, ids, n, true, text, sizeof text, &len) == CONVOY_STATUS_OK);
  CHECK(len == 11 && strcmp(text, "Hello world") == 0);
  CHECK(convoy_engine_detokenize(e, ids, n, true, text, 6, &len) == CONVOY_STATUS_OK);
  CHECK(len == 11 && strcmp(text, "Hello") == 0); /* truncated, NUL-terminated */
  CHECK(convoy_engine_detokenize(e, ids, n, true, NULL, 0, &len) == CONVOY_STATUS_OK && len == 11);
  uint32_t bad = 49152;
  CHECK(convoy_engine_detokenize(e, &bad, 1, true, text, sizeof text, &len) == CONVOY_STATUS_INVALID_ARGUMENT);
  uint32_t special = 2; /* <|im_end|> */
  CHECK(convoy_engine_detokenize(e, &special, 1, false, text, sizeof text, &len) == CONVOY_STATUS_OK);
  CHECK(strcmp(text, "<|im_end|>") == 0);
  CHECK(convoy_engine_detokenize(e, &special, 1, true, text, sizeof text, &len) == CONVOY_STATUS_OK && len == 0);

  convoy_chat_message chat[2];
  convoy_chat_message_init(&chat[0], sizeof chat[0], "system", SYSTEM);
  convoy_chat_message_init(&chat[1], sizeof chat[1], "user", "Hi there");
  CHECK(convoy_engine_render_chat(e, chat, 2, true, NULL, 0, &len) == CONVOY_STATUS_OK && len > 0);
  char *rendered = (char *)malloc(len + 1);
  size_t len2 = 0;
  CHECK(convoy_engine_render_chat(e, chat, 2, true, rendered, len + 1, &len2) == CONVOY_STATUS_OK);
  CHECK(len2 == len && strlen(rendered) == len);
  CHECK(strstr(rendered, "<|im_start|>user\nHi there<|im_end|>") != NULL);
  CHECK(len > 22 && strcmp(rendered + len - 22, "<|im_start|>assistant\n") == 0);
  free(rendered);
  CHECK(convoy_engine_render_chat(e, chat, 2, false, text, sizeof text, &len2) == CONVOY_STATUS_OK);
  CHECK(len2 < len);
  /* A struct_size ending inside a field: whole fields only, so `role` is missing (found by
   * the c_api fuzz target: a pointer half from the caller, half default, crashed). */
  convoy_chat_message half = chat[1];
  half.struct_size = 13;
  CHECK(convoy_engine_render_chat(e, &half, 1, true, text, sizeof text, &len2) == CONVOY_STATUS_NULL_POINTER);
  chat[1].struct_size = 0;
  CHECK(convoy_engine_render_chat(e, chat, 2, true, text, sizeof text, &len2) == CONVOY_STATUS_INVALID_ARGUMENT);
  /* The rendered chat tokenizes to what submit_chat prefills (its prompt_tokens). */

  convoy_model_info info;
  CHECK(convoy_model_info_init(&info, sizeof info) == CONVOY_STATUS_OK);
  CHECK(convoy_engine_model_info(e, &info) == CONVOY_STATUS_OK);
  CHECK(CONVOY_HAS_FIELD(&info, convoy_model_info, max_context) && info.struct_size <= sizeof info);
  CHECK(strcmp(info.architecture, "llama") == 0 && strlen(info.name) > 0);
  CHECK(info.vocab_size == 49152 && info.context_length == 8192 && info.max_context == 8192);
  CHECK(info.n_eos_token_ids >= 1 && info.eos_token_ids != NULL && info.eos_token_ids[0] < info.vocab_size);
  CHECK(info.has_chat_template && (!info.has_bos_token || info.bos_token_id < info.vocab_size));
  CHECK(strcmp(info.backend, convoy_backend()) == 0 && strcmp(info.weight_dtype, "float32") == 0);
  CHECK(info.num_layers == 30 && info.hidden_size == 576 && info.num_heads == 9 && info.num_kv_heads == 3);
}

static void test_engine(const char *model, int full) {
  convoy_engine_config cfg;
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.max_batch_size = 2;
  cfg.max_waiting = 3;
  cfg.prefill_chunk = 8;
  convoy_engine *e = NULL;
  convoy_status st = convoy_engine_create(model, &cfg, &e);
  CHECK(st == CONVOY_STATUS_OK && e != NULL);
  if (st != CONVOY_STATUS_OK) {
    char msg[512];
    convoy_last_error_message(msg, sizeof msg);
    fprintf(stderr, "create failed: %s\n", msg);
    return;
  }
  CHECK(convoy_engine_context_length(e) == 8192);
  test_utilities(e);

  /* Garbage arguments. */
  uint64_t id = 0;
  convoy_event ev;
  convoy_event_init(&ev, sizeof ev);
  const char bad_utf8[] = {'h', (char)0xc3, 0};
  CHECK(convoy_engine_submit_text(e, bad_utf8, NULL, &id) == CONVOY_STATUS_INVALID_UTF8);
  CHECK(convoy_engine_submit_text(e, NULL, NULL, &id) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_submit_text(e, "hi", NULL, NULL) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_submit_tokens(e, NULL, 3, NULL, &id) == CONVOY_STATUS_NULL_POINTER);
  uint32_t huge_token = 4000000000u;
  CHECK(convoy_engine_submit_tokens(e, &huge_token, 1, NULL, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  CHECK(convoy_engine_submit_chat(e, NULL, 0, NULL, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  p.top_p = -3.0f;
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = 0;
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  convoy_request_params_init(&p, sizeof p);
  p.n_stop_strings = 2; /* with a NULL array */
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_poll(e, 123456, 0, &ev) == CONVOY_STATUS_UNKNOWN_REQUEST);
  CHECK(convoy_engine_poll(e, 1, 0, NULL) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_cancel(e, 123456) == CONVOY_STATUS_UNKNOWN_REQUEST);

  /* The known answer, with a stop string in another request. */
  convoy_chat_message chat[2] = {{sizeof(convoy_chat_message), "system", SYSTEM},
                                 {sizeof(convoy_chat_message), "user", "What is the capital of France?"}};
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = 20;
  outcome o;
  CHECK(convoy_engine_submit_chat(e, chat, 2, &p, &id) == CONVOY_STATUS_OK);
  CHECK(drain(e, id, &o) == CONVOY_STATUS_OK);
  CHECK(o.finished == 1 && o.reason == CONVOY_FINISH_REASON_STOP && o.tokens == 8 && o.generated == 8);
  CHECK(strcmp(o.text, "The capital of France is Paris.") == 0);
  const char *stops[1] = {"France is"};
  p.stop_strings = stops;
  p.n_stop_strings = 1;
  CHECK(convoy_engine_submit_chat(e, chat, 2, &p, &id) == CONVOY_STATUS_OK);
  CHECK(drain(e, id, &o) == CONVOY_STATUS_OK);
  CHECK(strcmp(o.text, "The capital of ") == 0 && o.reason == CONVOY_FINISH_REASON_STOP);

  /* A batch: three prompts of each kind, queued as one. */
  {
    convoy_batch_request batch[3];
    for (int i = 0; i < 3; i++) CHECK(convoy_batch_request_init(&batch[i], sizeof batch[i]) == CONVOY_STATUS_OK);
    convoy_request_params chat_p, short_p;
    convoy_request_params_init(&chat_p, sizeof chat_p);
    chat_p.max_tokens = 20;
    convoy_request_params_init(&short_p, sizeof short_p);
    short_p.max_tokens = 5;
    short_p.ignore_eos = true;
    const uint32_t tokens[3] = {504, 3458, 314};
    batch[0].messages = chat;
    batch[0].n_messages = 2;
    batch[0].params = &chat_p;
    batch[1].text = "Count from one to ten.";
    batch[1].params = &short_p;
    batch[2].tokens = tokens;
    batch[2].n_tokens = 3;
    batch[2].params = &short_p;
    uint64_t ids[3] = {0, 0, 0};
    char msg[256];
    /* Bad batches queue nothing and leave out_ids untouched. */
    CHECK(convoy_engine_submit_batch(e, batch, 0, ids) == CONVOY_STATUS_INVALID_ARGUMENT);
    CHECK(convoy_engine_submit_batch(e, batch, 3, NULL) == CONVOY_STATUS_NULL_POINTER);
    CHECK(convoy_engine_submit_batch(e, NULL, 3, ids) == CONVOY_STATUS_NULL_POINTER);
    convoy_batch_request bad[4];
    memcpy(bad, batch, sizeof batch);
    bad[1].tokens = tokens; /* text and tokens both set */
    bad[1].n_tokens = 3;
    CHECK(convoy_engine_submit_batch(e, bad, 3, ids) == CONVOY_STATUS_INVALID_ARGUMENT);
    CHECK(convoy_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "request 1 of the batch") != NULL);
    memcpy(bad, batch, sizeof batch);
    bad[2].text = bad_utf8;
    bad[2].tokens = NULL;
    bad[2].n_tokens = 0;
    CHECK(convoy_engine_submit_batch(e, bad, 3, ids) == CONVOY_STATUS_INVALID_UTF8);
    CHECK(convoy_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "request 2 of the batch") != NULL);
    memcpy(bad, batch, sizeof batch);
    bad[3] = batch[1];
    CHECK(convoy_engine_submit_batch(e, bad, 4, ids) == CONVOY_STATUS_INVALID_ARGUMENT); /* > max_waiting */
    CHECK(ids[0] == 0 && ids[1] == 0 && ids[2] == 0);
    convoy_engine_stats before;
    convoy_engine_stats_init(&before, sizeof before);
    CHECK(convoy_engine_get_stats(e, &before) == CONVOY_STATUS_OK && before.waiting == 0 && before.running == 0);

    CHECK(convoy_engine_submit_batch(e, batch, 3, ids) == CONVOY_STATUS_OK);
    CHECK(ids[0] > id && ids[1] == ids[0] + 1 && ids[2] == ids[1] + 1);
    CHECK(drain(e, ids[0], &o) == CONVOY_STATUS_OK);
    CHECK(o.finished == 1 && strcmp(o.text, "The capital of France is Paris.") == 0);
    for (int i = 1; i < 3; i++) {
      CHECK(drain(e, ids[i], &o) == CONVOY_STATUS_OK);
      CHECK(o.finished == 1 && o.tokens == 5 && o.reason == CONVOY_FINISH_REASON_LENGTH);
    }
  }

  /* Cancel during decode. */
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = 400;
  p.ignore_eos = true;
  uint64_t decoding;
  CHECK(convoy_engine_submit_text(e, "Tell me a long story.", &p, &decoding) == CONVOY_STATUS_OK);
  do {
    st = convoy_engine_poll(e, decoding, 1000, &ev);
  } while (st == CONVOY_STATUS_TIMEOUT);
  CHECK(st == CONVOY_STATUS_OK && ev.kind == CONVOY_EVENT_KIND_TOKEN);

  /* Cancel during prefill: a long prompt in chunks of 8 tokens. */
  char long_prompt[4096] = "";
  for (int i = 0; i < 40; i++) strcat(long_prompt, "The quick brown fox jumps over the lazy dog. ");
  uint64_t prefilling;
  CHECK(convoy_engine_submit_text(e, long_prompt, &p, &prefilling) == CONVOY_STATUS_OK);
  CHECK(convoy_engine_cancel(e, prefilling) == CONVOY_STATUS_OK);
  CHECK(convoy_engine_cancel(e, decoding) == CONVOY_STATUS_OK);
  CHECK(drain(e, prefilling, &o) == CONVOY_STATUS_OK);
  CHECK(o.finished == 1 && o.reason == CONVOY_FINISH_REASON_CANCELLED && o.tokens == 0);
  CHECK(drain(e, decoding, &o) == CONVOY_STATUS_OK);
  /* One token was polled before drain. */
  CHECK(o.finished == 1 && o.reason == CONVOY_FINISH_REASON_CANCELLED && o.tokens < 399 && o.generated == (uint32_t)o.tokens + 1);

  convoy_engine_stats stats;
  convoy_engine_stats_init(&stats, sizeof stats);
  CHECK(convoy_engine_get_stats(e, &stats) == CONVOY_STATUS_OK);
  CHECK(CONVOY_HAS_FIELD(&stats, convoy_engine_stats, prefilling) && stats.struct_size <= sizeof stats);
  CHECK(stats.tokens_generated > 0 && stats.steps > 0 && stats.requests_finished == 7);

  if (full) {
    /* Busy when the queue is full: 2 rows decode, 3 may wait, the rest are refused. */
    uint64_t ids[12];
    int accepted = 0, busy = 0;
    convoy_request_params_init(&p, sizeof p);
    p.max_tokens = 24;
    p.ignore_eos = true;
    for (int i = 0; i < 12; i++) {
      st = convoy_engine_submit_text(e, "Count from one to ten.", &p, &ids[accepted]);
      if (st == CONVOY_STATUS_OK) accepted++;
      else if (st == CONVOY_STATUS_BUSY) busy++;
    }
    CHECK(busy > 0 && accepted + busy == 12);
    for (int i = 0; i < accepted; i++) {
      CHECK(drain(e, ids[i], &o) == CONVOY_STATUS_OK);
      CHECK(o.finished == 1 && o.tokens == 24 && o.generated == 24 && o.reason == CONVOY_FINISH_REASON_LENGTH);
    }
  }

  /* Destroy with requests in flight. */
  for (int i = 0; i < 3; i++) convoy_engine_submit_text(e, "Write a poem.", &p, &id);
  convoy_engine_destroy(e);
}

/* The prefix cache: a repeated chat reuses its prompt's KV and gives the same tokens; a saved
 * cache warms a new engine; bad paths are refused. */
static void test_prefix_cache(const char *model) {
  char dir[256], file[300], bad[300];
  const char *tmp = getenv("TMPDIR");
  snprintf(dir, sizeof dir, "%s/convoy-api-test-XXXXXX", tmp != NULL && *tmp ? tmp : "/tmp");
  if (mkdtemp(dir) == NULL) {
    CHECK(!"mkdtemp");
    return;
  }
  snprintf(file, sizeof file, "%s/cache.safetensors", dir);
  snprintf(bad, sizeof bad, "%s/x.bin", dir);
  const uint64_t budget = (uint64_t)64 << 20;
  convoy_engine_config cfg;
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.prefix_cache_bytes = budget;
  convoy_engine *e = NULL;
  CHECK(convoy_engine_create(model, &cfg, &e) == CONVOY_STATUS_OK && e != NULL);
  if (e == NULL) {
    remove(dir);
    return;
  }
  convoy_chat_message chat[2] = {{sizeof(convoy_chat_message), "system", SYSTEM},
                                 {sizeof(convoy_chat_message), "user", "What is the capital of France?"}};
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = 20;
  uint64_t id;
  outcome first, second;
  CHECK(convoy_engine_submit_chat(e, chat, 2, &p, &id) == CONVOY_STATUS_OK);
  CHECK(drain(e, id, &first) == CONVOY_STATUS_OK);
  CHECK(first.has_cached && first.cached == 0);
  CHECK(convoy_engine_submit_chat(e, chat, 2, &p, &id) == CONVOY_STATUS_OK);
  CHECK(drain(e, id, &second) == CONVOY_STATUS_OK);
  CHECK(second.has_cached && second.cached > 0);
  CHECK(second.tokens == first.tokens && strcmp(second.text, first.text) == 0);
  CHECK(strcmp(second.text, "The capital of France is Paris.") == 0);

  convoy_engine_stats stats;
  convoy_engine_stats_init(&stats, sizeof stats);
  CHECK(convoy_engine_get_stats(e, &stats) == CONVOY_STATUS_OK);
  CHECK(CONVOY_HAS_FIELD(&stats, convoy_engine_stats, prefix_cache_evictions));
  CHECK(stats.prefix_cache_hits > 0 && stats.prefix_cache_hit_tokens >= second.cached);
  CHECK(stats.prefix_cache_entries > 0 && stats.prefix_cache_bytes > 0 && stats.prefix_cache_bytes <= budget);

  uint64_t entries = 0, untouched = 77;
  CHECK(convoy_engine_save_prefix_cache(e, file, &entries) == CONVOY_STATUS_OK && entries > 0);
  CHECK(convoy_engine_save_prefix_cache(e, file, NULL) == CONVOY_STATUS_OK); /* replaces it */
  CHECK(convoy_engine_save_prefix_cache(e, NULL, &untouched) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_save_prefix_cache(e, bad, &untouched) == CONVOY_STATUS_INVALID_ARGUMENT);
  char msg[512];
  CHECK(convoy_last_error_message(msg, sizeof msg) > 0);
  const char bad_utf8[] = {'/', 't', 'm', 'p', '/', (char)0xff, '.', 's', 'a', 'f', 'e', 't', 'e', 'n', 's', 'o', 'r', 's', 0};
  CHECK(convoy_engine_save_prefix_cache(e, bad_utf8, &untouched) == CONVOY_STATUS_INVALID_UTF8);
  CHECK(untouched == 77); /* out-param untouched on failure */
  convoy_engine_destroy(e);

  /* A new engine starts with the saved entries and reuses them at once. */
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.prefix_cache_path = file;
  e = NULL;
  CHECK(convoy_engine_create(model, &cfg, &e) == CONVOY_STATUS_OK && e != NULL);
  if (e != NULL) {
    convoy_engine_stats_init(&stats, sizeof stats);
    CHECK(convoy_engine_get_stats(e, &stats) == CONVOY_STATUS_OK);
    CHECK(stats.prefix_cache_entries > 0 && stats.prefix_cache_entries == entries);
    CHECK(convoy_engine_submit_chat(e, chat, 2, &p, &id) == CONVOY_STATUS_OK);
    CHECK(drain(e, id, &second) == CONVOY_STATUS_OK);
    CHECK(second.has_cached && second.cached > 0 && strcmp(second.text, first.text) == 0);
    convoy_engine_destroy(e);
  }
  /* Not a .safetensors name: refused before the model loads. */
  cfg.prefix_cache_path = bad;
  e = NULL;
  CHECK(convoy_engine_create(model, &cfg, &e) == CONVOY_STATUS_INVALID_ARGUMENT && e == NULL);
  CHECK(remove(file) == 0 && remove(dir) == 0); /* nothing else was left in the folder */
}

/* Log-probabilities on request: every TOKEN event carries the token's and the top n, most
 * likely first; for a greedy request the token is the most likely one. */
static void test_logprobs(const char *model) {
  convoy_engine *e = NULL;
  CHECK(convoy_engine_create(model, NULL, &e) == CONVOY_STATUS_OK);
  if (!e) return;
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  CHECK(!p.logprobs && p.top_logprobs == 0);
  uint64_t id = 0;
  p.logprobs = true;
  p.top_logprobs = 21;
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  p.top_logprobs = 3;
  p.max_tokens = 6;
  p.ignore_eos = true;
  CHECK(convoy_engine_submit_text(e, "What is the capital of France?", &p, &id) == CONVOY_STATUS_OK);
  int tokens = 0, finished = 0;
  for (int spins = 0; spins < 600 && !finished; spins++) {
    convoy_event ev;
    convoy_event_init(&ev, sizeof ev);
    convoy_status st = convoy_engine_poll(e, id, 1000, &ev);
    if (st == CONVOY_STATUS_TIMEOUT) continue;
    CHECK(st == CONVOY_STATUS_OK);
    if (st != CONVOY_STATUS_OK) break;
    if (ev.kind == CONVOY_EVENT_KIND_FINISHED) {
      finished = 1;
      CHECK(!ev.has_logprobs && ev.n_top == 0);
      continue;
    }
    tokens++;
    CHECK(ev.has_logprobs && ev.n_top == 3 && ev.top_tokens != NULL && ev.top_logprobs != NULL);
    if (ev.n_top != 3 || !ev.top_tokens || !ev.top_logprobs) continue;
    CHECK(ev.logprob <= 0.0f && ev.top_logprobs[0] >= ev.top_logprobs[1] &&
          ev.top_logprobs[1] >= ev.top_logprobs[2]);
    /* Greedy: the chosen token is a most likely one (compared by value: ties). */
    float d = ev.top_logprobs[0] - ev.logprob;
    CHECK(d < 1e-4f && d > -1e-4f);
  }
  CHECK(finished && tokens == 6);
  convoy_engine_destroy(e);
}

/* Structured output: a JSON schema and a regex constrain the whole output; bad constraints
 * and kinds are INVALID_ARGUMENT with a message, and nothing is queued for them. */
static void test_constraints(const char *model) {
  convoy_engine *e = NULL;
  CHECK(convoy_engine_create(model, NULL, &e) == CONVOY_STATUS_OK);
  if (!e) return;
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  CHECK(p.constraint_kind == CONVOY_CONSTRAINT_KIND_NONE && p.constraint == NULL);
  uint64_t id = 0;
  char msg[512];
  p.constraint_kind = CONVOY_CONSTRAINT_KIND_REGEX;
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_NULL_POINTER);
  p.constraint = "[0-9";
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  CHECK(convoy_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "regex") != NULL);
  p.constraint_kind = 9;
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  CHECK(convoy_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "constraint_kind") != NULL);
  p.constraint_kind = CONVOY_CONSTRAINT_KIND_JSON_SCHEMA;
  p.constraint = "{\"type\": \"objectx\"}";
  CHECK(convoy_engine_submit_text(e, "hi", &p, &id) == CONVOY_STATUS_INVALID_ARGUMENT);
  CHECK(convoy_last_error_message(msg, sizeof msg) > 0 && strstr(msg, "objectx") != NULL);

  const char *prompts[2] = {"Describe a cat as JSON: ", "Is the sea salty? Answer: "};
  const char *constraints[2] = {
      "{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\", "
      "\"maxLength\": 16}, \"legs\": {\"type\": \"integer\", \"minimum\": 0, "
      "\"maximum\": 8}}, \"required\": [\"name\", \"legs\"], \"additionalProperties\": false}",
      "(yes|no)\\."};
  uint32_t kinds[2] = {CONVOY_CONSTRAINT_KIND_JSON_SCHEMA, CONVOY_CONSTRAINT_KIND_REGEX};
  uint64_t ids[2] = {0, 0};
  for (int i = 0; i < 2; i++) {
    convoy_request_params_init(&p, sizeof p);
    p.max_tokens = 60;
    p.constraint_kind = kinds[i];
    p.constraint = constraints[i];
    CHECK(convoy_engine_submit_text(e, prompts[i], &p, &ids[i]) == CONVOY_STATUS_OK);
  }
  for (int i = 0; i < 2; i++) {
    char text[1024] = {0};
    size_t len = 0;
    convoy_finish_reason reason = CONVOY_FINISH_REASON_NONE;
    for (int spins = 0; spins < 600 && reason == CONVOY_FINISH_REASON_NONE; spins++) {
      convoy_event ev;
      convoy_event_init(&ev, sizeof ev);
      convoy_status st = convoy_engine_poll(e, ids[i], 1000, &ev);
      if (st == CONVOY_STATUS_TIMEOUT) continue;
      CHECK(st == CONVOY_STATUS_OK);
      if (st != CONVOY_STATUS_OK) break;
      size_t n = strlen(ev.text);
      if (len + n < sizeof text) {
        memcpy(text + len, ev.text, n);
        len += n;
      }
      if (ev.kind == CONVOY_EVENT_KIND_FINISHED) reason = ev.finish_reason;
    }
    CHECK(reason == CONVOY_FINISH_REASON_STOP);
    if (i == 0) {
      CHECK(strncmp(text, "{\"name\": \"", 10) == 0 && strstr(text, "\"legs\": ") != NULL &&
            text[len - 1] == '}');
    } else {
      CHECK(strcmp(text, "yes.") == 0 || strcmp(text, "no.") == 0);
    }
  }
  convoy_engine_destroy(e);
}

int main(int argc, char **argv) {
  const char *model = argc > 1 ? argv[1] : getenv("CONVOY_MODEL");
  int full = argc > 2 && strcmp(argv[2], "full") == 0;
  test_without_engine();
  if (model) {
    test_engine(model, full);
    test_prefix_cache(model);
    test_logprobs(model);
    test_constraints(model);
  }
  else fprintf(stderr, "no model given: engine checks skipped\n");
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 && model ? 0 : 1;
}
