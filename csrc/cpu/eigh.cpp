// CPU implementation of tsv_fast::batched_eigh: the parallel-ordered Jacobi of
// kernels/jacobi_eigh.h run by one "thread" per matrix, always in float64
// (float32 inputs are widened on load and rounded once on output), with the
// batch split over at::parallel_for.  Each matrix lives in one contiguous
// working buffer (A, V^T and the per-round rotation arrays).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../eigh.h"
#include "../kernels/jacobi_eigh.h"

namespace tsv_fast {

std::tuple<at::Tensor, at::Tensor> batched_eigh_cpu(const at::Tensor& A, int64_t max_sweeps,
                                                    double tol, int64_t threads) {
  // threads (validated) is the CUDA block size: one thread per matrix here.
  const EighArgs a = check_eigh_args("batched_eigh", A, max_sweeps, tol, threads);
  auto [vals, vecs] = eigh_outputs(a);
  if (a.n == 0 || a.batch == 0) return {vals, vecs};
  const int n = static_cast<int>(a.n);
  const int sweeps = static_cast<int>(std::min<int64_t>(max_sweeps, 1 << 20));
  const double tol2 = eigh_tol2(tol, /*work_is_double=*/true);
  const size_t ws_bytes = jacobi::layout_for<double>(n).bytes;
  AT_DISPATCH_FLOATING_TYPES(a.A.scalar_type(), "batched_eigh_cpu", [&] {
    const scalar_t* in = a.A.data_ptr<scalar_t>();
    scalar_t* w_out = vals.data_ptr<scalar_t>();
    scalar_t* v_out = vecs.data_ptr<scalar_t>();
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> buf(ws_bytes / sizeof(double));  // one contiguous working buffer
      double red[3];
      std::vector<int> rot;
      const auto ws = jacobi::make_ws<double>(reinterpret_cast<unsigned char*>(buf.data()), red, n);
      for (int64_t b = begin; b < end; ++b)
        jacobi::emulate_block(ws, in + b * a.n * a.n, w_out + b * a.n, v_out + b * a.n * a.n,
                              /*nthreads=*/1, sweeps, tol2, rot);
    });
  });
  return {vals, vecs};
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CPU, m) {
  m.impl("batched_eigh", &tsv_fast::batched_eigh_cpu);
}
