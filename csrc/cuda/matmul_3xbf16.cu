// matmul_3xbf16.cu — the bf16 weight mode's prefill GEMM on tensor cores (prefill GEMM variant 3 with bf16 weights):
// C = epi(A @ W + b), A fp32 [M, K], W bf16 [K, N] (row stride ldw).
//
// W is exactly bf16, so only the activations are split: x = hi + mid + lo, three bf16 parts, each the rounding of
// what the previous ones left (exact for |x| >= 2^-110: 24 bits in three 8-bit parts; below that only the bits
// under bf16's smallest subnormal go), and x·w = lo·w + mid·w + hi·w: three bf16 MMAs
// (mma.sync.m16n8k16, fp32 accumulate) per 16 k's, fp32-level error against the stored weights. What the mode's SIMT
// tiles (gemm_tiles.cuh) do differently: they widen W to fp32 in shared memory and run fp32 FMAs.
//  - 128×128 output tile per block of 8 warps (2 along M × 4 along N, each warp 64×32 = 4×4 MMA tiles of 16×8),
//    K in steps of 32 (two MMA k-steps); A (fp32) and W (bf16) tiles copied by cp.async in 3 stages, zero-filled
//    outside the matrix. Shared rows padded: A 40 floats (the float2 fragment reads of a half-warp hit 16 distinct
//    8-byte banks), W 136 bf16 = 68 words (the k rows a fragment reads land 8 banks apart).
//  - each 16-k step's three MMAs go into a zeroed fragment added to the accumulator in fp32, so the tensor cores'
//    accumulation (which may round toward zero) errs relative to a 16-term partial sum, not the running total.
//  - no split-K (the mode's SIMT GEMM has none either).
#include <cuda_bf16.h>

#include <cstring>

#include "common.cuh"
#include "launch.h"
#include "matmul_epilogue.cuh"
#include "mma_tiles.cuh"

