// attention.cu — causal softmax attention over the KV cache on CUDA, flash style (no T×T matrix anywhere).
//
// Reference (the CPU op, csrc/cpu/kernels/attention.h): out[i] = Σ_j softmax_j(scale·q_i·k_j + bias_ij) v_j over
// the keys row i may see — j < Tkv; causal: j <= q_offset + i; key_mask[b, j] true (j < mask_len); bias > −inf
// (j < bias_len); j < kv_len[b] when a device-side length is given (decode_attention) — and out[i] = 0 when it may
// see none (never NaN). A key that key_mask hides scores −inf + bias (HF eager adds the mask to the scores), so a
// NaN bias there makes the row NaN; keys past the causal limit or the lengths are not read at all.
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
// The decode step (decode_attention: one query row) takes the flash-decoding kernels below, which split the keys over
// blocks, wherever they apply (flash_decoding_ok), and this kernel otherwise.
//
// Prefill attention variants (the attention op; ops.cuda_variant("prefill_attention", v) chooses):
//   1. attention_kernel: the kernel above (warps own up to 8 rows, K transposed per warp, P·V from global memory).
//   2. flash_prefill_kernel (end of this file): FlashAttention-2 in fp32 — a block owns 16·RT query rows, K/V tiles
//      of 64 keys staged once per block in shared memory (float4), an RT×8 register tile of scores per thread,
//      P through shared memory, causal tiles past the block's last row never visited. D = 32 or 64, no bias.
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

// The end of the keys any query row of batch row b may see: Tkv, the mask and bias lengths, the device-side kv_len.
__device__ __forceinline__ int64_t key_cap(const AttnArgs& a, int64_t b) {
  int64_t cap = a.Tkv;
  if (a.key_mask && a.mask_len < cap) cap = a.mask_len;
  if (a.bias && a.bias_len < cap) cap = a.bias_len;
  if (a.kv_len) {
    const int64_t n = a.kv_len[b * a.kv_len_sb];
    cap = n < 0 ? 0 : (n < cap ? n : cap);
  }
  return cap;
}

