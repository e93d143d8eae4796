// checks.h — argument checks shared by every op: each failure names the op, the argument and what was expected,
// and maps to the Python exception a user would expect (TypeError for dtypes, ValueError for shapes/values,
// IndexError for ids out of range).
#pragma once
#include <torch/types.h>

#define GK_CHECK_DTYPE(t, dt, op, name)                                                                              \
  TORCH_CHECK_TYPE((t).scalar_type() == (dt), "gpt2kern.", op, ": ", name, " must be ", c10::toString(dt), ", got ", \
                   (t).scalar_type())
#define GK_CHECK_FLOAT(t, op, name) GK_CHECK_DTYPE(t, at::kFloat, op, name)
#define GK_CHECK_DIM(t, d, op, name) \
  TORCH_CHECK_VALUE((t).dim() == (d), "gpt2kern.", op, ": ", name, " must be ", d, "-D, got shape ", (t).sizes())
#define GK_CHECK_SAME_DEVICE(a, b, op, name)                                                            \
  TORCH_CHECK_VALUE((a).device() == (b).device(), "gpt2kern.", op, ": ", name, " is on ", (b).device(), \
                    " but the input is on ", (a).device())

namespace gk {

// View x as rows [M, n] with unit column stride, copying only when no such view exists
// (non-contiguous inputs are accepted; the copy is the price of the layout, not an error).
inline at::Tensor as_rows(const at::Tensor& x, int64_t n) {
  at::Tensor r = x.reshape({-1, n});
  if (r.stride(1) != 1) r = r.contiguous();  // inputs only: overlapping rows (stride 0) are fine to read
  return r;
}

inline int64_t row_stride(const at::Tensor& rows) { return rows.size(0) > 1 ? rows.stride(0) : rows.size(1); }

// x (float) as m rows of n with row stride ld, for kernels that take raw pointers. A contiguous x (the common
// case) is used as is: no view is made, which is most of a decode-sized op's glue cost; otherwise as_rows, whose
// tensor `keep` holds.
struct Rows {
  const float* p;
  int64_t ld, m;
  at::Tensor keep;
};
inline Rows rows_of(const at::Tensor& x, int64_t n) {
  if (x.is_contiguous()) return {x.const_data_ptr<float>(), n, n > 0 ? x.numel() / n : 0, at::Tensor()};
  at::Tensor r = as_rows(x, n);
  return {r.const_data_ptr<float>(), row_stride(r), r.size(0), r};
}

}  // namespace gk
