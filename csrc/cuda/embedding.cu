// embedding.cu — h = wte[id] + wpe[pos] (+ wte[token_type]) on CUDA, summed in HF's order (bitwise torch's).
//
// One block per output row, threads striding over the width (coalesced reads of both table rows). The ids are
// range-checked here, on the device, so an eager call never waits for the GPU: a bad id makes its row NaN (never a
// silent wrong answer, never an out-of-bounds read) and is recorded in host-mapped memory, which the glue turns into
// an IndexError on the next CUDA embedding call or on gpt2kern.ops.check_cuda_errors().
// embedding_step: the same row sum for the decode step, reading each row's position from the decoder's cursor and
// advancing the cursor in the same kernel (one launch per token less).
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

// row `row` of out: wte[ie] + wpe[ip] (+ wte[it] when tt): NaN when an id is out of range
__device__ __forceinline__ void embed_row(int64_t ie, int64_t ip, int64_t it, bool tt, const float* __restrict__ wte,
                                          int64_t vocab, const float* __restrict__ wpe, int64_t n_pos,
                                          float* __restrict__ o, int64_t n, EmbeddingError* err) {
  const bool ok = id_ok(ie, vocab, 0, err) & id_ok(ip, n_pos, 1, err) & (!tt || id_ok(it, vocab, 2, err));
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

__global__ void embedding_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ pos,
                                 const int64_t* __restrict__ tt, const float* __restrict__ wte, int64_t vocab,
                                 const float* __restrict__ wpe, int64_t n_pos, float* __restrict__ out, int64_t n,
                                 EmbeddingError* err) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  embed_row(ids[row], pos[row], tt ? tt[row] : 0, tt != nullptr, wte, vocab, wpe, n_pos, out + row * n, n, err);
}

// The decode step's variant (CudaGraphDecoder kv_write=3): row b's position is cursor[2 + b] + 1, stored back by
// its own block (no other block reads it); block 0 also advances slot and kv_len, which nothing in this kernel reads.
__global__ void embedding_step_kernel(const int64_t* __restrict__ ids, int64_t* __restrict__ cursor,
                                      const float* __restrict__ wte, int64_t vocab, const float* __restrict__ wpe,
                                      int64_t n_pos, float* __restrict__ out, int64_t n, EmbeddingError* err) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  __shared__ int64_t ip;
  if (threadIdx.x == 0) {
    ip = cursor[2 + row] + 1;
    cursor[2 + row] = ip;
    if (row == 0) {
      cursor[0] += 1;
      cursor[1] += 1;
    }
  }
  __syncthreads();
  embed_row(ids[row], ip, 0, false, wte, vocab, wpe, n_pos, out + row * n, n, err);
}

cudaError_t embedding(const int64_t* ids, const int64_t* pos, const int64_t* tt, const float* wte, int64_t vocab,
                      const float* wpe, int64_t n_pos, float* out, int64_t rows, int64_t n, EmbeddingError* err,
                      cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaGetLastError();
  if (err == nullptr) return cudaErrorInvalidValue;
  launch(embedding_kernel, (unsigned)rows, 256, 0, stream, ids, pos, tt, wte, vocab, wpe, n_pos, out, n, err);
  return cudaGetLastError();
}

cudaError_t embedding_step(const int64_t* ids, int64_t* cursor, const float* wte, int64_t vocab, const float* wpe,
                           int64_t n_pos, float* out, int64_t rows, int64_t n, EmbeddingError* err,
                           cudaStream_t stream) {
  if (rows == 0) return cudaGetLastError();
  if (err == nullptr || rows > 0x7fffffff) return cudaErrorInvalidValue;
  launch(embedding_step_kernel, (unsigned)rows, 256, 0, stream, ids, cursor, wte, vocab, wpe, n_pos, out, n, err);
  return cudaGetLastError();
}

}  // namespace gk::cuda
