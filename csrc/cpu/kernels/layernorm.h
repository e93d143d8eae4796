// layernorm.h — LayerNorm over the last dim, and the fused residual add + LayerNorm.
//
// Reference (float64): y = (x − mean) / sqrt(var + eps) · w + b, var the biased variance.
// Two passes over a row that stays in L1: mean, then the centred sum of squares. The centred second pass
// keeps the variance exact even with GPT-2's residual outlier channels (values in the thousands), where
// E[x²] − mean² would cancel catastrophically.
namespace gk {
namespace GK_ISA {

GK_INLINE float row_mean(const float* x, int64_t n) {
  vf a0{}, a1{}, a2{}, a3{};
  int64_t j = 0;
  for (; j + 4 * VL <= n; j += 4 * VL) {
    a0 += load(x + j);
    a1 += load(x + j + VL);
    a2 += load(x + j + 2 * VL);
    a3 += load(x + j + 3 * VL);
  }
  for (; j + VL <= n; j += VL) a0 += load(x + j);
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; j < n; ++j) s += x[j];
  return s / (float)n;
}

GK_INLINE float row_rstd(const float* x, int64_t n, float mean, float eps) {
  const vf m = bcast(mean);
  vf a0{}, a1{};
  int64_t j = 0;
  for (; j + 2 * VL <= n; j += 2 * VL) {
    vf d0 = load(x + j) - m, d1 = load(x + j + VL) - m;
    a0 += d0 * d0;
    a1 += d1 * d1;
  }
  for (; j + VL <= n; j += VL) {
    vf d = load(x + j) - m;
    a0 += d * d;
  }
  float s = hsum(a0 + a1);
  for (; j < n; ++j) {
    float d = x[j] - mean;
    s += d * d;
  }
  return 1.f / __builtin_sqrtf(s / (float)n + eps);
}

GK_INLINE void row_normalize(const float* x, float* y, const float* w, const float* b, int64_t n, float mean,
                             float rstd) {
  const vf m = bcast(mean), r = bcast(rstd);
  int64_t j = 0;
  for (; j + VL <= n; j += VL) store(y + j, (load(x + j) - m) * r * load(w + j) + load(b + j));
  for (; j < n; ++j) y[j] = (x[j] - mean) * rstd * w[j] + b[j];
}

static void layer_norm_rows(const float* x, int64_t ldx, float* y, int64_t ldy, const float* w, const float* b,
                            int64_t rows, int64_t n, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    float mean = row_mean(xr, n);
    row_normalize(xr, y + i * ldy, w, b, n, mean, row_rstd(xr, n, mean, eps));
  }
}

static void add_layer_norm_rows(const float* x, int64_t ldx, const float* r, int64_t ldr, float* s, float* y,
                                const float* w, const float* b, int64_t rows, int64_t n, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const float *xr = x + i * ldx, *rr = r + i * ldr;
    float* sr = s + i * n;
    int64_t j = 0;
    for (; j + VL <= n; j += VL) store(sr + j, load(xr + j) + load(rr + j));
    for (; j < n; ++j) sr[j] = xr[j] + rr[j];
    float mean = row_mean(sr, n);
    row_normalize(sr, y + i * n, w, b, n, mean, row_rstd(sr, n, mean, eps));
  }
}

}  // namespace GK_ISA
}  // namespace gk
