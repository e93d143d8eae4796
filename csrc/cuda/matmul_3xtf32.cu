// matmul_3xtf32.cu — prefill GEMM variant 3: Conv1D's C = epi(A @ W + b) on tensor cores at fp32 accuracy.
//
// Each fp32 operand x is split into a TF32 "big" part and a TF32 "small" remainder, x = big + small (+ ~2^-22·|x|),
// and a·w is summed as small_a·big_w + big_a·small_w + big_a·big_w: three TF32 MMAs per product (CUTLASS's
// "3xTF32"), the dropped small·small term and the remainders' rounding ~2^-21 relative — fp32-level error from
// units with several times the fp32 FMA throughput. What variant 2 (matmul.cu, fp32 FMAs) does differently: the
// products run on mma.sync.m16n8k8 (TF32 in, fp32 accumulate), and the tiles are fed by cp.async in 3 stages.
//  - 128×128 output tile per block of 8 warps (2 along M × 4 along N, each warp 64×32 = 4×4 MMA tiles of 16×8),
//    K in steps of 16; A and W tiles copied global -> shared by cp.async (16 bytes, zero-filled outside the
//    matrix), three stages in flight; shared rows padded so every fragment read is conflict-free.
//  - the same split-K as variant 2 (gemm_splits, gemm_kchunk, splitk_finish: the partials summed in split order)
//    and the same fused epilogue; the float4 path's conditions (K, N, strides % 4, 16-byte aligned A and W) are
//    required: gemm() runs variant 2 where they do not hold.
#include "common.cuh"
#include "launch.h"
#include "matmul_epilogue.cuh"
#include "mma_tiles.cuh"

namespace gk::cuda {

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 16, kThreads = 256;
using mma_tiles::kStages;
constexpr int kPadA = 4;  // A row stride 20 floats: lanes (g, t) read g·20 + t, 32 distinct banks
constexpr int kPadW = 8;  // W row stride 136 floats: lanes read t·136 + g, 32 distinct banks
constexpr int kAStage = kBM * (kBK + kPadA), kWStage = kBK * (kBN + kPadW);
constexpr int kSmemBytes = kStages * (kAStage + kWStage) * (int)sizeof(float);

// x = big + small, both TF32 (fp32 bit patterns with the low 13 mantissa bits zero), round to nearest
__device__ __forceinline__ void split_tf32(float x, unsigned& big, unsigned& small) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(big) : "f"(x));
  big &= 0xffffe000u;  // the low 13 bits are unspecified for a TF32 operand: make big exactly its TF32 value
  const float b = __uint_as_float(big);
  // ±inf (or a finite x that rounds to it): no remainder, so big alone carries it (inf - inf would be NaN)
  const float rest = isfinite(b) ? x - b : 0.f;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(small) : "f"(rest));
  small &= 0xffffe000u;
}

