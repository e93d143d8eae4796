// dispatch.cpp — choose the kernel table once: the best ISA this CPU runs, or GPT2KERN_ISA=avx512|avx2|generic
// (tests force each level this way, and set_isa switches at run time).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "kernel_table.h"

namespace gk {
#if defined(__x86_64__)
extern const KernelTable kTable_avx512, kTable_avx2;
#endif
extern const KernelTable kTable_generic;

const KernelTable* kernels_for(const char* isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
               ? &kTable_avx512
               : nullptr;
  if (!std::strcmp(isa, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
               ? &kTable_avx2
               : nullptr;
#endif
  if (!std::strcmp(isa, "generic")) return &kTable_generic;
  return nullptr;
}

static const KernelTable* best() {
  if (const char* env = std::getenv("GPT2KERN_ISA"); env && *env) {
    if (const KernelTable* t = kernels_for(env)) return t;
  }
  for (const char* isa : {"avx512", "avx2", "generic"})
    if (const KernelTable* t = kernels_for(isa)) return t;
  return &kTable_generic;
}

static std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable& kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    t = best();
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

#if defined(__x86_64__)
extern const Bf16DotKernels kBf16Dot;
#endif
static std::atomic<int> g_bf16_dot{-1};  // -1: from GPT2KERN_BF16_DOT on first use

void set_bf16_dot(bool on) { g_bf16_dot.store(on ? 1 : 0); }

const Bf16DotKernels* bf16_dot() {
#if defined(__x86_64__)
  int on = g_bf16_dot.load();
  if (on < 0) {
    const char* env = std::getenv("GPT2KERN_BF16_DOT");
    on = (env && !std::strcmp(env, "0")) ? 0 : 1;
    g_bf16_dot.store(on);
  }
  if (!on || &kernels() != &kTable_avx512) return nullptr;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") ? &kBf16Dot : nullptr;
#else
  return nullptr;
#endif
}

#if defined(__x86_64__)
extern const Int8DotKernels kInt8Dot_avx2, kInt8Dot_avxvnni, kInt8Dot_avx512vnni;
#endif

const Int8DotKernels* int8_dot_kernels() {
#if defined(__x86_64__)
  if (&kernels() == &kTable_generic) return nullptr;
  __builtin_cpu_init();
  // the avx512 table: AVX512-VNNI first (its prefill kernel is 512 bits wide); the avx2 table keeps to 256 bits
  if (&kernels() == &kTable_avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    return &kInt8Dot_avx512vnni;
  if (__builtin_cpu_supports("avxvnni")) return &kInt8Dot_avxvnni;
  return &kInt8Dot_avx2;  // a table other than generic is active: the CPU has AVX2
#else
  return nullptr;
#endif
}

static std::atomic<int> g_int8_dot{-1};  // an Int8DotMode; -1: from GPT2KERN_INT8_DOT on first use

static thread_local int tl_int8_dot = -1;  // the calling thread's own mode, -1: none

void set_int8_dot(Int8DotMode mode) { g_int8_dot.store((int)mode); }

int exchange_thread_int8_dot(int mode) {
  const int before = tl_int8_dot;
  tl_int8_dot = mode;
  return before;
}

Int8DotMode int8_dot_mode() {
  if (tl_int8_dot >= 0) return (Int8DotMode)tl_int8_dot;
  int mode = g_int8_dot.load();
  if (mode < 0) {
    const char* env = std::getenv("GPT2KERN_INT8_DOT");
    mode = (int)(env && !std::strcmp(env, "1")   ? Int8DotMode::On
                 : env && !std::strcmp(env, "0") ? Int8DotMode::Off
                                                 : Int8DotMode::Auto);
    g_int8_dot.store(mode);
  }
  return (Int8DotMode)mode;
}

const Int8DotKernels* int8_dot(int64_t rows) {
  switch (int8_dot_mode()) {
    case Int8DotMode::Off: return nullptr;
    case Int8DotMode::On: return int8_dot_kernels();
    case Int8DotMode::Auto: break;
  }
  const Int8DotKernels* k = int8_dot_kernels();
  return k && k->matmul_packed && rows > kDecodeRows ? k : nullptr;
}

bool set_isa(const char* isa) {
  const KernelTable* t = kernels_for(isa);
  if (!t) return false;
  g_active.store(t, std::memory_order_release);
  return true;
}

}  // namespace gk
