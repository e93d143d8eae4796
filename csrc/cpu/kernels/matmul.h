// matmul.h — Conv1D's y = x @ W + b over one packed panel of 32 output columns, with the epilogue fused.
//
// Reference: y[m, n] = Σ_k x[m, k] · W[k, n] + b[n], then gelu_new or + residual[m, n].
// W is packed once (pack op) into panels [K][32], so the inner loop reads 32 consecutive floats per k: a
// register tile of MR rows × 32 columns accumulates over the whole K (no K blocking: a [K][32] panel is at most
// 384 KiB at GPT-2's 3072 and streams from L2), and the epilogue runs on the registers before the one store.
// For decode (M = 1..8) the same tile is a GEMV that reads each weight byte exactly once.
namespace gk {
namespace GK_ISA {

constexpr int NV = kPanel / VL;  // vectors per panel row

template <int MR>
GK_INLINE void matmul_tile(const float* A, int64_t lda, int64_t K, const float* Bp, float* C, int64_t ldc,
                           int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  int64_t k = 0;
  if constexpr (MR <= 2) {
    // GEMV (decode): with so few rows the FMA latency chain, not bandwidth, would bound the loop; even and odd k
    // go to separate accumulators (summed at the end) so twice as many loads are in flight
    vf acc2[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc2[r][v] = vf{};
    for (; k + 2 <= K; k += 2) {
      vf b0[NV], b1[NV];
      for (int v = 0; v < NV; ++v) b0[v] = load(Bp + k * kPanel + v * VL);
      for (int v = 0; v < NV; ++v) b1[v] = load(Bp + (k + 1) * kPanel + v * VL);
      for (int r = 0; r < MR; ++r) {
        vf a0 = bcast(A[r * lda + k]), a1 = bcast(A[r * lda + k + 1]);
        for (int v = 0; v < NV; ++v) acc[r][v] += a0 * b0[v];
        for (int v = 0; v < NV; ++v) acc2[r][v] += a1 * b1[v];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += acc2[r][v];
  }
  for (; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(Bp + k * kPanel + v * VL);
    for (int r = 0; r < MR; ++r) {
      vf a = bcast(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  float bpad[kPanel] = {};
  if (bias)
    for (int j = 0; j < ncols; ++j) bpad[j] = bias[j];
  for (int r = 0; r < MR; ++r) {
    float out[kPanel];
    for (int v = 0; v < NV; ++v) {
      vf y = acc[r][v] + load(bpad + v * VL);
      if (epi == Epilogue::GeluNew) y = vgelu_new(y);
      store(out + v * VL, y);
    }
    float* c = C + r * ldc;
    if (epi == Epilogue::Residual) {
      const float* rr = R + r * ldr;
      if (ncols == kPanel)
        for (int v = 0; v < NV; ++v) store(c + v * VL, load(out + v * VL) + load(rr + v * VL));
      else
        for (int j = 0; j < ncols; ++j) c[j] = out[j] + rr[j];
    } else if (ncols == kPanel) {
      for (int v = 0; v < NV; ++v) store(c + v * VL, load(out + v * VL));
    } else {
      for (int j = 0; j < ncols; ++j) c[j] = out[j];
    }
  }
}

template <int MR>
GK_INLINE void matmul_rows(const float* A, int64_t lda, int64_t M, int64_t K, const float* Bp, float* C,
                           int64_t ldc, int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr) {
  if constexpr (MR > 0) {
    if (M >= MR) {
      int64_t m = 0;
      for (; m + MR <= M; m += MR)
        matmul_tile<MR>(A + m * lda, lda, K, Bp, C + m * ldc, ldc, ncols, bias, epi, R ? R + m * ldr : R, ldr);
      M -= m; A += m * lda; C += m * ldc; if (R) R += m * ldr;
    }
    if (M > 0) matmul_rows<MR - 1>(A, lda, M, K, Bp, C, ldc, ncols, bias, epi, R, ldr);
  }
}

static void matmul_panel(const float* A, int64_t lda, int64_t M, int64_t K, const float* Bp, float* C,
                         int64_t ldc, int64_t n0, int ncols, const float* bias, Epilogue epi, const float* R,
                         int64_t ldr) {
  matmul_rows<GK_MR_MAX>(A, lda, M, K, Bp, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                         R ? R + n0 : nullptr, ldr);
}

}  // namespace GK_ISA
}  // namespace gk
