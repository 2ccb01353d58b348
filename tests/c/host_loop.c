/* One host thread serves 256 concurrent requests with convoy_engine_poll_any: no thread per
 * request, no spinning over ids. Some requests are cancelled after their first token, some
 * released right after submit. Checks: every request that was not released ends exactly
 * once; no event follows a FINISHED or a release; uncancelled greedy outputs equal the same
 * prompt run alone; nothing is held afterwards. Prints "N passed, M failed". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convoy.h"

static int passed = 0, failed = 0;
#define CHECK(cond)                                                                \
  do {                                                                             \
    if (cond) {                                                                    \
      passed++;                                                                    \
    } else {                                                                       \
      failed++;                                                                    \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);     \
    }                                                                              \
  } while (0)

#define N_REQUESTS 256
#define N_PROMPTS 8
#define MAX_TOKENS 4

static const char *PROMPTS[N_PROMPTS] = {
    "The capital of France is",
    "One, two, three, four,",
    "Water boils at a temperature of",
    "The opposite of hot is",
    "Monday, Tuesday, Wednesday,",
    "The largest planet in the solar system is",
    "A, B, C, D,",
    "Roses are red, violets are",
};

typedef struct {
  uint64_t id;
  int prompt;
  int cancel;   /* cancel after the first token */
  int released; /* released right after submit */
  int tokens;
  int finished;
  convoy_finish_reason reason;
  uint32_t token_ids[MAX_TOKENS];
} request;

static request reqs[N_REQUESTS];

static request *find(uint64_t id) {
  for (int i = 0; i < N_REQUESTS; i++)
    if (reqs[i].id == id) return &reqs[i];
  return NULL;
}

int main(int argc, char **argv) {
  const char *model = argc > 1 ? argv[1] : getenv("CONVOY_MODEL");
  if (!model) {
    fprintf(stderr, "usage: host_loop MODEL\n");
    return 2;
  }
  convoy_engine_config cfg;
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.max_batch_size = 16;
  cfg.max_waiting = 512;
  convoy_engine *e = NULL;
  if (convoy_engine_create(model, &cfg, &e) != CONVOY_STATUS_OK) {
    char msg[512];
    convoy_last_error_message(msg, sizeof msg);
    fprintf(stderr, "create failed: %s\n", msg);
    return 1;
  }
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = MAX_TOKENS;
  convoy_event ev;
  convoy_event_init(&ev, sizeof ev);

  /* Each prompt alone, for reference. */
  uint32_t alone[N_PROMPTS][MAX_TOKENS];
  int alone_n[N_PROMPTS];
  for (int k = 0; k < N_PROMPTS; k++) {
    uint64_t id;
    CHECK(convoy_engine_submit_text(e, PROMPTS[k], &p, &id) == CONVOY_STATUS_OK);
    alone_n[k] = 0;
    for (;;) {
      convoy_status st = convoy_engine_poll(e, id, 1000, &ev);
      if (st == CONVOY_STATUS_TIMEOUT) continue;
      CHECK(st == CONVOY_STATUS_OK);
      if (st != CONVOY_STATUS_OK || ev.kind == CONVOY_EVENT_KIND_FINISHED) break;
      alone[k][alone_n[k]++] = ev.token;
    }
  }

  /* 256 at once, served from this thread only. */
  int live = 0;
  for (int i = 0; i < N_REQUESTS; i++) {
    request *r = &reqs[i];
    r->prompt = i % N_PROMPTS;
    r->cancel = i % 9 == 4;
    CHECK(convoy_engine_submit_text(e, PROMPTS[r->prompt], &p, &r->id) == CONVOY_STATUS_OK);
    if (i % 13 == 6) {
      CHECK(convoy_engine_release(e, r->id) == CONVOY_STATUS_OK);
      r->released = 1;
    } else {
      live++;
    }
  }
  /* Fails only if no event at all arrives for two minutes (a stuck engine), never on speed. */
  int idle = 0, events = 0;
  while (live > 0 && idle < 1200) {
    convoy_status st = convoy_engine_poll_any(e, 100, &ev);
    if (st == CONVOY_STATUS_TIMEOUT) {
      idle++;
      continue;
    }
    idle = 0;
    CHECK(st == CONVOY_STATUS_OK);
    if (st != CONVOY_STATUS_OK) break;
    events++;
    request *r = find(ev.request_id);
    CHECK(r != NULL);
    if (!r) continue;
    CHECK(!r->released);  /* nothing after a release */
    CHECK(r->finished == 0); /* nothing after FINISHED */
    if (ev.kind == CONVOY_EVENT_KIND_TOKEN) {
      if (r->tokens < MAX_TOKENS) r->token_ids[r->tokens] = ev.token;
      r->tokens++;
      if (r->cancel && r->tokens == 1) CHECK(convoy_engine_cancel(e, r->id) == CONVOY_STATUS_OK);
    } else {
      r->finished++;
      r->reason = ev.finish_reason;
      CHECK(ev.stats != NULL && ev.stats->generated_tokens == (uint32_t)r->tokens);
      live--;
    }
  }
  CHECK(live == 0);

  int equal = 0, cancelled = 0;
  for (int i = 0; i < N_REQUESTS; i++) {
    request *r = &reqs[i];
    if (r->released) {
      CHECK(convoy_engine_poll(e, r->id, 0, &ev) == CONVOY_STATUS_UNKNOWN_REQUEST);
      continue;
    }
    CHECK(r->finished == 1);
    CHECK(convoy_engine_poll(e, r->id, 0, &ev) == CONVOY_STATUS_UNKNOWN_REQUEST);
    if (r->reason == CONVOY_FINISH_REASON_CANCELLED) {
      cancelled++;
      CHECK(r->cancel);
      continue;
    }
    CHECK(r->reason == CONVOY_FINISH_REASON_LENGTH || r->reason == CONVOY_FINISH_REASON_STOP);
    int same = r->tokens == alone_n[r->prompt] &&
               memcmp(r->token_ids, alone[r->prompt], sizeof(uint32_t) * (size_t)r->tokens) == 0;
    if (!same) fprintf(stderr, "request %d (prompt %d) differs from its output alone\n", i, r->prompt);
    CHECK(same);
    equal += same;
  }
  /* Nothing left for anyone. */
  CHECK(convoy_engine_poll_any(e, 0, &ev) == CONVOY_STATUS_TIMEOUT);
  convoy_engine_stats s;
  convoy_engine_stats_init(&s, sizeof s);
  CHECK(convoy_engine_get_stats(e, &s) == CONVOY_STATUS_OK);
  CHECK(s.requests_held == 0 && s.running == 0 && s.waiting == 0);
  printf("host loop: %d requests, %d events, %d equal to alone, %d cancelled\n", N_REQUESTS,
         events, equal, cancelled);
  convoy_engine_destroy(e);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
