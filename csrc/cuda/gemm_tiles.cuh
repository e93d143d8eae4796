// gemm_tiles.cuh — the tiled prefill SGEMM of Conv1D (y = x @ W + b, epilogue fused) over W stored in a reduced
// weight mode (matmul_lowp.cu), widened from fp16 / bf16 / int8 to fp32 as each tile is stored into shared memory,
// so the inner loop is the same fp32 one for every weight type. matmul.cu's fp32 GEMM shares the 128×128 tile's
// constants, thread layout and k step (tile128_off, tile128_fma).
//  - a 64×64 output tile per 256-thread block, K in steps of 16 staged through shared memory (A transposed, so a
//    thread's 4 rows are broadcast reads), 4×4 outputs per thread at a 16-element stride (conflict-free shared
//    reads, coalesced stores); bounds-checked loads (zeros outside), so any M, K, N and row stride work;
//  - when 128×128 tiles alone fill the GPU: 128×128 tiles, K steps of 8, 8×8 outputs per thread read as float4
//    from shared memory (4 shared loads per 64 FMAs instead of 8 per 16).
// int8: w = fl(q · s), the scale row of each tile row tracked incrementally (no division per element).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "matmul_epilogue.cuh"

namespace gk::cuda {
namespace tiles {

constexpr int kGemmThreads = 256;

// ---------------------------------------------------------------- widening one stored weight type to fp32

template <class WT>
struct Widen;

template <>
struct Widen<__half> {
  static constexpr int kVec = 2;  // columns per 4-byte load
  __device__ static float one(const __half* p) { return __half2float(__ldg(p)); }
  __device__ static void vec(const __half* p, float (&w)[kVec]) {
    const float2 f = __half22float2(__ldg(reinterpret_cast<const __half2*>(p)));
    w[0] = f.x;
    w[1] = f.y;
  }
};

template <>
struct Widen<__nv_bfloat16> {
  static constexpr int kVec = 2;
  __device__ static float one(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }
  __device__ static void vec(const __nv_bfloat16* p, float (&w)[kVec]) {
    const float2 f = __bfloat1622float2(__ldg(reinterpret_cast<const __nv_bfloat162*>(p)));
    w[0] = f.x;
    w[1] = f.y;
  }
};

template <>
struct Widen<int8_t> {
  static constexpr int kVec = 4;
  __device__ static float one(const int8_t* p) { return (float)__ldg(reinterpret_cast<const signed char*>(p)); }
  __device__ static void vec(const int8_t* p, float (&w)[kVec]) {
    const char4 c = __ldg(reinterpret_cast<const char4*>(p));
    w[0] = (float)c.x;
    w[1] = (float)c.y;
    w[2] = (float)c.z;
    w[3] = (float)c.w;
  }
};

// ---------------------------------------------------------------- prefill: tiled SGEMM over widened W tiles

// The W tile loader of one thread: E elements per K step, at tile rows kk_e = tid / BNT + e · (256 / BNT) and
// column tid % BNT. int8: the scale row of each (group g_e, position in the group rem_e), advanced by BKT per step.
template <class WT, int BKT, int BNT>
struct WTile {
  static constexpr bool kScaled = std::is_same_v<WT, int8_t>;
  static constexpr int E = BKT * BNT / kGemmThreads, kRowsPerPass = kGemmThreads / BNT;
  int g[E], rem[E];  // 32-bit: the glue keeps K < 2^31

  __device__ void init(int tid, int64_t G) {
    if constexpr (kScaled) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int kk = tid / BNT + e * kRowsPerPass;
        g[e] = kk / (int)G;
        rem[e] = kk % (int)G;
      }
    }
  }
  // store the tile at K offset k0 (rows k0 + kk) into Ws, then step to k0 + BKT
  template <int PITCH>
  __device__ void load(float (*Ws)[PITCH], int tid, int64_t k0, int64_t K, int64_t n0, int64_t N,
                       const WT* __restrict__ W, int64_t ldw, const float* __restrict__ S, int64_t lds, int64_t G) {
    const int nn = tid % BNT;
    const int64_t gn = n0 + nn;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int kk = tid / BNT + e * kRowsPerPass;
      const int64_t gk = k0 + kk;
      float w = 0.f;
      if (gk < K && gn < N) {
        w = Widen<WT>::one(W + gk * ldw + gn);
        if constexpr (kScaled) w *= __ldg(S + (int64_t)g[e] * lds + gn);
      }
      Ws[kk][nn] = w;
      if constexpr (kScaled) {
        rem[e] += BKT;
        while (rem[e] >= (int)G) {  // once at most when G >= BKT (GPT-2: G = 64)
          rem[e] -= (int)G;
          ++g[e];
        }
      }
    }
  }
};

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
static_assert((BM / TM) * (BN / TN) == kGemmThreads, "one thread per 4x4 sub-tile");

