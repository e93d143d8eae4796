// matmul.cu — Conv1D's y = x @ W + b on CUDA, with the epilogue (gelu_new or + residual) fused before the store.
//
// Reference: C[m, n] = epi(Σ_k A[m, k] · W[k, n] + b[n]), fp32 accumulation. W is HF's Conv1D layout [K, N], row
// stride ldw (pack on CUDA keeps that layout: both kernels below read W rows coalesced).
//  - Prefill (M > kGemvMaxRows): a shared-memory tiled SGEMM, 128×128 tiles double-buffered, K split over blocks
//    (deterministic) when the tiles alone cannot fill the GPU (gemm_splits).
//  - Decode (M <= kGemvMaxRows = 32, i.e. up to batch 32): a GEMV that streams W once at bandwidth. A block owns
//    32 columns (lane = column, each W row read is one 128-byte transaction) and all M rows (accumulators in
//    registers, x read as broadcasts); its 8 warps take interleaved k, 4 W rows in flight each, and sum their
//    partials in shared memory in a fixed order. (A 64-row GEMM tile would leave a 32-row decode batch with a
//    dozen blocks for N = 768.) When N/32 blocks cannot fill the GPU, K is split over
//    gridDim.y blocks writing partials to a workspace that a second kernel sums (in split order: deterministic)
//    and finishes with the epilogue.
// Numbered variants of the decode GEMV (bench/gpu_bench.py times them): 2, W stored [N, K] with a warp per column;
// 3, x staged in shared memory; 4, 3 with the split-K sum done by each column group's last block. Decode kernels can
// also store c_attn's K/V into the decode cache (KvOut, launch.h). The same Conv1D over fp16, bf16 or int8 weights:
// matmul_lowp.cu.
#include "common.cuh"
#include "launch.h"
#include "gemm_tiles.cuh"
#include "matmul_epilogue.cuh"

