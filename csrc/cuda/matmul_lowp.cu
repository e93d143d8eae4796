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
//  - Decode variant 2 (matmul_lowp_nk, CudaGraphDecoder gemv=2 over the reduced modes): W stored [N, K] (nn.Linear's
//    layout), int8 scales [N, K / G]; a warp per output column (2 or 4 for a narrow N), every lane loading 16 bytes
//    (uint4: 8 halves / 8 bf16 / 16 int8) per instruction, 4 in flight, as fp32's variant 2 (matmul.cu) that streams
//    at HBM speed. See below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
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

// ---------------------------------------------------------------- decode variant 2: W stored [N, K]
//
// Why [N, K] and not a [K, N] kernel with 16-byte lanes: a warp per column reads one contiguous row, 512 bytes per
// load instruction at any N (no split-K, workspace or finish kernel), and an int8 group is contiguous in k, so one
// 16-byte load holds 16 weights of one group and shares one scale.
// The [K, N] GEMV above moves 4 bytes per lane (64 / 128 bytes per warp and row): too few bytes in flight per load
// instruction to cover HBM latency, so fp16 / bf16 took about fp32's time (H200). Here each lane loads a uint4 (8 fp16
// / 8 bf16 / 16 int8 consecutive k of its column), 4 of them in flight, widens them in registers and multiplies them
// with x (float4 loads, L1-resident: the same K floats for every column), fp32 FMAs:
//   fp16  __half22float2 (HADD2.F32)          bf16  the 16 bits shifted into a float's high half (exact, integer ops)
//   int8  q + 2^23 + 128 built as float bits by one byte permute, then - (2^23 + 128): exact, and faster than the
//         int-to-float conversion (quarter rate on sm_90)
// int8: the 16 products of one load (one group: the vector path needs G % 16 == 0) are summed in fp32 and multiplied
// by the group's scale once: Σ_k x·q·s = s·Σ_k x·q. Then a warp sum per x row and the fused epilogue, stored by one
// lane. Rows not 16-byte aligned (the weight's or x's), K % 8 or 16 left over, and int8 groups that are not a
// multiple of 16 take element loads (the scale per element): right, not fast.
constexpr int kNkWarps = 4;  // columns (warps) per block: small blocks spread N = 768…1600 columns evenly over the SMs

template <class WT>
struct Wide16;  // one 16-byte load of weights -> kElems floats

template <>
struct Wide16<__half> {
  static constexpr int kElems = 8;
  __device__ static void widen(const uint4& u, float (&w)[kElems]) {
    const uint32_t v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &v[i], sizeof h);
      const float2 f = __half22float2(h);
      w[2 * i] = f.x;  // the low half is the lower k
      w[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Wide16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ static void widen(const uint4& u, float (&w)[kElems]) {
    const uint32_t v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = __uint_as_float(v[i] << 16);  // a bf16 is a float's high 16 bits
      w[2 * i + 1] = __uint_as_float(v[i] & 0xffff0000u);
    }
  }
};

template <>
struct Wide16<int8_t> {
  static constexpr int kElems = 16;
  __device__ static void widen(const uint4& u, float (&w)[kElems]) {
    const uint32_t v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t b = v[i] ^ 0x80808080u;  // each byte q + 128, in [0, 255]
#pragma unroll
      for (int j = 0; j < 4; ++j)  // bytes [q_j + 128, 0, 0, 0x4B]: the float 2^23 + q_j + 128
        w[4 * i + j] = __uint_as_float(__byte_perm(b, 0x4B000000u, 0x7440u | (uint32_t)j)) - 8388736.f;
    }
  }
};

