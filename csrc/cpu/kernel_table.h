// kernel_table.h — the per-ISA kernel entry points, as plain function pointers.
//
// isa_avx512.cpp, isa_avx2.cpp and isa_generic.cpp each fill one table from the same kernel sources
// (csrc/cpu/kernels/*.h) compiled for their ISA; dispatch.cpp picks one table at load time. The torch glue
// (layernorm.cpp, matmul.cpp, ...) checks arguments, splits work with at::parallel_for and calls a table
// entry per chunk, so no vector type ever crosses this boundary.
#pragma once
#include <cstdint>

#include "../common/attn_args.h"

namespace gk {

// Fused epilogues of the Conv1D matmul, applied in registers before the store.
enum class Epilogue : int { None = 0, GeluNew = 1, Residual = 2 };

// Which K block of a split reduction a matmul_panel call computes (see kernels/matmul.h); a whole K is both.
constexpr int kKFirst = 1, kKLast = 2, kKWhole = kKFirst | kKLast;

// The packed weight layout every ISA shares: [ceil(N / kPanel)][K][kPanel], columns past N zero-filled.
constexpr int kPanel = 32;

// How a matmul weight is stored (the one weight format: gpt2kern/weights.py's WeightFormat, read by
// cpu/matmul.cpp's weight_ref):
//   Panels  [ceil(N / 32)][K][32] in any WType, made by optimize() (int8: + fp32 scales [ceil(N/32)][K / G][32],
//           one per group of G consecutive k and output column)
//   KN      HF Conv1D's own [K, N] fp32 weight, read in place
//   NK      an nn.Linear / tied-embedding [N, K] fp32 weight (the lm_head over wte), read in place
enum class Layout : int { Panels = 0, KN = 1, NK = 2 };
// Stored element type of a weight; activations and accumulation stay fp32 in every mode.
enum class WType : int { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 };

// Up to this many rows (decode), weights that are not fp32 panels are read straight from their storage, once per
// tile of rows: reduced-precision panels widened in registers, wte's [N, K] rows as dot products. More rows
// (prefill) convert each K block once into an fp32 (or bf16-pair) buffer and run the FMA-bound kernels over it.
constexpr int64_t kDecodeRows = 16;

// Attention tiling: keys per block (one AVX-512 vector of scores), query rows per task.
constexpr int kAttnKeyBlock = 32;
constexpr int kAttnQueryBlock = 32;

struct KernelTable {
  const char* name;
  // rows [0, rows) of x (row stride ld) -> y (row stride ld_y); y may alias nothing
  void (*layer_norm_rows)(const float* x, int64_t ldx, float* y, int64_t ldy, const float* w, const float* b,
                          int64_t rows, int64_t n, float eps);
  // s = x + r (written to s), y = LN(s)
  void (*add_layer_norm_rows)(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y,
                              const float* w, const float* b, int64_t rows, int64_t n, float eps);
  void (*gelu_new)(const float* x, float* y, int64_t n);
  // out[row] = wte[ids[row]] + wpe[pos[row]] (+ wte[tt[row]]); ids already range-checked
  void (*embedding_rows)(const int64_t* ids, const int64_t* pos, const int64_t* tt, const float* wte, const float* wpe,
                         float* out, int64_t rows, int64_t n);
  // one packed panel of columns [n0, n0 + ncols): C[m, n0 + j] = epi(A[m] · Bp[:, j] + bias) for m < M;
  // part = kKWhole, or which block (kKFirst / 0 / kKLast) of a K split across calls this is
  void (*matmul_panel)(const float* A, int64_t lda, int64_t M, int64_t K, const float* Bp, int64_t ldb, float* C,
                       int64_t ldc, int64_t n0, int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr,
                       int part);
  // decode GEMV (up to kn_gemv_rows rows) over HF's [K, N] weight (rows ldw apart): acc[m][0, n) = Σ_k
  // A[m][k] · W[k][0, n); next_rows: rows of W past K (same ldw) the caller reads next, which the register tiles
  // (6+ rows) prefetch during their last pass: their passes leave the hardware prefetchers behind at each block
  void (*gemv_rows)(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t n,
                    float* acc, int64_t next_rows);
  // NK weight (rows ldw apart): C[m][n] = Σ_k A[m][k] · W[n][k] for m < M, n < N (no bias: the caller adds it);
  // prefetch_bytes from `prefetch` (the caller's next block of W, or none) go into L2 over the call (vec.h)
  void (*matmul_nt)(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N, float* C,
                    int64_t ldc, const void* prefetch, int64_t prefetch_bytes);
  // one reduced-precision panel (Panels layout, WType w; scales: int8's [K / group][32] for this panel, else null),
  // whole K, for few rows (decode): C[m, n0 + j] = epi(Σ_k A[m][k] · deq(Bp[k][j]) + bias) — widened in registers;
  // prefetch_bytes from `prefetch` (the caller's next panel, or none) go into L2 over the call (vec.h)
  void (*matmul_panel_lowp)(const float* A, int64_t lda, int64_t M, int64_t K, const void* Bp, WType w,
                            const float* scales, int64_t group, float* C, int64_t ldc, int64_t n0, int ncols,
                            const float* bias, Epilogue epi, const float* R, int64_t ldr, const void* prefetch,
                            int64_t prefetch_bytes);
  // rows [k0, k0 + kc) of one reduced-precision panel widened (and scaled) into dst [kc][32] fp32: prefill's B block
  void (*unpack_panel)(const void* Bp, WType w, const float* scales, int64_t group, int64_t k0, int64_t kc, float* dst);
  // one (batch, head) pair bh = b * H + h, query rows [i0, i1) with i1 - i0 <= kAttnQueryBlock
  void (*attention_block)(const AttnArgs& a, int64_t bh, int64_t i0, int64_t i1, float* scratch);
  int mr_max;        // rows per matmul register tile
  int kn_gemv_rows;  // up to this many rows HF's [K, N] fp32 weight is read in place by gemv_rows (matmul.cpp)
  int lanes;         // floats per SIMD vector (kernels/vec.h: VL), the one place the width is defined
  // roofline probe: iters × 12 vector FMAs per call (returns a value so the work is not optimised away)
  float (*fma_probe)(int64_t iters);
};

// bf16 (and int8) weights × activations rounded to bf16, fp32 sums, with AVX512_BF16's VDPBF16PS
// (isa_avx512bf16.cpp)
struct Bf16DotKernels {
  // C[m, n0 + j] (+)= Σ_k A[m][k] · B[k][j] over a K block of kc (even) columns: A bf16 rows, B pairs [kc/2][32][2]
  void (*matmul_panel)(const uint16_t* A, int64_t lda, int64_t M, int64_t kc, const uint16_t* Bp, float* C, int64_t ldc,
                       int64_t n0, int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr, int part);
  void (*pairs)(const uint16_t* panel, int64_t K, int64_t k0, int64_t kc, uint16_t* dst);
  void (*to_bf16)(const float* A, int64_t lda, int64_t M, int64_t K, uint16_t* dst, int64_t ldd);
  // int8 weights (exact in bf16) with group scales: sc = the K block's first group of this panel's scales
  void (*matmul_panel_q)(const uint16_t* A, int64_t lda, int64_t M, int64_t kc, const uint16_t* Bp, const float* sc,
                         int64_t group, float* C, int64_t ldc, int64_t n0, int ncols, const float* bias, Epilogue epi,
                         const float* R, int64_t ldr, int part);
  void (*pairs_i8)(const int8_t* panel, int64_t k0, int64_t kc, uint16_t* dst);
  int mr_max;
};
// int8 weights × int8 activations (kernels/matmul_int8dot.h): x quantized per row and int8 weight group, four
// int8 products per int32 lane — VPMADDUBSW + VPMADDWD on AVX2, VPDPBUSD with AVX-VNNI or AVX512-VNNI
// (isa_avx2.cpp, isa_avxvnni.cpp, isa_avx512vnni.cpp).
struct Int8DotKernels {
  const char* name;  // "avx2", "avxvnni" or "avx512vnni"
  // rows [0, M) of x (K columns, lda apart) -> Q [M][ldq] int8 and S [M][lds] group scales, per group of G
  void (*quantize_rows)(const float* A, int64_t lda, int64_t M, int64_t K, int64_t G, int8_t* Q, int64_t ldq, float* S,
                        int64_t lds);
  // one int8 panel (Bp [K][32], sw [K / G][32]; G a multiple of 4) against M quantized rows, whole K:
  // C[m, n0 + j] = epi(Σ_g S[m][g] · sw[g][j] · Σ_{k in g} Q[m][k] · Bp[k][j] + bias)
  void (*matmul_panel)(const int8_t* Q, int64_t ldq, const float* S, int64_t lds, int64_t M, int64_t K,
                       const int8_t* Bp, const float* sw, int64_t G, float* C, int64_t ldc, int64_t n0, int ncols,
                       const float* bias, Epilogue epi, const float* R, int64_t ldr);
  // Prefill over a packed panel, where the ISA has it (AVX512-VNNI; else all three are null): pack_panel writes
  // int8_packed_panel_bytes(K, G) bytes from a panel and its scales; group_sums gives XS[m][g] = Σ_{k in g} Q[m][k];
  // matmul_packed gives matmul_panel's result from them, prefetching up to prefetch_bytes (the next panels) as it goes
  void (*pack_panel)(const int8_t* Bp, const float* sw, int64_t K, int64_t G, uint8_t* dst);
  void (*group_sums)(const int8_t* Q, int64_t ldq, int64_t M, int64_t K, int64_t G, int32_t* XS, int64_t lds);
  void (*matmul_packed)(const int8_t* Q, int64_t ldq, const float* S, const int32_t* XS, int64_t lds, int64_t M,
                        int64_t K, const uint8_t* Bq, int64_t G, float* C, int64_t ldc, int64_t n0, int ncols,
                        const float* bias, Epilogue epi, const float* R, int64_t ldr, const void* prefetch,
                        int64_t prefetch_bytes);
};
// K bytes of weights per column of a packed panel, then its fp32 scales
constexpr int64_t int8_packed_panel_bytes(int64_t K, int64_t G) { return K * kPanel + K / G * kPanel * 4; }
// The int8 dot-product kernels this CPU runs best (the VNNI ones where it has them), or null without AVX2 or while
// the generic table is active.
const Int8DotKernels* int8_dot_kernels();
// The int8 dot-product switch: off, on (every row count), or auto, the default: prefill rows (more than
// kDecodeRows) where the kernels prefill over packed panels (AVX512-VNNI), measured faster there and within int8
// mode's error bound (bench/RESULTS.md); decode keeps widening the weights. GPT2KERN_INT8_DOT=1 / 0 start on / off.
enum class Int8DotMode { Off = 0, On = 1, Auto = 2 };
void set_int8_dot(Int8DotMode mode);
// The switch as the calling thread sees it: its own mode while it has one (exchange_thread_int8_dot), else the
// process's.
Int8DotMode int8_dot_mode();
// Gives the calling thread its own mode (an Int8DotMode as int; -1: none, the process's) and returns the previous
// one: an Engine sets it for its calls (speculative decoding's draft engine), as ThreadCap caps the threads.
int exchange_thread_int8_dot(int mode);
// The kernels for a matmul of `rows` rows of x against int8 weights under the switch, or null
const Int8DotKernels* int8_dot(int64_t rows);

// The bf16 dot-product kernels when the avx512 table is active and the CPU has AVX512_BF16 and they are enabled
// (set_bf16_dot; GPT2KERN_BF16_DOT=0 disables them from the start), else null: bf16 weights are widened to fp32.
const Bf16DotKernels* bf16_dot();
void set_bf16_dot(bool on);

const KernelTable& kernels();                     // the active table
const KernelTable* kernels_for(const char* isa);  // null if unknown or unsupported on this CPU
bool set_isa(const char* isa);                    // false if unsupported here
inline int64_t attention_scratch_floats(int64_t D) {
  // the larger of attention_rows' and attention_tile's layouts (kernels/attention.h)
  return D * kAttnQueryBlock + kAttnQueryBlock * kAttnKeyBlock + kAttnQueryBlock * D + 3 * kAttnQueryBlock;
}

}  // namespace gk
