// matmul_lowp.cu — Conv1D's y = x @ W + b on CUDA with W stored in reduced precision (issue #16's CUDA twins of
// the CPU weight modes), with the epilogue (gelu_new or + residual) fused before the store.
//
// Why: a decode step streams every weight once, so its time is the weights' bytes; fp16 and bf16 halve them, int8
// (+ its scales) takes about a quarter. Activations, accumulation and the epilogue stay fp32: fp32 FMA, no tensor
// cores and no TF32, because the contract is parity with a float64 reference over the *stored* weights (the
// format's own rounding is measured separately, end to end).
//
// Reference: C[m, n] = epi(Σ_k A[m, k] · w(k, n) + b[n]) with W [K, N] (HF's Conv1D orientation, row stride ldw):
//   fp16 / bf16  w(k, n) = float(W[k, n])                    (exact widening)
//   int8         w(k, n) = W[k, n] · S[k / G, n]             (symmetric; S fp32 [K / G, N], row stride lds)
//  - Decode (M <= kGemvMaxRows): a GEMV that reads W once. Each lane loads 4 bytes of a W row — a half2 /
//    bfloat162 (2 columns) or a char4 (4 columns) — so a warp reads one 128-byte line per row, as the fp32 GEMV
//    does, and widens it in registers. A block owns 32·VEC columns and up to kLpRows rows of x (grid.z walks the
//    row chunks of a larger M; their W re-reads hit L2). K is cut into chunks of C rows that share one int8 scale
//    (C divides G; 16 for fp16/bf16), taken by the block's 8 warps in turn, 4 W rows in flight per warp; a chunk's
//    Σ x·w is summed apart and then added (int8: one FMA with the chunk's scales per column, instead of a multiply
//    per weight). The warps' partials are summed in shared memory in a fixed order. When the column blocks cannot
//    fill the GPU, K is split over grid.y blocks writing partials to a workspace that a second kernel sums in split
//    order (deterministic) and finishes with the epilogue.
//  - Prefill (M > kGemvMaxRows): matmul.cu's two tiled SGEMMs (64×64 tiles, or 128×128 when those fill the GPU)
//    with the W tile widened to fp32 (int8: fl(q · s)) as it is stored into shared memory, so the inner loop is
//    the fp32 one. The int8 scale row of each tile row is tracked incrementally (no division per element).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common.cuh"
#include "launch.h"
#include "matmul_epilogue.cuh"

namespace gk::cuda {

namespace {

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

// columns n .. n+V-1 of one W row: one aligned 4-byte load when `full`, else element by element (zeros past N)
template <class WT, int V>
__device__ __forceinline__ void load_cols(const WT* row, int64_t n, int64_t N, bool full, float (&w)[V]) {
  if (full) {
    Widen<WT>::vec(row + n, w);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = n + j < N ? Widen<WT>::one(row + n + j) : 0.f;
  }
}

// ---------------------------------------------------------------- decode: GEMV, split-K when N is narrow

constexpr int kLpWarps = 8;
constexpr int kLpRows = 8;  // x rows per block at most (grid.z walks chunks of them)

template <class WT, int MR>
__global__ __launch_bounds__(kLpWarps * 32) void gemv_lowp_kernel(
    const float* __restrict__ A, int64_t lda, int M, int64_t K, const WT* __restrict__ W, int64_t ldw, int64_t N,
    const float* __restrict__ S, int64_t lds, int64_t G, int64_t C, bool vec, const float* __restrict__ bias,
    int epi, const float* __restrict__ R, int64_t ldr, float* __restrict__ out, int splits, float* __restrict__ ws) {
  constexpr bool kScaled = std::is_same_v<WT, int8_t>;
  constexpr int V = Widen<WT>::kVec, COLS = 32 * V;
  __shared__ float red[kLpWarps][MR][COLS];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t nb = (int64_t)blockIdx.x * COLS, n = nb + (int64_t)lane * V;
  const int r0 = (int)blockIdx.z * MR;
  const int rows = M - r0 < MR ? M - r0 : MR;
  const float* Ab = A + (int64_t)r0 * lda;
  const bool full = vec && n + V <= N;  // this lane's columns in one aligned load
  const int64_t nch = (K + C - 1) / C, per = (nch + splits - 1) / splits;
  const int64_t cb = (int64_t)blockIdx.y * per, ce = cb + per < nch ? cb + per : nch;
  float acc[MR][V];
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int j = 0; j < V; ++j) acc[r][j] = 0.f;

