// op_args.h — the argument checks of each op, written once for every backend (cpu/*.cpp and cuda/ops_cuda.cpp
// call these, then do only their own layout work). Each failure names the op and the argument (see checks.h).
#pragma once
#include <torch/types.h>

#include "attn_args.h"

#include <optional>
#include <vector>

namespace gk {

// x [..., n], weight [n], bias [n]; all float32 on x's device.
void check_ln_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const char* op);
// ... and a residual of x's shape, for add_layer_norm.
void check_add_ln_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                       const at::Tensor& bias);

// conv1d's epilogue name as the kernels' code: 0 none, 1 gelu_new, 2 residual (= gk::Epilogue).
int parse_epilogue(c10::string_view epilogue);
// x, weight float32 on one device, x at least 1-D (weight's layout is the backend's business).
void check_conv1d_inputs(const at::Tensor& x, const at::Tensor& weight);
// bias [N] and the residual the epilogue needs (exactly when it is 'residual', of the output's shape out_shape).
void check_conv1d_extras(const at::Tensor& x, const std::optional<at::Tensor>& bias, int epi, c10::string_view epilogue,
                         const std::optional<at::Tensor>& residual, int64_t N, at::IntArrayRef out_shape);

// q [B, H, Tq, D], k and v [B, H, Tkv, D], key_mask bool [B, L], bias float [B|1, H|1, Tq, L]; q_offset >= 0 and,
// when causal, Tq queries from q_offset need that many keys.
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias,
                          int64_t q_offset, bool causal);

// The checked attention arguments as raw pointers for either backend's kernel, with the output allocated (on q's
// device) and the tensors the pointers read kept alive: last-dim-contiguous copies only where needed.
struct AttnCall {
  AttnArgs a;
  at::Tensor out, q, k, v, key_mask, bias;
};
AttnCall attention_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, double scale,
                        int64_t q_offset, bool causal);

// wte [V, n] and wpe [P, n] float32 on one device, input_ids 2-D.
void check_embedding_tables(const at::Tensor& input_ids, const at::Tensor& wte, const at::Tensor& wpe);
// ids int64/int32 [B, T] or [1, T] on wte's device -> int64 [B, T] contiguous.
at::Tensor embedding_ids(const at::Tensor& ids, const at::Tensor& wte, int64_t B, int64_t T, const char* name);

}  // namespace gk
