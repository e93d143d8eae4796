// op_args.cpp — see op_args.h.
#include "op_args.h"

#include "checks.h"

namespace gk {

void check_ln_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const char* op) {
  GK_CHECK_FLOAT(x, op, "x");
  GK_CHECK_FLOAT(w, op, "weight");
  GK_CHECK_FLOAT(b, op, "bias");
  TORCH_CHECK_VALUE(x.dim() >= 1, "gpt2kern.", op, ": x must have at least 1 dim");
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == n, "gpt2kern.", op, ": weight must have shape [", n, "], got ",
                    w.sizes());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n, "gpt2kern.", op, ": bias must have shape [", n, "], got ",
                    b.sizes());
  GK_CHECK_SAME_DEVICE(x, w, op, "weight");
  GK_CHECK_SAME_DEVICE(x, b, op, "bias");
}

void check_add_ln_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                       const at::Tensor& bias) {
  check_ln_args(x, weight, bias, "add_layer_norm");
  GK_CHECK_FLOAT(residual, "add_layer_norm", "residual");
  GK_CHECK_SAME_DEVICE(x, residual, "add_layer_norm", "residual");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "gpt2kern.add_layer_norm: residual must have x's shape ", x.sizes(),
                    ", got ", residual.sizes());
}

int parse_epilogue(c10::string_view e) {
  if (e == "none") return 0;
  if (e == "gelu_new") return 1;
  if (e == "residual") return 2;
  TORCH_CHECK_VALUE(false, "gpt2kern.conv1d: epilogue must be 'none', 'gelu_new' or 'residual', got '", e, "'");
}

void check_conv1d_inputs(const at::Tensor& x, const at::Tensor& weight) {
  GK_CHECK_FLOAT(x, "conv1d", "x");
  GK_CHECK_FLOAT(weight, "conv1d", "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1, "gpt2kern.conv1d: x must have at least 1 dim");
  GK_CHECK_SAME_DEVICE(x, weight, "conv1d", "weight");
}

void check_conv1d_extras(const at::Tensor& x, const std::optional<at::Tensor>& bias, int epi, c10::string_view epilogue,
                         const std::optional<at::Tensor>& residual, int64_t N, at::IntArrayRef out_shape) {
  if (bias) {
    GK_CHECK_FLOAT(*bias, "conv1d", "bias");
    GK_CHECK_SAME_DEVICE(x, *bias, "conv1d", "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "gpt2kern.conv1d: bias must be [", N, "], got ",
                      bias->sizes());
  }
  if (epi == 2) {
    TORCH_CHECK_VALUE(residual.has_value(), "gpt2kern.conv1d: epilogue 'residual' needs a residual tensor");
    GK_CHECK_FLOAT(*residual, "conv1d", "residual");
    GK_CHECK_SAME_DEVICE(x, *residual, "conv1d", "residual");
    TORCH_CHECK_VALUE(residual->sizes() == out_shape, "gpt2kern.conv1d: residual must have shape ", out_shape, ", got ",
                      residual->sizes());
  } else {
    TORCH_CHECK_VALUE(!residual.has_value(), "gpt2kern.conv1d: a residual was given but epilogue is '", epilogue,
                      "' (use epilogue='residual')");
  }
}

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias,
                          int64_t q_offset, bool causal) {
  const char* op = "attention";
  GK_CHECK_FLOAT(q, op, "q");
  GK_CHECK_FLOAT(k, op, "k");
  GK_CHECK_FLOAT(v, op, "v");
  GK_CHECK_DIM(q, 4, op, "q [B, H, Tq, D]");
  GK_CHECK_DIM(k, 4, op, "k [B, H, Tkv, D]");
  GK_CHECK_DIM(v, 4, op, "v [B, H, Tkv, D]");
  GK_CHECK_SAME_DEVICE(q, k, op, "k");
  GK_CHECK_SAME_DEVICE(q, v, op, "v");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tkv = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == D, "gpt2kern.attention: k must be [", B, ", ", H,
                    ", Tkv, ", D, "], got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "gpt2kern.attention: v must have k's shape ", k.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_VALUE(q_offset >= 0, "gpt2kern.attention: q_offset must be >= 0, got ", q_offset);
  const uint64_t q_end = (uint64_t)q_offset + (uint64_t)Tq;  // no signed overflow for a huge q_offset
  TORCH_CHECK_VALUE(!causal || q_offset <= Tkv - Tq, "gpt2kern.attention: causal queries at positions [", q_offset,
                    ", ", q_end, ") need at least ", q_end, " keys, got ", Tkv);
  if (key_mask) {
    GK_CHECK_DTYPE(*key_mask, at::kBool, op, "key_mask");
    GK_CHECK_SAME_DEVICE(q, *key_mask, op, "key_mask");
    TORCH_CHECK_VALUE(key_mask->dim() == 2 && key_mask->size(0) == B, "gpt2kern.attention: key_mask must be [", B,
                      ", L], got ", key_mask->sizes());
  }
  if (bias) {
    GK_CHECK_FLOAT(*bias, op, "bias");
    GK_CHECK_SAME_DEVICE(q, *bias, op, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 4 && (bias->size(0) == B || bias->size(0) == 1) &&
                          (bias->size(1) == H || bias->size(1) == 1) && bias->size(2) == Tq,
                      "gpt2kern.attention: bias must be [", B, " or 1, ", H, " or 1, ", Tq, ", L], got ",
                      bias->sizes());
  }
}

