// launch.cu — the process-wide launch setting the kernels' launchers read (launch.h: pdl_enabled, set_pdl).
#include <atomic>

#include "launch.h"

namespace gk::cuda {

namespace {
std::atomic<bool> g_pdl{false};
}

bool pdl_enabled() { return g_pdl.load(std::memory_order_relaxed); }
bool set_pdl(bool on) { return g_pdl.exchange(on, std::memory_order_relaxed); }

}  // namespace gk::cuda
