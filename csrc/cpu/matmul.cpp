// matmul.cpp — torch glue for the Conv1D matmul (kernels/matmul.h): packing, argument checks, the choice of a
// strategy for a weight format and row count (choose_matmul, a lookup), and each strategy's split of the output
// into work for at::parallel_for.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/checks.h"
#include "../common/op_args.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

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
  TORCH_CHECK_VALUE(data.device().is_cpu(), "gpt2kern.", who, ": ", name, " must be a CPU tensor, got ", data.device());
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
                      " in layout '", layout == Layout::KN ? "kn" : "nk", "' must be [", rows, ", ", cols, "], got ",
                      data.sizes());
    TORCH_CHECK_VALUE((data.stride(1) == 1 || cols <= 1) && (rows <= 1 || data.stride(0) >= cols), "gpt2kern.", who,
                      ": ", name, "'s rows must be contiguous (got strides ", data.strides(), ")");
    W.ld = rows > 1 ? data.stride(0) : cols;
  } else {
    const int64_t P = (N + kPanel - 1) / kPanel;
    TORCH_CHECK_VALUE(
        data.dim() == 3 && data.size(0) == P && data.size(1) == K && data.size(2) == kPanel && data.is_contiguous(),
        "gpt2kern.", who, ": ", name, " in layout 'panels' must be a contiguous [", P, ", ", K, ", ", kPanel,
        "] tensor for ", K, " -> ", N, ", got ", data.sizes());
  }
  if (type == WType::I8) {
    TORCH_CHECK_VALUE(scales.has_value(), "gpt2kern.", who, ": ", name, " is int8 and needs its scales");
    const at::Tensor& s = *scales;
    GK_CHECK_FLOAT(s, who, "scales");
    const int64_t P = (N + kPanel - 1) / kPanel;
    const int64_t ng = s.dim() == 3 ? s.size(1) : 0;
    TORCH_CHECK_VALUE(s.device().is_cpu() && s.is_contiguous() && s.dim() == 3 && s.size(0) == P &&
                          s.size(2) == kPanel && ng >= 1 && K % ng == 0,
                      "gpt2kern.", who, ": ", name, " scales must be a contiguous CPU [", P, ", groups, ", kPanel,
                      "] tensor with groups dividing ", K, ", got ", s.sizes());
    W.scales = s.data_ptr<float>();
    W.group = K / ng;
  } else {
    TORCH_CHECK_VALUE(!scales.has_value(), "gpt2kern.", who, ": ", name,
                      " has scales, but only int8 weights take them");
  }
  return W;
}

// ---- run_matmul: choose() picks one strategy from the weight's format and the row count, and the table below
// runs it. Every strategy splits the output the same way for any thread count (fixed blocks taken from a shared
// counter, parallel.h), so results do not depend on the number of threads.

namespace {

// One run_matmul call's operands, and the kernels read once for it.
struct MatmulArgs {
  const float* A;
  int64_t lda, M, K;
  WeightRef W;
  int64_t N;
  const float* bias;
  Epilogue epi;
  const float* R;
  int64_t ldr;
  float* C;
  const KernelTable& t;
  const Bf16DotKernels* bd;  // the bf16 dot-product kernels, where this CPU and ISA have them
  const Int8DotKernels* i8;  // the int8 dot-product kernels, where they run for these rows
};

// Row blocks of MC rows of x stay hot in L2 while a thread walks its panels.
int64_t row_block(const KernelTable& t) { return 8 * t.mr_max; }

// Tasks over P panels: at least ~64K FMAs each, so small products (HF's tiny test model, a few rows) run on the
// calling thread instead of paying a thread wake-up that costs more than the work. Prefill (M > 2): a chunk of
// panels re-reads all of x from L3, so chunks stay large — half a thread's share at least, since guided chunks
// down to one panel were measurably slower.
int64_t panel_grain(int64_t M, int64_t K, int64_t P) {
  int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K * kPanel));
  if (M > 2) grain = std::max<int64_t>(grain, (P + 2 * kernel_threads() - 1) / (2 * kernel_threads()));
  return grain;
}

// K blocks of at most `limit` when x's row block would not fit in L2 beside a weight panel; decode (M <= 2)
// streams the weights once either way, so it keeps K whole.
int64_t k_block(int64_t M, int64_t K, int64_t limit) { return M <= 2 ? K : std::min<int64_t>(K, limit); }

