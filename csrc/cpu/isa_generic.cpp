// isa_generic.cpp — the kernel sources of csrc/cpu/kernels/ compiled for one ISA level and gathered in a table.
// Only headers without inline code may come before the target pragma (see kernels/vec.h).
#include "kernel_table.h"
// no target pragma: the compiler's baseline (SSE2 on x86-64, NEON on aarch64)
#define GK_ISA generic
#define GK_VEC_BYTES 16
#define GK_MR_MAX 2
#define GK_KN_GEMV_ROWS 8  // fp32 decode rows that read HF's [K, N] in place: past 8 the panels win (RESULTS)
#define GK_VREGS 16        // vector registers (kernels/attention.h sizes its tiles by it)
#include "kernels/table.h"
