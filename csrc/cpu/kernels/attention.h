// attention.h — causal softmax attention of a block of query rows against the KV cache, flash style.
//
// Reference: out[i] = Σ_j softmax_j(scale · q_i·k_j + mask_ij) v_j over the keys row i may see (causal:
// j ≤ q_offset + i; key_mask[j] true; bias > −inf), and out[i] = 0 when it may see none.
// Keys are visited in blocks of KB with an online softmax (running max m, running sum l, rescaled output), so
// no T×T matrix exists. Two variants:
// - attention_rows (decode: fewer than 4 query rows): one vector dot product per (row, key), the softmax and
//   P·V row by row.
// - attention_tile (prefill): the query block is transposed once per task into Qt[D][QB], so a key's scores for
//   all QB rows are QB/VL vector FMAs per d, stored transposed (St[key][row]). The online softmax then runs down
//   the keys with the rows in vector lanes (no horizontal max/sum), and P·V updates RV rows at a time so each
//   V load feeds RV FMAs. Keys a causal row cannot see yet are never read (their V may be anything).
namespace gk {
namespace GK_ISA {

constexpr int KB = kAttnKeyBlock;
constexpr int QB = kAttnQueryBlock;
constexpr int KBV = KB / VL > 0 ? KB / VL : 1;
static_assert(KB % VL == 0, "key block must be a whole number of vectors");
constexpr int QV = QB / VL;  // vectors of query rows in a tile
static_assert(QB % VL == 0, "query block must be a whole number of vectors");
// Register budget (GK_VREGS vector registers: 32 zmm, 16 ymm/xmm). A score step holds KU·QV accumulators, QV query
// vectors and one broadcast key value; a P·V step RV·DC accumulators, DC value vectors and one broadcast. What
// does not fit spills to the stack in the innermost loop (AVX2 with the AVX-512 shape: 21 of 16 registers).
constexpr int KU_FIT = (GK_VREGS - QV - 1) / QV;
constexpr int KU = KU_FIT < 1 ? 1 : (KU_FIT < 16 / QV ? KU_FIT : (16 / QV > 0 ? 16 / QV : 1));  // keys per step
constexpr int RV = 4;  // query rows per P·V group
constexpr int DC_FIT = (GK_VREGS - 1) / (RV + 1);
constexpr int DC = DC_FIT >= 4 ? 4 : 2;  // vectors of d per P·V step: 4 with 32 registers, 2 with 16
static_assert(QB % RV == 0, "P·V row groups must tile the query block");

// One task's (batch, head) slice of q, k, v, key_mask and bias, and the end of the keys any of its query rows
// [.., i1) may see (causal limit, mask and bias lengths).
struct HeadView {
  const float *q, *k, *v, *bias;
  const bool* km;
  int64_t kv_end;
  HeadView(const AttnArgs& a, int64_t bh, int64_t i1) {
    const int64_t b = bh / a.H, h = bh % a.H;
    q = a.q + b * a.sq_b + h * a.sq_h;
    k = a.k + b * a.sk_b + h * a.sk_h;
    v = a.v + b * a.sv_b + h * a.sv_h;
    km = a.key_mask ? a.key_mask + b * a.mask_len : nullptr;
    bias = a.bias ? a.bias + b * a.sb_b + h * a.sb_h : nullptr;
    kv_end = a.Tkv;
    if (a.causal) kv_end = kv_end < a.q_offset + i1 ? kv_end : a.q_offset + i1;
    if (km && a.mask_len < kv_end) kv_end = a.mask_len;
    if (bias && a.bias_len < kv_end) kv_end = a.bias_len;
  }
};

// out rows [i0, i0 + nq) of head h = acc / l, or zeros for a row that saw nothing.
GK_INLINE void write_rows(const AttnArgs& a, int64_t b, int64_t h, int64_t i0, int64_t nq, const float* acc,
                          const float* l) {
  const int64_t D = a.D;
  for (int64_t r = 0; r < nq; ++r) {
    float* o = a.out + ((b * a.Tq + i0 + r) * a.H + h) * D;
    const float* ar = acc + r * D;
    if (l[r] > 0.f || l[r] != l[r])  // NaN inputs propagate as NaN
      for (int64_t d = 0; d < D; ++d) o[d] = ar[d] / l[r];
    else
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;  // fully masked row: zeros, never NaN
  }
}

static void attention_rows(const AttnArgs& a, int64_t bh, int64_t i0, int64_t i1, float* scratch) {
  const int64_t b = bh / a.H, h = bh % a.H, D = a.D;
  const int64_t nq = i1 - i0;
  float* S = scratch;        // [QB][KB]
  float* acc = S + QB * KB;  // [QB][D]
  float* m = acc + QB * D;   // [QB]
  float* l = m + QB;         // [QB]
  const float NEG_INF = -__builtin_inff();
  const HeadView hv(a, bh, i1);
  const float *q = hv.q, *k = hv.k, *v = hv.v, *bias = hv.bias;
  const bool* km = hv.km;
  for (int64_t r = 0; r < nq; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.f;
  }
  for (int64_t x = 0; x < nq * D; ++x) acc[x] = 0.f;
  const int64_t kv_end = hv.kv_end;

  for (int64_t j0 = 0; j0 < kv_end; j0 += KB) {
    const int kb = (int)(kv_end - j0 < KB ? kv_end - j0 : KB);
    for (int64_t r = 0; r < nq; ++r) {
      const float* qr = q + (i0 + r) * a.sq_t;
      int jj = 0;
      for (; jj + 2 <= kb; jj += 2) {  // two keys at a time: four independent FMA chains
        const float* k0 = k + (j0 + jj) * a.sk_t;
        const float* k1 = k0 + a.sk_t;
        vf a0{}, a1{}, b0{}, b1{};
        int64_t d = 0;
        for (; d + 2 * VL <= D; d += 2 * VL) {
          const vf q0 = load(qr + d), q1 = load(qr + d + VL);
          a0 += q0 * load(k0 + d);
          a1 += q1 * load(k0 + d + VL);
          b0 += q0 * load(k1 + d);
          b1 += q1 * load(k1 + d + VL);
        }
        for (; d + VL <= D; d += VL) {
          const vf q0 = load(qr + d);
          a0 += q0 * load(k0 + d);
          b0 += q0 * load(k1 + d);
        }
        float s0 = hsum(a0 + a1), s1 = hsum(b0 + b1);
        for (; d < D; ++d) {
          s0 += qr[d] * k0[d];
          s1 += qr[d] * k1[d];
        }
        S[r * KB + jj] = s0 * a.scale;
        S[r * KB + jj + 1] = s1 * a.scale;
      }
      for (; jj < kb; ++jj) {
        const float* kj = k + (j0 + jj) * a.sk_t;
        vf acc0{}, acc1{};
        int64_t d = 0;
        for (; d + 2 * VL <= D; d += 2 * VL) {
          acc0 += load(qr + d) * load(kj + d);
          acc1 += load(qr + d + VL) * load(kj + d + VL);
        }
        for (; d + VL <= D; d += VL) acc0 += load(qr + d) * load(kj + d);
        float sc = hsum(acc0 + acc1);
        for (; d < D; ++d) sc += qr[d] * kj[d];
        S[r * KB + jj] = sc * a.scale;
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      float* sr = S + r * KB;
      const int64_t i = i0 + r;
      int lim = kb;  // causal: keys past q_offset + i are invisible to this row
      if (a.causal && j0 + kb > a.q_offset + i + 1) lim = (int)(a.q_offset + i + 1 - j0);
      if (lim <= 0) continue;
      for (int jj = lim; jj < KB; ++jj) sr[jj] = NEG_INF;
      if (km)
        for (int jj = 0; jj < lim; ++jj)
          if (!km[j0 + jj]) sr[jj] = NEG_INF;
      if (bias) {
        const float* br = bias + i * a.sb_t + j0;
        for (int jj = 0; jj < lim; ++jj) sr[jj] += br[jj];
      }
      vf mv = load(sr);
      for (int u = 1; u < KBV; ++u) mv = vmax(mv, load(sr + u * VL));
      float mblk = hmax(mv);  // (vmax/hmax skip NaN lanes)
      if (mblk == NEG_INF) {  // nothing visible in this block — unless a visible score is NaN, which must spread
        bool nan = false;
        for (int jj = 0; jj < lim; ++jj) nan |= sr[jj] != sr[jj];
        if (!nan) continue;
        mblk = __builtin_nanf("");
      }
      const float mnew = fmaxf_(m[r], mblk);
      const float corr = vexp(bcast(m[r] - mnew))[0];
      vf psum{};
      for (int u = 0; u < KBV; ++u) {
        vf p = vexp(load(sr + u * VL) - bcast(mnew));
        store(sr + u * VL, p);
        psum += p;
      }
      l[r] = l[r] * corr + hsum(psum);
      m[r] = mnew;
      float* ar = acc + r * D;
      int64_t d = 0;
      const vf cv = bcast(corr);
      for (; d + 4 * VL <= D; d += 4 * VL) {  // four output vectors at once: independent FMA chains over the keys
        vf o0 = load(ar + d) * cv, o1 = load(ar + d + VL) * cv;
        vf o2 = load(ar + d + 2 * VL) * cv, o3 = load(ar + d + 3 * VL) * cv;
        for (int jj = 0; jj < lim; ++jj) {
          const vf p = bcast(sr[jj]);
          const float* vj = v + (j0 + jj) * a.sv_t + d;
          o0 += p * load(vj);
          o1 += p * load(vj + VL);
          o2 += p * load(vj + 2 * VL);
          o3 += p * load(vj + 3 * VL);
        }
        store(ar + d, o0);
        store(ar + d + VL, o1);
        store(ar + d + 2 * VL, o2);
        store(ar + d + 3 * VL, o3);
      }
      for (; d + VL <= D; d += VL) {
        vf o = load(ar + d) * bcast(corr);
        for (int jj = 0; jj < lim; ++jj) o += bcast(sr[jj]) * load(v + (j0 + jj) * a.sv_t + d);
        store(ar + d, o);
      }
      for (; d < D; ++d) {
        float o = ar[d] * corr;
        for (int jj = 0; jj < lim; ++jj) o += sr[jj] * v[(j0 + jj) * a.sv_t + d];
        ar[d] = o;
      }
    }
  }
  write_rows(a, b, h, i0, nq, acc, l);
}

// Scores of keys [jj, jj + U) for all QB rows of the tile: St[key][row] = scale · Σ_d k[key][d] · Qt[d][row].
template <int U>
GK_INLINE void tile_scores(const float* Qt, const float* k, int64_t sk_t, int64_t D, float scale, float* St) {
  vf s[U][QV];
  for (int t = 0; t < U; ++t)
    for (int u = 0; u < QV; ++u) s[t][u] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    vf qt[QV];
    for (int u = 0; u < QV; ++u) qt[u] = load(Qt + d * QB + u * VL);
    for (int t = 0; t < U; ++t) {
      const vf kd = bcast(k[t * sk_t + d]);
      for (int u = 0; u < QV; ++u) s[t][u] += kd * qt[u];
    }
  }
  for (int t = 0; t < U; ++t)
    for (int u = 0; u < QV; ++u) store(St + t * QB + u * VL, s[t][u] * bcast(scale));
}

// acc[r][d .. d + N·VL) = acc · corr[r] + Σ_{keys j < lim} St[j][r] · v[j][d ..], rows [r0, r0 + RV), where
// keys below `common` are seen by all RV rows and the rest only by the rows whose lim reaches them.
template <int N>
GK_INLINE void tile_pv(float* acc, int64_t D, int64_t r0, const float* corr, const float* St, const float* v,
                       int64_t sv_t, int64_t d, int common, const int* lim) {
  vf o[RV][N];
  for (int ri = 0; ri < RV; ++ri)
    for (int c = 0; c < N; ++c) o[ri][c] = load(acc + (r0 + ri) * D + d + c * VL) * bcast(corr[r0 + ri]);
  for (int j = 0; j < common; ++j) {
    vf vj[N];
    for (int c = 0; c < N; ++c) vj[c] = load(v + j * sv_t + d + c * VL);
    for (int ri = 0; ri < RV; ++ri) {
      const vf p = bcast(St[j * QB + r0 + ri]);
      for (int c = 0; c < N; ++c) o[ri][c] += p * vj[c];
    }
  }
  for (int ri = 0; ri < RV; ++ri)
    for (int j = common; j < lim[ri]; ++j) {
      const vf p = bcast(St[j * QB + r0 + ri]);
      for (int c = 0; c < N; ++c) o[ri][c] += p * load(v + j * sv_t + d + c * VL);
    }
  for (int ri = 0; ri < RV; ++ri)
    for (int c = 0; c < N; ++c) store(acc + (r0 + ri) * D + d + c * VL, o[ri][c]);
}

static void attention_tile(const AttnArgs& a, int64_t bh, int64_t i0, int64_t i1, float* scratch) {
  const int64_t b = bh / a.H, h = bh % a.H, D = a.D;
  const int64_t nq = i1 - i0;
  float* Qt = scratch;        // [D][QB]  this task's query rows, transposed (rows past nq: zeros)
  float* St = Qt + D * QB;    // [KB][QB] scores, then probabilities, of one key block
  float* acc = St + KB * QB;  // [QB][D]
  float* m = acc + QB * D;    // [QB] running max
  float* l = m + QB;          // [QB] running sum
  float* corr = l + QB;       // [QB] rescale of acc for this key block
  const float NEG_INF = -__builtin_inff();
  const vf ninf = bcast(NEG_INF), zero{};
  const HeadView hv(a, bh, i1);
  const float *q = hv.q, *k = hv.k, *v = hv.v, *bias = hv.bias;
  const bool* km = hv.km;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = 0; r < QB; ++r) Qt[d * QB + r] = r < nq ? q[(i0 + r) * a.sq_t + d] : 0.f;
  for (int64_t r = 0; r < QB; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.f;
  }
  for (int64_t x = 0; x < QB * D; ++x) acc[x] = 0.f;
  const int64_t kv_end = hv.kv_end;

