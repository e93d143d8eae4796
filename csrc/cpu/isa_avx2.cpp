// isa_avx2.cpp — the kernel sources of csrc/cpu/kernels/ compiled for one ISA level and gathered in a table.
// Only headers without inline code may come before the target pragma (see kernels/vec.h).
#include "kernel_table.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#define GK_ISA avx2
#define GK_VEC_BYTES 32
#define GK_MR_MAX 3
#define GK_VREGS 16  // vector registers (kernels/attention.h sizes its tiles by it)
#include "kernels/table.h"
#endif  // __x86_64__
