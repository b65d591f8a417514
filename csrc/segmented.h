// Shared pieces of the tsv_fast::segmented_lowrank_apply op family (CPU,
// emulated, CUDA): argument validation and the functional wrapper.
//
//   out[a:b] += alpha * ((x[a:b] V_p[:, :k]) * S_p[:k]) U_p[:, :k]^T
//   for every segment s: a = offsets[s], b = offsets[s+1], p = slots[s] (-1: no
//   delta), k = ranks[p].
//
// Shapes: x (N, n); out/base (N, m), x's dtype; U (P, m, kmax), S (P, kmax),
// V (P, n, kmax): a table of P factor slots padded to kmax columns, one float
// dtype; offsets (T+1), slots (T), ranks (P): int64.  Rows outside every
// segment are left alone.  Index tensors may be on the CPU (validated here:
// offsets non-decreasing within [0, N], slots in [-1, P), ranks in [0, kmax])
// or, for the CUDA op, on the GPU (then not validated, to avoid a device sync;
// the kernel clamps them, so bad values give wrong sums, never bad accesses).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <utility>
#include <string>

#include "checks.h"
#include "reconstruct.h"  // TSV_FAST_DISPATCH_BASE_FACTOR, reconstruct_compute_dtype

namespace tsv_fast {

struct SegmentedArgs {
  at::Tensor x, U, S, V;               // contiguous, original dtypes
  at::Tensor offsets, slots, ranks;    // contiguous int64, on the CPU or x's device
  int64_t N, n, m, kmax, T, P;
  int64_t max_rows;                    // longest segment (N when offsets are not on the CPU)
};

inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t,
                               int64_t expected_len, const char* what, const at::Tensor& x) {
  using namespace checks;
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, op, ": ", name, " must have dtype int64, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == expected_len, op, ": ", name,
                    " must be 1-D of length ", what, " = ", expected_len, ", got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_cpu() || t.device() == x.device(), op, ": ", name, " is on ",
                    t.device(), " but x is on ", x.device(), "; ", name,
                    " must be on the CPU or on x's device");
}

// No two elements of a 2-D tensor share an address.  ATen answers for dense layouts and
// zero strides; the rest (MemOverlap::TooHard, e.g. a column slice of a wider tensor) pass when
// one dim steps over the whole extent of the other.
inline bool distinct_elements_2d(const at::Tensor& t) {
  switch (at::has_internal_overlap(t)) {
    case at::MemOverlap::No: return true;
    case at::MemOverlap::Yes: return false;
    case at::MemOverlap::TooHard: break;
  }
  if (t.size(0) <= 1 || t.size(1) <= 1) return true;  // one line of non-zero steps
  const int inner = t.stride(0) <= t.stride(1) ? 0 : 1, outer = 1 - inner;
  return t.stride(outer) >= t.stride(inner) * t.size(inner);
}

// The bytes [first, end) of its storage that a tensor's elements lie in (strides are >= 0).
inline std::pair<int64_t, int64_t> storage_bytes(const at::Tensor& t) {
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {t.storage_offset() * t.element_size(), (last + 1) * t.element_size()};
}

// Whether a and b may share memory: ATen's answer for dense layouts; for the others
// (MemOverlapStatus::TooHard) only separate storages, or disjoint byte ranges of one storage
// (slices of one preallocated buffer), rule an overlap out.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::No: return false;
    case at::MemOverlapStatus::TooHard: break;
    default: return true;  // Full or Partial
  }
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  const auto [a_first, a_end] = storage_bytes(a);
  const auto [b_first, b_end] = storage_bytes(b);
  return a_first < b_end && b_first < a_end;
}

