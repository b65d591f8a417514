// CUDA implementation of tsv_fast::segmented_lowrank_apply (SGMV): two
// launches on the current stream, each covering every segment of the batch.
//   shrink: t = x_seg V_p        grid (ceil(kmax/64), T, Z)
//   expand: out_seg += (alpha t * S_p) U_p^T    grid (ceil(m/64), T, Z)
// A 256-thread block reads its segment's rows from `offsets` and walks the
// segment's 64-row tiles z, z+Z, ...; each tile is a shared-memory tiled GEMM
// (k staged 16 at a time, 4x4 register micro-tile per thread).  The kernel
// bodies live in kernels/segmented_lowrank.h so the CPU emulator runs them too.
// Index tensors on the CPU are validated and copied to the GPU (one small
// copy); index tensors already on the GPU are used as they are.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/segmented_lowrank.h"
#include "../segmented.h"

namespace tsv_fast {
namespace {

template <typename x_t, typename factor_t, typename acc_t>
__global__ void __launch_bounds__(sgmv::THREADS)
    sgmv_shrink_kernel(const sgmv::Params<x_t, factor_t, acc_t> p) {
  using namespace sgmv;
  __shared__ Smem<acc_t> smem;
  const int tid = static_cast<int>(threadIdx.x);
  const Segment g = segment(p, static_cast<int64_t>(blockIdx.y));
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * BN;
  if (col0 >= g.rank) return;  // uniform: the whole block leaves
  const int64_t Z = gridDim.z;
  for (int64_t row0 = g.begin + static_cast<int64_t>(blockIdx.z) * BM; row0 < g.end;
       row0 += Z * BM) {
    Acc<acc_t> acc;
    zero_acc(acc);
    for (int64_t k0 = 0; k0 < p.n; k0 += BK) {
      shrink_load(p, g, row0, col0, tid, k0, smem);
      __syncthreads();
      accumulate(smem, tid, acc);
      __syncthreads();
    }
    shrink_write(p, g, row0, col0, tid, acc);
  }
}

template <typename x_t, typename factor_t, typename acc_t>
__global__ void __launch_bounds__(sgmv::THREADS)
    sgmv_expand_kernel(const sgmv::Params<x_t, factor_t, acc_t> p) {
  using namespace sgmv;
  __shared__ Smem<acc_t> smem;
  const int tid = static_cast<int>(threadIdx.x);
  const Segment g = segment(p, static_cast<int64_t>(blockIdx.y));
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t Z = gridDim.z;
  for (int64_t row0 = g.begin + static_cast<int64_t>(blockIdx.z) * BM; row0 < g.end;
       row0 += Z * BM) {
    Acc<acc_t> acc;
    zero_acc(acc);
    for (int64_t k0 = 0; k0 < g.rank; k0 += BK) {
      expand_load(p, g, row0, col0, tid, k0, smem);
      __syncthreads();
      accumulate(smem, tid, acc);
      __syncthreads();
    }
    expand_write(p, g, row0, col0, tid, acc);
  }
}

constexpr int64_t kMaxGridYZ = 65535;

at::Tensor on_device(const at::Tensor& t, const at::Device& d) {
  return t.device() == d ? t : t.to(d, /*non_blocking=*/false);
}

void segmented_apply_cuda_impl(const char* out_name, at::Tensor& out, const at::Tensor& x,
                               const at::Tensor& offsets, const at::Tensor& slots,
                               const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                               const at::Tensor& ranks, double alpha) {
  const SegmentedArgs a = check_segmented_args("segmented_lowrank_apply", out_name, out, x,
                                               offsets, slots, U, S, V, ranks, alpha);
  TORCH_CHECK_VALUE(a.x.is_cuda(), "segmented_lowrank_apply: x is on ", a.x.device(),
                    "; the CUDA kernel needs x, ", out_name, " and the factors on a CUDA device");
  if (a.T == 0 || a.kmax == 0 || a.N == 0 || a.m == 0) return;
  TORCH_CHECK(a.T <= kMaxGridYZ, "segmented_lowrank_apply: at most ", kMaxGridYZ,
              " segments per call on CUDA, got T = ", a.T);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const at::Device dev = a.x.device();
  const at::Tensor offs = on_device(a.offsets, dev), sl = on_device(a.slots, dev),
                   rk = on_device(a.ranks, dev);
  at::Tensor o = out.is_contiguous() ? out : out.contiguous();
  const at::ScalarType ct = reconstruct_compute_dtype(a.x.scalar_type(), a.U.scalar_type());
  at::Tensor t = at::empty({a.N, a.kmax}, a.x.options().dtype(ct));

  using namespace sgmv;
  const int64_t Z = row_tile_blocks(a.max_rows, kMaxGridYZ);
  const int64_t shrink_tiles = shrink_col_tiles(a.kmax), expand_tiles = expand_col_tiles(a.m);
  TORCH_CHECK(expand_tiles <= INT32_MAX, "segmented_lowrank_apply: out has too many columns (m = ",
              a.m, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TSV_FAST_DISPATCH_BASE_FACTOR(a.x.scalar_type(), a.U.scalar_type(), "segmented_lowrank_apply_cuda",
    const Params<base_t, factor_t, acc_t> p{
        a.x.data_ptr<base_t>(), o.data_ptr<base_t>(), t.data_ptr<acc_t>(),
        a.U.data_ptr<factor_t>(), a.S.data_ptr<factor_t>(), a.V.data_ptr<factor_t>(),
        offs.data_ptr<int64_t>(), sl.data_ptr<int64_t>(), rk.data_ptr<int64_t>(),
        a.N, a.n, a.m, a.kmax, a.T, a.P, static_cast<acc_t>(alpha)};
    const dim3 shrink_grid(static_cast<unsigned>(shrink_tiles), static_cast<unsigned>(a.T),
                           static_cast<unsigned>(Z));
    sgmv_shrink_kernel<base_t, factor_t, acc_t><<<shrink_grid, THREADS, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 expand_grid(static_cast<unsigned>(expand_tiles), static_cast<unsigned>(a.T),
                           static_cast<unsigned>(Z));
    sgmv_expand_kernel<base_t, factor_t, acc_t><<<expand_grid, THREADS, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  );
  if (!o.is_same(out)) out.copy_(o);
}

}  // namespace

void segmented_lowrank_apply_cuda_(at::Tensor& out, const at::Tensor& x, const at::Tensor& offsets,
                                   const at::Tensor& slots, const at::Tensor& U,
                                   const at::Tensor& S, const at::Tensor& V,
                                   const at::Tensor& ranks, double alpha) {
  segmented_apply_cuda_impl("out", out, x, offsets, slots, U, S, V, ranks, alpha);
}

at::Tensor segmented_lowrank_apply_cuda(const at::Tensor& base, const at::Tensor& x,
                                        const at::Tensor& offsets, const at::Tensor& slots,
                                        const at::Tensor& U, const at::Tensor& S,
                                        const at::Tensor& V, const at::Tensor& ranks,
                                        double alpha) {
  return segmented_functional("segmented_lowrank_apply", segmented_apply_cuda_impl, base, x,
                              offsets, slots, U, S, V, ranks, alpha);
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CUDA, m) {
  m.impl("segmented_lowrank_apply", &tsv_fast::segmented_lowrank_apply_cuda);
  m.impl("segmented_lowrank_apply_", &tsv_fast::segmented_lowrank_apply_cuda_);
}
