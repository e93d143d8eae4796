"""bench/gpu_bench.py --sizes without a GPU: the target table and the verdicts from fake results (met, not met,
not measured), the deadline, the prefill winner and the table it goes into (its reading and applying:
test_cuda_table.py), HF's static cache + compiled forward as the bench sets it up, and the whole --sizes run on the
CPU with fakes for what needs a GPU (the CUDA-graph decoder, the device name, synchronize, ops.cuda_variant), so its
one run on a GPU does not die of a typo."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from test_cuda_table import fake_knobs

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def knobs(monkeypatch):
    return fake_knobs(monkeypatch)


@pytest.fixture(scope="module")
def gb():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    return gpu_bench


# ---------------------------------------------------------------- fake results

def prefill_row(speedup, err=5e-6, hf_ms=10.0):
    ms = hf_ms / speedup
    pairs = {"gemm2_attention1": dict(variants=dict(prefill_gemm=2, prefill_attention=1), ms=ms, max_abs_dlogits=err)}
    return dict(hf_sdpa_ms=hf_ms, pairs=pairs, best="gemm2_attention1", best_ms=ms, speedup=speedup,
                max_abs_dlogits=err)


def decode_row(best_ms, hf_ms=5.0, B=1, equal=True, floor_ms=None):
    decs = {"gemv2_kvwrite2": dict(ms=best_ms, variants=dict(gemv=2, kv_write=2), tokens_equal_hf=equal,
                                   launches_per_token={"kernel": 60}, kernels_per_token=60)}
    r = dict(batch_size=B, hf_sdpa_ms=hf_ms, decoders=decs, best="gemv2_kvwrite2", best_ms=best_ms,
             speedup=hf_ms / best_ms, default="gemv2_kvwrite2",
             tokens_equal_hf_by_decoder={"gemv2_kvwrite2": equal}, hf_tokens_per_s=B * 1e3 / hf_ms,
             best_tokens_per_s=B * 1e3 / best_ms, params=1)
    if floor_ms:
        r.update(floor_ms=floor_ms, floor_fraction=floor_ms / best_ms)
    return r


def weights_row(bf16, fp16, int8, fp32_equal=True):
    row = lambda ms: dict(ms=ms, variants={}, tokens_equal_hf=False, agree_tokens=20, of_tokens=24,  # noqa: E731
                          kernels_per_token=100)
    return dict(fp32=dict(row(6.5), tokens_equal_hf=fp32_equal, agree_tokens=24), bf16=row(bf16), fp16=row(fp16),
                int8=row(int8))


def all_met():
    sz = {"prefill_fp32/gpt2": prefill_row(1.3), "prefill_fp32/gpt2-medium": prefill_row(1.25),
          "prefill_fp32/gpt2-xl": prefill_row(1.21),
          "decode_b1/gpt2": decode_row(0.29, floor_ms=0.118), "decode_b1/gpt2-xl": decode_row(1.8, floor_ms=1.47),
          "hf_static_compiled/gpt2": dict(hf_ms=2.43, ours_ms=0.29, speedup=8.4, how="x", compile_s=15.0,
                                          tokens_equal_ours=True),
          "decode_weights/gpt2-xl": weights_row(0.9, 0.95, 0.55),
          "decode_b32/gpt2": decode_row(1.0, hf_ms=7.0, B=32),
          "prefill_bf16/gpt2": dict(hf_bf16_ms=4.0, ours_ms=3.9, speedup=4.0 / 3.9, ours_max_abs_dlogits_vs_fp32=0.1,
                                    hf_bf16_max_abs_dlogits_vs_fp32=0.3)}
    sz["parts"] = {k: "ok" for k in sz}
    sz.update(part_s={}, optional_parts=["hf_static_compiled/gpt2"], copy_bandwidth=dict(GBps=4230.0))
    return sz


def met_column(gb, sz):
    rows = gb.target_rows(sz)
    assert [r[0] for r in rows] == [t[0] for t in gb.TARGETS] and all(len(r) == 5 for r in rows)
    return [r[4] for r in rows]


# ---------------------------------------------------------------- the table and the verdicts

def test_target_table_met(gb):
    sz = all_met()
    assert met_column(gb, sz) == ["yes"] * 6
    md = gb.target_table(sz, "NVIDIA H200")
    assert "| measure | now | measured | target | met? |" in md and "NVIDIA H200" in md
    assert "0.36× / 0.39× / 0.39×" in md and "1.30× / 1.25× / 1.21×" in md  # the "now" beside ours
    assert "0.29 / 1.8 (82% of bandwidth on xl)" in md
    assert "8.40× (0.29 vs 2.43 ms/token)" in md and "7.00× (32,000 vs 4,571 tokens/s)" in md
    assert "0.9 / 0.95 / 0.55 (tokens = HF: bf16 20/24" in md
    assert "| yes |" in md and "| no |" not in md
    assert gb.sizes_failures(sz) == []


def test_target_table_not_met(gb):
    sz = all_met()
    sz["prefill_fp32/gpt2-medium"] = prefill_row(1.1)  # one size under 1.2x
    sz["decode_b1/gpt2-xl"] = decode_row(1.8, floor_ms=1.2)  # fast enough, but 67 % of the floor
    sz["hf_static_compiled/gpt2"]["speedup"] = 2.6
    sz["decode_weights/gpt2-xl"] = weights_row(0.9, 0.95, 0.7)
    sz["decode_b32/gpt2"] = decode_row(2.0, hf_ms=7.0, B=32)
    sz["prefill_bf16/gpt2"]["speedup"] = 0.5
    assert met_column(gb, sz) == ["no"] * 6
    assert gb.sizes_failures(sz) == []  # targets are reported, not failures
    # a prefill with every pair off parity: no best pair, "off parity", not met, and a failure
    off = prefill_row(2.0, err=3e-4)
    off.pop("speedup")
    off.pop("best_ms")
    off["best"] = None
    sz = dict(all_met(), **{"prefill_fp32/gpt2": off})
    assert met_column(gb, sz)[0] == "no" and "off parity" in gb.target_rows(sz)[0][2]
    f = gb.sizes_failures(sz)
    assert len(f) == 1 and "prefill_fp32/gpt2 gemm2_attention1" in f[0]


def test_target_table_not_measured(gb):
    sz = all_met()
    for k in ("prefill_fp32/gpt2-xl", "decode_b1/gpt2-xl", "hf_static_compiled/gpt2", "decode_weights/gpt2-xl",
              "decode_b32/gpt2", "prefill_bf16/gpt2"):
        del sz[k]
        sz["parts"][k] = gb.NOT_MEASURED
    rows = gb.target_rows(sz)
    assert [r[4] for r in rows] == ["not measured"] * 6
    assert rows[0][2].startswith("1.30× / 1.25× / not measured")
    assert rows[1][2] == "0.29 / not measured"
    assert gb.sizes_failures(sz) == []  # time ran out: not a failure
    # a measured miss still says "no" though another size was not measured
    sz["prefill_fp32/gpt2"] = prefill_row(0.4)
    assert gb.target_rows(sz)[0][4] == "no"
    # a part never reached (a killed run) and one that raised
    sz = all_met()
    del sz["decode_b32/gpt2"], sz["parts"]["decode_b32/gpt2"]
    sz["parts"]["decode_weights/gpt2-xl"] = "error: RuntimeError: boom"
    del sz["decode_weights/gpt2-xl"]
    rows = gb.target_rows(sz)
    assert rows[4][2] == "not run" and rows[3][2] == "error" and rows[3][4] == rows[4][4] == "not measured"
    f = gb.sizes_failures(sz)
    assert f == ["decode_weights/gpt2-xl: error: RuntimeError: boom"]
    # an optional part's error (HF's compiled path) is reported, not a failure
    sz = all_met()
    del sz["hf_static_compiled/gpt2"]
    sz["parts"]["hf_static_compiled/gpt2"] = "error: TimeoutError: did not finish"
    assert gb.sizes_failures(sz) == [] and gb.target_rows(sz)[2][2] == "error"


def test_failures_on_decoder_tokens(gb):
    sz = all_met()
    sz["decode_b32/gpt2"] = decode_row(1.0, hf_ms=7.0, B=32, equal=False)
    f = gb.failures(dict(sizes=sz))
    assert len(f) == 1 and "decode_b32/gpt2" in f[0] and "gemv2_kvwrite2" in f[0]
    sz["decode_b32/gpt2"]["tokens_equal_hf_by_decoder"] = {}
    assert gb.failures(dict(sizes=sz))  # nothing compared is not a pass
    sz = all_met()  # the reduced weight modes' tokens are reported, never a failure; the fp32 decoder's are checked
    sz["decode_weights/gpt2-xl"] = weights_row(0.9, 0.95, 0.55, fp32_equal=False)
    assert gb.failures(dict(sizes=sz)) == [
        "decode_weights/gpt2-xl: the greedy tokens of the fp32 decoder differ from HF's"]
    sz["decode_weights/gpt2-xl"]["fp32"]["tokens_equal_hf"] = True
    assert gb.failures(dict(sizes=sz)) == []


def test_deadline(gb):
    now = [100.0]
    d = gb.Deadline(60, age=10, clock=lambda: now[0])  # 10 s of it went before main (imports)
    assert d.left() == 50 and d.allows(50) and not d.allows(50.5)
    now[0] = 140
    assert d.left() == 10 and not d.allows(11)
    assert gb.Deadline(None).allows(1e9)
    assert 0 <= gb.process_age() < 3600
    # the runner: a part that does not fit is "not measured (time)" and does not run; one that raises is an
    # error and the next one still runs; every part is saved
    saved = []
    run = gb.SizesRun(d, save=lambda r: saved.append(dict(r["parts"])))
    ran = []
    assert run.part("a", 5, lambda: ran.append("a") or dict(x=1)) == dict(x=1)
    assert run.part("b", 11, lambda: ran.append("b")) is None
    run.part("c", 1, lambda: 1 / 0)
    run.part("d", 1, lambda: 1 / 0, optional=True)
    assert ran == ["a"] and run.res["a"] == dict(x=1) and "b" not in run.res
    assert run.res["parts"] == {"a": "ok", "b": gb.NOT_MEASURED, "c": "error: ZeroDivisionError: division by zero",
                                "d": "error: ZeroDivisionError: division by zero"}
    assert len(saved) == 4 and saved[-1] == run.res["parts"]
    assert gb.sizes_failures(run.res) == ["c: error: ZeroDivisionError: division by zero"]


def test_pick_prefill(gb):
    def row(times, errs=None):
        errs = errs or {}
        return dict(pairs={k: dict(variants=dict(prefill_gemm=int(k[4]), prefill_attention=int(k[-1])), ms=ms,
                                   max_abs_dlogits=errs.get(k, 1e-5)) for k, ms in times.items()})
    a = {"gemm2_attention1": 10.0, "gemm3_attention1": 8.0, "gemm2_attention2": 9.0, "gemm3_attention2": 7.0}
    sz = {"prefill_fp32/gpt2": row(a), "prefill_fp32/gpt2-xl": row({k: v * 10 for k, v in a.items()})}
    assert gb.pick_prefill(sz) == dict(prefill_gemm=3, prefill_attention=2)
    # the fastest pair is off parity at one size: never picked
    sz["prefill_fp32/gpt2-xl"] = row({k: v * 10 for k, v in a.items()}, errs={"gemm3_attention2": 2e-4})
    assert gb.pick_prefill(sz) == dict(prefill_gemm=3, prefill_attention=1)
    # sizes disagree: the smallest sum of time / the size's fastest
    sz = {"prefill_fp32/gpt2": row({"gemm2_attention1": 10.0, "gemm3_attention1": 12.0}),
          "prefill_fp32/gpt2-xl": row({"gemm2_attention1": 130.0, "gemm3_attention1": 100.0})}
    assert gb.pick_prefill(sz) == dict(prefill_gemm=3, prefill_attention=1)  # 1.2 + 1.0 < 1.0 + 1.3
    assert gb.pick_prefill({}) is None and gb.pick_prefill({"prefill_fp32/gpt2": None}) is None
    assert gb.pick_prefill({"prefill_fp32/gpt2": row({"gemm2_attention1": 1.0}, {"gemm2_attention1": 1.0})}) is None


def test_variant_table_gets_the_prefill_winner(gb, tmp_path):
    from gpt2kern.decode import cuda_graph
    from gpt2kern.kernels import cuda_table
    out = tmp_path / "cuda_variants.json"
    by_batch = {"1": dict(gemv=3, kv_write=3, launch=2)}
    gb.write_variant_table(str(out), "Some GPU", by_batch, "gpu_bench")  # gpu_check's gpu_bench step
    gb.write_variant_table(str(out), "Some GPU", None, "sizes", prefill=dict(prefill_gemm=3), base=str(out))
    t = json.loads(out.read_text())["gpus"]
    assert t["Some GPU"] == dict(measured="gpu_bench", by_batch=by_batch, prefill=dict(prefill_gemm=3),
                                 prefill_measured="sizes")
    assert "NVIDIA H200" in t  # the packaged entries stay
    assert cuda_graph.default_variants("Some GPU", 1, table=t) == by_batch["1"]  # the decoder's part still reads
    assert cuda_table.prefill_defaults("Some GPU", t) == dict(prefill_gemm=3)
    # a GPU with no decoder entry yet gets an empty one (the decoder then runs UNLISTED)
    gb.write_variant_table(str(out), "New GPU", None, "sizes", prefill=dict(prefill_attention=2), base=str(out))
    t = cuda_table.load(str(out))
    assert t["New GPU"]["by_batch"] == {} and cuda_graph.default_variants("New GPU", 1, table=t) == \
        cuda_graph.UNLISTED["1"]


# ---------------------------------------------------------------- the script

def test_gpu_bench_help_and_no_gpu():
    r = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--sizes" in r.stdout and "--deadline-s" in r.stdout and "--table-out" in r.stdout
    r = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--sizes", "--deadline-s", "60"],
                       capture_output=True, text=True, timeout=120, env=dict(__import__("os").environ,
                                                                             CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2 and "no CUDA GPU" in r.stdout


def test_hf_static_compiled_runs_as_documented(gb):
    """HF's static cache with a compiled forward, as the bench sets it up, on this transformers (scripts/floor.sh
    runs this file on the GPU image's, pyproject's floor): dynamo's fullgraph trace must accept GPT-2's forward with
    the static cache; the eager backend (no inductor) keeps it quick; tokens equal HF's plain greedy."""
    from gpt2kern.model.loading import random_model
    torch._dynamo.reset()
    hf = random_model("tiny", attn_implementation="sdpa")
    prompt = torch.randint(0, hf.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    want = hf.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    comp = random_model("tiny", attn_implementation="sdpa")
    # on a GPU, generate also compiles the model's __call__ around that forward (its automatic compile with a
    # static cache, transformers 5.x); here as there, with the eager backend
    from transformers import CompileConfig
    auto = CompileConfig(backend="eager", mode=None)
    auto._compile_all_devices = True
    comp.generation_config.compile_config = auto
    gen = gb.hf_static_compiled(comp, 5 + 8, dict(backend="eager", fullgraph=True))
    got = [gen(prompt, n) for n in (8, 6, 6)]  # the longest first, as the worker does
    torch._dynamo.reset()
    assert torch.equal(got[-1], want) and got[0].shape[1] == 5 + 8


# ---------------------------------------------------------------- the whole run on the CPU, with fakes

class FakeDecoder:
    """CudaGraphDecoder's interface over HF's greedy generate of the optimized model, on the CPU."""

    def __init__(self, model, batch_size, max_len, gemv=None, kv_write=None, weights=None, launch=None):
        from gpt2kern.decode import cuda_graph
        self.model, self.B, self.Tmax = model, batch_size, max_len
        mode = weights or "fp32"
        given = dict(gemv=gemv, kv_write=kv_write, launch=launch)
        self.variants = cuda_graph.default_variants("Fake GPU", batch_size, mode, given, sm=90)
        why = cuda_graph.refusals(self.variants, batch_size, mode, sm=90)
        if why:
            raise ValueError("; ".join(why.values()))
        self.launches_per_token = {"kernel": 42, "total": 43}

    def generate(self, input_ids, max_new_tokens, attention_mask=None):
        assert input_ids.shape[0] == self.B and input_ids.shape[1] + max_new_tokens <= self.Tmax
        return self.model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=0)


