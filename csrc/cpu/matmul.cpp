// matmul.cpp — torch glue for the Conv1D matmul (kernels/matmul.h): packing, argument checks, and the split of
// the output into (row block × 32-column panel) work for at::parallel_for.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/op_args.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

// Up to this many rows (decode), weights that are not fp32 panels are read straight from their storage, once per
// tile of rows: reduced-precision panels widened in registers, wte's [N, K] rows as dot products. More rows
// (prefill) convert each K block once into an fp32 (or bf16-pair) buffer and run the FMA-bound kernels over it.
constexpr int64_t kDecodeRows = 16;

static int64_t num_panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// [K, N] (any strides) -> [ceil(N/32)][K][32], zero-filled past N. Done once per weight at optimize() time.
at::Tensor pack(const at::Tensor& weight) {
  GK_CHECK_FLOAT(weight, "pack", "weight");
  GK_CHECK_DIM(weight, 2, "pack", "weight");
  const int64_t K = weight.size(0), N = weight.size(1), P = num_panels(N);
  at::Tensor out = at::zeros({P, K, kPanel}, weight.options());
  if (out.numel() == 0) return out;
  const float* w = weight.data_ptr<float>();
  const int64_t sk = weight.stride(0), sn = weight.stride(1);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j)
          o[(p * K + k) * kPanel + j] = w[k * sk + (p * kPanel + j) * sn];
  });
  return out;
}

Layout parse_layout(c10::string_view layout, const char* who) {
  if (layout == "kn") return Layout::KN;
  if (layout == "nk") return Layout::NK;
  if (layout == "panels") return Layout::Panels;
  TORCH_CHECK_VALUE(false, "gpt2kern.", who, ": layout must be 'kn', 'nk' or 'panels', got '", std::string(layout),
                    "'");
}

WType parse_dtype(c10::string_view dtype, const char* who) {
  if (dtype == "fp32") return WType::F32;
  if (dtype == "fp16") return WType::F16;
  if (dtype == "bf16") return WType::BF16;
  if (dtype == "int8") return WType::I8;
  TORCH_CHECK_VALUE(false, "gpt2kern.", who, ": dtype must be 'fp32', 'fp16', 'bf16' or 'int8', got '",
                    std::string(dtype), "'");
}

int64_t weight_out_features(const at::Tensor& data, Layout layout) {
  if (layout == Layout::Panels || data.dim() != 2) return -1;
  return layout == Layout::KN ? data.size(1) : data.size(0);
}

static size_t elem_size(WType t) { return t == WType::F32 ? 4 : t == WType::I8 ? 1 : 2; }

WeightRef weight_ref(const at::Tensor& data, const std::optional<at::Tensor>& scales, Layout layout, int64_t K,
                     int64_t N, const char* who, const char* name) {
  TORCH_CHECK_VALUE(data.defined(), "gpt2kern.", who, ": ", name, " is missing");
  TORCH_CHECK_VALUE(data.device().is_cpu(), "gpt2kern.", who, ": ", name, " must be a CPU tensor, got ",
                    data.device());
  WType type;
  switch (data.scalar_type()) {
    case at::kFloat: type = WType::F32; break;
    case at::kHalf: type = WType::F16; break;
    case at::kBFloat16: type = WType::BF16; break;
    case at::kChar: type = WType::I8; break;
    default:
      TORCH_CHECK_TYPE(false, "gpt2kern.", who, ": ", name, " must be float32, float16, bfloat16 or int8, got ",
                       data.scalar_type());
  }
  WeightRef W{data.data_ptr(), layout, type, kPanel, nullptr, K};
  if (layout != Layout::Panels) {
    TORCH_CHECK_TYPE(type == WType::F32, "gpt2kern.", who, ": ", name, " read in place (layout '",
                     layout == Layout::KN ? "kn" : "nk", "') must be float32; other dtypes are packed ('panels')");
    const int64_t rows = layout == Layout::KN ? K : N, cols = layout == Layout::KN ? N : K;
    TORCH_CHECK_VALUE(data.dim() == 2 && data.size(0) == rows && data.size(1) == cols, "gpt2kern.", who, ": ", name,
                      " in layout '", layout == Layout::KN ? "kn" : "nk", "' must be [", rows, ", ", cols,
                      "], got ", data.sizes());
    TORCH_CHECK_VALUE((data.stride(1) == 1 || cols <= 1) && (rows <= 1 || data.stride(0) >= cols), "gpt2kern.", who,
                      ": ", name, "'s rows must be contiguous (got strides ", data.strides(), ")");
    W.ld = rows > 1 ? data.stride(0) : cols;
  } else {
    const int64_t P = (N + kPanel - 1) / kPanel;
    TORCH_CHECK_VALUE(data.dim() == 3 && data.size(0) == P && data.size(1) == K && data.size(2) == kPanel &&
                          data.is_contiguous(),
                      "gpt2kern.", who, ": ", name, " in layout 'panels' must be a contiguous [", P, ", ", K,
                      ", ", kPanel, "] tensor for ", K, " -> ", N, ", got ", data.sizes());
  }
  if (type == WType::I8) {
    TORCH_CHECK_VALUE(scales.has_value(), "gpt2kern.", who, ": ", name, " is int8 and needs its scales");
    const at::Tensor& s = *scales;
    GK_CHECK_FLOAT(s, who, "scales");
    const int64_t P = (N + kPanel - 1) / kPanel;
    const int64_t ng = s.dim() == 3 ? s.size(1) : 0;
    TORCH_CHECK_VALUE(s.device().is_cpu() && s.is_contiguous() && s.dim() == 3 && s.size(0) == P &&
                          s.size(2) == kPanel && ng >= 1 && K % ng == 0,
                      "gpt2kern.", who, ": ", name, " scales must be a contiguous CPU [", P,
                      ", groups, ", kPanel, "] tensor with groups dividing ", K, ", got ", s.sizes());
    W.scales = s.data_ptr<float>();
    W.group = K / ng;
  } else {
    TORCH_CHECK_VALUE(!scales.has_value(), "gpt2kern.", who, ": ", name, " has scales, but only int8 weights take them");
  }
  return W;
}

