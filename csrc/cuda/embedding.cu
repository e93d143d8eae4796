// embedding.cu — h = wte[id] + wpe[pos] (+ wte[token_type]) on CUDA, summed in HF's order (bitwise torch's).
//
// One block per output row, threads striding over the width (coalesced reads of both table rows). Ids are
// range-checked by the glue before the launch (IndexError naming the id) unless a CUDA graph is being captured,
// where a host check cannot run; the kernel clamps ids into the tables so a bad id can never read out of bounds.
#include "common.cuh"
#include "launch.h"

namespace gk::cuda {

__device__ __forceinline__ int64_t clamp_id(int64_t i, int64_t hi) { return i < 0 ? 0 : (i >= hi ? hi - 1 : i); }

__global__ void embedding_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ pos,
                                 const int64_t* __restrict__ tt, const float* __restrict__ wte, int64_t vocab,
                                 const float* __restrict__ wpe, int64_t n_pos, float* __restrict__ out, int64_t n) {
  const int64_t row = blockIdx.x;
  const float* e = wte + clamp_id(ids[row], vocab) * n;
  const float* p = wpe + clamp_id(pos[row], n_pos) * n;
  float* o = out + row * n;
  if (tt) {
    const float* t = wte + clamp_id(tt[row], vocab) * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] = (e[j] + p[j]) + t[j];
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] = e[j] + p[j];
  }
}

cudaError_t embedding(const int64_t* ids, const int64_t* pos, const int64_t* tt, const float* wte, int64_t vocab,
                      const float* wpe, int64_t n_pos, float* out, int64_t rows, int64_t n, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaGetLastError();
  embedding_kernel<<<(unsigned)rows, 256, 0, stream>>>(ids, pos, tt, wte, vocab, wpe, n_pos, out, n);
  return cudaGetLastError();
}

}  // namespace gk::cuda
