// ops_cuda.cpp — torch glue for the CUDA kernels (csrc/cuda/*.cu, declared in launch.h) and their registration
// for the CUDA dispatch key. The same argument checks and error messages as the CPU glue (csrc/cpu/*.cpp), plus
// "every tensor on x's CUDA device"; outputs on that device; every launch on the current stream and checked.
// Nothing here waits on the GPU: even embedding's id range check runs on the device (see check_embedding_errors).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/op_args.h"
#include "launch.h"

#define GK_CUDA_CHECK_LAUNCH(op, call)                                                                           \
  do {                                                                                                           \
    const cudaError_t gk_err_ = (call);                                                                          \
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

// The prefill kernels' numbered variants this process runs: conv1d's prefill GEMM and attention's prefill
// (gpt2kern.ops.cuda_variant reads and sets them). The defaults are the measured winners (bench/RESULTS-gpu.md);
// the bench switches them to time each variant end to end.
struct VariantKnob {
  const char* name;
  int lo, hi;
  std::atomic<int> value;
};
VariantKnob g_knobs[] = {{"prefill_gemm", 2, 3, {2}}, {"prefill_attention", 1, 2, {1}}};

int knob(int i) { return g_knobs[i].value.load(std::memory_order_relaxed); }
constexpr int kPrefillGemm = 0, kPrefillAttention = 1;

// The embedding kernel's error record: page-locked host memory mapped into every device (portable; with UVA the
// host pointer is the device pointer), allocated once. Relaxed capture mode: the first call may come while a graph
// is being captured, where a global-mode capture would refuse the allocation.
cuda::EmbeddingError* embedding_error_record() {
  static cuda::EmbeddingError* rec = [] {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    void* host = nullptr;
    const cudaError_t err =
        cudaHostAlloc(&host, sizeof(cuda::EmbeddingError), cudaHostAllocMapped | cudaHostAllocPortable);
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    C10_CUDA_CHECK(err);
    std::memset(host, 0, sizeof(cuda::EmbeddingError));
    void* dev = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    TORCH_CHECK(dev == host, "gpt2kern.embedding: mapped host memory without unified addressing is not supported");
    return static_cast<cuda::EmbeddingError*>(host);
  }();
  return rec;
}

std::atomic<bool> embedding_record_exists{false};  // set once the record is allocated: checking never allocates

}  // namespace

// Raise the IndexError of a bad id that a finished CUDA embedding kernel recorded (and clear it). No sync: kernels
// still running are seen by a later check; gpt2kern.ops.check_cuda_errors() synchronizes first.
void check_embedding_errors() {
  if (!embedding_record_exists) return;
  volatile cuda::EmbeddingError* rec = embedding_error_record();
  static const char* names[3] = {"input_ids", "position_ids", "token_type_ids"};
  static const char* tables[3] = {"the vocabulary", "the position table (n_positions)", "the vocabulary"};
  for (int kind = 0; kind < 3; ++kind) {
    if (!rec->seen[kind]) continue;
    const int64_t id = rec->id[kind], hi = rec->hi[kind];
    for (int x = 0; x < 3; ++x) rec->seen[x] = 0;
    TORCH_CHECK_INDEX(false, "gpt2kern.embedding: ", names[kind], " contains ", id, ", outside ", tables[kind], " [0, ",
                      hi, ") (checked on the GPU: found after that CUDA call, whose rows for it are NaN)");
  }
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_ln_args(x, weight, bias, "layer_norm");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) return y;
  at::Tensor xr = as_rows(x, n), w = weight.contiguous(), b = bias.contiguous();
  GK_CUDA_CHECK_LAUNCH("layer_norm",
                       cuda::layer_norm(xr.data_ptr<float>(), row_stride(xr), y.data_ptr<float>(), w.data_ptr<float>(),
                                        b.data_ptr<float>(), xr.size(0), n, (float)eps, stream()));
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
                       cuda::add_layer_norm(xr.data_ptr<float>(), row_stride(xr), rr.data_ptr<float>(), row_stride(rr),
                                            s.data_ptr<float>(), y.data_ptr<float>(), w.data_ptr<float>(),
                                            b.data_ptr<float>(), xr.size(0), n, (float)eps, stream()));
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

