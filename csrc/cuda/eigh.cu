// CUDA implementation of tsv_fast::batched_eigh: one block per matrix running
// the parallel-ordered Jacobi of kernels/jacobi_eigh.h in the input dtype.
//
// Memory: the block's dynamic shared memory holds the reduction buffer and,
// when it fits in the device's opt-in limit (sharedMemPerBlockOptin: 163 KB on
// sm_80, 227 KB on sm_90), the whole workspace (A, V^T, rotations): float32 up
// to n = 140 (sm_80) / 167 (sm_90), float64 up to n = 99 / 118.  Larger
// matrices run the same kernel on a global-memory workspace (one slice per
// matrix, the batch launched in chunks of at most ~512 MB of workspace).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../eigh.h"
#include "../kernels/jacobi_eigh.h"

namespace tsv_fast {
namespace {

// Built for blocks of up to 256 threads (74 registers in float64 on sm_90), 512
// (the default above n = 80) and 1024 (at most 128 and 64 registers; float64
// spills ~100 bytes at 1024); the smallest build that fits is run.
template <typename T, int kBound>
__global__ void __launch_bounds__(kBound)
    jacobi_eigh_kernel(const T* __restrict__ in, T* __restrict__ vals, T* __restrict__ vecs,
                       int n, int max_sweeps, double tol2, bool in_smem, unsigned char* gws,
                       size_t ws_bytes, int64_t batch_offset) {
  using namespace jacobi;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const int nth = static_cast<int>(blockDim.x);
  const int64_t mat = batch_offset + static_cast<int64_t>(blockIdx.x);
  const int64_t nn = static_cast<int64_t>(n) * n;
  double* red = reinterpret_cast<double*>(smem_raw);
  unsigned char* base = in_smem ? smem_raw + red_bytes(nth)
                                : gws + static_cast<size_t>(blockIdx.x) * ws_bytes;
  const Ws<T> ws = make_ws<T>(base, red, n);

  load_input(ws, in + mat * nn, tid, nth);
  __syncthreads();
  max_partial(ws, tid, nth);
  __syncthreads();
  for (int stride = reduce_threads(nth) / 2; stride > 0; stride /= 2) {
    max_step(red, tid, nth, stride);
    __syncthreads();
  }
  const int e = scale_exponent(red);  // uniform across the block
  scale_input(ws, e, tid, nth);
  __syncthreads();  // also orders the reads of red[0] before norms_partial's writes
  int rot = 0;
  for (int sweep = 0;; ++sweep) {
    norms_partial(ws, tid, nth, rot);
    __syncthreads();
    for (int stride = reduce_threads(nth) / 2; stride > 0; stride /= 2) {
      reduce_step(red, tid, nth, stride);
      __syncthreads();
    }
    // Uniform across the block: every thread reads the same reduced values.
    // The next write to `red` is separated from these reads by the sweep's
    // barriers.
    if (nonfinite(red, nth)) {
      poison_output(ws, tid, nth);
      __syncthreads();
      break;
    }
    if (converged(red, nth, tol2, sweep) || sweep >= max_sweeps) break;
    rot = 0;
    for (int round = 0; round < ws.np - 1; ++round) {
      compute_rotations(ws, round, tid, nth, rot);
      __syncthreads();
      apply_rotations(ws, tid, nth);
      __syncthreads();
    }
  }
  rank_eigenvalues(ws, tid, nth);
  __syncthreads();
  write_out(ws, vals + mat * n, vecs + mat * nn, e, tid, nth);
}

constexpr size_t kMaxGlobalWorkspace = size_t(512) << 20;
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace

std::tuple<at::Tensor, at::Tensor> batched_eigh_cuda(const at::Tensor& A, int64_t max_sweeps,
                                                     double tol, int64_t threads) {
  const EighArgs a = check_eigh_args("batched_eigh", A, max_sweeps, tol, threads);
  const c10::cuda::CUDAGuard guard(a.A.device());
  auto [vals, vecs] = eigh_outputs(a);
  if (a.n == 0 || a.batch == 0) return {vals, vecs};
  const int n = static_cast<int>(a.n);
  const int nth = threads ? static_cast<int>(threads) : jacobi::threads_for(n);
  const int sweeps = static_cast<int>(std::min<int64_t>(max_sweeps, 1 << 20));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // (cudaDeviceGetAttribute rather than ATen/cuda/CUDAContext.h, whose cuSPARSE /
  // cuBLAS includes the CMake build does not have.)
  int optin_i = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_i, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        a.A.device().index()));
  const size_t optin = static_cast<size_t>(optin_i);

  AT_DISPATCH_FLOATING_TYPES(a.A.scalar_type(), "batched_eigh_cuda", [&] {
    using T = scalar_t;
    const double tol2 = eigh_tol2(tol, std::is_same_v<T, double>);
    const size_t ws_bytes = jacobi::layout_for<T>(n).bytes;
    const bool in_smem = jacobi::smem_bytes_for<T>(n, nth, true) <= optin;
    const size_t smem = jacobi::smem_bytes_for<T>(n, nth, in_smem);
    auto kernel = nth <= 256 ? jacobi_eigh_kernel<T, 256>
                  : nth <= 512 ? jacobi_eigh_kernel<T, 512>
                               : jacobi_eigh_kernel<T, jacobi::kMaxThreads>;
    // The device's whole opt-in limit, not this launch's need: the attribute is the function's,
    // so another host thread setting a smaller n's size before this launch would make it fail.
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin_i));
    // Global-memory path: a workspace slice per matrix of the current chunk.
    int64_t chunk = kMaxGridX;
    at::Tensor gws;
    if (!in_smem) {
      chunk = std::max<int64_t>(1, static_cast<int64_t>(kMaxGlobalWorkspace / ws_bytes));
      chunk = std::min(chunk, a.batch);
      gws = at::empty({chunk, static_cast<int64_t>(ws_bytes)}, a.A.options().dtype(at::kByte));
    }
    unsigned char* gws_ptr = in_smem ? nullptr : gws.data_ptr<uint8_t>();
    for (int64_t b0 = 0; b0 < a.batch; b0 += chunk) {
      const int64_t nb = std::min(chunk, a.batch - b0);
      kernel<<<static_cast<unsigned>(nb), nth, smem, stream>>>(
          a.A.data_ptr<T>(), vals.data_ptr<T>(), vecs.data_ptr<T>(), n, sweeps, tol2, in_smem,
          gws_ptr, ws_bytes, b0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {vals, vecs};
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CUDA, m) {
  m.impl("batched_eigh", &tsv_fast::batched_eigh_cuda);
}
