// Block body of tsv_fast::batched_eigh: parallel-ordered two-sided Jacobi for
// one symmetric n x n matrix per (CUDA) block.
//
// Algorithm.  A sweep is n'-1 rounds (n' = n rounded up to even; an odd n gets
// a phantom index n whose rotations are the identity).  Round r pairs the
// indices by the round-robin "circle" tournament, so the n'/2 pairs (p, q) of
// a round are disjoint and every pair occurs once per sweep.  Per round:
//
//   compute_rotations  thread k: Rutishauser's stable rotation for pair k
//                        theta = (a_qq - a_pp) / (2 a_pq)
//                        t = sign(theta) / (|theta| + sqrt(theta^2 + 1)),
//                        c = 1/sqrt(t^2+1), s = t c
//                      (skipped when |a_pq| <= eps sqrt(|a_pp| |a_qq|)).
//   -- barrier --
//   apply_rotations    A <- J^T A J and V <- V J for the product J of all the
//                      round's rotations.  Because the pairs are disjoint, the
//                      2x2 block of A at rows {pa,qa}, columns {pb,qb} only
//                      depends on the same block of the old A, so each work
//                      item owns one block (lower triangle of blocks, written
//                      to both halves: A stays exactly symmetric) and the row
//                      and column rotations happen in one phase.  Diagonal
//                      blocks are set with Rutishauser's formulas
//                      a_pp -= t a_pq, a_qq += t a_pq, a_pq = 0.  Off-diagonal
//                      entries are only ever mixed with off-diagonal entries,
//                      so they converge to (relative) zero, not to round-off
//                      of the diagonal.  The eigenvectors are kept transposed
//                      (W = V^T): a rotation updates two contiguous rows.
//   -- barrier --
//
// After loading, max_partial + max_step (a tree reduction) find max |a_ij|,
// and scale_input multiplies A by an exact power of four 4^-e so that it lies
// in [1/4, 1): the squared norms below can then neither overflow (entries near
// 1e154) nor underflow (entries below 1e-154, which would look converged before
// any sweep); write_out scales the eigenvalues back.  A power of four keeps
// every rounding, square roots included, what it was unscaled.
//
// Before every sweep, norms_partial + reduce_step (a shared-memory tree
// reduction in double) give off(A)^2, diag(A)^2 and the number of rotations of
// the previous sweep; converged() stops when off(A) <= tol ||A||_F (tol = 0:
// machine epsilon of the working type) or when a whole sweep rotated nothing;
// a NaN or infinite norm (NaN or Inf in the input) stops at once, and
// poison_output makes every output NaN rather than leave part of it finite.
// A block may have up to 1024 threads: the rotations and the reduction use the
// first reduce_threads() (at most 256) of them, so the reduction buffer, and
// with it the largest order kept in shared memory, does not grow with the
// block; the phases that touch all of A and V (load, apply, sort, write) use
// every thread.
// Finally rank_eigenvalues sorts ascending (stable rank sort, NaN last) and
// write_out writes eigenvalues and eigenvector columns in that order.
//
// The CUDA kernel (csrc/cuda/eigh.cu) calls these phase functions with
// __syncthreads() between them; emulate_block() below runs each phase for all
// simulated threads before the next one, which is what the CPU op
// (csrc/cpu/eigh.cpp, one "thread", double precision) and the CPU emulation of
// the kernel (csrc/cpu/eigh_emulated.cpp, the kernel's thread count and dtype)
// use, so CI without a GPU executes the kernel's indexing and memory layout.
//
// This header must compile with plain g++: no CUDA or torch includes.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "host_device.h"