// conv1d on CUDA reads layout 'kn' ([in, out], HF's orientation) only, in float32 (matmul.cu) or, for the reduced
// weight modes (gpt2kern.weights.WeightFormat 'kn' on CUDA), float16 / bfloat16 / int8 (matmul_lowp.cu); int8
// with float32 scales [in / group, out], one per group of `group` consecutive inputs and output column.
namespace {

bool is_lowp(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kChar; }

// The int8 weight's scales [K / group, N] (rows contiguous) and their group; errors name the argument.
std::tuple<at::Tensor, int64_t> checked_scales(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& scales, int64_t K, int64_t N) {
  if (weight.scalar_type() != at::kChar) {
    TORCH_CHECK_VALUE(!scales.has_value(), "gpt2kern.conv1d: weight is ", weight.scalar_type(),
                      " and has scales, but only int8 weights take them");
    return {at::Tensor(), 0};
  }
  TORCH_CHECK_VALUE(scales.has_value(), "gpt2kern.conv1d: weight is int8 and needs its scales (float32 [", K,
                    " / group, ", N, "])");
  const at::Tensor& s = *scales;
  GK_CHECK_FLOAT(s, "conv1d", "scales");
  GK_CHECK_SAME_DEVICE(x, s, "conv1d", "scales");
  const int64_t groups = s.dim() == 2 ? s.size(0) : 0;
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(1) == N && groups >= 1 && K % groups == 0,
                    "gpt2kern.conv1d: scales must "
                    "be [",
                    K, " / group, ", N,
                    "] (in layout 'kn' on CUDA: one scale per group of inputs and output "
                    "column) with the group dividing ",
                    K, ", got ", s.sizes());
  return {s.stride(1) == 1 || N <= 1 ? s : s.contiguous(), groups > 0 ? K / groups : 0};
}

cuda::LowpType lowp_type(at::ScalarType t) {
  return t == at::kHalf ? cuda::LowpType::F16 : t == at::kBFloat16 ? cuda::LowpType::BF16 : cuda::LowpType::I8;
}

}  // namespace

// The decode step's K/V caches k_cache, v_cache [B, H, Tmax, D] (one shape and strides, D contiguous) and slot
// (int64, one index), on like's device, as the kernels' KvOut; errors name op's arguments (kv_write, matmul_decode).
static cuda::KvOut checked_kv(const char* op, const at::Tensor& like, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& slot) {
  GK_CHECK_FLOAT(k, op, "k_cache");
  GK_CHECK_FLOAT(v, op, "v_cache");
  GK_CHECK_DTYPE(slot, at::kLong, op, "slot");
  GK_CHECK_SAME_DEVICE(like, k, op, "k_cache");
  GK_CHECK_SAME_DEVICE(like, v, op, "v_cache");
  GK_CHECK_SAME_DEVICE(like, slot, op, "slot");
  TORCH_CHECK_VALUE(k.dim() == 4, "gpt2kern.", op, ": k_cache must be [B, H, Tmax, D], got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes() && v.strides() == k.strides(), "gpt2kern.", op,
                    ": v_cache must have "
                    "k_cache's shape ",
                    k.sizes(), " and strides ", k.strides(), ", got ", v.sizes(), " and ", v.strides());
  TORCH_CHECK_VALUE(k.stride(3) == 1 || k.size(3) <= 1, "gpt2kern.", op,
                    ": k_cache's last dim must be contiguous, "
                    "got strides ",
                    k.strides());
  TORCH_CHECK_VALUE(slot.numel() == 1, "gpt2kern.", op, ": slot must hold one index, got shape ", slot.sizes());
  const int64_t D = k.size(3);
  return cuda::KvOut{k.data_ptr<float>(), v.data_ptr<float>(), slot.data_ptr<int64_t>(),
                     k.size(1) * D,       D > 0 ? D : 1,       k.stride(0),
                     k.stride(1),         k.stride(2),         k.size(2)};
}

// kv_write(qkv, k_cache, v_cache, slot): k_cache[b, h, slot] = K of qkv's row b, head h (likewise V), for qkv
// [B, 3E] or [B, 1, 3E] (c_attn's output for one token per row) and caches [B, H, Tmax, D] with E = H·D; slot int64
// [1] on the device (read there: capturable). One kernel writes both caches.
void kv_write(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot) {
  GK_CHECK_FLOAT(qkv, "kv_write", "qkv");
  TORCH_CHECK_VALUE(qkv.is_cuda(), "gpt2kern.kv_write: qkv must be a CUDA tensor, got ", qkv.device());
  const cuda::KvOut kv = checked_kv("kv_write", qkv, k_cache, v_cache, slot);
  const int64_t B = k_cache.size(0), E = kv.E;
  const bool shape_ok =
      (qkv.dim() == 2 || (qkv.dim() == 3 && qkv.size(1) == 1)) && qkv.size(0) == B && qkv.size(-1) == 3 * E;
  TORCH_CHECK_VALUE(shape_ok, "gpt2kern.kv_write: qkv must be [", B, ", ", 3 * E, "] or [", B, ", 1, ", 3 * E,
                    "] (one token per cache row), got ", qkv.sizes());
  TORCH_CHECK_VALUE(qkv.stride(-1) == 1 || qkv.size(-1) <= 1,
                    "gpt2kern.kv_write: qkv's last dim must be contiguous, "
                    "got strides ",
                    qkv.strides());
  c10::cuda::CUDAGuard guard(qkv.device());
  GK_CUDA_CHECK_LAUNCH("kv_write", cuda::kv_write(qkv.data_ptr<float>(), qkv.stride(0), B, kv, stream()));
}

