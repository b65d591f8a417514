// Block body of tsv_fast::batched_cholesky_inverse: for one symmetric positive
// definite n x n matrix G per (CUDA) block, the upper Cholesky factor R
// (G = R^T R, from G's upper triangle only, as LAPACK's uplo = 'U') and then
// its inverse R^-1, in place, without leaving the block.  CholeskyQR needs
// exactly R^-1 (Q = Y R^-1); on a GPU the library pair for it (a batched
// Cholesky, then a batched triangular solve against I) is two launches of
// routines built for other sizes (session 13: ~0.35 ms for 80 matrices of
// order 102, most of a CholeskyQR pass).
//
// Algorithm (working dtype = input dtype; A is the workspace, row stride n):
//   Cholesky, right-looking, j = 0 .. n-1:
//     chol_scale   r = sqrt(a_jj); a_jc /= r for c > j
//     -- barrier --
//     chol_update  thread 0: a_jj = r, and the first j with a_jj <= 0 (or
//                  NaN) is recorded as info = j + 1 (LAPACK's convention);
//                  a_ab -= a_ja a_jb for j < a <= b (the trailing upper part)
//     -- barrier --
//   Inverse of R by back substitution on all columns of R X = I at once,
//   overwriting R row by row from the bottom, i = n-1 .. 0.  When row i is
//   reached, a_ic (c > i) holds the partial sums -sum_{l > i} r_il x_lc and
//   a_ii still holds r_ii; column i above the diagonal still holds R's r_ai:
//     inv_scale    x_ic = a_ic / r_ii for c > i; tmp[a] = r_ai for a < i;
//                  tmp[n] = 1 / r_ii
//     -- barrier --
//     inv_update   thread 0: a_ii = tmp[n]; for a < i:
//                  a_ai = -tmp[a] tmp[n], a_ac -= tmp[a] x_ic for c > i
//     -- barrier --
//   write_out      the upper triangle, zeros below; all NaN where info > 0
//                  (the factor is undefined past a failed pivot).
// Every phase reads only what the previous phases wrote and writes what no
// other thread of the same phase reads (checked in the comments per phase).
// Rows are dealt to groups of up to 32 threads (a warp on the GPU), columns to
// the threads of a group, so a group's threads touch consecutive addresses.
//
// The CUDA kernel (csrc/cuda/cholesky_inverse.cu) calls these phase functions
// with __syncthreads() between them; emulate_block() runs each phase for all
// simulated threads before the next, which is what the CPU op
// (csrc/cpu/cholesky_inverse.cpp) does with one thread, or with the kernel's
// thread count when asked to, so CI executes the kernel's indexing.
//
// This header must compile with plain g++: no CUDA or torch includes.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>

#include "host_device.h"

