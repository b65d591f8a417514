// Kernel body for tsv_fast::segmented_lowrank_apply (SGMV):
//   for every segment s with factor slot p = slots[s]:
//     out[a:b] += alpha * ((x[a:b] V_p[:, :k]) * S_p[:k]) U_p[:, :k]^T,
//   a = offsets[s], b = offsets[s+1], k = ranks[p].
//
// Two grid-wide passes, each one launch covering every segment:
//   shrink:  t[a:b, :k] = x[a:b] V_p[:, :k]        (rows x k, contraction over n)
//   expand:  out[a:b]  += (alpha t[a:b, :k] * S_p) U_p^T   (rows x m, contraction over k)
// t is an (N, kmax) workspace in the accumulation dtype; the kernel boundary
// between the passes is the grid-wide barrier.  Splitting the two GEMMs keeps
// the shrink from being recomputed by every output-column tile.
//
// Grid of each pass: (column tile, segment, z).  A block reads its segment's
// row range from `offsets` (so no host-side segment map is needed) and handles
// the segment's row tiles z, z + gridDim.z, ...  Each row tile is a tiled GEMM
// with the phases of kernels/reconstruct_tile.h: load (global -> shared),
// accumulate (shared -> registers, the same `tile::accumulate`), write.  The
// CUDA kernels (csrc/cuda/segmented.cu) put __syncthreads() between phases;
// the CPU emulator (csrc/cpu/segmented_emulated.cpp) runs each phase for all
// threads of a simulated block before the next one.  All loop bounds are
// uniform within a block, so every thread reaches every barrier.
//
// This header must compile with plain g++: no CUDA or torch includes.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "reconstruct_tile.h"

