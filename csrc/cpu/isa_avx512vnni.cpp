// isa_avx512vnni.cpp — the int8 dot-product kernels (kernels/matmul_int8dot.h) with AVX512-VNNI's VPDPBUSD on
// 256-bit vectors (AVX512VL: Cascade Lake, Ice Lake, Zen 4 — CPUs without AVX-VNNI), whose 32 registers hold a
// 4-row tile, and prefill's 512-bit kernel over packed panels.
#include "kernel_table.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#define GK_ISA avx512vnni
#define GK_VEC_BYTES 32
#define GK_MR_MAX 3
#define GK_VREGS 32
#define GK_INT8DOT_AVX512VNNI
#define GK_INT8DOT_MR 4  // 4 rows × 4 int32 sums + 4 weight quads + x's quad and |x|: 22 of 32 registers
#include "kernels/vec.h"
#include "kernels/matmul.h"
#include "kernels/matmul_int8dot.h"

namespace gk {
extern const Int8DotKernels kInt8Dot_avx512vnni = {"avx512vnni",
                                                   avx512vnni::int8_quantize_rows,
                                                   avx512vnni::int8dot_panel,
                                                   avx512vnni::int8dot_pack_panel,
                                                   avx512vnni::int8dot_group_sums,
                                                   avx512vnni::int8dot_packed_panel};
}  // namespace gk
#endif  // __x86_64__
