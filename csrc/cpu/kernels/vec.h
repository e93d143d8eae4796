// vec.h — the one SIMD abstraction every CPU kernel is written against.
//
// Each isa_<level>.cpp translation unit sets `#pragma GCC target(...)`, defines GK_ISA (a namespace name)
// and GK_VEC_BYTES (16, 32 or 64), then includes the kernel bodies. GCC's vector extensions lower the same
// source to SSE/NEON, AVX2 or AVX-512, so one kernel text gives every ISA level and a portable fallback.
// Nothing here may include a standard header with inline functions: those would be compiled for the
// pragma's ISA and could be picked by the linker for code that runs on a lesser CPU.
#include <cstdint>
#if GK_VEC_BYTES >= 32
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives inside avx512fintrin.h
#include <immintrin.h>  // only always-inline intrinsics (no out-of-line symbols), compiled under the TU's pragma
#endif

namespace gk {
namespace GK_ISA {

#define GK_INLINE inline __attribute__((always_inline))

constexpr int VL = GK_VEC_BYTES / 4;  // floats per vector
typedef float vf __attribute__((vector_size(GK_VEC_BYTES)));
typedef float vf_u __attribute__((vector_size(GK_VEC_BYTES), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(GK_VEC_BYTES)));

GK_INLINE vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
// A line the kernel reads soon, into L2 (prefetcht1): streamed weights prefetched into L1 would evict what the
// FMAs reuse.
GK_INLINE void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
// What the caller reads next (the next block of weights), prefetched into L2 a few lines per step of a kernel's loop,
// spread over the whole call: with several rows of x the FMAs outlast a block's DRAM reads, and only prefetches
// issued while they run keep DRAM busy (issued all at once, the misses would queue and stall the FMAs behind them).
struct SpreadPrefetch {
  const char* p;
  const char* end;
  int64_t per_step;
  SpreadPrefetch(const void* from, int64_t bytes, int64_t steps)  // `bytes` from `from` (none if null) over `steps`
      : p(static_cast<const char*>(from)), end(from ? p + bytes : p),
        per_step(((from ? bytes : 0) + 63) / 64 / (steps > 0 ? steps : 1) + 1) {}
  GK_INLINE void step() {
    for (int64_t i = 0; i < per_step && p < end; ++i, p += 64) prefetch_l2(p);
  }
};
struct NoPrefetch {  // SpreadPrefetch's stand-in where a kernel prefetches nothing
  GK_INLINE void step() {}
};
GK_INLINE void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
// s − 0 is s for every float (−0, inf and NaN included), so the compiler may emit a plain broadcast — a memory
// operand even — where vf{} + s would cost an add (+0 is not an identity for −0) and a register shuffle.
GK_INLINE vf bcast(float s) { return s - vf{}; }

// VL stored weights widened to fp32 in registers (the reduced-precision weight formats, kernel_table.h's WType):
// IEEE half (F16C's vcvtph2ps; every AVX2 CPU has it), bf16 (the fp32's top half: a shift) and int8 (sign-extend,
// convert; the caller applies the scale). The generic build converts element by element.
GK_INLINE float half_to_float(uint16_t h) {
  // the half's exponent and mantissa shifted into a float's, then × 2^112 rebiases the exponent (15 -> 127) and
  // turns half subnormals into float normals exactly; inf/NaN keep an all-ones exponent
  uint32_t m = (uint32_t)(h & 0x7fff) << 13, sign = (uint32_t)(h & 0x8000) << 16;
  float f;
  if ((h & 0x7c00) == 0x7c00) {
    m |= 0x7f800000u;
    __builtin_memcpy(&f, &m, 4);
  } else {
    __builtin_memcpy(&f, &m, 4);
    f *= 5.192296858534828e+33f;  // 2^112
  }
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  u |= sign;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
#if GK_VEC_BYTES == 64
GK_INLINE vf widen_f16(const uint16_t* p) { return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
GK_INLINE vf widen_bf16(const uint16_t* p) {
  return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
GK_INLINE vf widen_i8(const int8_t* p) {
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#elif GK_VEC_BYTES == 32
GK_INLINE vf widen_f16(const uint16_t* p) { return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
GK_INLINE vf widen_bf16(const uint16_t* p) {
  return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
GK_INLINE vf widen_i8(const int8_t* p) {
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#else
GK_INLINE vf widen_f16(const uint16_t* p) {
  float t[VL];
  for (int i = 0; i < VL; ++i) t[i] = half_to_float(p[i]);
  return load(t);
}
GK_INLINE vf widen_bf16(const uint16_t* p) {
  float t[VL];
  for (int i = 0; i < VL; ++i) {
    const uint32_t u = (uint32_t)p[i] << 16;
    __builtin_memcpy(&t[i], &u, 4);
  }
  return load(t);
}
GK_INLINE vf widen_i8(const int8_t* p) {
  float t[VL];
  for (int i = 0; i < VL; ++i) t[i] = (float)p[i];
  return load(t);
}
#endif
// Elements [i, i + VL) of a weight stored as W (a WType), widened to fp32.
template <WType W>
GK_INLINE vf load_w(const void* base, int64_t i) {
  if constexpr (W == WType::F32)
    return load(static_cast<const float*>(base) + i);
  else if constexpr (W == WType::F16)
    return widen_f16(static_cast<const uint16_t*>(base) + i);
  else if constexpr (W == WType::BF16)
    return widen_bf16(static_cast<const uint16_t*>(base) + i);
  else
    return widen_i8(static_cast<const int8_t*>(base) + i);
}
GK_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

// Horizontal sum/max as a halving tree: log2(VL) dependent steps instead of VL (hsum: each step one shuffle and
// one add in registers; matmul_nt reduces one per output).
#if GK_VEC_BYTES == 64
typedef float vf8 __attribute__((vector_size(32)));
#endif
typedef float vf4 __attribute__((vector_size(16)));
GK_INLINE float hsum(vf v) {
#if GK_VEC_BYTES == 64
  vf8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 h = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
#elif GK_VEC_BYTES == 32
  vf4 h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  vf4 h = v;
#endif
  h = h + __builtin_shufflevector(h, h, 2, 3, 0, 1);
  return h[0] + h[1];
}
GK_INLINE float hmax(vf v) {
  float t[VL];
  store(t, v);
  for (int w = VL / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = t[i + w] > t[i] ? t[i + w] : t[i];
  return t[0];
}
GK_INLINE float fmaxf_(float a, float b) { return a > b ? a : b; }
GK_INLINE float fminf_(float a, float b) { return a < b ? a : b; }

// exp(x), about 1 ulp (Cephes polynomial on |r| <= ln2/2). NaN propagates; overflow gives +inf;
// results below ~1e-45 flush to 0. 2^n is applied in two halves so denormal results stay right.
GK_INLINE vf vexp(vf x) {
  const vf hi = bcast(88.72283935546875f), lo = bcast(-103.97208f);
  vf xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const vf magic = bcast(12582912.f);  // 1.5 * 2^23: adding it rounds to nearest integer
  vf n = (xc * bcast(1.44269504088896341f) + magic) - magic;
  vf r = xc - n * bcast(0.693359375f);
  r = r - n * bcast(-2.12194440e-4f);
  vf p = bcast(1.9875691500E-4f);
  p = p * r + bcast(1.3981999507E-3f);
  p = p * r + bcast(8.3334519073E-3f);
  p = p * r + bcast(4.1665795894E-2f);
  p = p * r + bcast(1.6666665459E-1f);
  p = p * r + bcast(5.0000001201E-1f);
  vf y = p * (r * r) + r + bcast(1.f);
  vi ni = __builtin_convertvector(n, vi);
  vi n1 = ni >> 1;
  vi n2 = ni - n1;
  vf s1 = reinterpret_cast<vf>((n1 + 127) << 23);
  vf s2 = reinterpret_cast<vf>((n2 + 127) << 23);
  vf res = y * s1 * s2;
  res = x > hi ? bcast(__builtin_inff()) : res;
  res = x < lo ? bcast(0.f) : res;
  return res;
}

// HF's NewGELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). Using 1 + tanh(u) = 2 / (1 + e^(−2u)) it is
// x / (1 + e^(−2u)): the same function without the cancellation of 1 + tanh(u) for negative x.
GK_INLINE vf vgelu_new(vf x) {
  const vf k0 = bcast(-2.f * 0.7978845608028654f), k1 = bcast(0.044715f);
  vf u2 = k0 * (x + k1 * x * x * x);
  return x / (bcast(1.f) + vexp(u2));
}

}  // namespace GK_ISA
}  // namespace gk
