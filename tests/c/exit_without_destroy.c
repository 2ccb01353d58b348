/* A host that exits (returns from main / calls exit) while an engine is mid-work, without
 * convoy_engine_destroy, must exit cleanly: convoy's exit hook stops the engine thread before
 * MLX's static objects are destroyed (before the hook, about 1 run in 5 crashed in MLX's
 * destructors). Usage: exit_without_destroy MODEL DELAY_MS [exit|return]. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "convoy.h"

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  convoy_engine *e;
  if (convoy_engine_create(argv[1], NULL, &e) != CONVOY_STATUS_OK) return 3;
  convoy_request_params p;
  convoy_request_params_init(&p, sizeof p);
  p.max_tokens = 200;
  p.ignore_eos = true;
  uint64_t id;
  for (int i = 0; i < 4; i++) {
    if (convoy_engine_submit_text(e, "Tell me a long story about the sea.", &p, &id) != CONVOY_STATUS_OK)
      return 4;
  }
  long ms = atol(argv[2]);
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
  printf("exiting with the engine running\n");
  fflush(stdout);
  if (argc > 3 && strcmp(argv[3], "return") == 0) return 0;
  exit(0);
}
