// C++ test of tsv_fast::reconstruct (CPU op) and tsv_fast::reconstruct_emulated
// (CPU emulation of the CUDA kernel) against a naive triple loop in double.
// Plain checks, no framework; exits non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using tsv_fast_test::expect_close;
using tsv_fast_test::expect_value_error;
using tsv_fast_test::failures;

using OpFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double);

c10::TypedOperatorHandle<OpFn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<OpFn>();
}

// out[b,i,j] = base[b,i,j] + alpha * sum_l U[b,i,l] S[b,l] V[b,j,l]; also returns the
// magnitude |base| + |alpha| sum |U S V| for the tolerance.
void naive(const at::Tensor& base3, const at::Tensor& U3, const at::Tensor& S2, const at::Tensor& V3,
           double alpha, std::vector<double>& ref, std::vector<double>& scale) {
  auto b = base3.to(at::kDouble).contiguous(), u = U3.to(at::kDouble).contiguous();
  auto s = S2.to(at::kDouble).contiguous(), v = V3.to(at::kDouble).contiguous();
  const int64_t B = b.size(0), m = b.size(1), n = b.size(2), k = u.size(2);
  auto ba = b.accessor<double, 3>(), ua = u.accessor<double, 3>(), va = v.accessor<double, 3>();
  auto sa = s.accessor<double, 2>();
  ref.assign(B * m * n, 0.0);
  scale.assign(B * m * n, 0.0);
  for (int64_t bi = 0; bi < B; ++bi)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0, mag = 0;
        for (int64_t l = 0; l < k; ++l) {
          const double t = ua[bi][i][l] * sa[bi][l] * va[bi][j][l];
          acc += t;
          mag += std::fabs(t);
        }
        ref[(bi * m + i) * n + j] = ba[bi][i][j] + alpha * acc;
        scale[(bi * m + i) * n + j] = std::fabs(ba[bi][i][j]) + std::fabs(alpha) * mag;
      }
}

void check_case(const char* op_name, int64_t B, bool batched, int64_t m, int64_t n, int64_t k,
                at::ScalarType base_t, at::ScalarType fac_t) {
  auto base = at::randn({B, m, n}).to(base_t);
  auto U = at::randn({B, m, k}).to(fac_t);
  auto S = (at::rand({B, k}) + 0.5).to(fac_t);
  auto V = at::randn({B, n, k}).to(fac_t);
  const double alpha = -0.7;
  std::vector<double> ref, scale;
  naive(base, U, S, V, alpha, ref, scale);

  at::Tensor out = batched ? op(op_name).call(base, U, S, V, alpha)
                           : op(op_name).call(base[0], U[0], S[0], V[0], alpha);
  const std::string what = std::string(op_name) + " B=" + std::to_string(batched ? B : 0) +
                           " m=" + std::to_string(m) + " n=" + std::to_string(n) +
                           " k=" + std::to_string(k) + " base=" + c10::toString(base_t) +
                           " factors=" + c10::toString(fac_t);
  EXPECT(out.scalar_type() == base_t, "%s: wrong output dtype", what.c_str());
  EXPECT(out.numel() == B * m * n && out.dim() == (batched ? 3 : 2), "%s: wrong output shape",
         what.c_str());
  if (out.numel() != B * m * n) return;
  const bool f64 = base_t == at::kDouble || fac_t == at::kDouble;
  auto o = out.to(at::kDouble).contiguous().reshape({-1});
  expect_close(what, o.data_ptr<double>(), ref, scale, f64, base_t);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t sizes[][3] = {{1, 1, 1}, {37, 53, 5}, {130, 70, 17}, {3, 3, 0},
                              {65, 129, 33}, {0, 4, 2}, {64, 64, 16}};
  const at::ScalarType base_types[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  const at::ScalarType fac_types[] = {at::kFloat, at::kBFloat16, at::kDouble};
  int cases = 0;
  for (const char* name : {"tsv_fast::reconstruct", "tsv_fast::reconstruct_emulated"})
    for (const auto& sz : sizes)
      for (bool batched : {false, true})
        for (auto bt : base_types)
          for (auto ft : fac_types) {
            check_case(name, batched ? 3 : 1, batched, sz[0], sz[1], sz[2], bt, ft);
            ++cases;
          }

  for (const char* name : {"tsv_fast::reconstruct", "tsv_fast::reconstruct_emulated"}) {
    expect_value_error("U wrong rows", "U.size(0) must equal m (rows of base) = 5", [&] {
      op(name).call(at::zeros({5, 6}), at::zeros({4, 3}), at::zeros({3}), at::zeros({6, 3}), 1.0);
    });
    expect_value_error("factor dtypes differ", "S has dtype Double but U has dtype Float", [&] {
      op(name).call(at::zeros({5, 6}), at::zeros({5, 3}), at::zeros({3}, at::kDouble),
                    at::zeros({6, 3}), 1.0);
    });
    expect_value_error("integer base", "base must have a floating dtype", [&] {
      op(name).call(at::zeros({5, 6}, at::kInt), at::zeros({5, 3}), at::zeros({3}),
                    at::zeros({6, 3}), 1.0);
    });
    for (double alpha : {1e39, -HUGE_VAL, std::nan("")})  // one rule on every device
      expect_value_error("alpha", "alpha must be a finite number within the float32 range", [&] {
        op(name).call(at::zeros({5, 6}), at::zeros({5, 3}), at::zeros({3}), at::zeros({6, 3}), alpha);
      });
  }

  if (failures) {
    std::fprintf(stderr, "%d check(s) FAILED\n", failures);
    return 1;
  }
  std::printf("test_reconstruct: all %d cases + error checks passed\n", cases);
  return 0;
}
