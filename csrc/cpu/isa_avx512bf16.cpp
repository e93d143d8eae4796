// isa_avx512bf16.cpp — the bf16 dot-product prefill kernels (kernels/matmul_bf16dot.h) for CPUs with AVX512_BF16
// (Zen 4/5, Sapphire Rapids and later). Not a whole ISA level: the avx512 table serves everything else, and
// bf16_dot() offers these only while that table is active and the CPU has the instructions.
#include "kernel_table.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c,bmi2")
#define GK_ISA avx512bf16
#define GK_VEC_BYTES 64
#define GK_MR_MAX 12
#define GK_VREGS 32
#include "kernels/vec.h"
#include "kernels/matmul.h"
#include "kernels/matmul_bf16dot.h"

namespace gk {
extern const Bf16DotKernels kBf16Dot = {avx512bf16::bf16dot_panel,   avx512bf16::bf16_pairs, avx512bf16::to_bf16_rows,
                                        avx512bf16::bf16dot_panel_q, avx512bf16::int8_pairs, GK_MR_MAX};
}  // namespace gk
#endif  // __x86_64__
