// ops_kv.cpp — torch glue of the fused K/V cache write (kv_cache.cu): gpt2kern::kv_write, CUDA only.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "kv_cache.h"

namespace gk::cuda_ops {

// kv_write(qkv, k_cache, v_cache, slot): k_cache[b, h, slot] = K of qkv's row b, head h (likewise V), for qkv
// [B, 3E] or [B, 1, 3E] (c_attn's output for one token per row) and caches [B, H, Tmax, D] with E = H·D; slot int64
// [1] on the device (read there: capturable). One kernel writes both caches.
void kv_write(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot) {
  const char* op = "kv_write";
  GK_CHECK_FLOAT(qkv, op, "qkv");
  GK_CHECK_FLOAT(k_cache, op, "k_cache");
  GK_CHECK_FLOAT(v_cache, op, "v_cache");
  GK_CHECK_DTYPE(slot, at::kLong, op, "slot");
  TORCH_CHECK_VALUE(qkv.is_cuda(), "gpt2kern.kv_write: qkv must be a CUDA tensor, got ", qkv.device());
  GK_CHECK_SAME_DEVICE(qkv, k_cache, op, "k_cache");
  GK_CHECK_SAME_DEVICE(qkv, v_cache, op, "v_cache");
  GK_CHECK_SAME_DEVICE(qkv, slot, op, "slot");
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "gpt2kern.kv_write: k_cache must be [B, H, Tmax, D], got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides(),
                    "gpt2kern.kv_write: v_cache must have k_cache's shape ", k_cache.sizes(), " and strides ",
                    k_cache.strides(), ", got ", v_cache.sizes(), " and ", v_cache.strides());
  TORCH_CHECK_VALUE(k_cache.stride(3) == 1 || k_cache.size(3) <= 1, "gpt2kern.kv_write: k_cache's last dim must be "
                    "contiguous, got strides ", k_cache.strides());
  const int64_t B = k_cache.size(0), H = k_cache.size(1), Tmax = k_cache.size(2), D = k_cache.size(3), E = H * D;
  const bool shape_ok = (qkv.dim() == 2 || (qkv.dim() == 3 && qkv.size(1) == 1)) && qkv.size(0) == B &&
                        qkv.size(-1) == 3 * E;
  TORCH_CHECK_VALUE(shape_ok, "gpt2kern.kv_write: qkv must be [", B, ", ", 3 * E, "] or [", B, ", 1, ", 3 * E,
                    "] (one token per cache row), got ", qkv.sizes());
  TORCH_CHECK_VALUE(qkv.stride(-1) == 1 || qkv.size(-1) <= 1, "gpt2kern.kv_write: qkv's last dim must be contiguous, "
                    "got strides ", qkv.strides());
  TORCH_CHECK_VALUE(slot.numel() == 1, "gpt2kern.kv_write: slot must hold one index, got shape ", slot.sizes());
  c10::cuda::CUDAGuard guard(qkv.device());
  const cudaError_t err = cuda::kv_write(qkv.data_ptr<float>(), qkv.stride(0), B, H, D, slot.data_ptr<int64_t>(),
                                         k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.stride(0),
                                         k_cache.stride(1), k_cache.stride(2), Tmax,
                                         c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gpt2kern.kv_write: CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace gk::cuda_ops

TORCH_LIBRARY_IMPL(gpt2kern, CUDA, m) { m.impl("kv_write", &gk::cuda_ops::kv_write); }
