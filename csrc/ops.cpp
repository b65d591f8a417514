// Schemas of all tsv_fast ops.  Backend implementations register themselves
// with TORCH_LIBRARY_IMPL in their own files (cpu/, cuda/).
#include <torch/library.h>

#include "kernels/jacobi_eigh.h"

namespace {
// batched_eigh_shared_order: see kernels/jacobi_eigh.h (max_shared_order).
int64_t eigh_shared_order(int64_t smem_bytes, bool float64) {
  TORCH_CHECK_VALUE(smem_bytes >= 0, "batched_eigh_shared_order: smem_bytes must be >= 0, got ", smem_bytes);
  const size_t b = static_cast<size_t>(smem_bytes);
  return float64 ? tsv_fast::jacobi::max_shared_order<double>(b) : tsv_fast::jacobi::max_shared_order<float>(b);
}
}  // namespace

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
  // threads: CUDA threads per matrix (0: the kernel's choice, else a power of
  // two from 32 to 1024); the CPU op runs one thread per matrix and ignores it.
  m.def("batched_eigh(Tensor A, int max_sweeps=30, float tol=0.0, int threads=0) -> (Tensor eigenvalues, Tensor eigenvectors)");
  // Largest n the CUDA batched_eigh kernel keeps in shared memory, given the
  // device's per-block opt-in limit in bytes (no tensors: computed on the host).
  m.def("batched_eigh_shared_order(int smem_bytes, bool float64) -> int", &eigh_shared_order);
  // CPU emulation of the CUDA kernel; force_path: -1 auto (as on sm_90),
  // 0 global-memory workspace, 1 shared-memory workspace.  For testing.
  m.def("batched_eigh_emulated(Tensor A, int max_sweeps=30, float tol=0.0, int force_path=-1, int threads=0) -> (Tensor eigenvalues, Tensor eigenvectors)");
  // Segmented low-rank apply (SGMV): for every segment s of rows
  // offsets[s]:offsets[s+1] with factor slot p = slots[s] (-1: none) and rank
  // k = ranks[p]:  out[rows] += alpha * ((x[rows] V[p,:,:k]) * S[p,:k]) U[p,:,:k]^T.
  // Functional form returns a copy of base, updated; the _ form updates out in
  // place (see csrc/segmented.h).
  m.def("segmented_lowrank_apply(Tensor base, Tensor x, Tensor offsets, Tensor slots, Tensor U, Tensor S, Tensor V, Tensor ranks, float alpha) -> Tensor");
  m.def("segmented_lowrank_apply_(Tensor(a!) out, Tensor x, Tensor offsets, Tensor slots, Tensor U, Tensor S, Tensor V, Tensor ranks, float alpha) -> ()");
  // Same ops, computed on CPU by running the CUDA kernels' phase functions
  // thread by thread (csrc/cpu/segmented_emulated.cpp).  For testing.
  m.def("segmented_lowrank_apply_emulated(Tensor base, Tensor x, Tensor offsets, Tensor slots, Tensor U, Tensor S, Tensor V, Tensor ranks, float alpha) -> Tensor");
  m.def("segmented_lowrank_apply_emulated_(Tensor(a!) out, Tensor x, Tensor offsets, Tensor slots, Tensor U, Tensor S, Tensor V, Tensor ranks, float alpha) -> ()");
}
