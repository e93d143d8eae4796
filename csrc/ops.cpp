// ops.cpp — the single list of what the extension offers: every op's schema, and the backend each runs on.
// Python wrappers, fake (meta) implementations and docs live in gpt2kern/ops.py. The CUDA implementations of the
// same schemas register themselves in csrc/cuda/ops_cuda.cpp (built when torch is a CUDA build and nvcc exists).
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <string>

#include "common/checks.h"
#include "cpu/kernel_table.h"
#include "cpu/ops_cpu.h"

TORCH_LIBRARY(gpt2kern, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)");
  m.def("gelu_new(Tensor x) -> Tensor");
  m.def("pack(Tensor weight) -> Tensor");
  m.def(
      "conv1d(Tensor x, Tensor weight, Tensor? bias, str epilogue='none', Tensor? residual=None, "
      "int out_features=-1, str layout='kn', Tensor? scales=None) -> Tensor");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? bias, float scale, int q_offset, "
      "bool causal) -> Tensor");
  m.def("embedding(Tensor input_ids, Tensor wte, Tensor wpe, Tensor position_ids, Tensor? token_type_ids) -> Tensor");
  // CUDA only (csrc/cuda/ops_cuda.cpp): the decode step's kernels and variants, the prefill GEMM with forced split-K
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor kv_len, float scale) -> Tensor");
  m.def(
      "matmul_nk(Tensor x, Tensor weight, Tensor? bias, str epilogue='none', Tensor? residual=None, "
      "Tensor? scales=None) -> Tensor");
  m.def(
      "matmul_prefill(Tensor x, Tensor weight, Tensor? bias, str epilogue='none', Tensor? residual=None, "
      "int splits=0) -> Tensor");
  m.def("kv_write(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot) -> ()");
  m.def(
      "matmul_decode(Tensor x, Tensor weight, Tensor? bias, str epilogue='none', Tensor? residual=None, "
      "Tensor? scales=None, Tensor(a!)? k_cache=None, Tensor(b!)? v_cache=None, Tensor? slot=None, "
      "Tensor(c!)? counters=None) -> Tensor");
  m.def("embedding_step(Tensor input_ids, Tensor wte, Tensor wpe, Tensor(a!) cursor) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2kern, CPU, m) {
  m.impl("layer_norm", &gk::cpu::layer_norm);
  m.impl("add_layer_norm", &gk::cpu::add_layer_norm);
  m.impl("gelu_new", &gk::cpu::gelu_new);
  m.impl("pack", &gk::cpu::pack);
  m.impl("conv1d", &gk::cpu::conv1d);
  m.impl("attention", &gk::cpu::attention);
  m.impl("embedding", &gk::cpu::embedding);
}

namespace gk::cpu {
void bind_engine(pybind11::module_& m);  // engine.cpp
}
#ifdef GPT2KERN_CUDA
namespace gk::cuda_ops {  // ops_cuda.cpp
void check_embedding_errors();
std::map<std::string, int64_t> capture_node_counts();
int64_t cuda_variant(const std::string& name, int64_t value);
bool set_cuda_pdl(bool on);
}  // namespace gk::cuda_ops
#endif