// matmul_decode's part of a call (M <= kGemvMaxRows, checked there): the c_attn cache store and variant 4's counters.
struct DecodeGemv {
  cuda::KvOut kv;
  unsigned* counters = nullptr;
};

// conv1d's body, shared with matmul_decode (`dec`): float32 weights then take the staged GEMV (variant 3; 4 with
// counters), reduced-mode weights their one GEMV, both with the cache store.
static at::Tensor conv1d_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              c10::string_view epilogue, const std::optional<at::Tensor>& residual,
                              int64_t out_features, c10::string_view layout, const std::optional<at::Tensor>& scales,
                              const DecodeGemv* dec = nullptr) {
  const int epi = parse_epilogue(epilogue);
  const bool lowp = is_lowp(weight.scalar_type());
  if (lowp) {  // the shared checks but weight's dtype (check_conv1d_inputs wants float32)
    GK_CHECK_FLOAT(x, "conv1d", "x");
    TORCH_CHECK_VALUE(x.dim() >= 1, "gpt2kern.conv1d: x must have at least 1 dim");
    GK_CHECK_SAME_DEVICE(x, weight, "conv1d", "weight");
  } else {
    check_conv1d_inputs(x, weight);  // float32 (anything else fails here, by name)
  }
  // the CUDA kernels read the [in, out] layout: HF's fp32 weight, or the reduced modes' copy in that orientation
  TORCH_CHECK_VALUE(layout == "kn", "gpt2kern.conv1d: on CUDA the weight layout must be 'kn' ([in, out]), got '",
                    std::string(layout), "'");
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2, "gpt2kern.conv1d: on CUDA the weight must be [", K,
                    ", out] (HF's Conv1D layout, which pack keeps on CUDA), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) == K, "gpt2kern.conv1d: weight must be [", K, ", out], got ", weight.sizes());
  const int64_t N = weight.size(1);
  auto [S, group] = checked_scales(x, weight, scales, K, N);
  TORCH_CHECK_VALUE(out_features < 0 || out_features == N, "gpt2kern.conv1d: out_features=", out_features,
                    " but weight has ", N, " columns");
  TORCH_CHECK_VALUE(!lowp || K < (int64_t(1) << 31), "gpt2kern.conv1d: a ", weight.scalar_type(),
                    " weight on CUDA needs in < 2^31, got ", K);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  check_conv1d_extras(x, bias, epi, epilogue, residual, N, out_shape);
  c10::cuda::CUDAGuard guard(x.device());  // after every device check: x may be the CPU tensor of a mixed call
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
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* pr = rr.defined() ? rr.data_ptr<float>() : nullptr;
  const int64_t ldr = rr.defined() ? row_stride(rr) : 0;
  if (lowp) {
    const cuda::LowpType t = lowp_type(W.scalar_type());
    // bf16 weights under prefill GEMM variant 3: the tensor-core GEMM where it can run (else the mode's own tiles)
    if (t == cuda::LowpType::BF16 && M > cuda::kGemvMaxRows && dec == nullptr && knob(kPrefillGemm) == 3 &&
        cuda::gemm_3xbf16_ok(A.data_ptr<float>(), row_stride(A), K, W.data_ptr(), ldw, N)) {
      GK_CUDA_CHECK_LAUNCH("conv1d", cuda::gemm_3xbf16(A.data_ptr<float>(), row_stride(A), M, K, W.data_ptr(), ldw, N,
                                                       pb, epi, pr, ldr, y.data_ptr<float>(), stream()));
      return y;
    }
    const int splits = cuda::gemv_lowp_splits(t, M, K, N, group, num_sms());
    at::Tensor ws;
    if (splits > 1) ws = at::empty({(int64_t)splits * M * N}, x.options());
    GK_CUDA_CHECK_LAUNCH(
        "conv1d",
        cuda::matmul_lowp(t, A.data_ptr<float>(), row_stride(A), M, K, W.data_ptr(), ldw, N,
                          S.defined() ? S.data_ptr<float>() : nullptr, S.defined() ? row_stride(S) : 0, group, pb, epi,
                          pr, ldr, y.data_ptr<float>(), splits, ws.defined() ? ws.data_ptr<float>() : nullptr,
                          num_sms(), stream(), dec ? dec->kv : cuda::KvOut{}));
    return y;
  }
  const int splits = M <= cuda::kGemvMaxRows ? cuda::gemv_splits(M, K, N, num_sms())   // the decode GEMV
                                             : cuda::gemm_splits(M, K, N, num_sms());  // the prefill GEMM
  at::Tensor ws;
  if (splits > 1) ws = at::empty({(int64_t)splits * M * N}, x.options());
  float* pws = ws.defined() ? ws.data_ptr<float>() : nullptr;
  if (dec)
    GK_CUDA_CHECK_LAUNCH(
        "matmul_decode",
        cuda::gemv_staged(A.data_ptr<float>(), row_stride(A), M, K, W.data_ptr<float>(), ldw, N, pb, epi, pr, ldr,
                          y.data_ptr<float>(), splits, pws, stream(), dec->kv, dec->counters));
  else
    GK_CUDA_CHECK_LAUNCH(
        "conv1d", cuda::matmul(A.data_ptr<float>(), row_stride(A), M, K, W.data_ptr<float>(), ldw, N, pb, epi, pr, ldr,
                               y.data_ptr<float>(), splits, pws, stream(), knob(kPrefillGemm)));
  return y;
}

