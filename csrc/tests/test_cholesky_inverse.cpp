// C++ test of tsv_fast::batched_cholesky_inverse (CPU op, plain and emulating
// the CUDA kernel's threads): R^-1 against float64 LAPACK (Cholesky, then a
// dense inverse), the same bits for every simulated block size, failed pivots,
// and the error checks.  Plain checks, no framework; exits non-zero on failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>

namespace {

using tsv_fast_test::expect_value_error;
using tsv_fast_test::failures;

using Pair = std::tuple<at::Tensor, at::Tensor>;
using OpFn = Pair(const at::Tensor&, int64_t);

Pair call(const at::Tensor& G, int64_t threads) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("tsv_fast::batched_cholesky_inverse", "")
      .typed<OpFn>()
      .call(G, threads);
}

// Y^T Y of Gaussian blocks whose columns are scaled over `decades` decades and mixed.
at::Tensor gram(int64_t B, int64_t n, double decades) {
  const at::Tensor Y = at::randn({B, 2 * n + 4, n}, at::kDouble) *
                       at::logspace(0, -decades, n, 10.0, at::kDouble);
  const at::Tensor Q = std::get<0>(at::linalg_qr(at::randn({B, n, n}, at::kDouble)));
  const at::Tensor X = at::matmul(Y, Q);
  return at::matmul(X.transpose(-1, -2), X);
}

void check_case(const at::Tensor& G, at::ScalarType dt, int64_t threads, const std::string& what) {
  auto [X, info] = call(G.to(dt), threads);
  const std::string tag = what + " " + c10::toString(dt) + " threads=" + std::to_string(threads);
  EXPECT(X.scalar_type() == dt && X.sizes() == G.sizes() && info.scalar_type() == at::kInt,
         "%s: wrong outputs", tag.c_str());
  EXPECT(info.eq(0).all().item<bool>(), "%s: a pivot failed", tag.c_str());
  const at::Tensor R = at::linalg_cholesky(G.to(dt).to(at::kDouble)).transpose(-1, -2);
  const at::Tensor ref = at::linalg_inv(R);
  const double n = static_cast<double>(G.size(-1));
  const double eps = dt == at::kDouble ? 2.220446049250313e-16 : 1.1920928955078125e-07;
  const at::Tensor kappa = at::linalg_cond(R);
  const at::Tensor err = at::linalg_matrix_norm(X.to(at::kDouble) - ref, "fro") / at::linalg_matrix_norm(ref, "fro");
  const double worst = (err / (4 * n * eps * kappa)).max().item<double>();
  EXPECT(worst <= 1.0, "%s: error %.3g of the n*kappa*eps bound", tag.c_str(), worst);
  EXPECT(X.tril(-1).eq(0).all().item<bool>(), "%s: not upper triangular", tag.c_str());
}

}  // namespace

int main() {
  at::manual_seed(0);
  int cases = 0;
  for (int64_t n : {1, 3, 17, 64, 102})
    for (double decades : {0.0, 3.0})
      for (auto dt : {at::kDouble, at::kFloat}) {
        if (dt == at::kFloat && decades > 0) continue;  // kappa^2 beyond float32
        const at::Tensor G = gram(2, n, decades);
        for (int64_t threads : {0, 32, 256}) check_case(G, dt, threads, "n=" + std::to_string(n)), ++cases;
        auto [X0, i0] = call(G.to(dt), 0);
        for (int64_t threads : {1, 4, 64, 1024}) {
          auto [X, i] = call(G.to(dt), threads);
          EXPECT(at::equal(X, X0) && at::equal(i, i0), "n=%lld threads=%lld: not the plain algorithm's bits",
                 static_cast<long long>(n), static_cast<long long>(threads));
          ++cases;
        }
      }
  // Failed pivots: LAPACK's info, all-NaN output, the batch's other matrices unaffected.
  {
    at::Tensor G = gram(3, 6, 0.0) + 6 * at::eye(6, at::kDouble);
    G[1][3][3] -= 1e4;
    G[2].zero_();
    auto [X, info] = call(G, 256);
    auto lapack_info = std::get<1>(at::linalg_cholesky_ex(G, /*upper=*/true));
    EXPECT(at::equal(info, lapack_info) && info[1].item<int>() == 4 && info[2].item<int>() == 1,
           "failed pivots: info differs from LAPACK's");
    EXPECT(X.narrow(0, 1, 2).isnan().all().item<bool>(), "failed pivots: output not all NaN");
    check_case(G.narrow(0, 0, 1), at::kDouble, 0, "beside failed pivots");
    cases += 2;
  }
  expect_value_error("not square", "G must be square", [&] { call(at::zeros({2, 3, 4}), 0); });
  expect_value_error("1-D", "G must be 2-D (n, n) or 3-D batched", [&] { call(at::zeros({4}), 0); });
  expect_value_error("half", "G must have dtype float32 or float64", [&] { call(at::zeros({3, 3}, at::kHalf), 0); });
  expect_value_error("threads", "threads must be 0 (the default) or a power of two from 1 to 1024",
                     [&] { call(at::zeros({3, 3}), 48); });

  if (failures) {
    std::fprintf(stderr, "%d check(s) FAILED\n", failures);
    return 1;
  }
  std::printf("test_cholesky_inverse: all %d cases + error checks passed\n", cases);
  return 0;
}
