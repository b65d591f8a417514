// Tiled kernel body for tsv_fast::reconstruct:  out = base + alpha * U diag(S) V^T.
//
// The kernel is written as three phase functions (load / accumulate / write).
// Every thread of a block runs a phase, then the block hits a barrier before
// the next phase.  The CUDA kernel (csrc/cuda/reconstruct.cu) puts
// __syncthreads() between the phases; the CPU emulator
// (csrc/cpu/reconstruct_emulated.cpp) runs each phase for all threads of a
// simulated block before moving on.  Both therefore execute exactly the same
// indexing and shared-memory code, so CI without a GPU still covers it.
//
// This header must compile with plain g++: no CUDA or torch includes.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace tsv_fast {
namespace tile {

// Output tile BM x BN per block, k staged BK at a time, THREADS_X x THREADS_Y
// threads, each owning a TM x TN register micro-tile.  Thread (tx, ty) owns
// rows ty + i*THREADS_Y and columns tx + j*THREADS_X of the tile: the strided
// layout keeps shared-memory reads broadcast/conflict-free and makes
// neighbouring threads write neighbouring output columns.
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 16;
constexpr int THREADS_X = 16;
constexpr int THREADS_Y = 16;
constexpr int THREADS = THREADS_X * THREADS_Y;  // 256
constexpr int TM = BM / THREADS_Y;              // 4
constexpr int TN = BN / THREADS_X;              // 4
static_assert(TM * THREADS_Y == BM && TN * THREADS_X == BN, "tile shape");
static_assert((BM * BK) % THREADS == 0 && (BN * BK) % THREADS == 0, "load split");

// Problem description; all tensors contiguous, batch-major.
template <typename base_t, typename factor_t, typename acc_t>
struct Params {
  const base_t* base;    // (B, m, n)
  const factor_t* U;     // (B, m, k)
  const factor_t* S;     // (B, k)
  const factor_t* V;     // (B, n, k)
  base_t* out;           // (B, m, n)
  int64_t m, n, k;
  acc_t alpha;
};

// Shared memory of one block.  A holds U^T scaled by alpha*S, B holds V^T.
// One column of padding: the loads store 16 consecutive k of one row, which
// without padding would all land in the same shared-memory bank.
constexpr int PAD = 1;
template <typename acc_t>
struct Smem {
  acc_t A[BK][BM + PAD];
  acc_t B[BK][BN + PAD];
};

// Per-thread registers.
template <typename acc_t>
struct Acc {
  acc_t v[TM][TN];
};

// Block coordinates: tile row, tile column, batch index.
struct BlockIdx {
  int64_t row_tile, col_tile, batch;
};

template <typename acc_t>
TSV_HD void zero_acc(Acc<acc_t>& acc) {
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc.v[i][j] = acc_t(0);
}

// Phase 1: stage U[:, k0:k0+BK] (times alpha*S) and V[:, k0:k0+BK] of this
// block's tile into shared memory, transposed so the k index is outermost.
// Consecutive threads read consecutive k of one row (contiguous in memory).
// Out-of-range rows / k are zero-filled so they contribute nothing.
template <typename base_t, typename factor_t, typename acc_t>
TSV_HD void load_tiles(const Params<base_t, factor_t, acc_t>& p, const BlockIdx& b,
                       int tid, int64_t k0, Smem<acc_t>& s) {
  const int64_t row0 = b.row_tile * BM;
  const int64_t col0 = b.col_tile * BN;
  const factor_t* U = p.U + b.batch * p.m * p.k;
  const factor_t* V = p.V + b.batch * p.n * p.k;
  const factor_t* S = p.S + b.batch * p.k;
  for (int e = tid; e < BM * BK; e += THREADS) {
    const int r = e / BK, kk = e % BK;
    const int64_t gr = row0 + r, gk = k0 + kk;
    acc_t val = acc_t(0);
    if (gr < p.m && gk < p.k)
      val = static_cast<acc_t>(U[gr * p.k + gk]) * static_cast<acc_t>(S[gk]) * p.alpha;
    s.A[kk][r] = val;
  }
  for (int e = tid; e < BN * BK; e += THREADS) {
    const int c = e / BK, kk = e % BK;
    const int64_t gc = col0 + c, gk = k0 + kk;
    acc_t val = acc_t(0);
    if (gc < p.n && gk < p.k) val = static_cast<acc_t>(V[gc * p.k + gk]);
    s.B[kk][c] = val;
  }
}

// Phase 2: accumulate the staged k-chunk into this thread's micro-tile.
template <typename acc_t>
TSV_HD void accumulate(const Smem<acc_t>& s, int tid, Acc<acc_t>& acc) {
  const int tx = tid % THREADS_X, ty = tid / THREADS_X;
  for (int kk = 0; kk < BK; ++kk) {
    acc_t a[TM], bv[TN];
    for (int i = 0; i < TM; ++i) a[i] = s.A[kk][ty + i * THREADS_Y];
    for (int j = 0; j < TN; ++j) bv[j] = s.B[kk][tx + j * THREADS_X];
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TN; ++j) acc.v[i][j] += a[i] * bv[j];
  }
}

// Phase 3 (epilogue): out = base + acc, rounded once to base_t.
template <typename base_t, typename factor_t, typename acc_t>
TSV_HD void write_out(const Params<base_t, factor_t, acc_t>& p, const BlockIdx& b,
                      int tid, const Acc<acc_t>& acc) {
  const int tx = tid % THREADS_X, ty = tid / THREADS_X;
  const int64_t off = b.batch * p.m * p.n;
  for (int i = 0; i < TM; ++i) {
    const int64_t r = b.row_tile * BM + ty + i * THREADS_Y;
    if (r >= p.m) continue;
    for (int j = 0; j < TN; ++j) {
      const int64_t c = b.col_tile * BN + tx + j * THREADS_X;
      if (c >= p.n) continue;
      const int64_t idx = off + r * p.n + c;
      p.out[idx] = static_cast<base_t>(static_cast<acc_t>(p.base[idx]) + acc.v[i][j]);
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace tile
}  // namespace tsv_fast