int k_part(int64_t k0, int64_t kc, int64_t K) { return (k0 == 0 ? kKFirst : 0) | (k0 + kc == K ? kKLast : 0); }

const char* panel_data(const MatmulArgs& a, int64_t p) {
  return static_cast<const char*>(a.W.w) + (size_t)(p * a.K * kPanel) * elem_size(a.W.type);
}
const float* panel_scales(const MatmulArgs& a, int64_t p) {
  return a.W.scales ? a.W.scales + p * (a.K / a.W.group) * kPanel : nullptr;
}

// Prefill's rows of x, per (row block, K block): read in place, or copied into a buffer whose row stride is not a
// multiple of 4 KiB where x's is (x rows 3072 floats apart, mlp.c_proj's input, would otherwise all fall in one
// L1 set and evict each other).
class RowBlocks {
 public:
  RowBlocks(const MatmulArgs& a, int64_t KC, std::vector<float>& buf)
      : a_(a), copy_(a.M > 2 * a.t.mr_max && (a.lda * 4) % 4096 == 0), ld_buf_(KC + 16), buf_(buf) {
    const int64_t MC = row_block(a.t);
    if (copy_ && (int64_t)buf_.size() < MC * ld_buf_) buf_.resize(MC * ld_buf_);
  }
  const float* get(int64_t m0, int64_t mc, int64_t k0, int64_t kc, int64_t& la) const {
    const float* x = a_.A + m0 * a_.lda + k0;
    la = a_.lda;
    if (!copy_) return x;
    for (int64_t r = 0; r < mc; ++r) std::memcpy(buf_.data() + r * ld_buf_, x + r * a_.lda, kc * sizeof(float));
    la = ld_buf_;
    return buf_.data();
  }

 private:
  const MatmulArgs& a_;
  const bool copy_;
  const int64_t ld_buf_;
  std::vector<float>& buf_;
};

// [N, K] (the lm_head over wte), decode: blocks of NB rows of W (about 128 KiB, so a block stays in L2 while every
// row block of x passes over it), taken from the shared counter; bias and epilogue on each block's columns after.
void mm_nk_decode(const MatmulArgs& a) {
  const KernelTable& t = a.t;
  const int64_t M = a.M, K = a.K, N = a.N, MC = row_block(t);
  const int64_t NB = std::max<int64_t>(8, (32768 / std::max<int64_t>(K, 1)) / 8 * 8);
  const int64_t nblk = (N + NB - 1) / NB;
  const float* w = static_cast<const float*>(a.W.w);
  const int64_t grain = std::max<int64_t>(1, panel_grain(M, K, num_panels(N)) * kPanel / NB);
  parallel_chunks(nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * NB, nc = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t mc = std::min(MC, M - m0);
        // the last row block prefetches the next block of this chunk (csrc/cpu/kernels/matmul_nt.h)
        const int64_t nn = m0 + mc < M || blk + 1 >= b1 ? 0 : std::min(NB, N - n0 - nc);
        t.matmul_nt(a.A + m0 * a.lda, a.lda, mc, K, w + n0 * a.W.ld, a.W.ld, nc, a.C + m0 * N + n0, N,
                    nn > 0 ? w + (n0 + nc) * a.W.ld : nullptr,
                    nn > 0 ? ((nn - 1) * a.W.ld + K) * (int64_t)sizeof(float) : 0);
      }
      if (!a.bias && a.epi == Epilogue::None) continue;
      for (int64_t m = 0; m < M; ++m) {
        float* c = a.C + m * N + n0;
        if (a.bias)
          for (int64_t i = 0; i < nc; ++i) c[i] += a.bias[n0 + i];
        if (a.epi == Epilogue::GeluNew) t.gelu_new(c, c, nc);
        if (a.epi == Epilogue::Residual)
          for (int64_t i = 0; i < nc; ++i) c[i] += a.R[m * a.ldr + n0 + i];
      }
    }
  });
}