// NPL: head-dim elements per lane (D <= 32·NPL). rpw: query rows per warp (<= kRows). S: warps sharing rows.
template <int NPL>
__global__ __launch_bounds__(kAttnWarps * 32) void attention_kernel(const AttnArgs a, int rpw, int S) {
  pdl_begin();
  extern __shared__ float smem[];
  const float NEG_INF = -INFINITY;
  const int D = (int)a.D;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int G = kAttnWarps / S;  // row groups per block
  const int g = warp / S, phase = warp % S;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i0 = ((int64_t)blockIdx.x * G + g) * rpw;                     // this warp's first query row
  float* Ks = smem + (size_t)warp * D * KS;                                   // [D][KS]
  float* Qs = smem + (size_t)kAttnWarps * D * KS + (size_t)warp * kRows * D;  // [kRows][D]
  const float* q = a.q + b * a.sq_b + h * a.sq_h;
  const float* k = a.k + b * a.sk_b + h * a.sk_h;
  const float* v = a.v + b * a.sv_b + h * a.sv_h;
  const bool* km = a.key_mask ? a.key_mask + b * a.mask_len : nullptr;
  const float* bias = a.bias ? a.bias + b * a.sb_b + h * a.sb_h : nullptr;

  // Row r sees keys [0, lim[r]) minus masked ones; hi bounds every row of this warp.
  const int64_t cap = key_cap(a, b);
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
    const bool key_ok = km == nullptr || (lane < kc && km[j]);  // (lanes past the chunk: j may be past the mask)
    // 3. online softmax, row by row (all branches below are warp-uniform)
    float p[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      p[r] = 0.f;
      if (r >= rpw) continue;
      float s = NEG_INF;
      if (lane < kc && j < lim[r]) {
        // a masked key scores −inf + bias, as in HF eager (mask added to the scores): a NaN bias spreads
        s = key_ok ? dot[r] * a.scale : NEG_INF;
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

  if (S > 1) {        // merge the S warps that shared these rows, in warp order (deterministic)
    __syncthreads();  // every warp is done with its K tile: reuse the shared memory
    const int pitch = D + 2;
    float* mine = smem + (size_t)warp * kRows * pitch;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {  // unrolled over kRows so m, l, acc stay in registers
      if (r >= rpw) continue;
      if (lane == 0) {
        mine[r * pitch] = m[r];
        mine[r * pitch + 1] = l[r];
      }
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
  if (smem > 48 * 1024) {  // the opt-in for this NPL's largest D, always the same: no race between host threads
    cudaError_t err = cudaFuncSetAttribute(attention_kernel<NPL>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)attention_smem_bytes(32 * NPL));
    if (err != cudaSuccess) return err;
  }
  dim3 grid((unsigned)((a.Tq + rows_per_block - 1) / rows_per_block), (unsigned)a.H, (unsigned)a.B);
  launch(attention_kernel<NPL>, grid, kAttnWarps * 32, smem, stream, a, rpw, S);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- flash-decoding (one query row)
//
// The keys of each (batch, head) are split over `splits` blocks (grid (splits, H, B)), so B·H small still fills the
// GPU; each block's 4 warps take chunks of 32 keys in turn. Lane j scores key j of a chunk with the whole key row
// loaded first (up to 16 float4 per lane in flight, q broadcast from shared memory), then the same online softmax and
// P·V (lanes over the head dim) as attention_kernel. The block's warps merge in shared memory and write one partial
// (m, l, acc[D]) per split; flash_decoding_merge_kernel merges the splits in split order (deterministic) and writes
// out. The split length follows the keys visible now (kv_len read on the device), so the cost follows the tokens
// so far. Needs D % 4 == 0 and 16-byte aligned key rows (flash_decoding_ok).
constexpr int kFdWarps = 4;
constexpr int kFdVec = 16;  // float4 of a key row loaded at once by a lane (64 floats)

template <int NPL>
__global__ __launch_bounds__(kFdWarps * 32) void flash_decoding_split_kernel(const AttnArgs a, int splits,
                                                                             float* __restrict__ ws) {
  pdl_begin();
  constexpr int DMAX = 32 * NPL;
  __shared__ __align__(16) float Qs[DMAX];
  __shared__ float part[kFdWarps][DMAX + 2];
  const float NEG_INF = -INFINITY;
  const int D = (int)a.D, D4 = D / 4;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t sp = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const float* q = a.q + b * a.sq_b + h * a.sq_h;
  const float* k = a.k + b * a.sk_b + h * a.sk_h;
  const float* v = a.v + b * a.sv_b + h * a.sv_h;
  const bool* km = a.key_mask ? a.key_mask + b * a.mask_len : nullptr;
  const float* bias = a.bias ? a.bias + b * a.sb_b + h * a.sb_h : nullptr;
  int64_t n = key_cap(a, b);
  if (a.causal && a.q_offset + 1 < n) n = a.q_offset + 1;
  // this split's keys: [j_begin, j_end), a whole number of 32-key chunks each
  const int64_t per = ((n + splits - 1) / splits + KC - 1) / KC * KC;
  const int64_t j_begin = sp * per, j_end = j_begin + per < n ? j_begin + per : n;
  for (int d = threadIdx.x; d < D; d += blockDim.x) Qs[d] = q[d];
  __syncthreads();

  float m = NEG_INF, l = 0.f, acc[NPL];
#pragma unroll
  for (int e = 0; e < NPL; ++e) acc[e] = 0.f;
  for (int64_t j0 = j_begin + (int64_t)warp * KC; j0 < j_end; j0 += (int64_t)kFdWarps * KC) {
    const int kc = j_end - j0 < KC ? (int)(j_end - j0) : KC;
    const int64_t j = j0 + (lane < kc ? lane : 0);  // lanes past the chunk score key j0 and drop it
    const float4* kr = reinterpret_cast<const float4*>(k + j * a.sk_t);
    const float4* q4 = reinterpret_cast<const float4*>(Qs);
    float dot = 0.f;
    for (int c0 = 0; c0 < D4; c0 += kFdVec) {
      float4 kv[kFdVec];
#pragma unroll
      for (int c = 0; c < kFdVec; ++c)  // every load of the piece issued before the first use
        if (c0 + c < D4) kv[c] = __ldg(kr + c0 + c);
#pragma unroll
      for (int c = 0; c < kFdVec; ++c)
        if (c0 + c < D4) {
          const float4 qq = q4[c0 + c];
          dot = fmaf(qq.x, kv[c].x, dot);
          dot = fmaf(qq.y, kv[c].y, dot);
          dot = fmaf(qq.z, kv[c].z, dot);
          dot = fmaf(qq.w, kv[c].w, dot);
        }
    }
    float s = NEG_INF;
    if (lane < kc) {  // a masked key scores −inf + bias, as in attention_kernel
      s = (km == nullptr || km[j]) ? dot * a.scale : NEG_INF;
      if (bias) s += bias[j];
    }
    const float mc = warp_max(s);
    if (mc == NEG_INF && !__any_sync(kFullMask, s != s)) continue;
    const float mnew = fmaxf(m, mc);
    const float corr = expf(m - mnew);
    const float p = expf(s - mnew);
    l = l * corr + warp_sum(p);
    m = mnew;
#pragma unroll
    for (int e = 0; e < NPL; ++e) acc[e] *= corr;
    for (int jj = 0; jj < kc; ++jj) {
      const float pj = __shfl_sync(kFullMask, p, jj);
      if (pj != 0.f) {
        const float* vr = v + (j0 + jj) * a.sv_t;
#pragma unroll
        for (int e = 0; e < NPL; ++e)
          if (lane + 32 * e < D) acc[e] = fmaf(pj, vr[lane + 32 * e], acc[e]);
      }
    }
  }
  // merge the block's warps in warp order, then one partial per split
  if (lane == 0) {
    part[warp][0] = m;
    part[warp][1] = l;
  }
#pragma unroll
  for (int e = 0; e < NPL; ++e)
    if (lane + 32 * e < D) part[warp][2 + lane + 32 * e] = acc[e];
  __syncthreads();
  if (warp != 0) return;
  float mm = NEG_INF;
  for (int w = 0; w < kFdWarps; ++w) mm = fmaxf(mm, part[w][0]);
  float* out = ws + ((b * a.H + h) * splits + sp) * (D + 2);
  float ll = 0.f;
  for (int w = 0; w < kFdWarps; ++w) ll += part[w][1] * (mm == NEG_INF ? 1.f : expf(part[w][0] - mm));
  if (lane == 0) {
    out[0] = mm;
    out[1] = ll;
  }
  for (int d = lane; d < D; d += 32) {
    float o = 0.f;
    for (int w = 0; w < kFdWarps; ++w) o += part[w][2 + d] * (mm == NEG_INF ? 1.f : expf(part[w][0] - mm));
    out[2 + d] = o;
  }
}

// One warp per (batch, head): the splits' partials, in split order, into out[b, 0, h, :].
__global__ void flash_decoding_merge_kernel(const float* __restrict__ ws, int splits, int64_t H, int D,
                                            float* __restrict__ out) {
  pdl_begin();
  const int64_t h = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, b = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (h >= H) return;  // the whole warp leaves together
  const int64_t bh = b * H + h;
  const float* p = ws + bh * splits * (D + 2);
  float mm = -INFINITY;
  for (int s = 0; s < splits; ++s) mm = fmaxf(mm, p[s * (D + 2)]);
  float ll = 0.f;
  for (int s = 0; s < splits; ++s) ll += p[s * (D + 2) + 1] * (mm == -INFINITY ? 1.f : expf(p[s * (D + 2)] - mm));
  const bool seen = ll > 0.f || ll != ll;  // NaN inputs propagate as NaN; nothing visible: zeros
  float* o = out + bh * D;                 // out [B, 1, H, D]: (b·1 + 0)·H + h = bh
  for (int d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s)
      acc += p[s * (D + 2) + 2 + d] * (mm == -INFINITY ? 1.f : expf(p[s * (D + 2)] - mm));
    o[d] = seen ? acc / ll : 0.f;
  }
}

bool flash_decoding_ok(const AttnArgs& a) {
  return a.Tq == 1 && a.D % 4 == 0 && a.D <= kAttnMaxHeadDim && a.sk_t % 4 == 0 && a.sk_h % 4 == 0 && a.sk_b % 4 == 0 &&
         aligned16(a.k);
}

int flash_decoding_splits(const AttnArgs& a, int num_sms) {
  const int64_t bh = a.B * a.H > 0 ? a.B * a.H : 1;
  int64_t s = (2 * (int64_t)num_sms + bh - 1) / bh;  // about two blocks per SM
  const int64_t chunks = (a.Tkv + KC - 1) / KC;      // no more splits than 32-key chunks in the cache
  if (s > chunks) s = chunks;
  if (s > 64) s = 64;
  return s < 1 ? 1 : (int)s;
}

template <int NPL>
static cudaError_t launch_flash_decoding(const AttnArgs& a, int splits, float* ws, cudaStream_t stream) {
  const dim3 grid((unsigned)splits, (unsigned)a.H, (unsigned)a.B);
  launch(flash_decoding_split_kernel<NPL>, grid, kFdWarps * 32, 0, stream, a, splits, ws);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  constexpr int per_block = 4;  // warps (one (b, h) each) per merge block
  launch(flash_decoding_merge_kernel, dim3(blocks_for(a.H, per_block), (unsigned)a.B), per_block * 32, 0, stream, ws,
         splits, a.H, (int)a.D, a.out);
  return cudaGetLastError();
}

cudaError_t flash_decoding(const AttnArgs& a, int splits, float* workspace, cudaStream_t stream) {
  if (a.B == 0 || a.H == 0 || a.Tq == 0 || a.D == 0) return cudaGetLastError();
  if (!flash_decoding_ok(a) || a.B > 65535 || a.H > 65535 || splits < 1 || workspace == nullptr)
    return cudaErrorInvalidValue;
  if (a.D <= 32) return launch_flash_decoding<1>(a, splits, workspace, stream);
  if (a.D <= 64) return launch_flash_decoding<2>(a, splits, workspace, stream);
  return launch_flash_decoding<4>(a, splits, workspace, stream);
}

cudaError_t attention(const AttnArgs& a, int num_sms, cudaStream_t stream) {
  if (a.B == 0 || a.H == 0 || a.Tq == 0 || a.D == 0) return cudaGetLastError();
  if (a.D > kAttnMaxHeadDim || a.B > 65535 || a.H > 65535) return cudaErrorInvalidValue;
  if (a.D <= 32) return launch_attention<1>(a, num_sms, stream);
  if (a.D <= 64) return launch_attention<2>(a, num_sms, stream);
  return launch_attention<4>(a, num_sms, stream);
}

// ---------------------------------------------------------------- prefill attention variant 2 (FlashAttention-2)
//
// Grid: one block per (query tile, batch, head), 1-D, the tiles with the most keys first (causal: the last query
// tiles) so the long blocks start before the short ones fill in. A block = 4 warps on 16·RT query rows; lane
// (rg, cg) = (lane / 8, lane % 8) of warp w owns the rows w·4RT + rg + 4r (r < RT) and, in each 64-key tile, the
// keys cg + 8c (c < 8) of the scores and the head-dim columns cg·4 + 32e (e < D/32, one float4 each) of the output.
// The interleaving keeps every shared read conflict-free: the 8 keys (rows of pitch D + 4) a warp reads at once
// start 4 banks apart, so do its 4 query rows, and P's pitch (72) puts its 4 row groups 8 banks apart.
// Per key tile:
//   1. the block stages K and V (float4, coalesced: 16 lanes per 256-byte key row) in shared memory; keys past the
//      block's last visible key are zeros, never read from global memory, and so are the V rows of masked keys
//      (variant 1 skips them: garbage there must not reach the output);
//   2. S = Q·Kᵀ: the dot products run over d in order with fmaf, the same sums as variant 1 (bitwise the same
//      scores), then ·scale; keys past the row's causal limit, the lengths or hidden by key_mask score −inf;
//   3. online softmax per row: the tile max over the row's 8 lanes (shuffles), the running max m, the rescale
//      exp(m_old − m_new) of the lane's partial sum l and of its accumulator; a row with nothing visible yet
//      exponentiates against 0 instead of −inf (no NaN from −inf − −inf), so such a row stays (m, l, acc) =
//      (−inf, 0, 0) and, at the end, gives zeros as variant 1; a NaN score makes l NaN and so the row (as variant 1);
//   4. P goes through the warp's shared tile, acc += P·V with P and V read as float4.
// The lanes' partial sums l are added across the row's 8 lanes once, at the end. fp32 FMAs, expf and a true
// division, as variant 1. One difference: a key visible to some rows of the tile but past this row's causal limit
// adds 0·V (variant 1 skips it), so an inf/NaN in such a V row reaches the row, as in HF eager's P·V.
constexpr int kF2Warps = 4;             // warps per block
constexpr int kF2Keys = 64;             // keys per tile
constexpr int kF2PPitch = kF2Keys + 8;  // P tile pitch: row groups 8 banks apart
constexpr int kF2MinRows = 16;          // fewer query rows: variant 1 (which splits the keys over warps) instead

template <int RT, int DH>
constexpr size_t flash_prefill_smem_bytes() {
  return sizeof(float) *
             ((size_t)16 * RT * (DH + 4) + 2 * (size_t)kF2Keys * (DH + 4) + (size_t)kF2Warps * 4 * RT * kF2PPitch) +
         sizeof(int) * kF2Keys;
}

template <int RT, int DH>
__global__ __launch_bounds__(kF2Warps * 32) void flash_prefill_kernel(const AttnArgs a, int64_t q_tiles) {
  pdl_begin();
  constexpr int WR = 4 * RT, BR = kF2Warps * WR;  // query rows per warp, per block
  constexpr int D4 = DH / 4, P = DH + 4, NE = DH / 32;
  constexpr int KT = kF2Keys, PP = kF2PPitch;
  extern __shared__ __align__(16) float smem[];
  float* Qs = smem;                                              // [BR][P]
  float* Ks = Qs + BR * P;                                       // [KT][P]
  float* Vs = Ks + KT * P;                                       // [KT][P]
  float* Pall = Vs + KT * P;                                     // [warps][WR][PP]
  int* kok = reinterpret_cast<int*>(Pall + kF2Warps * WR * PP);  // [KT]: key in range and not masked
  const float NEG_INF = -INFINITY;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, rg = lane / 8, cg = lane % 8;
  float* Pw = Pall + warp * WR * PP;

  const int64_t BH = a.B * a.H;
  const int64_t bh = (int64_t)blockIdx.x % BH;
  const int64_t tile = q_tiles - 1 - (int64_t)blockIdx.x / BH;  // the last query tiles (most keys) first
  const int64_t b = bh / a.H, h = bh % a.H;
  const int64_t i0 = tile * BR;
  const float* q = a.q + b * a.sq_b + h * a.sq_h;
  const float* k = a.k + b * a.sk_b + h * a.sk_h;
  const float* v = a.v + b * a.sv_b + h * a.sv_h;
  const bool* km = a.key_mask ? a.key_mask + b * a.mask_len : nullptr;

  // keys [0, hi) cover every row of the block; row r of this lane sees [0, lim[r]) minus the masked keys
  const int64_t cap = key_cap(a, b);
  const int64_t rows_end = i0 + BR < a.Tq ? i0 + BR : a.Tq;
  const int64_t hi = a.causal && a.q_offset + rows_end < cap ? a.q_offset + rows_end : cap;
  int64_t lim[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int64_t i = i0 + warp * WR + rg + 4 * r;
    lim[r] = 0;
    if (i < a.Tq) lim[r] = a.causal && a.q_offset + i + 1 < cap ? a.q_offset + i + 1 : cap;
  }

  // Q tile -> Qs (rows past Tq: zeros)
#pragma unroll
  for (int u = 0; u < BR * D4 / (kF2Warps * 32); ++u) {
    const int idx = tid + u * kF2Warps * 32, row = idx / D4, c4 = idx % D4;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i0 + row < a.Tq) x = __ldg(reinterpret_cast<const float4*>(q + (i0 + row) * a.sq_t) + c4);
    *reinterpret_cast<float4*>(Qs + row * P + 4 * c4) = x;
  }

  float m[RT], l[RT], acc[RT][NE][4];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < NE; ++e) acc[r][e][0] = acc[r][e][1] = acc[r][e][2] = acc[r][e][3] = 0.f;
  }

  for (int64_t j0 = 0; j0 < hi; j0 += KT) {
    const int kc = hi - j0 < KT ? (int)(hi - j0) : KT;
    __syncthreads();  // every warp is done with the previous tile's K, V and flags
    // 1. K, V tile -> shared (all loads issued before the stores)
    constexpr int NL = KT * D4 / (kF2Warps * 32);
    float4 kr[NL], vr[NL];
#pragma unroll
    for (int u = 0; u < NL; ++u) {
      const int idx = tid + u * kF2Warps * 32, jj = idx / D4, c4 = idx % D4;
      kr[u] = vr[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (jj < kc) {
        const int64_t j = j0 + jj;
        kr[u] = __ldg(reinterpret_cast<const float4*>(k + j * a.sk_t) + c4);
        if (km == nullptr || km[j]) vr[u] = __ldg(reinterpret_cast<const float4*>(v + j * a.sv_t) + c4);
      }
    }
#pragma unroll
    for (int u = 0; u < NL; ++u) {
      const int idx = tid + u * kF2Warps * 32, jj = idx / D4, c4 = idx % D4;
      *reinterpret_cast<float4*>(Ks + jj * P + 4 * c4) = kr[u];
      *reinterpret_cast<float4*>(Vs + jj * P + 4 * c4) = vr[u];
    }
    if (tid < KT) kok[tid] = tid < kc && (km == nullptr || km[j0 + tid]);
    __syncthreads();

    // 2. S = Q·Kᵀ over d in order (variant 1's sums)
    float s[RT][8];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int c = 0; c < 8; ++c) s[r][c] = 0.f;
    const float* qb = Qs + (warp * WR + rg) * P;
    const float* kb = Ks + cg * P;
#pragma unroll 4
    for (int d4 = 0; d4 < D4; ++d4) {
      float4 qf[RT], kf[8];
#pragma unroll
      for (int r = 0; r < RT; ++r) qf[r] = *reinterpret_cast<const float4*>(qb + 4 * r * P + 4 * d4);
#pragma unroll
      for (int c = 0; c < 8; ++c) kf[c] = *reinterpret_cast<const float4*>(kb + 8 * c * P + 4 * d4);
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          s[r][c] = fmaf(qf[r].x, kf[c].x, s[r][c]);
          s[r][c] = fmaf(qf[r].y, kf[c].y, s[r][c]);
          s[r][c] = fmaf(qf[r].z, kf[c].z, s[r][c]);
          s[r][c] = fmaf(qf[r].w, kf[c].w, s[r][c]);
        }
    }

    // 3. mask, online softmax; p into the warp's P tile
    bool ok[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) ok[c] = kok[cg + 8 * c] != 0;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const int64_t rel = lim[r] - j0;  // keys of this tile the row may see: [0, rl)
      const int rl = rel < 0 ? 0 : (rel > KT ? KT : (int)rel);
      float mx = NEG_INF;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        s[r][c] = (ok[c] && cg + 8 * c < rl) ? s[r][c] * a.scale : NEG_INF;
        mx = fmaxf(mx, s[r][c]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));  // the row's 8 lanes (lane bits 0-2)
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 4));
      const float mnew = fmaxf(m[r], mx);
      const float base = mnew == NEG_INF ? 0.f : mnew;  // nothing visible yet: exp(−inf − 0) = 0, no NaN
      const float corr = expf(m[r] - base);
      float ps = 0.f;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float p = expf(s[r][c] - base);  // 0 for hidden keys; NaN for a NaN score
        Pw[(rg + 4 * r) * PP + cg + 8 * c] = p;
        ps += p;
      }
      l[r] = l[r] * corr + ps;
      m[r] = mnew;