  vi iota;
  for (int x = 0; x < VL; ++x) iota[x] = x;
  for (int64_t j0 = 0; j0 < kv_end; j0 += KB) {
    const int kb = (int)(kv_end - j0 < KB ? kv_end - j0 : KB);
    // keys row r may see in this block: causal rows stop at q_offset + i0 + r
    int lim[QB];
    for (int r = 0; r < QB; ++r) {
      int64_t x = a.causal ? a.q_offset + i0 + r + 1 - j0 : kb;
      lim[r] = (int)(x < 0 ? 0 : x > kb ? kb : x);
    }
    int jj = 0;
    for (; jj + KU <= kb; jj += KU) tile_scores<KU>(Qt, k + (j0 + jj) * a.sk_t, a.sk_t, D, a.scale, St + jj * QB);
    for (; jj < kb; ++jj) tile_scores<1>(Qt, k + (j0 + jj) * a.sk_t, a.sk_t, D, a.scale, St + jj * QB);
    for (int j = 0; j < kb; ++j) {
      float* sj = St + j * QB;
      if (km && !km[j0 + j]) {
        for (int u = 0; u < QV; ++u) store(sj + u * VL, ninf);
      } else if (a.causal && j0 + j > a.q_offset + i0) {  // rows r < j0 + j − q_offset − i0 cannot see key j yet
        const int first = (int)(j0 + j - a.q_offset - i0);
        for (int u = 0; u < QV; ++u) {
          const vi row = iota + u * VL;
          store(sj + u * VL, row < first ? ninf : load(sj + u * VL));
        }
      }
    }
    // the bias after the mask, as HF adds both to the scores: −inf + NaN is NaN, so a NaN bias on a padded key
    // still spreads (keys past a row's causal limit are not seen at all)
    if (bias)
      for (int r = 0; r < nq; ++r)
        for (int j = 0; j < lim[r]; ++j) St[j * QB + r] += bias[(i0 + r) * a.sb_t + j0 + j];
    // online softmax down the keys, rows in lanes (vmax keeps the running max when a score is NaN; the NaN then
    // reaches l and acc through p)
    for (int u = 0; u < QV; ++u) {
      const vf mold = load(m + u * VL);
      vf mnew = mold;
      for (int j = 0; j < kb; ++j) mnew = vmax(load(St + j * QB + u * VL), mnew);
      const vf c = mold == ninf ? zero : vexp(mold - mnew);  // nothing seen yet: acc and l are 0 (or NaN)
      vf psum{};
      for (int j = 0; j < kb; ++j) {
        const vf sc = load(St + j * QB + u * VL);
        const vf p = sc == ninf ? zero : vexp(sc - mnew);
        store(St + j * QB + u * VL, p);
        psum += p;
      }
      store(l + u * VL, load(l + u * VL) * c + psum);
      store(m + u * VL, mnew);
      store(corr + u * VL, c);
    }
    const float* vb = v + j0 * a.sv_t;
    for (int64_t r0 = 0; r0 < nq; r0 += RV) {
      int common = kb;
      for (int ri = 0; ri < RV; ++ri) common = lim[r0 + ri] < common ? lim[r0 + ri] : common;
      int64_t d = 0;
      for (; d + DC * VL <= D; d += DC * VL) tile_pv<DC>(acc, D, r0, corr, St, vb, a.sv_t, d, common, lim + r0);
      for (; d + VL <= D; d += VL) tile_pv<1>(acc, D, r0, corr, St, vb, a.sv_t, d, common, lim + r0);
      for (; d < D; ++d)
        for (int ri = 0; ri < RV; ++ri) {
          const int64_t r = r0 + ri;
          float o = acc[r * D + d] * corr[r];
          for (int j = 0; j < lim[r]; ++j) o += St[j * QB + r] * vb[j * a.sv_t + d];
          acc[r * D + d] = o;
        }
    }
  }
  write_rows(a, b, h, i0, nq, acc, l);
}

static void attention_block(const AttnArgs& a, int64_t bh, int64_t i0, int64_t i1, float* scratch) {
  if (i1 - i0 < 4)
    attention_rows(a, bh, i0, i1, scratch);
  else
    attention_tile(a, bh, i0, i1, scratch);
}

}  // namespace GK_ISA
}  // namespace gk