namespace tsv_fast {
namespace cholinv {

constexpr int kThreads = 256;   // the kernel's block size (the op's threads = 0)
constexpr int kMaxThreads = 1024;
// Block sizes the deal below supports: powers of two (a group never straddles two).
inline bool valid_threads(int64_t t) { return t >= 1 && t <= kMaxThreads && (t & (t - 1)) == 0; }

TSV_HD float hd_sqrt(float x) { return sqrtf(x); }
TSV_HD double hd_sqrt(double x) { return sqrt(x); }

// Shared memory of one block when A is kept there: A (n^2) and tmp (n + 1).
template <typename T>
TSV_HD size_t smem_bytes_for(int n, bool in_smem) {
  const size_t nn = in_smem ? static_cast<size_t>(n) * n : 0;
  return (nn + n + 1) * sizeof(T) + sizeof(int);
}

// Largest n whose A fits in smem_bytes (the kernel works from global memory beyond it).
template <typename T>
inline int max_shared_order(size_t smem_bytes) {
  int n = 0;
  while (n < 46340 && smem_bytes_for<T>(n + 1, true) <= smem_bytes) ++n;
  return n;
}

template <typename T>
struct Ws {
  T* A;      // n x n, row stride n (shared memory, or the output in global memory)
  T* tmp;    // n + 1: column i of R above the diagonal, then 1 / r_ii
  int* info; // 0, or the first failed pivot (1-based)
  int n;
};

// Thread t's place in the row/column deal: groups of g = min(32, nth) threads.
struct Deal {
  int lane, width, group, groups;
};
TSV_HD Deal deal(int t, int nth) {
  const int w = nth < 32 ? nth : 32;
  return Deal{t % w, w, t / w, nth / w};
}

template <typename T>
TSV_HD void load_input(const Ws<T>& w, const T* in, int t, int nth) {
  const int64_t nn = static_cast<int64_t>(w.n) * w.n;
  for (int64_t e = t; e < nn; e += nth) w.A[e] = in[e];
  if (t == 0) *w.info = 0;
}

// Reads a_jj and row j right of it; writes row j right of the diagonal.
template <typename T>
TSV_HD void chol_scale(const Ws<T>& w, int j, int t, int nth) {
  const int n = w.n;
  const T r = hd_sqrt(w.A[j * n + j]);
  for (int c = j + 1 + t; c < n; c += nth) w.A[j * n + c] /= r;
}

// Reads row j right of the diagonal; writes a_jj (thread 0) and the trailing
// upper part (rows > j): disjoint from what it reads.
template <typename T>
TSV_HD void chol_update(const Ws<T>& w, int j, int t, int nth) {
  const int n = w.n;
  if (t == 0) {
    const T d = w.A[j * n + j];
    if (!(d > T(0)) && *w.info == 0) *w.info = j + 1;
    w.A[j * n + j] = hd_sqrt(d);
  }
  const Deal s = deal(t, nth);
  const T* row_j = w.A + static_cast<int64_t>(j) * n;
  for (int a = j + 1 + s.group; a < n; a += s.groups) {
    const T ra = row_j[a];
    T* row_a = w.A + static_cast<int64_t>(a) * n;
    for (int b = a + s.lane; b < n; b += s.width) row_a[b] -= ra * row_j[b];
  }
}

// Reads a_ii, row i right of it and column i above it; writes row i right of
// the diagonal (its own reads only) and tmp.
template <typename T>
TSV_HD void inv_scale(const Ws<T>& w, int i, int t, int nth) {
  const int n = w.n;
  const T d = w.A[i * n + i];
  for (int c = i + 1 + t; c < n; c += nth) w.A[i * n + c] /= d;
  for (int a = t; a < i; a += nth) w.tmp[a] = w.A[a * n + i];
  if (t == 0) w.tmp[n] = T(1) / d;
}

// Reads tmp and row i right of the diagonal; writes a_ii (thread 0) and rows
// above i from column i on: disjoint from what it reads.
template <typename T>
TSV_HD void inv_update(const Ws<T>& w, int i, int t, int nth) {
  const int n = w.n;
  const T inv = w.tmp[n];
  if (t == 0) w.A[i * n + i] = inv;
  const Deal s = deal(t, nth);
  const T* row_i = w.A + static_cast<int64_t>(i) * n;
  for (int a = s.group; a < i; a += s.groups) {
    const T m = w.tmp[a];
    T* row_a = w.A + static_cast<int64_t>(a) * n;
    for (int c = i + s.lane; c < n; c += s.width) row_a[c] = c == i ? -m * inv : row_a[c] - m * row_i[c];
  }
}

// R^-1's upper triangle, zeros below; every entry NaN where a pivot failed.
template <typename T>
TSV_HD void write_out(const Ws<T>& w, T* out, int t, int nth) {
  const int n = w.n;
  const bool failed = *w.info != 0;
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t e = t; e < nn; e += nth) {
    const int r = static_cast<int>(e / n), c = static_cast<int>(e % n);
    out[e] = failed ? static_cast<T>(NAN) : c >= r ? w.A[e] : T(0);  // in place on the global path
  }
}

// One block, phase by phase for all nth simulated threads (CPU op and emulation).
template <typename T>
inline void emulate_block(const Ws<T>& w, const T* in, T* out, int32_t* info, int nth) {
  for (int t = 0; t < nth; ++t) load_input(w, in, t, nth);
  for (int j = 0; j < w.n; ++j) {
    for (int t = 0; t < nth; ++t) chol_scale(w, j, t, nth);
    for (int t = 0; t < nth; ++t) chol_update(w, j, t, nth);
  }
  for (int i = w.n - 1; i >= 0; --i) {
    for (int t = 0; t < nth; ++t) inv_scale(w, i, t, nth);
    for (int t = 0; t < nth; ++t) inv_update(w, i, t, nth);
  }
  for (int t = 0; t < nth; ++t) write_out(w, out, t, nth);
  *info = *w.info;
}

}  // namespace cholinv
}  // namespace tsv_fast
