// engine.cpp — the whole GPT-2 body in one C++ call: Engine (gpt2kern.generate's decoder) and Body (the
// optimized model's forward when HF's generate drives it).
//
// Stack holds the packed weights and runs embedding → blocks → ln_f with the same kernels in the same order as
// the per-op walk in gpt2kern/model.py::_walk, so all three paths give the same numbers. Only where K/V live
// differs:
// - Engine owns a preallocated KV cache [layers][B][H][max_len][D] and every activation buffer, sized once, so a
//   decode step allocates nothing; forward(ids [B, T]) appends T tokens per row and returns the logits of each
//   row's last token only, as generation needs.
// - Body.forward takes the past K/V HF's DynamicCache holds and returns the grown ones (what DynamicLayer.update's
//   torch.cat gives), so a decode step under model.generate is one call instead of ~150 dispatched ops.
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/extension.h>

#include "../common/checks.h"
#include "kernel_table.h"
#include "ops_cpu.h"
#include "parallel.h"

namespace gk::cpu {

namespace {

const float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

// One matmul weight in the one weight format (gpt2kern/weights.py's Linear.to_c): its storage, int8's scales, and
// the layout name; weight_ref (matmul.cpp) reads and checks it.
struct Weight {
  at::Tensor data;
  std::optional<at::Tensor> scales;
  std::string layout;
  WeightRef ref(int64_t k, int64_t n, const char* who, const char* name) const {
    return weight_ref(data, scales, parse_layout(layout, who), k, n, who, name);
  }
};

// One block's weights, by name (gpt2kern/weights.py's Layer builds it with keyword arguments only, so two
// same-shaped tensors cannot trade places unnoticed): LayerNorm vectors, matmul weights.
struct LayerWeights {
  at::Tensor ln_1_weight, ln_1_bias;
  Weight c_attn_weight;
  at::Tensor c_attn_bias;
  Weight attn_proj_weight;
  at::Tensor attn_proj_bias, ln_2_weight, ln_2_bias;
  Weight c_fc_weight;
  at::Tensor c_fc_bias;
  Weight mlp_proj_weight;
  at::Tensor mlp_proj_bias;
  double scale;
  // the four matmuls' checked references, filled by Stack
  WeightRef c_attn, attn_proj, c_fc, mlp_proj;
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
  int64_t q_offset;       // position of the first new token in the cache
};

// The GPT-2 body (embedding → blocks → ln_f) on packed weights, shared by the decode engine (its own
// preallocated cache) and Body.forward (the optimized model's forward over HF's DynamicCache). Both run the
// same kernels in the same order as gpt2kern/model.py::_walk, so all three give the same numbers.
class Stack {
 public:
  Stack(const std::vector<LayerWeights>& layers, at::Tensor wte, at::Tensor wpe, at::Tensor lnf_w, at::Tensor lnf_b,
        int64_t n_head, double eps, const char* who)
      : layers_(layers), wte_(wte.contiguous()), wpe_(wpe.contiguous()), lnf_w_(lnf_w.contiguous()),
        lnf_b_(lnf_b.contiguous()), H_(n_head), eps_((float)eps) {
    TORCH_CHECK_VALUE(!layers.empty(), "gpt2kern.", who, ": the model has no layers");
    GK_CHECK_FLOAT(wte_, who, "wte");
    GK_CHECK_DIM(wte_, 2, who, "wte");
    GK_CHECK_FLOAT(wpe_, who, "wpe");
    E_ = wte_.size(1);
    TORCH_CHECK_VALUE(wpe_.dim() == 2 && wpe_.size(1) == E_, "gpt2kern.", who, ": wpe must be [n_positions, ", E_,
                      "], got ", wpe_.sizes());
    TORCH_CHECK_VALUE(n_head > 0 && E_ % n_head == 0, "gpt2kern.", who, ": n_embd ", E_,
                      " is not divisible by n_head ", n_head);
    D_ = E_ / H_;
    F_ = layers[0].c_fc_bias.defined() ? layers[0].c_fc_bias.numel() : 0;
    for (LayerWeights& L : layers_) {
      check_vec(L.ln_1_weight, E_, who, "ln_1.weight"); check_vec(L.ln_1_bias, E_, who, "ln_1.bias");
      check_vec(L.ln_2_weight, E_, who, "ln_2.weight"); check_vec(L.ln_2_bias, E_, who, "ln_2.bias");
      check_vec(L.c_attn_bias, 3 * E_, who, "c_attn.bias"); check_vec(L.attn_proj_bias, E_, who, "attn.c_proj.bias");
      check_vec(L.c_fc_bias, F_, who, "c_fc.bias"); check_vec(L.mlp_proj_bias, E_, who, "mlp.c_proj.bias");
      L.c_attn = L.c_attn_weight.ref(E_, 3 * E_, who, "c_attn weight");
      L.attn_proj = L.attn_proj_weight.ref(E_, E_, who, "attn.c_proj weight");
      L.c_fc = L.c_fc_weight.ref(E_, F_, who, "c_fc weight");
      L.mlp_proj = L.mlp_proj_weight.ref(F_, E_, who, "mlp.c_proj weight");
    }
    check_vec(lnf_w_, E_, who, "ln_f.weight");
    check_vec(lnf_b_, E_, who, "ln_f.bias");
  }

