// gelu.cu — HF's NewGELU on CUDA: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), elementwise.
//
// Written as x / (1 + e^(−2u)) — the same function, the CPU kernel's form (csrc/cpu/kernels/vec.h), without the
// cancellation of 1 + tanh(u) for negative x. Accurate expf (the build never uses --use_fast_math). The matmul
// epilogue calls the same gelu_new_f below (gelu.cuh).
#include "common.cuh"
#include "gelu.cuh"
#include "launch.h"

namespace gk::cuda {

__global__ void gelu_new_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  pdl_begin();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = gelu_new_f(x[i]);
}

cudaError_t gelu_new(const float* x, float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaGetLastError();
  const int threads = 256;
  const unsigned grid = (unsigned)std::min<int64_t>((n + threads - 1) / threads, 65536);
  launch(gelu_new_kernel, grid, threads, 0, stream, x, y, n);
  return cudaGetLastError();
}

}  // namespace gk::cuda
