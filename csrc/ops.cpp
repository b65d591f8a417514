// Schemas of all tsv_fast ops.  Backend implementations register themselves
// with TORCH_LIBRARY_IMPL in their own files (cpu/, cuda/).
#include <torch/library.h>

TORCH_LIBRARY(tsv_fast, m) {
  // base + alpha * U @ diag(S) @ V^T, written straight into a fresh output of
  // base's dtype/shape/device; 2-D or batched 3-D (see csrc/reconstruct.h).
  m.def("reconstruct(Tensor base, Tensor U, Tensor S, Tensor V, float alpha) -> Tensor");
  // Same op, computed on CPU by running the CUDA kernel's phase functions
  // thread by thread (csrc/cpu/reconstruct_emulated.cpp).  For testing.
  m.def("reconstruct_emulated(Tensor base, Tensor U, Tensor S, Tensor V, float alpha) -> Tensor");
}