// Plain Python functions for the ISA dispatcher, and the decode engine class (not tensor ops).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  gk::cpu::bind_engine(mod);
  mod.def(
      "stamp",
      [](const std::vector<at::Tensor>& ts) {
        // what optimize()'s packs depend on, per tensor: storage address, version counter (in-place edits), device,
        // dtype — as bytes to compare whole. One call instead of ~300 Python attribute reads per forward.
        struct Rec {
          const void* ptr;
          int64_t version;
          int32_t device, dtype;
        };
        std::string out(ts.size() * sizeof(Rec), '\0');
        for (size_t i = 0; i < ts.size(); ++i) {
          const at::Tensor& t = ts[i];
          const void* ptr = t.has_storage() ? t.storage().data() : nullptr;
          if (ptr) ptr = static_cast<const char*>(ptr) + t.storage_offset() * t.element_size();
          const int32_t dev = (int32_t)t.device().type() * 65536 + t.device().index() + 1;
          const Rec r{ptr, (int64_t)t._version(), dev, (int32_t)t.scalar_type()};
          std::memcpy(&out[i * sizeof(Rec)], &r, sizeof(Rec));
        }
        return pybind11::bytes(out);
      },
      "Identity of tensors' data (storage address, version, device, dtype), as bytes.");
  mod.def(
      "same_slots",
      [](const pybind11::list& sizes, const pybind11::list& slots) {
        // optimize()'s structure check: every (dict, len) still has that len and every (dict, key, obj) still maps key
        // to obj. In C++ because after a decode step every cache is cold and the same loop in Python is a noticeable
        // share of the step.
        auto ok = [](PyObject* t, Py_ssize_t n) {
          return PyTuple_Check(t) && PyTuple_GET_SIZE(t) == n && PyDict_Check(PyTuple_GET_ITEM(t, 0));
        };
        for (const auto& it : sizes) {
          PyObject* t = it.ptr();
          if (!ok(t, 2) || !PyLong_Check(PyTuple_GET_ITEM(t, 1))) return false;
          if (PyDict_Size(PyTuple_GET_ITEM(t, 0)) != PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 1))) return false;
        }
        for (const auto& it : slots) {
          PyObject* t = it.ptr();
          if (!ok(t, 3)) return false;
          if (PyDict_GetItem(PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1)) != PyTuple_GET_ITEM(t, 2)) return false;
        }
        return true;
      },
      "True if every (dict, len) and (dict, key, obj) in the lists still holds.");
  mod.attr("PANEL") = gk::kPanel;  // columns per packed weight panel: gpt2kern.ops.PANEL reads it from here
  mod.def("simd_lanes", [] { return gk::kernels().lanes; }, "floats per SIMD vector of the active ISA.");
  mod.def("isa", [] { return std::string(gk::kernels().name); }, "The ISA level the CPU kernels run at.");
  mod.def(
      "set_isa", [](const std::string& isa) { return gk::set_isa(isa.c_str()); },
      "Switch the CPU kernels to 'avx512', 'avx2' or 'generic'; False if this CPU cannot run it.");
  mod.def(
      "fma_peak_gflops",
      [](double seconds) {
        // every thread runs the probe for about `seconds`; FLOPs = threads × iters × 12 chains × lanes × 2
        const gk::KernelTable& t = gk::kernels();
        const int64_t lanes = t.lanes;
        const int nt = at::get_num_threads();
        int64_t iters = 1 << 16;
        for (;;) {
          auto t0 = std::chrono::steady_clock::now();
          std::atomic<float> sink{0.f};
          at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) sink = sink + t.fma_probe(iters);
          });
          const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          if (dt >= seconds || iters > (int64_t(1) << 40)) return nt * (double)iters * 12 * lanes * 2 / dt / 1e9;
          iters *= 2;
        }
      },
      "Measured fp32 FMA peak of the active ISA over all torch threads, GFLOP/s.");
  mod.def(
      "set_bf16_dot", [](bool on) { gk::set_bf16_dot(on); },
      "Allow (True, the default) or forbid the AVX512_BF16 dot-product prefill of bf16 weights.");
  mod.def(
      "bf16_dot", [] { return gk::bf16_dot() != nullptr; },
      "Whether bf16 weights' prefill runs on VDPBF16PS now (avx512 ISA, a CPU with AVX512_BF16, allowed).");
  mod.def(
      "set_int8_dot",
      [](const std::string& mode) {
        TORCH_CHECK_VALUE(mode == "off" || mode == "on" || mode == "auto",
                          "gpt2kern.set_int8_dot: mode must be 'off', 'on' or 'auto', got '", mode, "'");
        gk::set_int8_dot(mode == "on"    ? gk::Int8DotMode::On
                         : mode == "off" ? gk::Int8DotMode::Off
                                         : gk::Int8DotMode::Auto);
      },
      "The int8 dot-product switch: 'on' (every row count, where the CPU has the kernels), 'off', or 'auto' (the "
      "default: prefill rows where the kernels prefill over packed panels).");
  mod.def(
      "int8_dot_mode",
      [] {
        const gk::Int8DotMode m = gk::int8_dot_mode();
        return std::string(m == gk::Int8DotMode::On ? "on" : m == gk::Int8DotMode::Off ? "off" : "auto");
      },
      "The int8 dot-product switch (GPT2KERN_INT8_DOT=1 / 0 start it 'on' / 'off'; else 'auto').");
  mod.def(
      "int8_dot", [](int64_t rows) { return gk::int8_dot(rows) != nullptr; }, pybind11::arg("rows"),
      "Whether a matmul of `rows` rows against int8 weights (a group of 4k) multiplies x quantized to int8 now (the "
      "switch, the kernels on this CPU / ISA).");
  mod.def(
      "int8_dot_kernels",
      []() -> std::optional<std::string> {
        const gk::Int8DotKernels* k = gk::int8_dot_kernels();
        return k ? std::optional<std::string>(k->name) : std::nullopt;
      },
      "Which int8 dot-product kernels this CPU runs: 'avx2', 'avxvnni', 'avx512vnni', or None.");
  mod.def(
      "int8_dot_packed",
      [] {
        const gk::Int8DotKernels* k = gk::int8_dot_kernels();
        return k != nullptr && k->matmul_packed != nullptr;
      },
      "Whether those kernels prefill over packed panels (AVX512-VNNI's 512-bit kernel).");
  mod.def(
      "int8_quantize_rows",
      [](const at::Tensor& x, int64_t group) {
        GK_CHECK_FLOAT(x, "int8_quantize_rows", "x");
        TORCH_CHECK_VALUE(x.dim() == 2 && x.device().is_cpu(),
                          "gpt2kern.int8_quantize_rows: x must be a 2-D CPU tensor, got ", x.sizes());
        const int64_t M = x.size(0), K = x.size(1);
        TORCH_CHECK_VALUE(group >= 1 && K % group == 0, "gpt2kern.int8_quantize_rows: group must divide ", K, ", got ",
                          group);
        const gk::Int8DotKernels* k = gk::int8_dot_kernels();
        TORCH_CHECK(k, "gpt2kern.int8_quantize_rows: no int8 dot-product kernels on this CPU / ISA");
        const at::Tensor xc = x.contiguous();
        at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
        at::Tensor sc = at::empty({M, K / group}, x.options());
        k->quantize_rows(xc.data_ptr<float>(), K, M, K, group, q.data_ptr<int8_t>(), K, sc.data_ptr<float>(),
                         K / group);
        return std::make_tuple(q, sc);
      },
      pybind11::arg("x"), pybind11::arg("group"),
      "x's rows quantized per group as the int8 dot-product path does: (int8 codes [M, K], scales [M, K / group]).");
  mod.def(
      "matmul_strategy",
      [](const std::string& layout, const std::string& dtype, int64_t rows, int64_t group, std::optional<bool> bf16_dot,
         std::optional<bool> int8_dot) {
        // the strategy run_matmul would take (tests state the table through it); bf16_dot None: whether the bf16
        // dot-product kernels run now
        const char* who = "matmul_strategy";
        const gk::Layout lay = gk::cpu::parse_layout(layout, who);
        const gk::WType type = gk::cpu::parse_dtype(dtype, who);
        TORCH_CHECK_TYPE(lay == gk::Layout::Panels || type == gk::WType::F32, "gpt2kern.", who, ": layout '", layout,
                         "' is read in place and must be fp32 on the CPU; other dtypes are packed ('panels')");
        TORCH_CHECK_VALUE(rows >= 1, "gpt2kern.", who, ": rows must be >= 1, got ", rows);
        TORCH_CHECK_VALUE(type != gk::WType::I8 || group >= 1, "gpt2kern.", who, ": int8 needs its group (>= 1), got ",
                          group);
        const bool bd = bf16_dot.has_value() ? *bf16_dot : gk::bf16_dot() != nullptr;
        const bool i8 = int8_dot.has_value() ? *int8_dot : gk::int8_dot(rows) != nullptr;
        return std::string(gk::cpu::matmul_strategy_name(gk::cpu::choose_matmul(lay, type, rows, group, bd, i8)));
      },
      pybind11::arg("layout"), pybind11::arg("dtype"), pybind11::arg("rows"), pybind11::arg("group") = 0,
      pybind11::arg("bf16_dot") = pybind11::none(), pybind11::arg("int8_dot") = pybind11::none(),
      "Name of the strategy the CPU matmul takes for `rows` rows against a weight in (layout, dtype).");
  mod.def("supported_isas", [] {
    std::vector<std::string> out;
    for (const char* isa : {"avx512", "avx2", "generic"})
      if (gk::kernels_for(isa)) out.emplace_back(isa);
    return out;
  });
#ifdef GPT2KERN_CUDA
  mod.def("check_embedding_errors", &gk::cuda_ops::check_embedding_errors,
          "IndexError for a bad id that a finished CUDA embedding call found (no sync).");
  mod.def("capture_node_counts", &gk::cuda_ops::capture_node_counts,
          "Nodes of the graph the current CUDA stream is capturing, by type: kernel, memcpy, memset, other, total.");
  mod.def("set_cuda_pdl", &gk::cuda_ops::set_cuda_pdl, pybind11::arg("on"),
          "Programmatic dependent launch (sm_90+) for the CUDA kernels launched from now on; returns the previous "
          "setting.");
  mod.def(
      "cuda_variant", &gk::cuda_ops::cuda_variant, pybind11::arg("name"), pybind11::arg("value") = 0,
      "The numbered variant the prefill kernel `name` runs ('prefill_gemm', 'prefill_attention'); value > 0 sets it.");
#endif
  mod.def(
      "has_cuda",
      [] {
#ifdef GPT2KERN_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels (csrc/cuda) were compiled in and registered for the CUDA dispatch key.");
}
