/* convoy demo: one engine, four host threads, four chat requests streaming at once.
 *
 * Build and run: make demo  (or: cc -std=c11 examples/demo.c -Iinclude -Ltarget/release
 *                             -lconvoy -lpthread -Wl,-rpath,target/release)
 * Usage: demo [MODEL_PATH]
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convoy.h"

#define N_THREADS 4

static const char *SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
static const char *QUESTIONS[N_THREADS] = {
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Explain in two sentences what a CPU does.",
};

typedef struct {
  const convoy_engine *engine;
  int index;
  char answer[4096];
  convoy_request_stats stats;
  convoy_status status;
} job;

static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;

static void *run(void *arg) {
  job *j = (job *)arg;
  convoy_chat_message chat[2];
  convoy_chat_message_init(&chat[0], sizeof chat[0], "system", SYSTEM);
  convoy_chat_message_init(&chat[1], sizeof chat[1], "user", QUESTIONS[j->index]);
  convoy_request_params params;
  convoy_request_params_init(&params, sizeof params);
  params.max_tokens = 64;
  uint64_t id = 0;
  j->status = convoy_engine_submit_chat(j->engine, chat, 2, &params, &id);
  if (j->status != CONVOY_STATUS_OK) return NULL;
  for (;;) {
    convoy_event ev;
    convoy_event_init(&ev, sizeof ev);
    convoy_status st = convoy_engine_poll(j->engine, id, 1000, &ev);
    if (st == CONVOY_STATUS_TIMEOUT) continue;
    if (st != CONVOY_STATUS_OK) { j->status = st; return NULL; }
    if (ev.text_len > 0) {
      strncat(j->answer, ev.text, sizeof(j->answer) - strlen(j->answer) - 1);
      pthread_mutex_lock(&print_lock);
      printf("[%d] %s\n", j->index + 1, ev.text);
      fflush(stdout);
      pthread_mutex_unlock(&print_lock);
    }
    if (ev.kind == CONVOY_EVENT_KIND_FINISHED) {
      j->stats = *ev.stats;
      return NULL;
    }
  }
}

static void print_log(void *user, const char *line) {
  (void)user;
  pthread_mutex_lock(&print_lock);
  printf("log: %s\n", line);
  pthread_mutex_unlock(&print_lock);
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : getenv("CONVOY_MODEL");
  if (!path) {
    fprintf(stderr, "usage: %s MODEL_PATH (or set CONVOY_MODEL)\n", argv[0]);
    return 2;
  }
  printf("convoy %s (MLX backend: %s)\nloading %s\n", convoy_version(), convoy_backend(), path);
  convoy_engine_config cfg;
  convoy_engine_config_init(&cfg, sizeof cfg);
  cfg.log_callback = print_log;
  convoy_engine *engine = NULL;
  convoy_status st = convoy_engine_create(path, &cfg, &engine);
  if (st != CONVOY_STATUS_OK) {
    char msg[512];
    convoy_last_error_message(msg, sizeof msg);
    fprintf(stderr, "convoy_engine_create: %s: %s\n", convoy_status_str(st), msg);
    return 1;
  }
  pthread_t threads[N_THREADS];
  job jobs[N_THREADS];
  for (int i = 0; i < N_THREADS; i++) {
    memset(&jobs[i], 0, sizeof jobs[i]);
    jobs[i].engine = engine;
    jobs[i].index = i;
    pthread_create(&threads[i], NULL, run, &jobs[i]);
  }
  int failed = 0;
  for (int i = 0; i < N_THREADS; i++) pthread_join(threads[i], NULL);
  printf("\n");
  for (int i = 0; i < N_THREADS; i++) {
    if (jobs[i].status != CONVOY_STATUS_OK) {
      printf("[%d] failed: %s\n", i + 1, convoy_status_str(jobs[i].status));
      failed = 1;
      continue;
    }
    printf("[%d] Q: %s\n    A: %s\n    (%u prompt tokens, %u generated, TTFT %.0f ms, %.1f tok/s)\n", i + 1,
           QUESTIONS[i], jobs[i].answer, jobs[i].stats.prompt_tokens, jobs[i].stats.generated_tokens,
           jobs[i].stats.time_to_first_token * 1e3, jobs[i].stats.generation_tokens_per_second);
  }
  convoy_engine_destroy(engine);
  return failed;
}
