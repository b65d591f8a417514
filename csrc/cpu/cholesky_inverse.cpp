// CPU implementation of tsv_fast::batched_cholesky_inverse: the phase functions
// of kernels/cholesky_inverse.h run for `threads` simulated threads per matrix
// (0: one, the plain sequential algorithm; a power of two: the CUDA kernel's
// deal of rows and columns, for testing its indexing without a GPU), in the
// input dtype, with the batch split over at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../cholesky_inverse.h"
#include "../kernels/cholesky_inverse.h"

namespace tsv_fast {

std::tuple<at::Tensor, at::Tensor> batched_cholesky_inverse_cpu(const at::Tensor& G, int64_t threads) {
  const CholInvArgs a = check_cholinv_args("batched_cholesky_inverse", G, threads);
  auto [out, info] = cholinv_outputs(a);
  if (a.n == 0 || a.batch == 0) {
    info.zero_();
    return {out, info};
  }
  const int n = static_cast<int>(a.n);
  const int nth = threads ? static_cast<int>(threads) : 1;
  AT_DISPATCH_FLOATING_TYPES(a.G.scalar_type(), "batched_cholesky_inverse_cpu", [&] {
    using T = scalar_t;
    const T* in = a.G.data_ptr<T>();
    T* o = out.data_ptr<T>();
    int32_t* inf = info.data_ptr<int32_t>();
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> A(static_cast<size_t>(n) * n), tmp(static_cast<size_t>(n) + 1);
      int flag = 0;
      const cholinv::Ws<T> ws{A.data(), tmp.data(), &flag, n};
      for (int64_t b = begin; b < end; ++b)
        cholinv::emulate_block(ws, in + b * a.n * a.n, o + b * a.n * a.n, inf + b, nth);
    });
  });
  return {out, info};
}

}  // namespace tsv_fast

TORCH_LIBRARY_IMPL(tsv_fast, CPU, m) {
  m.impl("batched_cholesky_inverse", &tsv_fast::batched_cholesky_inverse_cpu);
}
