// engine.cpp — the whole GPT-2 body in one C++ call: Engine (gpt2kern.generate's decoder) and Body (the
// optimized model's forward when HF's generate drives it).
//
// Stack holds the packed weights and runs embedding → blocks → ln_f with the same kernels in the same order as
// the per-op walk in gpt2kern/model/body.py::blocks, so all three paths give the same numbers. Only where K/V live
// differs:
// - Engine owns a preallocated KV cache [layers][B][H][max_len][D] and every activation buffer, sized once, so a
//   decode step allocates nothing; forward(ids [B, T]) appends T tokens per row and returns the logits of each
//   row's last token only, as generation needs.
// - Body.forward takes the past K/V HF's DynamicCache holds and returns the grown ones (what DynamicLayer.update's
//   torch.cat gives), so a decode step under model.generate is one call instead of ~150 dispatched ops.
#include <ATen/Parallel.h>
#include <algorithm>
#include <optional>
#include <string>
#include <torch/extension.h>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

namespace {

const float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

// The model record of gpt2kern/weights.py as C++ types (its to_c() methods build them, keyword arguments only, so
// two same-shaped tensors cannot trade places unnoticed). Each Linear checks itself against its format when it is
// made; Stack checks that the pieces fit one model.

at::ScalarType scalar_type_of(WType t) {
  switch (t) {
    case WType::F32: return at::kFloat;
    case WType::F16: return at::kHalf;
    case WType::BF16: return at::kBFloat16;
    case WType::I8: return at::kChar;
  }
  return at::kFloat;
}

void check_vec(const at::Tensor& t, int64_t n, const char* who, const std::string& name) {
  TORCH_CHECK_VALUE(t.defined(), "gpt2kern.", who, ": ", name, " is missing");
  GK_CHECK_FLOAT(t, who, name);
  TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "gpt2kern.", who, ": ", name,
                    " must be a contiguous CPU tensor");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == n, "gpt2kern.", who, ": ", name, " must be a vector of ", n,
                    " elements, got shape ", t.sizes());
}

// One matmul (n_in -> n_out) in its weight format (gpt2kern/weights.py's Linear): storage, int8's scales, the
// optional bias, and the checked reference the kernels read, made once here. name ("c_attn", ...) only labels
// the errors.
struct Linear {
  at::Tensor data;
  std::optional<at::Tensor> scales;
  at::Tensor bias;  // undefined: none
  std::string layout, dtype, name;
  int64_t n_in, n_out;
  WeightRef ref;

  Linear(at::Tensor data_, std::optional<at::Tensor> scales_, std::optional<at::Tensor> bias_, std::string layout_,
         std::string dtype_, int64_t n_in_, int64_t n_out_, int64_t group, std::string name_)
      : data(std::move(data_)), scales(std::move(scales_)), bias(bias_ ? *bias_ : at::Tensor()),
        layout(std::move(layout_)), dtype(std::move(dtype_)), name(std::move(name_)), n_in(n_in_), n_out(n_out_) {
    const char* who = "Linear";
    const std::string wname = name.empty() ? "weight" : name + " weight";
    TORCH_CHECK_VALUE(n_in >= 0 && n_out >= 0, "gpt2kern.Linear: ", wname, " must have n_in, n_out >= 0, got ", n_in,
                      " -> ", n_out);
    const Layout lay = parse_layout(layout, who);
    const WType type = parse_dtype(dtype, who);
    TORCH_CHECK_VALUE(data.defined(), "gpt2kern.Linear: ", wname, " is missing");
    TORCH_CHECK_TYPE(data.scalar_type() == scalar_type_of(type), "gpt2kern.Linear: ", wname, " is declared ", dtype,
                     " (", scalar_type_of(type), ") but holds ", data.scalar_type());
    ref = weight_ref(data, scales, lay, n_in, n_out, who, wname.c_str());
    TORCH_CHECK_VALUE(type != WType::I8 || ref.group == group, "gpt2kern.Linear: ", wname, "'s scales hold groups of ",
                      ref.group, " inputs, but its format says ", group);
    if (bias.defined()) check_vec(bias, n_out, who, name.empty() ? "bias" : name + ".bias");
  }
};

// One LayerNorm (gpt2kern/weights.py's Norm), with its own eps.
struct Norm {
  at::Tensor weight, bias;
  double eps;
};

// One block's weights, by name (gpt2kern/weights.py's Layer).
struct Layer {
  Norm ln_1;
  Linear c_attn, attn_proj;
  Norm ln_2;
  Linear c_fc, mlp_proj;
  double scale;
};

// The whole body and, for the decode engine, the head (gpt2kern/weights.py's Weights).
struct Model {
  std::vector<Layer> layers;
  at::Tensor wte, wpe;
  Norm ln_f;
  std::optional<Linear> lm_head;
  int64_t n_head;
};

// Activation buffers of one forward over M = B·T rows (dense rows).
struct Scratch {
  float *h, *x, *qkv, *att, *a, *fc;
};

// Where layer l's attention finds its keys and values, once the new tokens' K/V (in qkv) are stored.
struct KvView {
  const float *k, *v;
  int64_t s_b, s_h, s_t;  // strides of k and v (same layout), last dim contiguous
  int64_t Tkv;            // keys visible to the last query row
  const bool* key_mask;   // [B, mask_len] or null
  int64_t mask_len;
  int64_t q_offset;  // position of the first new token in the cache
};

