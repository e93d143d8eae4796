// matmul_bf16dot.h — prefill over bf16 weights with AVX512_BF16's VDPBF16PS: two bf16 products per fp32 lane per
// instruction, twice the multiply-adds of an fp32 FMA.
//
// Reference: y[m, n] = Σ_k bf16(x[m, k]) · w[k, n] + b[n], sums in fp32 — the weights are the stored bf16 values
// and x is rounded to bf16 (nearest even) once per call, so this path's error is the weights' rounding plus the
// activations' (tests/test_matmul_lowp.py holds it to a float64 reference of exactly those rounded operands).
// VDPBF16PS multiplies pairs of adjacent bf16: x's pair (k, k+1) is broadcast from its row, and the weights' rows
// k and k+1 are interleaved column by column ([kc/2][32][2], made from the stored [K][32] panel per K block).
// The register tile is matmul.h's: MR rows × 32 columns in 2·MR accumulators, the same epilogue.
namespace gk {
namespace GK_ISA {

// sum[r] += Σ over pairs [k2_0, k2_1) of A's pair · B's pair, for 32 columns (two accumulators per row)
template <int MR>
GK_INLINE void bf16dot_accumulate(vf (&sum)[MR][NV], const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t k2_0,
                                  int64_t k2_1) {
  for (int64_t k2 = k2_0; k2 < k2_1; ++k2) {  // k2: the pair (2·k2, 2·k2 + 1)
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp + k2 * 2 * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(Bp + k2 * 2 * kPanel + 32);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, A + r * lda + 2 * k2, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      sum[r][0] = (vf)_mm512_dpbf16_ps((__m512)sum[r][0], a, b0);
      sum[r][1] = (vf)_mm512_dpbf16_ps((__m512)sum[r][1], a, b1);
    }
  }
}

// Q (int8 weights): the codes (−127..127) are exact in bf16, so the products are those of the stored codes; each
// group of G2 pairs (G even: pairs never straddle a group) is summed apart and scaled once, as matmul_lowp.h does
// (sc: the K block's first group of scales [.][32]). 6 rows then: 2 × 6 sums + 2 × 6 group sums + 3 operands.
template <int MR, bool Q>
GK_INLINE void bf16dot_tile(const uint16_t* A, int64_t lda, int64_t K2, const uint16_t* Bp, const float* sc, int64_t G2,
                            float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi, const float* R,
                            int64_t ldr, int part) {
  vf acc[MR][NV];
  start_tile<MR>(acc, C, ldc, ncols, part);
  if constexpr (!Q) {
    bf16dot_accumulate<MR>(acc, A, lda, Bp, 0, K2);
  } else {
    for (int64_t g = 0; g < K2; g += G2) {
      vf sum[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) sum[r][v] = vf{};
      bf16dot_accumulate<MR>(sum, A, lda, Bp, g, g + G2);
      const float* sg = sc + (g / G2) * kPanel;
      for (int v = 0; v < NV; ++v) {
        const vf s = load(sg + v * VL);
        for (int r = 0; r < MR; ++r) acc[r][v] += sum[r][v] * s;
      }
    }
  }
  end_tile<MR>(acc, C, ldc, ncols, bias, epi, R, ldr, part);
}

template <int MR, bool Q>
GK_INLINE void bf16dot_rows(const uint16_t* A, int64_t lda, int64_t M, int64_t K2, const uint16_t* Bp, const float* sc,
                            int64_t G2, float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi,
                            const float* R, int64_t ldr, int part) {
  if constexpr (MR > 0) {
    for (; M >= MR; M -= MR, A += MR * lda, C += MR * ldc, R = R ? R + MR * ldr : R)
      bf16dot_tile<MR, Q>(A, lda, K2, Bp, sc, G2, C, ldc, ncols, bias, epi, R, ldr, part);
    if (M > 0) bf16dot_rows<MR - 1, Q>(A, lda, M, K2, Bp, sc, G2, C, ldc, ncols, bias, epi, R, ldr, part);
  }
}

// A: bf16 rows (lda elements apart) from column k0 on; kc (even) columns; Bp: [kc/2][32][2] pairs
static void bf16dot_panel(const uint16_t* A, int64_t lda, int64_t M, int64_t kc, const uint16_t* Bp, float* C,
                          int64_t ldc, int64_t n0, int ncols, const float* bias, Epilogue epi, const float* R,
                          int64_t ldr, int part) {
  bf16dot_rows<GK_MR_MAX, false>(A, lda, M, kc / 2, Bp, nullptr, 1, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                                 R ? R + n0 : nullptr, ldr, part);
}

// the same over int8 codes: kc a multiple of the (even) group G
static void bf16dot_panel_q(const uint16_t* A, int64_t lda, int64_t M, int64_t kc, const uint16_t* Bp, const float* sc,
                            int64_t G, float* C, int64_t ldc, int64_t n0, int ncols, const float* bias, Epilogue epi,
                            const float* R, int64_t ldr, int part) {
  bf16dot_rows<6, true>(A, lda, M, kc / 2, Bp, sc, G / 2, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                        R ? R + n0 : nullptr, ldr, part);
}

// rows r0 (k) and r1 (k + 1) of 32 bf16 each interleaved column by column into dst [32][2]
GK_INLINE void store_pairs(__m512i r0, __m512i r1, uint16_t* dst) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                      36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(r0, lo, r1));
  _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(r0, hi, r1));
}

// rows [k0, k0 + kc) (kc even) of a stored int8 panel as exact bf16 pairs [kc/2][32][2]
static void int8_pairs(const int8_t* panel, int64_t k0, int64_t kc, uint16_t* dst) {
  auto row = [&](int64_t k) {  // 32 codes -> 32 bf16 (exact)
    const int8_t* p = panel + (k0 + k) * kPanel;
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a -> elements 0..15, b -> 16..31
  };
  for (int64_t k = 0; k < kc; k += 2) store_pairs(row(k), row(k + 1), dst + k * kPanel);
}

// rows [k0, k0 + kc) of a stored bf16 panel [K][32] (K rows in all) as pairs [ceil(kc/2)][32][2]; a missing odd
// row is zero
static void bf16_pairs(const uint16_t* panel, int64_t K, int64_t k0, int64_t kc, uint16_t* dst) {
  for (int64_t k = 0; k < kc; k += 2) {
    const __m512i r0 = _mm512_loadu_si512(panel + (k0 + k) * kPanel);
    const __m512i r1 =
        k0 + k + 1 < K && k + 1 < kc ? _mm512_loadu_si512(panel + (k0 + k + 1) * kPanel) : _mm512_setzero_si512();
    store_pairs(r0, r1, dst + k * kPanel);
  }
}

// x rows (fp32, lda apart) rounded to bf16 (nearest even) into dst rows ldd apart; columns [K, ldd) zero
static void to_bf16_rows(const float* A, int64_t lda, int64_t M, int64_t K, uint16_t* dst, int64_t ldd) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    uint16_t* d = dst + m * ldd;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256((__m256i*)(d + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + k)));
    if (k < ldd) {
      float t[16] = {};
      for (int64_t i = k; i < K; ++i) t[i - k] = a[i];
      uint16_t o[16];
      _mm256_storeu_si256((__m256i*)o, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(t)));
      for (int64_t i = k; i < ldd; ++i) d[i] = o[i - k];
    }
  }
}

}  // namespace GK_ISA
}  // namespace gk