at::Tensor conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  c10::string_view epilogue, const std::optional<at::Tensor>& residual, int64_t out_features,
                  c10::string_view layout, const std::optional<at::Tensor>& scales) {
  return conv1d_impl(x, weight, bias, epilogue, residual, out_features, layout, scales);
}

// matmul_decode: conv1d at decode (x of at most kGemvMaxRows rows; weight [K, N] in any CUDA weight mode, scales for
// int8), the CUDA-graph decoder's GEMV. float32 weights: the staged GEMV (variant 3: x in shared memory, bitwise
// conv1d's GEMV), with `counters` summing its split-K partials in the kernel (variant 4: no finish kernel; int32
// zeros, at least ceil(N / 32), on x's device, which each call leaves zero and which no other GEMV may use
// meanwhile). fp16 / bf16 / int8 weights: conv1d's GEMV, their only one. With k_cache, v_cache [B, H, Tmax, D] and
// slot (int64 [1] on the device) it also stores K/V as it goes (CudaGraphDecoder kv_write=3): weight has N = 3E
// columns (E = H·D, q k v), x has B rows, and columns [E, 2E) of row b go to k_cache[b, :, slot], [2E, 3E) to
// v_cache[b, :, slot]; a slot outside [0, Tmax) stores nothing. Argument errors of the shared checks name conv1d.
at::Tensor matmul_decode(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         c10::string_view epilogue, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& k_cache,
                         const std::optional<at::Tensor>& v_cache, const std::optional<at::Tensor>& slot,
                         const std::optional<at::Tensor>& counters) {
  const char* op = "matmul_decode";
  GK_CHECK_FLOAT(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0,
                    "gpt2kern.matmul_decode: x must have a non-empty last dim, got "
                    "shape ",
                    x.sizes());
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK_VALUE(M <= cuda::kGemvMaxRows, "gpt2kern.matmul_decode: x must have at most ", cuda::kGemvMaxRows,
                    " rows (a decode GEMV), got ", M);
  DecodeGemv dec;
  if (counters) {
    const at::Tensor& c = *counters;
    TORCH_CHECK_VALUE(!is_lowp(weight.scalar_type()),
                      "gpt2kern.matmul_decode: counters go with float32 weights "
                      "(variant 4); ",
                      weight.scalar_type(), " weights have one GEMV and take none");
    GK_CHECK_DTYPE(c, at::kInt, op, "counters");
    GK_CHECK_SAME_DEVICE(x, c, op, "counters");
    const int64_t groups = weight.dim() == 2 ? (weight.size(1) + 31) / 32 : 0;
    TORCH_CHECK_VALUE(c.is_contiguous() && c.numel() >= groups,
                      "gpt2kern.matmul_decode: counters must be a "
                      "contiguous int32 tensor of at least ",
                      groups, " zeros (one per 32 output columns), got shape ", c.sizes(), " and strides ",
                      c.strides());
    dec.counters = reinterpret_cast<unsigned*>(c.data_ptr<int32_t>());
  }
  if (k_cache || v_cache || slot) {
    TORCH_CHECK_VALUE(k_cache && v_cache && slot,
                      "gpt2kern.matmul_decode: k_cache, v_cache and slot go together "
                      "(all three or none)");
    dec.kv = checked_kv(op, x, *k_cache, *v_cache, *slot);
    const int64_t B = k_cache->size(0);
    TORCH_CHECK_VALUE(M == B, "gpt2kern.matmul_decode: x must have one row per cache row (", B, "), got ", M);
    TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == 3 * dec.kv.E, "gpt2kern.matmul_decode: with caches ",
                      k_cache->sizes(), " weight must be [", K, ", ", 3 * dec.kv.E, "] (q, k, v columns), got ",
                      weight.sizes());
  }
  return conv1d_impl(x, weight, bias, epilogue, residual, -1, "kn", scales, &dec);
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
  // variant 2 where it applies (cuda::flash_prefill_ok), variant 1 everywhere else: any variant is safe for any call
  if (knob(kPrefillAttention) == 2 && cuda::flash_prefill_ok(c.a)) {
    GK_CUDA_CHECK_LAUNCH("attention", cuda::flash_prefill(c.a, num_sms(), stream()));
    return c.out;
  }
  GK_CUDA_CHECK_LAUNCH("attention", cuda::attention(c.a, num_sms(), stream()));
  return c.out;
}

