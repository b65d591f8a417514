// CPU implementation of tsv_fast::reconstruct: ATen BLAS in the compute dtype,
// then one cast to base's dtype.
#include <torch/library.h>

#include "../reconstruct.h"

namespace tsv_fast {

at::Tensor reconstruct_cpu(const at::Tensor& base, const at::Tensor& U, const at::Tensor& S,
                           const at::Tensor& V, double alpha) {
  const ReconstructArgs a = check_reconstruct_args("reconstruct", base, U, S, V, alpha);
  const at::ScalarType ct =
      reconstruct_compute_dtype(a.base.scalar_type(), a.U.scalar_type());
  const at::Tensor b = a.base.to(ct);
  // U diag(S) alpha, in the kernel's order: NaN/Inf factors give NaN/Inf as on the GPU, also
  // for alpha = 0 (the GEMM's own alpha = 0 would skip the product and return base).
  const at::Tensor US = (a.U.to(ct) * a.S.to(ct).unsqueeze(-2)).mul_(alpha);
  const at::Tensor Vt = a.V.to(ct).transpose(-1, -2);
  at::Tensor out = a.batched ? at::baddbmm(b, US, Vt) : at::addmm(b, US, Vt);
  return out.to(a.base.scalar_type());
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CPU, m) {
  m.impl("reconstruct", &tsv_fast::reconstruct_cpu);
}
