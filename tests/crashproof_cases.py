"""Bad inputs for every public op and entry point (run by tests/test_crashproof.py in a subprocess).

Each case is (name, call, expect): expect is (exception types, regex the message must match), or OK for calls
whose inputs are odd but legal (empty tensors, mixed devices): those may return or raise a clear exception, but
must never crash. `python tests/crashproof_cases.py START` runs the cases from index START, printing
`CASE i name` before each call and `RESULT i <outcome>` after, so a crash names the case that caused it.
"""
import copy
import sys

import torch

OK = "ok"
TE, VE, IE, RE = TypeError, ValueError, IndexError, RuntimeError
BIG = 2**62
f32 = dict(dtype=torch.float32)


def _cases():
    import gpt2kern
    from gpt2kern import ops
    from gpt2kern.model import _CACHE_ARG as CACHE  # past_key_values, or cache in newer transformers
    from transformers.cache_utils import DynamicCache

    x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    W = torch.randn(8, 40)
    P = ops.pack(W)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    wte, wpe = torch.randn(99, 16), torch.randn(32, 16)
    ids, pos = torch.tensor([[1, 2, 3]]), torch.arange(3)[None]
    meta = dict(device="meta")
    C = []

    def case(name, fn, expect):
        C.append((name, fn, expect))

    # ---- layer_norm / add_layer_norm
    for dt in (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64):
        case(f"layer_norm x {dt}", lambda dt=dt: ops.layer_norm(x.to(dt), w, b), (TE, "x must be Float"))
    case("layer_norm weight float64", lambda: ops.layer_norm(x, w.double(), b), (TE, "weight must be Float"))
    case("layer_norm bias int", lambda: ops.layer_norm(x, w, b.long()), (TE, "bias must be Float"))
    case("layer_norm x 0-d", lambda: ops.layer_norm(torch.tensor(1.0), w, b), (VE, "at least 1 dim"))
    case("layer_norm weight wrong size", lambda: ops.layer_norm(x, torch.ones(7), b), (VE, r"weight must have shape"))
    case("layer_norm weight 2-D", lambda: ops.layer_norm(x, torch.ones(1, 8), b), (VE, r"weight must have shape"))
    case("layer_norm bias wrong size", lambda: ops.layer_norm(x, w, torch.zeros(9)), (VE, r"bias must have shape"))
    case("layer_norm x not a tensor", lambda: ops.layer_norm([[1.0] * 8], w, b), (TE, "must be a torch.Tensor"))
    case("layer_norm x None", lambda: ops.layer_norm(None, w, b), (TE, "must be a torch.Tensor"))
    case("layer_norm empty rows", lambda: ops.layer_norm(torch.empty(0, 8), w, b), OK)
    case("layer_norm empty last dim", lambda: ops.layer_norm(torch.empty(3, 0), torch.ones(0), torch.zeros(0)), OK)
    case("layer_norm x on meta", lambda: ops.layer_norm(x.to(**meta), w, b), OK)
    case("layer_norm weight on meta", lambda: ops.layer_norm(x, w.to(**meta), b), OK)
    case("layer_norm huge expanded x", lambda: ops.layer_norm(torch.zeros(1, 8).expand(2**40, 8), w, b), (RE, ""))
    case("layer_norm eps nan", lambda: ops.layer_norm(x, w, b, float("nan")), OK)
    case("add_layer_norm residual shape", lambda: ops.add_layer_norm(x, torch.ones(3, 8), w, b),
         (VE, "residual must have x's shape"))
    case("add_layer_norm residual broadcastable", lambda: ops.add_layer_norm(x, torch.ones(1, 8), w, b),
         (VE, "residual must have x's shape"))
    case("add_layer_norm residual float64", lambda: ops.add_layer_norm(x, x.double(), w, b),
         (TE, "residual must be Float"))
    case("add_layer_norm residual on meta", lambda: ops.add_layer_norm(x, x.to(**meta), w, b), OK)
    case("add_layer_norm empty", lambda: ops.add_layer_norm(torch.empty(0, 8), torch.empty(0, 8), w, b), OK)

    # ---- gelu_new
    for dt in (torch.float64, torch.float16, torch.int32, torch.bool):
        case(f"gelu_new {dt}", lambda dt=dt: ops.gelu_new(torch.ones(4, dtype=dt)), (TE, "x must be Float"))
    case("gelu_new not a tensor", lambda: ops.gelu_new(3.0), (TE, "must be a torch.Tensor"))
    case("gelu_new empty", lambda: ops.gelu_new(torch.empty(0, 5)), OK)
    case("gelu_new 0-d", lambda: ops.gelu_new(torch.tensor(1.0)), OK)
    case("gelu_new meta", lambda: ops.gelu_new(torch.empty(5, **meta)), OK)

    # ---- pack / conv1d
    case("pack 1-D", lambda: ops.pack(torch.ones(8)), (VE, "weight must be 2-D"))
    case("pack 3-D", lambda: ops.pack(torch.ones(2, 8, 4)), (VE, "weight must be 2-D"))
    case("pack float64", lambda: ops.pack(W.double()), (TE, "weight must be Float"))
    case("pack empty K", lambda: ops.pack(torch.empty(0, 40)), OK)
    case("pack empty N", lambda: ops.pack(torch.empty(8, 0)), OK)
    case("conv1d K mismatch", lambda: ops.conv1d(x, torch.randn(9, 40)), (VE, r"in layout 'kn' must be \[8, 40\]"))
    case("conv1d x float64", lambda: ops.conv1d(x.double(), W), (TE, "x must be Float"))
    case("conv1d weight int64", lambda: ops.conv1d(x, W.long()), (TE, "float32, float16, bfloat16 or int8"))
    case("conv1d weight fp16 in place", lambda: ops.conv1d(x, W.half()), (TE, "must be float32"))
    case("conv1d x 0-d", lambda: ops.conv1d(torch.tensor(1.0), W), (VE, "at least 1 dim"))
    case("conv1d weight 1-D", lambda: ops.conv1d(x, torch.ones(8)), (VE, "in layout 'kn' must be 2-D"))
    case("conv1d weight 1-D nk", lambda: ops.conv1d(x, torch.ones(8), layout="nk"), (VE, "in layout 'nk' must be"))
    case("conv1d weight 4-D", lambda: ops.conv1d(x, torch.ones(2, 8, 32, 1), out_features=40, layout="panels"),
         (VE, "in layout 'panels' must be"))
    case("conv1d bad layout", lambda: torch.ops.gpt2kern.conv1d(x, W, None, "none", None, -1, "nt", None),
         (VE, "layout must be"))
    case("conv1d packed as kn", lambda: ops.conv1d(x, P, out_features=40), (VE, "in layout 'kn' must be"))
    case("conv1d packed wrong panel width",
         lambda: ops.conv1d(x, torch.ones(2, 8, 16), out_features=40, layout="panels"), (VE, "in layout 'panels'"))
    case("conv1d packed wrong K", lambda: ops.conv1d(torch.randn(2, 9), P, out_features=40, layout="panels"),
         (VE, "in layout 'panels'"))
    case("conv1d packed no out_features", lambda: ops.conv1d(x, P, layout="panels"), (VE, "needs out_features"))
    case("conv1d packed too many columns", lambda: ops.conv1d(x, P, out_features=100, layout="panels"),
         (VE, "panels"))
    case("conv1d packed huge out_features", lambda: ops.conv1d(x, P, out_features=BIG, layout="panels"),
         (VE, "panels"))
    case("conv1d packed non-contiguous", lambda: ops.conv1d(x, P.transpose(0, 1).contiguous().transpose(0, 1),
                                                            out_features=40, layout="panels"), OK)
    Q8 = torch.zeros(2, 8, 32, dtype=torch.int8)
    case("conv1d int8 without scales", lambda: ops.conv1d(x, Q8, out_features=40, layout="panels"),
         (VE, "needs its scales"))
    case("conv1d int8 scales wrong shape",
         lambda: ops.conv1d(x, Q8, out_features=40, layout="panels", scales=torch.ones(2, 3, 32)), (VE, "scales must"))
    case("conv1d int8 scales float64", lambda: ops.conv1d(x, Q8, out_features=40, layout="panels",
                                                           scales=torch.ones(2, 1, 32, dtype=torch.float64)),
         (TE, "scales must be Float"))
    case("conv1d int8 scales on meta", lambda: ops.conv1d(x, Q8, out_features=40, layout="panels",
                                                           scales=torch.ones(2, 1, 32, **meta)), OK)
    case("conv1d fp16 with scales", lambda: ops.conv1d(x, Q8.half(), out_features=40, layout="panels",
                                                        scales=torch.ones(2, 1, 32)), (VE, "only int8"))
    case("conv1d int8 NaN scales", lambda: ops.conv1d(x, Q8, out_features=40, layout="panels",
                                                       scales=torch.full((2, 1, 32), float("nan"))), OK)
    case("conv1d out_features mismatch", lambda: ops.conv1d(x, W, out_features=41), (VE, "out_features=41"))
    case("conv1d bias wrong size", lambda: ops.conv1d(x, W, torch.randn(41)), (VE, "bias must be"))
    case("conv1d bias 2-D", lambda: ops.conv1d(x, W, torch.randn(1, 40)), (VE, "bias must be"))
    case("conv1d bias float64", lambda: ops.conv1d(x, W, torch.randn(40).double()), (TE, "bias must be Float"))
    case("conv1d bias sized for packed", lambda: ops.conv1d(x, P, torch.randn(100), layout="panels"),
         (VE, "needs out_features"))
    case("conv1d bad epilogue", lambda: ops.conv1d(x, W, epilogue="relu"), (VE, "epilogue must be"))
    case("conv1d raw op bad epilogue",
         lambda: torch.ops.gpt2kern.conv1d(x, W, None, "relu", None, -1), (VE, "epilogue must be"))
    case("conv1d residual missing", lambda: ops.conv1d(x, W, epilogue="residual"), (VE, "needs a residual"))
    case("conv1d residual without epilogue", lambda: ops.conv1d(x, W, residual=torch.ones(2, 40)),
         (VE, "epilogue is 'none'"))
    case("conv1d residual wrong shape", lambda: ops.conv1d(x, W, epilogue="residual", residual=torch.ones(2, 41)),
         (VE, "residual must have shape"))
    case("conv1d residual int", lambda: ops.conv1d(x, W, epilogue="residual", residual=torch.ones(2, 40).long()),
         (TE, "residual must be Float"))
    case("conv1d empty rows", lambda: ops.conv1d(torch.empty(0, 8), W), OK)
    case("conv1d empty K", lambda: ops.conv1d(torch.empty(2, 0), torch.empty(0, 40), torch.ones(40)), OK)
    case("conv1d empty K gelu", lambda: ops.conv1d(torch.empty(2, 0), torch.empty(0, 40), None, "gelu_new"), OK)
    case("conv1d empty N", lambda: ops.conv1d(x, torch.empty(8, 0)), OK)
    case("conv1d x on meta", lambda: ops.conv1d(x.to(**meta), W), OK)
    case("conv1d bias on meta", lambda: ops.conv1d(x, W, torch.ones(40, **meta)), OK)

    # ---- attention
    att = ops.attention
    case("attention q 3-D", lambda: att(q[0], k, v), (VE, "q .* must be 4-D"))
    case("attention k 5-D", lambda: att(q, k[None], v), (VE, "k .* must be 4-D"))
    case("attention q int", lambda: att(q.long(), k, v), (TE, "q must be Float"))
    case("attention v float64", lambda: att(q, k, v.double()), (TE, "v must be Float"))
    case("attention k wrong batch", lambda: att(q, k.expand(2, 2, 5, 8), v), (VE, "k must be"))
    case("attention k wrong heads", lambda: att(q, k[:, :1], v[:, :1]), (VE, "k must be"))
    case("attention k wrong head dim", lambda: att(q, k[..., :7], v[..., :7]), (VE, "k must be"))
    case("attention v shape differs", lambda: att(q, k, v[:, :, :4]), (VE, "v must have k's shape"))
    case("attention too few keys", lambda: att(q, k, v, q_offset=3), (VE, "need at least 6 keys"))
    case("attention negative q_offset", lambda: att(q, k, v, q_offset=-1), (VE, "q_offset must be >= 0"))
    case("attention huge q_offset", lambda: att(q, k, v, q_offset=2**63 - 1), (VE, "keys"))
    case("attention huge q_offset non-causal", lambda: att(q, k, v, q_offset=2**63 - 1, causal=False), OK)
    case("attention key_mask float", lambda: att(q, k, v, torch.ones(1, 5)), (TE, "key_mask must be Bool"))
    case("attention key_mask 1-D", lambda: att(q, k, v, torch.ones(5, dtype=torch.bool)), (VE, "key_mask must be"))
    case("attention key_mask wrong batch", lambda: att(q, k, v, torch.ones(2, 5, dtype=torch.bool)),
         (VE, "key_mask must be"))
    case("attention key_mask longer than keys", lambda: att(q, k, v, torch.ones(1, 50, dtype=torch.bool)), OK)
    case("attention key_mask empty", lambda: att(q, k, v, torch.ones(1, 0, dtype=torch.bool)), OK)
    case("attention bias 3-D", lambda: att(q, k, v, None, torch.zeros(1, 3, 5), causal=False), (VE, "bias must be"))
    case("attention bias wrong Tq", lambda: att(q, k, v, None, torch.zeros(1, 1, 4, 5), causal=False),
         (VE, "bias must be"))
    case("attention bias wrong heads", lambda: att(q, k, v, None, torch.zeros(1, 3, 3, 5), causal=False),
         (VE, "bias must be"))
    case("attention bias bool", lambda: att(q, k, v, None, torch.zeros(1, 1, 3, 5, dtype=torch.bool),
                                           causal=False), (TE, "bias must be Float"))
    case("attention bias longer than keys", lambda: att(q, k, v, None, torch.zeros(1, 1, 3, 50), causal=False), OK)
    case("attention empty head dim", lambda: att(q[..., :0], k[..., :0], v[..., :0]), OK)
    case("attention no keys non-causal", lambda: att(q, k[:, :, :0], v[:, :, :0], causal=False), OK)
    case("attention empty batch", lambda: att(q[:0], k[:0], v[:0]), OK)
    case("attention k on meta", lambda: att(q, k.to(**meta), v), OK)
    case("attention not tensors", lambda: att("q", k, v), (TE, "must be a torch.Tensor"))

    # ---- embedding
    emb = ops.embedding
    case("embedding id = vocab", lambda: emb(torch.tensor([[1, 99, 2]]), wte, wpe, pos), (IE, r"contains 99"))
    case("embedding id -1", lambda: emb(torch.tensor([[1, -1, 2]]), wte, wpe, pos), (IE, "contains -1"))
    case("embedding id 2**62", lambda: emb(torch.tensor([[1, BIG, 2]]), wte, wpe, pos), (IE, "outside the vocab"))
    case("embedding id int64 min", lambda: emb(torch.tensor([[1, -2**63, 2]]), wte, wpe, pos), (IE, "outside"))
    case("embedding int32 id -2**31", lambda: emb(torch.tensor([[1, -2**31, 2]], dtype=torch.int32), wte, wpe, pos),
         (IE, "outside"))
    case("embedding ids float", lambda: emb(ids.float(), wte, wpe, pos), (TE, "input_ids must be int64 or int32"))
    case("embedding ids int16", lambda: emb(ids.short(), wte, wpe, pos), (TE, "input_ids must be int64 or int32"))
    case("embedding ids bool", lambda: emb(ids.bool(), wte, wpe, pos), (TE, "input_ids must be int64 or int32"))
    case("embedding ids 1-D", lambda: emb(ids[0], wte, wpe, pos), (VE, "input_ids must be 2-D"))
    case("embedding ids 3-D", lambda: emb(ids[None], wte, wpe, pos), (VE, "input_ids must be 2-D"))
    case("embedding position out of range", lambda: emb(ids, wte, wpe, torch.tensor([[30, 31, 32]])),
         (IE, "position_ids contains 32"))
    case("embedding position negative", lambda: emb(ids, wte, wpe, torch.tensor([[0, -5, 1]])), (IE, "contains -5"))
    case("embedding position wrong shape", lambda: emb(ids, wte, wpe, torch.arange(4)[None]),
         (VE, "position_ids must have shape"))
    case("embedding position float", lambda: emb(ids, wte, wpe, pos.float()), (TE, "position_ids must be int64"))
    case("embedding token_type out of range", lambda: emb(ids, wte, wpe, pos, torch.tensor([[0, 0, 500]])),
         (IE, "token_type_ids contains 500"))
    case("embedding token_type wrong shape", lambda: emb(ids, wte, wpe, pos, torch.zeros(1, 2, dtype=torch.long)),
         (VE, "token_type_ids must have shape"))
    case("embedding wte 1-D", lambda: emb(ids, wte[0], wpe, pos), (VE, "wte must be 2-D"))
    case("embedding wte float64", lambda: emb(ids, wte.double(), wpe, pos), (TE, "wte must be Float"))
    case("embedding widths differ", lambda: emb(ids, wte, wpe[:, :8], pos), (VE, "widths differ"))
    case("embedding empty vocab", lambda: emb(ids, wte[:0], wpe, pos), (IE, "outside the vocab"))
    case("embedding empty ids", lambda: emb(torch.empty(1, 0, dtype=torch.long), wte, wpe, pos[:, :0]), OK)
    case("embedding ids on meta", lambda: emb(ids.to(**meta), wte, wpe, pos), OK)

    # ---- ISA switch
    for name in ("sse", "", "AVX512", None):
        case(f"set_isa {name!r}", lambda name=name: ops.set_isa(name), (VE, "isa must be"))

    # ---- the optimized model (random:tiny: vocab 99, n_positions 512, 2 layers, 4 heads of 8)
    ref, _ = gpt2kern.load("random:tiny")
    m = gpt2kern.optimize(copy.deepcopy(ref))
    V, NP = m.config.vocab_size, m.config.n_positions
    t = torch.tensor([[1, 2, 3]])

    def run(*a, **kw):
        with torch.no_grad():
            return m(*a, **kw)

    def gen(*a, **kw):
        with torch.no_grad():
            return m.generate(*a, max_new_tokens=kw.pop("max_new_tokens", 3), do_sample=False, **kw)

    case("model token id = vocab", lambda: run(torch.tensor([[1, V]])), (IE, f"contains {V}"))
    case("model token id -1", lambda: run(torch.tensor([[-1, 2]])), (IE, "contains -1"))
    case("model token id 2**62", lambda: run(torch.tensor([[1, BIG]])), (IE, "outside the vocabulary"))
    case("model token id int64 min", lambda: run(torch.tensor([[-2**63]])), (IE, "outside the vocabulary"))
    case("model ids float", lambda: run(t.float()), (TE, "input_ids must be int64 or int32"))
    case("model ids 0-d", lambda: run(torch.tensor(3)), (VE, "input_ids must be"))
    case("model ids empty batch", lambda: run(torch.zeros(0, 3, dtype=torch.long)), (VE, "batch >= 1"))
    case("model ids empty seq", lambda: run(torch.zeros(2, 0, dtype=torch.long)), (VE, "batch >= 1"))
    case("model ids too long", lambda: run(torch.zeros(1, NP + 1, dtype=torch.long)), (VE, "exceeds n_positions"))
    case("model position_ids out of range", lambda: run(t, position_ids=torch.tensor([[0, 1, NP]])),
         (IE, f"position_ids contains {NP}"))
    case("model position_ids negative", lambda: run(t, position_ids=torch.tensor([[0, -1, 2]])), (IE, "contains -1"))
    case("model position_ids wrong size", lambda: run(t, position_ids=torch.arange(5)[None]),
         (VE, "position_ids must be"))
    case("model token_type_ids out of range", lambda: run(t, token_type_ids=torch.tensor([[0, 0, V]])),
         (IE, "token_type_ids contains"))
    case("model mask 3-D (HF views it as [batch, -1])", lambda: run(t, attention_mask=torch.ones(1, 1, 3)), OK)
    case("model mask 3-D of the wrong size", lambda: run(t.expand(2, 3), attention_mask=torch.ones(1, 1, 3)),
         (VE, "attention_mask must be"))
    case("model mask too short", lambda: run(t, attention_mask=torch.ones(1, 2)), (VE, "covers 2 positions"))
    case("model mask wrong batch", lambda: run(t.expand(2, 3), attention_mask=torch.ones(3, 3)),
         (VE, r"attention_mask must be \[batch \(2\)"))
    case("model mask 4-D wrong shape", lambda: run(t, attention_mask=torch.zeros(1, 1, 2, 3)),
         (VE, "4-D attention_mask must be"))
    case("model mask float values", lambda: run(t, attention_mask=torch.tensor([[0.5, 1.0, 1.0]])), OK)
    case("model mask all padded", lambda: run(t, attention_mask=torch.zeros(1, 3, dtype=torch.long)), OK)

    def cache_of(batch, heads=4, dim=8, length=2):
        c = DynamicCache(config=m.config)
        for i in range(m.config.n_layer):
            c.update(torch.randn(batch, heads, length, dim), torch.randn(batch, heads, length, dim), i)
        return c

    case("model cache wrong batch", lambda: run(t, **{CACHE: cache_of(2)}), (VE, "does not fit"))
    case("model cache wrong heads", lambda: run(t, **{CACHE: cache_of(1, heads=3)}), (VE, "does not fit"))
    case("model cache wrong head dim", lambda: run(t, **{CACHE: cache_of(1, dim=5)}), (VE, "does not fit"))
    case("model cache past + input > n_positions", lambda: run(t, **{CACHE: cache_of(1, length=NP - 1)}),
         (VE, "exceeds n_positions"))
    case("model cache but mask too short", lambda: run(t, **{CACHE: cache_of(1)}, attention_mask=torch.ones(1, 3)),
         (VE, "covers 3 positions"))
    case("model cache is a tuple", lambda: run(t, **{CACHE: ((torch.randn(1, 4, 2, 8),) * 2,) * 2}), OK)
    # ---- the one-call body (_C.Body, under HF's generate) and the decode engine (_C.Engine), called directly
    from gpt2kern import _C
    import dataclasses

    PK = m.transformer._gpt2kern.weights
    body = PK.body()
    H, D, NL = m.config.n_head, m.config.n_embd // m.config.n_head, m.config.n_layer
    pk = [torch.randn(1, H, 2, D) for _ in range(NL)]
    p3 = torch.tensor([[2, 3, 4]])
    case("Body ids float", lambda: body.forward(t.float(), p3, None, pk, pk), (TE, "ids must be Long"))
    case("Body ids 1-D", lambda: body.forward(t[0], p3[0], None, pk, pk), (VE, "ids must be"))
    case("Body pos shape", lambda: body.forward(t, p3[:, :2], None, pk, pk), (VE, "pos must be a CPU tensor of ids' shape"))
    case("Body token id = vocab", lambda: body.forward(torch.tensor([[1, 2, V]]), p3, None, pk, pk),
         (IE, "outside the vocabulary"))
    case("Body position = n_positions", lambda: body.forward(t, torch.tensor([[2, 3, NP]]), None, pk, pk),
         (IE, "outside"))
    case("Body past one layer short", lambda: body.forward(t, p3, None, pk[:-1], pk[:-1]), (VE, "layers"))
    case("Body past k/v count differ", lambda: body.forward(t, p3, None, pk, []), (VE, "layers"))
    case("Body past_k None, past_v list", lambda: body.forward(t, p3, None, None, pk), (VE, "both be None"))
    case("Body past wrong heads", lambda: body.forward(t, p3, None, [torch.randn(1, H + 1, 2, D)] * NL, pk),
         (VE, "does not fit"))
    case("Body past lengths differ", lambda: body.forward(t, p3, None, [pk[0], torch.randn(1, H, 3, D)], pk),
         (VE, "does not fit"))
    case("Body past float64", lambda: body.forward(t, p3, None, [p.double() for p in pk], pk), (TE, "Float"))
    case("Body past on meta", lambda: body.forward(t, p3, None, [p.to("meta") for p in pk], pk), (VE, "CPU"))
    case("Body mask short", lambda: body.forward(t, p3, torch.ones(1, 4, dtype=torch.bool), pk, pk),
         (VE, "covers 4 positions"))
    case("Body mask float64", lambda: body.forward(t, p3, torch.ones(1, 5, dtype=torch.float64), pk, pk),
         (TE, "attention_mask must be bool, int64"))
    case("Body mask 1-D", lambda: body.forward(t, p3, torch.ones(5, dtype=torch.long), pk, pk),
         (VE, "attention_mask must be a CPU"))
    case("Body pos int32", lambda: body.forward(t, p3.int(), None, pk, pk), (TE, "pos must be Long"))
    lws = [L.to_c() for L in PK.layers]
    lnf = (PK.ln_f.weight, PK.ln_f.bias)
    L0 = PK.layers[0]
    c_args = dict(ln_1_weight=L0.ln_1.weight, ln_1_bias=L0.ln_1.bias, c_attn_weight=L0.c_attn.to_c(),
                  c_attn_bias=L0.c_attn.bias, attn_proj_weight=L0.attn_proj.to_c(),
                  attn_proj_bias=L0.attn_proj.bias, ln_2_weight=L0.ln_2.weight, ln_2_bias=L0.ln_2.bias,
                  c_fc_weight=L0.c_fc.to_c(), c_fc_bias=L0.c_fc.bias, mlp_proj_weight=L0.mlp_proj.to_c(),
                  mlp_proj_bias=L0.mlp_proj.bias, scale=L0.scale)
    hf_c_attn = m.transformer.h[0].attn.c_attn.weight.detach()
    Wt = _C.Weight
    def layer_with(**kw):
        return _C.LayerWeights(**{**c_args, **kw})
    case("Body no layers", lambda: _C.Body([], PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (VE, "no layers"))
    case("Body HF-layout weight, transposed", lambda: _C.Body(
        [layer_with(c_attn_weight=Wt(hf_c_attn.t().contiguous(), None, "kn"))] + lws[1:],
        PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (VE, r"c_attn weight in layout 'kn' must be \[32, 96\]"))
    case("Body HF-layout weight, not contiguous", lambda: _C.Body(
        [layer_with(c_attn_weight=Wt(hf_c_attn.t().contiguous().t(), None, "kn"))] + lws[1:],
        PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (VE, "c_attn weight's rows must be contiguous"))
    case("Body HF-layout weight as nk", lambda: _C.Body(
        [layer_with(c_attn_weight=Wt(hf_c_attn, None, "nk"))] + lws[1:],
        PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (VE, "c_attn weight in layout 'nk' must be"))
    case("Body HF-layout weight as panels", lambda: _C.Body(
        [layer_with(c_attn_weight=Wt(hf_c_attn, None, "panels"))] + lws[1:],
        PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (VE, "c_attn weight in layout 'panels' must be"))
    case("Body weight bad layout name", lambda: _C.Body(
        [layer_with(c_attn_weight=Wt(hf_c_attn, None, "KN"))] + lws[1:],
        PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (VE, "layout must be 'kn', 'nk' or 'panels'"))
    case("Body int8 weight without scales", lambda: _C.Body(
        [layer_with(c_attn_weight=Wt(torch.zeros(3, 32, 32, dtype=torch.int8), None, "panels"))] + lws[1:],
        PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (VE, "c_attn weight is int8 and needs its scales"))
    case("Body HF-layout weight (read in place)", lambda: _C.Body(
        [layer_with(c_attn_weight=Wt(hf_c_attn, None, "kn"))] + lws[1:], PK.wte, PK.wpe,
        *lnf, PK.n_head, PK.eps), OK)
    case("Body c_fc and mlp_proj weights swapped", lambda: _C.Body(
        [layer_with(c_fc_weight=L0.mlp_proj.to_c(), mlp_proj_weight=L0.c_fc.to_c())] + lws[1:], PK.wte, PK.wpe, *lnf,
        PK.n_head, PK.eps), (VE, "c_fc weight in layout"))
    case("Weight not a tensor", lambda: _C.Weight(None, None, "kn"), (TE, "incompatible"))
    case("Body ln_1 bias is c_attn's bias", lambda: _C.Body([layer_with(ln_1_bias=L0.c_attn.bias)] + lws[1:],
                                                            PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps),
         (VE, "ln_1.bias must be a vector of"))
    case("Body ln_2 weight float64", lambda: _C.Body([layer_with(ln_2_weight=L0.ln_2.weight.double())] + lws[1:],
                                                     PK.wte, PK.wpe, *lnf, PK.n_head, PK.eps), (TE, "Float"))
    case("LayerWeights positional", lambda: _C.LayerWeights(*c_args.values()), (TE, "incompatible"))
    case("LayerWeights missing field", lambda: _C.LayerWeights(**{k: v for k, v in c_args.items() if k != "scale"}),
         (TE, "incompatible"))
    case("Layer record misassigned", lambda: dataclasses.replace(L0, c_fc=L0.mlp_proj),
         (VE, "Layer.c_fc must be"))
    case("Layer record ln swapped for a Linear's bias", lambda: dataclasses.replace(
        L0, ln_2=dataclasses.replace(L0.ln_2, bias=L0.c_attn.bias)), (VE, "Layer.ln_2 must hold"))
    case("Body n_head 0", lambda: _C.Body(lws, PK.wte, PK.wpe, *lnf, 0, PK.eps), (VE, "n_head"))
    eng = PK.engine(1, 8, 8)
    valid = torch.ones(1, 3, dtype=torch.bool)
    case("Engine wrong batch", lambda: eng.forward(t.expand(2, 3), p3.expand(2, 3), valid.expand(2, 3)),
         (VE, "ids must be"))
    case("Engine valid long", lambda: eng.forward(t, p3, valid.long()), (TE, "valid must be Bool"))
    case("Engine rows > max_rows", lambda: eng.forward(torch.ones(1, 9, dtype=torch.long),
                                                        torch.arange(9)[None], torch.ones(1, 9, dtype=torch.bool)),
         (VE, "max_rows"))
    case("Engine cache full", lambda: [eng.forward(t, p3, valid) for _ in range(3)], (VE, "cache holds 8"))
    case("Engine token id -1", lambda: eng.forward(torch.tensor([[-1]]), p3[:, :1], valid[:, :1]),
         (IE, "outside the vocabulary"))
    case("Engine bad sizes", lambda: PK.engine(0, 8, 8), (VE, "bad sizes"))
    case("generate token id = vocab", lambda: gen(torch.tensor([[1, V]])), (IE, f"contains {V}"))
    case("generate past n_positions", lambda: gen(torch.zeros(1, NP - 1, dtype=torch.long), max_new_tokens=5),
         ((VE, IE), "n_positions"))
    case("generate mask wrong length", lambda: gen(t, attention_mask=torch.ones(1, 2, dtype=torch.long)),
         (VE, r"position_ids must be \[batch \(1\) or 1, seq_len \(3\)\]"))  # HF derives them from the mask
    case("model position_ids too short", lambda: run(t, position_ids=torch.arange(2)[None]), (VE, "position_ids must"))
    case("model position_ids wrong batch", lambda: run(t.expand(2, 3), position_ids=torch.arange(6).view(3, 2)),
         (VE, "position_ids must"))
    # gpt2kern.generate (the C++ decode engine) on the plain model
    def ggen(ids, mask=None, **kw):
        return gpt2kern.generate(ref, ids, mask, **{"max_new_tokens": 2, **kw})

    case("engine generate token id = vocab", lambda: ggen(torch.tensor([[1, V]])), (VE, "vocabulary"))
    case("engine generate token id -1", lambda: ggen(torch.tensor([[-1, 2]])), (VE, "vocabulary"))
    case("engine generate token id 2**62", lambda: ggen(torch.tensor([[1, BIG]])), (VE, "vocabulary"))
    case("engine generate ids float", lambda: ggen(t.float()), (TE, "integer"))
    case("engine generate ids 3-D", lambda: ggen(t[None]), (VE, "input_ids"))
    case("engine generate empty batch", lambda: ggen(torch.zeros(0, 3, dtype=torch.long)), (VE, "batch"))
    case("engine generate empty prompt", lambda: ggen(torch.zeros(1, 0, dtype=torch.long)), (VE, "seq_len"))
    case("engine generate mask wrong shape", lambda: ggen(t, torch.ones(1, 2, dtype=torch.long)), (VE, "shape"))
    case("engine generate mask all padding", lambda: ggen(t, torch.zeros(1, 3, dtype=torch.long)),
         (VE, "no valid token"))
    case("engine generate past n_positions", lambda: ggen(t, max_new_tokens=NP), (VE, "n_positions"))
    case("engine generate max_new_tokens -1", lambda: ggen(t, max_new_tokens=-1), (VE, "max_new_tokens"))
    case("engine generate max_new_tokens 2**62", lambda: ggen(t, max_new_tokens=BIG), (VE, "n_positions"))
    case("engine generate temperature 0", lambda: ggen(t, do_sample=True, temperature=0.0), (VE, "temperature"))
    case("engine generate temperature nan", lambda: ggen(t, do_sample=True, temperature=float("nan")),
         (VE, "temperature"))
    case("engine generate top_p 0", lambda: ggen(t, do_sample=True, top_p=0.0), (VE, "top_p"))
    case("engine generate top_k -1", lambda: ggen(t, do_sample=True, top_k=-1), (VE, "top_k"))
    case("engine generate seed str", lambda: ggen(t, seed="1"), (TE, "seed"))
    case("engine generate ids on meta", lambda: ggen(t.to(**meta)), (VE, "input_ids are on the meta device"))
    case("engine generate ids on meta, pad id", lambda: ggen(t.to(**meta), pad_token_id=5),
         (VE, "input_ids are on the meta device"))
    case("engine generate mask on meta", lambda: ggen(t, torch.ones(1, 3).to(**meta)), (VE, "attention_mask is on the meta device"))
    case("engine generate eos out of range", lambda: ggen(t, eos_token_id=[V + 5]), OK)
    case("optimize not a model", lambda: gpt2kern.optimize(torch.nn.Linear(2, 2)), (TE, "GPT2LMHeadModel"))
    case("optimize None", lambda: gpt2kern.optimize(None), (TE, "GPT2LMHeadModel"))
    case("fallback_reason not optimized", lambda: gpt2kern.fallback_reason(ref), (VE, "not optimized"))
    case("tracing not optimized", lambda: gpt2kern.tracing(ref).__enter__(), (VE, "not optimized"))
    case("load unknown random config", lambda: gpt2kern.load("random:nope"), (VE, "unknown random config"))
    case("load missing directory", lambda: gpt2kern.load("/nonexistent/model"), (VE, "does not exist"))
    case("load empty name", lambda: gpt2kern.load(""), (VE, "non-empty string"))
    case("load not a string", lambda: gpt2kern.load(3), (VE, "non-empty string"))
    return C


def main(start):
    import re

    cases = _cases()
    for i in range(start, len(cases)):
        name, fn, expect = cases[i]
        print(f"CASE {i} {name}", flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - judged below
            msg = str(e).replace("\n", " ")[:300]
            if expect == OK:
                outcome = (f"ok raised {type(e).__name__}: {msg}" if msg
                           else f"FAIL raised {type(e).__name__} with no message")
            elif not isinstance(e, expect[0]):
                outcome = f"FAIL raised {type(e).__name__} (expected {expect[0]}): {msg}"
            elif not msg or not re.search(expect[1], msg):
                outcome = f"FAIL message {msg!r} does not match {expect[1]!r}"
            else:
                outcome = f"ok {type(e).__name__}: {msg}"
        else:
            outcome = "ok returned" if expect == OK else f"FAIL no exception (expected {expect[0]})"
        print(f"RESULT {i} {outcome}", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
