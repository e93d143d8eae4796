// attention.cu — causal softmax attention over the KV cache on CUDA, flash style (no T×T matrix anywhere).
//
// Reference (the CPU op, csrc/cpu/kernels/attention.h): out[i] = Σ_j softmax_j(scale·q_i·k_j + bias_ij) v_j over
// the keys row i may see — j < Tkv; causal: j <= q_offset + i; key_mask[b, j] true (j < mask_len); bias > −inf
// (j < bias_len) — and out[i] = 0 when it may see none (never NaN).
//
// One block = 4 warps on one (batch, head) and a few query rows; a warp owns up to 8 query rows (q kept in
// shared memory) and walks the keys in chunks of 32:
//   1. the warp stages the chunk's K rows, transposed, in its own shared tile (coalesced reads, conflict-free
//      writes through a 33-float row pitch);
//   2. lane j scores key j against each of its rows (q broadcast from shared, K from the tile);
//   3. online softmax per row: the chunk max and sum by warp shuffles, rescaling the running (m, l, acc);
//   4. P·V with lanes over the head dim: each V row is one coalesced read shared by all the warp's rows, and
//      each row's p_j is broadcast from lane j.
// Prefill (enough rows to fill the GPU): each warp takes its own 8 rows and all of their keys. Decode and short
// prompts: the 4 warps share the same rows and split the keys (chunk c goes to warp c mod 4); their partial
// (m, l, acc) are merged in shared memory in warp order at the end — flash-decoding inside one block.
#include <cmath>

#include "common.cuh"
#include "launch.h"

namespace gk::cuda {

constexpr int kAttnWarps = 4;  // warps per block
constexpr int kRows = 8;       // max query rows per warp
constexpr int KC = 32;         // keys per chunk: one per lane
constexpr int KS = KC + 1;     // padded pitch of the transposed K tile

static size_t attention_smem_bytes(int D) {
  return sizeof(float) * ((size_t)kAttnWarps * D * KS + (size_t)kAttnWarps * kRows * D);
}

// NPL: head-dim elements per lane (D <= 32·NPL). rpw: query rows per warp (<= kRows). S: warps sharing rows.
template <int NPL>
__global__ __launch_bounds__(kAttnWarps * 32) void attention_kernel(const AttnArgs a, int rpw, int S) {
  extern __shared__ float smem[];
  const float NEG_INF = -INFINITY;
  const int D = (int)a.D;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int G = kAttnWarps / S;  // row groups per block
  const int g = warp / S, phase = warp % S;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i0 = ((int64_t)blockIdx.x * G + g) * rpw;  // this warp's first query row
  float* Ks = smem + (size_t)warp * D * KS;                                       // [D][KS]
  float* Qs = smem + (size_t)kAttnWarps * D * KS + (size_t)warp * kRows * D;      // [kRows][D]
  const float* q = a.q + b * a.sq_b + h * a.sq_h;
  const float* k = a.k + b * a.sk_b + h * a.sk_h;
  const float* v = a.v + b * a.sv_b + h * a.sv_h;
  const bool* km = a.key_mask ? a.key_mask + b * a.mask_len : nullptr;
  const float* bias = a.bias ? a.bias + b * a.sb_b + h * a.sb_h : nullptr;

  // Row r sees keys [0, lim[r]) minus masked ones; hi bounds every row of this warp.
  int64_t cap = a.Tkv;
  if (km && a.mask_len < cap) cap = a.mask_len;
  if (bias && a.bias_len < cap) cap = a.bias_len;
  int64_t lim[kRows];
  int64_t hi = 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + r;
    lim[r] = 0;
    if (r < rpw && i < a.Tq) {
      lim[r] = cap;
      if (a.causal && a.q_offset + i + 1 < lim[r]) lim[r] = a.q_offset + i + 1;
      if (lim[r] > hi) hi = lim[r];
    }
  }
  for (int r = 0; r < rpw; ++r)
    for (int d = lane; d < D; d += 32) Qs[r * D + d] = i0 + r < a.Tq ? q[(i0 + r) * a.sq_t + d] : 0.f;
  __syncwarp();

