// mma_tiles.cuh — what the tensor-core prefill GEMMs (matmul_3xtf32.cu, matmul_3xbf16.cu) share: the 3-stage
// cp.async pipeline over K tiles, and a warp's 64×32 accumulator (4×4 MMA tiles of 16×8) with its store.
#pragma once
#include <cstdint>

#include "common.cuh"

namespace gk::cuda::mma_tiles {

constexpr int kStages = 3;

// load(tile, stage) issues a K tile's cp.async copies into shared stage `stage`; compute(stage) reads a landed one.
// A group per stage, empty past the last tile, so the wait counts hold; the barrier after each wait also says that
// every thread finished reading the stage the next load overwrites (the one computed in the previous iteration).
// Ends with no copy still in flight (none may target shared memory when the block exits).
template <class Load, class Compute>
__device__ __forceinline__ void pipeline(int64_t ntiles, Load&& load, Compute&& compute) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load(s, s);
    cp_async_commit();
  }
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `tile` landed ...
    __syncthreads();               // ... everyone's too, and everyone finished reading tile - 1's stage
    if (tile + kStages - 1 < ntiles) load(tile + kStages - 1, (int)((tile + kStages - 1) % kStages));
    cp_async_commit();
    compute((int)(tile % kStages));
  }
  cp_async_wait<0>();
}

using Acc = float[4][4][4];  // [m tile][n tile][fragment]

__device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
}

// out(m, n, value) for each of the warp's outputs inside [M, N]; (m0, n0): the warp's corner, g and t the MMA
// fragments' group and thread-in-group. Fragment r of tile (i, j): row g (+ 8 for r >= 2), column 2t + (r & 1).
template <class Out>
__device__ __forceinline__ void store(const Acc& acc, int64_t m0, int64_t n0, int g, int t, int64_t M, int64_t N,
                                      Out&& out) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t m = m0 + i * 16 + g + (r >= 2 ? 8 : 0), n = n0 + j * 8 + 2 * t + (r & 1);
        if (m < M && n < N) out(m, n, acc[i][j][r]);
      }
}

}  // namespace gk::cuda::mma_tiles