#pragma unroll
      for (int e = 0; e < NE; ++e) {
        acc[r][e][0] *= corr;
        acc[r][e][1] *= corr;
        acc[r][e][2] *= corr;
        acc[r][e][3] *= corr;
      }
    }
    __syncwarp();

    // 4. acc += P·V
    const float* pb = Pw + rg * PP;
    const float* vb = Vs + cg * 4;
#pragma unroll 2
    for (int j4 = 0; j4 < KT / 4; ++j4) {
      float4 pf[RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) pf[r] = *reinterpret_cast<const float4*>(pb + 4 * r * PP + 4 * j4);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float4 vf[NE];
#pragma unroll
        for (int e = 0; e < NE; ++e) vf[e] = *reinterpret_cast<const float4*>(vb + (4 * j4 + u) * P + 32 * e);
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const float p = u == 0 ? pf[r].x : u == 1 ? pf[r].y : u == 2 ? pf[r].z : pf[r].w;
#pragma unroll
          for (int e = 0; e < NE; ++e) {
            acc[r][e][0] = fmaf(p, vf[e].x, acc[r][e][0]);
            acc[r][e][1] = fmaf(p, vf[e].y, acc[r][e][1]);
            acc[r][e][2] = fmaf(p, vf[e].z, acc[r][e][2]);
            acc[r][e][3] = fmaf(p, vf[e].w, acc[r][e][3]);
          }
        }
      }
    }
    // (the next tile's first __syncthreads orders these P reads before the warp's next P writes)
  }