def test_sizes_runs_on_the_cpu_with_fakes(gb, knobs, monkeypatch, tmp_path):
    from gpt2kern.decode import cuda_graph
    from gpt2kern.model import loading
    real = loading.random_model
    monkeypatch.setattr(loading, "random_model", lambda name, **kw: real("tiny", **kw))  # every size: tiny
    monkeypatch.setattr(cuda_graph, "CudaGraphDecoder", FakeDecoder)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # an H100/H200: sm_90
    monkeypatch.setattr(gb, "COPY_BYTES", 2 ** 20)
    monkeypatch.setattr(gb, "DECODE_N", (2, 4))
    monkeypatch.setattr(gb, "PREFILL_T", 32)
    monkeypatch.setattr(gb, "TOKENS_N", 3)
    monkeypatch.setattr(gb, "run_hf_compiled", lambda deadline: dict(hf_ms=2.0, ours_ms=0.5, speedup=4.0, how="x",
                                                                     compile_s=1.0, tokens_equal_ours=True))
    # and a time budget that runs out before the extras: they are recorded, not run
    monkeypatch.setattr(gb.SizesRun, "part", _part_until(gb.SizesRun.part, "decode_b1/gpt2-medium"))
    res = dict(device="Fake GPU")
    saved = []

    def save(sz):
        saved.append(sz)
        (tmp_path / "t.md").write_text(gb.target_table(sz, res["device"]))

    sz = gb.sizes(gb.Deadline(None), save, dev=torch.device("cpu"))
    res["sizes"] = sz
    assert sz["knob_choices"] == dict(prefill_gemm=[1, 2, 3], prefill_attention=[1, 2])
    assert sz["knobs_at_end"] == sz["knobs_at_start"] == dict(prefill_gemm=2, prefill_attention=1)  # restored
    parts = sz["parts"]
    assert [k for k, v in parts.items() if v != "ok"] == ["decode_b1/gpt2-medium", "prefill_bf16/gpt2-medium",
                                                          "prefill_bf16/gpt2-xl"], parts
    assert {parts[k] for k in ("decode_b1/gpt2-medium", "prefill_bf16/gpt2-medium", "prefill_bf16/gpt2-xl")} == {
        gb.NOT_MEASURED}
    p = sz["prefill_fp32/gpt2"]
    assert len(p["pairs"]) == 6 and p["best"] in p["pairs"] and p["max_abs_dlogits"] < 1e-4
    assert sz["prefill_defaults"] in [x["variants"] for x in p["pairs"].values()]
    d = sz["decode_b1/gpt2"]
    pairs = {"gemv2_kvwrite2", "gemv3_kvwrite2", "gemv3_kvwrite3", "gemv4_kvwrite2", "gemv4_kvwrite3", "gemv5_kvwrite2"}
    assert set(d["decoders"]) == pairs | {p + "_pdl" for p in pairs} and all(d["tokens_equal_hf_by_decoder"].values())
    assert d["default"] == "gemv2_kvwrite2" and list(d["decoders"])[0] == d["default"]  # the table's, first
    assert d["decoders"]["gemv2_kvwrite2"]["kernels_per_token"] == 42
    assert 0 < d["floor_ms"] and d["floor_fraction"] > 0
    assert len(sz["decode_b1/gpt2-xl"]["decoders"]) <= 2  # the default and gpt2's fastest
    assert sz["decode_b32/gpt2"]["batch_size"] == 32 and sz["decode_b32/gpt2"]["best_tokens_per_s"] > 0
    assert set(sz["decode_weights/gpt2-xl"]) == {"fp32", "bf16", "fp16", "int8"}
    assert sz["prefill_bf16/gpt2"]["speedup"] > 0
    assert gb.failures(res) == []
    md = (tmp_path / "t.md").read_text()
    # (the CPU's timings say nothing of the targets: only that every row was judged)
    assert {r[4] for r in gb.target_rows(sz)} <= {"yes", "no"} and len(saved) == len(parts)
    assert "decode_b1/gpt2-medium not measured (time)" in md