// [N, K], prefill: computed transposed, Cᵀ = W · xᵀ, so W's rows are the micro-kernel's broadcast rows (read in
// place, in order) and x — small beside W — is what gets packed: xᵀ into [ceil(M/32)][K][32] panels once per
// call. Each tile [rows of W × 32 rows of x] is written back transposed (a few hundred stores per ~10⁵ FMAs).
void mm_nk_prefill(const MatmulArgs& a) {
  const KernelTable& t = a.t;
  const int64_t M = a.M, K = a.K, N = a.N;
  const int64_t Q = (M + kPanel - 1) / kPanel;
  thread_local std::vector<float> xbuf;  // the calling thread's; workers read it
  if ((int64_t)xbuf.size() < Q * K * kPanel) xbuf.resize(Q * K * kPanel);
  float* xp = xbuf.data();
  parallel_chunks(Q, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t mc = std::min<int64_t>(kPanel, M - q * kPanel);
      float* d = xp + q * K * kPanel;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kPanel; ++j) d[k * kPanel + j] = j < mc ? a.A[(q * kPanel + j) * a.lda + k] : 0.f;
    }
  });
  const float* w = static_cast<const float*>(a.W.w);
  const int64_t NBR = row_block(t);  // rows of W per task: ~MC·K floats, in L2 while every x panel passes over them
  const int64_t nblk = (N + NBR - 1) / NBR;
  parallel_chunks(nblk, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> tbuf;
    if ((int64_t)tbuf.size() < NBR * kPanel) tbuf.resize(NBR * kPanel);
    float* tmp = tbuf.data();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * NBR, nr = std::min(NBR, N - n0);
      for (int64_t q = 0; q < Q; ++q) {
        const int mc = (int)std::min<int64_t>(kPanel, M - q * kPanel);
        t.matmul_panel(w + n0 * a.W.ld, a.W.ld, nr, K, xp + q * K * kPanel, kPanel, tmp, kPanel, 0, mc, nullptr,
                       Epilogue::None, nullptr, 0, kKWhole);
        for (int j = 0; j < mc; ++j) {
          const int64_t m = q * kPanel + j;
          float* c = a.C + m * N + n0;
          for (int64_t r = 0; r < nr; ++r) c[r] = tmp[r * kPanel + j] + (a.bias ? a.bias[n0 + r] : 0.f);
          if (a.epi == Epilogue::GeluNew) t.gelu_new(c, c, nr);
          if (a.epi == Epilogue::Residual)
            for (int64_t r = 0; r < nr; ++r) c[r] += a.R[m * a.ldr + n0 + r];
        }
      }
    }
  });
}

// bf16 weights, and int8 weights with an even group (their codes are exact in bf16), in prefill on a CPU with
// AVX512_BF16: x rounded to bf16 once per call (rows of Kp, an even length), each K block of a group of panels
// interleaved into pairs in a per-thread buffer, VDPBF16PS tiles (int8: group sums scaled once per group).
void mm_bf16_dot_prefill(const MatmulArgs& a) {
  const Bf16DotKernels* bd = a.bd;
  const int64_t M = a.M, K = a.K, N = a.N, P = num_panels(N), MC = row_block(a.t), group = a.W.group;
  const bool q8 = a.W.type == WType::I8;
  const int64_t Kp = (K + 1) / 2 * 2;
  // int8: K blocks of whole groups (the group divides K)
  const int64_t KCb =
      q8 ? std::max<int64_t>(group, std::min<int64_t>(K, 768) / group * group) : std::min<int64_t>(Kp, 768);
  thread_local std::vector<uint16_t> a16;  // the calling thread's; workers read it
  if ((int64_t)a16.size() < M * Kp) a16.resize(M * Kp);
  uint16_t* xa = a16.data();
  parallel_chunks(M, 16,
                  [&](int64_t m0, int64_t m1) { bd->to_bf16(a.A + m0 * a.lda, a.lda, m1 - m0, K, xa + m0 * Kp, Kp); });
  const int64_t SGb = std::max<int64_t>(1, (256 * 1024 / 2) / (KCb * kPanel));
  parallel_chunks(P, panel_grain(M, K, P), [&](int64_t p0, int64_t p1) {
    thread_local std::vector<uint16_t> b16;
    if ((int64_t)b16.size() < SGb * KCb * kPanel) b16.resize(SGb * KCb * kPanel);
    for (int64_t g0 = p0; g0 < p1; g0 += SGb) {
      const int64_t g1 = std::min(p1, g0 + SGb);
      for (int64_t k0 = 0; k0 < K; k0 += KCb) {
        const int64_t kc = std::min(KCb, K - k0), kcp = (kc + 1) / 2 * 2;
        const int part = k_part(k0, kc, K);
        for (int64_t p = g0; p < g1; ++p) {
          uint16_t* dst = b16.data() + (p - g0) * kcp * kPanel;
          if (q8)
            bd->pairs_i8(reinterpret_cast<const int8_t*>(panel_data(a, p)), k0, kc, dst);
          else
            bd->pairs(reinterpret_cast<const uint16_t*>(panel_data(a, p)), K, k0, kc, dst);
        }
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
          const int64_t mc = std::min(MC, M - m0);
          const float* r = a.R ? a.R + m0 * a.ldr : nullptr;
          for (int64_t p = g0; p < g1; ++p) {
            const uint16_t* bp = b16.data() + (p - g0) * kcp * kPanel;
            const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
            if (q8)
              bd->matmul_panel_q(xa + m0 * Kp + k0, Kp, mc, kc, bp, panel_scales(a, p) + k0 / group * kPanel, group,
                                 a.C + m0 * N, N, p * kPanel, ncols, a.bias, a.epi, r, a.ldr, part);
            else
              bd->matmul_panel(xa + m0 * Kp + k0, Kp, mc, kcp, bp, a.C + m0 * N, N, p * kPanel, ncols, a.bias, a.epi, r,
                               a.ldr, part);
          }
        }
      }
    }
  });
}

