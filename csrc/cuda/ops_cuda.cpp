// ops_cuda.cpp — torch glue for the CUDA kernels (csrc/cuda/*.cu, declared in launch.h) and their registration
// for the CUDA dispatch key. The same argument checks and error messages as the CPU glue (csrc/cpu/*.cpp), plus
// "every tensor on x's CUDA device"; outputs on that device; every launch on the current stream and checked.
// Nothing here waits on the GPU except embedding's id range check, which is skipped while a CUDA graph is being
// captured (the kernel clamps ids instead).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/op_args.h"
#include "launch.h"

#define GK_CUDA_CHECK_LAUNCH(op, call)                                                                  \
  do {                                                                                                  \
    const cudaError_t gk_err_ = (call);                                                                 \
    TORCH_CHECK(gk_err_ == cudaSuccess, "gpt2kern.", op, ": CUDA kernel failed: ", cudaGetErrorString(gk_err_)); \
  } while (0)

namespace gk::cuda_ops {

namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

int num_sms() {  // of the current device (the ops' CUDAGuard set it), cached per device
  static int cache[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (cache[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = n > 0 ? n : 1;
  }
  return cache[dev];
}

bool capturing() {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream(), &st));
  return st != cudaStreamCaptureStatusNone;
}

}  // namespace

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_ln_args(x, weight, bias, "layer_norm");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) return y;
  at::Tensor xr = as_rows(x, n), w = weight.contiguous(), b = bias.contiguous();
  GK_CUDA_CHECK_LAUNCH("layer_norm", cuda::layer_norm(xr.data_ptr<float>(), row_stride(xr), y.data_ptr<float>(),
                                                       w.data_ptr<float>(), b.data_ptr<float>(), xr.size(0), n,
                                                       (float)eps, stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_add_ln_args(x, residual, weight, bias);
  c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor s = at::empty(x.sizes(), opts), y = at::empty(x.sizes(), opts);
  const int64_t n = x.size(-1);
  if (x.numel() == 0) return {s, y};
  at::Tensor xr = as_rows(x, n), rr = as_rows(residual, n), w = weight.contiguous(), b = bias.contiguous();
  GK_CUDA_CHECK_LAUNCH("add_layer_norm",
                       cuda::add_layer_norm(xr.data_ptr<float>(), row_stride(xr), rr.data_ptr<float>(),
                                            row_stride(rr), s.data_ptr<float>(), y.data_ptr<float>(),
                                            w.data_ptr<float>(), b.data_ptr<float>(), xr.size(0), n, (float)eps,
                                            stream()));
  return {s, y};
}

at::Tensor gelu_new(const at::Tensor& x) {
  GK_CHECK_FLOAT(x, "gelu_new", "x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  GK_CUDA_CHECK_LAUNCH("gelu_new", cuda::gelu_new(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel(), stream()));
  return y;
}

// On CUDA the matmul reads HF's [K, N] layout directly, so pack is a contiguous copy (a new tensor, as the schema
// promises). ops.py's fake implementation gives [K, N] for CUDA tensors accordingly.
at::Tensor pack(const at::Tensor& weight) {
  GK_CHECK_FLOAT(weight, "pack", "weight");
  GK_CHECK_DIM(weight, 2, "pack", "weight");
  c10::cuda::CUDAGuard guard(weight.device());
  return at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous)).copy_(weight);
}

at::Tensor conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  c10::string_view epilogue, const std::optional<at::Tensor>& residual, int64_t out_features,
                  c10::string_view layout, const std::optional<at::Tensor>& scales) {
  const int epi = parse_epilogue(epilogue);
  check_conv1d_inputs(x, weight);
  // the CUDA kernels read HF's [in, out] fp32 layout only (the reduced-precision formats are CPU-side so far)
  TORCH_CHECK_VALUE(layout == "kn", "gpt2kern.conv1d: on CUDA the weight layout must be 'kn' ([in, out]), got '",
                    std::string(layout), "'");
  TORCH_CHECK_VALUE(!scales.has_value(), "gpt2kern.conv1d: on CUDA the weight is float32 and takes no scales");
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2, "gpt2kern.conv1d: on CUDA the weight must be [", K,
                    ", out] (HF's Conv1D layout, which pack keeps on CUDA), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) == K, "gpt2kern.conv1d: weight must be [", K, ", out], got ", weight.sizes());
  const int64_t N = weight.size(1);
  TORCH_CHECK_VALUE(out_features < 0 || out_features == N, "gpt2kern.conv1d: out_features=", out_features,
                    " but weight has ", N, " columns");
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  check_conv1d_extras(x, bias, epi, epilogue, residual, N, out_shape);
  at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  if (K == 0) {  // empty reduction: bias (+ epilogue) only
    at::Tensor z = b.defined() ? b.expand(out_shape).clone() : at::zeros(out_shape, x.options());
    if (epi == 1) return gelu_new(z);
    if (epi == 2) z.add_(*residual);
    return z;
  }
  at::Tensor A = as_rows(x, K);
  at::Tensor W = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t M = A.size(0), ldw = row_stride(W);
  at::Tensor rr;
  if (epi == 2) rr = as_rows(*residual, N);
  const int splits = cuda::gemv_splits(M, K, N, num_sms());
  at::Tensor ws;
  if (splits > 1) ws = at::empty({(int64_t)splits * M * N}, x.options());
  GK_CUDA_CHECK_LAUNCH("conv1d", cuda::matmul(A.data_ptr<float>(), row_stride(A), M, K, W.data_ptr<float>(), ldw, N,
                                              b.defined() ? b.data_ptr<float>() : nullptr, epi,
                                              rr.defined() ? rr.data_ptr<float>() : nullptr,
                                              rr.defined() ? row_stride(rr) : 0, y.data_ptr<float>(), splits,
                                              ws.defined() ? ws.data_ptr<float>() : nullptr, num_sms(), stream()));
  return y;
}


