// engine.cpp — GPT-2 decoding with one C++ call per step, for gpt2kern.generate.
//
// Engine owns a preallocated KV cache [layers][B][H][max_len][D] and every activation buffer, sized once, so a
// decode step allocates nothing and Python runs nothing per layer. forward(ids [B, T]) appends T tokens per row
// (T = prompt length at prefill, 1 when decoding) and returns the logits of each row's last token only, as
// generation needs. The per-step work is exactly the torch ops' (same kernels, same order of operations, see
// gpt2kern/model.py::_walk), so its logits equal the optimized model's.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "../common/checks.h"
#include "kernel_table.h"
#include "ops_cpu.h"

namespace gk::cpu {

namespace {

struct Layer {
  at::Tensor ln1_w, ln1_b, attn_w, attn_b, aproj_w, aproj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b;
  float scale;
};

const float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

class Engine {
 public:
  // layers: 12 tensors per layer in the order of struct Layer (matmul weights packed by gpt2kern.pack);
  // lm_w: packed [vocab] x [n_embd] head. batch / max_len fix the cache; max_rows bounds B·T of one forward.
  Engine(const std::vector<at::Tensor>& layers, const std::vector<double>& scales, at::Tensor wte, at::Tensor wpe,
         at::Tensor lnf_w, at::Tensor lnf_b, at::Tensor lm_w, int64_t vocab, int64_t n_head, double eps,
         int64_t batch, int64_t max_len, int64_t max_rows)
      : wte_(wte.contiguous()), wpe_(wpe.contiguous()), lnf_w_(lnf_w.contiguous()), lnf_b_(lnf_b.contiguous()),
        lm_w_(lm_w.contiguous()), V_(vocab), H_(n_head), eps_((float)eps), B_(batch), Tmax_(max_len),
        max_rows_(max_rows) {
    TORCH_CHECK_VALUE(layers.size() == 12 * scales.size() && !scales.empty(),
                      "gpt2kern.Engine: expected 12 weight tensors per layer");
    GK_CHECK_FLOAT(wte_, "Engine", "wte");
    GK_CHECK_DIM(wte_, 2, "Engine", "wte");
    E_ = wte_.size(1);
    TORCH_CHECK_VALUE(n_head > 0 && E_ % n_head == 0, "gpt2kern.Engine: n_embd ", E_, " is not divisible by n_head ",
                      n_head);
    D_ = E_ / H_;
    TORCH_CHECK_VALUE(batch >= 1 && max_len >= 1 && max_rows >= batch, "gpt2kern.Engine: bad sizes batch=", batch,
                      " max_len=", max_len, " max_rows=", max_rows);
    for (const auto& t : layers) {
      GK_CHECK_FLOAT(t, "Engine", "layer weight");
      TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "gpt2kern.Engine: layer weights must be "
                        "contiguous CPU tensors");
    }
    for (size_t l = 0; l < scales.size(); ++l) {
      const at::Tensor* w = &layers[12 * l];
      layers_.push_back(Layer{w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], w[11],
                              (float)scales[l]});
      check_packed(w[2], 3 * E_, "c_attn");
      check_packed(w[4], E_, "attn.c_proj");
      check_packed(w[10], E_, "mlp.c_proj");
      F_ = w[9].numel();
      check_packed(w[8], F_, "c_fc");
    }
    check_packed(lm_w_, V_, "lm_head");
    const int64_t L = (int64_t)layers_.size();
    auto f = wte_.options();
    k_ = at::zeros({L, B_, H_, Tmax_, D_}, f);
    v_ = at::zeros({L, B_, H_, Tmax_, D_}, f);
    key_mask_ = at::zeros({B_, Tmax_}, f.dtype(at::kBool));
    h_ = at::empty({max_rows_, E_}, f);
    x_ = at::empty({max_rows_, E_}, f);
    qkv_ = at::empty({max_rows_, 3 * E_}, f);
    att_ = at::empty({max_rows_, E_}, f);
    a_ = at::empty({max_rows_, E_}, f);
    fc_ = at::empty({max_rows_, F_}, f);
    last_ = at::empty({B_, E_}, f);
    logits_ = at::empty({B_, V_}, f);
  }

