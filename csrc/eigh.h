// Shared pieces of the tsv_fast::batched_eigh op family (CPU, emulated, CUDA):
// argument validation, output allocation and the convergence threshold.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

#include "checks.h"
#include "kernels/jacobi_eigh.h"

namespace tsv_fast {

// Largest order accepted: the kernels index one matrix with int (n*n < 2^31).
constexpr int64_t kEighMaxN = 46340;

// Validated, contiguous view of batched_eigh's input; a 2-D input is seen as a
// batch of one.
struct EighArgs {
  at::Tensor A;  // (B, n, n) contiguous, float32 or float64
  int64_t batch, n;
  bool batched;
};

inline EighArgs check_eigh_args(const char* op, const at::Tensor& A, int64_t max_sweeps,
                                double tol, int64_t threads = 0) {
  using namespace checks;
  check_square_matrices(op, "A", A);
  TORCH_CHECK_VALUE(max_sweeps >= 0, op, ": max_sweeps must be >= 0, got ", max_sweeps);
  TORCH_CHECK_VALUE(std::isfinite(tol) && tol >= 0, op,
                    ": tol must be a finite number >= 0 (0 = working precision), got ", tol);
  TORCH_CHECK_VALUE(threads == 0 || jacobi::valid_threads(threads), op,
                    ": threads must be 0 (the kernel's choice) or a power of two from ",
                    jacobi::kMinThreads, " to ", jacobi::kMaxThreads, ", got ", threads);
  const int64_t n = A.size(-1);
  TORCH_CHECK_VALUE(n <= kEighMaxN, op, ": matrices of order n = ", n,
                    " are too large for the Jacobi kernels (at most ", kEighMaxN, ")");
  const bool batched = A.dim() == 3;
  return EighArgs{A.contiguous(), batched ? A.size(0) : 1, n, batched};
}

// Eigenvalues (B, n) | (n) and eigenvectors (B, n, n) | (n, n), contiguous,
// allocated in the input's final layout (batch-major like the input).
inline std::pair<at::Tensor, at::Tensor> eigh_outputs(const EighArgs& a) {
  if (a.batched)
    return {at::empty({a.batch, a.n}, a.A.options()), at::empty({a.batch, a.n, a.n}, a.A.options())};
  return {at::empty({a.n}, a.A.options()), at::empty({a.n, a.n}, a.A.options())};
}

// Squared stopping threshold: off(A)^2 <= tol2 * ||A||_F^2.  tol = 0 means the
// working precision: machine epsilon of the dtype the iteration runs in.
inline double eigh_tol2(double tol, bool work_is_double) {
  const double t = tol > 0 ? tol : (work_is_double ? 2.220446049250313e-16 : 1.1920928955078125e-07);
  return t * t;
}

}  // namespace tsv_fast
