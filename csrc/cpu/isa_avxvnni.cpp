// isa_avxvnni.cpp — the int8 dot-product kernels (kernels/matmul_int8dot.h) with AVX-VNNI's VEX-encoded VPDPBUSD
// (Alder Lake and later, Zen 5): the AVX2 kernel text with one instruction for VPMADDUBSW + VPMADDWD + VPADDD.
#include "kernel_table.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2,avxvnni")
#define GK_ISA avxvnni
#define GK_VEC_BYTES 32
#define GK_MR_MAX 3
#define GK_VREGS 16
#define GK_INT8DOT_AVXVNNI
#define GK_INT8DOT_MR 2  // 16 registers, as AVX2
#include "kernels/vec.h"
#include "kernels/matmul.h"
#include "kernels/matmul_int8dot.h"

namespace gk {
extern const Int8DotKernels kInt8Dot_avxvnni = {"avxvnni", avxvnni::int8_quantize_rows, avxvnni::int8dot_panel};
}  // namespace gk
#endif  // __x86_64__