void run_matmul(const float* A, int64_t lda, int64_t M, int64_t K, WeightRef W, int64_t N, const float* bias,
                Epilogue epi, const float* R, int64_t ldr, float* C) {
  const KernelTable& t = kernels();
  const int64_t P = num_panels(N);
  // Panels are split across threads (taken in chunks from a shared counter, parallel.h), so each weight byte is
  // read by exactly one thread.
  // K blocks of KC when x's row block would not fit in L2 beside a weight panel (K = 3072); decode (M <= 2)
  // streams the weights once either way, so it keeps K whole. Every other format (HF's [K, N] in place, fp16, bf16,
  // int8) is made fp32 per K block of a few panels in a per-thread buffer first (BLIS's B panel): KC = 768 keeps
  // GPT-2's K = 768 whole (measured on Zen 5 at M = 128: 256 and 512 were 8-15 % slower).
  const bool packed_f32 = W.layout == Layout::Panels && W.type == WType::F32;
  const int64_t KC = M <= 2 ? K : packed_f32 ? (K > 1024 ? 1024 : K) : std::min<int64_t>(K, 768);
  // Row blocks of MC rows of x stay hot in L2 while a thread walks its panels.
  const int64_t MC = 8 * t.mr_max;
  // at least ~64K FMAs per task: small products (HF's tiny test model, a few rows) run on the calling thread
  // instead of paying a thread wake-up that costs more than the work
  // Prefill (M > 2): a chunk of panels re-reads all of x from L3, so chunks stay large — half a thread's share at
  // least (measured: guided chunks down to one panel cost 4-10 % at M = 128 and 1024)
  int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K * kPanel));
  if (M > 2) grain = std::max<int64_t>(grain, (P + 2 * kernel_threads() - 1) / (2 * kernel_threads()));
  // Prefill rows are copied per (row block, K block) into a buffer whose row stride is not a multiple of 4 KiB:
  // x rows 3072 floats apart (mlp.c_proj's input) would otherwise all fall in one L1 set and evict each other.
  const bool copy_a = M > 2 * t.mr_max && (lda * 4) % 4096 == 0;
  const int64_t lda_buf = KC + 16;
  if (W.layout == Layout::NK && M <= kDecodeRows) {
    // [N, K] (the lm_head over wte), decode: blocks of NB rows of W (about 128 KiB, so a block stays in L2 while every row
    // block of x passes over it), taken from the shared counter; bias and epilogue on each block's columns after
    const int64_t NB = std::max<int64_t>(8, (32768 / std::max<int64_t>(K, 1)) / 8 * 8);
    const int64_t nblk = (N + NB - 1) / NB;
    const float* w = static_cast<const float*>(W.w);
    parallel_chunks(nblk, std::max<int64_t>(1, grain * kPanel / NB), [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * NB, nc = std::min(NB, N - n0);
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
          const int64_t mc = std::min(MC, M - m0);
          t.matmul_nt(A + m0 * lda, lda, mc, K, w + n0 * W.ld, W.ld, nc, C + m0 * N + n0, N);
        }
        if (!bias && epi == Epilogue::None) continue;
        for (int64_t m = 0; m < M; ++m) {
          float* c = C + m * N + n0;
          if (bias)
            for (int64_t i = 0; i < nc; ++i) c[i] += bias[n0 + i];
          if (epi == Epilogue::GeluNew) t.gelu_new(c, c, nc);
          if (epi == Epilogue::Residual)
            for (int64_t i = 0; i < nc; ++i) c[i] += R[m * ldr + n0 + i];
        }
      }
    });
    return;
  }
  if (W.layout == Layout::NK) {
    // [N, K], prefill: computed transposed, Cᵀ = W · xᵀ, so W's rows are the micro-kernel's broadcast rows (read in
    // place, in order) and x — small beside W — is what gets packed: xᵀ into [ceil(M/32)][K][32] panels once per
    // call. Each tile [rows of W × 32 rows of x] is written back transposed (a few hundred stores per ~10⁵ FMAs).
    const int64_t Q = (M + kPanel - 1) / kPanel;
    thread_local std::vector<float> xbuf;  // the calling thread's; workers read it
    if ((int64_t)xbuf.size() < Q * K * kPanel) xbuf.resize(Q * K * kPanel);
    float* xp = xbuf.data();
    parallel_chunks(Q, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t mc = std::min<int64_t>(kPanel, M - q * kPanel);
        float* d = xp + q * K * kPanel;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < kPanel; ++j) d[k * kPanel + j] = j < mc ? A[(q * kPanel + j) * lda + k] : 0.f;
      }
    });
    const float* w = static_cast<const float*>(W.w);
    const int64_t NBR = MC;  // rows of W per task: ~MC·K floats, in L2 while every x panel passes over them
    const int64_t nblk = (N + NBR - 1) / NBR;
    parallel_chunks(nblk, 1, [&](int64_t b0, int64_t b1) {
      thread_local std::vector<float> tbuf;
      if ((int64_t)tbuf.size() < NBR * kPanel) tbuf.resize(NBR * kPanel);
      float* tmp = tbuf.data();
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * NBR, nr = std::min(NBR, N - n0);
        for (int64_t q = 0; q < Q; ++q) {
          const int mc = (int)std::min<int64_t>(kPanel, M - q * kPanel);
          t.matmul_panel(w + n0 * W.ld, W.ld, nr, K, xp + q * K * kPanel, kPanel, tmp, kPanel, 0, mc, nullptr,
                         Epilogue::None, nullptr, 0, kKWhole);
          for (int j = 0; j < mc; ++j) {
            const int64_t m = q * kPanel + j;
            float* c = C + m * N + n0;
            for (int64_t r = 0; r < nr; ++r) c[r] = tmp[r * kPanel + j] + (bias ? bias[n0 + r] : 0.f);
            if (epi == Epilogue::GeluNew) t.gelu_new(c, c, nr);
            if (epi == Epilogue::Residual)
              for (int64_t r = 0; r < nr; ++r) c[r] += R[m * ldr + n0 + r];
          }
        }
      }
    });
    return;
  }
  const size_t esz = elem_size(W.type);
  const int64_t ngroups = W.scales ? K / W.group : 0;
  auto panel_data = [&](int64_t p) { return static_cast<const char*>(W.w) + (size_t)(p * K * kPanel) * esz; };
  auto panel_scales = [&](int64_t p) { return W.scales ? W.scales + p * ngroups * kPanel : nullptr; };
  // bf16 weights, and int8 weights with an even group (their codes are exact in bf16), in prefill on a CPU with
  // AVX512_BF16: x rounded to bf16 once per call (rows of Kp, an even length), each K block of a group of panels
  // interleaved into pairs in a per-thread buffer, VDPBF16PS tiles (int8: group sums scaled once per group)
  const bool q8 = W.type == WType::I8 && W.group % 2 == 0;
  const Bf16DotKernels* bd = W.layout == Layout::Panels && (W.type == WType::BF16 || q8) && M > kDecodeRows
                                 ? bf16_dot()
                                 : nullptr;
  if (bd) {
    const int64_t Kp = (K + 1) / 2 * 2;
    // int8: K blocks of whole groups (the group divides K)
    const int64_t KCb = q8 ? std::max<int64_t>(W.group, std::min<int64_t>(K, 768) / W.group * W.group)
                           : std::min<int64_t>(Kp, 768);
    thread_local std::vector<uint16_t> a16;  // the calling thread's; workers read it
    if ((int64_t)a16.size() < M * Kp) a16.resize(M * Kp);
    uint16_t* xa = a16.data();
    parallel_chunks(M, 16, [&](int64_t m0, int64_t m1) { bd->to_bf16(A + m0 * lda, lda, m1 - m0, K, xa + m0 * Kp, Kp); });
    const int64_t SGb = std::max<int64_t>(1, (256 * 1024 / 2) / (KCb * kPanel));
    parallel_chunks(P, grain, [&](int64_t p0, int64_t p1) {
      thread_local std::vector<uint16_t> b16;
      if ((int64_t)b16.size() < SGb * KCb * kPanel) b16.resize(SGb * KCb * kPanel);
      for (int64_t g0 = p0; g0 < p1; g0 += SGb) {
        const int64_t g1 = std::min(p1, g0 + SGb);
        for (int64_t k0 = 0; k0 < K; k0 += KCb) {
          const int64_t kc = std::min(KCb, K - k0), kcp = (kc + 1) / 2 * 2;
          const int part = (k0 == 0 ? kKFirst : 0) | (k0 + kc == K ? kKLast : 0);
          for (int64_t p = g0; p < g1; ++p) {
            uint16_t* dst = b16.data() + (p - g0) * kcp * kPanel;
            if (q8)
              bd->pairs_i8(reinterpret_cast<const int8_t*>(panel_data(p)), k0, kc, dst);
            else
              bd->pairs(reinterpret_cast<const uint16_t*>(panel_data(p)), K, k0, kc, dst);
          }
          for (int64_t m0 = 0; m0 < M; m0 += MC) {
            const int64_t mc = std::min(MC, M - m0);
            for (int64_t p = g0; p < g1; ++p) {
              const uint16_t* bp = b16.data() + (p - g0) * kcp * kPanel;
              const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
              if (q8)
                bd->matmul_panel_q(xa + m0 * Kp + k0, Kp, mc, kc, bp, panel_scales(p) + k0 / W.group * kPanel,
                                   W.group, C + m0 * N, N, p * kPanel, ncols, bias, epi, R ? R + m0 * ldr : nullptr,
                                   ldr, part);
              else
                bd->matmul_panel(xa + m0 * Kp + k0, Kp, mc, kcp, bp, C + m0 * N, N, p * kPanel, ncols, bias, epi,
                                 R ? R + m0 * ldr : nullptr, ldr, part);
            }
          }
        }
      }
    });
    return;
  }
  if (W.layout == Layout::Panels && !packed_f32 && M <= kDecodeRows) {
    // reduced-precision decode: each panel widened in registers, read once, whole K
    parallel_chunks(P, std::max<int64_t>(1, grain), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        t.matmul_panel_lowp(A, lda, M, K, panel_data(p), W.type, panel_scales(p), W.group, C, N, p * kPanel,
                            (int)std::min<int64_t>(kPanel, N - p * kPanel), bias, epi, R, ldr);
    });
    return;
  }
  if (W.layout == Layout::KN && M <= 2) {
    // Decode over HF's [K, N]: rows of W are adjacent, so blocks of whole rows are contiguous streams. Fixed blocks
    // of KB rows (never a function of the thread count, so the sum order is too) each give partial sums for all N
    // columns; the partials are added in block order, then the bias and epilogue.
    constexpr int64_t KB = 128;
    const int64_t nb = (K + KB - 1) / KB;
    thread_local std::vector<float> part;  // the calling thread's, grown once: no allocation per decode step
    if (part.size() < (size_t)(nb * M * N)) part.resize((size_t)(nb * M * N));
    float* pp = part.data();  // (a thread_local named inside the lambda would be each worker's own)
    parallel_chunks(nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t k0 = blk * KB, kc = std::min(KB, K - k0);
        t.gemv_rows(A + k0, lda, M, kc, static_cast<const float*>(W.w) + k0 * W.ld, W.ld, N, pp + blk * M * N);
      }
    });
    for (int64_t blk = 1; blk < nb; ++blk)
      for (int64_t i = 0; i < M * N; ++i) part[i] += part[blk * M * N + i];
    for (int64_t m = 0; m < M; ++m) {
      float* c = C + m * N;
      const float* s = part.data() + m * N;
      for (int64_t i = 0; i < N; ++i) c[i] = s[i] + (bias ? bias[i] : 0.f);
      if (epi == Epilogue::GeluNew) t.gelu_new(c, c, N);
      if (epi == Epilogue::Residual)
        for (int64_t i = 0; i < N; ++i) c[i] += R[m * ldr + i];
    }
    return;
  }
  parallel_chunks(P, grain, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> abuf, bbuf;  // grow once per thread, then reused: no allocation per call
    if (copy_a && (int64_t)abuf.size() < MC * lda_buf) abuf.resize(MC * lda_buf);
    auto a_block = [&](int64_t m0, int64_t mc, int64_t k0, int64_t kc, int64_t& la) {
      const float* a = A + m0 * lda + k0;
      la = lda;
      if (copy_a) {
        for (int64_t r = 0; r < mc; ++r) std::memcpy(abuf.data() + r * lda_buf, a + r * lda, kc * sizeof(float));
        a = abuf.data();
        la = lda_buf;
      }
      return a;
    };
    // panel p's rows [k0, k0 + kc) as fp32 [kc][32] in dst (zeros past N): prefill's B block, copied from HF's
    // [K, N] weight or widened from a reduced-precision panel
    auto pack_rows = [&](int64_t p, int64_t k0, int64_t kc, float* dst) {
      if (W.layout == Layout::Panels) return t.unpack_panel(panel_data(p), W.type, panel_scales(p), W.group, k0, kc, dst);
      const int64_t ncols = std::min<int64_t>(kPanel, N - p * kPanel);
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = static_cast<const float*>(W.w) + (k0 + k) * W.ld + p * kPanel;
        float* d = dst + k * kPanel;
        std::memcpy(d, src, ncols * sizeof(float));
        if (ncols < kPanel) std::memset(d + ncols, 0, (kPanel - ncols) * sizeof(float));
      }
    };
    if (packed_f32) {
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t mc = std::min(MC, M - m0);
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
          const int64_t kc = std::min(KC, K - k0);
          const int part = (k0 == 0 ? kKFirst : 0) | (k0 + kc == K ? kKLast : 0);
          int64_t la;
          const float* a = a_block(m0, mc, k0, kc, la);
          for (int64_t p = p0; p < p1; ++p) {
            const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
            t.matmul_panel(a, la, mc, kc, static_cast<const float*>(W.w) + (p * K + k0) * kPanel, kPanel, C + m0 * N, N, p * kPanel, ncols,
                           bias, epi, R ? R + m0 * ldr : nullptr, ldr, part);
          }
        }
      }
      return;
    }
    // Any other format, prefill: groups of SG panels whose K block (SG × KC × 32 floats, ~256 KiB) stays in L2;
    // per group and K block, the panels are made fp32 once (copied, transposed or widened: pack_rows), then every
    // row block of x runs over them. Each weight element is converted exactly once per call.
    const int64_t SG = std::max<int64_t>(1, (256 * 1024 / 4) / (KC * kPanel));
    if ((int64_t)bbuf.size() < SG * KC * kPanel) bbuf.resize(SG * KC * kPanel);
    // While one block computes, the next block's source bytes are prefetched, a slice per tile call, so its
    // conversion finds them in cache instead of stalling on DRAM (the packed copy streams under the FMAs the same
    // way). A source row of a block is SG·32 consecutive elements of W (panels: one panel's rows are contiguous).
    const size_t row_bytes = W.layout == Layout::KN ? SG * kPanel * 4 : kPanel * esz;
    auto prefetch_block = [&](int64_t g0, int64_t k0, int64_t kc, int64_t slice, int64_t nslices) {
      const int64_t g1 = std::min(p1, g0 + SG);
      if (W.layout == Layout::KN) {
        const char* base = static_cast<const char*>(W.w) + (size_t)(g0 * kPanel) * 4;
        const size_t seg = std::min<size_t>(row_bytes, (size_t)(N - g0 * kPanel) * 4);
        for (int64_t k = k0 + slice; k < k0 + kc; k += nslices)
          for (size_t off = 0; off < seg; off += 64) __builtin_prefetch(base + (size_t)(k * W.ld) * 4 + off);
      } else {
        for (int64_t p = g0; p < g1; ++p) {
          const char* base = panel_data(p) + (size_t)(k0 * kPanel) * esz;
          const size_t bytes = (size_t)(kc * kPanel) * esz;
          for (size_t off = (size_t)slice * 64; off < bytes; off += (size_t)nslices * 64) __builtin_prefetch(base + off);
        }
      }
    };
    const int64_t mblocks = (M + MC - 1) / MC;
    for (int64_t g0 = p0; g0 < p1; g0 += SG) {
      const int64_t g1 = std::min(p1, g0 + SG);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        const int part = (k0 == 0 ? kKFirst : 0) | (k0 + kc == K ? kKLast : 0);
        for (int64_t p = g0; p < g1; ++p) pack_rows(p, k0, kc, bbuf.data() + (p - g0) * kc * kPanel);
        // the block after this one: the next K block of this group, else the next group's first
        const int64_t nk0 = k0 + kc < K ? k0 + kc : 0, ng0 = k0 + kc < K ? g0 : g0 + SG;
        const int64_t nslices = mblocks * (g1 - g0);
        int64_t slice = 0;
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
          const int64_t mc = std::min(MC, M - m0);
          int64_t la;
          const float* a = a_block(m0, mc, k0, kc, la);
          for (int64_t p = g0; p < g1; ++p) {
            if (ng0 < p1) prefetch_block(ng0, nk0, std::min(KC, K - nk0), slice++, nslices);
            const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
            t.matmul_panel(a, la, mc, kc, bbuf.data() + (p - g0) * kc * kPanel, kPanel, C + m0 * N, N, p * kPanel,
                           ncols, bias, epi, R ? R + m0 * ldr : nullptr, ldr, part);
          }
        }
      }
    }
  });
}