  for (int64_t c = cb + warp; c < ce; c += kLpWarps) {
    const int64_t k0 = c * C, k1 = k0 + C < K ? k0 + C : K;
    float part[MR][V];
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int j = 0; j < V; ++j) part[r][j] = 0.f;
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {  // 4 W rows in flight
      float w[4][V];
#pragma unroll
      for (int i = 0; i < 4; ++i) load_cols<WT, V>(W + (k + i) * ldw, n, N, full, w[i]);
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (r < rows) {
          const float* a = Ab + r * lda + k;  // the same address in every lane: a broadcast
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float ai = a[i];
#pragma unroll
            for (int j = 0; j < V; ++j) part[r][j] = fmaf(ai, w[i][j], part[r][j]);
          }
        }
      }
    }
    for (; k < k1; ++k) {
      float w[V];
      load_cols<WT, V>(W + k * ldw, n, N, full, w);
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (r < rows) {
          const float ai = Ab[r * lda + k];
#pragma unroll
          for (int j = 0; j < V; ++j) part[r][j] = fmaf(ai, w[j], part[r][j]);
        }
      }
    }
    if constexpr (kScaled) {  // the chunk lies in one group: one scale per column
      const float* srow = S + (k0 / G) * lds;
      float s[V];
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = n + j < N ? __ldg(srow + n + j) : 0.f;
#pragma unroll
      for (int r = 0; r < MR; ++r)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[r][j] = fmaf(part[r][j], s[j], acc[r][j]);
    } else {
#pragma unroll
      for (int r = 0; r < MR; ++r)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[r][j] += part[r][j];
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int j = 0; j < V; ++j) red[warp][r][lane * V + j] = acc[r][j];
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * COLS; idx += kLpWarps * 32) {
    const int r = idx / COLS, col = idx % COLS;
    const int64_t nn = nb + col, m = r0 + r;
    if (nn >= N) continue;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kLpWarps; ++w) s += red[w][r][col];  // in warp order: deterministic
    if (splits == 1) out[m * N + nn] = epilogue(s, epi, bias, nn, R, ldr, m);
    else ws[((int64_t)blockIdx.y * M + m) * N + nn] = s;
  }
}

__global__ void lowp_splitk_finish_kernel(const float* __restrict__ ws, int splits, int M, int64_t N,
                                          const float* __restrict__ bias, int epi, const float* __restrict__ R,
                                          int64_t ldr, float* __restrict__ out) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (int64_t)M * N) return;
  const int64_t r = idx / N, n = idx % N;
  float s = 0.f;
  for (int sp = 0; sp < splits; ++sp) s += ws[((int64_t)sp * M + r) * N + n];
  out[r * N + n] = epilogue(s, epi, bias, n, R, ldr, r);
}

// ---------------------------------------------------------------- prefill: tiled SGEMM over widened W tiles

