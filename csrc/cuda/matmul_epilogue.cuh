// matmul_epilogue.cuh — the Conv1D epilogue fused before the store, shared by the fp32 matmul kernels (matmul.cu)
// and the reduced-precision ones (matmul_lowp.cu): y = acc + bias[n], then epi 0: y, 1: gelu_new(y), 2: y + R[m, n].
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "gelu.cuh"
#include "launch.h"

namespace gk::cuda {

__device__ __forceinline__ float epilogue(float acc, int epi, const float* bias, int64_t n, const float* R, int64_t ldr,
                                          int64_t m) {
  float y = bias ? acc + bias[n] : acc;
  if (epi == 1)
    y = gelu_new_f(y);
  else if (epi == 2)
    y = y + R[m * ldr + n];
  return y;
}

// Column n of c_attn's output row m, if it is a K or V column, into row m's cache at the slot (KvOut, launch.h).
__device__ __forceinline__ void kv_store(const KvOut& kv, int64_t m, int64_t n, float y) {
  if (kv.k == nullptr || n < kv.E || n >= 3 * kv.E) return;
  const int64_t s = *kv.slot;
  if (s < 0 || s >= kv.Tmax) return;
  const bool is_v = n >= 2 * kv.E;
  const int64_t e = n - (is_v ? 2 * kv.E : kv.E);
  (is_v ? kv.v : kv.k)[m * kv.sb + (e / kv.D) * kv.sh + s * kv.st + e % kv.D] = y;
}

// C[m, n] = y (C contiguous [M, N]), and for a KvOut (c_attn's GEMV at decode) y also goes to row m's K or V cache.
__device__ __forceinline__ void store_out(float* C, int64_t N, int64_t m, int64_t n, float y, const KvOut& kv) {
  C[m * N + n] = y;
  kv_store(kv, m, n, y);
}

}  // namespace gk::cuda
