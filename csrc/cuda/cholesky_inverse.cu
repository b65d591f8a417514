// CUDA implementation of tsv_fast::batched_cholesky_inverse: one block per
// matrix running the phases of kernels/cholesky_inverse.h in the input dtype.
// The matrix stays in shared memory where it fits the device's opt-in limit
// (float64 up to n = 169 on sm_90, 143 on sm_80); larger ones are worked on in
// place in the output (global memory; only tmp and info in shared memory).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../cholesky_inverse.h"
#include "../kernels/cholesky_inverse.h"

namespace tsv_fast {
namespace {

template <typename T>
__global__ void __launch_bounds__(cholinv::kMaxThreads)
    cholesky_inverse_kernel(const T* __restrict__ in, T* out, int32_t* info, int n, bool in_smem,
                            int64_t batch_offset) {
  using namespace cholinv;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const int nth = static_cast<int>(blockDim.x);
  const int64_t mat = batch_offset + static_cast<int64_t>(blockIdx.x);
  const int64_t nn = static_cast<int64_t>(n) * n;
  T* sm = reinterpret_cast<T*>(smem_raw);
  Ws<T> ws;
  ws.A = in_smem ? sm : out + mat * nn;
  ws.tmp = in_smem ? sm + nn : sm;
  ws.info = reinterpret_cast<int*>(ws.tmp + n + 1);
  ws.n = n;

  load_input(ws, in + mat * nn, tid, nth);
  __syncthreads();
  for (int j = 0; j < n; ++j) {
    chol_scale(ws, j, tid, nth);
    __syncthreads();
    chol_update(ws, j, tid, nth);
    __syncthreads();
  }
  for (int i = n - 1; i >= 0; --i) {
    inv_scale(ws, i, tid, nth);
    __syncthreads();
    inv_update(ws, i, tid, nth);
    __syncthreads();
  }
  write_out(ws, out + mat * nn, tid, nth);
  if (tid == 0) info[mat] = *ws.info;
}

constexpr int64_t kMaxGridX = 2147483647;

}  // namespace

std::tuple<at::Tensor, at::Tensor> batched_cholesky_inverse_cuda(const at::Tensor& G, int64_t threads) {
  const CholInvArgs a = check_cholinv_args("batched_cholesky_inverse", G, threads);
  const c10::cuda::CUDAGuard guard(a.G.device());
  auto [out, info] = cholinv_outputs(a);
  if (a.n == 0 || a.batch == 0) {
    info.zero_();
    return {out, info};
  }
  const int n = static_cast<int>(a.n);
  const int nth = threads ? static_cast<int>(threads) : cholinv::kThreads;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int optin_i = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_i, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        a.G.device().index()));
  const size_t optin = static_cast<size_t>(optin_i);
  AT_DISPATCH_FLOATING_TYPES(a.G.scalar_type(), "batched_cholesky_inverse_cuda", [&] {
    using T = scalar_t;
    const bool in_smem = cholinv::smem_bytes_for<T>(n, true) <= optin;
    const size_t smem = cholinv::smem_bytes_for<T>(n, in_smem);
    TORCH_CHECK_VALUE(smem <= optin, "batched_cholesky_inverse: n = ", n, " needs ", smem,
                      " bytes of shared memory even from global memory, more than the device's ", optin);
    auto kernel = cholesky_inverse_kernel<T>;
    // The device's whole opt-in limit, not this launch's need: the attribute is the function's,
    // so another host thread setting a smaller n's size before this launch would make it fail.
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin_i));
    for (int64_t b0 = 0; b0 < a.batch; b0 += kMaxGridX) {
      const int64_t nb = std::min(kMaxGridX, a.batch - b0);
      kernel<<<static_cast<unsigned>(nb), nth, smem, stream>>>(a.G.data_ptr<T>(), out.data_ptr<T>(),
                                                               info.data_ptr<int32_t>(), n, in_smem, b0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, info};
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CUDA, m) {
  m.impl("batched_cholesky_inverse", &tsv_fast::batched_cholesky_inverse_cuda);
}