// int8 panels (group a multiple of 4) where int8_dot(M) gives the kernels: x quantized per row and group once per call
// (into the calling thread's buffers, which the workers read). Prefill, where the kernels have a packed form
// (AVX512-VNNI): each task packs one panel at a time into its own buffer and runs every row over it, so the packing is
// paid once per panel, not per row block. Otherwise each task's panels against every row block of x, whole K; a row
// block (64 rows: 192 KiB of quantized x for K = 3072) stays in L2 while the task's panels pass over it.
void mm_int8_dot(const MatmulArgs& a) {
  const Int8DotKernels* ik = a.i8;
  const int64_t M = a.M, K = a.K, N = a.N, P = num_panels(N), G = a.W.group, ng = K / G;
  const bool packed = M > kDecodeRows && ik->matmul_packed != nullptr;
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> sbuf;
  thread_local std::vector<int32_t> xsbuf;
  if ((int64_t)qbuf.size() < M * K) qbuf.resize(M * K);
  if ((int64_t)sbuf.size() < M * ng) sbuf.resize(M * ng);
  if (packed && (int64_t)xsbuf.size() < M * ng) xsbuf.resize(M * ng);
  int8_t* q = qbuf.data();
  float* s = sbuf.data();
  int32_t* xs = xsbuf.data();
  auto quantize = [&](int64_t m0, int64_t m1) {
    ik->quantize_rows(a.A + m0 * a.lda, a.lda, m1 - m0, K, G, q + m0 * K, K, s + m0 * ng, ng);
    if (packed) ik->group_sums(q + m0 * K, K, m1 - m0, K, G, xs + m0 * ng, ng);
  };
  if (M <= kDecodeRows)
    quantize(0, M);
  else
    parallel_chunks(M, 16, quantize);
  if (packed) {
    // groups of SG packed panels (~256 KiB, in L2), each against row blocks of MC rows (a multiple of the kernel's
    // 12): a block's output rows are SG panels wide, not one, which keeps the lm_head's stores on few pages. While
    // a group computes, the next group's stored panels (contiguous) are prefetched, a slice per kernel call spread
    // over its steps, so that packing them does not wait on DRAM.
    const int64_t bytes = int8_packed_panel_bytes(K, G), SG = std::max<int64_t>(1, 256 * 1024 / bytes), MC = 96;
    const int64_t calls = (M + MC - 1) / MC * SG;  // kernel calls per group (fewer in a task's last)
    parallel_chunks(P, panel_grain(M, K, P), [&](int64_t p0, int64_t p1) {
      thread_local std::vector<uint8_t> pk;
      if ((int64_t)pk.size() < SG * bytes) pk.resize(SG * bytes);
      for (int64_t g0 = p0; g0 < p1; g0 += SG) {
        const int64_t g1 = std::min(p1, g0 + SG), n1 = std::min(p1, g1 + SG);
        for (int64_t p = g0; p < g1; ++p)
          ik->pack_panel(reinterpret_cast<const int8_t*>(panel_data(a, p)), panel_scales(a, p), K, G,
                         pk.data() + (p - g0) * bytes);
        const char* next = panel_data(a, g1);
        const int64_t next_bytes = (n1 - g1) * K * kPanel, slice = (next_bytes / calls + 63) / 64 * 64;
        int64_t ahead = 0;
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
          const int64_t mc = std::min(MC, M - m0);
          for (int64_t p = g0; p < g1; ++p, ahead += slice) {
            const int64_t pf = std::max<int64_t>(0, std::min(slice, next_bytes - ahead));
            ik->matmul_packed(q + m0 * K, K, s + m0 * ng, xs + m0 * ng, ng, mc, K, pk.data() + (p - g0) * bytes, G,
                              a.C + m0 * N, N, p * kPanel, (int)std::min<int64_t>(kPanel, N - p * kPanel), a.bias,
                              a.epi, a.R ? a.R + m0 * a.ldr : nullptr, a.ldr, next + std::min(ahead, next_bytes), pf);
          }
        }
      }
    });
    return;
  }
  const int64_t MC = M <= kDecodeRows ? M : 64;
  parallel_chunks(P, panel_grain(M, K, P), [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t mc = std::min(MC, M - m0);
      const float* r = a.R ? a.R + m0 * a.ldr : nullptr;
      for (int64_t p = p0; p < p1; ++p)
        ik->matmul_panel(q + m0 * K, K, s + m0 * ng, ng, mc, K, reinterpret_cast<const int8_t*>(panel_data(a, p)),
                         panel_scales(a, p), G, a.C + m0 * N, N, p * kPanel,
                         (int)std::min<int64_t>(kPanel, N - p * kPanel), a.bias, a.epi, r, a.ldr);
    }
  });
}

