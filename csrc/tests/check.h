// Tiny test helpers shared by the C++ tests (no framework): EXPECT counts and
// reports failures, expect_value_error checks an op's error message.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>
#include <exception>
#include <string>

namespace tsv_fast_test {

inline int failures = 0;

#define EXPECT(cond, ...)                                         \
  do {                                                            \
    if (!(cond)) {                                                \
      ++::tsv_fast_test::failures;                                \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);   \
      std::fprintf(stderr, __VA_ARGS__);                          \
      std::fprintf(stderr, "\n");                                 \
    }                                                             \
  } while (0)

template <typename F>
void expect_value_error(const char* what, const char* needle, F&& f) {
  try {
    f();
    EXPECT(false, "%s: no error raised", what);
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT(msg.find(needle) != std::string::npos, "%s: message '%s' lacks '%s'", what, msg.c_str(),
           needle);
  } catch (const std::exception& e) {
    EXPECT(false, "%s: raised the wrong exception type: %s", what, e.what());
  }
}

}  // namespace tsv_fast_test
