// common.cuh — small device helpers shared by the .cu kernels: warp reductions and float4 arithmetic.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace gk::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Butterfly reductions: every lane ends with the bitwise-same result (IEEE + and max are commutative), so
// branches on the result are warp-uniform.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float4 operator+(float4 a, float4 b) { return {a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w}; }
__device__ __forceinline__ float4 operator-(float4 a, float s) { return {a.x - s, a.y - s, a.z - s, a.w - s}; }
__device__ __forceinline__ float4 operator*(float4 a, float s) { return {a.x * s, a.y * s, a.z * s, a.w * s}; }
__device__ __forceinline__ float4 operator*(float4 a, float4 b) { return {a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w}; }
__device__ __forceinline__ float hsum(float4 a) { return (a.x + a.y) + (a.z + a.w); }
__device__ __forceinline__ float hsum(float a) { return a; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------- cp.async (sm_80+): global -> shared, 16 bytes

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool in) {
  // src-size 0 copies nothing and zero-fills the 16 bytes (the pointer is then never read)
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(in ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------- programmatic dependent launch (sm_90+)
// While pdl_enabled() (launch.h), `launch` lets a grid start while the previous kernel in its stream still runs, so
// its blocks are resident and its weights on their way into L2 when that kernel ends. Every kernel of this library
// therefore opens with pdl_begin(): it waits until the previous grid has finished and its writes are visible (a
// no-op for a grid launched without PDL), then lets the next grid launch — after the wait, so at most two grids of
// a stream are in flight. Before pdl_begin a kernel may only read what no kernel writes (weights: prefetch_l2).
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch allowed while pdl_enabled() —
// on a created stream (a CUDA graph's capture, torch's side streams); the legacy default stream (torch's default)
// keeps plain launches, where PDL's support is not documented. A launch error surfaces through cudaGetLastError(),
// as <<<>>>'s does.
inline bool pdl_on(cudaStream_t stream) {  // whether `launch` on this stream uses PDL now
  return pdl_enabled() && stream != nullptr && stream != cudaStreamLegacy && stream != cudaStreamPerThread;
}
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  if (!pdl_on(stream)) {
    kernel<<<grid, block, smem, stream>>>(args...);
    return;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  (void)cudaLaunchKernelEx(&cfg, kernel, args...);
}

inline unsigned blocks_for(int64_t n, int per_block) { return (unsigned)((n + per_block - 1) / per_block); }

}  // namespace gk::cuda