// `out_name` is "base" for the functional op and "out" for the in-place one.
inline SegmentedArgs check_segmented_args(const char* op, const char* out_name,
                                          const at::Tensor& out, const at::Tensor& x,
                                          const at::Tensor& offsets, const at::Tensor& slots,
                                          const at::Tensor& U, const at::Tensor& S,
                                          const at::Tensor& V, const at::Tensor& ranks,
                                          double alpha) {
  using namespace checks;
  check_defined(op, out_name, out);
  check_defined(op, "x", x);
  check_defined(op, "U", U);
  check_defined(op, "S", S);
  check_defined(op, "V", V);
  check_dim(op, "x", x, 2, "(N, n)");
  check_dim(op, out_name, out, 2, "(N, m)");
  check_dim(op, "U", U, 3, "(P, m, kmax)");
  check_dim(op, "S", S, 2, "(P, kmax)");
  check_dim(op, "V", V, 3, "(P, n, kmax)");
  check_float_dtype(op, "x", x);
  check_float_dtype(op, out_name, out);
  check_float_dtype(op, "U", U);
  check_float_dtype(op, "S", S);
  check_float_dtype(op, "V", V);
  check_same_dtype(op, {{"x", &x}, {out_name, &out}});
  check_same_dtype(op, {{"U", &U}, {"S", &S}, {"V", &V}});
  check_same_device(op, {{"x", &x}, {out_name, &out}, {"U", &U}, {"S", &S}, {"V", &V}});

  // The CPU op reads x segment by segment and the CUDA kernel all of it first, and both write
  // out row by row: they agree only when out's elements are distinct, and out is x itself or
  // shares no memory with it, nor with anything else the op reads.  Overlaps that cannot be
  // ruled out are refused.
  TORCH_CHECK_VALUE(distinct_elements_2d(out), op, ": ", out_name,
                    " has elements that share memory (an expanded or overlapping strided view, "
                    "got strides ", out.strides(), " for shape ", out.sizes(),
                    "); pass a tensor with distinct elements");
  TORCH_CHECK_VALUE(at::get_overlap_status(out, x) == at::MemOverlapStatus::Full ||
                        !may_share_memory(out, x),
                    op, ": ", out_name, " must be x itself or share no memory with it, but they ",
                    "overlap (or share a storage in layouts too irregular to rule that out)");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"U", &U}, {"S", &S}, {"V", &V},
                                {"offsets", &offsets}, {"slots", &slots}, {"ranks", &ranks}}) {
    TORCH_CHECK_VALUE(!t->defined() || !may_share_memory(out, *t), op, ": ", out_name,
                      " shares memory with ", name, ", which it reads; pass a separate tensor");
  }

  const int64_t N = x.size(0), n = x.size(1), m = out.size(1);
  const int64_t P = U.size(0), kmax = U.size(2);
  check_size(op, out_name, out, 0, N, "N (rows of x)", "x", x);
  check_size(op, "U", U, 1, m, std::string("m (columns of ").append(out_name).append(")").c_str(),
             out_name, out);
  check_size(op, "V", V, 0, P, "P (factor slots, U.size(0))", "U", U);
  check_size(op, "V", V, 1, n, "n (columns of x)", "x", x);
  check_size(op, "V", V, 2, kmax, "kmax (U.size(2))", "U", U);
  check_size(op, "S", S, 0, P, "P (factor slots, U.size(0))", "U", U);
  check_size(op, "S", S, 1, kmax, "kmax (U.size(2))", "U", U);

  check_defined(op, "offsets", offsets);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, op,
                    ": offsets must be 1-D with T+1 >= 1 entries, got shape ", offsets.sizes());
  const int64_t T = offsets.size(0) - 1;
  check_index_tensor(op, "offsets", offsets, T + 1, "T+1", x);
  check_index_tensor(op, "slots", slots, T, "T (offsets has T+1 entries)", x);
  check_index_tensor(op, "ranks", ranks, P, "P (factor slots, U.size(0))", x);
  check_alpha(op, alpha);

  SegmentedArgs a{x.contiguous(), U.contiguous(), S.contiguous(), V.contiguous(),
                  offsets.contiguous(), slots.contiguous(), ranks.contiguous(),
                  N, n, m, kmax, T, P, N};
  if (a.offsets.is_cpu()) {
    const int64_t* o = a.offsets.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(o[0] >= 0 && o[T] <= N, op, ": offsets must lie within [0, N = ", N,
                      "], got offsets[0] = ", o[0], " and offsets[", T, "] = ", o[T]);
    int64_t longest = 0;
    for (int64_t s = 0; s < T; ++s) {
      TORCH_CHECK_VALUE(o[s + 1] >= o[s], op, ": offsets must be non-decreasing, but offsets[",
                        s + 1, "] = ", o[s + 1], " < offsets[", s, "] = ", o[s]);
      longest = std::max(longest, o[s + 1] - o[s]);
    }
    a.max_rows = longest;
  }
  if (a.slots.is_cpu()) {
    const int64_t* sl = a.slots.data_ptr<int64_t>();
    for (int64_t s = 0; s < T; ++s)
      TORCH_CHECK_VALUE(sl[s] >= -1 && sl[s] < P, op, ": slots[", s, "] = ", sl[s],
                        " is not a factor slot: must be -1 (no delta) or in [0, P = ", P, ")");
  }
  if (a.ranks.is_cpu()) {
    const int64_t* r = a.ranks.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p)
      TORCH_CHECK_VALUE(r[p] >= 0 && r[p] <= kmax, op, ": ranks[", p, "] = ", r[p],
                        " must lie within [0, kmax = ", kmax, "] (kmax = U.size(2))");
  }
  return a;
}

// Functional form of an in-place implementation: a copy of base, updated.
template <typename InPlace>
at::Tensor segmented_functional(const char* op, InPlace&& apply_, const at::Tensor& base,
                                const at::Tensor& x, const at::Tensor& offsets,
                                const at::Tensor& slots, const at::Tensor& U, const at::Tensor& S,
                                const at::Tensor& V, const at::Tensor& ranks, double alpha) {
  checks::check_defined(op, "base", base);
  at::Tensor out = base.clone(at::MemoryFormat::Contiguous);
  apply_("base", out, x, offsets, slots, U, S, V, ranks, alpha);
  return out;
}

}  // namespace tsv_fast
