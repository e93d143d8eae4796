// matmul_int8dot.h — int8 weights × int8 activations: x quantized per row and group of G, integer dot products of
// four int8 pairs per int32 lane, scales applied once per group.
//
// Reference: y[m, n] = Σ_g sx[m, g] · sw[g, n] · Σ_{k in g} qx[m, k] · qw[k, n] + b[n], then the epilogue, where
// qw, sw are the stored int8 weights and their scales (matmul_lowp.h) and x's group is quantized the same way:
// sx = amax / 127, qx = round((x / amax) · 127) (nearest even), so |qx| <= 127; a group with a NaN or inf gets
// sx = NaN (its row comes out NaN, never silently finite). The integer sums are exact (|Σ| <= G · 127²), so
// every ISA below gives the same bits; only the fp32 scaling adds rounding.
//
// The dot step takes a quad of four consecutive k of x (broadcast) and, per int32 lane, the same four k of one
// column of W. x's sign moves onto W's bytes (VPSIGNB) and |x| <= 127 multiplies them, which fits both encodings
// exactly: VPMADDUBSW's u8 × s8 pair sums stay below 2^15 (127 · 127 · 2) before VPMADDWD adds pairs into int32
// (AVX2), and VPDPBUSD does all of it in one instruction (AVX-VNNI or AVX512-VNNI, the GK_INT8DOT_* macro of the
// including TU). The stored panel rows ([K][32], one k per row) are turned into quads in registers: four rows,
// eight byte and word unpacks, shared by a tile's rows — no second copy of the weights, so decode reads each byte
// once, as matmul_lowp.h does.
namespace gk {
namespace GK_ISA {

static_assert(VL == 8, "matmul_int8dot.h is written for 256-bit vectors");
typedef int32_t vi8x32 __attribute__((vector_size(32)));

// acc + Σ over the four k of each int32 lane of x's quad (xs, ax = |xs| bytewise) times W's quad (w)
GK_INLINE __m256i dot_step(__m256i acc, __m256i ax, __m256i xs, __m256i w) {
  const __m256i sw = _mm256_sign_epi8(w, xs);
#if defined(GK_INT8DOT_AVXVNNI)
  return _mm256_dpbusd_avx_epi32(acc, ax, sw);
#elif defined(GK_INT8DOT_AVX512VNNI)
  return _mm256_dpbusd_epi32(acc, ax, sw);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1)));
#endif
}

// rows k .. k+3 of a panel ([.][32] int8) as quads: q[0] columns 0-3 | 16-19, q[1] 4-7 | 20-23, q[2] 8-11 | 24-27,
// q[3] 12-15 | 28-31 (the unpacks work within 128-bit lanes), each column's four k in one int32 lane
GK_INLINE void panel_quads(const int8_t* p, __m256i (&q)[4]) {
  const __m256i r0 = _mm256_loadu_si256((const __m256i*)p), r1 = _mm256_loadu_si256((const __m256i*)(p + kPanel));
  const __m256i r2 = _mm256_loadu_si256((const __m256i*)(p + 2 * kPanel));
  const __m256i r3 = _mm256_loadu_si256((const __m256i*)(p + 3 * kPanel));
  const __m256i t0 = _mm256_unpacklo_epi8(r0, r1), t1 = _mm256_unpackhi_epi8(r0, r1);
  const __m256i t2 = _mm256_unpacklo_epi8(r2, r3), t3 = _mm256_unpackhi_epi8(r2, r3);
  q[0] = _mm256_unpacklo_epi16(t0, t2);
  q[1] = _mm256_unpackhi_epi16(t0, t2);
  q[2] = _mm256_unpacklo_epi16(t1, t3);
  q[3] = _mm256_unpackhi_epi16(t1, t3);
}

// 32 columns in natural order (n[v]: columns 8v .. 8v+7) <-> panel_quads' order
GK_INLINE void to_quad_order(const vf (&n)[4], vf (&q)[4]) {
  q[0] = (vf)_mm256_permute2f128_ps((__m256)n[0], (__m256)n[2], 0x20);
  q[1] = (vf)_mm256_permute2f128_ps((__m256)n[0], (__m256)n[2], 0x31);
  q[2] = (vf)_mm256_permute2f128_ps((__m256)n[1], (__m256)n[3], 0x20);
  q[3] = (vf)_mm256_permute2f128_ps((__m256)n[1], (__m256)n[3], 0x31);
}
GK_INLINE void to_natural_order(const vf (&q)[4], vf (&n)[4]) {
  n[0] = (vf)_mm256_permute2f128_ps((__m256)q[0], (__m256)q[1], 0x20);
  n[1] = (vf)_mm256_permute2f128_ps((__m256)q[2], (__m256)q[3], 0x20);
  n[2] = (vf)_mm256_permute2f128_ps((__m256)q[0], (__m256)q[1], 0x31);
  n[3] = (vf)_mm256_permute2f128_ps((__m256)q[2], (__m256)q[3], 0x31);
}