at::Tensor embedding(const at::Tensor& input_ids, const at::Tensor& wte, const at::Tensor& wpe,
                     const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids) {
  check_embedding_tables(input_ids, wte, wpe);
  const int64_t B = input_ids.size(0), T = input_ids.size(1), n = wte.size(1);
  at::Tensor ids = embedding_ids(input_ids, wte, B, T, "input_ids");
  at::Tensor pos = embedding_ids(position_ids, wte, B, T, "position_ids");
  at::Tensor tt;
  if (token_type_ids) tt = embedding_ids(*token_type_ids, wte, B, T, "token_type_ids");
  c10::cuda::CUDAGuard guard(wte.device());  // after the ids' device checks: the tables may be the CPU tensors
  const int64_t V = wte.size(0), P = wpe.size(0);
  check_embedding_errors();  // a bad id of an earlier, finished call
  at::Tensor out = at::empty({B, T, n}, wte.options());
  if (out.numel() == 0) return out;
  cuda::EmbeddingError* rec = embedding_error_record();
  embedding_record_exists = true;
  at::Tensor e = wte.contiguous(), p = wpe.contiguous();
  GK_CUDA_CHECK_LAUNCH(
      "embedding",
      cuda::embedding(ids.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), tt.defined() ? tt.data_ptr<int64_t>() : nullptr,
                      e.data_ptr<float>(), V, p.data_ptr<float>(), P, out.data_ptr<float>(), B * T, n, rec, stream()));
  return out;
}

// embedding_step: the decode step's embedding of input_ids [B, 1] that advances the decoder's cursor, int64 [2 + B]
// contiguous on the device ([slot, kv_len, position of each row]): row b is embedded at position cursor[2 + b] + 1,
// which is stored back, and slot and kv_len grow by one, all in one kernel (CudaGraphDecoder kv_write=3).
at::Tensor embedding_step(const at::Tensor& input_ids, const at::Tensor& wte, const at::Tensor& wpe,
                          const at::Tensor& cursor) {
  const char* op = "embedding_step";
  check_embedding_tables(input_ids, wte, wpe);
  const int64_t B = input_ids.size(0), n = wte.size(1);
  TORCH_CHECK_VALUE(input_ids.size(1) == 1,
                    "gpt2kern.embedding_step: input_ids must be [B, 1] (one token per row), "
                    "got ",
                    input_ids.sizes());
  GK_CHECK_DTYPE(cursor, at::kLong, op, "cursor");
  GK_CHECK_SAME_DEVICE(wte, cursor, op, "cursor");
  TORCH_CHECK_VALUE(cursor.dim() == 1 && cursor.size(0) == 2 + B && cursor.is_contiguous(),
                    "gpt2kern.embedding_step: "
                    "cursor must be a contiguous int64 [2 + B] = [",
                    2 + B,
                    "] (slot, kv_len, then each row's "
                    "position), got shape ",
                    cursor.sizes(), " and strides ", cursor.strides());
  at::Tensor ids = embedding_ids(input_ids, wte, B, 1, "input_ids");
  c10::cuda::CUDAGuard guard(wte.device());  // after the ids' device check: the tables may be the CPU tensors
  check_embedding_errors();                  // a bad id of an earlier, finished call
  at::Tensor out = at::empty({B, 1, n}, wte.options());
  if (B == 0) return out;
  cuda::EmbeddingError* rec = embedding_error_record();
  embedding_record_exists = true;
  at::Tensor e = wte.contiguous(), p = wpe.contiguous();
  GK_CUDA_CHECK_LAUNCH(
      op, cuda::embedding_step(ids.data_ptr<int64_t>(), cursor.data_ptr<int64_t>(), e.data_ptr<float>(), e.size(0),
                               p.data_ptr<float>(), p.size(0), out.data_ptr<float>(), B, n, rec, stream()));
  return out;
}