static at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

AttnCall attention_call(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                        const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, double scale,
                        int64_t q_offset, bool causal) {
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), D = q_.size(3), Tkv = k_.size(2);
  AttnCall c{};
  c.out = at::empty({B, Tq, H, D}, q_.options());
  c.q = last_dim_contiguous(q_);
  c.k = last_dim_contiguous(k_);
  c.v = last_dim_contiguous(v_);
  AttnArgs& a = c.a;
  a.q = c.q.data_ptr<float>();
  a.k = c.k.data_ptr<float>();
  a.v = c.v.data_ptr<float>();
  a.sq_b = c.q.stride(0);
  a.sq_h = c.q.stride(1);
  a.sq_t = c.q.stride(2);
  a.sk_b = c.k.stride(0);
  a.sk_h = c.k.stride(1);
  a.sk_t = c.k.stride(2);
  a.sv_b = c.v.stride(0);
  a.sv_h = c.v.stride(1);
  a.sv_t = c.v.stride(2);
  a.out = c.out.data_ptr<float>();
  a.B = B;
  a.H = H;
  a.Tq = Tq;
  a.Tkv = Tkv;
  a.D = D;
  a.scale = (float)scale;
  a.q_offset = q_offset;
  a.causal = causal;
  if (key_mask) {
    c.key_mask = key_mask->contiguous();
    a.key_mask = c.key_mask.data_ptr<bool>();
    a.mask_len = c.key_mask.size(1);
  }
  if (bias) {
    c.bias = last_dim_contiguous(*bias);
    a.bias = c.bias.data_ptr<float>();
    a.sb_b = c.bias.size(0) == 1 ? 0 : c.bias.stride(0);
    a.sb_h = c.bias.size(1) == 1 ? 0 : c.bias.stride(1);
    a.sb_t = c.bias.stride(2);
    a.bias_len = c.bias.size(3);
  }
  // a mask or bias of length 0 lets no key through (its data pointer is null, which would read as "no mask")
  if ((key_mask && a.mask_len == 0) || (bias && a.bias_len == 0)) a.Tkv = 0;
  return c;
}

void check_embedding_tables(const at::Tensor& input_ids, const at::Tensor& wte, const at::Tensor& wpe) {
  GK_CHECK_DIM(input_ids, 2, "embedding", "input_ids");
  GK_CHECK_FLOAT(wte, "embedding", "wte");
  GK_CHECK_FLOAT(wpe, "embedding", "wpe");
  GK_CHECK_DIM(wte, 2, "embedding", "wte");
  GK_CHECK_DIM(wpe, 2, "embedding", "wpe");
  GK_CHECK_SAME_DEVICE(wte, wpe, "embedding", "wpe");
  TORCH_CHECK_VALUE(wte.size(1) == wpe.size(1), "gpt2kern.embedding: wte and wpe widths differ (", wte.size(1), " vs ",
                    wpe.size(1), ")");
}

at::Tensor embedding_ids(const at::Tensor& ids, const at::Tensor& wte, int64_t B, int64_t T, const char* name) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "gpt2kern.embedding: ", name,
                   " must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2 && (ids.size(0) == B || ids.size(0) == 1) && ids.size(1) == T,
                    "gpt2kern.embedding: ", name, " must have shape [", B, ", ", T, "] (or [1, ", T, "]), got ",
                    ids.sizes());
  GK_CHECK_SAME_DEVICE(wte, ids, "embedding", name);
  return ids.to(at::kLong).expand({B, T}).contiguous();
}

}  // namespace gk
