// attention.h — causal softmax attention of a block of query rows against the KV cache, flash style.
//
// Reference: out[i] = Σ_j softmax_j(scale · q_i·k_j + mask_ij) v_j over the keys row i may see (causal:
// j ≤ q_offset + i; key_mask[j] true; bias > −inf), and out[i] = 0 when it may see none.
// Keys are visited in blocks of KB with an online softmax (running max m, running sum l, rescaled output), so
// no T×T matrix exists. Each key block is transposed once into Kt[D][KB] and reused by all query rows of the
// task: scores for a row are then KB-wide vector FMAs over d, and P·V is row-wise FMAs over d. Decode (fewer
// than 4 rows) skips the transpose and takes one dot product per key.
namespace gk {
namespace GK_ISA {

constexpr int KB = kAttnKeyBlock;
constexpr int QB = kAttnQueryBlock;
constexpr int KBV = KB / VL > 0 ? KB / VL : 1;
static_assert(KB % VL == 0, "key block must be a whole number of vectors");
constexpr int RG = 8 / KBV > 0 ? 8 / KBV : 1;  // query rows per score group

static void attention_block(const AttnArgs& a, int64_t bh, int64_t i0, int64_t i1, float* scratch) {
  const int64_t b = bh / a.H, h = bh % a.H, D = a.D;
  const int64_t nq = i1 - i0;
  float* Kt = scratch;              // [D][KB]
  float* S = Kt + D * KB;           // [QB][KB]
  float* acc = S + QB * KB;         // [QB][D]
  float* m = acc + QB * D;          // [QB]
  float* l = m + QB;                // [QB]
  const float NEG_INF = -__builtin_inff();
  const float* q = a.q + b * a.sq_b + h * a.sq_h;
  const float* k = a.k + b * a.sk_b + h * a.sk_h;
  const float* v = a.v + b * a.sv_b + h * a.sv_h;
  const bool* km = a.key_mask ? a.key_mask + b * a.mask_len : nullptr;
  const float* bias = a.bias ? a.bias + b * a.sb_b + h * a.sb_h : nullptr;
  for (int64_t r = 0; r < nq; ++r) { m[r] = NEG_INF; l[r] = 0.f; }
  for (int64_t x = 0; x < nq * D; ++x) acc[x] = 0.f;

  int64_t kv_end = a.Tkv;
  if (a.causal) kv_end = kv_end < a.q_offset + i1 ? kv_end : a.q_offset + i1;
  if (km && a.mask_len < kv_end) kv_end = a.mask_len;
  if (bias && a.bias_len < kv_end) kv_end = a.bias_len;

  for (int64_t j0 = 0; j0 < kv_end; j0 += KB) {
    const int kb = (int)(kv_end - j0 < KB ? kv_end - j0 : KB);
    if (nq < 4) {
      // decode: too few rows to pay for the transpose; one vector dot product per (row, key)
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
            a0 += q0 * load(k0 + d); a1 += q1 * load(k0 + d + VL);
            b0 += q0 * load(k1 + d); b1 += q1 * load(k1 + d + VL);
          }
          for (; d + VL <= D; d += VL) { const vf q0 = load(qr + d); a0 += q0 * load(k0 + d); b0 += q0 * load(k1 + d); }
          float s0 = hsum(a0 + a1), s1 = hsum(b0 + b1);
          for (; d < D; ++d) { s0 += qr[d] * k0[d]; s1 += qr[d] * k1[d]; }
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
    } else {
      for (int64_t d = 0; d < D; ++d) {
        for (int jj = 0; jj < kb; ++jj) Kt[d * KB + jj] = k[(j0 + jj) * a.sk_t + d];
        for (int jj = kb; jj < KB; ++jj) Kt[d * KB + jj] = 0.f;
      }
      // scores, RG query rows at a time sharing each Kt row (RG·KBV independent accumulators)
      for (int64_t r0 = 0; r0 < nq; r0 += RG) {
        const int nr = (int)(nq - r0 < RG ? nq - r0 : RG);
        vf s[RG][KBV];
        for (int r = 0; r < RG; ++r)
          for (int u = 0; u < KBV; ++u) s[r][u] = vf{};
        const float* qr[RG];
        for (int r = 0; r < RG; ++r) qr[r] = q + (i0 + r0 + (r < nr ? r : 0)) * a.sq_t;
        for (int64_t d = 0; d < D; ++d) {
          vf kt[KBV];
          for (int u = 0; u < KBV; ++u) kt[u] = load(Kt + d * KB + u * VL);
          for (int r = 0; r < RG; ++r) {
            vf qd = bcast(qr[r][d]);
            for (int u = 0; u < KBV; ++u) s[r][u] += qd * kt[u];
          }
        }
        for (int r = 0; r < nr; ++r)
          for (int u = 0; u < KBV; ++u) store(S + (r0 + r) * KB + u * VL, s[r][u] * bcast(a.scale));
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
        for (int jj = 0; jj < lim; ++jj) if (!km[j0 + jj]) sr[jj] = NEG_INF;
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
          o0 += p * load(vj); o1 += p * load(vj + VL); o2 += p * load(vj + 2 * VL); o3 += p * load(vj + 3 * VL);
        }
        store(ar + d, o0); store(ar + d + VL, o1); store(ar + d + 2 * VL, o2); store(ar + d + 3 * VL, o3);
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
  for (int64_t r = 0; r < nq; ++r) {
    float* o = a.out + ((b * a.Tq + i0 + r) * a.H + h) * D;
    const float* ar = acc + r * D;
    if (l[r] > 0.f || l[r] != l[r])  // NaN inputs propagate as NaN
      for (int64_t d = 0; d < D; ++d) o[d] = ar[d] / l[r];
    else
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;  // fully masked row: zeros, never NaN
  }
}

}  // namespace GK_ISA
}  // namespace gk