// Reduced-precision panels, decode: each panel widened in registers, read once, whole K.
void mm_lowp_decode(const MatmulArgs& a) {
  const int64_t P = num_panels(a.N);
  // Each panel prefetches the next one of its chunk (vec.h: SpreadPrefetch) where the rows make a panel's FMAs
  // outlast its bytes — 4 or more per stored byte; below that the hardware prefetchers keep up on their own, and the
  // extra instructions made a one-row int8 step 30 % slower (Zen 4).
  const bool ahead = a.M >= 4 * (int64_t)elem_size(a.W.type);
  parallel_chunks(P, panel_grain(a.M, a.K, P), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      a.t.matmul_panel_lowp(a.A, a.lda, a.M, a.K, panel_data(a, p), a.W.type, panel_scales(a, p), a.W.group, a.C, a.N,
                            p * kPanel, (int)std::min<int64_t>(kPanel, a.N - p * kPanel), a.bias, a.epi, a.R, a.ldr,
                            ahead && p + 1 < p1 ? panel_data(a, p + 1) : nullptr,
                            panel_data(a, p + 1) - panel_data(a, p));
  });
}

// Decode over HF's [K, N]: rows of W are adjacent, so blocks of whole rows are contiguous streams. Fixed blocks of
// KB rows (never a function of the thread count, so the sum order is too) each give partial sums for all N
// columns; the partials are added in block order, then the bias and epilogue.
void mm_kn_decode_gemv(const MatmulArgs& a) {
  const KernelTable& t = a.t;
  const int64_t M = a.M, K = a.K, N = a.N;
  constexpr int64_t KB = 128;
  const int64_t nb = (K + KB - 1) / KB;
  thread_local std::vector<float> part;  // the calling thread's, grown once: no allocation per decode step
  if (part.size() < (size_t)(nb * M * N)) part.resize((size_t)(nb * M * N));
  float* pp = part.data();  // (a thread_local named inside the lambda would be each worker's own)
  parallel_chunks(nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {  // (the thread's next block is prefetched as this one ends)
      const int64_t k0 = blk * KB, kc = std::min(KB, K - k0), next = blk + 1 < b1 ? std::min(KB, K - k0 - kc) : 0;
      t.gemv_rows(a.A + k0, a.lda, M, kc, static_cast<const float*>(a.W.w) + k0 * a.W.ld, a.W.ld, N, pp + blk * M * N,
                  next);
    }
  });
  for (int64_t blk = 1; blk < nb; ++blk)
    for (int64_t i = 0; i < M * N; ++i) part[i] += part[blk * M * N + i];
  for (int64_t m = 0; m < M; ++m) {
    float* c = a.C + m * N;
    const float* s = part.data() + m * N;
    for (int64_t i = 0; i < N; ++i) c[i] = s[i] + (a.bias ? a.bias[i] : 0.f);
    if (a.epi == Epilogue::GeluNew) t.gelu_new(c, c, N);
    if (a.epi == Epilogue::Residual)
      for (int64_t i = 0; i < N; ++i) c[i] += a.R[m * a.ldr + i];
  }
}

