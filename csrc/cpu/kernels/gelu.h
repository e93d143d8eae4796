// gelu.h — HF's NewGELU (tanh form, not erf) over a contiguous buffer; the formula lives in vec.h so the
// matmul epilogue and this standalone op share it.
namespace gk {
namespace GK_ISA {

static void gelu_new(const float* x, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + VL <= n; j += VL) store(y + j, vgelu_new(load(x + j)));
  if (j < n) {  // tail through a padded vector so every element takes the same formula
    float buf[VL] = {};
    for (int64_t t = j; t < n; ++t) buf[t - j] = x[t];
    vf g = vgelu_new(load(buf));
    for (int64_t t = j; t < n; ++t) y[t] = g[t - j];
  }
}

}  // namespace GK_ISA
}  // namespace gk