// acc[r] += s · Σ_e x[r, k + e] · w[e] over one load's E weights (s = 1 but for int8), x rows as float4 loads
template <class WT, int MR>
__device__ __forceinline__ void nk_chunk(const uint4& u, float s, const float* __restrict__ A, int64_t lda, int M,
                                         int64_t k, float (&acc)[MR]) {
  constexpr int E = Wide16<WT>::kElems;
  float w[E];
  Wide16<WT>::widen(u, w);
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    // row 0 unconditionally (M >= 1): with every use of u conditional, nvcc sank the loads of W into the branches,
    // after the FMAs of the load before, and a lane had one load in flight instead of 4
    if (r == 0 || r < M) {
      const float4* a = reinterpret_cast<const float4*>(A + r * lda + k);  // the same in every column: L1 hits
      float p = 0.f;
#pragma unroll
      for (int q = 0; q < E / 4; ++q) {
        const float4 x = __ldg(a + q);
        p = fmaf(x.x, w[4 * q], p);
        p = fmaf(x.y, w[4 * q + 1], p);
        p = fmaf(x.z, w[4 * q + 2], p);
        p = fmaf(x.w, w[4 * q + 3], p);
      }
      if constexpr (std::is_same_v<WT, int8_t>)
        acc[r] = fmaf(p, s, acc[r]);
      else
        acc[r] += p;
    }
  }
}

// VEC: W rows and x rows 16-byte aligned (and int8: G % 16 == 0); the last K % E elements still go element-wise.
// KS warps share a column (1, 2 or 4: a block is kNkWarps / KS columns): warp part p of a column takes its row's
// loads j ≡ lane + 32·p (mod 32·KS), so a narrow N (GPT-2's 768…1600 outputs) still puts enough warps, and so loads,
// in flight on every SM; the KS partial sums meet in shared memory, added in part order (deterministic).
template <class WT, int MR, bool VEC, int KS>
__global__ __launch_bounds__(kNkWarps * 32) void gemv_lowp_nk_kernel(
    const float* __restrict__ A, int64_t lda, int M, int64_t K, const WT* __restrict__ Wt, int64_t ldw, int64_t N,
    const float* __restrict__ S, int64_t lds, int64_t G, int gshift, const float* __restrict__ bias, int epi,
    const float* __restrict__ R, int64_t ldr, float* __restrict__ C, bool prefetch) {
  static_assert(kNkWarps % KS == 0 && MR <= 32, "a block holds whole columns; a lane per x row in the sum");
  constexpr bool kScaled = std::is_same_v<WT, int8_t>;
  constexpr int E = Wide16<WT>::kElems, STEP = 32 * KS;  // STEP: a warp's stride in 16-byte loads
  // the group of k: a shift when G is a power of two (GPT-2's G = 64), not a 64-bit division per load
  const auto group = [=](int64_t k) { return gshift >= 0 ? k >> gshift : k / G; };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, part = warp % KS;
  const int64_t n = (int64_t)blockIdx.x * (kNkWarps / KS) + warp / KS;
  if (prefetch && n < N) {  // launched early (PDL): this warp's share of its W row (and scales) into L2 meanwhile
    const char* wb = reinterpret_cast<const char*>(Wt + n * ldw);
    for (int64_t b = (int64_t)(32 * part + lane) * 128; b < K * (int64_t)sizeof(WT); b += 32 * 128 * KS)
      prefetch_l2(wb + b);
    if (kScaled && part == 0 && lane * 32 < K / G) prefetch_l2(S + n * lds + lane * 32);
  }
  pdl_begin();
  if (KS == 1 && n >= N) return;  // the whole warp leaves together (KS > 1: every warp meets the barrier below)
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;
  if (n < N) {
    const WT* wrow = Wt + n * ldw;
    const float* srow = kScaled ? S + n * lds : nullptr;
    int64_t k_tail = 0;  // where the element loads start
    if constexpr (VEC) {
      const uint4* w = reinterpret_cast<const uint4*>(wrow);
      const int64_t KV = K / E;  // 16-byte loads per row
      int64_t j = lane + 32 * part;
      for (; j + 3 * STEP < KV; j += 4 * STEP) {  // 4 loads of W in flight per lane
        const uint4 u0 = __ldg(w + j), u1 = __ldg(w + j + STEP), u2 = __ldg(w + j + 2 * STEP),
                    u3 = __ldg(w + j + 3 * STEP);
        float s0 = 1.f, s1 = 1.f, s2 = 1.f, s3 = 1.f;
        if constexpr (kScaled) {  // one scale per load: its 16 weights lie in one group
          s0 = __ldg(srow + group(j * E));
          s1 = __ldg(srow + group((j + STEP) * E));
          s2 = __ldg(srow + group((j + 2 * STEP) * E));
          s3 = __ldg(srow + group((j + 3 * STEP) * E));
        }
        nk_chunk<WT, MR>(u0, s0, A, lda, M, j * E, acc);
        nk_chunk<WT, MR>(u1, s1, A, lda, M, (j + STEP) * E, acc);
        nk_chunk<WT, MR>(u2, s2, A, lda, M, (j + 2 * STEP) * E, acc);
        nk_chunk<WT, MR>(u3, s3, A, lda, M, (j + 3 * STEP) * E, acc);
      }
      // the rest, at most 3 loads per lane (j + 3·STEP >= KV here): issued together, not one round trip each
      uint4 u[3];
      float s[3] = {1.f, 1.f, 1.f};
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        if (j + i * STEP < KV) {
          u[i] = __ldg(w + j + i * STEP);
          if constexpr (kScaled) s[i] = __ldg(srow + group((j + i * STEP) * E));
        }
      }
#pragma unroll
      for (int i = 0; i < 3; ++i)
        if (j + i * STEP < KV) nk_chunk<WT, MR>(u[i], s[i], A, lda, M, (j + i * STEP) * E, acc);
      k_tail = KV * E;
    }
    for (int64_t k = k_tail + lane + 32 * part; k < K; k += STEP) {  // the whole row when !VEC, else K % E
      float wk = Widen<WT>::one(wrow + k);
      if constexpr (kScaled) wk *= __ldg(srow + group(k));
#pragma unroll
      for (int r = 0; r < MR; ++r)
        if (r < M) acc[r] = fmaf(A[r * lda + k], wk, acc[r]);
    }
  }
  if constexpr (KS == 1) {
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      if (r < M) {
        const float v = warp_sum(acc[r]);
        if (lane == r) C[r * N + n] = epilogue(v, epi, bias, n, R, ldr, r);
      }
    }
  } else {
    __shared__ float red[kNkWarps][MR];  // each warp's sums, by x row
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      if (r < M) {
        const float v = warp_sum(acc[r]);  // (warp-uniform loop: every lane takes part in the shuffles)
        if (lane == r) red[warp][r] = v;
      }
    }
    __syncthreads();
    if (part == 0 && n < N && lane < M) {  // the column's first warp: lane r sums row r over the parts, in order
      float v = 0.f;
#pragma unroll
      for (int q = 0; q < KS; ++q) v += red[warp + q][lane];
      C[lane * N + n] = epilogue(v, epi, bias, n, R, ldr, lane);
    }
  }
}

