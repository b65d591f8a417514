// Input-check helpers shared by all tsv_fast ops.  Every check names the op,
// the argument and the problem, and runs before any kernel is launched.
// TORCH_CHECK_VALUE raises ValueError in Python, like the pure-PyTorch
// fallbacks in tsv_fast/ops.py, so callers see one exception type.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <utility>

namespace tsv_fast {
namespace checks {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), op, ": ", name,
              " must have a floating dtype (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
}

// A matrix (n, n) or a batch (B, n, n) in float32 or float64: the small-matrix ops'
// (batched_eigh, batched_cholesky_inverse) first checks.
inline void check_square_matrices(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, op, ": ", name,
                    " must be 2-D (n, n) or 3-D batched (B, n, n), got a ", t.dim(), "-D tensor of shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.size(-1) == t.size(-2), op, ": ", name,
                    " must be square (its last two dims equal), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                    " must have dtype float32 or float64, got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got a ",
              t.dim(), "-D tensor of shape ", t.sizes());
}

// t.size(d) == expected, where `what` explains where `expected` comes from.
inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d,
                       int64_t expected, const char* what, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.size(d) == expected, op, ": ", name, ".size(", d, ") must equal ", what,
              " = ", expected, ", but ", name, " has shape ", t.sizes(), " and ", ref_name,
              " has shape ", ref.sizes());
}

// alpha scales float32 (or float64) accumulators on every device: one rule for all of them
// (the CPU's ATen GEMMs refused an alpha beyond float32 while the kernels turned it into Inf).
inline void check_alpha(const char* op, double alpha) {
  TORCH_CHECK_VALUE(std::isfinite(alpha) && std::fabs(alpha) <= std::numeric_limits<float>::max(), op,
                    ": alpha must be a finite number within the float32 range "
                    "(|alpha| <= 3.4028234663852886e+38), got ", alpha);
}

inline void check_same_device(const char* op, std::initializer_list<NamedTensor> ts) {
  const NamedTensor& first = *ts.begin();
  for (const auto& nt : ts) {
    TORCH_CHECK_VALUE(nt.second->device() == first.second->device(), op, ": ", nt.first, " is on ",
                nt.second->device(), " but ", first.first, " is on ",
                first.second->device(), "; all inputs must be on the same device");
  }
}

inline void check_same_dtype(const char* op, std::initializer_list<NamedTensor> ts) {
  const NamedTensor& first = *ts.begin();
  for (const auto& nt : ts) {
    TORCH_CHECK_VALUE(nt.second->scalar_type() == first.second->scalar_type(), op, ": ",
                nt.first, " has dtype ", nt.second->scalar_type(), " but ", first.first,
                " has dtype ", first.second->scalar_type(),
                "; these arguments must share one dtype");
  }
}

}  // namespace checks
}  // namespace tsv_fast
