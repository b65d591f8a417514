// Shared pieces of tsv_fast::batched_cholesky_inverse (CPU and CUDA): argument
// validation and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "checks.h"
#include "kernels/cholesky_inverse.h"

namespace tsv_fast {

// Validated, contiguous view of the op's input; a 2-D input is a batch of one.
struct CholInvArgs {
  at::Tensor G;  // (B, n, n) contiguous, float32 or float64
  int64_t batch, n;
  bool batched;
};

inline CholInvArgs check_cholinv_args(const char* op, const at::Tensor& G, int64_t threads) {
  using namespace checks;
  check_square_matrices(op, "G", G);
  TORCH_CHECK_VALUE(threads == 0 || cholinv::valid_threads(threads), op,
                    ": threads must be 0 (the default) or a power of two from 1 to ",
                    cholinv::kMaxThreads, ", got ", threads);
  const int64_t n = G.size(-1);
  TORCH_CHECK_VALUE(n <= 46340, op, ": matrices of order n = ", n, " are too large (at most 46340)");
  const bool batched = G.dim() == 3;
  return CholInvArgs{G.contiguous(), batched ? G.size(0) : 1, n, batched};
}

// R^-1 shaped like G, info (B,) | () int32 like torch.linalg.cholesky_ex's.
inline std::pair<at::Tensor, at::Tensor> cholinv_outputs(const CholInvArgs& a) {
  at::Tensor info = at::empty(a.batched ? at::IntArrayRef{a.batch} : at::IntArrayRef{},
                              a.G.options().dtype(at::kInt));
  return {at::empty_like(a.G), info};
}

}  // namespace tsv_fast
