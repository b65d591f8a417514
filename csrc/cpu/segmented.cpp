// CPU implementation of tsv_fast::segmented_lowrank_apply: one pair of ATen
// GEMMs per segment (each GEMM is threaded by the BLAS), in the compute dtype
// (float32, float64 if x or the factors are float64), one rounding of out.
#include <torch/library.h>

#include "../segmented.h"

namespace tsv_fast {

void segmented_apply_cpu_impl(const char* out_name, at::Tensor& out, const at::Tensor& x,
                              const at::Tensor& offsets, const at::Tensor& slots,
                              const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                              const at::Tensor& ranks, double alpha) {
  const SegmentedArgs a = check_segmented_args("segmented_lowrank_apply", out_name, out, x,
                                               offsets, slots, U, S, V, ranks, alpha);
  const at::ScalarType ct = reconstruct_compute_dtype(a.x.scalar_type(), a.U.scalar_type());
  const int64_t* o = a.offsets.data_ptr<int64_t>();
  const int64_t* sl = a.slots.data_ptr<int64_t>();
  const int64_t* rk = a.ranks.data_ptr<int64_t>();
  for (int64_t s = 0; s < a.T; ++s) {
    const int64_t begin = o[s], rows = o[s + 1] - o[s], p = sl[s];
    if (rows == 0 || p < 0) continue;
    const int64_t k = rk[p];
    if (k == 0) continue;
    const at::Tensor xs = a.x.narrow(0, begin, rows).to(ct);
    const at::Tensor Vk = a.V[p].narrow(1, 0, k).to(ct);                 // (n, k)
    const at::Tensor Sk = a.S[p].narrow(0, 0, k).to(ct);                 // (k)
    const at::Tensor Ukt = a.U[p].narrow(1, 0, k).to(ct).t();            // (k, m)
    // shrink; alpha scales t as in the kernel, so NaN/Inf factors give NaN/Inf as on the GPU,
    // also for alpha = 0 (the GEMM's own alpha = 0 would skip the product)
    const at::Tensor t = at::mm(xs, Vk).mul_(Sk).mul_(alpha);
    at::Tensor os = out.narrow(0, begin, rows);
    if (os.scalar_type() == ct) {
      os.addmm_(t, Ukt);                                                 // expand
    } else {
      os.copy_(at::addmm(os.to(ct), t, Ukt));                            // one rounding
    }
  }
}

void segmented_lowrank_apply_cpu_(at::Tensor& out, const at::Tensor& x, const at::Tensor& offsets,
                                  const at::Tensor& slots, const at::Tensor& U,
                                  const at::Tensor& S, const at::Tensor& V,
                                  const at::Tensor& ranks, double alpha) {
  segmented_apply_cpu_impl("out", out, x, offsets, slots, U, S, V, ranks, alpha);
}

at::Tensor segmented_lowrank_apply_cpu(const at::Tensor& base, const at::Tensor& x,
                                       const at::Tensor& offsets, const at::Tensor& slots,
                                       const at::Tensor& U, const at::Tensor& S,
                                       const at::Tensor& V, const at::Tensor& ranks,
                                       double alpha) {
  return segmented_functional("segmented_lowrank_apply", segmented_apply_cpu_impl, base, x,
                              offsets, slots, U, S, V, ranks, alpha);
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CPU, m) {
  m.impl("segmented_lowrank_apply", &tsv_fast::segmented_lowrank_apply_cpu);
  m.impl("segmented_lowrank_apply_", &tsv_fast::segmented_lowrank_apply_cpu_);
}