constexpr int kGemmThreads = 256;

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
__global__ __launch_bounds__(kGemmThreads) void gemm_lowp_kernel(const float* __restrict__ A, int64_t lda, int64_t M,
                                                                 int64_t K, const WT* __restrict__ W, int64_t ldw,
                                                                 int64_t N, const float* __restrict__ S, int64_t lds,
                                                                 int64_t G, const float* __restrict__ bias, int epi,
                                                                 const float* __restrict__ R, int64_t ldr,
                                                                 float* __restrict__ out) {
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

template <class WT>
__global__ __launch_bounds__(kGemmThreads, 2) void gemm128_lowp_kernel(
    const float* __restrict__ A, int64_t lda, int64_t M, int64_t K, const WT* __restrict__ W, int64_t ldw, int64_t N,
    const float* __restrict__ S, int64_t lds, int64_t G, const float* __restrict__ bias, int epi,
    const float* __restrict__ R, int64_t ldr, float* __restrict__ out) {
  __shared__ __align__(16) float As[BK2][BM2 + kPad2];  // A tile transposed: As[k][m]
  __shared__ __align__(16) float Ws[BK2][BN2 + kPad2];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = (int64_t)blockIdx.y * BM2, n0 = (int64_t)blockIdx.x * BN2;
  WTile<WT, BK2, BN2> wt;
  wt.init(tid, G);
  // thread (ty, tx) owns rows ty*4 + {0..3} and 64 + ty*4 + {0..3}, columns likewise with tx
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
    for (int kk = 0; kk < BK2; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[kk][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Ws[kk][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Ws[kk][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float w[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t n = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
      if (n < N) out[m * N + n] = epilogue(acc[i][j], epi, bias, n, R, ldr, m);
    }
  }
}

// ---------------------------------------------------------------- launchers

int vec_of(LowpType t) { return t == LowpType::I8 ? 4 : 2; }

// K rows per GEMV chunk: a divisor of the int8 group (so a chunk has one scale per column); 16 otherwise
int64_t chunk_of(LowpType t, int64_t group) {
  if (t != LowpType::I8) return 16;
  for (int64_t c = 16; c > 1; c /= 2)
    if (group % c == 0) return c;
  return 1;
}

int rows_per_block(int64_t M) { return M == 1 ? 1 : kLpRows; }

template <class WT>
cudaError_t launch(const float* A, int64_t lda, int64_t M, int64_t K, const void* Wv, int64_t ldw, int64_t N,
                   const float* S, int64_t lds, int64_t G, const float* bias, int epi, const float* R, int64_t ldr,
                   float* out, int splits, float* workspace, int num_sms, cudaStream_t stream, int64_t C) {
  const WT* W = static_cast<const WT*>(Wv);
  if (M <= kGemvMaxRows) {
    constexpr int COLS = 32 * Widen<WT>::kVec;
    const bool vec = (reinterpret_cast<uintptr_t>(W) % 4 == 0) && ((ldw * (int64_t)sizeof(WT)) % 4 == 0);
    const int mr = rows_per_block(M);
    dim3 grid((unsigned)((N + COLS - 1) / COLS), (unsigned)splits, (unsigned)((M + mr - 1) / mr));
    if (mr == 1)
      gemv_lowp_kernel<WT, 1><<<grid, kLpWarps * 32, 0, stream>>>(A, lda, (int)M, K, W, ldw, N, S, lds, G, C, vec,
                                                                   bias, epi, R, ldr, out, splits, workspace);
    else
      gemv_lowp_kernel<WT, kLpRows><<<grid, kLpWarps * 32, 0, stream>>>(A, lda, (int)M, K, W, ldw, N, S, lds, G, C,
                                                                         vec, bias, epi, R, ldr, out, splits,
                                                                         workspace);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    lowp_splitk_finish_kernel<<<blocks_for(M * N, 256), 256, 0, stream>>>(workspace, splits, (int)M, N, bias, epi,
                                                                          R, ldr, out);
    return cudaGetLastError();
  }
  const int64_t gx2 = (N + BN2 - 1) / BN2, gy2 = (M + BM2 - 1) / BM2;
  if (gx2 * gy2 >= num_sms) {
    if (gy2 > 65535) return cudaErrorInvalidValue;
    gemm128_lowp_kernel<WT><<<dim3((unsigned)gx2, (unsigned)gy2), kGemmThreads, 0, stream>>>(
        A, lda, M, K, W, ldw, N, S, lds, G, bias, epi, R, ldr, out);
    return cudaGetLastError();
  }
  const int64_t gx = (N + BN - 1) / BN, gy = (M + BM - 1) / BM;
  if (gy > 65535) return cudaErrorInvalidValue;
  gemm_lowp_kernel<WT><<<dim3((unsigned)gx, (unsigned)gy), kGemmThreads, 0, stream>>>(A, lda, M, K, W, ldw, N, S,
                                                                                       lds, G, bias, epi, R, ldr, out);
  return cudaGetLastError();
}

}  // namespace

int gemv_lowp_splits(LowpType t, int64_t M, int64_t K, int64_t N, int64_t group, int num_sms) {
  if (M > kGemvMaxRows || M < 1) return 1;
  const int64_t cols = 32 * vec_of(t), mr = rows_per_block(M);
  const int64_t blocks = (N + cols - 1) / cols * ((M + mr - 1) / mr), want = 2 * (int64_t)num_sms;
  int64_t s = (want + blocks - 1) / blocks;
  const int64_t C = chunk_of(t, t == LowpType::I8 ? group : 0);
  const int64_t chunks = (K + C - 1) / C, max_by_k = chunks / kLpWarps > 1 ? chunks / kLpWarps : 1;  // >= 1 per warp
  if (s > max_by_k) s = max_by_k;
  if (s > 32) s = 32;
  return s < 1 ? 1 : (int)s;
}

cudaError_t matmul_lowp(LowpType t, const float* A, int64_t lda, int64_t M, int64_t K, const void* W, int64_t ldw,
                        int64_t N, const float* scales, int64_t lds, int64_t group, const float* bias, int epi,
                        const float* R, int64_t ldr, float* C, int splits, float* workspace, int num_sms,
                        cudaStream_t stream) {
  if (M == 0 || N == 0 || K == 0) return cudaGetLastError();  // (the glue handles K == 0: bias only)
  if (M <= kGemvMaxRows && (splits < 1 || splits > 65535 || (splits > 1 && workspace == nullptr)))
    return cudaErrorInvalidValue;
  if (t == LowpType::I8 && (scales == nullptr || group < 1 || K % group != 0)) return cudaErrorInvalidValue;
  const int64_t ch = chunk_of(t, group);
  switch (t) {
    case LowpType::F16:
      return launch<__half>(A, lda, M, K, W, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, splits, workspace, num_sms,
                            stream, ch);
    case LowpType::BF16:
      return launch<__nv_bfloat16>(A, lda, M, K, W, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, splits, workspace,
                                   num_sms, stream, ch);
    case LowpType::I8:
      return launch<int8_t>(A, lda, M, K, W, ldw, N, scales, lds, group, bias, epi, R, ldr, C, splits, workspace,
                            num_sms, stream, ch);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gk::cuda
