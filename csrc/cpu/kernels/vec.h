// vec.h — the one SIMD abstraction every CPU kernel is written against.
//
// Each isa_<level>.cpp translation unit sets `#pragma GCC target(...)`, defines GK_ISA (a namespace name)
// and GK_VEC_BYTES (16, 32 or 64), then includes the kernel bodies. GCC's vector extensions lower the same
// source to SSE/NEON, AVX2 or AVX-512, so one kernel text gives every ISA level and a portable fallback.
// Nothing here may include a standard header with inline functions: those would be compiled for the
// pragma's ISA and could be picked by the linker for code that runs on a lesser CPU.
#include <cstdint>

namespace gk {
namespace GK_ISA {

#define GK_INLINE inline __attribute__((always_inline))

constexpr int VL = GK_VEC_BYTES / 4;  // floats per vector
typedef float vf __attribute__((vector_size(GK_VEC_BYTES)));
typedef float vf_u __attribute__((vector_size(GK_VEC_BYTES), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(GK_VEC_BYTES)));

GK_INLINE vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
GK_INLINE void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
// s − 0 is s for every float (−0, inf and NaN included), so the compiler may emit a plain broadcast — a memory
// operand even — where vf{} + s would cost an add (+0 is not an identity for −0) and a register shuffle.
GK_INLINE vf bcast(float s) { return s - vf{}; }
GK_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

// Horizontal sum/max as a halving tree: log2(VL) dependent steps instead of VL.
GK_INLINE float hsum(vf v) {
  float t[VL];
  store(t, v);
  for (int w = VL / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
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
