// embedding.cpp — torch glue for wte gather + wpe add (kernels/embedding.h), with every id range-checked first.
#include <ATen/Parallel.h>

#include "../common/checks.h"
#include "../common/op_args.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

static void check_range(const at::Tensor& ids, int64_t hi, const char* name, const char* what) {
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0, n = ids.numel(); i < n; ++i)
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < hi, "gpt2kern.embedding: ", name, " contains ", p[i], ", outside ", what,
                      " [0, ", hi, ")");
}

at::Tensor embedding(const at::Tensor& input_ids, const at::Tensor& wte, const at::Tensor& wpe,
                     const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids) {
  check_embedding_tables(input_ids, wte, wpe);
  const int64_t B = input_ids.size(0), T = input_ids.size(1), n = wte.size(1);
  at::Tensor ids = embedding_ids(input_ids, wte, B, T, "input_ids");
  at::Tensor pos = embedding_ids(position_ids, wte, B, T, "position_ids");
  check_range(ids, wte.size(0), "input_ids", "the vocabulary");
  check_range(pos, wpe.size(0), "position_ids", "the position table (n_positions)");
  at::Tensor tt;
  if (token_type_ids) {
    tt = embedding_ids(*token_type_ids, wte, B, T, "token_type_ids");
    check_range(tt, wte.size(0), "token_type_ids", "the vocabulary");
  }
  at::Tensor out = at::empty({B, T, n}, wte.options());
  if (out.numel() == 0) return out;
  at::Tensor e = wte.contiguous(), p = wpe.contiguous();
  const int64_t *pi = ids.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>();
  const int64_t* pt = tt.defined() ? tt.data_ptr<int64_t>() : nullptr;
  const float *pe = e.data_ptr<float>(), *pw = p.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const KernelTable& t = kernels();
  parallel_chunks(B * T, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    t.embedding_rows(pi + r0, pp + r0, pt ? pt + r0 : nullptr, pe, pw, po + r0 * n, r1 - r0, n);
  });
  return out;
}

}  // namespace gk::cpu
