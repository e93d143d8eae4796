// embedding.h — h = wte[id] + wpe[pos] (+ wte[token_type]) in one pass, summed in HF's order.
namespace gk {
namespace GK_ISA {

static void embedding_rows(const int64_t* ids, const int64_t* pos, const int64_t* tt, const float* wte,
                           const float* wpe, float* out, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* e = wte + ids[i] * n;
    const float* p = wpe + pos[i] * n;
    const float* t = tt ? wte + tt[i] * n : nullptr;
    float* o = out + i * n;
    int64_t j = 0;
    if (t) {
      for (; j + VL <= n; j += VL) store(o + j, (load(e + j) + load(p + j)) + load(t + j));
      for (; j < n; ++j) o[j] = (e[j] + p[j]) + t[j];
    } else {
      for (; j + VL <= n; j += VL) store(o + j, load(e + j) + load(p + j));
      for (; j < n; ++j) o[j] = e[j] + p[j];
    }
  }
}

}  // namespace GK_ISA
}  // namespace gk
