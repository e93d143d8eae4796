// attention.cpp — torch glue for causal softmax attention over a KV cache (kernels/attention.h): shape checks,
// mask/bias strides, and one task per (batch, head, block of 32 query rows).
#include <ATen/Parallel.h>

#include <vector>

#include "../common/checks.h"
#include "../common/op_args.h"
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
  check_attention_args(q_, k_, v_, key_mask, bias, q_offset, causal);
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), D = q_.size(3), Tkv = k_.size(2);
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
    km = key_mask->contiguous();
    a.key_mask = km.data_ptr<bool>();
    a.mask_len = km.size(1);
  }
  at::Tensor bb;
  if (bias) {
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
