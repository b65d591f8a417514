// CPU emulation of the CUDA segmented_lowrank_apply kernels
// (csrc/cuda/segmented.cu).  Runs the very same phase functions from
// kernels/segmented_lowrank.h for every simulated thread of every simulated
// block, with the same grid (column tile, segment, z) and the same
// shrink -> expand pass order; a phase finishes for all threads of a block
// before the next one starts, which is what __syncthreads() guarantees on the
// GPU, and the shrink pass finishes for the whole grid before the expand pass
// starts, like two kernel launches on one stream.  Slow, but it exercises the
// kernels' segment lookup, indexing, bounds handling and shared-memory layout
// on machines without a GPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../kernels/segmented_lowrank.h"
#include "../segmented.h"

namespace tsv_fast {
namespace {

constexpr int64_t kEmulatedGridZ = 65535;  // gridDim.z limit, as in the CUDA launch

// One pass over the grid (col_tiles, T, Z): Load / Write are the pass's phases.
template <typename P, typename acc_t, typename Load, typename Write>
void emulate_pass(const P& p, int64_t col_tiles, int64_t Z, Load load, Write write, bool shrink) {
  using namespace sgmv;
  at::parallel_for(0, col_tiles * p.T * Z, 1, [&](int64_t begin, int64_t end) {
    auto smem = std::make_unique<Smem<acc_t>>();  // one block's shared memory
    std::vector<Acc<acc_t>> regs(THREADS);        // each thread's registers
    for (int64_t blk = begin; blk < end; ++blk) {
      // blockIdx = (x: column tile, y: segment, z)
      const int64_t col_tile = blk % col_tiles, seg = (blk / col_tiles) % p.T,
                    z = blk / (col_tiles * p.T);
      const Segment g = segment(p, seg);
      const int64_t col0 = col_tile * BN;
      if (shrink && col0 >= g.rank) continue;  // whole block idle (uniform)
      const int64_t kext = shrink ? p.n : g.rank;  // contraction length
      for (int64_t row0 = g.begin + z * BM; row0 < g.end; row0 += Z * BM) {
        for (int t = 0; t < THREADS; ++t) zero_acc(regs[t]);
        for (int64_t k0 = 0; k0 < kext; k0 += BK) {
          for (int t = 0; t < THREADS; ++t) load(p, g, row0, col0, t, k0, *smem);
          // __syncthreads()
          for (int t = 0; t < THREADS; ++t) accumulate(*smem, t, regs[t]);
          // __syncthreads()
        }
        for (int t = 0; t < THREADS; ++t) write(p, g, row0, col0, t, regs[t]);
      }
    }
  });
}

void segmented_apply_emulated_impl(const char* out_name, at::Tensor& out, const at::Tensor& x,
                                   const at::Tensor& offsets, const at::Tensor& slots,
                                   const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                   const at::Tensor& ranks, double alpha) {
  const SegmentedArgs a = check_segmented_args("segmented_lowrank_apply_emulated", out_name, out,
                                               x, offsets, slots, U, S, V, ranks, alpha);
  if (a.T == 0 || a.kmax == 0 || a.N == 0 || a.m == 0) return;
  at::Tensor o = out.is_contiguous() ? out : out.contiguous();
  const at::ScalarType ct = reconstruct_compute_dtype(a.x.scalar_type(), a.U.scalar_type());
  at::Tensor t = at::empty({a.N, a.kmax}, a.x.options().dtype(ct));
  const int64_t Z = sgmv::row_tile_blocks(a.max_rows, kEmulatedGridZ);
  TSV_FAST_DISPATCH_BASE_FACTOR(a.x.scalar_type(), a.U.scalar_type(),
                                "segmented_lowrank_apply_emulated",
    using P = sgmv::Params<base_t, factor_t, acc_t>;
    const P p{a.x.data_ptr<base_t>(), o.data_ptr<base_t>(), t.data_ptr<acc_t>(),
              a.U.data_ptr<factor_t>(), a.S.data_ptr<factor_t>(), a.V.data_ptr<factor_t>(),
              a.offsets.data_ptr<int64_t>(), a.slots.data_ptr<int64_t>(),
              a.ranks.data_ptr<int64_t>(), a.N, a.n, a.m, a.kmax, a.T, a.P,
              static_cast<acc_t>(alpha)};
    emulate_pass<P, acc_t>(p, sgmv::shrink_col_tiles(a.kmax), Z,
                           sgmv::shrink_load<base_t, factor_t, acc_t>,
                           sgmv::shrink_write<base_t, factor_t, acc_t>, /*shrink=*/true);
    emulate_pass<P, acc_t>(p, sgmv::expand_col_tiles(a.m), Z,
                           sgmv::expand_load<base_t, factor_t, acc_t>,
                           sgmv::expand_write<base_t, factor_t, acc_t>, /*shrink=*/false);
  );
  if (!o.is_same(out)) out.copy_(o);
}

}  // namespace

void segmented_lowrank_apply_emulated_cpu_(at::Tensor& out, const at::Tensor& x,
                                           const at::Tensor& offsets, const at::Tensor& slots,
                                           const at::Tensor& U, const at::Tensor& S,
                                           const at::Tensor& V, const at::Tensor& ranks,
                                           double alpha) {
  segmented_apply_emulated_impl("out", out, x, offsets, slots, U, S, V, ranks, alpha);
}

at::Tensor segmented_lowrank_apply_emulated_cpu(const at::Tensor& base, const at::Tensor& x,
                                                const at::Tensor& offsets,
                                                const at::Tensor& slots, const at::Tensor& U,
                                                const at::Tensor& S, const at::Tensor& V,
                                                const at::Tensor& ranks, double alpha) {
  return segmented_functional("segmented_lowrank_apply_emulated", segmented_apply_emulated_impl,
                              base, x, offsets, slots, U, S, V, ranks, alpha);
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CPU, m) {
  m.impl("segmented_lowrank_apply_emulated", &tsv_fast::segmented_lowrank_apply_emulated_cpu);
  m.impl("segmented_lowrank_apply_emulated_", &tsv_fast::segmented_lowrank_apply_emulated_cpu_);
}
