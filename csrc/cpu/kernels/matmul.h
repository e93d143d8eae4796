// matmul.h — Conv1D's y = x @ W + b over one packed panel of 32 output columns, with the epilogue fused.
//
// Reference: y[m, n] = Σ_k x[m, k] · W[k, n] + b[n], then gelu_new or + residual[m, n].
// B rows are 32 consecutive floats, ldb apart: a packed panel [K][32] (ldb = 32), or 32 columns of HF's own
// [K, N] weight read in place (ldb = N). The inner loop reads those 32 floats per k: a
// register tile of MR rows × 32 columns accumulates over K, and the epilogue runs on the registers before the
// store. For a long K the caller splits K into blocks (so a block of x rows stays in L2): the first block starts
// from zero, later ones from the partial sums in C, only the last adds the bias and applies the epilogue; the
// order of the additions is exactly that of one unsplit pass. For decode (M = 1..8) the same tile is a GEMV that
// reads each weight byte exactly once.
namespace gk {
namespace GK_ISA {

constexpr int NV = kPanel / VL;  // vectors per panel row

// The end of a panel tile: + bias, the epilogue in registers, then the store of ncols (<= 32) columns.
template <int MR>
GK_INLINE void finish_tile(vf (&acc)[MR][NV], float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi,
                           const float* R, int64_t ldr) {
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

// A tile's sums at the start of a K block: zero for the first, else the partial sums an earlier block left in C.
template <int MR>
GK_INLINE void start_tile(vf (&acc)[MR][NV], const float* C, int64_t ldc, int ncols, int part) {
  for (int r = 0; r < MR; ++r) {
    if (part & kKFirst) {
      for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
    } else {
      float in[kPanel] = {};
      for (int j = 0; j < ncols; ++j) in[j] = C[r * ldc + j];
      for (int v = 0; v < NV; ++v) acc[r][v] = load(in + v * VL);
    }
  }
}

// ... and at its end: partial sums back to C (no bias, no epilogue yet), or finish_tile after the last block.
template <int MR>
GK_INLINE void end_tile(vf (&acc)[MR][NV], float* C, int64_t ldc, int ncols, const float* bias, Epilogue epi,
                        const float* R, int64_t ldr, int part) {
  if (part & kKLast) return finish_tile<MR>(acc, C, ldc, ncols, bias, epi, R, ldr);
  for (int r = 0; r < MR; ++r) {
    float out[kPanel];
    for (int v = 0; v < NV; ++v) store(out + v * VL, acc[r][v]);
    for (int j = 0; j < ncols; ++j) C[r * ldc + j] = out[j];
  }
}

template <int MR>
GK_INLINE void matmul_tile(const float* A, int64_t lda, int64_t K, const float* Bp, int64_t ldb, float* C, int64_t ldc,
                           int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr, int part) {
  vf acc[MR][NV];
  start_tile<MR>(acc, C, ldc, ncols, part);
  int64_t k = 0;
  if constexpr (MR <= 2) {
    // GEMV (decode): with so few rows the FMA latency chain, not bandwidth, would bound the loop; even and odd k
    // go to separate accumulators (summed at the end) so twice as many loads are in flight
    vf acc2[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc2[r][v] = vf{};
    for (; k + 2 <= K; k += 2) {
      vf b0[NV], b1[NV];
      for (int v = 0; v < NV; ++v) b0[v] = load(Bp + k * ldb + v * VL);
      for (int v = 0; v < NV; ++v) b1[v] = load(Bp + (k + 1) * ldb + v * VL);
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
    for (int v = 0; v < NV; ++v) b[v] = load(Bp + k * ldb + v * VL);
    for (int r = 0; r < MR; ++r) {
      vf a = bcast(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  end_tile<MR>(acc, C, ldc, ncols, bias, epi, R, ldr, part);
}

template <int MR>
GK_INLINE void matmul_rows(const float* A, int64_t lda, int64_t M, int64_t K, const float* Bp, int64_t ldb, float* C,
                           int64_t ldc, int ncols, const float* bias, Epilogue epi, const float* R, int64_t ldr,
                           int part) {
  if constexpr (MR > 0) {
    if (M >= MR) {
      int64_t m = 0;
      for (; m + MR <= M; m += MR)
        matmul_tile<MR>(A + m * lda, lda, K, Bp, ldb, C + m * ldc, ldc, ncols, bias, epi, R ? R + m * ldr : R, ldr,
                        part);
      M -= m;
      A += m * lda;
      C += m * ldc;
      if (R) R += m * ldr;
    }
    if (M > 0) matmul_rows<MR - 1>(A, lda, M, K, Bp, ldb, C, ldc, ncols, bias, epi, R, ldr, part);
  }
}

static void matmul_panel(const float* A, int64_t lda, int64_t M, int64_t K, const float* Bp, int64_t ldb, float* C,
                         int64_t ldc, int64_t n0, int ncols, const float* bias, Epilogue epi, const float* R,
                         int64_t ldr, int part) {
  matmul_rows<GK_MR_MAX>(A, lda, M, K, Bp, ldb, C + n0, ldc, ncols, bias ? bias + n0 : nullptr, epi,
                         R ? R + n0 : nullptr, ldr, part);
}

// Decode GEMV over HF's own [K, N] weight (rows ldw apart): acc[m][0, n) = Σ_k A[m][k] · W[k][0, n) for M rows of x
// (the caller adds the bias and applies the epilogue; decode has M <= kn_gemv_rows, speculative decoding's verify one
// row per position). Each k reads one contiguous row of W — a stream the prefetchers follow, where 32-column panels
// read in place would jump a whole row per k — and eight rows go into one pass over the sums, so each sum is loaded and
// stored once per eight FMAs (with two rows per pass the sums' loads and stores, not DRAM, were the limit).
// gemv_rows_shared: the same sums for more rows, with the eight W vectors of a column block in registers while every
// row uses them (x's broadcasts from a buffer), so extra rows cost FMAs, not W's bytes again. With several rows the
// FMAs take longer than W's bytes take to arrive, and the hardware prefetchers, paced by the loads, stop running
// ahead: so each block of eight W rows prefetches the next eight into L2 (not L1, where it would evict x and the
// sums) and DRAM keeps streaming while the FMAs run (one row gains a little from it too).

// One row's sums over eight rows of W (w), the columns [0, nv) in vectors and [nv, n) one by one. Every path below
// adds a row's terms in k order, one FMA each, onto one running sum (no second chain, whose closing add would
// tie a register tile to pairs of sums), so a row's sums are the same bits on each.
GK_INLINE vf gemv8(const vf (&a)[8], const vf (&wr)[8], const float* am) {
  vf s = load(am);
  for (int r = 0; r < 8; ++r) s += a[r] * wr[r];
  return s;
}
GK_INLINE void gemv8_tail(const float* am_, const float* __restrict__ w, int64_t ldw, int64_t nv, int64_t n,
                          float* am) {
  for (int64_t j = nv; j < n; ++j) {
    float s = am[j];
    for (int r = 0; r < 8; ++r) s += am_[r] * w[r * ldw + j];
    am[j] = s;
  }
}
GK_INLINE void gemv_last_rows(const float* A, int64_t lda, int64_t M, int64_t k, int64_t K, const float* W, int64_t ldw,
                              int64_t nv, int64_t n, float* acc) {
  for (; k < K; ++k) {  // the last K % 8 rows
    const float* w0 = W + k * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const vf a0 = bcast(A[m * lda + k]);
      float* am = acc + m * n;
      for (int64_t j = 0; j < nv; j += VL) store(am + j, load(am + j) + a0 * load(w0 + j));
      for (int64_t j = nv; j < n; ++j) am[j] = am[j] + A[m * lda + k] * w0[j];
    }
  }
}

static void gemv_rows_shared(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t n,
                             float* acc) {
  constexpr int64_t MB = 16;  // rows of x per pass over a block of eight W rows
  const int64_t nv = n / VL * VL;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const float* __restrict__ w = W + k * ldw;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int64_t mb = M - m0 < MB ? M - m0 : MB;
      vf a[MB][8];
      for (int64_t m = 0; m < mb; ++m)
        for (int r = 0; r < 8; ++r) a[m][r] = bcast(A[(m0 + m) * lda + k + r]);
      const bool ahead = m0 == 0 && k + 16 <= K;
      for (int64_t j = 0; j < nv; j += VL) {
        vf wr[8];
        for (int r = 0; r < 8; ++r) wr[r] = load(w + r * ldw + j);
        if (ahead)
          for (int r = 8; r < 16; ++r) prefetch_l2(w + r * ldw + j);
        for (int64_t m = 0; m < mb; ++m) {
          float* am = acc + (m0 + m) * n + j;
          store(am, gemv8(a[m], wr, am));
        }
      }
      for (int64_t m = m0; m < m0 + mb; ++m) gemv8_tail(A + m * lda + k, w, ldw, nv, n, acc + m * n);
    }
  }
  gemv_last_rows(A, lda, M, k, K, W, ldw, nv, n, acc);
}

// gemv_rows_tiled: the same sums for more rows (from kGemvTiledRows), as register tiles of up to kGemvMR rows × two
// vectors of columns whose sums stay in registers over a pass of W's rows: per k, two loads of W and MR broadcasts
// feed 2·MR FMAs, where gemv_rows_shared loads and stores every row's sums per eight FMAs and takes x's broadcasts
// from memory (its FMAs then ran at a third of this core's rate, bench/RESULTS.md). A pass is whole groups of eight
// rows of W, about kGemvPassFloats, in L2 while each row tile reads it; the next pass's rows are prefetched into L2,
// in DRAM order, as the tiles run (from the last pass, the caller's next block's). Tiles three vectors wide (8 × 3)
// were 15–25 % slower than two at 6–16 rows on every GPT-2 shape (RESULTS); AVX-512 holds 9 × 2 sums, AVX2 6 × 2.
// A tile's rows of x are first copied into [k][MR] order, so one pointer addresses every broadcast (MR row pointers
// took the general registers, and the tile's inner loop spilled them).
constexpr int64_t kGemvTiledRows = 6;       // below it gemv_rows_shared was as fast or faster (RESULTS)
constexpr int64_t kGemvPassFloats = 32768;  // 128 KB of W per pass
constexpr int64_t kGemvPassRows = 256;      // and at most this many rows (the buffer of x is sized by it)
constexpr int kGemvMR = GK_VREGS >= 32 ? 9 : 6;
constexpr int kGemvGV = 2;

// One k of a tile: s += x[r] · W[k] for its MR rows (x: the tile's packed x at k) and GV vectors.
template <int MR, int GV>
GK_INLINE void gemv_tile_k(const float* x, const float* __restrict__ w, vf (&s)[MR][GV]) {
  vf wv[GV];
  _Pragma("GCC unroll 16") for (int v = 0; v < GV; ++v) wv[v] = load(w + v * VL);
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {
    const vf xr = bcast(x[r]);
    _Pragma("GCC unroll 16") for (int v = 0; v < GV; ++v) s[r][v] += xr * wv[v];
  }
}

// Rows [0, MR) × columns [0, GV·VL) of the sums over K rows of W, in k order (gemv8's arithmetic); X is the tile's
// x packed [k][MR]. The loops are unrolled by pragma (left rolled, the sums stay in memory); one pointer walks W's
// rows and one X (eight row addresses held at once would take the general registers).
template <int MR, int GV>
GK_INLINE void gemv_tile(const float* X, int64_t K, const float* W, int64_t ldw, float* acc, int64_t n,
                         SpreadPrefetch& pf) {
  vf s[MR][GV];
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) _Pragma("GCC unroll 16") for (int v = 0; v < GV; ++v) s[r][v] =
      load(acc + r * n + v * VL);
  const float* x = X;
  const float* w = W;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    pf.step();
    _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i, x += MR, w += ldw) gemv_tile_k<MR, GV>(x, w, s);
  }
  for (; k < K; ++k, x += MR, w += ldw) gemv_tile_k<MR, GV>(x, w, s);
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) _Pragma("GCC unroll 16") for (int v = 0; v < GV; ++v)
      store(acc + r * n + v * VL, s[r][v]);
}

// Rows [0, MR) of the tiles over vector columns [0, nv): whole tiles, then single vectors.
template <int MR>
GK_INLINE void gemv_tiles_rows(const float* X, int64_t K, const float* W, int64_t ldw, float* acc, int64_t n,
                               int64_t nv, SpreadPrefetch& pf) {
  int64_t j = 0;
  for (; j + kGemvGV * VL <= nv; j += kGemvGV * VL) gemv_tile<MR, kGemvGV>(X, K, W + j, ldw, acc + j, n, pf);
  for (; j < nv; j += VL) gemv_tile<MR, 1>(X, K, W + j, ldw, acc + j, n, pf);
}

static void gemv_rows_tiled(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t n,
                            float* acc, int64_t next_rows) {
  const int64_t nv = n / VL * VL;
  const int64_t groups = kGemvPassFloats / 8 / (n > 0 ? n : 1);  // rows per pass: whole groups of 8, at most the cap
  const int64_t KS = groups < 1 ? 8 : groups > kGemvPassRows / 8 ? kGemvPassRows : 8 * groups;
  // rows in tiles as even as kGemvMR allows (a 1-row tile would read the pass again for few FMAs)
  const int64_t tiles = (M + kGemvMR - 1) / kGemvMR, base = M / tiles, bigger = M % tiles;
  alignas(64) float X[(kGemvPassRows + 8) * kGemvMR];  // a tile's x over a pass, [k][MR]
  for (int64_t k0 = 0, kc; k0 < K; k0 += kc) {
    kc = K - k0 - KS < 8 ? K - k0 : KS;  // the last pass takes the K % 8 rows too
    // the next pass's rows: this block's, or from the last pass the first of the caller's next block
    const int64_t left = K - k0 - kc;
    const int64_t next = left > 0 ? (left - KS < 8 ? left : KS) : (next_rows < KS ? next_rows : KS);
    SpreadPrefetch pf(next > 0 ? W + (k0 + kc) * ldw : nullptr,
                      next > 0 ? ((next - 1) * ldw + n) * (int64_t)sizeof(float) : 0,
                      tiles * (nv / (kGemvGV * VL) + 1) * (kc / 8));  // about one step per tile and 8 k
    const float* w = W + k0 * ldw;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t mr = base + (t < bigger);
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t r = 0; r < mr; ++r) X[k * mr + r] = A[(m + r) * lda + k0 + k];
      float* c = acc + m * n;
      switch (mr) {
        case 1: gemv_tiles_rows<1>(X, kc, w, ldw, c, n, nv, pf); break;
        case 2: gemv_tiles_rows<2>(X, kc, w, ldw, c, n, nv, pf); break;
        case 3: gemv_tiles_rows<3>(X, kc, w, ldw, c, n, nv, pf); break;
        case 4: gemv_tiles_rows<4>(X, kc, w, ldw, c, n, nv, pf); break;
        case 5: gemv_tiles_rows<5>(X, kc, w, ldw, c, n, nv, pf); break;
        case 6: gemv_tiles_rows<6>(X, kc, w, ldw, c, n, nv, pf); break;
#if GK_VREGS >= 32
        case 7: gemv_tiles_rows<7>(X, kc, w, ldw, c, n, nv, pf); break;
        case 8: gemv_tiles_rows<8>(X, kc, w, ldw, c, n, nv, pf); break;
        case 9: gemv_tiles_rows<9>(X, kc, w, ldw, c, n, nv, pf); break;
#endif
        default: break;
      }
      m += mr;
    }
  }
  if (nv < n) {  // the columns past the last vector, as the one-row path sums them
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      for (int64_t m = 0; m < M; ++m) gemv8_tail(A + m * lda + k, W + k * ldw, ldw, nv, n, acc + m * n);
    for (; k < K; ++k)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = nv; j < n; ++j) acc[m * n + j] = acc[m * n + j] + A[m * lda + k] * W[k * ldw + j];
  }
}