  static void check_vec(const at::Tensor& t, int64_t n, const char* who, const char* name) {
    TORCH_CHECK_VALUE(t.defined(), "gpt2kern.", who, ": ", name, " is missing");
    GK_CHECK_FLOAT(t, who, name);
    TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "gpt2kern.", who, ": ", name,
                      " must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == n, "gpt2kern.", who, ": ", name, " must be a vector of ", n,
                      " elements, got shape ", t.sizes());
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
    run_layer_norm(s.h, E, s.x, f32(layers_[0].ln_1_weight), f32(layers_[0].ln_1_bias), M, E, eps_);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerWeights& L = layers_[l];
      run_matmul(s.x, E, M, E, L.c_attn, 3 * E, f32(L.c_attn_bias), Epilogue::None, nullptr, 0,
                 s.qkv);
      const KvView c = kv(l, s.qkv);
      AttnArgs args{};
      args.q = s.qkv; args.sq_b = T * 3 * E; args.sq_h = D_; args.sq_t = 3 * E;
      args.k = c.k; args.v = c.v;
      args.sk_b = args.sv_b = c.s_b; args.sk_h = args.sv_h = c.s_h; args.sk_t = args.sv_t = c.s_t;
      args.out = s.att;
      args.B = B; args.H = H_; args.Tq = T; args.Tkv = c.Tkv; args.D = D_;
      args.key_mask = c.key_mask; args.mask_len = c.mask_len;
      args.scale = (float)L.scale; args.q_offset = c.q_offset; args.causal = true;
      run_attention(args);
      run_matmul(s.att, E, M, E, L.attn_proj, E, f32(L.attn_proj_bias), Epilogue::None, nullptr,
                 0, s.a);
      run_add_layer_norm(s.a, E, s.h, E, s.h, s.x, f32(L.ln_2_weight), f32(L.ln_2_bias), M, E, eps_);
      run_matmul(s.x, E, M, E, L.c_fc, F_, f32(L.c_fc_bias), Epilogue::GeluNew, nullptr, 0,
                 s.fc);
      run_matmul(s.fc, F_, M, F_, L.mlp_proj, E, f32(L.mlp_proj_bias), Epilogue::None, nullptr,
                 0, s.a);
      const bool last = l + 1 == layers_.size();
      const at::Tensor& nw = last ? lnf_w_ : layers_[l + 1].ln_1_weight;
      const at::Tensor& nb = last ? lnf_b_ : layers_[l + 1].ln_1_bias;
      if (last && last_only && T > 1) {  // only each row's last token reaches ln_f (and the head)
        for (int64_t b = 0; b < B; ++b) {
          const int64_t r = b * T + T - 1;
          std::copy(s.a + r * E, s.a + (r + 1) * E, s.a + b * E);
          std::copy(s.h + r * E, s.h + (r + 1) * E, s.h + b * E);
        }
        run_add_layer_norm(s.a, E, s.h, E, s.h, s.x, f32(nw), f32(nb), B, E, eps_);
      } else {
        run_add_layer_norm(s.a, E, s.h, E, s.h, s.x, f32(nw), f32(nb), M, E, eps_);
      }
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

