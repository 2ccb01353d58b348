/* Force-included when bindgen parses mlx-c on non-aarch64 targets: yields exactly the Rust
 * types mlx-rs expects (`float16_t` becomes bindgen's __BindgenFloat16(u16), `bfloat16_t`
 * becomes u16) and enables the half-precision entry points. */
#include <stdint.h>
typedef __fp16 float16_t;
typedef uint16_t bfloat16_t;
#define HAS_FLOAT16
#define HAS_BFLOAT16