#pragma unroll
  for (int r = 0; r < RT; ++r) {
    float L = l[r];  // the row's sum: its 8 lanes' partial sums (each scaled to the same running max)
    L += __shfl_xor_sync(kFullMask, L, 1);
    L += __shfl_xor_sync(kFullMask, L, 2);
    L += __shfl_xor_sync(kFullMask, L, 4);
    const int64_t i = i0 + warp * WR + rg + 4 * r;
    if (i >= a.Tq) continue;
    const bool seen = L > 0.f || L != L;  // NaN inputs propagate as NaN; nothing visible: zeros
    float* o = a.out + ((b * a.Tq + i) * a.H + h) * DH + cg * 4;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (seen) x = make_float4(acc[r][e][0] / L, acc[r][e][1] / L, acc[r][e][2] / L, acc[r][e][3] / L);
      *reinterpret_cast<float4*>(o + 32 * e) = x;
    }
  }
}

template <int RT, int DH>
static cudaError_t launch_flash_prefill(const AttnArgs& a, cudaStream_t stream) {
  constexpr size_t smem = flash_prefill_smem_bytes<RT, DH>();
  if (smem > 48 * 1024) {  // the same opt-in every time: no race between host threads
    cudaError_t err =
        cudaFuncSetAttribute(flash_prefill_kernel<RT, DH>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t q_tiles = (a.Tq + 16 * RT - 1) / (16 * RT);
  const int64_t blocks = q_tiles * a.B * a.H;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  launch(flash_prefill_kernel<RT, DH>, (unsigned)blocks, kF2Warps * 32, smem, stream, a, q_tiles);
  return cudaGetLastError();
}

bool flash_prefill_ok(const AttnArgs& a) {
  const bool strides4 = a.sq_b % 4 == 0 && a.sq_h % 4 == 0 && a.sq_t % 4 == 0 && a.sk_b % 4 == 0 && a.sk_h % 4 == 0 &&
                        a.sk_t % 4 == 0 && a.sv_b % 4 == 0 && a.sv_h % 4 == 0 && a.sv_t % 4 == 0;
  return (a.D == 32 || a.D == 64) && a.bias == nullptr && a.Tq >= kF2MinRows && strides4 && aligned16(a.q) &&
         aligned16(a.k) && aligned16(a.v) && aligned16(a.out);
}

template <int DH>
static cudaError_t flash_prefill_d(const AttnArgs& a, int num_sms, cudaStream_t stream) {
  // the largest row tile (RT = 4, 2, 1: 64, 32, 16 rows) whose grid still gives every SM a block
  const int64_t bh = a.B * a.H;
  auto blocks = [&](int rt) { return bh * ((a.Tq + 16 * rt - 1) / (16 * rt)); };
  if (blocks(4) >= num_sms) return launch_flash_prefill<4, DH>(a, stream);
  if (blocks(2) >= num_sms) return launch_flash_prefill<2, DH>(a, stream);
  return launch_flash_prefill<1, DH>(a, stream);
}

cudaError_t flash_prefill(const AttnArgs& a, int num_sms, cudaStream_t stream) {
  if (a.B == 0 || a.H == 0 || a.Tq == 0 || a.D == 0) return cudaGetLastError();
  if (!flash_prefill_ok(a) || a.B > 65535 || a.H > 65535) return cudaErrorInvalidValue;
  if (a.D == 32) return flash_prefill_d<32>(a, num_sms, stream);
  return flash_prefill_d<64>(a, num_sms, stream);
}

}  // namespace gk::cuda