// The GPT-2 body (embedding → blocks → ln_f) on packed weights, shared by the decode engine (its own
// preallocated cache) and Body.forward (the optimized model's forward over HF's DynamicCache). Both run the
// same kernels in the same order as gpt2kern/model/body.py::blocks, so all three give the same numbers.
class Stack {
 public:
  Stack(const Model& m, const char* who)
      : layers_(m.layers), wte_(m.wte.contiguous()), wpe_(m.wpe.contiguous()), ln_f_(m.ln_f), H_(m.n_head) {
    TORCH_CHECK_VALUE(!layers_.empty(), "gpt2kern.", who, ": the model has no layers");
    GK_CHECK_FLOAT(wte_, who, "wte");
    GK_CHECK_DIM(wte_, 2, who, "wte");
    GK_CHECK_FLOAT(wpe_, who, "wpe");
    E_ = wte_.size(1);
    TORCH_CHECK_VALUE(wpe_.dim() == 2 && wpe_.size(1) == E_, "gpt2kern.", who, ": wpe must be [n_positions, ", E_,
                      "], got ", wpe_.sizes());
    TORCH_CHECK_VALUE(H_ > 0 && E_ % H_ == 0, "gpt2kern.", who, ": n_embd ", E_, " is not divisible by n_head ", H_);
    D_ = E_ / H_;
    F_ = layers_[0].c_fc.n_out;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      check_norm(L.ln_1, who, "ln_1");
      check_norm(L.ln_2, who, "ln_2");
      check_linear(L.c_attn, E_, 3 * E_, who, l, "c_attn");
      check_linear(L.attn_proj, E_, E_, who, l, "attn.c_proj");
      check_linear(L.c_fc, E_, F_, who, l, "c_fc");
      check_linear(L.mlp_proj, F_, E_, who, l, "mlp.c_proj");
    }
    check_norm(ln_f_, who, "ln_f");
  }

  void check_norm(const Norm& n, const char* who, const std::string& name) const {
    check_vec(n.weight, E_, who, name + ".weight");
    check_vec(n.bias, E_, who, name + ".bias");
  }

  // A block's matmul in its slot: the slot's n_in -> n_out, with a bias (the Linear checked its own tensors).
  static void check_linear(const Linear& lin, int64_t k, int64_t n, const char* who, size_t l, const char* slot) {
    TORCH_CHECK_VALUE(lin.n_in == k && lin.n_out == n, "gpt2kern.", who, ": layer ", l, "'s ", slot, " must be a ", k,
                      " -> ", n, " Linear, got ", lin.n_in, " -> ", lin.n_out);
    TORCH_CHECK_VALUE(lin.bias.defined(), "gpt2kern.", who, ": layer ", l, "'s ", slot, " has no bias");
  }

  // ids / pos: M = B·T range-checked ids and positions, row-major [B, T].
  void check_ids(const int64_t* ids, const int64_t* pos, int64_t M, const char* who) const {
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK_INDEX(ids[i] >= 0 && ids[i] < wte_.size(0), "gpt2kern.", who, ": token id ", ids[i],
                        " outside the vocabulary [0, ", wte_.size(0), ")");
      TORCH_CHECK_INDEX(pos[i] >= 0 && pos[i] < wpe_.size(0), "gpt2kern.", who, ": position ", pos[i],
                        " outside [0, n_positions=", wpe_.size(0), ")");
    }
  }

  // Embedding, every block and ln_f for B·T rows. kv(l, qkv) stores layer l's new K/V and says where to attend.
  // last_only: only each row's last token goes through the final add+ln_f (its result in rows [0, B) of s.x).
  template <class KvFn>
  void run(const Scratch& s, const int64_t* ids, const int64_t* pos, int64_t B, int64_t T, KvFn&& kv,
           bool last_only) const {
    const KernelTable& kt = kernels();
    const int64_t E = E_, M = B * T;
    const float *wte = f32(wte_), *wpe = f32(wpe_);
    parallel_chunks(M, std::max<int64_t>(1, 16384 / E), [&](int64_t r0, int64_t r1) {
      kt.embedding_rows(ids + r0, pos + r0, nullptr, wte, wpe, s.h + r0 * E, r1 - r0, E);
    });
    const Norm& ln0 = layers_[0].ln_1;
    run_layer_norm(s.h, E, s.x, f32(ln0.weight), f32(ln0.bias), M, E, (float)ln0.eps);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      run_matmul(s.x, E, M, E, L.c_attn.ref, 3 * E, f32(L.c_attn.bias), Epilogue::None, nullptr, 0, s.qkv);
      attend(L, s.qkv, s.att, B, T, kv(l, s.qkv));
      run_matmul(s.att, E, M, E, L.attn_proj.ref, E, f32(L.attn_proj.bias), Epilogue::None, nullptr, 0, s.a);
      run_add_layer_norm(s.a, E, s.h, E, s.h, s.x, f32(L.ln_2.weight), f32(L.ln_2.bias), M, E, (float)L.ln_2.eps);
      run_matmul(s.x, E, M, E, L.c_fc.ref, F_, f32(L.c_fc.bias), Epilogue::GeluNew, nullptr, 0, s.fc);
      run_matmul(s.fc, F_, M, F_, L.mlp_proj.ref, E, f32(L.mlp_proj.bias), Epilogue::None, nullptr, 0, s.a);
      const bool last = l + 1 == layers_.size();
      const Norm& nx = last ? ln_f_ : layers_[l + 1].ln_1;
      if (last && last_only && T > 1) {  // only each row's last token reaches ln_f (and the head)
        for (int64_t b = 0; b < B; ++b) {
          const int64_t r = b * T + T - 1;
          std::copy(s.a + r * E, s.a + (r + 1) * E, s.a + b * E);
          std::copy(s.h + r * E, s.h + (r + 1) * E, s.h + b * E);
        }
        run_add_layer_norm(s.a, E, s.h, E, s.h, s.x, f32(nx.weight), f32(nx.bias), B, E, (float)nx.eps);
      } else {
        run_add_layer_norm(s.a, E, s.h, E, s.h, s.x, f32(nx.weight), f32(nx.bias), M, E, (float)nx.eps);
      }
    }
  }

  // Causal attention of T new tokens per row (queries in qkv, rows [b][t], 3E apart) over the keys c describes,
  // into out ([B·T, E]).
  void attend(const Layer& L, const float* qkv, float* out, int64_t B, int64_t T, const KvView& c) const {
    const int64_t E = E_;
    AttnArgs args{};
    args.q = qkv;
    args.sq_b = T * 3 * E;
    args.sq_h = D_;
    args.sq_t = 3 * E;
    args.k = c.k;
    args.v = c.v;
    args.sk_b = args.sv_b = c.s_b;
    args.sk_h = args.sv_h = c.s_h;
    args.sk_t = args.sv_t = c.s_t;
    args.out = out;
    args.B = B;
    args.H = H_;
    args.Tq = T;
    args.Tkv = c.Tkv;
    args.D = D_;
    args.key_mask = c.key_mask;
    args.mask_len = c.mask_len;
    args.scale = (float)L.scale;
    args.q_offset = c.q_offset;
    args.causal = true;
    run_attention(args);
  }

  // T tokens per row as T decode steps in one pass over the weights (speculative decoding's verify): rows in [t][b]
  // order, and every op runs once per position t on that position's B rows with exactly the arguments a T = 1
  // forward passes it (the matmuls through run_matmul_steps, which reads a weight once for all positions where it
  // can). The kernels' sums depend on a call's row count (matmul tiles, K blocks), so only this makes each row's
  // numbers bit-identical to T successive single-token forwards. kv(l, t, qkv_t) stores position t's K/V (B rows) and
  // says where its query attends. Leaves position t's ln_f output in rows [t·B, t·B + B) of s.x.
  template <class KvFn>
  void run_steps(const Scratch& s, const int64_t* ids, const int64_t* pos, int64_t B, int64_t T, KvFn&& kv) const {
    const KernelTable& kt = kernels();
    const int64_t E = E_;
    const float *wte = f32(wte_), *wpe = f32(wpe_);
    auto each = [&](auto&& f) {
      for (int64_t t = 0; t < T; ++t) f(t, t * B);
    };
    each([&](int64_t, int64_t o) {
      parallel_chunks(B, std::max<int64_t>(1, 16384 / E), [&](int64_t r0, int64_t r1) {
        kt.embedding_rows(ids + o + r0, pos + o + r0, nullptr, wte, wpe, s.h + (o + r0) * E, r1 - r0, E);
      });
    });
    const Norm& ln0 = layers_[0].ln_1;
    each([&](int64_t, int64_t o) {
      run_layer_norm(s.h + o * E, E, s.x + o * E, f32(ln0.weight), f32(ln0.bias), B, E, (float)ln0.eps);
    });
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      run_matmul_steps(s.x, E, T, B, E, L.c_attn.ref, 3 * E, f32(L.c_attn.bias), Epilogue::None, s.qkv);
      each([&](int64_t t, int64_t o) {
        attend(L, s.qkv + o * 3 * E, s.att + o * E, B, 1, kv(l, t, s.qkv + o * 3 * E));
      });
      run_matmul_steps(s.att, E, T, B, E, L.attn_proj.ref, E, f32(L.attn_proj.bias), Epilogue::None, s.a);
      each([&](int64_t, int64_t o) {
        run_add_layer_norm(s.a + o * E, E, s.h + o * E, E, s.h + o * E, s.x + o * E, f32(L.ln_2.weight),
                           f32(L.ln_2.bias), B, E, (float)L.ln_2.eps);
      });
      run_matmul_steps(s.x, E, T, B, E, L.c_fc.ref, F_, f32(L.c_fc.bias), Epilogue::GeluNew, s.fc);
      run_matmul_steps(s.fc, F_, T, B, F_, L.mlp_proj.ref, E, f32(L.mlp_proj.bias), Epilogue::None, s.a);
      const Norm& nx = l + 1 == layers_.size() ? ln_f_ : layers_[l + 1].ln_1;
      each([&](int64_t, int64_t o) {
        run_add_layer_norm(s.a + o * E, E, s.h + o * E, E, s.h + o * E, s.x + o * E, f32(nx.weight), f32(nx.bias), B, E,
                           (float)nx.eps);
      });
    }
  }

  // The K and V of T new tokens (columns E..3E of qkv) into rows [t0, t0 + T) of k, v ([B][H][rows][D], strides
  // s_b, s_h, s_t).
  void store_kv(const float* qkv, int64_t B, int64_t T, float* k, float* v, int64_t s_b, int64_t s_h, int64_t s_t,
                int64_t t0) const {
    const int64_t E = E_, D = D_, H = H_;
    parallel_chunks(B * H, std::max<int64_t>(1, 16384 / (T * D)), [&](int64_t p0, int64_t p1) {
      for (int64_t bh = p0; bh < p1; ++bh) {
        const int64_t b = bh / H, hh = bh % H;
        for (int64_t t = 0; t < T; ++t) {
          const float* src = qkv + (b * T + t) * 3 * E + hh * D;
          float* kd = k + b * s_b + hh * s_h + (t0 + t) * s_t;
          float* vd = v + b * s_b + hh * s_h + (t0 + t) * s_t;
          std::copy(src + E, src + E + D, kd);
          std::copy(src + 2 * E, src + 2 * E + D, vd);
        }
      }
    });
  }

  std::vector<Layer> layers_;
  at::Tensor wte_, wpe_;
  Norm ln_f_;
  int64_t H_;
  int64_t E_ = 0, D_ = 0, F_ = 0;
};