def _part_until(part, stop):
    """SizesRun.part with the deadline spent from the part `stop` on."""
    def wrapped(self, key, est_s, fn, optional=False):
        if key == stop:
            self.deadline.end = self.deadline.clock()
        return part(self, key, est_s, fn, optional)
    return wrapped


def test_hf_compiled_child_is_bounded(gb, monkeypatch, tmp_path):
    # the child runs this script with --hf-compiled-worker OUT (here stand-ins for it): its JSON is the part's
    # result, a non-zero exit an error of the part, and a child past its time (the deadline less 5 s, at least 1 s)
    # is killed with its session: a TimeoutError
    import time
    child = tmp_path / "child.py"
    monkeypatch.setattr(gb, "__file__", str(child))
    child.write_text("import json, sys\njson.dump(dict(speedup=3.0), open(sys.argv[2], 'w'))\n")
    assert gb.run_hf_compiled(gb.Deadline(None)) == dict(speedup=3.0)
    child.write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(RuntimeError, match="child exited with 2"):
        gb.run_hf_compiled(gb.Deadline(None))
    child.write_text("import time\ntime.sleep(60)\n")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish in 1s"):
        gb.run_hf_compiled(gb.Deadline(3))
    assert time.monotonic() - t0 < 10


def test_decoder_sets_and_names(gb, monkeypatch):
    # every variant name of the decoder (gemv, kv_write, launch), those this GPU and batch size can run, the
    # table's default first; launch 2 (programmatic dependent launch) needs sm_90
    from gpt2kern.decode import cuda_graph
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    sets = gb.decode_combos(1)
    assert sets[0] == cuda_graph.default_variants("NVIDIA H200", 1, sm=90) and len(sets) == len(
        {gb.decoder_name(v) for v in sets}) == 12
    assert all(not cuda_graph.refusals(v, 1, sm=90) for v in sets)
    assert gb.decoder_name(dict(gemv=3, kv_write=3, launch=2)) == "gemv3_kvwrite3_pdl"
    assert gb.decoder_name(dict(gemv=None, kv_write=2, launch=1)) == "gemvNone_kvwrite2"
    only = [dict(gemv=4, kv_write=3, launch=2)]
    assert gb.decode_combos(1, only) == [sets[0], only[0]]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    assert all(v["launch"] == 1 for v in gb.decode_combos(1)) and len(gb.decode_combos(1)) == 6
    assert len(gb.decode_combos(33)) == 1  # over 32 rows: no decode GEMV, the default's conv1d path only