// MR rows × 32 columns, whole K (a multiple of G, G of 4): per group, MR × 4 int32 sums in registers; the fp32
// sums (touched once per group) live in memory, which leaves the 16 registers of AVX2 to the integer loop.
template <int MR>
GK_INLINE void int8dot_tile(const int8_t* Q, int64_t ldq, const float* S, int64_t lds, int64_t K, const int8_t* Bp,
                            const float* sw, int64_t G, float* C, int64_t ldc, int ncols, const float* bias,
                            Epilogue epi, const float* R, int64_t ldr) {
  alignas(32) float accm[MR][kPanel] = {};
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
    vi8x32 s[MR][4] = {};  // vector-extension sums: as __m256i arrays GCC copies them through memory every step
    for (int64_t k = g0; k < g0 + G; k += 4) {
      __m256i q[4];
      panel_quads(Bp + k * kPanel, q);
      for (int r = 0; r < MR; ++r) {
        int32_t quad;
        __builtin_memcpy(&quad, Q + r * ldq + k, 4);
        const __m256i xs = _mm256_set1_epi32(quad), ax = _mm256_abs_epi8(xs);
        for (int v = 0; v < 4; ++v) s[r][v] = (vi8x32)dot_step((__m256i)s[r][v], ax, xs, q[v]);
      }
    }
    vf swn[4], swq[4];
    for (int v = 0; v < 4; ++v) swn[v] = load(sw + g * kPanel + v * VL);
    to_quad_order(swn, swq);
    for (int r = 0; r < MR; ++r) {
      const vf sx = bcast(S[r * lds + g]);
      for (int v = 0; v < 4; ++v) {
        const vf sum = __builtin_convertvector(s[r][v], vf);
        store(accm[r] + v * VL, load(accm[r] + v * VL) + sum * (swq[v] * sx));
      }
    }
  }
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    vf qo[4];
    for (int v = 0; v < 4; ++v) qo[v] = load(accm[r] + v * VL);
    to_natural_order(qo, acc[r]);
  }
  finish_tile<MR>(acc, C, ldc, ncols, bias, epi, R, ldr);
}

template <int MR>
GK_INLINE void int8dot_rows(const int8_t* Q, int64_t ldq, const float* S, int64_t lds, int64_t M, int64_t K,
                            const int8_t* Bp, const float* sw, int64_t G, float* C, int64_t ldc, int ncols,
                            const float* bias, Epilogue epi, const float* R, int64_t ldr) {
  if constexpr (MR > 0) {
    for (; M >= MR; M -= MR, Q += MR * ldq, S += MR * lds, C += MR * ldc, R = R ? R + MR * ldr : R)
      int8dot_tile<MR>(Q, ldq, S, lds, K, Bp, sw, G, C, ldc, ncols, bias, epi, R, ldr);
    if (M > 0) int8dot_rows<MR - 1>(Q, ldq, S, lds, M, K, Bp, sw, G, C, ldc, ncols, bias, epi, R, ldr);
  }
}

// One panel (Bp [K][32] int8, sw its scales [K / G][32]) against M quantized rows (Q rows ldq apart, S their group
// scales, lds apart): C[m, n0 + j] = epi(y[m, n0 + j]) for j < ncols.
static void int8dot_panel(const int8_t* Q, int64_t ldq, const float* S, int64_t lds, int64_t M, int64_t K,
                          const int8_t* Bp, const float* sw, int64_t G, float* C, int64_t ldc, int64_t n0, int ncols,
                          const float* bias, Epilogue epi, const float* R, int64_t ldr) {
  int8dot_rows<GK_INT8DOT_MR>(Q, ldq, S, lds, M, K, Bp, sw, G, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                              R ? R + n0 : nullptr, ldr);
}