at::Tensor attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                     const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, double scale,
                     int64_t q_offset, bool causal) {
  check_attention_args(q_, k_, v_, key_mask, bias, q_offset, causal);
  const int64_t B = q_.size(0), H = q_.size(1), D = q_.size(3);
  TORCH_CHECK_VALUE(D <= cuda::kAttnMaxHeadDim, "gpt2kern.attention: the CUDA kernel supports head dims up to ",
                    cuda::kAttnMaxHeadDim, ", got ", D);
  TORCH_CHECK_VALUE(B <= 65535 && H <= 65535, "gpt2kern.attention: batch and heads must be <= 65535 on CUDA");
  c10::cuda::CUDAGuard guard(q_.device());
  const AttnCall c = attention_call(q_, k_, v_, key_mask, bias, scale, q_offset, causal);
  if (c.out.numel() == 0) return c.out;
  GK_CUDA_CHECK_LAUNCH("attention", cuda::attention(c.a, num_sms(), stream()));
  return c.out;
}

// The first id outside [0, hi) as an IndexError naming it, like the CPU op. Costs one device->host copy.
static void report_range(const at::Tensor& ids, int64_t hi, const char* name, const char* what) {
  at::Tensor bad = ids.masked_select(ids.lt(0).logical_or(ids.ge(hi)));
  if (bad.numel() == 0) return;
  TORCH_CHECK_INDEX(false, "gpt2kern.embedding: ", name, " contains ", bad[0].item<int64_t>(), ", outside ", what,
                    " [0, ", hi, ")");
}

at::Tensor embedding(const at::Tensor& input_ids, const at::Tensor& wte, const at::Tensor& wpe,
                     const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids) {
  check_embedding_tables(input_ids, wte, wpe);
  c10::cuda::CUDAGuard guard(wte.device());
  const int64_t B = input_ids.size(0), T = input_ids.size(1), n = wte.size(1);
  at::Tensor ids = embedding_ids(input_ids, wte, B, T, "input_ids");
  at::Tensor pos = embedding_ids(position_ids, wte, B, T, "position_ids");
  at::Tensor tt;
  if (token_type_ids) tt = embedding_ids(*token_type_ids, wte, B, T, "token_type_ids");
  const int64_t V = wte.size(0), P = wpe.size(0);
  if (ids.numel() > 0 && !capturing()) {  // one sync for all three; the details only when something is wrong
    at::Tensor bad = ids.lt(0).logical_or(ids.ge(V)).any().logical_or(pos.lt(0).logical_or(pos.ge(P)).any());
    if (tt.defined()) bad = bad.logical_or(tt.lt(0).logical_or(tt.ge(V)).any());
    if (bad.item<bool>()) {
      report_range(ids, V, "input_ids", "the vocabulary");
      report_range(pos, P, "position_ids", "the position table (n_positions)");
      if (tt.defined()) report_range(tt, V, "token_type_ids", "the vocabulary");
    }
  }
  at::Tensor out = at::empty({B, T, n}, wte.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(V > 0 && P > 0, "gpt2kern.embedding: empty wte or wpe");
  at::Tensor e = wte.contiguous(), p = wpe.contiguous();
  GK_CUDA_CHECK_LAUNCH("embedding", cuda::embedding(ids.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
                                                    tt.defined() ? tt.data_ptr<int64_t>() : nullptr,
                                                    e.data_ptr<float>(), V, p.data_ptr<float>(), P,
                                                    out.data_ptr<float>(), B * T, n, stream()));
  return out;
}

}  // namespace gk::cuda_ops

TORCH_LIBRARY_IMPL(gpt2kern, CUDA, m) {
  m.impl("layer_norm", &gk::cuda_ops::layer_norm);
  m.impl("add_layer_norm", &gk::cuda_ops::add_layer_norm);
  m.impl("gelu_new", &gk::cuda_ops::gelu_new);
  m.impl("pack", &gk::cuda_ops::pack);
  m.impl("conv1d", &gk::cuda_ops::conv1d);
  m.impl("attention", &gk::cuda_ops::attention);
  m.impl("embedding", &gk::cuda_ops::embedding);
}
