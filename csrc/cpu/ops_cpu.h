// ops_cpu.h — the CPU implementations registered in ops.cpp (one .cpp per kernel family).
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>

#include "kernel_table.h"

namespace gk::cpu {
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps);
at::Tensor gelu_new(const at::Tensor& x);
at::Tensor pack(const at::Tensor& weight);
at::Tensor conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  c10::string_view epilogue, const std::optional<at::Tensor>& residual, int64_t out_features,
                  c10::string_view layout, const std::optional<at::Tensor>& scales);
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, double scale,
                     int64_t q_offset, bool causal);
at::Tensor embedding(const at::Tensor& input_ids, const at::Tensor& wte, const at::Tensor& wpe,
                     const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids);

// The same kernels on raw, already-checked buffers, threaded with at::parallel_for: shared by the ops above and
// the decode engine (engine.cpp). Outputs are dense rows (row stride = their width).
void run_layer_norm(const float* x, int64_t ldx, float* y, const float* w, const float* b, int64_t rows, int64_t n,
                    float eps);
void run_add_layer_norm(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y, const float* w,
                        const float* b, int64_t rows, int64_t n, float eps);
// A matmul weight as the kernels read it: the one weight format (kernel_table.h's Layout and WType; Python's
// gpt2kern.weights.WeightFormat builds the same thing), checked once by weight_ref.
struct WeightRef {
  const void* w;
  Layout layout;
  WType type;
  int64_t ld;           // KN: row stride of [K, N]; NK: row stride of [N, K]; Panels: kPanel
  const float* scales;  // int8 only: [panels][K / group][32]
  int64_t group;        // int8 only: consecutive k per scale
};
Layout parse_layout(c10::string_view layout, const char* who);
// a format's dtype name ('fp32', 'fp16', 'bf16', 'int8', as gpt2kern.weights.WeightFormat spells it)
WType parse_dtype(c10::string_view dtype, const char* who);
// data (+ scales) as a K -> N weight stored in `layout`; the element type is data's dtype (float32, float16,
// bfloat16, int8 + scales). Every mismatch is an error naming `who` and `name`.
WeightRef weight_ref(const at::Tensor& data, const std::optional<at::Tensor>& scales, Layout layout, int64_t K,
                     int64_t N, const char* who, const char* name);
// N as the layout's shape gives it (KN, NK), or -1 where only the caller knows it (Panels)
int64_t weight_out_features(const at::Tensor& data, Layout layout);
// How run_matmul computes a product (matmul.cpp's table holds one function per strategy).
enum class MatmulStrategy : int {
  NkDecode,         // [N, K] in place, few rows: dot products over blocks of W's rows
  NkPrefill,        // [N, K] in place, more rows: Cᵀ = W · xᵀ with x packed into panels
  Bf16DotPrefill,   // bf16 / even-group int8 panels, more rows, AVX512_BF16: VDPBF16PS over bf16 pairs
  LowpDecode,       // fp16 / bf16 / int8 panels, few rows: widened in registers, whole K
  KnDecodeGemv,     // HF's [K, N] in place, M <= 8: GEMV over fixed blocks of rows of W
  PanelsF32,        // fp32 panels, any rows: the panel kernel straight over the weight
  ConvertPerBlock,  // any other prefill: each K block of a few panels made fp32 once, then the panel kernel
  Int8Dot,          // int8 panels (group of 4k) where int8_dot(M) runs: x quantized, integer dot products
};
constexpr int kMatmulStrategyCount = 8;
// The strategy for M rows against a weight stored in (layout, type) (int8: `group` k per scale), where the bf16
// dot-product kernels exist (bf16_dot) or not, and the int8 ones run for M rows (int8_dot(M)) or not:
// a function of these alone.
MatmulStrategy choose_matmul(Layout layout, WType type, int64_t M, int64_t group, bool bf16_dot, bool int8_dot);
const char* matmul_strategy_name(MatmulStrategy s);
void run_matmul(const float* A, int64_t lda, int64_t M, int64_t K, WeightRef W, int64_t N, const float* bias,
                Epilogue epi, const float* R, int64_t ldr, float* C);
// T positions' rows of B (speculative verify), each position's bit-identical to run_matmul(M = B) on them.
void run_matmul_steps(const float* A, int64_t lda, int64_t T, int64_t B, int64_t K, WeightRef W, int64_t N,
                      const float* bias, Epilogue epi, float* C);
void run_attention(const AttnArgs& a);
}  // namespace gk::cpu
