/* Regression tests, through the C API only, for failures found by checks from outside the
 * team (issue 7), plus the delivery guarantees the header promises:
 *   - cancelling a long prompt mid-prefill (grouped with a short one, while another request
 *     decodes) must not hang or corrupt the short one, and the engine must not spin;
 *   - several threads polling one id get exactly one FINISHED between them;
 *   - convoy_engine_release gives a request up; unpolled requests are bounded by
 *     max_requests (BUSY), and releasing them frees room;
 *   - any byte in a bool field and uninitialised out-parameters are handled.
 * Compiled as C11 and as C++17 with warnings as errors (tests/c_api.rs).
 * Usage: regressions MODEL. Prints "N passed, M failed"; exit 0 when all passed. */
#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime under -std=c11 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "convoy.h"

static int passed = 0, failed = 0;
static pthread_mutex_t check_lock = PTHREAD_MUTEX_INITIALIZER;
#define CHECK(cond)                                                                  \
  do {                                                                               \
    int ok_ = (cond) ? 1 : 0;                                                        \
    pthread_mutex_lock(&check_lock);                                                 \
    if (ok_) {                                                                       \
      passed++;                                                                      \
    } else {                                                                         \
      failed++;                                                                      \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);       \
    }                                                                                \
    pthread_mutex_unlock(&check_lock);                                               \
  } while (0)

