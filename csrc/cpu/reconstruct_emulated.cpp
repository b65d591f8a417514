// CPU emulation of the CUDA reconstruct kernel (csrc/cuda/reconstruct.cu).
// Runs the very same phase functions from kernels/reconstruct_tile.h for every
// simulated thread of every simulated block; a phase finishes for all threads
// of a block before the next one starts, which is what __syncthreads()
// guarantees on the GPU.  Slow, but it exercises the kernel's indexing,
// bounds handling and shared-memory layout on machines without a GPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../kernels/reconstruct_tile.h"
#include "../reconstruct.h"

namespace tsv_fast {
namespace {

template <typename base_t, typename factor_t, typename acc_t>
void emulate_grid(const tile::Params<base_t, factor_t, acc_t>& p, int64_t batch) {
  using namespace tile;
  const int64_t row_tiles = ceil_div(p.m, BM), col_tiles = ceil_div(p.n, BN);
  // Grid = (col_tiles, row_tiles, batch), like the CUDA launch.
  at::parallel_for(0, batch * row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
    auto smem = std::make_unique<Smem<acc_t>>();  // one block's shared memory
    std::vector<Acc<acc_t>> regs(THREADS);        // each thread's registers
    for (int64_t blk = begin; blk < end; ++blk) {
      const BlockIdx b{(blk / col_tiles) % row_tiles, blk % col_tiles,
                       blk / (row_tiles * col_tiles)};
      for (int t = 0; t < THREADS; ++t) zero_acc(regs[t]);
      for (int64_t k0 = 0; k0 < p.k; k0 += BK) {
        for (int t = 0; t < THREADS; ++t) load_tiles(p, b, t, k0, *smem);
        // __syncthreads()
        for (int t = 0; t < THREADS; ++t) accumulate(*smem, t, regs[t]);
        // __syncthreads()
      }
      for (int t = 0; t < THREADS; ++t) write_out(p, b, t, regs[t]);
    }
  });
}

}  // namespace

at::Tensor reconstruct_emulated_cpu(const at::Tensor& base, const at::Tensor& U,
                                    const at::Tensor& S, const at::Tensor& V, double alpha) {
  const ReconstructArgs a = check_reconstruct_args("reconstruct_emulated", base, U, S, V, alpha);
  at::Tensor out = at::empty_like(a.base);
  if (out.numel() == 0) return out;
  TSV_FAST_DISPATCH_BASE_FACTOR(a.base.scalar_type(), a.U.scalar_type(), "reconstruct_emulated",
    const tile::Params<base_t, factor_t, acc_t> p{
        a.base.data_ptr<base_t>(), a.U.data_ptr<factor_t>(), a.S.data_ptr<factor_t>(),
        a.V.data_ptr<factor_t>(), out.data_ptr<base_t>(), a.m, a.n, a.k,
        static_cast<acc_t>(alpha)};
    emulate_grid(p, a.batch);
  );
  return out;
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CPU, m) {
  m.impl("reconstruct_emulated", &tsv_fast::reconstruct_emulated_cpu);
}
