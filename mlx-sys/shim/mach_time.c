/* mlx-rs seeds its default random key from mach_approximate_time(), which exists only on
 * Apple platforms. Elsewhere provide it: monotonic nanoseconds. */
#include <stdint.h>
#include <time.h>

uint64_t mach_approximate_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