template <class WT, int MR, int KS>
void launch_lowp_nk_ks(bool vec, unsigned grid, const float* A, int64_t lda, int M, int64_t K, const WT* Wt,
                       int64_t ldw, int64_t N, const float* S, int64_t lds, int64_t G, int gshift, const float* bias,
                       int epi, const float* R, int64_t ldr, float* C, cudaStream_t stream) {
  if (vec)
    launch(gemv_lowp_nk_kernel<WT, MR, true, KS>, grid, kNkWarps * 32, 0, stream, A, lda, M, K, Wt, ldw, N, S, lds, G,
           gshift, bias, epi, R, ldr, C, pdl_on(stream));
  else
    launch(gemv_lowp_nk_kernel<WT, MR, false, KS>, grid, kNkWarps * 32, 0, stream, A, lda, M, K, Wt, ldw, N, S, lds, G,
           gshift, bias, epi, R, ldr, C, pdl_on(stream));
}

template <class WT, int MR>
void launch_lowp_nk(bool vec, int ks, const float* A, int64_t lda, int M, int64_t K, const void* Wv, int64_t ldw,
                    int64_t N, const float* S, int64_t lds, int64_t G, const float* bias, int epi, const float* R,
                    int64_t ldr, float* C, cudaStream_t stream) {
  const WT* Wt = static_cast<const WT*>(Wv);
  const unsigned grid = blocks_for(N, kNkWarps / ks);
  int gshift = -1;  // log2(G) when G is a power of two
  for (int b = 0; b < 62; ++b)
    if (G == (int64_t(1) << b)) gshift = b;
  if (ks == 4)
    launch_lowp_nk_ks<WT, MR, 4>(vec, grid, A, lda, M, K, Wt, ldw, N, S, lds, G, gshift, bias, epi, R, ldr, C, stream);
  else if (ks == 2)
    launch_lowp_nk_ks<WT, MR, 2>(vec, grid, A, lda, M, K, Wt, ldw, N, S, lds, G, gshift, bias, epi, R, ldr, C, stream);
  else
    launch_lowp_nk_ks<WT, MR, 1>(vec, grid, A, lda, M, K, Wt, ldw, N, S, lds, G, gshift, bias, epi, R, ldr, C, stream);
}