// fp32 panels (optimize()'s packed copy), any rows: the FMA-bound panel kernel straight over the weight, in K
// blocks of up to 1024.
// Panels [p0, p1) of an fp32 panel weight, every row of a, in K blocks of KC (abuf: the calling thread's buffer for
// RowBlocks): mm_panels_f32's task, and the verify's per position (run_matmul_steps).
void panels_f32_chunk(const MatmulArgs& a, int64_t p0, int64_t p1, int64_t KC, std::vector<float>& abuf) {
  const int64_t M = a.M, K = a.K, N = a.N, MC = row_block(a.t);
  const RowBlocks rows(a, KC, abuf);
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t mc = std::min(MC, M - m0);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      int64_t la;
      const float* x = rows.get(m0, mc, k0, kc, la);
      for (int64_t p = p0; p < p1; ++p) {
        const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
        a.t.matmul_panel(x, la, mc, kc, static_cast<const float*>(a.W.w) + (p * K + k0) * kPanel, kPanel, a.C + m0 * N,
                         N, p * kPanel, ncols, a.bias, a.epi, a.R ? a.R + m0 * a.ldr : nullptr, a.ldr,
                         k_part(k0, kc, K));
      }
    }
  }
}

void mm_panels_f32(const MatmulArgs& a) {
  const int64_t P = num_panels(a.N), KC = k_block(a.M, a.K, 1024);
  parallel_chunks(P, panel_grain(a.M, a.K, P), [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> abuf;  // grows once per thread, then reused: no allocation per call
    panels_f32_chunk(a, p0, p1, KC, abuf);
  });
}

// Any other format, prefill (HF's [K, N] in place, fp16, bf16, int8 panels): groups of SG panels whose K block
// (SG × KC × 32 floats, ~256 KiB) stays in L2 (BLIS's B panel); per group and K block, the panels are made fp32
// once (copied, transposed or widened) in a per-thread buffer, then every row block of x runs over them. Each
// weight element is converted exactly once per call. KC = 768 keeps GPT-2's K = 768 whole (smaller blocks were
// slower).
void mm_convert_per_block(const MatmulArgs& a) {
  const KernelTable& t = a.t;
  const WeightRef& W = a.W;
  const int64_t M = a.M, K = a.K, N = a.N, P = num_panels(N), MC = row_block(t), KC = k_block(M, K, 768);
  const size_t esz = elem_size(W.type);
  parallel_chunks(P, panel_grain(M, K, P), [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> abuf, bbuf;  // grow once per thread, then reused: no allocation per call
    const RowBlocks rows(a, KC, abuf);
    // panel p's rows [k0, k0 + kc) as fp32 [kc][32] in dst (zeros past N): copied from HF's [K, N] weight or
    // widened from a reduced-precision panel
    auto pack_rows = [&](int64_t p, int64_t k0, int64_t kc, float* dst) {
      if (W.layout == Layout::Panels)
        return t.unpack_panel(panel_data(a, p), W.type, panel_scales(a, p), W.group, k0, kc, dst);
      const int64_t ncols = std::min<int64_t>(kPanel, N - p * kPanel);
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = static_cast<const float*>(W.w) + (k0 + k) * W.ld + p * kPanel;
        float* d = dst + k * kPanel;
        std::memcpy(d, src, ncols * sizeof(float));
        if (ncols < kPanel) std::memset(d + ncols, 0, (kPanel - ncols) * sizeof(float));
      }
    };
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
          const char* base = panel_data(a, p) + (size_t)(k0 * kPanel) * esz;
          const size_t bytes = (size_t)(kc * kPanel) * esz;
          for (size_t off = (size_t)slice * 64; off < bytes; off += (size_t)nslices * 64)
            __builtin_prefetch(base + off);
        }
      }
    };
    const int64_t mblocks = (M + MC - 1) / MC;
    for (int64_t g0 = p0; g0 < p1; g0 += SG) {
      const int64_t g1 = std::min(p1, g0 + SG);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        const int part = k_part(k0, kc, K);
        for (int64_t p = g0; p < g1; ++p) pack_rows(p, k0, kc, bbuf.data() + (p - g0) * kc * kPanel);
        // the block after this one: the next K block of this group, else the next group's first
        const int64_t nk0 = k0 + kc < K ? k0 + kc : 0, ng0 = k0 + kc < K ? g0 : g0 + SG;
        const int64_t nslices = mblocks * (g1 - g0);
        int64_t slice = 0;
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
          const int64_t mc = std::min(MC, M - m0);
          int64_t la;
          const float* x = rows.get(m0, mc, k0, kc, la);
          for (int64_t p = g0; p < g1; ++p) {
            if (ng0 < p1) prefetch_block(ng0, nk0, std::min(KC, K - nk0), slice++, nslices);
            const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
            t.matmul_panel(x, la, mc, kc, bbuf.data() + (p - g0) * kc * kPanel, kPanel, a.C + m0 * N, N, p * kPanel,
                           ncols, a.bias, a.epi, a.R ? a.R + m0 * a.ldr : nullptr, a.ldr, part);
          }
        }
      }
    }
  });
}

