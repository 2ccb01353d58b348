/* ABI v1 struct-size rules, seen from hosts built against other headers.
 *
 * Built twice by tests/c_api.rs:
 * - with OLD_HEADER defined, against tests/c/old-header/convoy.h, a frozen header whose
 *   size-prefixed structs lack their last fields (a host compiled against an older 1.x
 *   header): convoy must read only the fields the host's structs have (the rest keeps its
 *   defaults) and write no byte past them;
 * - against the current header, with structs claiming to be larger than the library's (a host
 *   compiled against a newer header): convoy ignores the tail it does not know, writes only its
 *   own size and says so in struct_size.
 * Prints "N passed, M failed". */
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

#define CANARY 0xA5
#define EXTRA 64

/* A struct of `size` bytes followed by EXTRA canary bytes. */
static unsigned char *sized(size_t size) {
  unsigned char *p = (unsigned char *)malloc(size + EXTRA);
  memset(p, CANARY, size + EXTRA);
  return p;
}

static int canary_intact(const unsigned char *p, size_t from, size_t to) {
  for (size_t i = from; i < to; i++)
    if (p[i] != CANARY) return 0;
  return 1;
}

/* Polls request `id` (or any request, with `any`) into an event of `event_size` bytes until
 * FINISHED; returns the tokens (at most 8 kept in `out`). */
static int drain(const convoy_engine *e, uint64_t id, uint32_t *out, size_t event_size, int any) {
  unsigned char *buf = sized(event_size);
  convoy_event *ev = (convoy_event *)(void *)buf;
  CHECK(convoy_event_init(ev, event_size) == CONVOY_STATUS_OK);
  int n = 0;
  for (;;) {
    convoy_status st = any ? convoy_engine_poll_any(e, 1000, ev) : convoy_engine_poll(e, id, 1000, ev);
    if (st == CONVOY_STATUS_TIMEOUT) continue;
    CHECK(st == CONVOY_STATUS_OK);
    if (st != CONVOY_STATUS_OK) break;
    /* At most min(host size, library size) bytes written, none beyond the host's. */
    CHECK(ev->struct_size <= event_size);
    CHECK(canary_intact(buf, event_size, event_size + EXTRA));
    CHECK(ev->request_id == id);
    if (ev->kind == CONVOY_EVENT_KIND_FINISHED) {
#ifndef OLD_HEADER
      /* Stats convoy owns carry the library's size: the end of its last field, not sizeof
       * (tail padding never counts). */
      CHECK(ev->stats != NULL && ev->stats->struct_size == offsetof(convoy_request_stats, cached_tokens) + 4);
      CHECK(CONVOY_HAS_FIELD(ev->stats, convoy_request_stats, cached_tokens));
#endif
      break;
    }
    if (n < 8) out[n] = ev->token;
    n++;
  }
  free(buf);
  return n;
}

/* Greedy tokens of `prompt` with `params` (NULL: defaults), at most 8. */
static int run(const convoy_engine *e, const char *prompt, const convoy_request_params *params,
               uint32_t *out, size_t event_size, int any) {
  uint64_t id;
  if (convoy_engine_submit_text(e, prompt, params, &id) != CONVOY_STATUS_OK) return -1;
  return drain(e, id, out, event_size, any);
}

