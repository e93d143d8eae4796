"""gpt2kern bench: one quick real run (every section, JSON and plot written), and its argument errors."""
import json
import time

import pytest
from test_cli import assert_one_line_error, cli_run  # noqa: F401  (fixture)

from gpt2kern import ops


def test_quick_bench_writes_table_json_and_plot(cli_run, tmp_path):  # noqa: F811
    j, p = tmp_path / "b.json", tmp_path / "b.png"
    code, out, err = cli_run("bench", "--quick", "-m", "random:tiny", "--reps", "5", "--new-tokens", "4",
                             "--json", j, "--plot", p, "--contend", "--weights", "all", "--speculative")
    assert code == 0, err
    res = json.loads(j.read_text())
    assert res["read_bandwidth_GBps"] > 0 and res["fma_peak_GFLOPs"] > 0
    kernels = {(k["kernel"], k["M"]) for k in res["kernels"]}
    for name in ("layer_norm", "add_layer_norm", "conv1d c_attn", "conv1d c_fc+gelu_new", "lm_head", "attention",
                 "embedding", "gelu_new", "conv1d mlp.c_proj+residual", "conv1d attn.c_proj"):
        assert (name, 1) in kernels and (name, 128) in kernels
    assert all(k["ratio"] > 0 and k["roofline_pct"] >= 0 for k in res["kernels"])
    measures = [e["measure"] for e in res["end_to_end"]]
    assert any("prefill" in m for m in measures) and any("gpt2kern.generate" in m for m in measures)
    assert res["parity"]["greedy tokens identical B=1"] == "4/4"
    assert res["parity"]["max |dlogits| prefill T=128"] < 1e-4
    assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    assert "kernels vs torch" in out and "end to end vs HF (sdpa attention" in out and "roofline" in out
    # the default baseline is HF as from_pretrained gives it (sdpa); eager, the parity reference, beside it
    assert res["hf_attn"] == "sdpa" and res["hf_second_attn"] == "eager"
    assert all(e["hf_eager_ms"] > 0 and e["ratio_eager"] > 0 for e in res["end_to_end"])
    assert "HF sdpa ms" in out and "HF eager ms" in out
    # off a terminal: a line per section with its time
    for section in ("roofline inputs", "kernels M=1", "kernels M=128", "prefill T=128", "decode B=1", "drop-in",
                    "weight modes: error", "decode with a busy core", "speculative"):
        assert f"bench: {section} (" in err, err
    load = res["machine_load"]
    assert load["other_cpus_before"] is not None and load["other_cpus_during"] is not None
    assert 0 <= load["median_spread"] and "machine load: other processes used" in out
    assert load["trusted"] == ("warning" not in load) and (("warning: this machine was busy" in out) != load["trusted"])
    dropin = [r["measure"] for r in res["dropin"]]
    assert any("guard.why_not" in m for m in dropin) and any("grad enabled" in m for m in dropin)
    guard = next(r for r in res["dropin"] if "guard.why_not" in r["measure"])  # a cost: a share, not a "speed-up"
    assert guard["ratio"] is None and 0 < guard["share_pct"] < 100 and "shown as" not in guard["measure"]
    assert all(r["ratio"] > 0 for r in res["dropin"] if r is not guard)
    # every table explains its columns once, under it
    for caption in ("M: rows (tokens) per call", "ratio = torch ms ÷ ours ms",
                    "each ratio = that HF column's ms ÷ ours ms",
                    "ratio = its ms ÷ ms", "µs per call", "ratio = ms/token ÷ 1 thread ms/token", "KLD: mean KL"):
        assert caption in " ".join(out.split()), caption
    assert [r["measure"].split(",")[1].strip() for r in res["contend"]][0] == "quiet"
    assert res["rss_added_MiB"] < 0.05 * res["weights_MiB"] + 1  # fp32 reads HF's weights in place
    modes = {r["mode"]: r for r in res["modes"]}
    x8 = ["int8, x int8"] if ops.int8_dot_kernels() else []  # the int8 dot products' row, where the CPU has them
    assert list(modes) == ["fp32", "fp16", "bf16", "int8", *x8] and "weight modes" in out
    assert modes["fp32"]["mean_kld"] < 1e-9 and modes["fp32"]["decode_B1_vs_fp32"] == 1.0
    for m in ("fp16", "bf16", "int8", *x8):
        r = modes[m]
        assert r["decode_B1_ms"] > 0 and r["prefill_T128_last_ms"] > 0 and 0 < r["mean_kld"] < 1e-3
    assert modes["int8"]["weight_MiB"] < 0.3 * modes["fp32"]["weight_MiB"]
    assert "kept busy by another process" in res["contend"][1]["measure"] and res["contend"][1]["ms"] > 0
    assert "drop-in" in out and "decode with a busy core" in out
    spec = {r["measure"]: r for r in res["speculative"]}  # (the run checked that the tokens equal plain fp32's)
    assert len(spec) == 3 and all(r["ms"] > 0 and r["speedup"] > 0 and r["tokens_per_pass"] >= 1 for r in spec.values())
    assert spec["B=1, int8 draft, k = 4"]["drafted"] > 0 and "speculative decoding vs plain fp32" in out