  // Append ids [B, T] at positions pos [B, T] (valid [B, T]: false = left padding); returns logits [B, vocab] of
  // each row's last token. The returned tensor is the engine's buffer: it is overwritten by the next call.
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& pos, const at::Tensor& valid) {
    GK_CHECK_DTYPE(ids, at::kLong, "Engine.forward", "ids");
    GK_CHECK_DTYPE(pos, at::kLong, "Engine.forward", "pos");
    GK_CHECK_DTYPE(valid, at::kBool, "Engine.forward", "valid");
    TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == B_ && ids.size(1) >= 1, "gpt2kern.Engine.forward: ids must "
                      "be [", B_, ", T >= 1], got ", ids.sizes());
    const int64_t T = ids.size(1), M = B_ * T;
    TORCH_CHECK_VALUE(pos.sizes() == ids.sizes() && valid.sizes() == ids.sizes(),
                      "gpt2kern.Engine.forward: pos and valid must have ids' shape ", ids.sizes());
    TORCH_CHECK_VALUE(M <= max_rows_, "gpt2kern.Engine.forward: ", M, " rows exceed the engine's max_rows ",
                      max_rows_);
    TORCH_CHECK_VALUE(len_ + T <= Tmax_, "gpt2kern.Engine.forward: cache holds ", Tmax_, " tokens; ", len_,
                      " used, ", T, " more requested");
    at::Tensor idc = ids.contiguous(), pc = pos.contiguous(), vc = valid.contiguous();
    const int64_t *pid = idc.data_ptr<int64_t>(), *pp = pc.data_ptr<int64_t>();
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK_INDEX(pid[i] >= 0 && pid[i] < wte_.size(0), "gpt2kern.Engine.forward: token id ", pid[i],
                        " outside the vocabulary [0, ", wte_.size(0), ")");
      TORCH_CHECK_INDEX(pp[i] >= 0 && pp[i] < wpe_.size(0), "gpt2kern.Engine.forward: position ", pp[i],
                        " outside [0, n_positions=", wpe_.size(0), ")");
    }
    bool* km = key_mask_.data_ptr<bool>();
    const bool* pv = vc.data_ptr<bool>();
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t t = 0; t < T; ++t) km[b * Tmax_ + len_ + t] = pv[b * T + t];

    const KernelTable& kt = kernels();
    const int64_t E = E_;
    float *h = h_.data_ptr<float>(), *x = x_.data_ptr<float>(), *qkv = qkv_.data_ptr<float>();
    float *att = att_.data_ptr<float>(), *a = a_.data_ptr<float>(), *fc = fc_.data_ptr<float>();
    const float *wte = f32(wte_), *wpe = f32(wpe_);
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / E), [&](int64_t r0, int64_t r1) {
      kt.embedding_rows(pid + r0, pp + r0, nullptr, wte, wpe, h + r0 * E, r1 - r0, E);
    });
    run_layer_norm(h, E, x, f32(layers_[0].ln1_w), f32(layers_[0].ln1_b), M, E, eps_);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      run_matmul(x, E, M, E, f32(L.attn_w), 3 * E, f32(L.attn_b), Epilogue::None, nullptr, 0, qkv);
      append_kv(l, qkv, T);
      AttnArgs args{};
      args.q = qkv; args.sq_b = T * 3 * E; args.sq_h = D_; args.sq_t = 3 * E;
      args.k = k_.data_ptr<float>() + l * B_ * H_ * Tmax_ * D_;
      args.v = v_.data_ptr<float>() + l * B_ * H_ * Tmax_ * D_;
      args.sk_b = args.sv_b = H_ * Tmax_ * D_; args.sk_h = args.sv_h = Tmax_ * D_; args.sk_t = args.sv_t = D_;
      args.out = att;
      args.B = B_; args.H = H_; args.Tq = T; args.Tkv = len_ + T; args.D = D_;
      args.key_mask = km; args.mask_len = Tmax_;
      args.scale = L.scale; args.q_offset = len_; args.causal = true;
      run_attention(args);
      run_matmul(att, E, M, E, f32(L.aproj_w), E, f32(L.aproj_b), Epilogue::None, nullptr, 0, a);
      run_add_layer_norm(a, E, h, E, h, x, f32(L.ln2_w), f32(L.ln2_b), M, E, eps_);
      run_matmul(x, E, M, E, f32(L.fc_w), F_, f32(L.fc_b), Epilogue::GeluNew, nullptr, 0, fc);
      run_matmul(fc, F_, M, F_, f32(L.mproj_w), E, f32(L.mproj_b), Epilogue::None, nullptr, 0, a);
      const bool last = l + 1 == layers_.size();
      const at::Tensor& nw = last ? lnf_w_ : layers_[l + 1].ln1_w;
      const at::Tensor& nb = last ? lnf_b_ : layers_[l + 1].ln1_b;
      if (last && T > 1) {  // only each row's last token reaches ln_f and the head
        float* lastp = last_.data_ptr<float>();
        for (int64_t b = 0; b < B_; ++b) {
          const int64_t r = b * T + T - 1;
          for (int64_t j = 0; j < E; ++j) lastp[b * E + j] = a[r * E + j];
          for (int64_t j = 0; j < E; ++j) h[b * E + j] = h[r * E + j];
        }
        run_add_layer_norm(lastp, E, h, E, h, x, f32(nw), f32(nb), B_, E, eps_);
      } else {
        run_add_layer_norm(a, E, h, E, h, x, f32(nw), f32(nb), M, E, eps_);
      }
    }
    run_matmul(x, E, B_, E, f32(lm_w_), V_, nullptr, Epilogue::None, nullptr, 0, logits_.data_ptr<float>());
    len_ += T;
    return logits_;
  }

  int64_t length() const { return len_; }
  void reset() {
    len_ = 0;
    key_mask_.zero_();
  }
  at::Tensor key_mask() const { return key_mask_; }

 private:
  void check_packed(const at::Tensor& w, int64_t n, const char* name) const {
    TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == (n + kPanel - 1) / kPanel && w.size(2) == kPanel,
                      "gpt2kern.Engine: ", name, " weight is not a packed [panels, K, ", kPanel, "] tensor for ", n,
                      " outputs; got ", w.sizes());
  }

  // K and V of the T new tokens (columns E..3E of qkv) into cache slots [len, len + T) of layer l.
  void append_kv(size_t l, const float* qkv, int64_t T) {
    const int64_t E = E_, D = D_, H = H_;
    float* kc = k_.data_ptr<float>() + l * B_ * H * Tmax_ * D;
    float* vc = v_.data_ptr<float>() + l * B_ * H * Tmax_ * D;
    at::parallel_for(0, B_ * H, std::max<int64_t>(1, 16384 / (T * D)), [&](int64_t p0, int64_t p1) {
      for (int64_t bh = p0; bh < p1; ++bh) {
        const int64_t b = bh / H, hh = bh % H;
        for (int64_t t = 0; t < T; ++t) {
          const float* src = qkv + (b * T + t) * 3 * E + hh * D;
          float* kd = kc + (bh * Tmax_ + len_ + t) * D;
          float* vd = vc + (bh * Tmax_ + len_ + t) * D;
          for (int64_t d = 0; d < D; ++d) kd[d] = src[E + d];
          for (int64_t d = 0; d < D; ++d) vd[d] = src[2 * E + d];
        }
      }
    });
  }

  std::vector<Layer> layers_;
  at::Tensor wte_, wpe_, lnf_w_, lnf_b_, lm_w_;
  int64_t V_, H_;
  float eps_;
  int64_t B_, Tmax_, max_rows_;
  int64_t E_ = 0, D_ = 0, F_ = 0, len_ = 0;
  at::Tensor k_, v_, key_mask_, h_, x_, qkv_, att_, a_, fc_, last_, logits_;
};

}  // namespace

void bind_engine(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Engine>(m, "Engine", "GPT-2 decode engine: preallocated KV cache, one C++ call per step.")
      .def(py::init<const std::vector<at::Tensor>&, const std::vector<double>&, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, at::Tensor, int64_t, int64_t, double, int64_t, int64_t, int64_t>(),
           py::arg("layers"), py::arg("scales"), py::arg("wte"), py::arg("wpe"), py::arg("lnf_w"), py::arg("lnf_b"),
           py::arg("lm_w"), py::arg("vocab"), py::arg("n_head"), py::arg("eps"), py::arg("batch"),
           py::arg("max_len"), py::arg("max_rows"))
      .def("forward", &Engine::forward, py::arg("ids"), py::arg("pos"), py::arg("valid"),
           py::call_guard<py::gil_scoped_release>())
      .def("reset", &Engine::reset)
      .def_property_readonly("length", &Engine::length)
      .def_property_readonly("key_mask", &Engine::key_mask);
}

}  // namespace gk::cpu