namespace tsv_fast {
namespace jacobi {

// ---------------------------------------------------------------------------
// Small helpers usable on host and device.
template <typename T> struct Eps;
template <> struct Eps<float> { static constexpr float value = 1.1920928955078125e-07f; };
template <> struct Eps<double> { static constexpr double value = 2.220446049250313e-16; };

TSV_HD float hd_sqrt(float x) { return sqrtf(x); }
TSV_HD double hd_sqrt(double x) { return sqrt(x); }
TSV_HD float hd_abs(float x) { return fabsf(x); }
TSV_HD double hd_abs(double x) { return fabs(x); }
TSV_HD float hd_ldexp(float x, int e) { return ldexpf(x, e); }
TSV_HD double hd_ldexp(double x, int e) { return ldexp(x, e); }

// Threads per block used by the CUDA kernel (and the emulator) for order n,
// unless the caller asks for another count: a power of two from kMinThreads to
// kMaxThreads (tree reduction; __launch_bounds__ of the kernel's three builds: 256, 512, 1024).
// Above n = 80, 512: the rotations and norms stay on 256 threads (bit for bit the
// same result), the others share the row and column updates; on an H200 that was
// 1.31-1.39x faster than 256 at n = 102 and 118 (batch of 90, float32 and float64).
constexpr int kMinThreads = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxReduceThreads = 256;
inline int threads_for(int64_t n) { return n <= 16 ? 64 : n <= 48 ? 128 : n <= 80 ? 256 : 512; }
inline bool valid_threads(int64_t t) { return t >= kMinThreads && t <= kMaxThreads && (t & (t - 1)) == 0; }

// Threads that compute rotations and reduce norms: the first min(nthreads, 256).
TSV_HD int reduce_threads(int nthreads) { return nthreads < kMaxReduceThreads ? nthreads : kMaxReduceThreads; }

// ---------------------------------------------------------------------------
// Workspace of one matrix.  Byte offsets from the workspace base; T arrays
// first, then int arrays, so every array is aligned for its type.  The
// reduction buffer (3 * threads doubles) is separate: always in shared memory.
struct Layout {
  size_t A, W, c, s, t, P, Q, perm, bytes;
};

template <typename T>
TSV_HD Layout layout_for(int n) {
  const size_t nn = static_cast<size_t>(n) * n;
  const size_t m = static_cast<size_t>(n + (n & 1)) / 2;  // pairs per round
  Layout L;
  L.A = 0;
  L.W = L.A + nn * sizeof(T);
  L.c = L.W + nn * sizeof(T);
  L.s = L.c + m * sizeof(T);
  L.t = L.s + m * sizeof(T);
  L.P = L.t + m * sizeof(T);
  L.Q = L.P + m * sizeof(int);
  L.perm = L.Q + m * sizeof(int);
  L.bytes = (L.perm + static_cast<size_t>(n) * sizeof(int) + 15) / 16 * 16;
  return L;
}

TSV_HD size_t red_bytes(int nthreads) { return 3 * static_cast<size_t>(reduce_threads(nthreads)) * sizeof(double); }

// Dynamic shared memory of one block: the reduction buffer, plus the whole
// workspace when the matrix is kept in shared memory (else it is in global
// memory).  Shared path: 2 n^2 sizeof(T) + (1.5 sizeof(T) + 8) n + 24
// reduce_threads bytes, e.g. n = 64: 39 KB (float32) / 71 KB (float64); n = 110: 102 KB /
// 197 KB.  With the opt-in limits (sm_80: 163 KB, sm_90: 227 KB per block) the
// largest shared-memory n is 140 / 167 (float32) and 99 / 118 (float64); the
// CUDA op queries the device's limit (eigh.cu), larger n use global memory.
template <typename T>
TSV_HD size_t smem_bytes_for(int n, int nthreads, bool in_smem) {
  return red_bytes(nthreads) + (in_smem ? layout_for<T>(n).bytes : 0);
}

// Largest order n whose whole workspace fits in smem_bytes of shared memory
// (0 when not even n = 1 fits): beyond it the CUDA kernel works from global
// memory, several times slower.  Solvers size their Rayleigh-Ritz blocks by it.
template <typename T>
inline int max_shared_order(size_t smem_bytes) {
  int n = 0;
  while (n < 4096 && smem_bytes_for<T>(n + 1, threads_for(n + 1), true) <= smem_bytes) ++n;
  return n;
}

template <typename T>
struct Ws {
  T* A;       // n x n, row stride n: the matrix being diagonalised (kept symmetric)
  T* W;       // n x n: W = V^T, row i is the i-th (unsorted) eigenvector
  T* c;       // per pair of the current round: cos, sin, tan of the rotation
  T* s;
  T* t;
  int* P;     // per pair of the current round: p < q (q == n: phantom pair)
  int* Q;
  int* perm;  // perm[k] = index of the k-th smallest eigenvalue
  double* red;  // 3 * reduce_threads: off^2, diag^2, rotation-count partial sums
  int n, np, npairs;
};

template <typename T>
TSV_HD Ws<T> make_ws(unsigned char* base, double* red, int n) {
  const Layout L = layout_for<T>(n);
  Ws<T> w;
  w.A = reinterpret_cast<T*>(base + L.A);
  w.W = reinterpret_cast<T*>(base + L.W);
  w.c = reinterpret_cast<T*>(base + L.c);
  w.s = reinterpret_cast<T*>(base + L.s);
  w.t = reinterpret_cast<T*>(base + L.t);
  w.P = reinterpret_cast<int*>(base + L.P);
  w.Q = reinterpret_cast<int*>(base + L.Q);
  w.perm = reinterpret_cast<int*>(base + L.perm);
  w.red = red;
  w.n = n;
  w.np = n + (n & 1);
  w.npairs = w.np / 2;
  return w;
}

// Pair k (0 <= k < np/2) of round r (0 <= r < np-1) of the circle tournament
// on np players: player np-1 sits still, the others rotate.
TSV_HD void pair_of(int np, int r, int k, int& p, int& q) {
  const int m = np - 1;
  int x, y;
  if (k == 0) {
    x = m;
    y = r;
  } else {
    x = (r + k) % m;
    y = (r - k + m) % m;
  }
  p = x < y ? x : y;
  q = x < y ? y : x;
}

// Row-major walk over an (rows x cols) index space in steps of `stride`
// without a division per step.
struct Walk2 {
  int i, j, di, dj, cols;
  TSV_HD Walk2(int start, int stride, int cols_)
      : i(start / cols_), j(start % cols_), di(stride / cols_), dj(stride % cols_), cols(cols_) {}
  TSV_HD void next() {
    i += di;
    j += dj;
    if (j >= cols) {
      j -= cols;
      ++i;
    }
  }
};

// ---------------------------------------------------------------------------
// Phase functions.  `tid` in [0, nthreads); every phase is followed by a
// block-wide barrier.

// Load: A = (A_in + A_in^T) / 2 (the input is symmetrised, both triangles are
// read), W = I.  `in` points at this matrix (n x n, contiguous).
template <typename T, typename in_t>
TSV_HD void load_input(const Ws<T>& w, const in_t* in, int tid, int nthreads) {
  const int n = w.n;
  const int nn = n * n;
  if (tid >= nn) return;
  for (Walk2 ij(tid, nthreads, n); ij.i < n; ij.next()) {
    const int i = ij.i, j = ij.j;
    const T a = static_cast<T>(in[i * n + j]), b = static_cast<T>(in[j * n + i]);
    w.A[i * n + j] = (i == j) ? a : T(0.5) * a + T(0.5) * b;
    w.W[i * n + j] = (i == j) ? T(1) : T(0);
  }
}

// Scaling, part 1: this thread's largest |a_ij| (NaN wins) in red[tid]
// (threads from reduce_threads on have none).
template <typename T>
TSV_HD void max_partial(const Ws<T>& w, int tid, int nthreads) {
  const int n = w.n, R = reduce_threads(nthreads);
  if (tid >= R) return;
  double m = 0;
  if (tid < n * n) {
    for (Walk2 ij(tid, R, n); ij.i < n; ij.next()) {
      const double v = hd_abs(static_cast<double>(w.A[ij.i * n + ij.j]));
      if (v > m || v != v) m = v;  // once NaN, stays NaN
    }
  }
  w.red[tid] = m;
}

// Scaling, part 2: one step of the max tree reduction over red[0, R) (stride =
// R/2, ..., 1, a barrier after each).
TSV_HD void max_step(double* red, int tid, int nthreads, int stride) {
  if (tid < stride) {
    const double b = red[tid + stride];
    if (b > red[tid] || b != b) red[tid] = b;
  }
}

// Scaling, part 3 (every thread, same answer): the even exponent e with
// max |a_ij| = f 2^e, f in [1/4, 1); 0 for a zero, NaN or infinite maximum.
TSV_HD int scale_exponent(const double* red) {
  const double m = red[0];
  if (!(m > 0) || m - m != 0) return 0;
  int e = 0;
  frexp(m, &e);
  return e + (e & 1);
}

// Scaling, part 4: A <- A 2^-e (exact unless an entry falls 2^1000 below the
// largest, where it no longer matters).
template <typename T>
TSV_HD void scale_input(const Ws<T>& w, int e, int tid, int nthreads) {
  if (e == 0) return;
  const int nn = w.n * w.n;
  for (int i = tid; i < nn; i += nthreads) w.A[i] = hd_ldexp(w.A[i], -e);
}

// Convergence check, part 1: this thread's share of off(A)^2 and diag(A)^2
// (in double, also for float matrices) and its rotation count of the last sweep
// (threads from reduce_threads on have none: they compute no rotations).
template <typename T>
TSV_HD void norms_partial(const Ws<T>& w, int tid, int nthreads, int rotations) {
  const int n = w.n, R = reduce_threads(nthreads);
  if (tid >= R) return;
  double off = 0, diag = 0;
  if (tid < n * n) {
    for (Walk2 ij(tid, R, n); ij.i < n; ij.next()) {
      const double v = static_cast<double>(w.A[ij.i * n + ij.j]);
      if (ij.i == ij.j)
        diag += v * v;
      else
        off += v * v;
    }
  }
  w.red[tid] = off;
  w.red[R + tid] = diag;
  w.red[2 * R + tid] = static_cast<double>(rotations);
}

// Convergence check, part 2: one step of the shared-memory tree reduction;
// called for stride = R/2, R/4, ..., 1 (R = reduce_threads(nthreads)) with a
// barrier after each.
TSV_HD void reduce_step(double* red, int tid, int nthreads, int stride) {
  const int R = reduce_threads(nthreads);
  if (tid < stride) {
    for (int k = 0; k < 3; ++k) red[k * R + tid] += red[k * R + tid + stride];
  }
}

// Convergence check, part 3 (every thread, same answer): off(A) <= tol ||A||_F,
// or no rotation at all in the previous sweep.  tol2 = tol^2.
TSV_HD bool converged(const double* red, int nthreads, double tol2, int sweeps_done) {
  const int R = reduce_threads(nthreads);
  const double off = red[0], diag = red[R], rot = red[2 * R];
  if (off <= tol2 * (off + diag)) return true;
  return sweeps_done > 0 && rot == 0;
}

// Whether the reduced norms are NaN or infinite: the input held NaN or Inf (the
// scaled matrix's own norms cannot overflow), so sweeping is pointless.
TSV_HD bool nonfinite(const double* red, int nthreads) {
  const int R = reduce_threads(nthreads);
  return !(red[0] - red[0] == 0) || !(red[R] - red[R] == 0);
}

// For a non-finite input: A's diagonal and W all NaN, so every output is NaN.
template <typename T>
TSV_HD void poison_output(const Ws<T>& w, int tid, int nthreads) {
  const int n = w.n, nn = n * n;
  const T nan = T(0) / T(0);
  for (int i = tid; i < nn; i += nthreads) w.W[i] = nan;
  for (int i = tid; i < n; i += nthreads) w.A[i * n + i] = nan;
}

// Round phase 1: thread k computes the rotation of pair k of round `round`
// (k < reduce_threads; thread k also takes pairs k + R, k + 2R, ...).
template <typename T>
TSV_HD void compute_rotations(const Ws<T>& w, int round, int tid, int nthreads, int& rotations) {
  const int n = w.n, R = reduce_threads(nthreads);
  if (tid >= R) return;  // (n > 512) they would recompute pairs of thread tid mod R
  for (int k = tid; k < w.npairs; k += R) {
    int p, q;
    pair_of(w.np, round, k, p, q);
    w.P[k] = p;
    w.Q[k] = q;
    T c = T(1), s = T(0), t = T(0);
    if (q < n) {
      const T apq = w.A[p * n + q];
      const T app = w.A[p * n + p], aqq = w.A[q * n + q];
      const T thresh = Eps<T>::value * hd_sqrt(hd_abs(app)) * hd_sqrt(hd_abs(aqq));
      if (apq != T(0) && !(hd_abs(apq) <= thresh)) {
        const T theta = (aqq - app) / (T(2) * apq);
        const T at = hd_abs(theta);
        // For |theta| > 1/sqrt(eps), sqrt(theta^2+1) == |theta| in floating
        // point: use t = 1/(2 theta), which also avoids overflowing theta^2.
        if (at > T(1) / hd_sqrt(Eps<T>::value))
          t = T(0.5) / theta;
        else
          t = (theta >= T(0) ? T(1) : T(-1)) / (at + hd_sqrt(at * at + T(1)));
        c = T(1) / hd_sqrt(t * t + T(1));
        s = t * c;
        if (s != T(0))
          ++rotations;
        else
          c = T(1), t = T(0);
      }
    }
    w.c[k] = c;
    w.s[k] = s;
    w.t[k] = t;
  }
}

// Triangular index e -> (a, b), b <= a, e = a(a+1)/2 + b.
TSV_HD void tri_index(int e, int& a, int& b) {
  a = static_cast<int>((sqrtf(8.0f * static_cast<float>(e) + 1.0f) - 1.0f) * 0.5f);
  while (a > 0 && a * (a + 1) / 2 > e) --a;
  while ((a + 1) * (a + 2) / 2 <= e) ++a;
  b = e - a * (a + 1) / 2;
}

// Round phase 2: A <- J^T A J (one 2x2 block per work item) and W <- J^T W
// (i.e. V <- V J; one (pair, column) per work item).
template <typename T>
TSV_HD void apply_rotations(const Ws<T>& w, int tid, int nthreads) {
  const int n = w.n, m = w.npairs;
  T* A = w.A;
  const int nblk = m * (m + 1) / 2;
  if (tid < nblk) {
    int a, b;
    tri_index(tid, a, b);
    while (a < m) {
      const T sa = w.s[a], sb = w.s[b];
      const int pa = w.P[a], qa = w.Q[a];
      if (a == b) {
        if (sa != T(0)) {  // diagonal block: Rutishauser's update
          const T apq = A[pa * n + qa], ta = w.t[a];
          A[pa * n + pa] -= ta * apq;
          A[qa * n + qa] += ta * apq;
          A[pa * n + qa] = T(0);
          A[qa * n + pa] = T(0);
        }
      } else if (sa != T(0) || sb != T(0)) {
        const int pb = w.P[b], qb = w.Q[b];
        const bool ha = qa < n, hb = qb < n;  // false: phantom index (odd n)
        const T ca = w.c[a], cb = w.c[b];
        const T x = A[pa * n + pb];
        const T y = hb ? A[pa * n + qb] : T(0);
        const T z = ha ? A[qa * n + pb] : T(0);
        const T v = (ha && hb) ? A[qa * n + qb] : T(0);
        // rows p_a, q_a (left factor J_a^T)
        const T x1 = ca * x - sa * z, y1 = ca * y - sa * v;
        const T z1 = sa * x + ca * z, v1 = sa * y + ca * v;
        // columns p_b, q_b (right factor J_b)
        const T x2 = cb * x1 - sb * y1, y2 = sb * x1 + cb * y1;
        const T z2 = cb * z1 - sb * v1, v2 = sb * z1 + cb * v1;
        A[pa * n + pb] = x2;
        A[pb * n + pa] = x2;
        if (hb) {
          A[pa * n + qb] = y2;
          A[qb * n + pa] = y2;
        }
        if (ha) {
          A[qa * n + pb] = z2;
          A[pb * n + qa] = z2;
        }
        if (ha && hb) {
          A[qa * n + qb] = v2;
          A[qb * n + qa] = v2;
        }
      }
      b += nthreads;  // next triangular index
      while (b > a) {
        ++a;
        b -= a;
      }
    }
  }
  if (tid < m * n) {
    for (Walk2 kr(tid, nthreads, n); kr.i < m; kr.next()) {
      const int k = kr.i, r = kr.j;
      const T s = w.s[k];
      if (s == T(0)) continue;
      const T c = w.c[k];
      const int p = w.P[k], q = w.Q[k];
      const T wp = w.W[p * n + r], wq = w.W[q * n + r];
      w.W[p * n + r] = c * wp - s * wq;
      w.W[q * n + r] = s * wp + c * wq;
    }
  }
}

// Sort, phase 1: perm[rank(i)] = i, ascending, ties by index, NaN last.
template <typename T>
TSV_HD bool sorts_before(T x, int i, T y, int j) {
  const bool xn = x != x, yn = y != y;
  if (xn || yn) return (xn == yn) ? i < j : yn;
  return x < y || (x == y && i < j);
}

template <typename T>
TSV_HD void rank_eigenvalues(const Ws<T>& w, int tid, int nthreads) {
  const int n = w.n;
  for (int i = tid; i < n; i += nthreads) {
    const T di = w.A[i * n + i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += sorts_before(w.A[j * n + j], j, di, i) ? 1 : 0;
    w.perm[rank] = i;
  }
}

// Sort, phase 2: eigenvalues[k] = A[perm[k]][perm[k]], V[:, k] = W[perm[k], :].
// `vals` (n) and `vecs` (n x n, row-major) point at this matrix's outputs.
// `e`: the scaling exponent (scale_exponent), undone on the eigenvalues.
template <typename T, typename out_t>
TSV_HD void write_out(const Ws<T>& w, out_t* vals, out_t* vecs, int e, int tid, int nthreads) {
  const int n = w.n;
  for (int k = tid; k < n; k += nthreads) {
    const int i = w.perm[k];
    vals[k] = static_cast<out_t>(hd_ldexp(w.A[i * n + i], e));
  }
  if (tid < n * n) {
    for (Walk2 rk(tid, nthreads, n); rk.i < n; rk.next())
      vecs[rk.i * n + rk.j] = static_cast<out_t>(w.W[w.perm[rk.j] * n + rk.i]);
  }
}

// ---------------------------------------------------------------------------
// Host driver: the CUDA kernel's control flow with every phase run for all
// `nthreads` simulated threads before the next (= __syncthreads()).  `rot`
// holds the per-thread rotation counters (the kernel's registers).
template <typename T, typename io_t>
inline void emulate_block(const Ws<T>& w, const io_t* in, io_t* vals, io_t* vecs, int nthreads,
                          int max_sweeps, double tol2, std::vector<int>& rot) {
  rot.assign(nthreads, 0);
  for (int t = 0; t < nthreads; ++t) load_input(w, in, t, nthreads);
  for (int t = 0; t < nthreads; ++t) max_partial(w, t, nthreads);
  for (int stride = reduce_threads(nthreads) / 2; stride > 0; stride /= 2)
    for (int t = 0; t < nthreads; ++t) max_step(w.red, t, nthreads, stride);
  const int e = scale_exponent(w.red);  // every thread's answer: thread 0 speaks for all
  for (int t = 0; t < nthreads; ++t) scale_input(w, e, t, nthreads);
  for (int sweep = 0;; ++sweep) {
    for (int t = 0; t < nthreads; ++t) norms_partial(w, t, nthreads, rot[t]);
    for (int stride = reduce_threads(nthreads) / 2; stride > 0; stride /= 2)
      for (int t = 0; t < nthreads; ++t) reduce_step(w.red, t, nthreads, stride);
    if (nonfinite(w.red, nthreads)) {
      for (int t = 0; t < nthreads; ++t) poison_output(w, t, nthreads);
      break;
    }
    if (converged(w.red, nthreads, tol2, sweep) || sweep >= max_sweeps) break;
    for (int t = 0; t < nthreads; ++t) rot[t] = 0;
    for (int round = 0; round < w.np - 1; ++round) {
      for (int t = 0; t < nthreads; ++t) compute_rotations(w, round, t, nthreads, rot[t]);
      for (int t = 0; t < nthreads; ++t) apply_rotations(w, t, nthreads);
    }
  }
  for (int t = 0; t < nthreads; ++t) rank_eigenvalues(w, t, nthreads);
  for (int t = 0; t < nthreads; ++t) write_out(w, vals, vecs, e, t, nthreads);
}

}  // namespace jacobi
}  // namespace tsv_fast
