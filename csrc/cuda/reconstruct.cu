// CUDA implementation of tsv_fast::reconstruct: one fused tiled kernel.
// Each 256-thread block owns a 64x64 output tile of one batch entry; k is
// staged 16 at a time in shared memory (U pre-scaled by alpha*S), each thread
// accumulates a 4x4 register micro-tile, and the epilogue adds base and writes
// the output once in base's dtype.  The kernel body lives in
// kernels/reconstruct_tile.h so the CPU emulator can run it too.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../kernels/reconstruct_tile.h"
#include "../reconstruct.h"

namespace tsv_fast {
namespace {

template <typename base_t, typename factor_t, typename acc_t>
__global__ void __launch_bounds__(tile::THREADS)
    reconstruct_kernel(const tile::Params<base_t, factor_t, acc_t> p, int64_t batch_offset) {
  using namespace tile;
  __shared__ Smem<acc_t> smem;
  const int tid = static_cast<int>(threadIdx.x);
  const BlockIdx b{static_cast<int64_t>(blockIdx.y), static_cast<int64_t>(blockIdx.x),
                   static_cast<int64_t>(blockIdx.z) + batch_offset};
  Acc<acc_t> acc;
  zero_acc(acc);
  for (int64_t k0 = 0; k0 < p.k; k0 += BK) {
    load_tiles(p, b, tid, k0, smem);
    __syncthreads();
    accumulate(smem, tid, acc);
    __syncthreads();
  }
  write_out(p, b, tid, acc);
}

constexpr int64_t kMaxGridYZ = 65535;

}  // namespace

at::Tensor reconstruct_cuda(const at::Tensor& base, const at::Tensor& U, const at::Tensor& S,
                            const at::Tensor& V, double alpha) {
  const ReconstructArgs a = check_reconstruct_args("reconstruct", base, U, S, V, alpha);
  const c10::cuda::CUDAGuard guard(a.base.device());
  at::Tensor out = at::empty_like(a.base);
  if (out.numel() == 0) return out;

  using namespace tile;
  const int64_t row_tiles = ceil_div(a.m, BM), col_tiles = ceil_div(a.n, BN);
  TORCH_CHECK(row_tiles <= kMaxGridYZ, "reconstruct: base has too many rows for the CUDA kernel (m = ",
              a.m, ", at most ", kMaxGridYZ * BM, ")");
  TORCH_CHECK(col_tiles <= INT32_MAX, "reconstruct: base has too many columns (n = ", a.n, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  TSV_FAST_DISPATCH_BASE_FACTOR(a.base.scalar_type(), a.U.scalar_type(), "reconstruct_cuda",
    const Params<base_t, factor_t, acc_t> p{
        a.base.data_ptr<base_t>(), a.U.data_ptr<factor_t>(), a.S.data_ptr<factor_t>(),
        a.V.data_ptr<factor_t>(), out.data_ptr<base_t>(), a.m, a.n, a.k,
        static_cast<acc_t>(alpha)};
    // gridDim.z is limited to 65535: launch large batches in chunks.
    for (int64_t b0 = 0; b0 < a.batch; b0 += kMaxGridYZ) {
      const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles),
                      static_cast<unsigned>(std::min(kMaxGridYZ, a.batch - b0)));
      reconstruct_kernel<base_t, factor_t, acc_t><<<grid, THREADS, 0, stream>>>(p, b0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  );
  return out;
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CUDA, m) {
  m.impl("reconstruct", &tsv_fast::reconstruct_cuda);
}
