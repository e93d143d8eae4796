// matmul_lowp.cu — Conv1D's y = x @ W + b on CUDA with W stored in reduced precision (the CUDA twins of
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
//  - Prefill (M > kGemvMaxRows): the tiled SGEMMs of gemm_tiles.cuh (64×64 tiles, 128×128 when those alone fill
//    the GPU), the W tile widened to fp32 (int8: fl(q · s)) as it is stored into shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common.cuh"
#include "launch.h"
#include "gemm_tiles.cuh"
#include "matmul_epilogue.cuh"

namespace gk::cuda {

namespace {

using tiles::Widen;

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
    const float* __restrict__ S, int64_t lds, int64_t G, int64_t C, bool vec, const float* __restrict__ bias, int epi,
    const float* __restrict__ R, int64_t ldr, float* __restrict__ out, int splits, float* __restrict__ ws, KvOut kv) {
  pdl_begin();
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
    if (splits == 1)
      store_out(out, N, m, nn, epilogue(s, epi, bias, nn, R, ldr, m), kv);
    else
      ws[((int64_t)blockIdx.y * M + m) * N + nn] = s;
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
                   float* out, int splits, float* workspace, int num_sms, cudaStream_t stream, int64_t C,
                   const KvOut& kv) {
  const WT* W = static_cast<const WT*>(Wv);
  if (M <= kGemvMaxRows) {
    constexpr int COLS = 32 * Widen<WT>::kVec;
    const bool vec = (reinterpret_cast<uintptr_t>(W) % 4 == 0) && ((ldw * (int64_t)sizeof(WT)) % 4 == 0);
    const int mr = rows_per_block(M);
    dim3 grid((unsigned)((N + COLS - 1) / COLS), (unsigned)splits, (unsigned)((M + mr - 1) / mr));
    if (mr == 1)
      launch(gemv_lowp_kernel<WT, 1>, grid, kLpWarps * 32, 0, stream, A, lda, (int)M, K, W, ldw, N, S, lds, G, C, vec,
             bias, epi, R, ldr, out, splits, workspace, kv);
    else
      launch(gemv_lowp_kernel<WT, kLpRows>, grid, kLpWarps * 32, 0, stream, A, lda, (int)M, K, W, ldw, N, S, lds, G, C,
             vec, bias, epi, R, ldr, out, splits, workspace, kv);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    return splitk_finish(workspace, splits, M, N, bias, epi, R, ldr, out, stream, kv);
  }
  if (kv.k != nullptr) return cudaErrorInvalidValue;  // the cache store is the decode GEMV's
  return tiles::launch_gemm<WT>(A, lda, M, K, W, ldw, N, S, lds, G, bias, epi, R, ldr, out, num_sms, stream);
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
                        cudaStream_t stream, const KvOut& kv) {
  if (M == 0 || N == 0 || K == 0) return cudaGetLastError();  // (the glue handles K == 0: bias only)
  if (M <= kGemvMaxRows && (splits < 1 || splits > 65535 || (splits > 1 && workspace == nullptr)))
    return cudaErrorInvalidValue;
  if (t == LowpType::I8 && (scales == nullptr || group < 1 || K % group != 0)) return cudaErrorInvalidValue;
  const int64_t ch = chunk_of(t, group);
  switch (t) {
    case LowpType::F16:
      return launch<__half>(A, lda, M, K, W, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, splits, workspace, num_sms,
                            stream, ch, kv);
    case LowpType::BF16:
      return launch<__nv_bfloat16>(A, lda, M, K, W, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, splits, workspace,
                                   num_sms, stream, ch, kv);
    case LowpType::I8:
      return launch<int8_t>(A, lda, M, K, W, ldw, N, scales, lds, group, bias, epi, R, ldr, C, splits, workspace,
                            num_sms, stream, ch, kv);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gk::cuda
