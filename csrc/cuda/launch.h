// launch.h — the CUDA kernel launchers (csrc/cuda/*.cu), called by the torch glue in ops_cuda.cpp.
//
// Plain C++ on raw device pointers and an explicit stream, so the .cu files never include torch headers (nvcc
// stays fast and the kernels stay readable). Every launcher enqueues its kernel(s) on `stream` and returns
// cudaGetLastError(), which the glue turns into a Python error: no launch goes unchecked. Nothing here
// synchronizes with the host, so every launcher can be captured in a CUDA graph.
// Strides are in elements; every innermost dimension is contiguous.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/attn_args.h"

namespace gk::cuda {

// Programmatic dependent launch (sm_90+; common.cuh): while on, every kernel of this library is launched so that it
// may start while the previous kernel in its stream runs (each waits on the device before touching its inputs).
// Process-wide; CudaGraphDecoder(launch=2) turns it on around its step. set_pdl returns the previous setting.
bool pdl_enabled();
bool set_pdl(bool on);
// The virtual arch (10·major + minor) the kernels running on the current device were compiled for; 0 if unknown.
int kernels_ptx_arch();
// The current device's compute capability major (cached per device); 0 if unknown.
int device_major();

// y[r] = LN(x[r]) for rows r < rows; x rows are ldx apart, y is contiguous [rows, n].
cudaError_t layer_norm(const float* x, int64_t ldx, float* y, const float* w, const float* b, int64_t rows, int64_t n,
                       float eps, cudaStream_t stream);
// s = x + r (contiguous [rows, n]), y = LN(s).
cudaError_t add_layer_norm(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y, const float* w,
                           const float* b, int64_t rows, int64_t n, float eps, cudaStream_t stream);

// y = NewGELU(x) elementwise over n contiguous floats.
cudaError_t gelu_new(const float* x, float* y, int64_t n, cudaStream_t stream);

// out[row] = wte[ids[row]] + wpe[pos[row]] (+ wte[tt[row]]), rows x n. The ids are checked on the device: a row
// with an id out of range is written as NaN (its tables are not read) and the id is recorded in *err, host memory
// mapped into the device, which the glue reads later without a sync (ops_cuda.cpp: check_embedding_errors).
struct EmbeddingError {
  int64_t id[3];    // the bad id seen, per kind: 0 input_ids, 1 position_ids, 2 token_type_ids
  int64_t hi[3];    // the table size it was checked against
  int32_t seen[3];  // 1 when id[kind] holds a bad id (written after id and hi)
};
cudaError_t embedding(const int64_t* ids, const int64_t* pos, const int64_t* tt, const float* wte, int64_t vocab,
                      const float* wpe, int64_t n_pos, float* out, int64_t rows, int64_t n, EmbeddingError* err,
                      cudaStream_t stream);
// The decode step's embedding that also advances the decoder's cursor (CudaGraphDecoder kv_write=3), one token per
// row: cursor is [2 + rows] int64 on the device, [slot, kv_len, pos of each row]. Row b is embedded at position
// pos[b] + 1, which it stores back; slot and kv_len each grow by one. Nothing else reads the cursor during this
// kernel (each block owns its row's position), so the step needs no separate add launch.
cudaError_t embedding_step(const int64_t* ids, int64_t* cursor, const float* wte, int64_t vocab, const float* wpe,
                           int64_t n_pos, float* out, int64_t rows, int64_t n, EmbeddingError* err,
                           cudaStream_t stream);

// Decode GEMV variant 2 (nn.Linear layout): C[m, n] = epi(Σ_k A[m, k]·Wt[n, k] + bias[n]) for m < M <= kGemvMaxRows;
// Wt is [N, K] with row stride ldw. One warp per output column, float4 loads where K, the strides and pointers
// allow; no workspace and no second kernel.
cudaError_t matmul_nk(const float* A, int64_t lda, int64_t M, int64_t K, const float* Wt, int64_t ldw, int64_t N,
                      const float* bias, int epi, const float* R, int64_t ldr, float* C, cudaStream_t stream);

// The decode step's K/V cache write folded into c_attn's GEMV (CudaGraphDecoder kv_write=3): besides C[m, n], the
// final value of a column n in [E, 3E) is stored at slot *slot of row m's cache: n - E = h·D + d → k[m, h, slot, d],
// n - 2E likewise → v. k, v are [B, H, Tmax, D] with strides sb, sh, st (d contiguous); the slot is read on the
// device (capturable); a slot outside [0, Tmax) stores nothing. k == nullptr: no cache store (every other call).
struct KvOut {
  float* k = nullptr;
  float* v = nullptr;
  const int64_t* slot = nullptr;
  int64_t E = 0, D = 1, sb = 0, sh = 0, st = 0, Tmax = 0;
};
// The same store on its own (CudaGraphDecoder kv_write=2, kv_cache.cu): columns [E, 3E) of c_attn's output qkv
// (B rows, ldq apart) into kv's caches, both in one kernel.
cudaError_t kv_write(const float* qkv, int64_t ldq, int64_t B, const KvOut& kv, cudaStream_t stream);

// Conv1D: C[m, n] = epi(Σ_k A[m, k]·W[k, n] + bias[n]) for m < M, n < N.
//   epi: 0 none, 1 gelu_new, 2 + R[m, n].  C is contiguous [M, N]; W is [K, N] with row stride ldw.
// M <= kGemvMaxRows takes the GEMV kernel, larger M the prefill GEMM (`gemm` below). Either splits K over `splits`
// blocks when splits > 1, and then needs `workspace` of splits·M·N floats: gemv_splits() says how many for the GEMV,
// gemm_splits() for the GEMM (1 means no workspace).
constexpr int kGemvMaxRows = 32;
int gemv_splits(int64_t M, int64_t K, int64_t N, int num_sms);
// gemm_variant: the prefill GEMM's numbered variant (see gemm).
cudaError_t matmul(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                   const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, float* workspace,
                   cudaStream_t stream, int gemm_variant = 2);
// Decode GEMV variant 3: matmul's GEMV kernel (the same splits, workspace and summation order: bitwise its result)
// with x staged in shared memory, rows read as float4 broadcasts (for M = 9…32 the x loads, not W, bound the GEMV).
// Variant 4 = variant 3 with `counters` (zeros, one per 32 columns, left zero again): the last block of each
// column group sums the split-K partials itself (same order), so no finish kernel is launched. `kv` also stores
// K/V into a cache, see KvOut.
cudaError_t gemv_staged(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                        const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, float* workspace,
                        cudaStream_t stream, const KvOut& kv = KvOut{}, unsigned* counters = nullptr);
// Sums the [splits, M, N] partials of a split-K matmul in split order (deterministic) and applies the epilogue.
cudaError_t splitk_finish(const float* ws, int splits, int64_t M, int64_t N, const float* bias, int epi, const float* R,
                          int64_t ldr, float* C, cudaStream_t stream, const KvOut& kv = KvOut{});

// The prefill GEMM, the same Conv1D at any M (contiguous C [M, N], W [K, N] with row stride ldw): 128×128 tiles with
// the next K tile prefetched into a second shared buffer, K split over `splits` blocks when splits > 1 (then
// `workspace` of splits·M·N floats, summed in split order by a finish kernel that applies the epilogue).
// gemm_splits() says how many splits fill num_sms SMs (1: no workspace). fp32 FMAs only.
int gemm_splits(int64_t M, int64_t K, int64_t N, int num_sms);
// variant 2 is that kernel, variant 3 the same tiles and split-K on tensor cores at fp32 accuracy (3xTF32:
// gemm_3xtf32 below) where gemm_3xtf32_ok, variant 2 elsewhere; another number is cudaErrorInvalidValue.
cudaError_t gemm(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                 const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, float* workspace,
                 cudaStream_t stream, int variant = 2);

// Prefill GEMM variant 3 (matmul_3xtf32.cu): each fp32 operand split into two TF32 parts, three TF32 MMAs per
// product. Needs an sm_80+ GPU, K, N, lda, ldw multiples of 4 and 16-byte aligned A and W (gemm_3xtf32_ok);
// kchunk: each split's K range (a multiple of 4), the workspace as gemm's.
bool gemm_3xtf32_ok(const float* A, int64_t lda, int64_t K, const float* W, int64_t ldw, int64_t N);
cudaError_t gemm_3xtf32(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                        const float* bias, int epi, const float* R, int64_t ldr, float* C, int splits, int64_t kchunk,
                        float* workspace, cudaStream_t stream);

// The bf16 weight mode's prefill GEMM on tensor cores (matmul_3xbf16.cu; prefill GEMM variant 3 with bf16 weights):
// C = epi(A @ W + b) with W bf16 [K, N], each fp32 activation split into three bf16 parts (three bf16 MMAs per 16
// k's, fp32-level error against the stored weights). No split-K. Needs an sm_80+ GPU, K, lda multiples of 4, N, ldw
// multiples of 8 and 16-byte aligned A and W (gemm_3xbf16_ok).
bool gemm_3xbf16_ok(const float* A, int64_t lda, int64_t K, const void* W, int64_t ldw, int64_t N);
cudaError_t gemm_3xbf16(const float* A, int64_t lda, int64_t M, int64_t K, const void* W, int64_t ldw, int64_t N,
                        const float* bias, int epi, const float* R, int64_t ldr, float* C, cudaStream_t stream);

// The same Conv1D with W [K, N] (row stride ldw) stored in reduced precision (matmul_lowp.cu): fp16, bf16, or int8
// with fp32 scales [K / group, N] (row stride lds): w(k, n) = W[k, n] · scales[k / group, n]. Activations and sums
// fp32. M <= kGemvMaxRows: the GEMV (half2 / bfloat162 / char4 loads widened in registers), split over K when
// splits > 1, with `workspace` of splits·M·N floats (gemv_lowp_splits() says how many); larger M: tiled GEMM
// widening W tiles to fp32 in shared memory. group and scales are ignored for fp16 / bf16.
enum class LowpType : int { F16 = 0, BF16 = 1, I8 = 2 };
int gemv_lowp_splits(LowpType t, int64_t M, int64_t K, int64_t N, int64_t group, int num_sms);
cudaError_t matmul_lowp(LowpType t, const float* A, int64_t lda, int64_t M, int64_t K, const void* W, int64_t ldw,
                        int64_t N, const float* scales, int64_t lds, int64_t group, const float* bias, int epi,
                        const float* R, int64_t ldr, float* C, int splits, float* workspace, int num_sms,
                        cudaStream_t stream, const KvOut& kv = KvOut{});
// Decode GEMV variant 2 over reduced-precision weights (CudaGraphDecoder gemv=2 in the fp16 / bf16 / int8 modes):
// C[m, n] = epi(Σ_k A[m, k]·w(n, k) + bias[n]) for m < M <= kGemvMaxRows, Wt [N, K] (nn.Linear's layout, row stride
// ldw) in fp16 / bf16, or int8 with fp32 scales [N, K / group] (row stride lds): w(n, k) = Wt[n, k]·scales[n, k /
// group]. A warp per output column (2 or 4 when the columns alone cannot fill num_sms SMs), 16-byte (uint4) weight
// loads where the rows of Wt and A are 16-byte aligned (int8: and group % 16 == 0), element loads otherwise; no
// workspace and no second kernel.
cudaError_t matmul_lowp_nk(LowpType t, const float* A, int64_t lda, int64_t M, int64_t K, const void* Wt, int64_t ldw,
                           int64_t N, const float* scales, int64_t lds, int64_t group, const float* bias, int epi,
                           const float* R, int64_t ldr, float* C, int num_sms, cudaStream_t stream);

// Causal softmax attention, the CPU op's semantics (csrc/cpu/kernels/attention.h); out is [B, Tq, H, D].
// (gk::AttnArgs: csrc/common/attn_args.h, shared with the CPU kernels.) One block of 4 warps per (batch, head) and
// query rows, any Tq; a.kv_len (device), when set, bounds the keys.
constexpr int kAttnMaxHeadDim = 128;
cudaError_t attention(const AttnArgs& a, int num_sms, cudaStream_t stream);
// Flash-decoding, the decode step's attention where flash_decoding_ok (one query row, D % 4 == 0, 16-byte aligned
// key rows): the keys of each (batch, head) split over `splits` blocks (flash_decoding_splits), a workspace of
// B·H·splits·(D + 2) floats, the partials merged in split order. a.kv_len (device) bounds the keys.
bool flash_decoding_ok(const AttnArgs& a);
int flash_decoding_splits(const AttnArgs& a, int num_sms);
cudaError_t flash_decoding(const AttnArgs& a, int splits, float* workspace, cudaStream_t stream);
// Prefill attention variant 2 (attention.cu: FlashAttention-2 in fp32), attention's result wherever
// flash_prefill_ok: D = 32 or 64, no additive bias, at least 16 query rows, 16-byte aligned q, k, v and out with
// strides that are multiples of 4. A block per 16·RT query rows of one (batch, head), 64-key K/V tiles in shared
// memory, online softmax, causal tiles past the block's last row skipped. a.kv_len (device), when set, bounds the keys.
bool flash_prefill_ok(const AttnArgs& a);
cudaError_t flash_prefill(const AttnArgs& a, int num_sms, cudaStream_t stream);

}  // namespace gk::cuda
