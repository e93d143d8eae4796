// attn_args.h — the attention op's arguments as raw pointers and strides, shared by the CPU kernels
// (cpu/kernels/attention.h) and the CUDA launcher (cuda/attention.cu). No torch headers: nvcc includes it too.
// Strides are in elements; the last dim of q, k, v and bias is contiguous.
#pragma once
#include <cstdint>

namespace gk {

struct AttnArgs {
  const float *q, *k, *v;
  int64_t sq_b, sq_h, sq_t;
  int64_t sk_b, sk_h, sk_t;
  int64_t sv_b, sv_h, sv_t;
  float* out;  // [B, Tq, H, D] contiguous
  int64_t B, H, Tq, Tkv, D;
  const bool* key_mask;  // [B, mask_len] or null: false = padding
  int64_t mask_len;
  const float* bias;  // additive, or null; element (b, h, i, j) at b*sb_b + h*sb_h + i*sb_t + j
  int64_t sb_b, sb_h, sb_t, bias_len;
  float scale;
  int64_t q_offset;  // absolute position of query row 0 (the cache length before this call)
  bool causal;
  // CUDA decode only (the CPU kernels never set or read it): device int64, row b sees keys j < kv_len[b * kv_len_sb]
  // (kv_len_sb 0: one length for all rows). A length read on the device lets a captured CUDA graph attend over the
  // tokens so far of a static cache, not over all of it.
  const int64_t* kv_len;
  int64_t kv_len_sb;
};

}  // namespace gk