// decode_attention: non-causal attention of q [B, H, Tq, D] over the first kv_len[b] keys of a static cache k, v
// [B, H, Tmax, D] (key_mask as in attention), kv_len int64 [1] or [B] on the device: capturable, and the work follows
// the length. Flash-decoding wherever it applies (Tq == 1, D % 4 == 0, 16-byte aligned key rows: the decode step;
// it beat the general kernel at every measured shape), the general attention kernel for everything else.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_mask, const at::Tensor& kv_len, double scale) {
  check_attention_args(q, k, v, key_mask, std::nullopt, 0, false);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK_VALUE(D <= cuda::kAttnMaxHeadDim, "gpt2kern.decode_attention: head dims up to ", cuda::kAttnMaxHeadDim,
                    ", got ", D);
  TORCH_CHECK_VALUE(B <= 65535 && H <= 65535, "gpt2kern.decode_attention: batch and heads must be <= 65535");
  GK_CHECK_DTYPE(kv_len, at::kLong, "decode_attention", "kv_len");
  GK_CHECK_SAME_DEVICE(q, kv_len, "decode_attention", "kv_len");
  TORCH_CHECK_VALUE(kv_len.dim() == 1 && (kv_len.size(0) == 1 || kv_len.size(0) == B),
                    "gpt2kern.decode_attention: kv_len must be [1] or [", B, "], got ", kv_len.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  AttnCall c = attention_call(q, k, v, key_mask, std::nullopt, scale, 0, false);
  at::Tensor len = kv_len.contiguous();
  c.a.kv_len = len.data_ptr<int64_t>();
  c.a.kv_len_sb = len.size(0) == 1 ? 0 : 1;
  if (c.out.numel() == 0) return c.out;
  if (!cuda::flash_decoding_ok(c.a)) {
    GK_CUDA_CHECK_LAUNCH("decode_attention", cuda::attention(c.a, num_sms(), stream()));
    return c.out;
  }
  const int splits = cuda::flash_decoding_splits(c.a, num_sms());
  at::Tensor ws = at::empty({B * H * splits * (D + 2)}, q.options());
  GK_CUDA_CHECK_LAUNCH("decode_attention", cuda::flash_decoding(c.a, splits, ws.data_ptr<float>(), stream()));
  return c.out;
}

