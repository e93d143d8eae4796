// attention.cpp — torch glue for causal softmax attention over a KV cache (kernels/attention.h): the shared
// checks and argument layout (common/op_args), then one task per (batch, head, block of 32 query rows).
#include <ATen/Parallel.h>

#include <vector>

#include "../common/op_args.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

void run_attention(const AttnArgs& a) {
  const int64_t nqb = (a.Tq + kAttnQueryBlock - 1) / kAttnQueryBlock;
  const KernelTable& t = kernels();
  // ~64K FMAs per task at least: tiny heads (HF's test model) run on the calling thread
  const int64_t work = std::min<int64_t>(a.Tq, kAttnQueryBlock) * std::max<int64_t>(a.Tkv, 1) * a.D;
  // tasks taken in chunks from a shared counter (parallel.h): a causal prefill's later query blocks cost more, and
  // a thread whose core is busy takes fewer
  parallel_chunks(a.B * a.H * nqb, std::max<int64_t>(1, 65536 / work), [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scratch;  // per pool thread, grown once: no allocation per call
    if ((int64_t)scratch.size() < attention_scratch_floats(a.D)) scratch.resize(attention_scratch_floats(a.D));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kAttnQueryBlock;
      t.attention_block(a, bh, i0, std::min(a.Tq, i0 + kAttnQueryBlock), scratch.data());
    }
  });
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, double scale,
                     int64_t q_offset, bool causal) {
  check_attention_args(q, k, v, key_mask, bias, q_offset, causal);
  const AttnCall c = attention_call(q, k, v, key_mask, bias, scale, q_offset, causal);
  if (c.out.numel() > 0) run_attention(c.a);
  return c.out;
}

}  // namespace gk::cpu