namespace tsv_fast {
namespace sgmv {

using tile::Acc;
using tile::BK;
using tile::BM;
using tile::BN;
using tile::Smem;
using tile::THREADS;
using tile::THREADS_X;
using tile::THREADS_Y;
using tile::TM;
using tile::TN;
using tile::accumulate;
using tile::ceil_div;
using tile::zero_acc;

// Problem description; dense tensors contiguous (row-major).
template <typename x_t, typename factor_t, typename acc_t>
struct Params {
  const x_t* x;             // (N, n) input rows, grouped by segment
  x_t* out;                 // (N, m) updated in place
  acc_t* t;                 // (N, kmax) workspace: x V of each row's segment
  const factor_t* U;        // (P, m, kmax) factor table, columns >= ranks[p] ignored
  const factor_t* S;        // (P, kmax)
  const factor_t* V;        // (P, n, kmax)
  const int64_t* offsets;   // (T + 1) row offsets
  const int64_t* slots;     // (T) factor slot of each segment, -1 = no delta
  const int64_t* ranks;     // (P) rank of each slot
  int64_t N, n, m, kmax, T, P;
  acc_t alpha;
};

// One segment as a block sees it: rows [begin, end), factor slot, rank.
// rank == 0 means there is nothing to add.
struct Segment {
  int64_t begin, end, slot, rank;
};

TSV_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Segment s, clamped so that index tensors which were not validated on the host
// (device-resident offsets/slots/ranks) can never make the kernel read or write
// out of bounds: bad values give empty segments, not memory errors.
template <typename x_t, typename factor_t, typename acc_t>
TSV_HD Segment segment(const Params<x_t, factor_t, acc_t>& p, int64_t s) {
  Segment g;
  g.begin = clamp64(p.offsets[s], 0, p.N);
  g.end = clamp64(p.offsets[s + 1], g.begin, p.N);
  g.slot = p.slots[s];
  g.rank = (g.slot >= 0 && g.slot < p.P) ? clamp64(p.ranks[g.slot], 0, p.kmax) : 0;
  if (g.rank == 0) g.end = g.begin;
  return g;
}

// Thread (tx, ty) owns tile rows ty + i*THREADS_Y and columns tx + j*THREADS_X
// (the layout of tile::accumulate).
TSV_HD int thread_row(int tid, int i) { return tid / THREADS_X + i * THREADS_Y; }
TSV_HD int thread_col(int tid, int j) { return tid % THREADS_X + j * THREADS_X; }

// ---- shrink: t[row0:row0+BM, col0:col0+BN] = x[rows] V_p[:, cols] -------------------------

// Phase 1: stage x[rows, k0:k0+BK] (k contiguous in memory: consecutive threads
// read consecutive k of one row) and V_p[k0:k0+BK, cols] (columns contiguous:
// consecutive threads read consecutive columns).  Out-of-range entries are 0.
template <typename x_t, typename factor_t, typename acc_t>
TSV_HD void shrink_load(const Params<x_t, factor_t, acc_t>& p, const Segment& g, int64_t row0,
                        int64_t col0, int tid, int64_t k0, Smem<acc_t>& s) {
  for (int e = tid; e < BM * BK; e += THREADS) {
    const int r = e / BK, kk = e % BK;
    const int64_t gr = row0 + r, gk = k0 + kk;
    s.A[kk][r] = (gr < g.end && gk < p.n) ? static_cast<acc_t>(p.x[gr * p.n + gk]) : acc_t(0);
  }
  const factor_t* V = p.V + g.slot * p.n * p.kmax;
  for (int e = tid; e < BN * BK; e += THREADS) {
    const int kk = e / BN, c = e % BN;
    const int64_t gc = col0 + c, gk = k0 + kk;
    s.B[kk][c] = (gc < g.rank && gk < p.n) ? static_cast<acc_t>(V[gk * p.kmax + gc]) : acc_t(0);
  }
}

// Phase 3: store the tile of t (only the segment's rows and its first rank columns).
template <typename x_t, typename factor_t, typename acc_t>
TSV_HD void shrink_write(const Params<x_t, factor_t, acc_t>& p, const Segment& g, int64_t row0,
                         int64_t col0, int tid, const Acc<acc_t>& acc) {
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + thread_row(tid, i);
    if (r >= g.end) continue;
    for (int j = 0; j < TN; ++j) {
      const int64_t c = col0 + thread_col(tid, j);
      if (c < g.rank) p.t[r * p.kmax + c] = acc.v[i][j];
    }
  }
}

// ---- expand: out[rows, cols] += alpha (t[rows, :k] * S_p) U_p[cols, :k]^T ------------------

// Phase 1: stage alpha * t[rows, k0:k0+BK] * S_p[k0:k0+BK] and U_p[cols, k0:k0+BK]
// (both k-contiguous), transposed so the k index is outermost.
template <typename x_t, typename factor_t, typename acc_t>
TSV_HD void expand_load(const Params<x_t, factor_t, acc_t>& p, const Segment& g, int64_t row0,
                        int64_t col0, int tid, int64_t k0, Smem<acc_t>& s) {
  const factor_t* S = p.S + g.slot * p.kmax;
  for (int e = tid; e < BM * BK; e += THREADS) {
    const int r = e / BK, kk = e % BK;
    const int64_t gr = row0 + r, gk = k0 + kk;
    acc_t val = acc_t(0);
    if (gr < g.end && gk < g.rank)
      val = p.t[gr * p.kmax + gk] * static_cast<acc_t>(S[gk]) * p.alpha;
    s.A[kk][r] = val;
  }
  const factor_t* U = p.U + g.slot * p.m * p.kmax;
  for (int e = tid; e < BN * BK; e += THREADS) {
    const int c = e / BK, kk = e % BK;
    const int64_t gc = col0 + c, gk = k0 + kk;
    s.B[kk][c] = (gc < p.m && gk < g.rank) ? static_cast<acc_t>(U[gc * p.kmax + gk]) : acc_t(0);
  }
}

// Phase 3 (epilogue): out += acc, read and rounded once to x_t.
template <typename x_t, typename factor_t, typename acc_t>
TSV_HD void expand_write(const Params<x_t, factor_t, acc_t>& p, const Segment& g, int64_t row0,
                         int64_t col0, int tid, const Acc<acc_t>& acc) {
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + thread_row(tid, i);
    if (r >= g.end) continue;
    for (int j = 0; j < TN; ++j) {
      const int64_t c = col0 + thread_col(tid, j);
      if (c >= p.m) continue;
      x_t& o = p.out[r * p.m + c];
      o = static_cast<x_t>(static_cast<acc_t>(o) + acc.v[i][j]);
    }
  }
}

// Grid extents of the two passes (x: column tiles; y: segments; z: row-tile
// stride).  max_rows: an upper bound on any segment's length.
inline int64_t shrink_col_tiles(int64_t kmax) { return ceil_div(kmax, BN); }
inline int64_t expand_col_tiles(int64_t m) { return ceil_div(m, BN); }
inline int64_t row_tile_blocks(int64_t max_rows, int64_t cap) {
  const int64_t z = ceil_div(max_rows, BM);
  return z < 1 ? 1 : (z > cap ? cap : z);
}

}  // namespace sgmv
}  // namespace tsv_fast