namespace gk::cuda {

// ---------------------------------------------------------------- prefill: double-buffered 128×128, split-K
// (the 128×128 tile's constants, thread layout and k step: gemm_tiles.cuh, shared with the reduced weight modes)

using tiles::BK2;
using tiles::BM2;
using tiles::BN2;
using tiles::kGemmThreads;
using tiles::kPad2;
using tiles::tile128_fma;
using tiles::tile128_off;

// What: gemm_tiles.cuh's gemm128_tile_kernel scheme (128×128 output tile, K steps of 8, 8×8 outputs per thread
// read as float4 from shared memory) with two shared buffers: each thread issues the global loads of K tile t+1
// into registers before the 512 FMAs of tile t and stores them into the other buffer after them, so the load
// latency hides behind the math and there is one __syncthreads per K tile instead of two. float4 global loads when
// the pointers, strides, K and N allow (VEC), bounds-checked scalar loads otherwise (any shape and row stride).
// Why split-K: at prefill shapes (M = 128…1024 for distilgpt2) 128×128 tiles give 6–144 blocks, fewer than the SMs
// of an H100 for most of the block's GEMMs. Then K is split over gridDim.z blocks (gemm_splits), each writing
// its fp32 partial sum to a workspace [splits, M, N]; splitk_finish_kernel adds the partials in split order (the
// same order every run: deterministic) and applies the epilogue. With one split the epilogue is fused here. It beat
// gemm_tiles.cuh's single-buffered 64×64 / 128×128 tiles (the reduced modes' prefill) at every measured shape.
// fp32 FMAs on CUDA cores only (no TF32): parity with the float64 reference is the contract.
template <bool VEC>
__global__ __launch_bounds__(kGemmThreads,
                             2) void gemm128_db_kernel(const float* __restrict__ A, int64_t lda, int64_t M, int64_t K,
                                                       const float* __restrict__ W, int64_t ldw, int64_t N,
                                                       const float* __restrict__ bias, int epi,
                                                       const float* __restrict__ R, int64_t ldr, float* __restrict__ C,
                                                       int64_t kchunk, float* __restrict__ ws) {
  pdl_begin();
  __shared__ __align__(16) float As[2][BK2][BM2 + kPad2];  // A tiles transposed: As[buf][k][m]
  __shared__ __align__(16) float Ws[2][BK2][BN2 + kPad2];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = (int64_t)blockIdx.y * BM2, n0 = (int64_t)blockIdx.x * BN2;
  const int64_t kb = (int64_t)blockIdx.z * kchunk, ke = kb + kchunk < K ? kb + kchunk : K;  // this split's K range
  // what this thread stages per K tile: A row am, k's ak..ak+3; W row wk, columns wn..wn+3
  const int am = tid / 2, ak = (tid % 2) * 4, wk = tid / 32, wn = (tid % 32) * 4;
  float ra[4], rw[4];
  auto load = [&](int64_t k0) {  // global -> registers; zeros outside [M, N] and outside this split's K range
    const int64_t gm = m0 + am, gk = k0 + ak, gkw = k0 + wk, gn = n0 + wn;
    if constexpr (VEC) {  // K % 4 == 0 and ke is K or a multiple of 8: a float4 is wholly in or out
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f), w = a;
      if (gm < M && gk < ke) a = *reinterpret_cast<const float4*>(A + gm * lda + gk);
      if (gkw < ke && gn < N) w = *reinterpret_cast<const float4*>(W + gkw * ldw + gn);
      ra[0] = a.x, ra[1] = a.y, ra[2] = a.z, ra[3] = a.w;
      rw[0] = w.x, rw[1] = w.y, rw[2] = w.z, rw[3] = w.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        ra[i] = (gm < M && gk + i < ke) ? A[gm * lda + gk + i] : 0.f;
        rw[i] = (gkw < ke && gn + i < N) ? W[gkw * ldw + gn + i] : 0.f;
      }
    }
  };
  auto store = [&](int buf) {  // registers -> shared buffer buf (A transposed; 32 distinct banks per store)
#pragma unroll
    for (int i = 0; i < 4; ++i) As[buf][ak + i][am] = ra[i];
    *reinterpret_cast<float4*>(&Ws[buf][wk][wn]) = make_float4(rw[0], rw[1], rw[2], rw[3]);
  };

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  const int64_t ntiles = ke > kb ? (ke - kb + BK2 - 1) / BK2 : 0;  // an empty split (kb >= K) writes zeros
  if (ntiles > 0) {
    load(kb);
    store(0);
  }
  __syncthreads();
  for (int64_t t = 0; t < ntiles; ++t) {
    const int cur = (int)(t & 1);
    const bool more = t + 1 < ntiles;
    if (more) load(kb + (t + 1) * BK2);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < BK2; ++kk) tile128_fma(As[cur][kk], Ws[cur][kk], tx, ty, acc);
    // the other buffer was last read in step t - 1, which every thread finished before the barrier of step t - 1
    if (more) store(cur ^ 1);
    __syncthreads();
  }
  const bool split = gridDim.z > 1;
  float* part = split ? ws + (int64_t)blockIdx.z * M * N : nullptr;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t m = m0 + tile128_off(ty, i);
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t n = n0 + tile128_off(tx, j);
      if (n >= N) continue;
      if (split)
        part[m * N + n] = acc[i][j];
      else
        C[m * N + n] = epilogue(acc[i][j], epi, bias, n, R, ldr, m);
    }
  }
}

// ---------------------------------------------------------------- decode: GEMV, split-K when N is narrow

constexpr int kGemvWarps = 8;

// Shared by conv1d's GEMV and the staged variants 3 and 4 (a lane per column, 32 columns per block, K split over
// gridDim.y):
// this thread's column and this block's K range [kb, ke).
struct GemvSlice {
  int64_t n, kb, ke;
  bool col_ok;
  const float* wcol;  // column n of W; lanes past N read column N - 1 and discard it
};

__device__ __forceinline__ GemvSlice gemv_slice(const float* W, int64_t K, int64_t N, int splits) {
  GemvSlice g;
  g.n = (int64_t)blockIdx.x * 32 + threadIdx.x % 32;
  g.col_ok = g.n < N;
  g.wcol = W + (g.col_ok ? g.n : N - 1);
  const int64_t kchunk = (K + splits - 1) / splits;
  g.kb = (int64_t)blockIdx.y * kchunk;
  g.ke = g.kb + kchunk < K ? g.kb + kchunk : K;
  return g;
}

