// peak.h — the FMA roofline probe: 12 independent vector FMA chains per thread, nothing loaded from memory.
//
// Not a kernel GPT-2 uses: `gpt2kern bench` measures the machine's fp32 FMA peak with it (FLOPs ÷ peak is
// each compute-bound row's roofline fraction). 12 chains cover FMA latency × throughput on current x86 cores.
namespace gk {
namespace GK_ISA {

static float fma_probe(int64_t iters) {
  vf a[12];
  for (int i = 0; i < 12; ++i) a[i] = bcast(0.001f * (float)i);
  const vf m = bcast(0.999999f), c = bcast(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 12; ++i) a[i] = a[i] * m + c;
  }
  vf s = a[0];
  for (int i = 1; i < 12; ++i) s += a[i];
  return hsum(s);
}

}  // namespace GK_ISA
}  // namespace gk