  std::vector<LayerWeights> layers_;
  at::Tensor wte_, wpe_, lnf_w_, lnf_b_;
  int64_t H_;
  float eps_;
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
// still allocated), where torch.cat copies everything and allocates a slightly larger block each step (which glibc serves with a fresh mmap, page faults and munmap).
// Anything else (a cropped, reordered or user-made cache) is copied into a new buffer, as torch.cat would.
class Body {
 public:
  Body(const std::vector<LayerWeights>& layers, at::Tensor wte, at::Tensor wpe, at::Tensor lnf_w, at::Tensor lnf_b,
       int64_t n_head, double eps)
      : st_(layers, wte, wpe, lnf_w, lnf_b, n_head, eps, "Body") {}

  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> forward(
      const at::Tensor& ids, const std::optional<at::Tensor>& pos_, const std::optional<at::Tensor>& attention_mask,
      const std::optional<std::vector<at::Tensor>>& past_k_, const std::optional<std::vector<at::Tensor>>& past_v_,
      const std::vector<bool>& append) const {
    const char* who = "Body.forward";
    TORCH_CHECK_VALUE(past_k_.has_value() == past_v_.has_value(), "gpt2kern.Body.forward: past_k and past_v must "
                      "both be None or both be lists");
    const bool keep = past_k_.has_value();  // a cache: return the grown keys/values
    static const std::vector<at::Tensor> none;
    const std::vector<at::Tensor>& past_k = keep ? *past_k_ : none;
    const std::vector<at::Tensor>& past_v = keep ? *past_v_ : none;
    GK_CHECK_DTYPE(ids, at::kLong, who, "ids");
    TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) >= 1 && ids.size(1) >= 1, "gpt2kern.Body.forward: ids must be "
                      "[B >= 1, T >= 1], got ", ids.sizes());
    TORCH_CHECK_VALUE(ids.device().is_cpu(), "gpt2kern.Body.forward: ids must be a CPU tensor");
    if (pos_) {
      GK_CHECK_DTYPE(*pos_, at::kLong, who, "pos");
      TORCH_CHECK_VALUE(pos_->sizes() == ids.sizes() && pos_->device().is_cpu(), "gpt2kern.Body.forward: pos must "
                        "be a CPU tensor of ids' shape ", ids.sizes(), ", got ", pos_->sizes());
    }
    const int64_t B = ids.size(0), T = ids.size(1), M = B * T, E = st_.E_, H = st_.H_, D = st_.D_;
    const int64_t L = (int64_t)st_.layers_.size();
    TORCH_CHECK_VALUE(past_k.size() == past_v.size() && (past_k.empty() || (int64_t)past_k.size() == L),
                      "gpt2kern.Body.forward: past_k and past_v must both be empty or hold ", L, " layers, got ",
                      past_k.size(), " and ", past_v.size());
    TORCH_CHECK_VALUE(append.empty() || append.size() == past_k.size(), "gpt2kern.Body.forward: append must be "
                      "empty or have one entry per layer of past_k (", past_k.size(), "), got ", append.size());
    int64_t P = 0;
    if (!past_k.empty()) P = past_k[0].dim() == 4 ? past_k[0].size(2) : -1;
    at::Tensor km;  // [B, mask_len] bool, or undefined when every position may be attended
    if (attention_mask) {
      const at::Tensor& m = *attention_mask;
      const auto dt = m.scalar_type();
      TORCH_CHECK_TYPE(dt == at::kBool || dt == at::kLong || dt == at::kInt || dt == at::kFloat,
                       "gpt2kern.Body.forward: attention_mask must be bool, int64, int32 or float32, got ", dt);
      TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.device().is_cpu(), "gpt2kern.Body.forward: "
                        "attention_mask must be a CPU [batch ", B, ", kv_len] tensor, got ", m.sizes());
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
        TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == P &&
                              t->size(3) == D,
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

class Engine {
 public:
  // lm_w: the [n_embd] -> [vocab] head in any weight format (in place over wte: layout 'nk'). batch / max_len fix the cache; max_rows bounds B·T of one forward.
  Engine(const std::vector<LayerWeights>& layers, at::Tensor wte, at::Tensor wpe, at::Tensor lnf_w, at::Tensor lnf_b,
         Weight lm_w, int64_t vocab, int64_t n_head, double eps, int64_t batch, int64_t max_len,
         int64_t max_rows)
      : st_(layers, wte, wpe, lnf_w, lnf_b, n_head, eps, "Engine"), lm_w_(lm_w), V_(vocab),
        B_(batch), Tmax_(max_len), max_rows_(max_rows) {
    TORCH_CHECK_VALUE(batch >= 1 && max_len >= 1 && max_rows >= batch, "gpt2kern.Engine: bad sizes batch=", batch,
                      " max_len=", max_len, " max_rows=", max_rows);
    lm_ref_ = lm_w_.ref(st_.E_, V_, "Engine", "lm_head weight");
    const int64_t L = (int64_t)st_.layers_.size(), E = st_.E_, H = st_.H_, D = st_.D_;
    auto f = st_.wte_.options();
    k_ = at::zeros({L, B_, H, Tmax_, D}, f);
    v_ = at::zeros({L, B_, H, Tmax_, D}, f);
    key_mask_ = at::zeros({B_, Tmax_}, f.dtype(at::kBool));
    buf_ = at::empty({max_rows_ * (7 * E + st_.F_)}, f);
    logits_ = at::empty({B_, V_}, f);
  }