template <class WT>
__global__ __launch_bounds__(kGemmThreads) void gemm_tile_kernel(const float* __restrict__ A, int64_t lda, int64_t M,
                                                                 int64_t K, const WT* __restrict__ W, int64_t ldw,
                                                                 int64_t N, const float* __restrict__ S, int64_t lds,
                                                                 int64_t G, const float* __restrict__ bias, int epi,
                                                                 const float* __restrict__ R, int64_t ldr,
                                                                 float* __restrict__ out) {
  pdl_begin();
  __shared__ float As[BK][BM + 1];  // A tile transposed: As[k][m]
  __shared__ float Ws[BK][BN];
  const int tid = threadIdx.x, tx = tid % (BN / TN), ty = tid / (BN / TN);
  const int64_t m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;
  WTile<WT, BK, BN> wt;
  wt.init(tid, G);
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int e = 0; e < BM * BK / kGemmThreads; ++e) {
      const int idx = tid + e * kGemmThreads, mm = idx / BK, kk = idx % BK;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      As[kk][mm] = (gm < M && gk < K) ? A[gm * lda + gk] : 0.f;
    }
    wt.template load<BN>(Ws, tid, k0, K, n0, N, W, ldw, S, lds, G);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], w[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * (BM / TM)];
#pragma unroll
      for (int j = 0; j < TN; ++j) w[j] = Ws[kk][tx + j * (BN / TN)];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten next step
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty + i * (BM / TM);
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tx + j * (BN / TN);
      if (n < N) out[m * N + n] = epilogue(acc[i][j], epi, bias, n, R, ldr, m);
    }
  }
}

constexpr int BM2 = 128, BN2 = 128, BK2 = 8, kPad2 = 4;  // pitch 132 floats keeps float4 rows 16-byte aligned

// The 128×128 tile's thread layout (this kernel and matmul.cu's double-buffered GEMM): thread (ty, tx) owns
// rows ty*4 + {0..3} and 64 + ty*4 + {0..3}, columns likewise with tx; tile128_off gives accumulator i's offset.
__device__ __forceinline__ int tile128_off(int t, int i) { return i < 4 ? t * 4 + i : 64 + t * 4 + (i - 4); }

// One k of the tile: as_k, ws_k are row k of the shared A (transposed) and W tiles.
__device__ __forceinline__ void tile128_fma(const float* as_k, const float* ws_k, int tx, int ty, float (&acc)[8][8]) {
  const float4 a0 = *reinterpret_cast<const float4*>(as_k + ty * 4);
  const float4 a1 = *reinterpret_cast<const float4*>(as_k + 64 + ty * 4);
  const float4 b0 = *reinterpret_cast<const float4*>(ws_k + tx * 4);
  const float4 b1 = *reinterpret_cast<const float4*>(ws_k + 64 + tx * 4);
  const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
  const float w[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
}

template <class WT>
__global__ __launch_bounds__(kGemmThreads, 2) void gemm128_tile_kernel(
    const float* __restrict__ A, int64_t lda, int64_t M, int64_t K, const WT* __restrict__ W, int64_t ldw, int64_t N,
    const float* __restrict__ S, int64_t lds, int64_t G, const float* __restrict__ bias, int epi,
    const float* __restrict__ R, int64_t ldr, float* __restrict__ out) {
  pdl_begin();
  __shared__ __align__(16) float As[BK2][BM2 + kPad2];  // A tile transposed: As[k][m]
  __shared__ __align__(16) float Ws[BK2][BN2 + kPad2];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = (int64_t)blockIdx.y * BM2, n0 = (int64_t)blockIdx.x * BN2;
  WTile<WT, BK2, BN2> wt;
  wt.init(tid, G);
  // thread (ty, tx) owns the tile128_off rows and columns
  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += BK2) {
#pragma unroll
    for (int e = 0; e < BM2 * BK2 / kGemmThreads; ++e) {
      const int idx = tid + e * kGemmThreads, mm = idx / BK2, kk = idx % BK2;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      As[kk][mm] = (gm < M && gk < K) ? A[gm * lda + gk] : 0.f;
    }
    wt.template load<BN2 + kPad2>(Ws, tid, k0, K, n0, N, W, ldw, S, lds, G);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK2; ++kk) tile128_fma(As[kk], Ws[kk], tx, ty, acc);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t m = m0 + tile128_off(ty, i);
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t n = n0 + tile128_off(tx, j);
      if (n < N) out[m * N + n] = epilogue(acc[i][j], epi, bias, n, R, ldr, m);
    }
  }
}

// Prefill launch: 128×128 tiles when they alone fill the GPU, else 64×64. S/lds/G: int8's scales (else unused).
template <class WT>
cudaError_t launch_gemm(const float* A, int64_t lda, int64_t M, int64_t K, const WT* W, int64_t ldw, int64_t N,
                        const float* S, int64_t lds, int64_t G, const float* bias, int epi, const float* R, int64_t ldr,
                        float* out, int num_sms, cudaStream_t stream) {
  const int64_t gx2 = (N + BN2 - 1) / BN2, gy2 = (M + BM2 - 1) / BM2;
  if (gx2 * gy2 >= num_sms) {
    if (gy2 > 65535) return cudaErrorInvalidValue;
    launch(gemm128_tile_kernel<WT>, dim3((unsigned)gx2, (unsigned)gy2), kGemmThreads, 0, stream, A, lda, M, K, W, ldw,
           N, S, lds, G, bias, epi, R, ldr, out);
    return cudaGetLastError();
  }
  const int64_t gx = (N + BN - 1) / BN, gy = (M + BM - 1) / BM;
  if (gy > 65535) return cudaErrorInvalidValue;
  launch(gemm_tile_kernel<WT>, dim3((unsigned)gx, (unsigned)gy), kGemmThreads, 0, stream, A, lda, M, K, W, ldw, N, S,
         lds, G, bias, epi, R, ldr, out);
  return cudaGetLastError();
}

}  // namespace tiles
}  // namespace gk::cuda