// matmul_nk: y = epi(x @ weight.T + bias) with weight [N, K] (nn.Linear's layout), for x of at most kGemvMaxRows
// rows: the decode GEMV variant 2. float32 weights: matmul.cu's kernel; float16 / bfloat16 / int8 (the reduced weight
// modes' [N, K] copies, WeightFormat 'nk'; int8 with float32 scales [N, K / group]): matmul_lowp.cu's, 16-byte loads.
at::Tensor matmul_nk(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     c10::string_view epilogue, const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& scales) {
  const char* op = "matmul_nk";
  const int epi = parse_epilogue(epilogue);
  GK_CHECK_FLOAT(x, op, "x");
  const bool lowp = is_lowp(weight.scalar_type());
  TORCH_CHECK_TYPE(lowp || weight.scalar_type() == at::kFloat,
                   "gpt2kern.matmul_nk: weight must be Float (or Half, BFloat16, or Char with scales: the reduced "
                   "weight modes), got ",
                   weight.scalar_type());
  GK_CHECK_SAME_DEVICE(x, weight, op, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1, "gpt2kern.matmul_nk: x must have at least 1 dim");
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == K, "gpt2kern.matmul_nk: weight must be [N, ", K, "], got ",
                    weight.sizes());
  const int64_t N = weight.size(0), M = K > 0 ? x.numel() / K : 0;
  TORCH_CHECK_VALUE(M <= cuda::kGemvMaxRows, "gpt2kern.matmul_nk: x must have at most ", cuda::kGemvMaxRows,
                    " rows (a decode GEMV), got ", M);
  at::Tensor S;
  int64_t group = 0;
  if (weight.scalar_type() != at::kChar) {
    TORCH_CHECK_VALUE(!scales.has_value(), "gpt2kern.matmul_nk: weight is ", weight.scalar_type(),
                      " and has scales, but only int8 weights take them");
  } else {
    TORCH_CHECK_VALUE(scales.has_value(), "gpt2kern.matmul_nk: weight is int8 and needs its scales (float32 [", N, ", ",
                      K, " / group])");
    const at::Tensor& s = *scales;
    GK_CHECK_FLOAT(s, op, "scales");
    GK_CHECK_SAME_DEVICE(x, s, op, "scales");
    const int64_t groups = s.dim() == 2 ? s.size(1) : 0;
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == N && groups >= 1 && K % groups == 0,
                      "gpt2kern.matmul_nk: scales must be [", N, ", ", K,
                      " / group] (in layout 'nk': one scale per output row and group of inputs) with the group "
                      "dividing ",
                      K, ", got ", s.sizes());
    S = s.stride(1) == 1 || groups <= 1 ? s : s.contiguous();
    group = K / groups;
  }
  TORCH_CHECK_VALUE(!lowp || K < (int64_t(1) << 31), "gpt2kern.matmul_nk: a ", weight.scalar_type(),
                    " weight needs in < 2^31, got ", K);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (bias) {
    GK_CHECK_FLOAT(*bias, op, "bias");
    GK_CHECK_SAME_DEVICE(x, *bias, op, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "gpt2kern.matmul_nk: bias must be [", N, "], got ",
                      bias->sizes());
  }
  TORCH_CHECK_VALUE((epi == 2) == residual.has_value(),
                    "gpt2kern.matmul_nk: residual must be given exactly when "
                    "epilogue is 'residual' (epilogue '",
                    epilogue, "')");
  if (residual) {
    GK_CHECK_FLOAT(*residual, op, "residual");
    GK_CHECK_SAME_DEVICE(x, *residual, op, "residual");
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(out_shape),
                      "gpt2kern.matmul_nk: residual must have "
                      "shape ",
                      at::IntArrayRef(out_shape), ", got ", residual->sizes());
  }
  TORCH_CHECK_VALUE(K > 0, "gpt2kern.matmul_nk: x must have a non-empty last dim");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  at::Tensor A = as_rows(x, K), W = weight.stride(1) == 1 ? weight : weight.contiguous();
  at::Tensor b = bias ? bias->contiguous() : at::Tensor(), rr = residual ? as_rows(*residual, N) : at::Tensor();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* pr = rr.defined() ? rr.data_ptr<float>() : nullptr;
  const int64_t ldr = rr.defined() ? row_stride(rr) : 0;
  if (lowp)
    GK_CUDA_CHECK_LAUNCH(
        "matmul_nk", cuda::matmul_lowp_nk(lowp_type(W.scalar_type()), A.data_ptr<float>(), row_stride(A), M, K,
                                          W.data_ptr(), row_stride(W), N, S.defined() ? S.data_ptr<float>() : nullptr,
                                          S.defined() ? row_stride(S) : 0, group, pb, epi, pr, ldr, y.data_ptr<float>(),
                                          num_sms(), stream()));
  else
    GK_CUDA_CHECK_LAUNCH(
        "matmul_nk", cuda::matmul_nk(A.data_ptr<float>(), row_stride(A), M, K, W.data_ptr<float>(), row_stride(W), N,
                                     pb, epi, pr, ldr, y.data_ptr<float>(), stream()));
  return y;
}

// matmul_prefill: conv1d's Conv1D (fp32 weight [K, N] in HF's layout) through its prefill GEMM at any M, with the
// split-K count forced (splits > 0) or conv1d's own (0: gemm_splits), for the tests to reach every split count.
at::Tensor matmul_prefill(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          c10::string_view epilogue, const std::optional<at::Tensor>& residual, int64_t splits) {
  TORCH_CHECK_VALUE(splits >= 0 && splits <= 64, "gpt2kern.matmul_prefill: splits must be 0 (automatic) to 64, got ",
                    splits);
  const int epi = parse_epilogue(epilogue);
  check_conv1d_inputs(x, weight);  // float32 x and weight on one device, by name
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == K, "gpt2kern.matmul_prefill: weight must be [", K,
                    ", out] (HF's Conv1D layout), got ", weight.sizes());
  const int64_t N = weight.size(1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  check_conv1d_extras(x, bias, epi, epilogue, residual, N, out_shape);
  TORCH_CHECK_VALUE(K > 0, "gpt2kern.matmul_prefill: x must have a non-empty last dim");
  c10::cuda::CUDAGuard guard(x.device());  // after every device check, as conv1d's
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  at::Tensor A = as_rows(x, K), W = weight.stride(1) == 1 ? weight : weight.contiguous();
  at::Tensor b = bias ? bias->contiguous() : at::Tensor(), rr = epi == 2 ? as_rows(*residual, N) : at::Tensor();
  const int64_t M = A.size(0);
  const int s = splits > 0 ? (int)splits : cuda::gemm_splits(M, K, N, num_sms());
  at::Tensor ws;
  if (s > 1) ws = at::empty({(int64_t)s * M * N}, x.options());
  GK_CUDA_CHECK_LAUNCH(
      "matmul_prefill",
      cuda::gemm(A.data_ptr<float>(), row_stride(A), M, K, W.data_ptr<float>(), row_stride(W), N,
                 b.defined() ? b.data_ptr<float>() : nullptr, epi, rr.defined() ? rr.data_ptr<float>() : nullptr,
                 rr.defined() ? row_stride(rr) : 0, y.data_ptr<float>(), s,
                 ws.defined() ? ws.data_ptr<float>() : nullptr, stream(), knob(kPrefillGemm)));
  return y;
}

