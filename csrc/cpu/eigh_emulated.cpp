// CPU emulation of the CUDA batched_eigh kernel (csrc/cuda/eigh.cu).  Runs the
// very same phase functions from kernels/jacobi_eigh.h, in the input dtype,
// with the kernel's thread count (or `threads`), for every simulated thread of every
// simulated block (one block per matrix); a phase finishes for all threads of
// a block before the next one starts, which is what __syncthreads()
// guarantees on the GPU.  Slow, but it exercises the kernel's indexing,
// memory layout and reduction on machines without a GPU.
//
// force_path selects where the simulated block keeps its workspace:
//   -1  like the CUDA op on an sm_90 GPU (H100: 227 KB of opt-in shared
//       memory per block): shared memory when it fits, else global memory;
//    0  global memory (a workspace tensor, one slice per matrix);
//    1  shared memory (an error if it would not fit in 227 KB).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../eigh.h"
#include "../kernels/jacobi_eigh.h"

namespace tsv_fast {
namespace {

constexpr size_t kEmulatedSmemOptin = 232448;  // sharedMemPerBlockOptin of an H100 (sm_90)

}  // namespace

std::tuple<at::Tensor, at::Tensor> batched_eigh_emulated_cpu(const at::Tensor& A,
                                                             int64_t max_sweeps, double tol,
                                                             int64_t force_path, int64_t threads) {
  const EighArgs a = check_eigh_args("batched_eigh_emulated", A, max_sweeps, tol, threads);
  TORCH_CHECK_VALUE(force_path >= -1 && force_path <= 1,
                    "batched_eigh_emulated: force_path must be -1 (auto), 0 (global memory) or "
                    "1 (shared memory), got ", force_path);
  auto [vals, vecs] = eigh_outputs(a);
  if (a.n == 0 || a.batch == 0) return {vals, vecs};
  const int n = static_cast<int>(a.n);
  const int nth = threads ? static_cast<int>(threads) : jacobi::threads_for(n);
  const int sweeps = static_cast<int>(std::min<int64_t>(max_sweeps, 1 << 20));
  const bool is_double = a.A.scalar_type() == at::kDouble;
  const double tol2 = eigh_tol2(tol, is_double);

  AT_DISPATCH_FLOATING_TYPES(a.A.scalar_type(), "batched_eigh_emulated", [&] {
    using T = scalar_t;
    const size_t ws_bytes = jacobi::layout_for<T>(n).bytes;
    const bool fits = jacobi::smem_bytes_for<T>(n, nth, true) <= kEmulatedSmemOptin;
    TORCH_CHECK_VALUE(force_path != 1 || fits, "batched_eigh_emulated: force_path=1 but n = ", n,
                      " needs ", jacobi::smem_bytes_for<T>(n, nth, true),
                      " bytes of shared memory, more than the emulated ", kEmulatedSmemOptin);
    const bool in_smem = force_path == 1 || (force_path == -1 && fits);
    // Global-memory path: one workspace slice per matrix, like the CUDA op.
    at::Tensor gws;
    if (!in_smem) gws = at::empty({a.batch, static_cast<int64_t>(ws_bytes)}, at::kByte);
    const T* in = a.A.data_ptr<T>();
    T* w_out = vals.data_ptr<T>();
    T* v_out = vecs.data_ptr<T>();
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      // One simulated block's dynamic shared memory: [reduction | workspace].
      const size_t smem = jacobi::smem_bytes_for<T>(n, nth, in_smem);
      std::vector<double> smem_buf((smem + sizeof(double) - 1) / sizeof(double));
      unsigned char* smem_raw = reinterpret_cast<unsigned char*>(smem_buf.data());
      double* red = smem_buf.data();
      std::vector<int> rot;  // per-thread registers
      for (int64_t b = begin; b < end; ++b) {
        unsigned char* base = in_smem ? smem_raw + jacobi::red_bytes(nth)
                                      : gws.data_ptr<uint8_t>() + b * static_cast<int64_t>(ws_bytes);
        const auto ws = jacobi::make_ws<T>(base, red, n);
        jacobi::emulate_block(ws, in + b * a.n * a.n, w_out + b * a.n, v_out + b * a.n * a.n, nth,
                              sweeps, tol2, rot);
      }
    });
  });
  return {vals, vecs};
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CPU, m) {
  m.impl("batched_eigh_emulated", &tsv_fast::batched_eigh_emulated_cpu);
}