struct MatmulStrategyEntry {
  MatmulStrategy id;
  const char* name;
  void (*run)(const MatmulArgs&);
};
// indexed by MatmulStrategy
constexpr MatmulStrategyEntry kMatmulStrategies[] = {
    {MatmulStrategy::NkDecode, "nk_decode", mm_nk_decode},
    {MatmulStrategy::NkPrefill, "nk_prefill", mm_nk_prefill},
    {MatmulStrategy::Bf16DotPrefill, "bf16_dot_prefill", mm_bf16_dot_prefill},
    {MatmulStrategy::LowpDecode, "lowp_decode", mm_lowp_decode},
    {MatmulStrategy::KnDecodeGemv, "kn_decode_gemv", mm_kn_decode_gemv},
    {MatmulStrategy::PanelsF32, "panels_f32", mm_panels_f32},
    {MatmulStrategy::ConvertPerBlock, "convert_per_block", mm_convert_per_block},
    {MatmulStrategy::Int8Dot, "int8_dot", mm_int8_dot},
};
constexpr bool table_in_order() {
  for (int i = 0; i < (int)(sizeof(kMatmulStrategies) / sizeof(kMatmulStrategies[0])); ++i)
    if ((int)kMatmulStrategies[i].id != i) return false;
  return true;
}
static_assert(table_in_order() && sizeof(kMatmulStrategies) / sizeof(kMatmulStrategies[0]) == kMatmulStrategyCount,
              "kMatmulStrategies must list every MatmulStrategy in enum order");

}  // namespace

MatmulStrategy choose_matmul(Layout layout, WType type, int64_t M, int64_t group, bool bf16_dot, bool int8_dot) {
  const bool decode = M <= kDecodeRows;
  switch (layout) {
    case Layout::NK: return decode ? MatmulStrategy::NkDecode : MatmulStrategy::NkPrefill;
    case Layout::KN:  // fp32 only (weight_ref)
      // up to the table's kn_gemv_rows, HF's [K, N] weight is read in place by the GEMV (W's vectors shared by the
      // rows in registers) rather than copied into panels per call; past it the copy's FMA-bound kernel wins
      // (bench/RESULTS.md: 8 rows on 16 vector registers, 16 on 32)
      return M <= kernels().kn_gemv_rows ? MatmulStrategy::KnDecodeGemv : MatmulStrategy::ConvertPerBlock;
    case Layout::Panels: break;
  }
  if (type == WType::F32) return MatmulStrategy::PanelsF32;
  if (type == WType::I8 && int8_dot && group % 4 == 0) return MatmulStrategy::Int8Dot;
  if (decode) return MatmulStrategy::LowpDecode;
  const bool pairs = type == WType::BF16 || (type == WType::I8 && group % 2 == 0);  // int8 codes pair up in bf16
  return pairs && bf16_dot ? MatmulStrategy::Bf16DotPrefill : MatmulStrategy::ConvertPerBlock;
}