// Nodes of the CUDA graph the current stream is capturing, by type: what one replay of it launches. Read from the
// capture itself (CUDA allows queries on a graph under capture), so no torch API is needed to reach the graph.
std::map<std::string, int64_t> capture_node_counts() {
  cudaStream_t s = stream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t g = nullptr;
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(s, &status, nullptr, &g));
#else
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(s, &status, nullptr, &g));
#endif
  TORCH_CHECK_VALUE(status == cudaStreamCaptureStatusActive && g != nullptr,
                    "gpt2kern.capture_node_counts: the current CUDA stream is not capturing a graph");
  size_t n = 0;
  C10_CUDA_CHECK(cudaGraphGetNodes(g, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  if (n > 0) C10_CUDA_CHECK(cudaGraphGetNodes(g, nodes.data(), &n));
  std::map<std::string, int64_t> out{{"kernel", 0}, {"memcpy", 0}, {"memset", 0}, {"other", 0}, {"total", (int64_t)n}};
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType t;
    C10_CUDA_CHECK(cudaGraphNodeGetType(node, &t));
    out[t == cudaGraphNodeTypeKernel   ? "kernel"
        : t == cudaGraphNodeTypeMemcpy ? "memcpy"
        : t == cudaGraphNodeTypeMemset ? "memset"
                                       : "other"] += 1;
  }
  return out;
}

// gpt2kern.ops.set_cuda_pdl: programmatic dependent launch for every kernel launched from now on (launch.h), which
// needs an sm_90+ GPU (the current device is checked when turning it on); returns the previous setting.
bool set_cuda_pdl(bool on) {
  if (on) {
    int dev = 0, major = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    TORCH_CHECK_VALUE(major >= 9, "gpt2kern.set_cuda_pdl: programmatic dependent launch needs an sm_90 or newer GPU; ",
                      "device ", dev, " has compute capability ", major, ".x");
    const int arch = cuda::kernels_ptx_arch();
    TORCH_CHECK_VALUE(arch >= 90, "gpt2kern.set_cuda_pdl: the kernels on device ", dev, " were compiled for compute_",
                      arch,
                      ", without the device-side wait programmatic launch needs; rebuild with "
                      "TORCH_CUDA_ARCH_LIST including 9.0");
  }
  return cuda::set_pdl(on);
}

// gpt2kern.ops.cuda_variant: the variant `name` runs now; value > 0 sets it first (a variant that does not exist is a
// ValueError naming the choices).
int64_t cuda_variant(const std::string& name, int64_t value) {
  for (VariantKnob& k : g_knobs) {
    if (name != k.name) continue;
    TORCH_CHECK_VALUE(value <= 0 || (value >= k.lo && value <= k.hi), "gpt2kern.cuda_variant: ", name, " has variants ",
                      k.lo, " to ", k.hi, ", got ", value);
    if (value > 0) k.value.store((int)value, std::memory_order_relaxed);
    return k.value.load(std::memory_order_relaxed);
  }
  std::string names;
  for (const VariantKnob& k : g_knobs) names += std::string(names.empty() ? "" : ", ") + k.name;
  TORCH_CHECK_VALUE(false, "gpt2kern.cuda_variant: name must be one of ", names, ", got '", name, "'");
  return 0;
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
  m.impl("decode_attention", &gk::cuda_ops::decode_attention);
  m.impl("matmul_nk", &gk::cuda_ops::matmul_nk);
  m.impl("matmul_decode", &gk::cuda_ops::matmul_decode);
  m.impl("embedding_step", &gk::cuda_ops::embedding_step);
  m.impl("matmul_prefill", &gk::cuda_ops::matmul_prefill);
  m.impl("kv_write", &gk::cuda_ops::kv_write);
}
