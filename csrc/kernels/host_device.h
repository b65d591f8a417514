// TSV_HD marks kernel phase functions: __host__ __device__ under nvcc, so the CUDA
// kernel calls them between __syncthreads(); plain inline under g++, so the CPU
// emulators run the very same code thread by thread.
#pragma once

#ifdef __CUDACC__
#define TSV_HD __host__ __device__ __forceinline__
#else
#define TSV_HD inline
#endif