// Launched early (PDL): this block's W slab (rows [kb, ke), its 32 columns) into L2 while the previous kernel runs.
__device__ __forceinline__ void gemv_prefetch(const float* W, int64_t ldw, const GemvSlice& g) {
  const float* col0 = W + (int64_t)blockIdx.x * 32;
  for (int64_t k = g.kb + threadIdx.x; k < g.ke; k += blockDim.x) prefetch_l2(col0 + k * ldw);
}

// The warps' partials red[w][r][lane] (shared, MR rows per warp) summed in warp order: row r's result when K is not
// split, else this split's partial in ws[split][r][n].
template <int MR>
__device__ __forceinline__ void gemv_block_out(const float* red, const GemvSlice& g, int M, int splits,
                                               const float* bias, int epi, const float* R, int64_t ldr, float* C,
                                               int64_t N, float* ws, const KvOut& kv) {
  if (!g.col_ok) return;
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < M; r += kGemvWarps) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) s += red[(w * MR + r) * 32 + lane];
    if (splits == 1)
      store_out(C, N, r, g.n, epilogue(s, epi, bias, g.n, R, ldr, r), kv);
    else
      ws[((int64_t)blockIdx.y * M + r) * N + g.n] = s;
  }
}

// Σ over the splits of (r, n)'s partials, in split order (deterministic); L2 loads: other blocks wrote them.
__device__ __forceinline__ float splitk_sum(const float* ws, int splits, int64_t M, int64_t N, int64_t r, int64_t n) {
  float s = 0.f;
  for (int sp = 0; sp < splits; ++sp) s += __ldcg(ws + ((int64_t)sp * M + r) * N + n);
  return s;
}

template <int MR>  // rows held in registers: M <= MR
__global__ __launch_bounds__(kGemvWarps * 32) void gemv_kernel(const float* __restrict__ A, int64_t lda, int M,
                                                               int64_t K, const float* __restrict__ W, int64_t ldw,
                                                               int64_t N, const float* __restrict__ bias, int epi,
                                                               const float* __restrict__ R, int64_t ldr,
                                                               float* __restrict__ C, int splits,
                                                               float* __restrict__ ws, bool prefetch) {
  __shared__ float red[kGemvWarps][MR][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const GemvSlice g = gemv_slice(W, K, N, splits);
  if (prefetch) gemv_prefetch(W, ldw, g);
  pdl_begin();
  const float* wcol = g.wcol;
  const int64_t ke = g.ke;
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;

  constexpr int S = kGemvWarps;
  int64_t k = g.kb + warp;
  for (; k + 3 * S < ke; k += 4 * S) {  // 4 weight rows in flight per warp
    const float w0 = wcol[k * ldw], w1 = wcol[(k + S) * ldw], w2 = wcol[(k + 2 * S) * ldw],
                w3 = wcol[(k + 3 * S) * ldw];
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      if (r < M) {
        const float* a = A + r * lda + k;  // the same address in every lane: a broadcast
        acc[r] = fmaf(a[0], w0, acc[r]);
        acc[r] = fmaf(a[S], w1, acc[r]);
        acc[r] = fmaf(a[2 * S], w2, acc[r]);
        acc[r] = fmaf(a[3 * S], w3, acc[r]);
      }
    }
  }
  for (; k < ke; k += S) {
    const float w0 = wcol[k * ldw];
#pragma unroll
    for (int r = 0; r < MR; ++r)
      if (r < M) acc[r] = fmaf(A[r * lda + k], w0, acc[r]);
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) red[warp][r][lane] = acc[r];
  __syncthreads();
  gemv_block_out<MR>(&red[0][0][0], g, M, splits, bias, epi, R, ldr, C, N, ws, KvOut{});
}

