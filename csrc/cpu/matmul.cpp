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

WeightRef weight_ref(const at::Tensor& w) {
  if (w.dim() == 3) return WeightRef{w.data_ptr<float>(), true, kPanel};
  return WeightRef{w.data_ptr<float>(), false, w.stride(0)};
}

void run_matmul(const float* A, int64_t lda, int64_t M, int64_t K, WeightRef W, int64_t N, const float* bias,
                Epilogue epi, const float* R, int64_t ldr, float* C) {
  const KernelTable& t = kernels();
  const int64_t P = num_panels(N);
  // Panels are split across threads (taken in chunks from a shared counter, parallel.h), so each weight byte is
  // read by exactly one thread.
  // K blocks of KC when x's row block would not fit in L2 beside a weight panel (K = 3072); decode (M <= 2)
  // streams the weights once either way, so it keeps K whole. With HF's [K, N] weight, prefill packs each K block
  // of its panels into a per-thread buffer first (BLIS's B panel), so KC is smaller to keep that buffer in L2.
  const int64_t KC = M <= 2 ? K : W.packed ? (K > 1024 ? 1024 : K) : std::min<int64_t>(K, 256);
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
  const bool copy_a = M > 2 * t.mr_max;
  const int64_t lda_buf = KC + 16;
  if (!W.packed && M <= 2) {
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
        t.gemv_rows(A + k0, lda, M, kc, W.w + k0 * W.ld, W.ld, N, pp + blk * M * N);
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
    // panel p's rows [k0, k0 + kc) of HF's [K, N] weight, copied into dst [kc][32] (zeros past N): prefill's B block
    auto pack_rows = [&](int64_t p, int64_t k0, int64_t kc, float* dst) {
      const int64_t ncols = std::min<int64_t>(kPanel, N - p * kPanel);
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = W.w + (k0 + k) * W.ld + p * kPanel;
        float* d = dst + k * kPanel;
        std::memcpy(d, src, ncols * sizeof(float));
        if (ncols < kPanel) std::memset(d + ncols, 0, (kPanel - ncols) * sizeof(float));
      }
    };
    if (W.packed) {
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t mc = std::min(MC, M - m0);
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
          const int64_t kc = std::min(KC, K - k0);
          const int part = (k0 == 0 ? kKFirst : 0) | (k0 + kc == K ? kKLast : 0);
          int64_t la;
          const float* a = a_block(m0, mc, k0, kc, la);
          for (int64_t p = p0; p < p1; ++p) {
            const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
            t.matmul_panel(a, la, mc, kc, W.w + (p * K + k0) * kPanel, kPanel, C + m0 * N, N, p * kPanel, ncols,
                           bias, epi, R ? R + m0 * ldr : nullptr, ldr, part);
          }
        }
      }
      return;
    }
    // HF's [K, N] weight, prefill: per K block, this chunk's panels packed once, then every row block of x
    const int64_t np = p1 - p0;
    if ((int64_t)bbuf.size() < np * KC * kPanel) bbuf.resize(np * KC * kPanel);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const int part = (k0 == 0 ? kKFirst : 0) | (k0 + kc == K ? kKLast : 0);
      for (int64_t p = p0; p < p1; ++p) pack_rows(p, k0, kc, bbuf.data() + (p - p0) * kc * kPanel);
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t mc = std::min(MC, M - m0);
        int64_t la;
        const float* a = a_block(m0, mc, k0, kc, la);
        for (int64_t p = p0; p < p1; ++p) {
          const int ncols = (int)std::min<int64_t>(kPanel, N - p * kPanel);
          t.matmul_panel(a, la, mc, kc, bbuf.data() + (p - p0) * kc * kPanel, kPanel, C + m0 * N, N, p * kPanel,
                         ncols, bias, epi, R ? R + m0 * ldr : nullptr, ldr, part);
        }
      }
    }
  });
}

at::Tensor conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  c10::string_view epilogue, const std::optional<at::Tensor>& residual, int64_t out_features) {
  const Epilogue epi = static_cast<Epilogue>(parse_epilogue(epilogue));
  check_conv1d_inputs(x, weight);
  const int64_t K = x.size(-1);
  at::Tensor packed;
  int64_t N;
  if (weight.dim() == 2) {  // HF Conv1D layout [in, out], read in place (rows must be contiguous)
    TORCH_CHECK_VALUE(weight.size(0) == K, "gpt2kern.conv1d: weight must be [", K, ", out], got ", weight.sizes());
    N = weight.size(1);
    TORCH_CHECK_VALUE(out_features < 0 || out_features == N, "gpt2kern.conv1d: out_features=", out_features,
                      " but weight has ", N, " columns");
    packed = (weight.stride(1) == 1 && (weight.size(0) <= 1 || weight.stride(0) >= N)) ? weight
                                                                                       : weight.contiguous();
  } else {
    TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(1) == K && weight.size(2) == kPanel,
                      "gpt2kern.conv1d: packed weight must be [panels, ", K, ", ", kPanel, "], got ", weight.sizes());
    N = out_features >= 0 ? out_features : (bias ? bias->size(-1) : -1);
    TORCH_CHECK_VALUE(N >= 0, "gpt2kern.conv1d: a packed weight needs out_features (or a bias) to give N");
    TORCH_CHECK_VALUE(num_panels(N) == weight.size(0), "gpt2kern.conv1d: packed weight has ", weight.size(0),
                      " panels, but out_features=", N, " needs ", num_panels(N));
    packed = weight.contiguous();
  }
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
  const WeightRef W = weight_ref(packed);
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* pr = rr.p;
  const int64_t M = A.m, lda = A.ld, ldr = rr.ld;
  float* pc = y.data_ptr<float>();
  run_matmul(pa, lda, M, K, W, N, pb, epi, pr, ldr, pc);
  return y;
}

}  // namespace gk::cpu
