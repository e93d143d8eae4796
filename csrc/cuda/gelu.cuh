// gelu.cuh — NewGELU for one float, shared by gelu.cu and the matmul epilogue (matmul.cu).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

namespace gk::cuda {

__device__ __forceinline__ float gelu_new_f(float x) {
  const float k0 = -2.f * 0.7978845608028654f, k1 = 0.044715f;
  const float u2 = k0 * (x + k1 * x * x * x);  // −2u
  return x / (1.f + expf(u2));
}

}  // namespace gk::cuda
