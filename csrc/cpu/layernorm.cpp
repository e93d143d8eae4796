// layernorm.cpp — torch glue for LayerNorm and the fused residual add + LayerNorm (kernels/layernorm.h).
#include <ATen/Parallel.h>

#include "../common/checks.h"
#include "../common/op_args.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

static int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

void run_layer_norm(const float* x, int64_t ldx, float* y, const float* w, const float* b, int64_t rows, int64_t n,
                    float eps) {
  const KernelTable& t = kernels();
  parallel_chunks(rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
    t.layer_norm_rows(x + r0 * ldx, ldx, y + r0 * n, n, w, b, r1 - r0, n, eps);
  });
}

void run_add_layer_norm(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y, const float* w,
                        const float* b, int64_t rows, int64_t n, float eps) {
  const KernelTable& t = kernels();
  parallel_chunks(rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
    t.add_layer_norm_rows(x + r0 * ldx, ldx, r + r0 * ldr, ldr, s + r0 * n, y + r0 * n, w, b, r1 - r0, n, eps);
  });
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_ln_args(x, weight, bias, "layer_norm");
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) return y;
  const Rows xr = rows_of(x, n);
  at::Tensor w = weight.contiguous(), b = bias.contiguous();
  run_layer_norm(xr.p, xr.ld, y.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(), xr.m, n, (float)eps);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_add_ln_args(x, residual, weight, bias);
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor s = at::empty(x.sizes(), opts), y = at::empty(x.sizes(), opts);
  const int64_t n = x.size(-1);
  if (x.numel() == 0) return {s, y};
  const Rows xr = rows_of(x, n), rr = rows_of(residual, n);
  at::Tensor w = weight.contiguous(), b = bias.contiguous();
  run_add_layer_norm(xr.p, xr.ld, rr.p, rr.ld, s.data_ptr<float>(), y.data_ptr<float>(), w.data_ptr<float>(),
                     b.data_ptr<float>(), xr.m, n, (float)eps);
  return {s, y};
}

}  // namespace gk::cpu
