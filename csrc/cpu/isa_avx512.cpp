// isa_avx512.cpp — the kernel sources of csrc/cpu/kernels/ compiled for one ISA level and gathered in a table.
// Only headers without inline code may come before the target pragma (see kernels/vec.h).
#include "kernel_table.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")
#define GK_ISA avx512
#define GK_VEC_BYTES 64
#define GK_MR_MAX 12
#define GK_KN_GEMV_ROWS 16  // fp32 decode rows that read HF's [K, N] in place: the GEMV wins to 16 here (RESULTS)
#define GK_VREGS 32         // vector registers (kernels/attention.h sizes its tiles by it)
#include "kernels/table.h"
#endif  // __x86_64__