namespace gk::cuda {

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kThreads = 256;
using mma_tiles::kStages;
constexpr int kLdA = kBK + 8;  // floats per shared A row
constexpr int kLdW = kBN + 8;  // bf16 per shared W row
constexpr int kAStageBytes = kBM * kLdA * 4, kWStageBytes = kBK * kLdW * 2;
constexpr int kSmemBytes = kStages * (kAStageBytes + kWStageBytes);

__device__ __forceinline__ unsigned bits(__nv_bfloat162 v) {
  unsigned u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// (x, y) = hi + mid + lo, each a pair of bf16 (x in the low half: the lower k), round to nearest
__device__ __forceinline__ void split3(float2 v, unsigned& hi, unsigned& mid, unsigned& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
  const float2 hf = __bfloat1622float2(h);
  // x - hi is exact; ±inf (or a finite x rounding to it) has no remainder (inf - inf would be NaN)
  float2 r = make_float2(isfinite(hf.x) ? v.x - hf.x : 0.f, isfinite(hf.y) ? v.y - hf.y : 0.f);
  const __nv_bfloat162 m = __floats2bfloat162_rn(r.x, r.y);
  const float2 mf = __bfloat1622float2(m);
  r = make_float2(r.x - mf.x, r.y - mf.y);
  hi = bits(h);
  mid = bits(m);
  lo = bits(__floats2bfloat162_rn(r.x, r.y));
}

// d += a·b for one 16×8 tile over 16 k: a row-major 16×16 (4 registers of 2 bf16), b column-major 16×8 (2)
__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__global__ __launch_bounds__(kThreads, 2) void gemm_3xbf16_kernel(const float* __restrict__ A, int64_t lda, int64_t M,
                                                                  int64_t K, const __nv_bfloat16* __restrict__ W,
                                                                  int64_t ldw, int64_t N,
                                                                  const float* __restrict__ bias, int epi,
                                                                  const float* __restrict__ R, int64_t ldr,
                                                                  float* __restrict__ C) {
  pdl_begin();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no bf16 MMA before sm_80: the launcher never runs this kernel there
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* As = reinterpret_cast<float*>(smem_raw);                                           // [stage][m][k]
  __nv_bfloat16* Ws = reinterpret_cast<__nv_bfloat16*>(smem_raw + kStages * kAStageBytes);  // [stage][k][n]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;                  // the MMA fragments' group and thread-in-group
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // this warp's 64×32 corner of the tile
  // M tiles on grid.x (no 65535 limit: any number of rows), N tiles on grid.y; blocks of one W column tile run
  // together
  const int64_t m0 = (int64_t)blockIdx.x * kBM, n0 = (int64_t)blockIdx.y * kBN;
  const int64_t ntiles = (K + kBK - 1) / kBK;

  // tile `tile` into stage `st`: 1024 float4 of A (row i / 8, k (i % 8)·4), four per thread, and 512 chunks of 8 bf16
  // of W (k i / 16, column (i % 16)·8), two per thread; K % 4 == 0 and N % 8 == 0: a chunk is wholly in or out
  auto load = [&](int64_t tile, int st) {
    const int64_t k0 = tile * kBK;
    float* as = As + st * (kAStageBytes / 4);
    __nv_bfloat16* wsm = Ws + st * (kWStageBytes / 2);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = tid + r * kThreads, am = i / 8, ak = (i % 8) * 4;
      const bool in = m0 + am < M && k0 + ak < K;
      cp_async16(as + am * kLdA + ak, in ? A + (m0 + am) * lda + k0 + ak : A, in);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = tid + r * kThreads, wk = i / 16, wc = (i % 16) * 8;
      const bool in = k0 + wk < K && n0 + wc < N;
      cp_async16(wsm + wk * kLdW + wc, in ? W + (k0 + wk) * ldw + n0 + wc : W, in);
    }
  };

  mma_tiles::Acc acc;
  mma_tiles::zero(acc);
  mma_tiles::pipeline(ntiles, load, [&](int st) {
    const float* as = As + st * (kAStageBytes / 4) + wm * kLdA;
    const unsigned short* wsm = reinterpret_cast<const unsigned short*>(Ws + st * (kWStageBytes / 2)) + wn;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned b[4][2];  // the 4 n tiles' W fragments: (k 2t, 2t+1) and (k 2t+8, 2t+9) of column g
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned short* w = wsm + (kk + 2 * t) * kLdW + j * 8 + g;
        b[j][0] = (unsigned)w[0] | ((unsigned)w[kLdW] << 16);
        b[j][1] = (unsigned)w[8 * kLdW] | ((unsigned)w[9 * kLdW] << 16);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float* a = as + (i * 16 + g) * kLdA + kk + 2 * t;
        unsigned hi[4], mid[4], lo[4];
        split3(*reinterpret_cast<const float2*>(a), hi[0], mid[0], lo[0]);                 // (row g, k 2t, 2t+1)
        split3(*reinterpret_cast<const float2*>(a + 8 * kLdA), hi[1], mid[1], lo[1]);      // (row g + 8, ...)
        split3(*reinterpret_cast<const float2*>(a + 8), hi[2], mid[2], lo[2]);             // (row g, k 2t+8, 2t+9)
        split3(*reinterpret_cast<const float2*>(a + 8 * kLdA + 8), hi[3], mid[3], lo[3]);  // (row g + 8, ...)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float part[4] = {0.f, 0.f, 0.f, 0.f};
          mma_bf16(part, lo, b[j]);  // the small parts first
          mma_bf16(part, mid, b[j]);
          mma_bf16(part, hi, b[j]);
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] += part[r];
        }
      }
    }
  });

  mma_tiles::store(acc, m0 + wm, n0 + wn, g, t, M, N,
                   [&](int64_t m, int64_t n, float v) { C[m * N + n] = epilogue(v, epi, bias, n, R, ldr, m); });
#endif
}

}  // namespace

bool gemm_3xbf16_ok(const float* A, int64_t lda, int64_t K, const void* W, int64_t ldw, int64_t N) {
  return device_major() >= 8 && K % 4 == 0 && N % 8 == 0 && (N + kBN - 1) / kBN <= 65535 && lda % 4 == 0 &&
         ldw % 8 == 0 && aligned16(A) && aligned16(W);
}

cudaError_t gemm_3xbf16(const float* A, int64_t lda, int64_t M, int64_t K, const void* W, int64_t ldw, int64_t N,
                        const float* bias, int epi, const float* R, int64_t ldr, float* C, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaGetLastError();
  const int64_t gm = (M + kBM - 1) / kBM, gn = (N + kBN - 1) / kBN;
  if (!gemm_3xbf16_ok(A, lda, K, W, ldw, N) || K < 1 || gm > 0x7fffffff) return cudaErrorInvalidValue;
  // more than the 48 KB of static shared memory: opt in (per device and kernel; cheap, and legal under capture)
  cudaError_t err = cudaFuncSetAttribute(gemm_3xbf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  launch(gemm_3xbf16_kernel, dim3((unsigned)gm, (unsigned)gn), kThreads, kSmemBytes, stream, A, lda, M, K,
         static_cast<const __nv_bfloat16*>(W), ldw, N, bias, epi, R, ldr, C);
  return cudaGetLastError();
}

}  // namespace gk::cuda
