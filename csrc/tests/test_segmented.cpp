// C++ test of tsv_fast::segmented_lowrank_apply (CPU op) and
// tsv_fast::segmented_lowrank_apply_emulated (CPU emulation of the CUDA
// kernels), functional and in-place forms, against a naive loop in double.
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

using FnOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double);
using InPlaceOp = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       double);

c10::TypedOperatorHandle<FnOp> fn_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<FnOp>();
}
c10::TypedOperatorHandle<InPlaceOp> inplace_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((name + "_").c_str(), "").typed<InPlaceOp>();
}

at::Tensor i64(const std::vector<int64_t>& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong));
}

struct Case {
  int64_t n, m;
  std::vector<int64_t> offsets, slots, ranks;  // ranks per slot
  int64_t N, kmax;
};

void check_case(const std::string& name, bool inplace, const Case& c, at::ScalarType xt,
                at::ScalarType ft) {
  const int64_t P = static_cast<int64_t>(c.ranks.size());
  auto base = at::randn({c.N, c.m}).to(xt);
  auto x = at::randn({c.N, c.n}).to(xt);
  // Padding columns hold garbage: the op must ignore everything past ranks[p].
  auto U = at::randn({P, c.m, c.kmax}).to(ft);
  auto S = (at::rand({P, c.kmax}) + 0.5).to(ft);
  auto V = at::randn({P, c.n, c.kmax}).to(ft);
  const double alpha = -0.7;

  // Naive reference in double, plus the magnitude |base| + |alpha| sum |x V S U| for the tolerance.
  auto bd = base.to(at::kDouble), xd = x.to(at::kDouble), ud = U.to(at::kDouble),
       sd = S.to(at::kDouble), vd = V.to(at::kDouble);
  auto ba = bd.accessor<double, 2>(), xa = xd.accessor<double, 2>();
  auto ua = ud.accessor<double, 3>(), va = vd.accessor<double, 3>();
  auto sa = sd.accessor<double, 2>();
  std::vector<double> ref(c.N * c.m), scale(c.N * c.m);
  for (int64_t r = 0; r < c.N; ++r)
    for (int64_t j = 0; j < c.m; ++j) ref[r * c.m + j] = ba[r][j], scale[r * c.m + j] = std::fabs(ba[r][j]);
  for (size_t s = 0; s + 1 < c.offsets.size(); ++s) {
    const int64_t p = c.slots[s];
    if (p < 0) continue;
    for (int64_t r = c.offsets[s]; r < c.offsets[s + 1]; ++r)
      for (int64_t j = 0; j < c.m; ++j) {
        double acc = 0, mag = 0;
        for (int64_t l = 0; l < c.ranks[p]; ++l)
          for (int64_t i = 0; i < c.n; ++i) {
            const double t = xa[r][i] * va[p][i][l] * sa[p][l] * ua[p][j][l];
            acc += t;
            mag += std::fabs(t);
          }
        ref[r * c.m + j] += alpha * acc;
        scale[r * c.m + j] += std::fabs(alpha) * mag;
      }
  }

  at::Tensor out;
  const auto offs = i64(c.offsets), sl = i64(c.slots), rk = i64(c.ranks);
  if (inplace) {
    out = base.clone();
    inplace_op(name).call(out, x, offs, sl, U, S, V, rk, alpha);
  } else {
    out = fn_op(name).call(base, x, offs, sl, U, S, V, rk, alpha);
  }
  const std::string what = name + (inplace ? "_" : "") + " N=" + std::to_string(c.N) +
                           " n=" + std::to_string(c.n) + " m=" + std::to_string(c.m) +
                           " kmax=" + std::to_string(c.kmax) + " x=" + c10::toString(xt) +
                           " factors=" + c10::toString(ft);
  EXPECT(out.scalar_type() == xt && out.size(0) == c.N && out.size(1) == c.m,
         "%s: wrong output dtype/shape", what.c_str());
  const bool f64 = xt == at::kDouble || ft == at::kDouble;
  auto o = out.to(at::kDouble).contiguous();
  expect_close(what, o.data_ptr<double>(), ref, scale, f64, xt);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      // n, m, offsets, slots, ranks, N, kmax
      {7, 5, {0, 4, 4, 9, 11}, {0, 1, -1, 2}, {2, 3, 1}, 11, 3},           // empty + base segment
      {37, 70, {1, 2, 67, 131}, {2, 0, 1}, {5, 17, 0}, 133, 20},           // 1-row, rank 0, spare rows
      {130, 65, {0, 130}, {0}, {33}, 130, 40},                             // one segment, > 2 row tiles
      {16, 64, {0, 64, 128}, {1, 1}, {0, 16}, 128, 16},                    // exact tiles, shared slot
      {3, 4, {0, 0}, {0}, {2}, 0, 2},                                      // N = 0
      {5, 6, {2}, {}, {}, 4, 0},                                           // T = 0, P = 0
  };
  const at::ScalarType x_types[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  const at::ScalarType fac_types[] = {at::kFloat, at::kBFloat16, at::kDouble};
  int n = 0;
  for (const char* name : {"tsv_fast::segmented_lowrank_apply",
                           "tsv_fast::segmented_lowrank_apply_emulated"})
    for (bool inplace : {false, true})
      for (const auto& c : cases)
        for (auto xt : x_types)
          for (auto ft : fac_types) {
            check_case(name, inplace, c, xt, ft);
            ++n;
          }

  for (std::string name : {"tsv_fast::segmented_lowrank_apply",
                           "tsv_fast::segmented_lowrank_apply_emulated"}) {
    auto x = at::zeros({6, 3}), base = at::zeros({6, 4});
    auto U = at::zeros({2, 4, 2}), S = at::zeros({2, 2}), V = at::zeros({2, 3, 2});
    auto ok_off = i64({0, 3, 6}), ok_sl = i64({0, 1}), ok_rk = i64({2, 1});
    auto f = fn_op(name);
    expect_value_error("offsets decreasing", "offsets must be non-decreasing, but offsets[2] = 2 < offsets[1] = 3", [&] {
      f.call(base, x, i64({0, 3, 2}), ok_sl, U, S, V, ok_rk, 1.0);
    });
    expect_value_error("offsets past N", "offsets must lie within [0, N = 6]", [&] {
      f.call(base, x, i64({0, 3, 7}), ok_sl, U, S, V, ok_rk, 1.0);
    });
    expect_value_error("rank > kmax", "ranks[1] = 3 must lie within [0, kmax = 2]", [&] {
      f.call(base, x, ok_off, ok_sl, U, S, V, i64({2, 3}), 1.0);
    });
    expect_value_error("bad slot", "slots[0] = 2 is not a factor slot", [&] {
      f.call(base, x, ok_off, i64({2, 1}), U, S, V, ok_rk, 1.0);
    });
    expect_value_error("U wrong m", "U.size(1) must equal m (columns of base) = 4", [&] {
      f.call(base, x, ok_off, ok_sl, at::zeros({2, 5, 2}), S, V, ok_rk, 1.0);
    });
    expect_value_error("V wrong n", "V.size(1) must equal n (columns of x) = 3", [&] {
      f.call(base, x, ok_off, ok_sl, U, S, at::zeros({2, 4, 2}), ok_rk, 1.0);
    });
    expect_value_error("slots wrong length", "slots must be 1-D of length T", [&] {
      f.call(base, x, ok_off, i64({0}), U, S, V, ok_rk, 1.0);
    });
    expect_value_error("float offsets", "offsets must have dtype int64", [&] {
      f.call(base, x, at::zeros({3}), ok_sl, U, S, V, ok_rk, 1.0);
    });
    expect_value_error("x/out dtypes differ", "out has dtype Double but x has dtype Float", [&] {
      auto out = at::zeros({6, 4}, at::kDouble);
      inplace_op(name).call(out, x, ok_off, ok_sl, U, S, V, ok_rk, 1.0);
    });
    expect_value_error("alpha", "alpha must be a finite number within the float32 range", [&] {
      f.call(base, x, ok_off, ok_sl, U, S, V, ok_rk, 1e39);
    });
    // Overlaps ATen cannot analyse (layouts that are not dense) are refused too.
    expect_value_error("out rows overlap", "out has elements that share memory", [&] {
      auto out = at::zeros({9}).as_strided({6, 4}, {1, 1});
      inplace_op(name).call(out, x, ok_off, ok_sl, U, S, V, ok_rk, 1.0);
    });
    expect_value_error("out slices U's storage", "out shares memory with U", [&] {
      auto wide = at::zeros({6, 8});
      auto out = wide.narrow(1, 0, 4);
      inplace_op(name).call(out, x, ok_off, ok_sl, wide.view({-1}).narrow(0, 0, 16).view({2, 4, 2}),
                            S, V, ok_rk, 1.0);
    });
  }

  if (failures) {
    std::fprintf(stderr, "%d check(s) FAILED\n", failures);
    return 1;
  }
  std::printf("test_segmented: all %d cases + error checks passed\n", n);
  return 0;
}
