/* Force-included (-include) into every mlx-c translation unit on non-Apple targets.
 *
 * 1. GCC 12's libstdc++ has no <format>; mlx-c only uses std::format with "{}" placeholders,
 *    so a minimal stand-in is enough.
 * 2. mlx-c's half.h declares float16/bfloat16 entry points only on aarch64, but mlx-rs calls
 *    them unconditionally. MLX's own half types (a struct holding uint16 bits on x86) have the
 *    same calling convention as the u16 wrappers bindgen produces.
 */
#ifndef CONVOY_LINUX_COMPAT_H
#define CONVOY_LINUX_COMPAT_H
#ifdef __cplusplus

#include <version>
#if !defined(__cpp_lib_format)
#include <sstream>
#include <string>
#include <string_view>
namespace std {
namespace convoy_detail {
inline void format_rest(std::ostringstream& out, std::string_view fmt) { out << fmt; }
template <typename T, typename... Rest>
void format_rest(std::ostringstream& out, std::string_view fmt, const T& value,
                 const Rest&... rest) {
  auto pos = fmt.find("{}");
  if (pos == std::string_view::npos) {
    out << fmt;
    return;
  }
  out << fmt.substr(0, pos) << value;
  format_rest(out, fmt.substr(pos + 2), rest...);
}
}  // namespace convoy_detail
template <typename... Args>
std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream out;
  convoy_detail::format_rest(out, fmt, args...);
  return out.str();
}
}  // namespace std
#endif

/* __has_include: CMake's compiler probe compiles without MLX on the include path. */
#if !defined(__aarch64__) && __has_include(<mlx/types/half_types.h>)
#include <mlx/types/half_types.h>
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef mlx::core::float16_t float16_t;
typedef mlx::core::bfloat16_t bfloat16_t;
#endif

#endif /* __cplusplus */
#endif