const char* matmul_strategy_name(MatmulStrategy s) { return kMatmulStrategies[(int)s].name; }

void run_matmul(const float* A, int64_t lda, int64_t M, int64_t K, WeightRef W, int64_t N, const float* bias,
                Epilogue epi, const float* R, int64_t ldr, float* C) {
  const Bf16DotKernels* bd = bf16_dot();
  const Int8DotKernels* i8 = W.type == WType::I8 ? int8_dot(M) : nullptr;
  const MatmulArgs args{A, lda, M, K, W, N, bias, epi, R, ldr, C, kernels(), bd, i8};
  kMatmulStrategies[(int)choose_matmul(W.layout, W.type, M, W.group, bd != nullptr, i8 != nullptr)].run(args);
}

// T decode steps of one matmul at once (speculative decoding's verify): rows [q·B, q·B + B) of A and C are position
// q's. Each position's rows get exactly the arithmetic run_matmul(M = B) gives them — the same kernel calls on the
// same rows, the same K blocks summed in the same order — but the weight is read once for all positions where the
// strategy allows: kn_decode_gemv (every position's partial sums per K block) and panels_f32 (every position per
// panel, the panel in L2); any other strategy: T calls of run_matmul.
void run_matmul_steps(const float* A, int64_t lda, int64_t T, int64_t B, int64_t K, WeightRef W, int64_t N,
                      const float* bias, Epilogue epi, float* C) {
  const Bf16DotKernels* bd = bf16_dot();
  const KernelTable& t = kernels();
  const MatmulStrategy s = T > 1 ? choose_matmul(W.layout, W.type, B, W.group, bd != nullptr, int8_dot(B) != nullptr)
                                 : MatmulStrategy::NkDecode;
  // all T·B rows in one mm_kn_decode_gemv call, which reads W once for them: a row's sums are those of its B-row
  // call (the GEMV's rows are independent, its K blocks fixed), and C's rows are already in [t][b] order
  if (s == MatmulStrategy::KnDecodeGemv)
    return mm_kn_decode_gemv({A, lda, T * B, K, W, N, bias, epi, nullptr, 0, C, t, bd, nullptr});
  if (s == MatmulStrategy::PanelsF32) {  // mm_panels_f32 with M = B, per position inside each chunk of panels
    const int64_t P = num_panels(N), KC = k_block(B, K, 1024);
    parallel_chunks(P, panel_grain(B, K, P), [&](int64_t p0, int64_t p1) {
      thread_local std::vector<float> abuf;
      for (int64_t q = 0; q < T; ++q)
        panels_f32_chunk({A + q * B * lda, lda, B, K, W, N, bias, epi, nullptr, 0, C + q * B * N, t, bd, nullptr}, p0,
                         p1, KC, abuf);
    });
    return;
  }
  for (int64_t q = 0; q < T; ++q) run_matmul(A + q * B * lda, lda, B, K, W, N, bias, epi, nullptr, 0, C + q * B * N);
}

// A large output (allocations this size are fresh mmaps, every call) would take a page fault per 4 KiB on its first
// write: for the lm_head's logits at T = 512 (103 MB) those faults cost more than the int8 matmul's stores. Where
// transparent huge pages are 'madvise', asking for 2 MiB pages makes them ~50 faults. Advice only: the pages are
// written in full anyway, and a refusal changes nothing.
static void prefer_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t b = ((uintptr_t)p + kHuge - 1) & ~(kHuge - 1), e = ((uintptr_t)p + bytes) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
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
  TORCH_CHECK_VALUE(shape_n < 0 || shape_n == N, "gpt2kern.conv1d: out_features=", out_features,
                    " but the weight "
                    "has ",
                    shape_n, " outputs");
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
  prefer_huge_pages(y.data_ptr(), (size_t)y.numel() * sizeof(float));
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
