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

template <int MR>
GK_INLINE void bf16dot_tile(const uint16_t* A, int64_t lda, int64_t K2, const uint16_t* Bp, float* C, int64_t ldc,
                            int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr, int part) {
  vf acc[MR][NV];
  if (part & kKFirst) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  } else {
    for (int r = 0; r < MR; ++r) {
      float in[kPanel] = {};
      for (int j = 0; j < ncols; ++j) in[j] = C[r * ldc + j];
      for (int v = 0; v < NV; ++v) acc[r][v] = load(in + v * VL);
    }
  }
  for (int64_t k2 = 0; k2 < K2; ++k2) {  // k2: the pair (2·k2, 2·k2 + 1)
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp + k2 * 2 * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(Bp + k2 * 2 * kPanel + 32);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, A + r * lda + 2 * k2, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = (vf)_mm512_dpbf16_ps((__m512)acc[r][0], a, b0);
      acc[r][1] = (vf)_mm512_dpbf16_ps((__m512)acc[r][1], a, b1);
    }
  }
  if (!(part & kKLast)) {
    for (int r = 0; r < MR; ++r) {
      float out[kPanel];
      for (int v = 0; v < NV; ++v) store(out + v * VL, acc[r][v]);
      for (int j = 0; j < ncols; ++j) C[r * ldc + j] = out[j];
    }
    return;
  }
  finish_tile<MR>(acc, C, ldc, ncols, bias, epi, R, ldr);
}

template <int MR>
GK_INLINE void bf16dot_rows(const uint16_t* A, int64_t lda, int64_t M, int64_t K2, const uint16_t* Bp, float* C,
                            int64_t ldc, int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr,
                            int part) {
  if constexpr (MR > 0) {
    for (; M >= MR; M -= MR, A += MR * lda, C += MR * ldc, R = R ? R + MR * ldr : R)
      bf16dot_tile<MR>(A, lda, K2, Bp, C, ldc, ncols, bias, epi, R, ldr, part);
    if (M > 0) bf16dot_rows<MR - 1>(A, lda, M, K2, Bp, C, ldc, ncols, bias, epi, R, ldr, part);
  }
}

// A: bf16 rows (lda elements apart) from column k0 on; kc (even) columns; Bp: [kc/2][32][2] pairs
static void bf16dot_panel(const uint16_t* A, int64_t lda, int64_t M, int64_t kc, const uint16_t* Bp, float* C,
                          int64_t ldc, int64_t n0, int ncols, const float* bias, Epilogue epi, const float* R,
                          int64_t ldr, int part) {
  bf16dot_rows<GK_MR_MAX>(A, lda, M, kc / 2, Bp, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                          R ? R + n0 : nullptr, ldr, part);
}

// int8 weights: the codes (−127..127) are exact in bf16, so the products are those of the stored codes; each group
// of G consecutive k (G even: pairs never straddle a group) is summed apart and scaled once, as matmul_lowp.h does.
// 6 rows: 2 × 6 sums + 2 × 6 group sums + 3 operands in 32 registers.
template <int MR>
GK_INLINE void bf16dot_tile_q(const uint16_t* A, int64_t lda, int64_t K2, const uint16_t* Bp, const float* sc,
                              int64_t G2, float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi,
                              const float* R, int64_t ldr, int part) {
  vf acc[MR][NV];
  if (part & kKFirst) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  } else {
    for (int r = 0; r < MR; ++r) {
      float in[kPanel] = {};
      for (int j = 0; j < ncols; ++j) in[j] = C[r * ldc + j];
      for (int v = 0; v < NV; ++v) acc[r][v] = load(in + v * VL);
    }
  }
  for (int64_t g = 0; g < K2; g += G2) {
    vf sum[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) sum[r][v] = vf{};
    for (int64_t k2 = g; k2 < g + G2; ++k2) {
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
    const float* sg = sc + (g / G2) * kPanel;
    for (int v = 0; v < NV; ++v) {
      const vf s = load(sg + v * VL);
      for (int r = 0; r < MR; ++r) acc[r][v] += sum[r][v] * s;
    }
  }
  if (!(part & kKLast)) {
    for (int r = 0; r < MR; ++r) {
      float out[kPanel];
      for (int v = 0; v < NV; ++v) store(out + v * VL, acc[r][v]);
      for (int j = 0; j < ncols; ++j) C[r * ldc + j] = out[j];
    }
    return;
  }
  finish_tile<MR>(acc, C, ldc, ncols, bias, epi, R, ldr);
}

template <int MR>
GK_INLINE void bf16dot_rows_q(const uint16_t* A, int64_t lda, int64_t M, int64_t K2, const uint16_t* Bp,
                              const float* sc, int64_t G2, float* C, int64_t ldc, int ncols, const float* bias,
                              Epilogue epi, const float* R, int64_t ldr, int part) {
  if constexpr (MR > 0) {
    for (; M >= MR; M -= MR, A += MR * lda, C += MR * ldc, R = R ? R + MR * ldr : R)
      bf16dot_tile_q<MR>(A, lda, K2, Bp, sc, G2, C, ldc, ncols, bias, epi, R, ldr, part);
    if (M > 0) bf16dot_rows_q<MR - 1>(A, lda, M, K2, Bp, sc, G2, C, ldc, ncols, bias, epi, R, ldr, part);
  }
}

// the same over int8 codes: kc a multiple of the (even) group G, sc the block's first group of scales [.][32]
static void bf16dot_panel_q(const uint16_t* A, int64_t lda, int64_t M, int64_t kc, const uint16_t* Bp,
                            const float* sc, int64_t G, float* C, int64_t ldc, int64_t n0, int ncols,
                            const float* bias, Epilogue epi, const float* R, int64_t ldr, int part) {
  bf16dot_rows_q<6>(A, lda, M, kc / 2, Bp, sc, G / 2, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                    R ? R + n0 : nullptr, ldr, part);
}

// rows [k0, k0 + kc) (kc even) of a stored int8 panel as exact bf16 pairs [kc/2][32][2]
static void int8_pairs(const int8_t* panel, int64_t k0, int64_t kc, uint16_t* dst) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  auto row = [&](int64_t k) {  // 32 codes -> 32 bf16 (exact)
    const int8_t* p = panel + (k0 + k) * kPanel;
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a -> elements 0..15, b -> 16..31
  };
  for (int64_t k = 0; k < kc; k += 2) {
    const __m512i r0 = row(k), r1 = row(k + 1);
    _mm512_storeu_si512(dst + k * kPanel, _mm512_permutex2var_epi16(r0, lo, r1));
    _mm512_storeu_si512(dst + k * kPanel + 32, _mm512_permutex2var_epi16(r0, hi, r1));
  }
}

// rows [k0, k0 + kc) of a stored bf16 panel [K][32] (K rows in all) as pairs [ceil(kc/2)][32][2]; a missing odd
// row is zero
static void bf16_pairs(const uint16_t* panel, int64_t K, int64_t k0, int64_t kc, uint16_t* dst) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < kc; k += 2) {
    const __m512i r0 = _mm512_loadu_si512(panel + (k0 + k) * kPanel);
    const __m512i r1 = k0 + k + 1 < K && k + 1 < kc ? _mm512_loadu_si512(panel + (k0 + k + 1) * kPanel)
                                                    : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + k * kPanel, _mm512_permutex2var_epi16(r0, lo, r1));
    _mm512_storeu_si512(dst + k * kPanel + 32, _mm512_permutex2var_epi16(r0, hi, r1));
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
