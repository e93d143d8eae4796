// attention.cpp — torch glue for causal softmax attention over a KV cache (kernels/attention.h): shape checks,
// mask/bias strides, and one task per (batch, head, block of 32 query rows).
#include <ATen/Parallel.h>

#include <vector>

#include "../common/checks.h"
#include "kernel_table.h"
#include "ops_cpu.h"

namespace gk::cpu {

static at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void run_attention(const AttnArgs& a) {
  const int64_t nqb = (a.Tq + kAttnQueryBlock - 1) / kAttnQueryBlock;
  const KernelTable& t = kernels();
  // ~64K FMAs per task at least: tiny heads (HF's test model) run on the calling thread
  const int64_t work = std::min<int64_t>(a.Tq, kAttnQueryBlock) * std::max<int64_t>(a.Tkv, 1) * a.D;
  at::parallel_for(0, a.B * a.H * nqb, std::max<int64_t>(1, 65536 / work), [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scratch;  // per pool thread, grown once: no allocation per call
    if ((int64_t)scratch.size() < attention_scratch_floats(a.D)) scratch.resize(attention_scratch_floats(a.D));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kAttnQueryBlock;
      t.attention_block(a, bh, i0, std::min(a.Tq, i0 + kAttnQueryBlock), scratch.data());
    }
  });
}

at::Tensor attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                     const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, double scale,
                     int64_t q_offset, bool causal) {
  const char* op = "attention";
  GK_CHECK_FLOAT(q_, op, "q");
  GK_CHECK_FLOAT(k_, op, "k");
  GK_CHECK_FLOAT(v_, op, "v");
  GK_CHECK_DIM(q_, 4, op, "q [B, H, Tq, D]");
  GK_CHECK_DIM(k_, 4, op, "k [B, H, Tkv, D]");
  GK_CHECK_DIM(v_, 4, op, "v [B, H, Tkv, D]");
  GK_CHECK_SAME_DEVICE(q_, k_, op, "k");
  GK_CHECK_SAME_DEVICE(q_, v_, op, "v");
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), D = q_.size(3), Tkv = k_.size(2);
  TORCH_CHECK_VALUE(k_.size(0) == B && k_.size(1) == H && k_.size(3) == D, "gpt2kern.attention: k must be [", B,
                    ", ", H, ", Tkv, ", D, "], got ", k_.sizes());
  TORCH_CHECK_VALUE(v_.sizes() == k_.sizes(), "gpt2kern.attention: v must have k's shape ", k_.sizes(), ", got ",
                    v_.sizes());
  TORCH_CHECK_VALUE(q_offset >= 0, "gpt2kern.attention: q_offset must be >= 0, got ", q_offset);
  const uint64_t q_end = (uint64_t)q_offset + (uint64_t)Tq;  // no signed overflow for a huge q_offset
  TORCH_CHECK_VALUE(!causal || q_offset <= Tkv - Tq, "gpt2kern.attention: causal queries at positions [", q_offset,
                    ", ", q_end, ") need at least ", q_end, " keys, got ", Tkv);
  at::Tensor out = at::empty({B, Tq, H, D}, q_.options());
  if (out.numel() == 0) return out;
  at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);

  AttnArgs a{};
  a.q = q.data_ptr<float>(); a.k = k.data_ptr<float>(); a.v = v.data_ptr<float>();
  a.sq_b = q.stride(0); a.sq_h = q.stride(1); a.sq_t = q.stride(2);
  a.sk_b = k.stride(0); a.sk_h = k.stride(1); a.sk_t = k.stride(2);
  a.sv_b = v.stride(0); a.sv_h = v.stride(1); a.sv_t = v.stride(2);
  a.out = out.data_ptr<float>();
  a.B = B; a.H = H; a.Tq = Tq; a.Tkv = Tkv; a.D = D;
  a.scale = (float)scale; a.q_offset = q_offset; a.causal = causal;
  at::Tensor km;
  if (key_mask) {
    GK_CHECK_DTYPE(*key_mask, at::kBool, op, "key_mask");
    TORCH_CHECK_VALUE(key_mask->dim() == 2 && key_mask->size(0) == B, "gpt2kern.attention: key_mask must be [", B,
                      ", L], got ", key_mask->sizes());
    km = key_mask->contiguous();
    a.key_mask = km.data_ptr<bool>();
    a.mask_len = km.size(1);
  }
  at::Tensor bb;
  if (bias) {
    GK_CHECK_FLOAT(*bias, op, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 4 && (bias->size(0) == B || bias->size(0) == 1) &&
                          (bias->size(1) == H || bias->size(1) == 1) && bias->size(2) == Tq,
                      "gpt2kern.attention: bias must be [", B, " or 1, ", H, " or 1, ", Tq, ", L], got ",
                      bias->sizes());
    bb = last_dim_contiguous(*bias);
    a.bias = bb.data_ptr<float>();
    a.sb_b = bb.size(0) == 1 ? 0 : bb.stride(0);
    a.sb_h = bb.size(1) == 1 ? 0 : bb.stride(1);
    a.sb_t = bb.stride(2);
    a.bias_len = bb.size(3);
  }
  run_attention(a);
  return out;
}

}  // namespace gk::cpu