at::Tensor conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  c10::string_view epilogue, const std::optional<at::Tensor>& residual, int64_t out_features,
                  c10::string_view layout, const std::optional<at::Tensor>& scales) {
  const Epilogue epi = static_cast<Epilogue>(parse_epilogue(epilogue));
  GK_CHECK_FLOAT(x, "conv1d", "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "gpt2kern.conv1d: x must have at least 1 dim");
  GK_CHECK_SAME_DEVICE(x, weight, "conv1d", "weight");
  const Layout lay = parse_layout(layout, "conv1d");
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(lay == Layout::Panels || weight.dim() == 2, "gpt2kern.conv1d: weight in layout '",
                    std::string(layout), "' must be 2-D (", lay == Layout::KN ? "[in, out]" : "[out, in]", "), got ",
                    weight.sizes());
  const int64_t shape_n = weight_out_features(weight, lay);
  const int64_t N = out_features >= 0 ? out_features : shape_n;
  TORCH_CHECK_VALUE(N >= 0, "gpt2kern.conv1d: a weight in layout 'panels' needs out_features to give N");
  TORCH_CHECK_VALUE(shape_n < 0 || shape_n == N, "gpt2kern.conv1d: out_features=", out_features, " but the weight "
                    "has ", shape_n, " outputs");
  // in-place layouts with a non-unit column stride are copied (a view's price, not an error)
  at::Tensor wt = weight;
  if (lay == Layout::Panels)
    wt = weight.contiguous();
  else if (weight.dim() == 2 && !(weight.stride(1) == 1 && (weight.size(0) <= 1 || weight.stride(0) >= weight.size(1))))
    wt = weight.contiguous();
  const WeightRef W = weight_ref(wt, scales, lay, K, N, "conv1d", "weight");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  check_conv1d_extras(x, bias, (int)epi, epilogue, residual, N, out_shape);
  at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  if (K == 0) {  // empty reduction: bias (+ epilogue) only
    at::Tensor z = b.defined() ? b.expand(out_shape).clone() : at::zeros(out_shape, x.options());
    if (epi == Epilogue::GeluNew) return gelu_new(z);
    if (epi == Epilogue::Residual) z.add_(*residual);
    return z;
  }
  const Rows A = rows_of(x, K);
  Rows rr{};
  if (epi == Epilogue::Residual) rr = rows_of(*residual, N);
  const float* pa = A.p;
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* pr = rr.p;
  const int64_t M = A.m, lda = A.ld, ldr = rr.ld;
  float* pc = y.data_ptr<float>();
  run_matmul(pa, lda, M, K, W, N, pb, epi, pr, ldr, pc);
  return y;
}

}  // namespace gk::cpu
