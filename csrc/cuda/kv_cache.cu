// kv_cache.cu — the decode step's K/V cache write as one kernel per layer (CudaGraphDecoder kv_write=2).
//
// What: the new token's K and V, columns [E, 2E) and [2E, 3E) of the c_attn output qkv [B, 3E], go to slot `slot`
// of the layer's static caches k, v [B, H, Tmax, D]; the slot is read on the device (the decoder's cursor), so the
// same captured graph node serves every step.
// Why: the decode step is launch-latency bound; kv_write=1 writes the caches with two index_copy_ per layer (K,
// then V). One thread per (row, column) writes both, halving the cache writes' launches per token. A slot outside
// [0, Tmax) writes nothing (out-of-bounds stores would corrupt other memory; the decoder checks the length on the
// host before a step, so it never asks for one).
#include "common.cuh"
#include "kv_cache.h"

namespace gk::cuda {

__global__ void kv_write_kernel(const float* __restrict__ qkv, int64_t ldq, int64_t B, int64_t E, int64_t D,
                                const int64_t* __restrict__ slot, float* __restrict__ k, float* __restrict__ v,
                                int64_t sb, int64_t sh, int64_t st, int64_t Tmax) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * E) return;
  const int64_t s = *slot;
  if (s < 0 || s >= Tmax) return;
  const int64_t b = idx / E, e = idx % E, h = e / D, d = e % D;
  const int64_t dst = b * sb + h * sh + s * st + d;
  const float* row = qkv + b * ldq;
  k[dst] = row[E + e];
  v[dst] = row[2 * E + e];
}

cudaError_t kv_write(const float* qkv, int64_t ldq, int64_t B, int64_t H, int64_t D, const int64_t* slot, float* k,
                     float* v, int64_t sb, int64_t sh, int64_t st, int64_t Tmax, cudaStream_t stream) {
  const int64_t n = B * H * D;
  if (n == 0) return cudaGetLastError();
  if ((n + 255) / 256 > 0x7fffffff) return cudaErrorInvalidValue;
  kv_write_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(qkv, ldq, B, H * D, D, slot, k, v, sb, sh, st, Tmax);
  return cudaGetLastError();
}

}  // namespace gk::cuda