static void gemv_rows(const float* A, int64_t lda, int64_t M, int64_t K, const float* W, int64_t ldw, int64_t n,
                      float* acc, int64_t next_rows) {
  for (int64_t x = 0; x < M * n; ++x) acc[x] = 0.f;
  if (M > 2) {
    return M < kGemvTiledRows ? gemv_rows_shared(A, lda, M, K, W, ldw, n, acc)
                              : gemv_rows_tiled(A, lda, M, K, W, ldw, n, acc, next_rows);
  }
  const int64_t nv = n / VL * VL;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const float* __restrict__ w = W + k * ldw;
    const bool ahead = k + 16 <= K;
    for (int64_t m = 0; m < M; ++m) {
      vf a[8];
      for (int r = 0; r < 8; ++r) a[r] = bcast(A[m * lda + k + r]);
      float* __restrict__ am = acc + m * n;
      for (int64_t j = 0; j < nv; j += VL) {  // gemv8 with W read in place (as memory operands of the FMAs)
        if (m == 0 && ahead)
          for (int r = 8; r < 16; ++r) prefetch_l2(w + r * ldw + j);
        vf s = load(am + j);
        for (int r = 0; r < 8; ++r) s += a[r] * load(w + r * ldw + j);
        store(am + j, s);
      }
      gemv8_tail(A + m * lda + k, w, ldw, nv, n, am);
    }
  }
  gemv_last_rows(A, lda, M, k, K, W, ldw, nv, n, acc);
}

}  // namespace GK_ISA
}  // namespace gk