// ---------------------------------------------------------------- decode variants 3, 4: x in shared memory
//
// What: gemv_kernel exactly (a lane per column, warps on interleaved k with 4 W rows in flight, the same split-K,
// the warps' partials summed in the same order: bitwise gemv_kernel's result) except where x comes from. The block
// copies its K range of x into shared memory tile by tile, transposed to xs[k][r] (the MR rows of a k adjacent),
// and reads each k's rows as MR/4 float4 broadcasts.
// Why: gemv_kernel reads x from global memory once per FMA (M = 32: 33 load instructions per W row and warp for 32
// FMAs), so at M = 9…32 the load/store unit, not HBM, bounds it; from shared memory one float4 feeds 4 FMAs.
// One 32 KiB buffer holds the x tile during the k loop and the warps' partials after it.
//
// Variant 4 (counters != nullptr, split K): no finish kernel. Each block takes a ticket from its column group's
// counter after writing its partials; the last of the group's `splits` blocks sums the group's partials in split
// order (the finish kernel's order: still bitwise gemv_kernel) and stores them. atomicInc wraps the counter to 0 at
// the last ticket, so every call leaves it at 0 for the next one (a graph replay) with no reset store. The counters
// must start at 0 (torch.zeros) and belong to one caller that runs its GEMVs one after another (the decoder's
// step): two GEMVs in flight on the same counters would mix their tickets.
constexpr int kStagedFloats = 8192;

template <int MR>
__global__ __launch_bounds__(kGemvWarps * 32) void gemv_staged_kernel(
    const float* __restrict__ A, int64_t lda, int M, int64_t K, const float* __restrict__ W, int64_t ldw, int64_t N,
    const float* __restrict__ bias, int epi, const float* __restrict__ R, int64_t ldr, float* __restrict__ C,
    int splits, float* __restrict__ ws, KvOut kv, unsigned* __restrict__ counters, bool prefetch) {
  static_assert(MR % 4 == 0 && kGemvWarps * MR * 32 <= kStagedFloats, "the partials must fit the buffer");
  constexpr int KT = kStagedFloats / MR, G = MR / 4, S = kGemvWarps;  // KT: k's per x tile (256 at MR = 32)
  static_assert(KT % S == 0, "tiles must keep each warp's k sequence");
  __shared__ __align__(16) float buf[kStagedFloats];
  const float4* xs = reinterpret_cast<const float4*>(buf);  // xs[kk * G + g] = rows 4g..4g+3 of tile k kk
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const GemvSlice sl = gemv_slice(W, K, N, splits);
  if (prefetch) gemv_prefetch(W, ldw, sl);
  pdl_begin();
  const float* wcol = sl.wcol;
  const int64_t kb = sl.kb, ke = sl.ke;
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;

  for (int64_t k0 = kb; k0 < ke; k0 += KT) {
    const int kt = (int)(ke - k0 < KT ? ke - k0 : KT);
    __syncthreads();                                                // every warp is done with the previous tile
    for (int i = threadIdx.x; i < kt * MR; i += kGemvWarps * 32) {  // consecutive threads, consecutive words
      const int kk = i / MR, r = i % MR;
      buf[i] = r < M ? A[r * lda + k0 + kk] : 0.f;  // (rows past M: zeros, read and discarded)
    }
    __syncthreads();
    int kk = warp;
    for (; kk + 3 * S < kt; kk += 4 * S) {  // 4 weight rows in flight per warp, as in gemv_kernel
      const int64_t k = k0 + kk;
      const float w0 = wcol[k * ldw], w1 = wcol[(k + S) * ldw], w2 = wcol[(k + 2 * S) * ldw],
                  w3 = wcol[(k + 3 * S) * ldw];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (4 * g < M) {
          const float4 a0 = xs[kk * G + g], a1 = xs[(kk + S) * G + g], a2 = xs[(kk + 2 * S) * G + g],
                       a3 = xs[(kk + 3 * S) * G + g];  // the same address in every lane: broadcasts
          const float r0[4] = {a0.x, a0.y, a0.z, a0.w}, r1[4] = {a1.x, a1.y, a1.z, a1.w},
                      r2[4] = {a2.x, a2.y, a2.z, a2.w}, r3[4] = {a3.x, a3.y, a3.z, a3.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // gemv_kernel's order per row: k, k + S, k + 2S, k + 3S
            float& c = acc[4 * g + j];
            c = fmaf(r0[j], w0, c);
            c = fmaf(r1[j], w1, c);
            c = fmaf(r2[j], w2, c);
            c = fmaf(r3[j], w3, c);
          }
        }
      }
    }
    for (; kk < kt; kk += S) {
      const float w0 = wcol[(k0 + kk) * ldw];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (4 * g < M) {
          const float4 a = xs[kk * G + g];
          acc[4 * g] = fmaf(a.x, w0, acc[4 * g]);
          acc[4 * g + 1] = fmaf(a.y, w0, acc[4 * g + 1]);
          acc[4 * g + 2] = fmaf(a.z, w0, acc[4 * g + 2]);
          acc[4 * g + 3] = fmaf(a.w, w0, acc[4 * g + 3]);
        }
      }
    }
  }
  __syncthreads();  // the last tile is dead: the buffer takes the partials, red[warp][r][lane]