static void sleep_ms(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct {
  int tokens;
  int finished;
  convoy_finish_reason reason;
  uint32_t token_ids[512];
} outcome;

/* Polls until FINISHED or `limit_s` seconds pass. Returns 1 if FINISHED came. */
static int drain(const convoy_engine *e, uint64_t id, outcome *o, double limit_s) {
  memset(o, 0, sizeof *o);
  double end = now_s() + limit_s;
  while (now_s() < end) {
    convoy_event ev;
    convoy_event_init(&ev, sizeof ev);
    convoy_status st = convoy_engine_poll(e, id, 200, &ev);
    if (st == CONVOY_STATUS_TIMEOUT) continue;
    if (st != CONVOY_STATUS_OK) return 0;
    if (ev.kind == CONVOY_EVENT_KIND_TOKEN) {
      if (o->tokens < 512) o->token_ids[o->tokens] = ev.token;
      o->tokens++;
    } else {
      o->finished++;
      o->reason = ev.finish_reason;
      return 1;
    }
  }
  return 0;
}

static convoy_engine *make_engine(const char *model, uint32_t prefill_chunk, uint32_t max_requests) {
  convoy_engine_config cfg;
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.max_batch_size = 4;
  cfg.prefill_chunk = prefill_chunk;
  cfg.max_requests = max_requests;
  convoy_engine *e = NULL;
  if (convoy_engine_create(model, &cfg, &e) != CONVOY_STATUS_OK) {
    char msg[512];
    convoy_last_error_message(msg, sizeof msg);
    fprintf(stderr, "create failed: %s\n", msg);
    return NULL;
  }
  return e;
}

/* Token ids of a synthetic prompt of `n` tokens (ordinary vocabulary ids). */
static void prompt_ids(uint32_t *ids, int n, uint32_t seed) {
  for (int i = 0; i < n; i++) ids[i] = 1000 + (seed * 7919u + (uint32_t)i * 104729u) % 20000u;
}

/* Issue 7, scenario 2. */
static void cancel_mid_prefill_does_not_hang_the_group_mate(const char *model) {
  static uint32_t short_prompt[20], long_prompt[1000], decoding_prompt[12];
  prompt_ids(short_prompt, 20, 1);
  prompt_ids(long_prompt, 1000, 2);
  prompt_ids(decoding_prompt, 12, 3);
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = 16;
  p.ignore_eos = true;

  /* The short prompt's output alone, for comparison. */
  convoy_engine *e = make_engine(model, 16, 1024);
  CHECK(e != NULL);
  if (!e) return;
  uint64_t id;
  outcome alone, o;
  CHECK(convoy_engine_submit_tokens(e, short_prompt, 20, &p, &id) == CONVOY_STATUS_OK);
  CHECK(drain(e, id, &alone, 120) && alone.tokens == 16);

  for (int delay_ms = 0; delay_ms <= 300; delay_ms += 150) {
    convoy_request_params dp;
    convoy_request_params_init(&dp, sizeof dp);
    dp.max_tokens = 200;
    dp.ignore_eos = true;
    uint64_t decoding, short_id, long_id;
    CHECK(convoy_engine_submit_tokens(e, decoding_prompt, 12, &dp, &decoding) == CONVOY_STATUS_OK);
    convoy_event ev;
    convoy_event_init(&ev, sizeof ev);
    convoy_status st;
    do {
      st = convoy_engine_poll(e, decoding, 1000, &ev);
    } while (st == CONVOY_STATUS_TIMEOUT);
    CHECK(st == CONVOY_STATUS_OK && ev.kind == CONVOY_EVENT_KIND_TOKEN);
    /* Both in one prefill group (one batch: two separate submits could straddle a step
     * boundary and start two groups), then a varying moment inside its prefill (16 prompt
     * tokens per step over two rows: the long prompt needs about 125 steps). */
    convoy_batch_request both[2];
    for (int r = 0; r < 2; r++) convoy_batch_request_init(&both[r], sizeof both[r]);
    both[0].tokens = short_prompt;
    both[0].n_tokens = 20;
    both[0].params = &p;
    both[1].tokens = long_prompt;
    both[1].n_tokens = 1000;
    both[1].params = &p;
    uint64_t both_ids[2] = {0, 0};
    CHECK(convoy_engine_submit_batch(e, both, 2, both_ids) == CONVOY_STATUS_OK);
    short_id = both_ids[0];
    long_id = both_ids[1];
    convoy_engine_stats s;
    convoy_engine_stats_init(&s, sizeof s);
    int in_prefill = 0;
    for (int i = 0; i < 2000 && !in_prefill; i++) {
      convoy_engine_get_stats(e, &s);
      in_prefill = s.prefilling == 2;
      if (!in_prefill) sleep_ms(5);
    }
    CHECK(in_prefill);
    sleep_ms(delay_ms);
    CHECK(convoy_engine_get_stats(e, &s) == CONVOY_STATUS_OK && s.prefilling == 2);
    CHECK(convoy_engine_cancel(e, long_id) == CONVOY_STATUS_OK);
    CHECK(drain(e, short_id, &o, 120));
    CHECK(o.finished == 1 && o.reason == CONVOY_FINISH_REASON_LENGTH && o.tokens == 16);
    CHECK(memcmp(o.token_ids, alone.token_ids, 16 * sizeof(uint32_t)) == 0);
    CHECK(drain(e, long_id, &o, 60) && o.reason == CONVOY_FINISH_REASON_CANCELLED);
    CHECK(convoy_engine_cancel(e, decoding) == CONVOY_STATUS_OK);
    CHECK(drain(e, decoding, &o, 60) && o.finished == 1);
    /* Idle now: the engine thread must not step (no spinning). */
    convoy_engine_stats a, b;
    convoy_engine_stats_init(&a, sizeof a);
    convoy_engine_stats_init(&b, sizeof b);
    sleep_ms(100);
    CHECK(convoy_engine_get_stats(e, &a) == CONVOY_STATUS_OK);
    sleep_ms(300);
    CHECK(convoy_engine_get_stats(e, &b) == CONVOY_STATUS_OK);
    CHECK(a.steps == b.steps && b.running == 0 && b.waiting == 0 && b.requests_held == 0);
    CHECK(b.kv_bytes == 0);
  }
  convoy_engine_destroy(e);
}

typedef struct {
  const convoy_engine *engine;
  uint64_t id;
  int tokens;
  int finished;
  int unknown;
} poller;

static void *poll_thread(void *arg) {
  poller *p = (poller *)arg;
  for (;;) {
    convoy_event ev;
    convoy_event_init(&ev, sizeof ev);
    convoy_status st = convoy_engine_poll(p->engine, p->id, 50, &ev);
    if (st == CONVOY_STATUS_TIMEOUT) continue;
    if (st == CONVOY_STATUS_UNKNOWN_REQUEST) {
      p->unknown++;
      return NULL;
    }
    if (st != CONVOY_STATUS_OK) return NULL;
    if (ev.kind == CONVOY_EVENT_KIND_TOKEN) p->tokens++;
    else p->finished++;
  }
}

/* Issue 7, scenario 3: exactly one FINISHED across all pollers of one id, whether the request
 * runs to its end, is cancelled, or is released. */
static void several_pollers_get_one_ending(const char *model) {
  convoy_engine *e = make_engine(model, 256, 1024);
  CHECK(e != NULL);
  if (!e) return;
  enum { POLLERS = 4 };
  for (int round = 0; round < 6; round++) {
    convoy_request_params p;
    convoy_request_params_init(&p, sizeof p);
    p.max_tokens = 12;
    p.ignore_eos = true;
    uint64_t id;
    CHECK(convoy_engine_submit_text(e, "Name three rivers.", &p, &id) == CONVOY_STATUS_OK);
    poller ps[POLLERS];
    pthread_t threads[POLLERS];
    for (int i = 0; i < POLLERS; i++) {
      memset(&ps[i], 0, sizeof ps[i]);
      ps[i].engine = e;
      ps[i].id = id;
      pthread_create(&threads[i], NULL, poll_thread, &ps[i]);
    }
    if (round % 3 == 1) {
      sleep_ms(150);
      convoy_status st = convoy_engine_cancel(e, id);
      CHECK(st == CONVOY_STATUS_OK || st == CONVOY_STATUS_UNKNOWN_REQUEST);
    }
    int released = 0;
    if (round % 3 == 2) {
      sleep_ms(150);
      convoy_status st = convoy_engine_release(e, id);
      released = st == CONVOY_STATUS_OK;
      CHECK(st == CONVOY_STATUS_OK || st == CONVOY_STATUS_UNKNOWN_REQUEST);
    }
    int tokens = 0, finished = 0, unknown = 0;
    for (int i = 0; i < POLLERS; i++) {
      pthread_join(threads[i], NULL);
      tokens += ps[i].tokens;
      finished += ps[i].finished;
      unknown += ps[i].unknown;
    }
    CHECK(unknown == POLLERS); /* everyone ends up seeing the id gone */
    if (released) {
      CHECK(finished <= 1 && tokens <= 12);
    } else {
      CHECK(finished == 1);
      if (round % 3 == 0) CHECK(tokens == 12);
    }
  }
  convoy_engine_stats s;
  convoy_engine_stats_init(&s, sizeof s);
  CHECK(convoy_engine_get_stats(e, &s) == CONVOY_STATUS_OK && s.requests_held == 0);
  convoy_engine_destroy(e);
}

/* Requests nobody polls are bounded and can be given up. */
static void unpolled_requests_are_bounded_and_releasable(const char *model) {
  convoy_engine *e = make_engine(model, 256, 6);
  CHECK(e != NULL);
  if (!e) return;
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = 3;
  uint64_t ids[6], extra;
  for (int i = 0; i < 6; i++) {
    CHECK(convoy_engine_submit_text(e, "Hello.", &p, &ids[i]) == CONVOY_STATUS_OK);
  }
  /* All six finish without being polled; they stay held, so a seventh is refused. */
  convoy_engine_stats s;
  convoy_engine_stats_init(&s, sizeof s);
  for (int i = 0; i < 200; i++) {
    convoy_engine_get_stats(e, &s);
    if (s.requests_finished == 6) break;
    sleep_ms(100);
  }
  CHECK(s.requests_finished == 6 && s.requests_held == 6);
  CHECK(convoy_engine_submit_text(e, "Hello.", &p, &extra) == CONVOY_STATUS_BUSY);
  for (int i = 0; i < 6; i++) CHECK(convoy_engine_release(e, ids[i]) == CONVOY_STATUS_OK);
  convoy_event ev;
  convoy_event_init(&ev, sizeof ev);
  CHECK(convoy_engine_poll(e, ids[0], 0, &ev) == CONVOY_STATUS_UNKNOWN_REQUEST);
  CHECK(convoy_engine_release(e, ids[0]) == CONVOY_STATUS_UNKNOWN_REQUEST);
  CHECK(convoy_engine_release(NULL, ids[0]) == CONVOY_STATUS_NULL_POINTER);
  CHECK(convoy_engine_get_stats(e, &s) == CONVOY_STATUS_OK && s.requests_held == 0);
  /* Room again; releasing a running request cancels it. */
  p.max_tokens = 400;
  p.ignore_eos = true;
  CHECK(convoy_engine_submit_text(e, "Tell me a story.", &p, &extra) == CONVOY_STATUS_OK);
  sleep_ms(200);
  CHECK(convoy_engine_release(e, extra) == CONVOY_STATUS_OK);
  for (int i = 0; i < 100; i++) {
    convoy_engine_get_stats(e, &s);
    if (s.running == 0 && s.waiting == 0) break;
    sleep_ms(100);
  }
  CHECK(s.running == 0 && s.waiting == 0 && s.requests_held == 0);
  convoy_engine_destroy(e);
}

/* Any byte in a bool field is read soundly (nonzero = true); of an out-parameter only its
 * struct_size is read: the rest may be uninitialised memory. */
static void odd_bools_and_uninitialised_out_params(const char *model) {
  convoy_engine *e = make_engine(model, 256, 1024);
  CHECK(e != NULL);
  if (!e) return;
  convoy_request_params *p = (convoy_request_params *)malloc(sizeof *p);
  convoy_request_params_init(p, sizeof *p);
  p->max_tokens = 4;
  memset(&p->ignore_eos, 0x7f, 1);
  memset(&p->has_seed, 0xff, 1);
  p->temperature = 0.7f;
  p->seed = 42;
  uint64_t *id = (uint64_t *)malloc(sizeof *id);
  CHECK(convoy_engine_submit_text(e, "Hi.", p, id) == CONVOY_STATUS_OK);
  convoy_event *ev = (convoy_event *)malloc(sizeof *ev);
  ev->struct_size = sizeof *ev;
  int tokens = 0;
  convoy_status st;
  do {
    st = convoy_engine_poll(e, *id, 1000, ev);
    if (st == CONVOY_STATUS_OK && ev->kind == CONVOY_EVENT_KIND_TOKEN) tokens++;
  } while (st == CONVOY_STATUS_TIMEOUT || (st == CONVOY_STATUS_OK && ev->kind == CONVOY_EVENT_KIND_TOKEN));
  CHECK(st == CONVOY_STATUS_OK && ev->finish_reason == CONVOY_FINISH_REASON_LENGTH && tokens == 4);
  convoy_engine_stats *s = (convoy_engine_stats *)malloc(sizeof *s);
  s->struct_size = sizeof *s;
  CHECK(convoy_engine_get_stats(e, s) == CONVOY_STATUS_OK && s->requests_finished == 1);
  free(s);
  free(ev);
  free(id);
  free(p);
  convoy_engine_destroy(e);
}

int main(int argc, char **argv) {
  const char *model = argc > 1 ? argv[1] : getenv("CONVOY_MODEL");
  if (!model) {
    fprintf(stderr, "usage: regressions MODEL\n");
    return 2;
  }
  cancel_mid_prefill_does_not_hang_the_group_mate(model);
  several_pollers_get_one_ending(model);
  unpolled_requests_are_bounded_and_releasable(model);
  odd_bools_and_uninitialised_out_params(model);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