int main(int argc, char **argv) {
  const char *model = argc > 1 ? argv[1] : getenv("CONVOY_MODEL");
  if (!model) {
    fprintf(stderr, "usage: abi_compat MODEL\n");
    return 2;
  }
  CHECK(convoy_abi_version() == CONVOY_ABI_VERSION);
#ifdef OLD_HEADER
  const size_t grow = 0; /* the host's structs are smaller than the library's */
#else
  const size_t grow = 32; /* the host claims larger structs than the library knows */
#endif

  /* The config: init writes only the host's bytes; create reads only them. */
  size_t cfg_size = sizeof(convoy_engine_config) + grow;
  unsigned char *cfg_buf = sized(cfg_size);
  convoy_engine_config *cfg = (convoy_engine_config *)(void *)cfg_buf;
  CHECK(convoy_engine_config_init(cfg, cfg_size) == CONVOY_STATUS_OK);
  CHECK(cfg->struct_size == cfg_size);
  CHECK(canary_intact(cfg_buf, cfg_size, cfg_size + EXTRA));
  CHECK(cfg->max_batch_size == 8);
  cfg->max_batch_size = 2;
  /* Garbage in the tail a newer header would own is ignored. An old host's struct is followed
   * by zeros: reading past it would take max_kv_bytes = 0, which create refuses. */
  memset(cfg_buf + sizeof(convoy_engine_config), grow ? 0x7f : 0, grow ? grow : EXTRA);
  convoy_engine *e = NULL;
  CHECK(convoy_engine_create(model, cfg, &e) == CONVOY_STATUS_OK);
  if (!e) return 1;

  /* Request params of the host's size give the same greedy output as the defaults. */
  size_t p_size = sizeof(convoy_request_params) + grow;
  unsigned char *p_buf = sized(p_size);
  convoy_request_params *p = (convoy_request_params *)(void *)p_buf;
  CHECK(convoy_request_params_init(p, p_size) == CONVOY_STATUS_OK);
  CHECK(canary_intact(p_buf, p_size, p_size + EXTRA));
  p->max_tokens = 6;
  memset(p_buf + sizeof(convoy_request_params), 0x7f, grow);
  uint32_t a[8], b[8];
  int na = run(e, "The capital of France is", p, a, sizeof(convoy_event) + grow, 0);
  convoy_request_params full;
  convoy_request_params_init(&full, sizeof full);
  full.max_tokens = 6;
  int nb = run(e, "The capital of France is", &full, b, sizeof(convoy_event), 0);
  CHECK(na == 6 && na == nb && memcmp(a, b, sizeof(uint32_t) * 6) == 0);
  /* The same through poll_any. */
  int nc = run(e, "The capital of France is", p, b, sizeof(convoy_event) + grow, 1);
  CHECK(nc == 6 && memcmp(a, b, sizeof(uint32_t) * 6) == 0);

  /* Chat messages of the host's size: the array's stride is the first element's size. */
  size_t m_size = sizeof(convoy_chat_message) + grow;
  unsigned char *m_buf = sized(2 * m_size);
  for (int i = 0; i < 2; i++) {
    convoy_chat_message *m = (convoy_chat_message *)(void *)(m_buf + (size_t)i * m_size);
    CHECK(convoy_chat_message_init(m, m_size, i ? "user" : "system",
                                   i ? "What is the capital of France?" : "Be brief.") == CONVOY_STATUS_OK);
  }
  uint64_t chat_id;
  CHECK(convoy_engine_submit_chat(e, (const convoy_chat_message *)(void *)m_buf, 2, p, &chat_id) ==
        CONVOY_STATUS_OK);
  CHECK(drain(e, chat_id, a, sizeof(convoy_event) + grow, 0) > 0);
  free(m_buf);
  /* A smaller-than-anything struct_size is refused, not read. */
  p->struct_size = 2;
  uint64_t id;
  CHECK(convoy_engine_submit_text(e, "x", p, &id) == CONVOY_STATUS_INVALID_ARGUMENT);

  /* Stats and model info: written up to the host's size (or the library's, if smaller). */
  size_t s_size = sizeof(convoy_engine_stats) + grow;
  unsigned char *s_buf = sized(s_size);
  convoy_engine_stats *s = (convoy_engine_stats *)(void *)s_buf;
  s->struct_size = (uint32_t)s_size; /* only struct_size set: the rest is canary bytes */
  CHECK(convoy_engine_get_stats(e, s) == CONVOY_STATUS_OK);
  CHECK(s->requests_finished == 4 && s->struct_size <= s_size);
  CHECK(canary_intact(s_buf, s->struct_size, s_size + EXTRA));

  size_t i_size = sizeof(convoy_model_info) + grow;
  unsigned char *i_buf = sized(i_size);
  convoy_model_info *info = (convoy_model_info *)(void *)i_buf;
  CHECK(convoy_model_info_init(info, i_size) == CONVOY_STATUS_OK);
  CHECK(convoy_engine_model_info(e, info) == CONVOY_STATUS_OK);
  CHECK(info->vocab_size == 49152 && strcmp(info->architecture, "llama") == 0);
  CHECK(canary_intact(i_buf, i_size, i_size + EXTRA));
#ifdef OLD_HEADER
  /* The library wrote every field of the host's (smaller) structs, whole fields only, none
   * past the host's sizeof (a newer field may land in the host's own tail padding). */
  CHECK(CONVOY_HAS_FIELD(s, convoy_engine_stats, active_memory_bytes));
  CHECK(s->struct_size <= sizeof(convoy_engine_stats));
  CHECK(CONVOY_HAS_FIELD(info, convoy_model_info, num_heads));
  CHECK(info->struct_size <= sizeof(convoy_model_info));
#else
  /* The library wrote its own fields and said so (the end of its last field: tail padding,
   * where a later release may append a field, never counts); the host can test fields. */
  CHECK(s->struct_size == offsetof(convoy_engine_stats, prefix_cache_evictions) + 8);
  CHECK(CONVOY_HAS_FIELD(s, convoy_engine_stats, prefilling));
  CHECK(CONVOY_HAS_FIELD(s, convoy_engine_stats, prefix_cache_evictions));
  CHECK(info->struct_size == offsetof(convoy_model_info, max_context) + 4);
  CHECK(CONVOY_HAS_FIELD(info, convoy_model_info, max_context) && info->max_context > 0);
  CHECK(canary_intact(s_buf, s->struct_size, s_size + EXTRA));
  /* A field appended in the tail padding of today's struct is reported absent. */
  CHECK(info->struct_size < offsetof(convoy_model_info, max_context) + 8);
#endif
  convoy_engine_destroy(e);
  free(cfg_buf);
  free(p_buf);
  free(s_buf);
  free(i_buf);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