// The optimized model's forward body over HF's DynamicCache: forward(ids, pos, attention_mask, past_k, past_v,
// append) takes each layer's cached keys/values [B, H, P, D] and returns (ln_f output [B, T, E], keys, values) with the
// layers' [B, H, P + T, D] keys and values — what DynamicLayer.update's torch.cat would give — so the whole body is
// one C++ call instead of ~150 Python-dispatched ops per step. pos None: positions P .. P + T − 1. attention_mask:
// HF's 2-D [B, >= P + T] mask (nonzero = attend; bool, int or float), or None. past_k = past_v = None: no cache
// (keys and values are read where c_attn wrote them and not returned). Everything a step needs besides the
// cache is done here rather than in Python, because after streaming the weights every cache is cold and each
// Python-level torch call costs tens of µs.
//
// The returned keys/values are views into buffers with room to grow (capacity P + T + max(64, (P + T) / 4)
// tokens). append[l] says layer l's past tensors are the very views this returned last time for that cache layer
// (the caller tracks that), so no view anyone holds reaches past P: the new tokens are then written in place and
// a longer view returned — no copy of the past and no new cache block per step (the step's small activations are
// still allocated), where torch.cat copies everything and allocates a slightly larger block each step (which glibc
// serves with a fresh mmap, page faults and munmap). Anything else (a cropped, reordered or user-made cache) is copied
// into a new buffer, as torch.cat would.
class Body {
 public:
  explicit Body(const Model& model) : st_(model, "Body") {}

  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> forward(
      const at::Tensor& ids, const std::optional<at::Tensor>& pos_, const std::optional<at::Tensor>& attention_mask,
      const std::optional<std::vector<at::Tensor>>& past_k_, const std::optional<std::vector<at::Tensor>>& past_v_,
      const std::vector<bool>& append) const {
    const char* who = "Body.forward";
    TORCH_CHECK_VALUE(past_k_.has_value() == past_v_.has_value(),
                      "gpt2kern.Body.forward: past_k and past_v must "
                      "both be None or both be lists");
    const bool keep = past_k_.has_value();  // a cache: return the grown keys/values
    static const std::vector<at::Tensor> none;
    const std::vector<at::Tensor>& past_k = keep ? *past_k_ : none;
    const std::vector<at::Tensor>& past_v = keep ? *past_v_ : none;
    GK_CHECK_DTYPE(ids, at::kLong, who, "ids");
    TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) >= 1 && ids.size(1) >= 1,
                      "gpt2kern.Body.forward: ids must be "
                      "[B >= 1, T >= 1], got ",
                      ids.sizes());
    TORCH_CHECK_VALUE(ids.device().is_cpu(), "gpt2kern.Body.forward: ids must be a CPU tensor");
    if (pos_) {
      GK_CHECK_DTYPE(*pos_, at::kLong, who, "pos");
      TORCH_CHECK_VALUE(pos_->sizes() == ids.sizes() && pos_->device().is_cpu(),
                        "gpt2kern.Body.forward: pos must "
                        "be a CPU tensor of ids' shape ",
                        ids.sizes(), ", got ", pos_->sizes());
    }
    const int64_t B = ids.size(0), T = ids.size(1), M = B * T, E = st_.E_, H = st_.H_, D = st_.D_;
    const int64_t L = (int64_t)st_.layers_.size();
    TORCH_CHECK_VALUE(past_k.size() == past_v.size() && (past_k.empty() || (int64_t)past_k.size() == L),
                      "gpt2kern.Body.forward: past_k and past_v must both be empty or hold ", L, " layers, got ",
                      past_k.size(), " and ", past_v.size());
    TORCH_CHECK_VALUE(append.empty() || append.size() == past_k.size(),
                      "gpt2kern.Body.forward: append must be "
                      "empty or have one entry per layer of past_k (",
                      past_k.size(), "), got ", append.size());
    int64_t P = 0;
    if (!past_k.empty()) P = past_k[0].dim() == 4 ? past_k[0].size(2) : -1;
    at::Tensor km;  // [B, mask_len] bool, or undefined when every position may be attended
    if (attention_mask) {
      const at::Tensor& m = *attention_mask;
      const auto dt = m.scalar_type();
      TORCH_CHECK_TYPE(dt == at::kBool || dt == at::kLong || dt == at::kInt || dt == at::kFloat,
                       "gpt2kern.Body.forward: attention_mask must be bool, int64, int32 or float32, got ", dt);
      TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.device().is_cpu(),
                        "gpt2kern.Body.forward: "
                        "attention_mask must be a CPU [batch ",
                        B, ", kv_len] tensor, got ", m.sizes());
      TORCH_CHECK_VALUE(m.size(1) >= P + T, "attention_mask covers ", m.size(1), " positions but past (", P,
                        ") + input (", T, ") = ", P + T);
      km = (dt == at::kBool ? m : m.ne(0)).contiguous();
      const bool* pm = km.data_ptr<bool>();
      if (std::all_of(pm, pm + km.numel(), [](bool b) { return b; })) km = at::Tensor();
    }
    for (size_t l = 0; l < past_k.size(); ++l)
      for (const at::Tensor* t : {&past_k[l], &past_v[l]}) {
        GK_CHECK_FLOAT(*t, who, "past_k/past_v");
        TORCH_CHECK_VALUE(t->device().is_cpu(), "gpt2kern.Body.forward: past keys/values must be CPU tensors");
        TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == P && t->size(3) == D,
                          "gpt2kern.Body.forward: past_key_values does not fit this call: layer ", l,
                          " holds keys/values of shape ", t->sizes(), ", expected [batch ", B, ", heads ", H, ", ", P,
                          ", head size ", D, "]");
      }
    at::Tensor idc = ids.contiguous(), pc;
    if (pos_) {
      pc = pos_->contiguous();
    } else {
      pc = at::empty({B, T}, idc.options());
      int64_t* pp = pc.data_ptr<int64_t>();
      for (int64_t i = 0; i < M; ++i) pp[i] = P + i % T;
    }
    st_.check_ids(idc.data_ptr<int64_t>(), pc.data_ptr<int64_t>(), M, "Body.forward");

    auto f = st_.wte_.options();
    at::Tensor x = at::empty({B, T, E}, f), buf = at::empty({M * (6 * E + st_.F_)}, f);
    float* p = buf.data_ptr<float>();  // h, qkv, att, a, fc
    const Scratch s{p, x.data_ptr<float>(), p + M * E, p + 4 * M * E, p + 5 * M * E, p + 6 * M * E};
    std::vector<at::Tensor> ks(keep ? L : 0), vs(keep ? L : 0);
    const int64_t n = P + T, cap = n + std::max<int64_t>(64, n / 4);
    // a view this returned: [B, H, n, D] over a [B, H, cap', D] buffer it starts, with room for n tokens
    auto grows_in_place = [&](const at::Tensor& t) {
      const int64_t c = t.stride(1) / D;
      return t.stride(3) == 1 && t.stride(2) == D && t.stride(1) == c * D && c >= n && t.stride(0) == H * c * D &&
             t.storage_offset() == 0 && t.storage().nbytes() >= (size_t)(B * H * c * D) * sizeof(float);
    };
    auto grown = [&](const at::Tensor& past, bool in_place) {
      if (in_place) return past.as_strided({B, H, n, D}, past.strides());
      at::Tensor t = at::empty({B, H, cap, D}, f).narrow(2, 0, n);
      if (P > 0) t.narrow(2, 0, P).copy_(past);  // the cached part, as torch.cat would copy it
      return t;
    };
    const bool* kmp = km.defined() ? km.data_ptr<bool>() : nullptr;
    const int64_t kml = km.defined() ? km.size(1) : 0;
    auto kv = [&](size_t l, const float* qkv) {
      if (!keep)  // attend to the K/V columns of qkv in place
        return KvView{qkv + E, qkv + 2 * E, T * 3 * E, D, 3 * E, T, kmp, kml, 0};
      const bool in_place = P > 0 && !append.empty() && append[l] && grows_in_place(past_k[l]) &&
                            grows_in_place(past_v[l]) && past_k[l].strides() == past_v[l].strides();
      ks[l] = grown(P > 0 ? past_k[l] : at::Tensor(), in_place);
      vs[l] = grown(P > 0 ? past_v[l] : at::Tensor(), in_place);
      float *k = ks[l].data_ptr<float>(), *v = vs[l].data_ptr<float>();
      const int64_t sb = ks[l].stride(0), sh = ks[l].stride(1);
      st_.store_kv(qkv, B, T, k, v, sb, sh, D, P);
      return KvView{k, v, sb, sh, D, n, kmp, kml, P};
    };
    st_.run(s, idc.data_ptr<int64_t>(), pc.data_ptr<int64_t>(), B, T, kv, /*last_only=*/false);
    return {x, ks, vs};
  }

 private:
  Stack st_;
};