@pytest.mark.parametrize("args, needle", [
    (["--reps", "3"], "--reps"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--threads", "0"], "--threads"),
    (["-m", "random:nope"], "random:nope"),
    (["--new-tokens", "600", "-m", "random:tiny"], "n_positions"),
    (["--contend", "--device", "cuda"], "--contend measures the CPU path"),
    (["--speculative", "--device", "cuda"], "--speculative measures the CPU path"),
])
def test_bench_argument_errors(cli_run, args, needle):  # noqa: F811
    code, _, err = cli_run("bench", *args)
    assert_one_line_error(code, err, needle)


def test_sizes_fit_the_models_context(tiny):
    from gpt2kern.cli import bench

    assert bench.sizes(1024) == ((1, 8, 128, 512, 1024), (128, 512, 1024))
    assert bench.sizes(512) == ((1, 8, 128, 512), (128, 512))
    assert bench.sizes(64) == ((1, 8, 64), (64,))
    assert bench.sizes(64, quick=True) == ((1, 64), (64,))
    ms, _ = bench.sizes(tiny.config.n_positions)
    for M in ms:  # every row of a full run on a short-context model can be measured
        for _name, ours, theirs, _, _ in bench.kernel_cases(tiny.config, M, "cpu"):
            ours(), theirs()


def test_decode_rows_say_per_step_when_batched():
    from gpt2kern.cli import bench

    assert bench.decode_measure(1, "gpt2kern.generate").endswith("ms/token")
    b8 = bench.decode_measure(8, "gpt2kern.generate")
    assert "ms/step (8 tokens)" in b8 and "ms/token" not in b8


def test_a_busy_cpu_is_measured_and_makes_a_warning():
    from gpt2kern.cli import bench

    hog, _ = bench.busy_process()
    try:
        time.sleep(0.3)
        others = bench.MachineLoad.sample(1.0)
    finally:
        hog.kill()
        hog.wait()
    assert others is not None and others > 0.6  # one process spinning on a CPU
    v = bench.MachineLoad.verdict(0.0, others, 0.02)
    assert not v["trusted"] and f"other processes used {others:.1f} of" in v["warning"] and "during" in v["warning"]
    v = bench.MachineLoad.verdict(others, 0.1, 0.02)
    assert not v["trusted"] and "just before the run" in v["warning"]
    v = bench.MachineLoad.verdict(0.05, 0.1, 0.40)
    assert not v["trusted"] and "repeated timings spread 40 % (median)" in v["warning"]
    v = bench.MachineLoad.verdict(0.05, 0.1, 0.03)
    assert v["trusted"] and "warning" not in v

