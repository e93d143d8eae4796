// kv_cache.cu — the decode step's K/V cache write as one kernel per layer (CudaGraphDecoder kv_write=2).
//
// What: the new token's K and V, columns [E, 2E) and [2E, 3E) of the c_attn output qkv [B, 3E], go to slot `slot`
// of the layer's static caches k, v [B, H, Tmax, D]; the slot is read on the device (the decoder's cursor), so the
// same captured graph node serves every step.
// Why: the decode step is launch-latency bound; one thread per (row, K or V column) writes both caches in one launch
// per layer (two index_copy_, K then V, would take two).
// The store itself is kv_store (matmul_epilogue.cuh), the one kv_write=3's GEMVs make as they write qkv: a slot
// outside [0, Tmax) writes nothing (out-of-bounds stores would corrupt other memory; the decoder checks the length
// on the host before a step, so it never asks for one).
#include "common.cuh"
#include "launch.h"
#include "matmul_epilogue.cuh"

namespace gk::cuda {

__global__ void kv_write_kernel(const float* __restrict__ qkv, int64_t ldq, int64_t B, KvOut kv) {
  pdl_begin();
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * 2 * kv.E) return;
  const int64_t b = idx / (2 * kv.E), n = kv.E + idx % (2 * kv.E);
  kv_store(kv, b, n, qkv[b * ldq + n]);
}

cudaError_t kv_write(const float* qkv, int64_t ldq, int64_t B, const KvOut& kv, cudaStream_t stream) {
  const int64_t n = B * 2 * kv.E;
  if (n == 0) return cudaGetLastError();
  if ((n + 255) / 256 > 0x7fffffff) return cudaErrorInvalidValue;
  launch(kv_write_kernel, blocks_for(n, 256), 256, 0, stream, qkv, ldq, B, kv);
  return cudaGetLastError();
}

}  // namespace gk::cuda