  // Append ids [B, T] at positions pos [B, T] (valid [B, T]: false = left padding); returns logits [B, vocab] of
  // each row's last token. The returned tensor is the engine's buffer: it is overwritten by the next call.
  // threads > 0: the kernels of this call use at most that many threads (generate's per-step choice, see
  // gpt2kern/generate.py's ThreadChooser); 0: torch's count.
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& pos, const at::Tensor& valid, int64_t threads) {
    TORCH_CHECK_VALUE(threads >= 0, "gpt2kern.Engine.forward: threads must be >= 0 (0: torch's count), got ",
                      threads);
    const ThreadCap cap(threads);
    GK_CHECK_DTYPE(ids, at::kLong, "Engine.forward", "ids");
    GK_CHECK_DTYPE(pos, at::kLong, "Engine.forward", "pos");
    GK_CHECK_DTYPE(valid, at::kBool, "Engine.forward", "valid");
    TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == B_ && ids.size(1) >= 1, "gpt2kern.Engine.forward: ids must "
                      "be [", B_, ", T >= 1], got ", ids.sizes());
    const int64_t T = ids.size(1), M = B_ * T, E = st_.E_, H = st_.H_, D = st_.D_;
    TORCH_CHECK_VALUE(pos.sizes() == ids.sizes() && valid.sizes() == ids.sizes(),
                      "gpt2kern.Engine.forward: pos and valid must have ids' shape ", ids.sizes());
    TORCH_CHECK_VALUE(M <= max_rows_, "gpt2kern.Engine.forward: ", M, " rows exceed the engine's max_rows ",
                      max_rows_);
    TORCH_CHECK_VALUE(len_ + T <= Tmax_, "gpt2kern.Engine.forward: cache holds ", Tmax_, " tokens; ", len_,
                      " used, ", T, " more requested");
    at::Tensor idc = ids.contiguous(), pc = pos.contiguous(), vc = valid.contiguous();
    st_.check_ids(idc.data_ptr<int64_t>(), pc.data_ptr<int64_t>(), M, "Engine.forward");
    bool* km = key_mask_.data_ptr<bool>();
    const bool* pv = vc.data_ptr<bool>();
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t t = 0; t < T; ++t) km[b * Tmax_ + len_ + t] = pv[b * T + t];