// Warps per column: 1, or 2 / 4 while the columns alone give fewer than ~32 warps per SM (GPT-2's 768…1600 outputs)
// and each warp keeps at least 2 loads per lane of its row.
int lowp_nk_split(int64_t K, int64_t N, int elems, int num_sms) {
  const int64_t loads = K / elems, want = 32 * (int64_t)(num_sms > 0 ? num_sms : 1);
  int ks = 1;
  while (ks < kNkWarps && N * ks < want && loads >= 64 * 2 * ks) ks *= 2;
  return ks;
}

template <class WT>
cudaError_t lowp_nk(const float* A, int64_t lda, int64_t M, int64_t K, const void* Wt, int64_t ldw, int64_t N,
                    const float* S, int64_t lds, int64_t G, const float* bias, int epi, const float* R, int64_t ldr,
                    float* C, int num_sms, cudaStream_t stream) {
  constexpr bool kScaled = std::is_same_v<WT, int8_t>;
  const bool vec = aligned16(Wt) && (ldw * (int64_t)sizeof(WT)) % 16 == 0 && aligned16(A) && lda % 4 == 0 &&
                   (!kScaled || G % 16 == 0);
  const int ks = lowp_nk_split(K, N, Wide16<WT>::kElems, num_sms);
  if (M == 1)
    launch_lowp_nk<WT, 1>(vec, ks, A, lda, 1, K, Wt, ldw, N, S, lds, G, bias, epi, R, ldr, C, stream);
  else if (M <= 8)
    launch_lowp_nk<WT, 8>(vec, ks, A, lda, (int)M, K, Wt, ldw, N, S, lds, G, bias, epi, R, ldr, C, stream);
  else
    launch_lowp_nk<WT, kGemvMaxRows>(vec, ks, A, lda, (int)M, K, Wt, ldw, N, S, lds, G, bias, epi, R, ldr, C, stream);
  return cudaGetLastError();
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
cudaError_t launch_lowp(const float* A, int64_t lda, int64_t M, int64_t K, const void* Wv, int64_t ldw, int64_t N,
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
      return launch_lowp<__half>(A, lda, M, K, W, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, splits, workspace,
                                 num_sms, stream, ch, kv);
    case LowpType::BF16:
      return launch_lowp<__nv_bfloat16>(A, lda, M, K, W, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, splits, workspace,
                                        num_sms, stream, ch, kv);
    case LowpType::I8:
      return launch_lowp<int8_t>(A, lda, M, K, W, ldw, N, scales, lds, group, bias, epi, R, ldr, C, splits, workspace,
                                 num_sms, stream, ch, kv);
  }
  return cudaErrorInvalidValue;
}

cudaError_t matmul_lowp_nk(LowpType t, const float* A, int64_t lda, int64_t M, int64_t K, const void* Wt, int64_t ldw,
                           int64_t N, const float* scales, int64_t lds, int64_t group, const float* bias, int epi,
                           const float* R, int64_t ldr, float* C, int num_sms, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaGetLastError();
  if (M < 0 || M > kGemvMaxRows || K < 1 || N > (int64_t)kNkWarps * 0x7fffffff) return cudaErrorInvalidValue;
  if (t == LowpType::I8 && (scales == nullptr || group < 1 || K % group != 0)) return cudaErrorInvalidValue;
  switch (t) {
    case LowpType::F16:
      return lowp_nk<__half>(A, lda, M, K, Wt, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, num_sms, stream);
    case LowpType::BF16:
      return lowp_nk<__nv_bfloat16>(A, lda, M, K, Wt, ldw, N, nullptr, 0, 1, bias, epi, R, ldr, C, num_sms, stream);
    case LowpType::I8:
      return lowp_nk<int8_t>(A, lda, M, K, Wt, ldw, N, scales, lds, group, bias, epi, R, ldr, C, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gk::cuda
