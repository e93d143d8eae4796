// layernorm.cu — LayerNorm over the last dim, and the fused residual add + LayerNorm, on CUDA.
//
// Reference (float64): y = (x − mean) / sqrt(var + eps) · w + b, var the biased variance.
// One warp per row (GPT-2 rows are 768..1600 floats: 6..13 float4 per lane), 4 rows per block. Exactly the CPU
// kernel's two-pass statistics in fp32 — mean, then the centred sum of squares, which stays exact with GPT-2's
// residual outlier channels (values in the thousands) where E[x²] − mean² would cancel. The row is re-read for
// each pass (from L1/L2, not DRAM). 16-byte loads when the row length, strides and pointers allow; else scalar.
// The fused variant first writes s = x + r (one fp32 add, bitwise torch's) and normalizes s, each lane reading
// back exactly the elements it wrote.
#include "common.cuh"
#include "launch.h"

namespace gk::cuda {

constexpr int kLnWarps = 4;

template <typename T>
__device__ __forceinline__ T load_as(const float* p, int64_t j) {
  return reinterpret_cast<const T*>(p)[j];
}
template <typename T>
__device__ __forceinline__ void store_as(float* p, int64_t j, T v) {
  reinterpret_cast<T*>(p)[j] = v;
}

__device__ __forceinline__ float sq_dev(float v, float m) {
  float d = v - m;
  return d * d;
}
__device__ __forceinline__ float sq_dev(float4 v, float m) {
  return (sq_dev(v.x, m) + sq_dev(v.y, m)) + (sq_dev(v.z, m) + sq_dev(v.w, m));
}

// T = float4 (n % 4 == 0, aligned) or float; the row is n / width elements of T.
template <typename T>
__global__ void layer_norm_kernel(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y,
                                  const float* __restrict__ w, const float* __restrict__ b, int64_t rows, int n,
                                  float eps) {
  pdl_begin();
  constexpr int width = sizeof(T) / sizeof(float);
  const int64_t row = (int64_t)blockIdx.x * kLnWarps + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x % 32, nv = n / width;
  const float* src = x + row * ldx;
  if (r != nullptr) {  // fused residual add: s = x + r, then LN(s)
    const float* rr = r + row * ldr;
    float* sr = s + row * (int64_t)n;
    for (int j = lane; j < nv; j += 32) store_as<T>(sr, j, load_as<T>(src, j) + load_as<T>(rr, j));
    src = sr;  // read back by the same lanes that wrote it
  }
  float acc = 0.f;
  for (int j = lane; j < nv; j += 32) acc += hsum(load_as<T>(src, j));
  const float mean = warp_sum(acc) / (float)n;
  acc = 0.f;
  for (int j = lane; j < nv; j += 32) acc += sq_dev(load_as<T>(src, j), mean);
  const float rstd = 1.f / sqrtf(warp_sum(acc) / (float)n + eps);
  float* yr = y + row * (int64_t)n;
  for (int j = lane; j < nv; j += 32)
    store_as<T>(yr, j, (load_as<T>(src, j) - mean) * rstd * load_as<T>(w, j) + load_as<T>(b, j));
}

static cudaError_t launch_ln(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y,
                             const float* w, const float* b, int64_t rows, int64_t n, float eps, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaGetLastError();
  bool vec = n % 4 == 0 && ldx % 4 == 0 && aligned16(x) && aligned16(y) && aligned16(w) && aligned16(b);
  if (r) vec = vec && ldr % 4 == 0 && aligned16(r) && aligned16(s);
  const unsigned grid = blocks_for(rows, kLnWarps);
  if (vec)
    launch(layer_norm_kernel<float4>, grid, kLnWarps * 32, 0, stream, x, ldx, r, ldr, s, y, w, b, rows, (int)n, eps);
  else
    launch(layer_norm_kernel<float>, grid, kLnWarps * 32, 0, stream, x, ldx, r, ldr, s, y, w, b, rows, (int)n, eps);
  return cudaGetLastError();
}

cudaError_t layer_norm(const float* x, int64_t ldx, float* y, const float* w, const float* b, int64_t rows, int64_t n,
                       float eps, cudaStream_t stream) {
  return launch_ln(x, ldx, nullptr, 0, nullptr, y, w, b, rows, n, eps, stream);
}

cudaError_t add_layer_norm(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y, const float* w,
                           const float* b, int64_t rows, int64_t n, float eps, cudaStream_t stream) {
  return launch_ln(x, ldx, r, ldr, s, y, w, b, rows, n, eps, stream);
}

}  // namespace gk::cuda
