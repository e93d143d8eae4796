// gelu.cpp — torch glue for HF's NewGELU (kernels/gelu.h).
#include <ATen/Parallel.h>

#include "../common/checks.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

at::Tensor gelu_new(const at::Tensor& x) {
  GK_CHECK_FLOAT(x, "gelu_new", "x");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const KernelTable& t = kernels();
  parallel_chunks(xc.numel(), 16384, [&](int64_t b, int64_t e) { t.gelu_new(px + b, py + b, e - b); });
  return y;
}

}  // namespace gk::cpu