#pragma unroll
  for (int r = 0; r < MR; ++r) buf[(warp * MR + r) * 32 + lane] = acc[r];
  __syncthreads();
  gemv_block_out<MR>(buf, sl, M, splits, bias, epi, R, ldr, C, N, ws, kv);
  if (splits == 1 || counters == nullptr) return;  // (variant 3: splitk_finish_kernel sums the partials)
  __shared__ bool last;
  __threadfence();  // this block's partials reach L2 before its ticket
  __syncthreads();
  if (threadIdx.x == 0) last = atomicInc(&counters[blockIdx.x], (unsigned)(splits - 1)) == (unsigned)(splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();  // the group's other partials, published before their tickets, are read after ours
  const int64_t nb = (int64_t)blockIdx.x * 32;
  for (int idx = threadIdx.x; idx < M * 32; idx += kGemvWarps * 32) {
    const int r = idx / 32;
    const int64_t nn = nb + idx % 32;
    if (nn < N) store_out(C, N, r, nn, epilogue(splitk_sum(ws, splits, M, N, r, nn), epi, bias, nn, R, ldr, r), kv);
  }
}

__global__ void splitk_finish_kernel(const float* __restrict__ ws, int splits, int M, int64_t N,
                                     const float* __restrict__ bias, int epi, const float* __restrict__ R, int64_t ldr,
                                     float* __restrict__ C, KvOut kv) {
  pdl_begin();
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (int64_t)M * N) return;
  const int64_t r = idx / N, n = idx % N;
  store_out(C, N, r, n, epilogue(splitk_sum(ws, splits, M, N, r, n), epi, bias, n, R, ldr, r), kv);
}