// The calling thread's int8 dot-product mode for one Engine call (-1: leaves the process's in force).
struct ThreadInt8Dot {
  int saved;
  explicit ThreadInt8Dot(int mode) : saved(exchange_thread_int8_dot(mode)) {}
  ~ThreadInt8Dot() { exchange_thread_int8_dot(saved); }
};

class Engine {
 public:
  // model.lm_head: the [n_embd] -> [vocab] head in any weight format (in place over wte: layout 'nk'). batch /
  // max_len fix the cache; max_rows bounds B·T of one forward.
  Engine(const Model& model, int64_t batch, int64_t max_len, int64_t max_rows)
      : st_(model, "Engine"), B_(batch), Tmax_(max_len), max_rows_(max_rows) {
    TORCH_CHECK_VALUE(batch >= 1 && max_len >= 1 && max_rows >= batch, "gpt2kern.Engine: bad sizes batch=", batch,
                      " max_len=", max_len, " max_rows=", max_rows);
    TORCH_CHECK_VALUE(model.lm_head.has_value(), "gpt2kern.Engine: the decode engine needs the model's lm_head");
    lm_head_.emplace(*model.lm_head);
    TORCH_CHECK_VALUE(lm_head_->n_in == st_.E_, "gpt2kern.Engine: lm_head must be a ", st_.E_, " -> vocab Linear, got ",
                      lm_head_->n_in, " -> ", lm_head_->n_out);
    V_ = lm_head_->n_out;
    const int64_t L = (int64_t)st_.layers_.size(), E = st_.E_, H = st_.H_, D = st_.D_;
    auto f = st_.wte_.options();
    k_ = at::zeros({L, B_, H, Tmax_, D}, f);
    v_ = at::zeros({L, B_, H, Tmax_, D}, f);
    key_mask_ = at::zeros({B_, Tmax_}, f.dtype(at::kBool));
    buf_ = at::empty({max_rows_ * (7 * E + st_.F_)}, f);
    logits_ = at::empty({B_, V_}, f);
    all_logits_ = at::empty({0, V_}, f);
  }

