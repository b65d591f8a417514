// C++ test of tsv_fast::batched_cholesky_inverse (CPU op, plain and emulating
// the CUDA kernel's threads): R^-1 against float64 LAPACK (Cholesky, then a
// dense inverse), the same bits for every simulated block size, failed pivots,
// the error checks, and a race check of the kernel's phase functions.  Plain
// checks, no framework; exits non-zero on failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"
#include "kernels/cholesky_inverse.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

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

// --- Race check of the kernel's phases ---------------------------------------
// Between two barriers the kernel's threads run in any order, or at once.  A
// phase is race-free when running each thread alone from the state the phase
// started with, then merging what the threads changed, gives the state that
// running them one after another gives, in order and in reverse order, and no
// location is changed by two threads.  This catches a thread reading or
// writing what another thread of the same phase changes, whichever thread
// index is the writer (the op's emulation, threads in order, misses a write by
// a later thread to what an earlier one reads).  It cannot see a write of the
// value already there, nor where the kernel puts its barriers (one after every
// phase, in cuda/cholesky_inverse.cu, as emulate_block runs them).

template <typename T>
struct Block {  // one block's memory: A | tmp | out (out is A on the global-memory path), info
  int n;
  bool global;
  std::vector<T> buf;
  int info = -7;  // uninitialised shared memory
  Block(int n_, bool global_)
      : n(n_), global(global_), buf(static_cast<size_t>(n_) * n_ * (global_ ? 1 : 2) + n_ + 1, T(-3)) {}
  tsv_fast::cholinv::Ws<T> ws() { return {buf.data(), buf.data() + n * n, &info, n}; }
  T* out() { return global ? buf.data() : buf.data() + n * n + n + 1; }
  bool operator==(const Block& o) const {
    return info == o.info && std::memcmp(buf.data(), o.buf.data(), buf.size() * sizeof(T)) == 0;
  }
};

template <typename T>
using Phase = std::function<void(Block<T>&, int)>;

// Runs `phase` for threads 0..nth-1 on b; what races, or "" where nothing does.
template <typename T>
std::string phase_race(Block<T>& b, int nth, const Phase<T>& phase) {
  const Block<T> start = b;
  Block<T> merged = b;
  std::vector<int> writer(b.buf.size() + 1, -1);  // + info
  std::string race;
  for (int t = 0; t < nth; ++t) {
    Block<T> alone = start;
    phase(alone, t);
    for (size_t k = 0; k <= b.buf.size(); ++k) {
      const bool changed = k < b.buf.size() ? std::memcmp(&alone.buf[k], &start.buf[k], sizeof(T)) != 0
                                            : alone.info != start.info;
      if (!changed) continue;
      if (writer[k] >= 0 && race.empty())
        race = "threads " + std::to_string(writer[k]) + " and " + std::to_string(t) + " both write location " +
               std::to_string(k) + " (" + std::to_string(b.buf.size()) + ": info)";
      writer[k] = t;
      if (k < b.buf.size()) merged.buf[k] = alone.buf[k];
      else merged.info = alone.info;
    }
  }
  Block<T> fwd = start, rev = start;
  for (int t = 0; t < nth; ++t) phase(fwd, t);
  for (int t = nth - 1; t >= 0; --t) phase(rev, t);
  if (race.empty() && !(fwd == merged && rev == merged))
    race = "a thread reads what another thread of the phase writes (the result depends on their order)";
  b = merged;
  return race;
}

// emulate_block's phases, each race-checked; the output must be the op's, bit for bit.
template <typename T>
void check_races(const at::Tensor& G, int nth, bool global, const std::string& tag) {
  namespace ci = tsv_fast::cholinv;
  const at::Tensor Gc = G.contiguous();
  const int n = static_cast<int>(Gc.size(-1));
  const T* in = Gc.data_ptr<T>();
  Block<T> b(n, global);
  auto race_free = [&](const std::string& what, const Phase<T>& phase) {
    const std::string race = phase_race(b, nth, phase);
    EXPECT(race.empty(), "%s %s: %s", tag.c_str(), what.c_str(), race.c_str());
    return race.empty();
  };
  bool ok = race_free("load_input", [&](Block<T>& s, int t) { ci::load_input(s.ws(), in, t, nth); });
  for (int j = 0; ok && j < n; ++j) {
    const std::string at_j = "j=" + std::to_string(j);
    ok = race_free(at_j + " chol_scale", [&](Block<T>& s, int t) { ci::chol_scale(s.ws(), j, t, nth); }) &&
         race_free(at_j + " chol_update", [&](Block<T>& s, int t) { ci::chol_update(s.ws(), j, t, nth); });
  }
  for (int i = n - 1; ok && i >= 0; --i) {
    const std::string at_i = "i=" + std::to_string(i);
    ok = race_free(at_i + " inv_scale", [&](Block<T>& s, int t) { ci::inv_scale(s.ws(), i, t, nth); }) &&
         race_free(at_i + " inv_update", [&](Block<T>& s, int t) { ci::inv_update(s.ws(), i, t, nth); });
  }
  if (ok) ok = race_free("write_out", [&](Block<T>& s, int t) { ci::write_out(s.ws(), s.out(), t, nth); });
  if (!ok) return;
  auto [X, info] = call(Gc.unsqueeze(0), nth);
  EXPECT(std::memcmp(b.out(), X.data_ptr<T>(), sizeof(T) * n * n) == 0 && b.info == info.item<int>(),
         "%s: the race-checked phases do not give the op's result", tag.c_str());
}

// The check must be able to fail: a missing barrier (chol_scale and chol_update as one phase)
// is a race whenever two threads share the work.
bool race_check_sees_a_missing_barrier(const at::Tensor& G, int nth) {
  namespace ci = tsv_fast::cholinv;
  const int n = static_cast<int>(G.size(-1));
  Block<double> b(n, false);
  const double* in = G.data_ptr<double>();
  phase_race<double>(b, nth, [&](Block<double>& s, int t) { ci::load_input(s.ws(), in, t, nth); });
  return !phase_race<double>(b, nth, [&](Block<double>& s, int t) {
            ci::chol_scale(s.ws(), 0, t, nth);
            ci::chol_update(s.ws(), 0, t, nth);
          }).empty();
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
  // Race check of every phase, shared-memory and global-memory layouts, with failed pivots too.
  {
    at::Tensor bad = gram(1, 12, 0.0)[0] + 12 * at::eye(12, at::kDouble);
    bad[6][6] -= 1e4;  // pivot 7 fails: info and the NaN output
    const at::Tensor good = gram(1, 40, 3.0)[0];
    for (int nth : {1, 2, 8, 32, 64}) {
      for (bool global : {false, true}) {
        const std::string where = std::string(global ? " global" : " shared") + " threads=" + std::to_string(nth);
        check_races<double>(good, nth, global, "races n=40" + where);
        check_races<float>(good.to(at::kFloat), nth, global, "races n=40 f32" + where);
        check_races<double>(bad, nth, global, "races failed pivot" + where);
        cases += 3;
      }
    }
    check_races<double>(gram(1, 70, 3.0)[0], 256, false, "races n=70 threads=256");
    check_races<double>(gram(1, 5, 0.0)[0], 1024, true, "races n=5 threads=1024");
    cases += 2;
    EXPECT(race_check_sees_a_missing_barrier(good, 32), "the race check misses a missing barrier");
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
