// embedding.cu — h = wte[id] + wpe[pos] (+ wte[token_type]) on CUDA, summed in HF's order (bitwise torch's).
//
// One block per output row, threads striding over the width (coalesced reads of both table rows). The ids are
// range-checked here, on the device, so an eager call never waits for the GPU: a bad id makes its row NaN (never a
// silent wrong answer, never an out-of-bounds read) and is recorded in host-mapped memory, which the glue turns into
// an IndexError on the next CUDA embedding call or on gpt2kern.ops.check_cuda_errors().
#include <cmath>

#include "common.cuh"
#include "launch.h"

namespace gk::cuda {

__device__ __forceinline__ bool id_ok(int64_t i, int64_t hi, int kind, EmbeddingError* err) {
  if (i >= 0 && i < hi) return true;
  if (threadIdx.x == 0) {  // plain stores: several bad rows may race, each word stays one writer's
    err->id[kind] = i;
    err->hi[kind] = hi;
    __threadfence_system();  // id and hi reach the host before the flag
    err->seen[kind] = 1;
  }
  return false;
}

__global__ void embedding_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ pos,
                                 const int64_t* __restrict__ tt, const float* __restrict__ wte, int64_t vocab,
                                 const float* __restrict__ wpe, int64_t n_pos, float* __restrict__ out, int64_t n,
                                 EmbeddingError* err) {
  const int64_t row = blockIdx.x;
  float* o = out + row * n;
  const int64_t ie = ids[row], ip = pos[row], it = tt ? tt[row] : 0;
  const bool ok = id_ok(ie, vocab, 0, err) & id_ok(ip, n_pos, 1, err) & (tt == nullptr || id_ok(it, vocab, 2, err));
  if (!ok) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] = NAN;
    return;
  }
  const float* e = wte + ie * n;
  const float* p = wpe + ip * n;
  if (tt) {
    const float* t = wte + it * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] = (e[j] + p[j]) + t[j];
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] = e[j] + p[j];
  }
}

cudaError_t embedding(const int64_t* ids, const int64_t* pos, const int64_t* tt, const float* wte, int64_t vocab,
                      const float* wpe, int64_t n_pos, float* out, int64_t rows, int64_t n, EmbeddingError* err,
                      cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaGetLastError();
  if (err == nullptr) return cudaErrorInvalidValue;
  embedding_kernel<<<(unsigned)rows, 256, 0, stream>>>(ids, pos, tt, wte, vocab, wpe, n_pos, out, n, err);
  return cudaGetLastError();
}

}  // namespace gk::cuda