// d += a·b for one 16×8 tile over 8 k: a row-major 16×8 (4 registers), b column-major 8×8 (2 registers)
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__global__ __launch_bounds__(kThreads, 2) void gemm_3xtf32_kernel(const float* __restrict__ A, int64_t lda, int64_t M,
                                                                  int64_t K, const float* __restrict__ W, int64_t ldw,
                                                                  int64_t N, const float* __restrict__ bias, int epi,
                                                                  const float* __restrict__ R, int64_t ldr,
                                                                  float* __restrict__ C, int64_t kchunk,
                                                                  float* __restrict__ ws) {
  pdl_begin();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no TF32 MMA before sm_80: the launcher never runs this kernel there
#else
  extern __shared__ __align__(16) float smem[];
  float* As = smem;                      // [stage][m][k], row stride kBK + kPadA
  float* Ws = smem + kStages * kAStage;  // [stage][k][n], row stride kBN + kPadW
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;                  // the MMA fragments' group and thread-in-group
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // this warp's 64×32 corner of the tile
  const int64_t m0 = (int64_t)blockIdx.y * kBM, n0 = (int64_t)blockIdx.x * kBN;
  const int64_t kb = (int64_t)blockIdx.z * kchunk, ke = kb + kchunk < K ? kb + kchunk : K;  // this split's K range
  const int64_t ntiles = ke > kb ? (ke - kb + kBK - 1) / kBK : 0;  // an empty split (kb >= K) writes zeros

  // tile `tile` into stage `st`: 512 float4 of A (row i / 4, k (i % 4)·4) and 512 of W (k i / 32, column
  // (i % 32)·4), two of each per thread; K % 4 == 0 and kchunk % 4 == 0, so a float4 is wholly in or out
  auto load = [&](int64_t tile, int st) {
    const int64_t k0 = kb + tile * kBK;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = tid + r * kThreads;
      const int am = i / 4, ak = (i % 4) * 4, wk = i / 32, wc = (i % 32) * 4;
      const bool ain = m0 + am < M && k0 + ak < ke, win = k0 + wk < ke && n0 + wc < N;
      cp_async16(As + st * kAStage + am * (kBK + kPadA) + ak, ain ? A + (m0 + am) * lda + k0 + ak : A, ain);
      cp_async16(Ws + st * kWStage + wk * (kBN + kPadW) + wc, win ? W + (k0 + wk) * ldw + n0 + wc : W, win);
    }
  };

  mma_tiles::Acc acc;
  mma_tiles::zero(acc);
  mma_tiles::pipeline(ntiles, load, [&](int st) {
    const float* as = As + st * kAStage + wm * (kBK + kPadA);
    const float* wsm = Ws + st * kWStage + wn;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 8) {
      unsigned wb[4][2], wsml[4][2];  // the 4 n tiles' W fragments, big and small
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        split_tf32(wsm[(kk + t) * (kBN + kPadW) + j * 8 + g], wb[j][0], wsml[j][0]);
        split_tf32(wsm[(kk + t + 4) * (kBN + kPadW) + j * 8 + g], wb[j][1], wsml[j][1]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float* a = as + (i * 16 + g) * (kBK + kPadA) + kk + t;
        unsigned ab[4], asml[4];
        split_tf32(a[0], ab[0], asml[0]);                      // (row g, k t)
        split_tf32(a[8 * (kBK + kPadA)], ab[1], asml[1]);      // (row g + 8, k t)
        split_tf32(a[4], ab[2], asml[2]);                      // (row g, k t + 4)
        split_tf32(a[8 * (kBK + kPadA) + 4], ab[3], asml[3]);  // (row g + 8, k t + 4)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // these 8 k's three MMAs into a zeroed fragment, then one fp32 add: the tensor cores' accumulation (which
          // may round toward zero) errs relative to this partial sum, not to the running total
          float part8[4] = {0.f, 0.f, 0.f, 0.f};
          mma_tf32(part8, asml, wb[j]);  // the small terms first: they are below the big one's rounding
          mma_tf32(part8, ab, wsml[j]);
          mma_tf32(part8, ab, wb[j]);
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] += part8[r];
        }
      }
    }
  });

  const bool split = gridDim.z > 1;
  float* part = split ? ws + (int64_t)blockIdx.z * M * N : nullptr;
  mma_tiles::store(acc, m0 + wm, n0 + wn, g, t, M, N, [&](int64_t m, int64_t n, float v) {
    if (split)
      part[m * N + n] = v;
    else
      C[m * N + n] = epilogue(v, epi, bias, n, R, ldr, m);
  });
#endif
}

}  // namespace

bool gemm_3xtf32_ok(const float* A, int64_t lda, int64_t K, const float* W, int64_t ldw, int64_t N) {
  if (device_major() < 8) return false;
  return K % 4 == 0 && N % 4 == 0 && lda % 4 == 0 && ldw % 4 == 0 && aligned16(A) && aligned16(W);
}

cudaError_t gemm_3xtf32(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                        const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, int64_t kchunk,
                        float* workspace, cudaStream_t stream) {
  if (!gemm_3xtf32_ok(A, lda, K, W, ldw, N) || kchunk % 4 != 0) return cudaErrorInvalidValue;
  // more than the 48 KB of static shared memory: opt in (per device and kernel; cheap, and legal under capture)
  cudaError_t err = cudaFuncSetAttribute(gemm_3xtf32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)((N + kBN - 1) / kBN), (unsigned)((M + kBM - 1) / kBM), (unsigned)splits);
  launch(gemm_3xtf32_kernel, grid, kThreads, kSmemBytes, stream, A, lda, M, K, W, ldw, N, bias, epi, R, ldr, C, kchunk,
         workspace);
  return cudaGetLastError();
}

}  // namespace gk::cuda