#if defined(GK_INT8DOT_AVX512VNNI)
// Prefill (many rows, bound by the dot products): the panel is packed once — quads already transposed, so the loop
// issues no unpacks — and 512-bit VPDPBUSD runs 12 rows at a time over it. VPDPBUSD multiplies unsigned bytes of
// its first source by signed bytes of its second, and only the second can be a broadcast from memory, so here the
// weights are the unsigned operand: w + 128 (the sign bit flipped, 1 .. 255) against x's signed codes, each row's
// sums starting a group from -128 · Σ qx. The integer sums are then dot_step's, scaled by the same expression, so the
// result has int8dot_tile's bits. The per-group scaling (convert, multiply, FMA per sum vector) is its main cost beyond
// VPDPBUSD.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

// Bp [K][32] int8 and sw [K / G][32] -> dst: K / 4 quads of 128 bytes (w + 128 in panel_quads' column order),
// then the scales in that order
static void int8dot_pack_panel(const int8_t* Bp, const float* sw, int64_t K, int64_t G, uint8_t* dst) {
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int64_t k = 0; k < K; k += 4) {
    __m256i q[4];
    panel_quads(Bp + k * kPanel, q);
    for (int v = 0; v < 4; ++v)
      _mm256_storeu_si256((__m256i*)(dst + k * kPanel + v * 32), _mm256_xor_si256(q[v], flip));
  }
  float* s = reinterpret_cast<float*>(dst + K * kPanel);
  for (int64_t g = 0; g < K / G; ++g) {
    vf n[4], q[4];
    for (int v = 0; v < 4; ++v) n[v] = load(sw + g * kPanel + v * VL);
    to_quad_order(n, q);
    for (int v = 0; v < 4; ++v) store(s + g * kPanel + v * VL, q[v]);
  }
}

// Σ_{k in g} Q[m][k] for every row and group (the correction of the unsigned weights)
static void int8dot_group_sums(const int8_t* Q, int64_t ldq, int64_t M, int64_t K, int64_t G, int32_t* XS,
                               int64_t lds) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
      int32_t t = 0;
      for (int64_t k = g0; k < g0 + G; ++k) t += Q[m * ldq + k];
      XS[m * lds + g] = t;
    }
}

// pf: the caller's next panels, prefetched a line or so per step of k (vec.h: SpreadPrefetch)
template <int MR>
GK_INLINE void int8dot_packed_tile(const int8_t* Q, int64_t ldq, const float* S, const int32_t* XS, int64_t lds,
                                   int64_t K, const uint8_t* Bq, int64_t G, float* C, int64_t ldc, int ncols,
                                   const float* bias, Epilogue epi, const float* R, int64_t ldr, SpreadPrefetch& pf) {
  const float* swq = reinterpret_cast<const float*>(Bq + K * kPanel);
  alignas(64) float accm[MR][kPanel] = {};
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
    vi16 s[MR][2];  // from -128 · Σ qx, so they come out as Σ qw · qx (vector-extension type: see int8dot_tile)
    for (int r = 0; r < MR; ++r) s[r][0] = s[r][1] = vi16{} - 128 * XS[r * lds + g];
    for (int64_t k = g0; k < g0 + G; k += 4) {
      pf.step();
      const __m512i w0 = _mm512_loadu_si512(Bq + k * kPanel), w1 = _mm512_loadu_si512(Bq + k * kPanel + 64);
      for (int r = 0; r < MR; ++r) {
        int32_t quad;
        __builtin_memcpy(&quad, Q + r * ldq + k, 4);
        const __m512i xb = _mm512_set1_epi32(quad);
        s[r][0] = (vi16)_mm512_dpbusd_epi32((__m512i)s[r][0], w0, xb);
        s[r][1] = (vi16)_mm512_dpbusd_epi32((__m512i)s[r][1], w1, xb);
      }
    }
    vf16 sw[2];
    __builtin_memcpy(&sw, swq + g * kPanel, sizeof sw);
    for (int r = 0; r < MR; ++r) {
      const vf16 sx = vf16{} + S[r * lds + g];
      for (int v = 0; v < 2; ++v) {
        const vf16 sum = __builtin_convertvector(s[r][v], vf16);
        vf16 a;
        __builtin_memcpy(&a, accm[r] + v * 16, sizeof a);
        a = a + sum * (sw[v] * sx);
        __builtin_memcpy(accm[r] + v * 16, &a, sizeof a);
      }
    }
  }
  // four rows per finish_tile (a tile of 12 would not fit its registers), so the bias is padded once per four
  constexpr int F = MR % 4 == 0 ? 4 : 1;
  for (int r = 0; r < MR; r += F) {
    vf acc[F][NV];
    for (int f = 0; f < F; ++f) {
      vf qo[4];
      for (int v = 0; v < 4; ++v) qo[v] = load(accm[r + f] + v * VL);
      to_natural_order(qo, acc[f]);
    }
    finish_tile<F>(acc, C + r * ldc, ldc, ncols, bias, epi, R ? R + r * ldr : R, ldr);
  }
}