  float m[kRows], l[kRows], acc[kRows][NPL];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < NPL; ++e) acc[r][e] = 0.f;
  }

  for (int64_t j0 = (int64_t)phase * KC; j0 < hi; j0 += (int64_t)S * KC) {
    const int kc = hi - j0 < KC ? (int)(hi - j0) : KC;
    // 1. K chunk -> Ks[d][jj] (zeros past the chunk)
    for (int jj = 0; jj < KC; ++jj) {
#pragma unroll
      for (int e = 0; e < NPL; ++e) {
        const int d = lane + 32 * e;
        if (d < D) Ks[d * KS + jj] = jj < kc ? k[(j0 + jj) * a.sk_t + d] : 0.f;
      }
    }
    __syncwarp();
    // 2. lane = key j: dot products with every row of this warp
    const int64_t j = j0 + lane;
    float dot[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) dot[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = Ks[d * KS + lane];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rpw) dot[r] = fmaf(Qs[r * D + d], kd, dot[r]);
    }
    const bool key_ok = lane < kc && (km == nullptr || km[j]);
    // 3. online softmax, row by row (all branches below are warp-uniform)
    float p[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      p[r] = 0.f;
      if (r >= rpw) continue;
      float s = NEG_INF;
      if (key_ok && j < lim[r]) {
        s = dot[r] * a.scale;
        if (bias) s += bias[(i0 + r) * a.sb_t + j];
      }
      const float mc = warp_max(s);  // (fmaxf skips NaN: a NaN score is looked for separately)
      if (mc == NEG_INF && !__any_sync(kFullMask, s != s)) continue;  // nothing visible to this row here
      const float mnew = fmaxf(m[r], mc);
      const float corr = expf(m[r] - mnew);  // 0 on the first visible chunk (m = −inf)
      p[r] = expf(s - mnew);                 // 0 for masked keys
      l[r] = l[r] * corr + warp_sum(p[r]);
      m[r] = mnew;
#pragma unroll
      for (int e = 0; e < NPL; ++e) acc[r][e] *= corr;
    }
    // 4. acc += p · V, lanes over the head dim
    for (int jj = 0; jj < kc; ++jj) {
      const float* vr = v + (j0 + jj) * a.sv_t;
      float vv[NPL];
#pragma unroll
      for (int e = 0; e < NPL; ++e) vv[e] = lane + 32 * e < D ? vr[lane + 32 * e] : 0.f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= rpw) continue;
        const float pj = __shfl_sync(kFullMask, p[r], jj);
        if (pj != 0.f) {  // masked keys contribute nothing, even where V holds garbage
#pragma unroll
          for (int e = 0; e < NPL; ++e) acc[r][e] = fmaf(pj, vv[e], acc[r][e]);
        }
      }
    }
    __syncwarp();  // the tile is overwritten by the next chunk
  }

  if (S > 1) {  // merge the S warps that shared these rows, in warp order (deterministic)
    __syncthreads();  // every warp is done with its K tile: reuse the shared memory
    const int pitch = D + 2;
    float* mine = smem + (size_t)warp * kRows * pitch;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {  // unrolled over kRows so m, l, acc stay in registers
      if (r >= rpw) continue;
      if (lane == 0) { mine[r * pitch] = m[r]; mine[r * pitch + 1] = l[r]; }
#pragma unroll
      for (int e = 0; e < NPL; ++e)
        if (lane + 32 * e < D) mine[r * pitch + 2 + lane + 32 * e] = acc[r][e];
    }
    __syncthreads();
    if (phase != 0) return;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rpw) continue;
      float mm = NEG_INF;
      for (int s = 0; s < S; ++s) mm = fmaxf(mm, smem[(size_t)(warp + s) * kRows * pitch + r * pitch]);
      float ll = 0.f, o[NPL];
#pragma unroll
      for (int e = 0; e < NPL; ++e) o[e] = 0.f;
      for (int s = 0; s < S; ++s) {
        const float* part = smem + (size_t)(warp + s) * kRows * pitch + r * pitch;
        // 0 for a warp that saw nothing; when no warp saw a finite score, each l is 0 (nothing seen) or NaN
        // (a NaN score, as in the CPU kernel): summed as they are, so the NaN reaches the output
        const float c = mm == NEG_INF ? 1.f : expf(part[0] - mm);
        ll += part[1] * c;
#pragma unroll
        for (int e = 0; e < NPL; ++e)
          if (lane + 32 * e < D) o[e] += part[2 + lane + 32 * e] * c;
      }
      l[r] = ll;
#pragma unroll
      for (int e = 0; e < NPL; ++e) acc[r][e] = o[e];
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + r;
    if (r >= rpw || i >= a.Tq) continue;
    float* o = a.out + ((b * a.Tq + i) * a.H + h) * D;
    const bool seen = l[r] > 0.f || l[r] != l[r];  // NaN inputs propagate as NaN
#pragma unroll
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + 32 * e;
      if (d < D) o[d] = seen ? acc[r][e] / l[r] : 0.f;  // fully masked row: zeros
    }
  }
}

template <int NPL>
static cudaError_t launch_attention(const AttnArgs& a, int num_sms, cudaStream_t stream) {
  const int rpw = a.Tq < kRows ? (int)a.Tq : kRows;
  // One warp per row group (S = 1) when the rows fill the block's 4 warps and that alone gives every SM a
  // block; else (decode, short prompts, small batches) the 4 warps share the rows and split the keys.
  const int64_t blocks_s1 = a.B * a.H * ((a.Tq + kAttnWarps * rpw - 1) / (kAttnWarps * rpw));
  const int S = (blocks_s1 >= num_sms && a.Tq >= kAttnWarps * rpw) ? 1 : kAttnWarps;
  const int rows_per_block = (kAttnWarps / S) * rpw;
  const size_t smem = attention_smem_bytes((int)a.D);
  if (smem > 48 * 1024) {  // the opt-in for this variant's largest D, always the same: no race between host threads
    cudaError_t err = cudaFuncSetAttribute(attention_kernel<NPL>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)attention_smem_bytes(32 * NPL));
    if (err != cudaSuccess) return err;
  }
  dim3 grid((unsigned)((a.Tq + rows_per_block - 1) / rows_per_block), (unsigned)a.H, (unsigned)a.B);
  attention_kernel<NPL><<<grid, kAttnWarps * 32, smem, stream>>>(a, rpw, S);
  return cudaGetLastError();
}

cudaError_t attention(const AttnArgs& a, int num_sms, cudaStream_t stream) {
  if (a.B == 0 || a.H == 0 || a.Tq == 0 || a.D == 0) return cudaGetLastError();
  if (a.D > kAttnMaxHeadDim || a.B > 65535 || a.H > 65535) return cudaErrorInvalidValue;
  if (a.D <= 32) return launch_attention<1>(a, num_sms, stream);
  if (a.D <= 64) return launch_attention<2>(a, num_sms, stream);
  return launch_attention<4>(a, num_sms, stream);
}

}  // namespace gk::cuda