  // Append ids [B, T] at positions pos [B, T] (valid [B, T]: false = left padding); returns logits [B, vocab] of
  // each row's last token. The returned tensor is the engine's buffer: it is overwritten by the next call.
  // threads > 0: the kernels of this call use at most that many threads (generate's per-step choice, see
  // gpt2kern/generate.py's ThreadChooser); 0: torch's count.
  //
  // all_logits: the logits of every token, [B, T, vocab] (a view of the engine's buffer, also overwritten by the next
  // call), each bit-identical to what T successive T = 1 forwards return for it (Stack::run_steps) — speculative
  // decoding's verify step.
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& pos, const at::Tensor& valid, int64_t threads,
                     bool all_logits) {
    TORCH_CHECK_VALUE(threads >= 0, "gpt2kern.Engine.forward: threads must be >= 0 (0: torch's count), got ", threads);
    const ThreadCap cap(threads);
    const ThreadInt8Dot dot(int8_dot_);
    GK_CHECK_DTYPE(ids, at::kLong, "Engine.forward", "ids");
    GK_CHECK_DTYPE(pos, at::kLong, "Engine.forward", "pos");
    GK_CHECK_DTYPE(valid, at::kBool, "Engine.forward", "valid");
    TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == B_ && ids.size(1) >= 1,
                      "gpt2kern.Engine.forward: ids must "
                      "be [",
                      B_, ", T >= 1], got ", ids.sizes());
    const int64_t T = ids.size(1), M = B_ * T, E = st_.E_, H = st_.H_, D = st_.D_;
    TORCH_CHECK_VALUE(pos.sizes() == ids.sizes() && valid.sizes() == ids.sizes(),
                      "gpt2kern.Engine.forward: pos and valid must have ids' shape ", ids.sizes());
    TORCH_CHECK_VALUE(M <= max_rows_, "gpt2kern.Engine.forward: ", M, " rows exceed the engine's max_rows ", max_rows_);
    TORCH_CHECK_VALUE(len_ + T <= Tmax_, "gpt2kern.Engine.forward: cache holds ", Tmax_, " tokens; ", len_, " used, ",
                      T, " more requested");
    at::Tensor idc = ids.contiguous(), pc = pos.contiguous(), vc = valid.contiguous();
    st_.check_ids(idc.data_ptr<int64_t>(), pc.data_ptr<int64_t>(), M, "Engine.forward");
    bool* km = key_mask_.data_ptr<bool>();
    const bool* pv = vc.data_ptr<bool>();
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t t = 0; t < T; ++t) km[b * Tmax_ + len_ + t] = pv[b * T + t];

    float* p = buf_.data_ptr<float>();
    const int64_t R = max_rows_;
    const Scratch s{p, p + R * E, p + 2 * R * E, p + 5 * R * E, p + 6 * R * E, p + 7 * R * E};  // h x qkv att a fc
    if (all_logits) return forward_steps(idc, pc, s);
    const int64_t sb = H * Tmax_ * D, sh = Tmax_ * D;
    auto kv = [&](size_t l, const float* qkv) {
      float* k = k_.data_ptr<float>() + l * B_ * sb;
      float* v = v_.data_ptr<float>() + l * B_ * sb;
      st_.store_kv(qkv, B_, T, k, v, sb, sh, D, len_);
      return KvView{k, v, sb, sh, D, len_ + T, km, Tmax_, len_};
    };
    st_.run(s, idc.data_ptr<int64_t>(), pc.data_ptr<int64_t>(), B_, T, kv, /*last_only=*/true);
    run_matmul(s.x, E, B_, E, lm_head_->ref, V_, lm_head_->bias.defined() ? f32(lm_head_->bias) : nullptr,
               Epilogue::None, nullptr, 0, logits_.data_ptr<float>());
    len_ += T;
    return logits_;
  }

  // forward(all_logits=True) past the checks and the key mask: ids, pos [B, T] contiguous and checked.
  at::Tensor forward_steps(const at::Tensor& ids, const at::Tensor& pos, const Scratch& s) {
    const int64_t T = ids.size(1), M = B_ * T, E = st_.E_, H = st_.H_, D = st_.D_;
    bool* km = key_mask_.data_ptr<bool>();
    // ids and positions in [t][b] order: position t's B rows adjacent, as one decode step's
    at::Tensor it = ids.t().contiguous(), pt = pos.t().contiguous();
    const int64_t sb = H * Tmax_ * D, sh = Tmax_ * D;
    auto kv = [&](size_t l, int64_t t, const float* qkv_t) {
      float* k = k_.data_ptr<float>() + l * B_ * sb;
      float* v = v_.data_ptr<float>() + l * B_ * sb;
      st_.store_kv(qkv_t, B_, 1, k, v, sb, sh, D, len_ + t);
      return KvView{k, v, sb, sh, D, len_ + t + 1, km, Tmax_, len_ + t};
    };
    st_.run_steps(s, it.data_ptr<int64_t>(), pt.data_ptr<int64_t>(), B_, T, kv);
    if (all_logits_.size(0) < M) all_logits_ = at::empty({M, V_}, logits_.options());
    float* out = all_logits_.data_ptr<float>();
    const float* bias = lm_head_->bias.defined() ? f32(lm_head_->bias) : nullptr;
    const WeightRef& W = lm_head_->ref;
    // The head: per position on its B rows, as a decode step runs it — or several positions in one call where the
    // strategy of both row counts is nk_decode, whose every output is one dot product summed in the same order
    // whatever the call's rows (csrc/cpu/kernels/matmul_nt.h), so the lm_head's weights stream once.
    const bool bd = bf16_dot() != nullptr;
    int64_t per = 1;  // positions per call
    auto strategy = [&](int64_t rows) {
      return choose_matmul(W.layout, W.type, rows, W.group, bd, int8_dot(rows) != nullptr);
    };
    if (strategy(B_) == MatmulStrategy::NkDecode)
      while (per < T && strategy((per + 1) * B_) == MatmulStrategy::NkDecode) ++per;
    for (int64_t t0 = 0; t0 < T; t0 += per) {
      const int64_t n = std::min(per, T - t0);
      run_matmul(s.x + t0 * B_ * E, E, n * B_, E, W, V_, bias, Epilogue::None, nullptr, 0, out + t0 * B_ * V_);
    }
    len_ += T;
    return all_logits_.narrow(0, 0, M).view({T, B_, V_}).transpose(0, 1);
  }

  int64_t length() const { return len_; }
  // The int8 dot-product switch for this engine's calls (an Int8DotMode as int; -1: the process's setting).
  int int8_dot_setting() const { return int8_dot_; }
  void set_int8_dot_setting(int mode) {
    TORCH_CHECK_VALUE(mode >= -1 && mode <= 2, "gpt2kern.Engine.int8_dot: mode must be -1, 0, 1 or 2, got ", mode);
    int8_dot_ = mode;
  }
  void reset() {
    len_ = 0;
    key_mask_.zero_();
  }
  // Forget every token past the first `length` (speculative decoding's rollback): their K/V stay in the cache and
  // are overwritten by the next forward, which attends to keys [0, length + T) only.
  void truncate(int64_t length) {
    TORCH_CHECK_VALUE(length >= 0 && length <= len_, "gpt2kern.Engine.truncate: length must be in [0, ", len_,
                      "], got ", length);
    key_mask_.narrow(1, length, Tmax_ - length).zero_();
    len_ = length;
  }
  at::Tensor key_mask() const { return key_mask_; }

  // The first `length` cached tokens of another engine of the same shape (layers, batch, heads, head size) as this
  // one's whole cache: speculative decoding's draft takes the model's prompt K/V this way instead of a prefill of
  // its own (a draft may attend to any keys; the model's are the better ones).
  void copy_cache(const Engine& other, int64_t length) {
    TORCH_CHECK_VALUE(other.k_.dim() == 5 && k_.size(0) == other.k_.size(0) && k_.size(1) == other.k_.size(1) &&
                          k_.size(2) == other.k_.size(2) && k_.size(4) == other.k_.size(4),
                      "gpt2kern.Engine.copy_cache: the other engine's cache ", other.k_.sizes(),
                      " has another shape than this one's ", k_.sizes(), " (layers, batch, heads, -, head size)");
    TORCH_CHECK_VALUE(length >= 0 && length <= other.len_ && length <= Tmax_,
                      "gpt2kern.Engine.copy_cache: length must ", "be in [0, ", std::min(other.len_, Tmax_),
                      "] (the other engine holds ", other.len_, " tokens, this one has room for ", Tmax_, "), got ",
                      length);
    k_.narrow(3, 0, length).copy_(other.k_.narrow(3, 0, length));
    v_.narrow(3, 0, length).copy_(other.v_.narrow(3, 0, length));
    key_mask_.zero_();
    key_mask_.narrow(1, 0, length).copy_(other.key_mask_.narrow(1, 0, length));
    len_ = length;
  }

 private:
  Stack st_;
  std::optional<Linear> lm_head_;
  int64_t V_ = 0;
  int64_t B_, Tmax_, max_rows_;
  int64_t len_ = 0;
  int int8_dot_ = -1;
  at::Tensor k_, v_, key_mask_, buf_, logits_, all_logits_;
};

}  // namespace