template <int MR>
GK_INLINE void int8dot_packed_rows(const int8_t* Q, int64_t ldq, const float* S, const int32_t* XS, int64_t lds,
                                   int64_t M, int64_t K, const uint8_t* Bq, int64_t G, float* C, int64_t ldc, int ncols,
                                   const float* bias, Epilogue epi, const float* R, int64_t ldr, SpreadPrefetch& pf) {
  if constexpr (MR > 0) {
    for (; M >= MR; M -= MR, Q += MR * ldq, S += MR * lds, XS += MR * lds, C += MR * ldc, R = R ? R + MR * ldr : R)
      int8dot_packed_tile<MR>(Q, ldq, S, XS, lds, K, Bq, G, C, ldc, ncols, bias, epi, R, ldr, pf);
    if (M > 0) int8dot_packed_rows<MR - 1>(Q, ldq, S, XS, lds, M, K, Bq, G, C, ldc, ncols, bias, epi, R, ldr, pf);
  }
}

// One packed panel (int8dot_pack_panel) against M quantized rows (S and XS their group scales and sums, lds apart):
// C[m, n0 + j] = epi(y[m, n0 + j]) for j < ncols, the bits int8dot_panel gives; prefetch_bytes of `prefetch` are
// brought into cache meanwhile.
static void int8dot_packed_panel(const int8_t* Q, int64_t ldq, const float* S, const int32_t* XS, int64_t lds,
                                 int64_t M, int64_t K, const uint8_t* Bq, int64_t G, float* C, int64_t ldc, int64_t n0,
                                 int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr,
                                 const void* prefetch, int64_t prefetch_bytes) {
  // 12 rows × 2 sums + 2 weight vectors + x's broadcast: 27 of 32 registers
  SpreadPrefetch pf(prefetch, prefetch_bytes, (M + 11) / 12 * (K / 4));
  int8dot_packed_rows<12>(Q, ldq, S, XS, lds, M, K, Bq, G, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                          R ? R + n0 : nullptr, ldr, pf);
}
#endif  // GK_INT8DOT_AVX512VNNI

// x rows (lda apart, K columns) quantized per group of G consecutive columns into Q (rows ldq apart) and S (rows lds
// apart), as the reference above says.
static void int8_quantize_rows(const float* A, int64_t lda, int64_t M, int64_t K, int64_t G, int8_t* Q, int64_t ldq,
                               float* S, int64_t lds) {
  const vf sign = bcast(-0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
      const float* x = A + m * lda + g0;
      int8_t* q = Q + m * ldq + g0;
      vf vmx{}, vbad{};
      int64_t k = 0;
      for (; k + VL <= G; k += VL) {
        const vf v = load(x + k);
        vmx = vmax(vmx, (vf)_mm256_andnot_ps((__m256)sign, (__m256)v));
        vbad += v - v;  // 0, or NaN for an inf or NaN
      }
      float amax = hmax(vmx), bad = hsum(vbad);
      for (; k < G; ++k) {
        const float a = x[k] < 0 ? -x[k] : x[k];
        amax = a > amax ? a : amax;
        bad += x[k] - x[k];
      }
      if (bad != 0.f) {  // NaN: the group is not finite
        S[m * lds + g] = __builtin_nanf("");
        for (k = 0; k < G; ++k) q[k] = 0;
        continue;
      }
      S[m * lds + g] = amax / 127.f;
      if (amax == 0.f) {
        for (k = 0; k < G; ++k) q[k] = 0;
        continue;
      }
      const vf va = bcast(amax), v127 = bcast(127.f);
      for (k = 0; k + VL <= G; k += VL) {
        const __m256i i = _mm256_cvtps_epi32((__m256)((load(x + k) / va) * v127));  // nearest even
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i*)(q + k), _mm_packs_epi16(w, w));
      }
      for (; k < G; ++k) q[k] = (int8_t)__builtin_nearbyintf((x[k] / amax) * 127.f);
    }
  }
}

}  // namespace GK_ISA
}  // namespace gk
