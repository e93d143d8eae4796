// isa_avx2.cpp — the kernel sources of csrc/cpu/kernels/ compiled for one ISA level and gathered in a table, and
// the int8 dot-product kernels with AVX2's VPMADDUBSW (kernels/matmul_int8dot.h).
// Only headers without inline code may come before the target pragma (see kernels/vec.h).
#include "kernel_table.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#define GK_ISA avx2
#define GK_VEC_BYTES 32
#define GK_MR_MAX 3
#define GK_KN_GEMV_ROWS 8  // fp32 decode rows that read HF's [K, N] in place: past 8 the panels win (RESULTS)
#define GK_VREGS 16        // vector registers (kernels/attention.h sizes its tiles by it)
#include "kernels/table.h"
#define GK_INT8DOT_MR 2  // 2 rows × 4 int32 sums + 4 weight quads + x's quad, |x| and the ones fill 16 registers
#include "kernels/matmul_int8dot.h"

namespace gk {
extern const Int8DotKernels kInt8Dot_avx2 = {"avx2", avx2::int8_quantize_rows, avx2::int8dot_panel};
}  // namespace gk
#endif  // __x86_64__
