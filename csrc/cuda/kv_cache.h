// kv_cache.h — the CUDA-graph decoder's fused K/V cache write (kv_cache.cu), called by ops_kv.cpp. A header of its
// own (not launch.h) so that adding it leaves the other kernels' translation units alone.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace gk::cuda {

// For rows b < B and e < E = H·D: k[b, h, slot, d] = qkv[b, E + e], v[b, h, slot, d] = qkv[b, 2E + e] with
// h = e / D, d = e % D; qkv rows are ldq apart; k and v share the strides (sb, sh, st) of their [B, H, Tmax, D]
// (D contiguous). *slot is read on the device; a slot outside [0, Tmax) writes nothing.
cudaError_t kv_write(const float* qkv, int64_t ldq, int64_t B, int64_t H, int64_t D, const int64_t* slot, float* k,
                     float* v, int64_t sb, int64_t sh, int64_t st, int64_t Tmax, cudaStream_t stream);

}  // namespace gk::cuda
