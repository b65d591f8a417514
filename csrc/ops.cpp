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
  // Eigen-decomposition of a batch of small symmetric matrices (B, n, n) | (n, n)
  // by parallel-ordered Jacobi; eigenvalues ascending, eigenvectors as columns
  // (see csrc/eigh.h, csrc/kernels/jacobi_eigh.h).
  m.def("batched_eigh(Tensor A, int max_sweeps=30, float tol=0.0) -> (Tensor eigenvalues, Tensor eigenvectors)");
  // CPU emulation of the CUDA kernel; force_path: -1 auto (as on sm_90),
  // 0 global-memory workspace, 1 shared-memory workspace.  For testing.
  m.def("batched_eigh_emulated(Tensor A, int max_sweeps=30, float tol=0.0, int force_path=-1) -> (Tensor eigenvalues, Tensor eigenvectors)");
}