void bind_engine(pybind11::module_& m) {
  namespace py = pybind11;
  // keyword arguments only: every field by name
  py::class_<Linear>(m, "Linear", "One matmul in its weight format, checked when made (built by weights.Linear).")
      .def(py::init<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::string, std::string, int64_t,
                    int64_t, int64_t, std::string>(),
           py::kw_only(), py::arg("data"), py::arg("scales"), py::arg("bias"), py::arg("layout"), py::arg("dtype"),
           py::arg("n_in"), py::arg("n_out"), py::arg("group") = 0, py::arg("name") = "")
      .def_readonly("data", &Linear::data)
      .def_readonly("layout", &Linear::layout)
      .def_readonly("dtype", &Linear::dtype)
      .def_readonly("n_in", &Linear::n_in)
      .def_readonly("n_out", &Linear::n_out);
  py::class_<Norm>(m, "Norm", "One LayerNorm: weight, bias, eps (built by weights.Norm).")
      .def(py::init([](at::Tensor weight, at::Tensor bias, double eps) { return Norm{weight, bias, eps}; }),
           py::kw_only(), py::arg("weight"), py::arg("bias"), py::arg("eps"))
      .def_readonly("eps", &Norm::eps);
  py::class_<Layer>(m, "Layer", "One block's weights by name (built by weights.Layer).")
      .def(py::init([](Norm ln_1, Linear c_attn, Linear attn_proj, Norm ln_2, Linear c_fc, Linear mlp_proj,
                       double scale) { return Layer{ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj, scale}; }),
           py::kw_only(), py::arg("ln_1"), py::arg("c_attn"), py::arg("attn_proj"), py::arg("ln_2"), py::arg("c_fc"),
           py::arg("mlp_proj"), py::arg("scale"))
      .def_readonly("scale", &Layer::scale);
  py::class_<Model>(m, "Model", "The body's weights and the optional lm_head (built by weights.Weights).")
      .def(py::init(
               [](std::vector<Layer> layers, at::Tensor wte, at::Tensor wpe, Norm ln_f, std::optional<Linear> lm_head,
                  int64_t n_head) { return Model{std::move(layers), wte, wpe, ln_f, std::move(lm_head), n_head}; }),
           py::kw_only(), py::arg("layers"), py::arg("wte"), py::arg("wpe"), py::arg("ln_f"), py::arg("lm_head"),
           py::arg("n_head"))
      .def_property_readonly("n_layer", [](const Model& m) { return m.layers.size(); });
  py::class_<Engine>(m, "Engine", "GPT-2 decode engine: preallocated KV cache, one C++ call per step.")
      .def(py::init<const Model&, int64_t, int64_t, int64_t>(), py::arg("model"), py::arg("batch"), py::arg("max_len"),
           py::arg("max_rows"))
      .def("forward", &Engine::forward, py::arg("ids"), py::arg("pos"), py::arg("valid"), py::arg("threads") = 0,
           py::arg("all_logits") = false, py::call_guard<py::gil_scoped_release>())
      .def("reset", &Engine::reset)
      .def("truncate", &Engine::truncate, py::arg("length"))
      .def("copy_cache", &Engine::copy_cache, py::arg("other"), py::arg("length"))
      .def_property_readonly("length", &Engine::length)
      .def_property(
          "int8_dot",
          [](const Engine& e) -> std::optional<bool> {
            if (e.int8_dot_setting() < 0 || e.int8_dot_setting() == (int)Int8DotMode::Auto) return std::nullopt;
            return e.int8_dot_setting() == (int)Int8DotMode::On;
          },
          [](Engine& e, std::optional<bool> on) {
            e.set_int8_dot_setting(on ? (int)(*on ? Int8DotMode::On : Int8DotMode::Off) : -1);
          },
          "int8 weights x int8 activations for this engine's calls: True / False, or None (the process's "
          "setting, ops.set_int8_dot)")
      .def_property_readonly("key_mask", &Engine::key_mask);
  py::class_<Body>(m, "Body", "GPT-2 body (embedding, blocks, ln_f) in one call, over DynamicCache-style past K/V.")
      .def(py::init<const Model&>(), py::arg("model"))
      .def("forward", &Body::forward, py::arg("ids"), py::arg("pos"), py::arg("attention_mask"), py::arg("past_k"),
           py::arg("past_v"), py::arg("append") = std::vector<bool>(), py::call_guard<py::gil_scoped_release>());
}

}  // namespace gk::cpu
