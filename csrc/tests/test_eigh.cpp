// C++ test of tsv_fast::batched_eigh (CPU op) and tsv_fast::batched_eigh_emulated
// (CPU emulation of the CUDA kernel, both workspace placements): eigenvalues
// against a reference spectrum, reconstruction A = V diag(w) V^T, V^T V = I,
// ascending order, plus the error checks.  Plain checks, no framework; exits
// non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

using tsv_fast_test::expect_value_error;
using tsv_fast_test::failures;

using Pair = std::tuple<at::Tensor, at::Tensor>;
using OpFn = Pair(const at::Tensor&, int64_t, double, int64_t);
using EmuFn = Pair(const at::Tensor&, int64_t, double, int64_t, int64_t);

Pair call(const std::string& impl, const at::Tensor& A) {
  auto& d = c10::Dispatcher::singleton();
  if (impl == "op")
    return d.findSchemaOrThrow("tsv_fast::batched_eigh", "").typed<OpFn>().call(A, 30, 0.0, 0);
  const int64_t path = impl == "emulated-global" ? 0 : (impl == "emulated-shared" ? 1 : -1);
  return d.findSchemaOrThrow("tsv_fast::batched_eigh_emulated", "")
      .typed<EmuFn>()
      .call(A, 30, 0.0, path, impl == "emulated-1024" ? 1024 : 0);
}

// Random symmetric matrices with a known spectrum: Q diag(lam) Q^T (float64),
// Q orthogonal from a QR of a Gaussian matrix.  lam sorted ascending.
std::pair<at::Tensor, at::Tensor> with_spectrum(int64_t B, int64_t n, int kind) {
  at::Tensor lam = at::empty({B, n}, at::kDouble);
  auto la = lam.accessor<double, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) {
      switch (kind) {
        case 0: la[b][i] = -1.0 + 2.0 * i / std::max<int64_t>(n - 1, 1); break;  // spread, +/-
        case 1: la[b][i] = static_cast<double>((i * 3) / std::max<int64_t>(n, 1)); break;  // 3 clusters
        default: la[b][i] = (i < n / 2) ? 0.0 : 1.0 + i; break;  // half zero (rank-deficient)
      }
    }
  lam = std::get<0>(lam.sort(-1));
  at::Tensor Q = std::get<0>(at::linalg_qr(at::randn({B, n, n}, at::kDouble)));
  at::Tensor A = at::matmul(Q * lam.unsqueeze(-2), Q.transpose(-1, -2));
  A = (A + A.transpose(-1, -2)) * 0.5;
  return {A, lam};
}

void check_case(const std::string& impl, const at::Tensor& A64, const at::Tensor& lam,
                at::ScalarType dt, const std::string& what) {
  const at::Tensor A = A64.to(dt);
  at::Tensor w, V;
  std::tie(w, V) = call(impl, A);
  const std::string tag = impl + " " + what + " " + c10::toString(dt);
  EXPECT(w.scalar_type() == dt && V.scalar_type() == dt, "%s: wrong dtype", tag.c_str());
  EXPECT(w.sizes() == A.sizes().slice(0, A.dim() - 1) && V.sizes() == A.sizes(),
         "%s: wrong output shapes", tag.c_str());
  if (V.sizes() != A.sizes()) return;
  const bool f64 = dt == at::kDouble;
  const double n = static_cast<double>(A.size(-1));
  // The CPU op iterates in float64 also for float32 inputs: only the input and
  // output roundings are float32.  The emulated kernel iterates in float32.
  const bool work64 = f64 || impl == "op";
  const at::Tensor Ad = A.to(at::kDouble), wd = w.to(at::kDouble), Vd = V.to(at::kDouble);
  const double normA = std::max(Ad.flatten(-2).norm(2, -1).max().item<double>(), 1e-300);
  const double eps = f64 ? 1e-12 : (work64 ? 2e-6 : 1e-5);
  // Eigenvalues vs the spectrum of the (rounded) input: torch's eigvalsh.
  const double werr = (wd - at::linalg_eigvalsh(Ad)).abs().max().item<double>();
  EXPECT(werr <= eps * normA, "%s: eigenvalue error %.3g > %.3g", tag.c_str(), werr, eps * normA);
  if (f64) {
    const double lerr = (wd - lam.reshape(wd.sizes())).abs().max().item<double>();
    EXPECT(lerr <= eps * normA, "%s: eigenvalues vs constructed spectrum off by %.3g", tag.c_str(), lerr);
  }
  // Ascending.
  if (w.size(-1) > 1) {
    const bool asc = (wd.narrow(-1, 1, w.size(-1) - 1) >= wd.narrow(-1, 0, w.size(-1) - 1)).all().item<bool>();
    EXPECT(asc, "%s: eigenvalues not ascending", tag.c_str());
  }
  // Reconstruction and orthogonality.
  const double oeps = f64 ? 1e-13 * std::max(n, 1.0) : (work64 ? 4e-7 : 1e-6 * std::max(n, 4.0));
  const double rerr =
      (at::matmul(Vd * wd.unsqueeze(-2), Vd.transpose(-1, -2)) - Ad).abs().max().item<double>();
  EXPECT(rerr <= oeps * normA + 1e-300, "%s: |V diag(w) V^T - A| = %.3g > %.3g", tag.c_str(), rerr,
         oeps * normA);
  const at::Tensor I = at::eye(A.size(-1), at::kDouble);
  const double oerr = (at::matmul(Vd.transpose(-1, -2), Vd) - I).abs().max().item<double>();
  EXPECT(oerr <= oeps, "%s: |V^T V - I| = %.3g > %.3g", tag.c_str(), oerr, oeps);
}

}  // namespace

