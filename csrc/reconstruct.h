// Shared pieces of the tsv_fast::reconstruct op family (CPU, emulated, CUDA):
// argument validation, the compute dtype rule and the dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>

#include "checks.h"

namespace tsv_fast {

// Validated, contiguous view of reconstruct's arguments; 2-D inputs are seen as
// a batch of one.
struct ReconstructArgs {
  at::Tensor base, U, S, V;  // contiguous, original dtypes
  int64_t batch, m, n, k;
  bool batched;
};

// base (m,n) | (B,m,n);  U (m,k) | (B,m,k);  S (k) | (B,k);  V (n,k) | (B,n,k).
inline ReconstructArgs check_reconstruct_args(const char* op, const at::Tensor& base,
                                              const at::Tensor& U, const at::Tensor& S,
                                              const at::Tensor& V, double alpha) {
  using namespace checks;
  check_defined(op, "base", base);
  check_defined(op, "U", U);
  check_defined(op, "S", S);
  check_defined(op, "V", V);
  TORCH_CHECK_VALUE(base.dim() == 2 || base.dim() == 3, op,
              ": base must be 2-D (m, n) or 3-D batched (B, m, n), got a ", base.dim(),
              "-D tensor of shape ", base.sizes());
  const bool batched = base.dim() == 3;
  check_dim(op, "U", U, base.dim(), batched ? "(B, m, k) like base" : "(m, k) like base");
  check_dim(op, "S", S, base.dim() - 1, batched ? "(B, k)" : "(k,)");
  check_dim(op, "V", V, base.dim(), batched ? "(B, n, k) like base" : "(n, k) like base");
  check_float_dtype(op, "base", base);
  check_float_dtype(op, "U", U);
  check_float_dtype(op, "S", S);
  check_float_dtype(op, "V", V);
  check_same_dtype(op, {{"U", &U}, {"S", &S}, {"V", &V}});
  check_same_device(op, {{"base", &base}, {"U", &U}, {"S", &S}, {"V", &V}});

  const int64_t off = batched ? 1 : 0;
  const int64_t m = base.size(off), n = base.size(off + 1), k = U.size(off + 1);
  if (batched) {
    const int64_t B = base.size(0);
    check_size(op, "U", U, 0, B, "the batch size B = base.size(0)", "base", base);
    check_size(op, "S", S, 0, B, "the batch size B = base.size(0)", "base", base);
    check_size(op, "V", V, 0, B, "the batch size B = base.size(0)", "base", base);
  }
  check_size(op, "U", U, off, m, "m (rows of base)", "base", base);
  check_size(op, "V", V, off, n, "n (columns of base)", "base", base);
  check_size(op, "S", S, off, k, "k (columns of U)", "U", U);
  check_size(op, "V", V, off + 1, k, "k (columns of U)", "U", U);
  check_alpha(op, alpha);

  return ReconstructArgs{base.contiguous(), U.contiguous(), S.contiguous(), V.contiguous(),
                         batched ? base.size(0) : 1, m, n, k, batched};
}

// Accumulate in float64 if base or the factors are float64, else in float32.
inline at::ScalarType reconstruct_compute_dtype(at::ScalarType base, at::ScalarType factor) {
  return (base == at::kDouble || factor == at::kDouble) ? at::kDouble : at::kFloat;
}

template <typename base_t, typename factor_t>
using reconstruct_acc_t =
    std::conditional_t<std::is_same_v<base_t, double> || std::is_same_v<factor_t, double>,
                       double, float>;

}  // namespace tsv_fast

// Runs the trailing statements with base_t, factor_t and acc_t bound to the
// C++ types of BASE_DTYPE / FACTOR_DTYPE (float, double, at::Half,
// at::BFloat16); any other dtype raises "NAME not implemented for '<dtype>'".
#define TSV_FAST_DISPATCH_BASE_FACTOR(BASE_DTYPE, FACTOR_DTYPE, NAME, ...)                 \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, BASE_DTYPE, NAME, [&] {        \
    using base_t = scalar_t;                                                               \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, FACTOR_DTYPE, NAME, [&] {    \
      using factor_t = scalar_t;                                                           \
      using acc_t = ::tsv_fast::reconstruct_acc_t<base_t, factor_t>;                       \
      __VA_ARGS__                                                                          \
    });                                                                                    \
  })
