// matmul_nt.h — y = x @ Wᵀ over a weight stored [N, K] (row n = output n's weights): the lm_head read straight
// from the tied embedding wte [vocab, n_embd], so no transposed copy of the largest matrix is kept.
//
// Reference: C[m][n] = Σ_k A[m][k] · W[n][k].
// Both operands are read along k, so each output is a dot product: a register tile of MR rows of x × NR rows of
// W keeps MR·NR vector accumulators over k (each W vector loaded once and used MR times) and reduces each across
// its lanes at the end. Tiles at the edges re-read the last valid row and drop the extra results, so no row past
// M or N is ever touched. The caller walks W in L2-sized blocks of rows (cpu/matmul.cpp).
namespace gk {
namespace GK_ISA {

#if GK_VREGS >= 32
constexpr int kNtMR = 4, kNtNR = 6;  // 24 accumulators + 4 rows of x + 1 of W in 32 registers
#else
constexpr int kNtMR = 3, kNtNR = 4;  // 12 + 3 + 1 in 16
#endif

template <int MR, int NR>
GK_INLINE void nt_tile(const float* A, int64_t lda, int mr, int64_t K, const float* W, int64_t ldw, int nr, float* C,
                       int64_t ldc, SpreadPrefetch& pf) {
  const float* a_row[MR];
  const float* w_row[NR];
  for (int r = 0; r < MR; ++r) a_row[r] = A + (r < mr ? r : mr - 1) * lda;
  for (int j = 0; j < NR; ++j) w_row[j] = W + (j < nr ? j : nr - 1) * ldw;
  vf acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = vf{};
  const int64_t kv = K / VL * VL;
  for (int64_t k = 0; k < kv; k += VL) {
    vf a[MR];
    for (int r = 0; r < MR; ++r) a[r] = load(a_row[r] + k);
    pf.step();
    for (int j = 0; j < NR; ++j) {
      const vf w = load(w_row[j] + k);
      for (int r = 0; r < MR; ++r) acc[r][j] += a[r] * w;
    }
  }
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t k = kv; k < K; ++k) s += a_row[r][k] * w_row[j][k];
      C[r * ldc + j] = s;
    }
}

static void matmul_nt(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t N,
                      float* C, int64_t ldc, const void* prefetch, int64_t prefetch_bytes) {
  SpreadPrefetch pf(prefetch, prefetch_bytes, (M + kNtMR - 1) / kNtMR * ((N + kNtNR - 1) / kNtNR) * (K / VL));
  for (int64_t m = 0; m < M; m += kNtMR) {
    const int mr = (int)(M - m < kNtMR ? M - m : kNtMR);
    for (int64_t n = 0; n < N; n += kNtNR) {
      const int nr = (int)(N - n < kNtNR ? N - n : kNtNR);
      if (mr == 1)  // decode: one row of x, twice the W rows per pass (no other row shares their loads)
        nt_tile<1, kNtNR>(A + m * lda, lda, 1, K, W + n * ldw, ldw, nr, C + m * ldc + n, ldc, pf);
      else
        nt_tile<kNtMR, kNtNR>(A + m * lda, lda, mr, K, W + n * ldw, ldw, nr, C + m * ldc + n, ldc, pf);
    }
  }
}

}  // namespace GK_ISA
}  // namespace gk
