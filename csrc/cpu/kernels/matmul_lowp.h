// matmul_lowp.h — Conv1D's matmul over reduced-precision weights (fp16, bf16, int8 in the Panels layout), fp32
// activations and accumulation.
//
// Reference: y[m, n] = Σ_k x[m, k] · deq(W[k, n]) + b[n], deq = the stored value widened to fp32 (fp16, bf16) or
// q · scale[k / G][n] (int8: symmetric, one fp32 scale per group of G consecutive k and output column).
// Decode (few rows) is bound by the bytes of W, which these formats halve or quarter: matmul_panel_lowp widens
// each panel row in registers (vec.h's load_w) and never writes it back. int8 sums each group of G products
// unscaled, then adds group_sum · scale (one multiply per group, not per weight). Prefill is bound by FMAs, so
// unpack_panel widens a K block of a panel into an fp32 [kc][32] buffer once, and the fp32 micro-kernel
// (matmul.h) runs over it for every row block of x.
namespace gk {
namespace GK_ISA {

// s[r] += Σ_{k in [k0, k1)} A[r][k] · deq(Bp[k]) (unscaled). With ≤ 2 rows on 32 registers, even and odd k go
// to separate sums (added at the end) so twice the loads are in flight (matmul.h's GEMV note); more rows give
// enough independent chains by themselves.
template <int MR, WType W, class PF>
GK_INLINE void lowp_accumulate(vf (&s)[MR][NV], const float* A, int64_t lda, const void* Bp, int64_t k0, int64_t k1,
                               PF& pf) {
  int64_t k = k0;
  if constexpr (MR <= 2 && GK_VREGS >= 32) {
    vf s1[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) s1[r][v] = vf{};
    for (; k + 2 <= k1; k += 2) {
      pf.step();
      pf.step();
      vf b0[NV], b1[NV];
      for (int v = 0; v < NV; ++v) b0[v] = load_w<W>(Bp, k * kPanel + v * VL);
      for (int v = 0; v < NV; ++v) b1[v] = load_w<W>(Bp, (k + 1) * kPanel + v * VL);
      for (int r = 0; r < MR; ++r) {
        const vf a0 = bcast(A[r * lda + k]), a1 = bcast(A[r * lda + k + 1]);
        for (int v = 0; v < NV; ++v) s[r][v] += a0 * b0[v];
        for (int v = 0; v < NV; ++v) s1[r][v] += a1 * b1[v];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) s[r][v] += s1[r][v];
  }
  for (; k < k1; ++k) {
    pf.step();
    vf b0[NV];
    for (int v = 0; v < NV; ++v) b0[v] = load_w<W>(Bp, k * kPanel + v * VL);
    for (int r = 0; r < MR; ++r) {
      const vf a0 = bcast(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) s[r][v] += a0 * b0[v];
    }
  }
}

template <int MR, WType W, class PF>
GK_INLINE void lowp_tile(const float* A, int64_t lda, int64_t K, const void* Bp, const float* scales, int64_t G,
                         float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr,
                         PF& pf) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  if constexpr (W != WType::I8) {
    lowp_accumulate<MR, W, PF>(acc, A, lda, Bp, 0, K, pf);
  } else {  // per group of G: the unscaled group sum, then one multiply by the group's scales
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      vf s[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) s[r][v] = vf{};
      lowp_accumulate<MR, W, PF>(s, A, lda, Bp, g0, g0 + G < K ? g0 + G : K, pf);
      const float* sg = scales + (g0 / G) * kPanel;
      for (int v = 0; v < NV; ++v) {
        const vf sc = load(sg + v * VL);
        for (int r = 0; r < MR; ++r) acc[r][v] += s[r][v] * sc;
      }
    }
  }
  finish_tile<MR>(acc, C, ldc, ncols, bias, epi, R, ldr);
}

template <int MR, WType W, class PF>
GK_INLINE void lowp_rows(const float* A, int64_t lda, int64_t M, int64_t K, const void* Bp, const float* scales,
                         int64_t G, float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi, const float* R,
                         int64_t ldr, PF& pf) {
  // rows in tiles of MR: each widened weight vector is shared by a tile's rows
  if constexpr (MR > 0) {
    for (; M >= MR; M -= MR, A += MR * lda, C += MR * ldc, R = R ? R + MR * ldr : R)
      lowp_tile<MR, W, PF>(A, lda, K, Bp, scales, G, C, ldc, ncols, bias, epi, R, ldr, pf);
    if (M > 0) lowp_rows<MR - 1, W, PF>(A, lda, M, K, Bp, scales, G, C, ldc, ncols, bias, epi, R, ldr, pf);
  }
}

// Several rows on 16 registers, where a tile holds one or two rows and each tile would widen the whole panel again:
// each chunk of KC panel rows is widened once into an L1 buffer, then every row runs over it. A row's arithmetic is
// exactly lowp_tile<1, W>'s (one FMA chain per column vector, over k in order; int8: each group's sum scaled once),
// its sums kept in memory between chunks, so the result is the same bits as one row at a time.
// sm[r] += Σ_{k < kc} A[r][k] · buf[k] for MR rows at once: each row's chains are its own (the same sums as alone),
// MR rows only give the FMA units MR · NV independent chains instead of NV
template <int MR>
GK_INLINE void shared_chunk(const float* A, int64_t lda, int64_t kc, const float* buf, float (*sm)[kPanel]) {
  vf s[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = load(sm[r] + v * VL);
  for (int64_t k = 0; k < kc; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(buf + k * kPanel + v * VL);
    for (int r = 0; r < MR; ++r) {
      const vf a = bcast(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) s[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(sm[r] + v * VL, s[r][v]);
}

template <WType W, class PF>
GK_INLINE void lowp_rows_shared(const float* A, int64_t lda, int64_t M, int64_t K, const void* Bp, const float* scales,
                                int64_t G, float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi,
                                const float* R, int64_t ldr, PF& pf) {
  constexpr int64_t KC = 64, MB = 16;
  alignas(64) float buf[KC * kPanel];
  alignas(64) float sm[MB][kPanel], accm[MB][kPanel];
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t mb = M - m0 < MB ? M - m0 : MB;
    const float* a0 = A + m0 * lda;
    for (int64_t r = 0; r < mb; ++r)
      for (int j = 0; j < kPanel; ++j) accm[r][j] = 0.f;
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      const int64_t g1 = g0 + G < K ? g0 + G : K;
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < kPanel; ++j) sm[r][j] = 0.f;
      for (int64_t k0 = g0; k0 < g1; k0 += KC) {
        const int64_t kc = g1 - k0 < KC ? g1 - k0 : KC;
        for (int64_t k = 0; k < kc; ++k) {
          pf.step();
          for (int v = 0; v < NV; ++v) store(buf + k * kPanel + v * VL, load_w<W>(Bp, (k0 + k) * kPanel + v * VL));
        }
        int64_t r = 0;
        for (; r + 3 <= mb; r += 3) shared_chunk<3>(a0 + r * lda + k0, lda, kc, buf, sm + r);
        if (mb - r == 2) shared_chunk<2>(a0 + r * lda + k0, lda, kc, buf, sm + r);
        if (mb - r == 1) shared_chunk<1>(a0 + r * lda + k0, lda, kc, buf, sm + r);
      }
      if constexpr (W == WType::I8) {
        const float* sg = scales + (g0 / G) * kPanel;
        for (int64_t r = 0; r < mb; ++r)
          for (int v = 0; v < NV; ++v)
            store(accm[r] + v * VL, load(accm[r] + v * VL) + load(sm[r] + v * VL) * load(sg + v * VL));
      }
    }
    for (int64_t r = 0; r < mb; ++r) {  // int8: the scaled group sums; else the one group's (G = K) sums
      vf acc[1][NV];
      for (int v = 0; v < NV; ++v) acc[0][v] = load((W == WType::I8 ? accm[r] : sm[r]) + v * VL);
      finish_tile<1>(acc, C + (m0 + r) * ldc, ldc, ncols, bias, epi, R ? R + (m0 + r) * ldr : R, ldr);
    }
  }
}

// rows per tile, as many as the registers hold: 32 registers: 8 rows × 2 sums (int8: 6 × 2 sums + 6 × 2 group sums);
// 16 registers (AVX2: 4 vectors per panel row): 2 rows, int8 1 (its group sums double the need)
constexpr int kLowpTile = GK_VREGS >= 32 ? 8 : 2, kLowpTileI8 = GK_VREGS >= 32 ? 6 : 1;

template <class PF>
GK_INLINE void lowp_panel(const float* A, int64_t lda, int64_t M, int64_t K, const void* Bp, WType w,
                          const float* scales, int64_t G, float* C, int64_t ldc, int ncols, const float* bias,
                          Epilogue epi, const float* R, int64_t ldr, PF& pf) {
  constexpr int T = kLowpTile, T8 = kLowpTileI8;
  if constexpr (GK_VREGS < 32) {
    if (M >= 2) {  // rows share each widened chunk (lowp_rows_shared)
      switch (w) {
        case WType::F16:
          return lowp_rows_shared<WType::F16>(A, lda, M, K, Bp, nullptr, K, C, ldc, ncols, bias, epi, R, ldr, pf);
        case WType::BF16:
          return lowp_rows_shared<WType::BF16>(A, lda, M, K, Bp, nullptr, K, C, ldc, ncols, bias, epi, R, ldr, pf);
        case WType::I8:
          return lowp_rows_shared<WType::I8>(A, lda, M, K, Bp, scales, G, C, ldc, ncols, bias, epi, R, ldr, pf);
        case WType::F32: break;
      }
    }
  }
  switch (w) {
    case WType::F16:
      lowp_rows<T, WType::F16>(A, lda, M, K, Bp, nullptr, K, C, ldc, ncols, bias, epi, R, ldr, pf);
      break;
    case WType::BF16:
      lowp_rows<T, WType::BF16>(A, lda, M, K, Bp, nullptr, K, C, ldc, ncols, bias, epi, R, ldr, pf);
      break;
    case WType::I8: lowp_rows<T8, WType::I8>(A, lda, M, K, Bp, scales, G, C, ldc, ncols, bias, epi, R, ldr, pf); break;
    case WType::F32:
      lowp_rows<T, WType::F32>(A, lda, M, K, Bp, nullptr, K, C, ldc, ncols, bias, epi, R, ldr, pf);
      break;
  }
}

static void matmul_panel_lowp(const float* A, int64_t lda, int64_t M, int64_t K, const void* Bp, WType w,
                              const float* scales, int64_t group, float* C, int64_t ldc, int64_t n0, int ncols,
                              const float* bias, Epilogue epi, const float* R, int64_t ldr, const void* prefetch,
                              int64_t prefetch_bytes) {
  C += n0;
  bias = bias ? bias + n0 : nullptr;
  R = R ? R + n0 : nullptr;
  const int64_t G = scales ? group : K;
  if (!prefetch) {  // no prefetch instructions at all: a step's one-row loop is short, and memory-bound
    NoPrefetch none;
    return lowp_panel(A, lda, M, K, Bp, w, scales, G, C, ldc, ncols, bias, epi, R, ldr, none);
  }
  // steps: one per k per pass over the panel (a tile of rows; on 16 registers lowp_rows_shared's 16 rows)
  const int64_t rows = GK_VREGS < 32 ? 16 : w == WType::I8 ? kLowpTileI8 : kLowpTile;
  SpreadPrefetch pf(prefetch, prefetch_bytes, (M + rows - 1) / rows * K);
  lowp_panel(A, lda, M, K, Bp, w, scales, G, C, ldc, ncols, bias, epi, R, ldr, pf);
}

template <WType W>
GK_INLINE void unpack_rows(const void* Bp, const float* scales, int64_t G, int64_t k0, int64_t kc, float* dst) {
  for (int64_t k = 0; k < kc; ++k) {
    const int64_t kk = k0 + k;
    for (int v = 0; v < NV; ++v) {
      vf x = load_w<W>(Bp, kk * kPanel + v * VL);
      if (scales) x *= load(scales + (kk / G) * kPanel + v * VL);
      store(dst + k * kPanel + v * VL, x);
    }
  }
}

static void unpack_panel(const void* Bp, WType w, const float* scales, int64_t group, int64_t k0, int64_t kc,
                         float* dst) {
  switch (w) {
    case WType::F16: unpack_rows<WType::F16>(Bp, nullptr, 1, k0, kc, dst); break;
    case WType::BF16: unpack_rows<WType::BF16>(Bp, nullptr, 1, k0, kc, dst); break;
    case WType::I8: unpack_rows<WType::I8>(Bp, scales, group, k0, kc, dst); break;
    case WType::F32: unpack_rows<WType::F32>(Bp, nullptr, 1, k0, kc, dst); break;
  }
}

}  // namespace GK_ISA
}  // namespace gk