    float* p = buf_.data_ptr<float>();
    const int64_t R = max_rows_;
    const Scratch s{p, p + R * E, p + 2 * R * E, p + 5 * R * E, p + 6 * R * E, p + 7 * R * E};  // h x qkv att a fc
    const int64_t sb = H * Tmax_ * D, sh = Tmax_ * D;
    auto kv = [&](size_t l, const float* qkv) {
      float* k = k_.data_ptr<float>() + l * B_ * sb;
      float* v = v_.data_ptr<float>() + l * B_ * sb;
      st_.store_kv(qkv, B_, T, k, v, sb, sh, D, len_);
      return KvView{k, v, sb, sh, D, len_ + T, km, Tmax_, len_};
    };
    st_.run(s, idc.data_ptr<int64_t>(), pc.data_ptr<int64_t>(), B_, T, kv, /*last_only=*/true);
    run_matmul(s.x, E, B_, E, lm_ref_, V_, nullptr, Epilogue::None, nullptr, 0,
               logits_.data_ptr<float>());
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
  Stack st_;
  Weight lm_w_;  // holds the tensors lm_ref_ points into
  WeightRef lm_ref_;
  int64_t V_;
  int64_t B_, Tmax_, max_rows_;
  int64_t len_ = 0;
  at::Tensor k_, v_, key_mask_, buf_, logits_;
};

}  // namespace

void bind_engine(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Weight>(m, "Weight", "One matmul weight: storage, int8 scales, layout (built by weights.Linear).")
      .def(py::init([](at::Tensor data, std::optional<at::Tensor> scales, std::string layout) {
             return Weight{data, scales, layout};
           }),
           py::arg("data"), py::arg("scales"), py::arg("layout"))
      .def_readonly("data", &Weight::data)
      .def_readonly("layout", &Weight::layout);
  py::class_<LayerWeights>(m, "LayerWeights", "One block's weights by name (built by gpt2kern.weights.Layer).")
      .def(py::init([](at::Tensor ln_1_weight, at::Tensor ln_1_bias, Weight c_attn_weight, at::Tensor c_attn_bias,
                       Weight attn_proj_weight, at::Tensor attn_proj_bias, at::Tensor ln_2_weight,
                       at::Tensor ln_2_bias, Weight c_fc_weight, at::Tensor c_fc_bias, Weight mlp_proj_weight,
                       at::Tensor mlp_proj_bias, double scale) {
             return LayerWeights{ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_proj_weight,
                                 attn_proj_bias, ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_proj_weight,
                                 mlp_proj_bias, scale, {}, {}, {}, {}};
           }),
           py::kw_only(), py::arg("ln_1_weight"), py::arg("ln_1_bias"), py::arg("c_attn_weight"),
           py::arg("c_attn_bias"), py::arg("attn_proj_weight"), py::arg("attn_proj_bias"), py::arg("ln_2_weight"),
           py::arg("ln_2_bias"), py::arg("c_fc_weight"), py::arg("c_fc_bias"), py::arg("mlp_proj_weight"),
           py::arg("mlp_proj_bias"), py::arg("scale"))
      .def_readonly("scale", &LayerWeights::scale);
  py::class_<Engine>(m, "Engine", "GPT-2 decode engine: preallocated KV cache, one C++ call per step.")
      .def(py::init<const std::vector<LayerWeights>&, at::Tensor, at::Tensor, at::Tensor, at::Tensor, Weight,
                    int64_t, int64_t, double, int64_t, int64_t, int64_t>(),
           py::arg("layers"), py::arg("wte"), py::arg("wpe"), py::arg("lnf_w"), py::arg("lnf_b"), py::arg("lm_w"),
           py::arg("vocab"), py::arg("n_head"), py::arg("eps"), py::arg("batch"), py::arg("max_len"),
           py::arg("max_rows"))
      .def("forward", &Engine::forward, py::arg("ids"), py::arg("pos"), py::arg("valid"), py::arg("threads") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("reset", &Engine::reset)
      .def_property_readonly("length", &Engine::length)
      .def_property_readonly("key_mask", &Engine::key_mask);
  py::class_<Body>(m, "Body", "GPT-2 body (embedding, blocks, ln_f) in one call, over DynamicCache-style past K/V.")
      .def(py::init<const std::vector<LayerWeights>&, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t,
                    double>(),
           py::arg("layers"), py::arg("wte"), py::arg("wpe"), py::arg("lnf_w"), py::arg("lnf_b"), py::arg("n_head"),
           py::arg("eps"))
      .def("forward", &Body::forward, py::arg("ids"), py::arg("pos"), py::arg("attention_mask"), py::arg("past_k"),
           py::arg("past_v"), py::arg("append") = std::vector<bool>(), py::call_guard<py::gil_scoped_release>());
}

}  // namespace gk::cpu