cudaError_t splitk_finish(const float* ws, int splits, int64_t M, int64_t N, const float* bias, int epi, const float* R,
                          int64_t ldr, float* C, cudaStream_t stream, const KvOut& kv) {
  launch(splitk_finish_kernel, blocks_for(M * N, 256), 256, 0, stream, ws, splits, (int)M, N, bias, epi, R, ldr, C, kv);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- decode variant 2: W stored [N, K]
//
// One warp per output column n: its lanes stream W's row n (contiguous, float4 when VEC) and every x row (L1/L2
// resident at decode sizes), 4 loads of W in flight per lane, then a warp sum per x row and the epilogue at once:
// no split-K, no workspace, no finish kernel. 8 warps (columns) per block.
constexpr int kNkWarps = 8;

template <int MR, bool VEC>
__global__ __launch_bounds__(kNkWarps * 32) void gemv_nk_kernel(const float* __restrict__ A, int64_t lda, int M,
                                                                int64_t K, const float* __restrict__ Wt, int64_t ldw,
                                                                int64_t N, const float* __restrict__ bias, int epi,
                                                                const float* __restrict__ R, int64_t ldr,
                                                                float* __restrict__ C, bool prefetch) {
  const int lane = threadIdx.x % 32;
  const int64_t n = (int64_t)blockIdx.x * kNkWarps + threadIdx.x / 32;
  if (prefetch && n < N)  // launched early (PDL): this warp's W row into L2 while the previous kernel runs
    for (int64_t k = lane * 32; k < K; k += 32 * 32) prefetch_l2(Wt + n * ldw + k);
  pdl_begin();
  if (n >= N) return;  // the whole warp leaves together
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;
  if constexpr (VEC) {
    const float4* w = reinterpret_cast<const float4*>(Wt + n * ldw);
    const int64_t K4 = K / 4;
    int64_t k = lane;
    for (; k + 96 < K4; k += 128) {  // 4 float4 of W in flight per lane
      const float4 w0 = __ldg(w + k), w1 = __ldg(w + k + 32), w2 = __ldg(w + k + 64), w3 = __ldg(w + k + 96);
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (r < M) {
          const float4* a = reinterpret_cast<const float4*>(A + r * lda) + k;
          acc[r] += hsum(a[0] * w0) + hsum(a[32] * w1) + hsum(a[64] * w2) + hsum(a[96] * w3);
        }
      }
    }
    for (; k < K4; k += 32) {
      const float4 w0 = __ldg(w + k);
#pragma unroll
      for (int r = 0; r < MR; ++r)
        if (r < M) acc[r] += hsum(reinterpret_cast<const float4*>(A + r * lda)[k] * w0);
    }
  } else {
    const float* w = Wt + n * ldw;
    for (int64_t k = lane; k < K; k += 32) {
      const float w0 = __ldg(w + k);
#pragma unroll
      for (int r = 0; r < MR; ++r)
        if (r < M) acc[r] = fmaf(A[r * lda + k], w0, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    if (r < M) {
      const float s = warp_sum(acc[r]);
      if (lane == r % 32) C[r * N + n] = epilogue(s, epi, bias, n, R, ldr, r);
    }
  }
}

template <int MR>
static void launch_nk(bool vec, const float* A, int64_t lda, int M, int64_t K, const float* Wt, int64_t ldw, int64_t N,
                      const float* bias, int epi, const float* R, int64_t ldr, float* C, cudaStream_t stream) {
  const unsigned grid = blocks_for(N, kNkWarps);
  if (vec)
    launch(gemv_nk_kernel<MR, true>, grid, kNkWarps * 32, 0, stream, A, lda, M, K, Wt, ldw, N, bias, epi, R, ldr, C,
           pdl_on(stream));
  else
    launch(gemv_nk_kernel<MR, false>, grid, kNkWarps * 32, 0, stream, A, lda, M, K, Wt, ldw, N, bias, epi, R, ldr, C,
           pdl_on(stream));
}

cudaError_t matmul_nk(const float* A, int64_t lda, int64_t M, int64_t K, const float* Wt, int64_t ldw, int64_t N,
                      const float* bias, int epi, const float* R, int64_t ldr, float* C, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaGetLastError();
  if (M > kGemvMaxRows || N > (int64_t)kNkWarps * 0x7fffffff) return cudaErrorInvalidValue;
  const bool vec = K % 4 == 0 && lda % 4 == 0 && ldw % 4 == 0 && aligned16(A) && aligned16(Wt);
  if (M == 1)
    launch_nk<1>(vec, A, lda, 1, K, Wt, ldw, N, bias, epi, R, ldr, C, stream);
  else if (M <= 8)
    launch_nk<8>(vec, A, lda, (int)M, K, Wt, ldw, N, bias, epi, R, ldr, C, stream);
  else
    launch_nk<kGemvMaxRows>(vec, A, lda, (int)M, K, Wt, ldw, N, bias, epi, R, ldr, C, stream);
  return cudaGetLastError();
}

int gemv_splits(int64_t M, int64_t K, int64_t N, int num_sms) {
  if (M > kGemvMaxRows) return 1;
  const int64_t blocks = (N + 31) / 32, want = 2 * (int64_t)num_sms;
  int64_t s = (want + blocks - 1) / blocks;
  const int64_t max_by_k = K / 128 > 1 ? K / 128 : 1;  // at least 128 rows of W per block
  if (s > max_by_k) s = max_by_k;
  if (s > 32) s = 32;
  return s < 1 ? 1 : (int)s;
}

static bool gemv_args_ok(int64_t M, int64_t N, int splits, const float* workspace) {
  return M <= kGemvMaxRows && splits >= 1 && splits <= 65535 && (splits == 1 || workspace != nullptr) &&
         (N + 31) / 32 <= 0x7fffffff;
}

cudaError_t matmul(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                   const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, float* workspace,
                   cudaStream_t stream, int gemm_variant) {
  if (M == 0 || N == 0) return cudaGetLastError();
  if (M <= kGemvMaxRows) {
    if (!gemv_args_ok(M, N, splits, workspace)) return cudaErrorInvalidValue;
    dim3 grid((unsigned)((N + 31) / 32), (unsigned)splits);
    if (M <= 8)
      launch(gemv_kernel<8>, grid, kGemvWarps * 32, 0, stream, A, lda, (int)M, K, W, ldw, N, bias, epi, R, ldr, C,
             splits, workspace, pdl_on(stream));
    else
      launch(gemv_kernel<kGemvMaxRows>, grid, kGemvWarps * 32, 0, stream, A, lda, (int)M, K, W, ldw, N, bias, epi, R,
             ldr, C, splits, workspace, pdl_on(stream));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    return splitk_finish(workspace, splits, M, N, bias, epi, R, ldr, C, stream);
  }
  return gemm(A, lda, M, K, W, ldw, N, bias, epi, R, ldr, C, splits, workspace, stream, gemm_variant);
}

cudaError_t gemv_staged(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                        const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, float* workspace,
                        cudaStream_t stream, const KvOut& kv, unsigned* counters) {
  if (M == 0 || N == 0) return cudaGetLastError();
  if (!gemv_args_ok(M, N, splits, workspace)) return cudaErrorInvalidValue;
  dim3 grid((unsigned)((N + 31) / 32), (unsigned)splits);
  if (M <= 8)
    launch(gemv_staged_kernel<8>, grid, kGemvWarps * 32, 0, stream, A, lda, (int)M, K, W, ldw, N, bias, epi, R, ldr, C,
           splits, workspace, kv, counters, pdl_on(stream));
  else
    launch(gemv_staged_kernel<kGemvMaxRows>, grid, kGemvWarps * 32, 0, stream, A, lda, (int)M, K, W, ldw, N, bias, epi,
           R, ldr, C, splits, workspace, kv, counters, pdl_on(stream));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1 || counters != nullptr) return err;
  return splitk_finish(workspace, splits, M, N, bias, epi, R, ldr, C, stream, kv);
}

// ---------------------------------------------------------------- prefill GEMM: launcher

static int64_t gemm_kchunk(int64_t K, int splits) {  // each split's K range, a whole number of K tiles
  const int64_t c = (K + splits - 1) / splits;
  return (c + BK2 - 1) / BK2 * BK2;
}

int gemm_splits(int64_t M, int64_t K, int64_t N, int num_sms) {
  const int64_t tiles = ((N + BN2 - 1) / BN2) * ((M + BM2 - 1) / BM2);
  if (tiles <= 0 || tiles >= num_sms) return 1;
  int64_t s = (num_sms + tiles - 1) / tiles;           // about one wave of blocks
  const int64_t max_by_k = K / 128 > 1 ? K / 128 : 1;  // at least 16 K tiles per split
  if (s > max_by_k) s = max_by_k;
  if (s > 16) s = 16;
  if (s <= 1) return 1;
  const int64_t c = gemm_kchunk(K, (int)s);
  return (int)((K + c - 1) / c);  // no split left empty after rounding the chunk up
}

cudaError_t gemm(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                 const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, float* workspace,
                 cudaStream_t stream, int variant) {
  if (variant != 2 && variant != 3) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaGetLastError();
  const int64_t gx = (N + BN2 - 1) / BN2, gy = (M + BM2 - 1) / BM2;
  if (splits < 1 || splits > 65535 || gx > 0x7fffffff || gy > 65535 || K < 1 ||
      (splits > 1 && (workspace == nullptr || M > 0x7fffffff)))
    return cudaErrorInvalidValue;
  const int64_t kchunk = gemm_kchunk(K, splits);
  const bool vec = K % 4 == 0 && N % 4 == 0 && lda % 4 == 0 && ldw % 4 == 0 && aligned16(A) && aligned16(W);
  const dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)splits);
  cudaError_t err;
  if (variant == 3 && gemm_3xtf32_ok(A, lda, K, W, ldw, N)) {
    err = gemm_3xtf32(A, lda, M, K, W, ldw, N, bias, epi, R, ldr, C, splits, kchunk, workspace, stream);
    if (err != cudaSuccess || splits == 1) return err;
    return splitk_finish(workspace, splits, M, N, bias, epi, R, ldr, C, stream);
  }
  if (vec)
    launch(gemm128_db_kernel<true>, grid, kGemmThreads, 0, stream, A, lda, M, K, W, ldw, N, bias, epi, R, ldr, C,
           kchunk, workspace);
  else
    launch(gemm128_db_kernel<false>, grid, kGemmThreads, 0, stream, A, lda, M, K, W, ldw, N, bias, epi, R, ldr, C,
           kchunk, workspace);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  return splitk_finish(workspace, splits, M, N, bias, epi, R, ldr, C, stream);
}

}  // namespace gk::cuda
