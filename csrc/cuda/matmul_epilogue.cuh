// matmul_epilogue.cuh — the Conv1D epilogue fused before the store, shared by the fp32 matmul kernels (matmul.cu)
// and the reduced-precision ones (matmul_lowp.cu): y = acc + bias[n], then epi 0: y, 1: gelu_new(y), 2: y + R[m, n].
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "gelu.cuh"

namespace gk::cuda {

__device__ __forceinline__ float epilogue(float acc, int epi, const float* bias, int64_t n, const float* R,
                                          int64_t ldr, int64_t m) {
  float y = bias ? acc + bias[n] : acc;
  if (epi == 1) y = gelu_new_f(y);
  else if (epi == 2) y = y + R[m * ldr + n];
  return y;
}

}  // namespace gk::cuda