int main() {
  at::manual_seed(0);
  int cases = 0;
  // emulated-1024: the kernel with 1024 threads per matrix (rotations and reductions on 256 of them)
  const std::vector<std::string> impls = {"op", "emulated-global", "emulated-shared", "emulated-1024"};
  for (const auto& impl : impls)
    for (int64_t n : {1, 2, 5, 16, 31, 64})
      for (int kind : {0, 1, 2})
        for (auto dt : {at::kDouble, at::kFloat}) {
          const int64_t B = n >= 64 ? 2 : 3;
          auto [A, lam] = with_spectrum(B, n, kind);
          check_case(impl, A, lam, dt, "n=" + std::to_string(n) + " kind=" + std::to_string(kind));
          check_case(impl, A[0], lam[0], dt, "unbatched n=" + std::to_string(n));
          cases += 2;
        }
  // The CPU op on a larger order, zero and diagonal inputs.
  {
    auto [A, lam] = with_spectrum(1, 130, 0);
    check_case("op", A, lam, at::kDouble, "n=130");
    for (const auto& impl : impls) {
      auto [w, V] = call(impl, at::zeros({2, 9, 9}, at::kDouble));
      EXPECT(w.abs().max().item<double>() == 0 && at::equal(V, at::eye(9, at::kDouble).expand({2, 9, 9})),
             "%s: zero matrix should give w = 0, V = I", impl.c_str());
      const at::Tensor d = at::tensor({3.0, -1.0, 2.0, 0.5}, at::kDouble);
      std::tie(w, V) = call(impl, at::diag(d));
      EXPECT(at::equal(w, std::get<0>(d.sort())), "%s: diagonal input: wrong eigenvalues", impl.c_str());
      EXPECT(at::equal(V.abs().sum(0), at::ones({4}, at::kDouble)), "%s: diagonal input: V not a permutation",
             impl.c_str());
      std::tie(w, V) = call(impl, at::empty({3, 0, 0}, at::kFloat));
      EXPECT(w.sizes() == at::IntArrayRef({3, 0}) && V.sizes() == at::IntArrayRef({3, 0, 0}),
             "%s: n = 0: wrong shapes", impl.c_str());
      cases += 3;
    }
  }

  auto& d = c10::Dispatcher::singleton();
  auto op = d.findSchemaOrThrow("tsv_fast::batched_eigh", "").typed<OpFn>();
  auto emu = d.findSchemaOrThrow("tsv_fast::batched_eigh_emulated", "").typed<EmuFn>();
  expect_value_error("not square", "A must be square", [&] { op.call(at::zeros({2, 3, 4}), 30, 0.0, 0); });
  expect_value_error("1-D", "A must be 2-D (n, n) or 3-D batched", [&] { op.call(at::zeros({4}), 30, 0.0, 0); });
  expect_value_error("int dtype", "A must have dtype float32 or float64", [&] {
    op.call(at::zeros({3, 3}, at::kInt), 30, 0.0, 0);
  });
  expect_value_error("half dtype", "A must have dtype float32 or float64", [&] {
    emu.call(at::zeros({3, 3}, at::kHalf), 30, 0.0, -1, 0);
  });
  expect_value_error("negative tol", "tol must be a finite number >= 0", [&] {
    op.call(at::zeros({3, 3}), 30, -1.0, 0);
  });
  expect_value_error("bad path", "force_path must be -1", [&] { emu.call(at::zeros({3, 3}), 30, 0.0, 2, 0); });
  expect_value_error("bad threads", "threads must be 0 (the kernel's choice) or a power of two from 32 to 1024",
                     [&] { op.call(at::zeros({3, 3}), 30, 0.0, 48); });
  expect_value_error("too many threads", "got 2048", [&] { emu.call(at::zeros({3, 3}), 30, 0.0, -1, 2048); });

  if (failures) {
    std::fprintf(stderr, "%d check(s) FAILED\n", failures);
    return 1;
  }
  std::printf("test_eigh: all %d cases + error checks passed\n", cases);
  return 0;
}
