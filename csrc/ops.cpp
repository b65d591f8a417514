// Schemas of all tsv_fast ops, and their one Autograd kernel.  Backend
// implementations register themselves with TORCH_LIBRARY_IMPL in their own
// files (cpu/, cuda/).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

#include "kernels/cholesky_inverse.h"
#include "kernels/jacobi_eigh.h"

namespace {
// batched_eigh_shared_order: see kernels/jacobi_eigh.h (max_shared_order).
int64_t eigh_shared_order(int64_t smem_bytes, bool float64) {
  TORCH_CHECK_VALUE(smem_bytes >= 0, "batched_eigh_shared_order: smem_bytes must be >= 0, got ", smem_bytes);
  const size_t b = static_cast<size_t>(smem_bytes);
  return float64 ? tsv_fast::jacobi::max_shared_order<double>(b) : tsv_fast::jacobi::max_shared_order<float>(b);
}

// batched_cholesky_inverse_shared_order: see kernels/cholesky_inverse.h (max_shared_order).
int64_t cholesky_inverse_shared_order(int64_t smem_bytes, bool float64) {
  TORCH_CHECK_VALUE(smem_bytes >= 0, "batched_cholesky_inverse_shared_order: smem_bytes must be >= 0, got ",
                    smem_bytes);
  const size_t b = static_cast<size_t>(smem_bytes);
  return float64 ? tsv_fast::cholinv::max_shared_order<double>(b) : tsv_fast::cholinv::max_shared_order<float>(b);
}

// Autograd kernel of every tensor op: none has a derivative.  Autograd's fallback used to let
// outputs require grad with no gradient behind them, except where a CPU kernel's own ATen calls
// recorded one (CPU and GPU differed).  Now inputs that require grad are refused while grad mode
// is on, on every device; otherwise the op runs below autograd, and what it writes in place gets
// its version bumped (so a stale tensor saved for backward is detected, as for ATen's ops).
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  const bool grad_mode = c10::GradMode::is_enabled();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!v.isTensor()) continue;
    const at::Tensor& t = v.toTensor();
    TORCH_CHECK_NOT_IMPLEMENTED(!(grad_mode && t.defined() && t.requires_grad()), op.schema().name(),
                                " is not differentiable, but its argument ", args[i].name(),
                                " requires grad: call it under torch.no_grad() or on detached tensors, "
                                "or use the wrappers in tsv_fast.ops, which fall back to PyTorch when "
                                "gradients are needed");
    if (args[i].alias_info() && args[i].alias_info()->isWrite()) written.push_back(t);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace

TORCH_LIBRARY(tsv_fast, m) {
  // The fake (meta) kernels, for torch.compile, are registered from Python by this module.
  m.set_python_module("tsv_fast.ops");
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
  // R^-1 for G = R^T R (upper Cholesky factor, from G's upper triangle) of a
  // batch of SPD matrices (B, n, n) | (n, n), and info (B,) | () int32 as
  // torch.linalg.cholesky_ex's (0, or the first failed pivot; R^-1 all NaN
  // there): CholeskyQR's factor in one launch (see csrc/kernels/cholesky_inverse.h).
  // threads: CUDA threads per matrix (0: 256); on the CPU 0 runs the plain
  // algorithm, a power of two emulates the kernel's threads (for testing).
  m.def("batched_cholesky_inverse(Tensor G, int threads=0) -> (Tensor Rinv, Tensor info)");
  // Largest n the CUDA kernel keeps in shared memory, given the device's
  // per-block opt-in limit in bytes (no tensors: computed on the host).
  m.def("batched_cholesky_inverse_shared_order(int smem_bytes, bool float64) -> int", &cholesky_inverse_shared_order);
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

TORCH_LIBRARY_IMPL(tsv_fast, Autograd, m) {
  for (const char* name : {"reconstruct", "reconstruct_emulated", "batched_eigh", "batched_eigh_emulated",
                           "batched_cholesky_inverse",
                           "segmented_lowrank_apply", "segmented_lowrank_apply_",
                           "segmented_lowrank_apply_emulated", "segmented_lowrank_apply_emulated_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
}
