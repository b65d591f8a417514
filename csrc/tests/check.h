// Tiny test helpers shared by the C++ tests (no framework): EXPECT counts and
// reports failures, expect_value_error checks an op's error message.
#pragma once

#include <c10/util/Exception.h>

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

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

// Unit roundoff of a dtype: one rounding of the output is allowed on top of the accumulation error.
inline double eps_of(c10::ScalarType t) {
  switch (t) {
    case c10::kDouble: return 2.220446049250313e-16;
    case c10::kFloat: return 1.1920928955078125e-07;
    case c10::kHalf: return 9.765625e-04;
    default: return 7.8125e-03;  // bfloat16
  }
}

// Every element of got[] within (1e-12 or 1e-5)·scale + one rounding in out_t of ref.
inline void expect_close(const std::string& what, const double* got, const std::vector<double>& ref,
                         const std::vector<double>& scale, bool f64, c10::ScalarType out_t) {
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double tol = (f64 ? 1e-12 : 1e-5) * scale[i] + eps_of(out_t) * std::fabs(ref[i]) + 1e-30;
    const double err = std::fabs(got[i] - ref[i]);
    if (!(err <= tol)) ++bad, worst = std::max(worst, err);
  }
  EXPECT(bad == 0, "%s: %d elements out of tolerance (worst abs err %.3g)", what.c_str(), bad, worst);
}

}  // namespace tsv_fast_test
