// launch.cu — the process-wide launch setting the kernels' launchers read (launch.h: pdl_enabled, set_pdl).
#include <atomic>

#include "common.cuh"
#include "launch.h"

namespace gk::cuda {

namespace {
std::atomic<bool> g_pdl{false};
}

bool pdl_enabled() { return g_pdl.load(std::memory_order_relaxed); }
bool set_pdl(bool on) { return g_pdl.exchange(on, std::memory_order_relaxed); }

namespace {
__global__ void pdl_probe_kernel() { pdl_begin(); }
}  // namespace

int kernels_ptx_arch() {
  // a build for an older arch run by JIT on an sm_90 GPU has no griddepcontrol.wait in its kernels (compiled out
  // below sm_90): PDL would then let kernels read their inputs early
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, pdl_probe_kernel) != cudaSuccess) return 0;
  return attr.ptxVersion;
}

int device_major() {
  static std::atomic<int> major_of[64] = {};  // per device: 0 until asked
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  int m = major_of[dev].load(std::memory_order_relaxed);
  if (m == 0 && cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess)
    major_of[dev].store(m, std::memory_order_relaxed);
  return m;
}

}  // namespace gk::cuda
