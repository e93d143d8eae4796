"""bench/gpu_check.sh without a GPU: it must stop at once with a clear message (never build, never pass because
every CUDA test skipped), and its step limits must fit its budget, correctness steps first."""
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"


def run(*args, **env):
    e = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=120)


def test_fails_fast_without_a_gpu(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this runs the same on a GPU machine
    out, logs = tmp_path / "out", tmp_path / "logs"
    r = run(OUT=str(out), GPU_CHECK_LOGS=str(logs), CUDA_VISIBLE_DEVICES="")
    assert r.returncode != 0
    assert "gpu_check: FAILED" in r.stderr and "no usable CUDA GPU" in r.stderr, r.stderr
    assert "torch.cuda.is_available() is False" in r.stderr or "CPU-only build" in r.stderr, r.stderr
    assert (logs / "gpu_assert.log").exists()
    assert not (logs / "build.log").exists()  # nothing was built or tested after the failed assert
    # what a device machine returns: the logs packed into one file, $OUT holding no loose logs
    with tarfile.open(out / "gpu_check_logs.tar.gz") as t:
        assert {"./env.log", "./gpu_assert.log"} <= set(t.getnames())
    assert not list(out.glob("*.log"))


def test_a_compiler_setup_py_would_refuse_is_replaced(tmp_path):
    # a g++ whose every -lstdc++ names the static archive: setup.py's fix cannot help, so the check builds with
    # the compiler buildtools/libstdcxx.py finds instead (the GPU image's CXX was of this kind, less stubborn)
    cxx = tmp_path / "g++-hopeless"
    cxx.write_text('#!/bin/sh\nargs=""; for a in "$@"; do [ "$a" = -lstdc++ ] && a=-l:libstdc++.a; '
                   'args="$args $a"; done\nexec g++ $args -static-libstdc++\n')
    cxx.chmod(0o755)
    logs = tmp_path / "logs"
    r = run(OUT=str(tmp_path / "out"), GPU_CHECK_LOGS=str(logs), CUDA_VISIBLE_DEVICES="", CXX=str(cxx))
    assert f"gpu_check: {cxx} links a private libstdc++ even with setup.py's fix; using CXX=" in r.stderr, r.stderr
    assert "defines" in (logs / "env.log").read_text()


def budgets():
    r = run("--budgets")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    return [(n, int(s)) for n, s in rows]


def test_step_budgets_fit_the_total_correctness_first():
    rows = budgets()
    steps = rows[:-2]
    (t, total), (b, budget) = rows[-2:]
    assert (t, b) == ("total", "budget")
    assert total == sum(s for _, s in steps) and all(s > 0 for _, s in steps)
    assert total <= budget <= 9 * 60 - 10  # a 15-minute device window less the machine's start; ~10 s outside steps
    names = [n for n, _ in steps]
    assert names[:3] == ["gpu_assert", "build", "cuda_tests"] and names[-2:] == ["gpu_bench", "gpu_sizes"]
    assert {"memcheck", "racecheck", "initcheck"} <= set(names[3:-2])
    # >= 20 % over each step's time in the last GPU run (bench/RESULTS-gpu.md, 2026-12-04 pass 2)
    measured = dict(gpu_assert=5, build=39, cuda_tests=166, memcheck=13, memcheck_decode=6, racecheck=9,
                    racecheck_decode=11, initcheck=6, gpu_bench=25)
    limits = dict(steps)
    assert all(limits[n] >= 1.2 * t for n, t in measured.items()), limits
    # gpu_sizes: inside its deadline (the limit less SIZES_MARGIN) at least the parts before the optional ones
    # (~58 s on an H200 by bench/gpu_bench.py's header; the HF compile row and the extras may be left for a second
    # call): the CUDA tests' limit comes first
    assert limits["gpu_sizes"] - 12 >= 80


def test_a_budget_below_the_steps_is_refused(tmp_path):
    r = run(OUT=str(tmp_path), GPU_CHECK_BUDGET_S="100")
    assert r.returncode == 2 and "more than the budget of 100s" in r.stderr
    assert not (tmp_path / "gpu_assert.log").exists()


def test_gpu_bench_without_a_gpu_is_not_a_pass():
    e = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(SCRIPT.parent / "gpu_bench.py"), "--quick"], capture_output=True,
                       text=True, env=e, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stdout


def test_gpu_bench_fails_on_any_decoder_or_variant_off_reference():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    ok = dict(tokens_equal_hf_by_decoder={"decoder_no_graph": True, "decoder_cuda_graph": True,
                                          "decoder_cuda_graph_gemv2": True})
    row = dict(kernel="decode_gemv", variant="v2", shape="M=1", us=1.0, max_abs_err=1e-6)
    assert gpu_bench.failures(dict(e2e={"decode_B1": ok}, variants=[row])) == []
    for name in ok["tokens_equal_hf_by_decoder"]:  # every decoder path counts, not only the default graph
        bad = dict(tokens_equal_hf_by_decoder={**ok["tokens_equal_hf_by_decoder"], name: False})
        f = gpu_bench.failures(dict(e2e={"decode_B1": ok, "decode_B32": bad}))
        assert len(f) == 1 and "decode_B32" in f[0] and name in f[0]
    assert gpu_bench.failures(dict(e2e={"decode_B1": dict(tokens_equal_hf_by_decoder={})}))  # nothing compared
    off = dict(row, max_abs_err=1e-2)
    assert len(gpu_bench.failures(dict(variants=[off]))) == 1
    assert gpu_bench.failures(dict(variants=[dict(off, variant="torch")])) == []  # context rows are not judged
    lowp = dict(kernel="conv1d_weights", mode="int8", shape="M=1 K=768 N=2304", us=1.0, speedup_vs_fp32=3.0,
                weight_GBps=1e3, rel_err=1e-7)
    assert gpu_bench.failures(dict(weight_modes=[lowp])) == []
    f = gpu_bench.failures(dict(weight_modes=[lowp, dict(lowp, mode="bf16", rel_err=1e-3)]))
    assert len(f) == 1 and "bf16" in f[0]
    # the decode GEMV variant 2's rows (matmul_nk over the [out, in] copies) are judged alike, and named
    nk = dict(lowp, variant="nk_v2")
    assert gpu_bench.failures(dict(weight_modes=[nk, dict(lowp, variant="conv1d")])) == []
    f = gpu_bench.failures(dict(weight_modes=[dict(nk, mode="fp16", rel_err=1e-3)]))
    assert len(f) == 1 and "nk_v2 fp16" in f[0]


def test_gpu_bench_picks_the_fastest_decoder_with_hf_tokens_and_writes_the_table(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    from gpt2kern.decode import cuda_graph
    v = lambda g, k, la=1: dict(gemv=g, kv_write=k, launch=la)  # noqa: E731
    b1 = dict(decoder_no_graph_ms_per_step=0.9, slow_ms_per_step=0.5, fast_ms_per_step=0.2,
              faster_ms_per_step=0.1, hf_ms_per_step=8.0,
              tokens_equal_hf_by_decoder=dict(decoder_no_graph=True, slow=True, fast=True, faster=False),
              decoder_variants=dict(slow=v(3, 2), fast=v(4, 3), faster=v(2, 2)))
    b32 = dict(slow_ms_per_step=0.7, fast_ms_per_step=0.8, tokens_equal_hf_by_decoder=dict(slow=True, fast=True),
               decoder_variants=dict(slow=v(3, 2), fast=v(4, 3)))
    # "faster" has other tokens than HF: never a default; the no-graph decoder is not a candidate
    picked = gpu_bench.pick_defaults(dict(prefill_T512={}, decode_B1=b1, decode_B32=b32))
    assert picked == {"1": v(4, 3), "32": v(3, 2)}
    assert gpu_bench.pick_defaults(dict(decode_B1=dict(b1, tokens_equal_hf_by_decoder={}))) == {}
    out = tmp_path / "cuda_variants.json"
    table = gpu_bench.write_variant_table(str(out), "Some GPU", picked, "today")
    assert cuda_graph.variant_table(str(out)) == table["gpus"] and table["gpus"]["Some GPU"]["by_batch"] == picked
    # and the decoder's chooser reads it: nearest measured batch size at or below, stepped back where it cannot run
    t = table["gpus"]
    pick = cuda_graph.default_variants
    assert pick("Some GPU", 1, table=t) == v(4, 3)
    assert pick("Some GPU", 8, table=t) == v(4, 3)
    assert pick("Some GPU", 32, table=t) == v(3, 2)
    assert pick("Some GPU", 4, "int8", table=t) == v(None, 3)  # gemv 3-4 read fp32: the reduced mode's own GEMV
    assert pick("Some GPU", 4, "int8", given=dict(gemv=2), table=t) == v(2, 2)  # variant 2 over int8, given
    assert pick("Some GPU", 4, given=dict(gemv=2), table=t) == v(2, 2)  # kv_write 3 cannot follow gemv 2
    assert pick("Some GPU", 4, given=dict(gemv=2, kv_write=3), table=t) == v(2, 3)  # given: kept, and refused
    assert set(cuda_graph.refusals(v(2, 3), 4)) == {"kv_write"}
    # a GPU not in the table: the measured winners, small batches' set below 32 rows and the other from 32 on
    assert pick("Another GPU", 1, table=t) == pick("Another GPU", 31, table=t) == cuda_graph.UNLISTED["1"]
    assert pick("Another GPU", 32, table=t) == cuda_graph.UNLISTED["32"]
    assert pick("Another GPU", 64, table=t) == v(None, 2)  # > 32 rows: no decode GEMV, conv1d's path
    wide = {"Some GPU": dict(by_batch={"64": v(3, 3)})}
    assert pick("Some GPU", 64, table=wide) == v(None, 2)
    assert pick("Some GPU", 1, table=wide) == v(3, 3)  # below every size: the smallest
    newer = {"Some GPU": dict(by_batch={"1": v(9, 2)})}
    assert pick("Some GPU", 1, table=newer) == cuda_graph.UNLISTED["1"]  # an unknown variant: as if not listed
    older = {"Some GPU": dict(by_batch={"1": dict(attention=2, **v(4, 3))})}  # a choice that went: not read
    assert pick("Some GPU", 1, table=older) == v(4, 3)
    before_launch = {"Some GPU": dict(by_batch={"1": dict(gemv=4, kv_write=3)})}  # measured before `launch` existed:
    assert pick("Some GPU", 1, table=before_launch) == v(4, 3, 1)  # plain launches
    pdl = {"Some GPU": dict(by_batch={"1": v(2, 2, 2)})}
    assert pick("Some GPU", 1, table=pdl, sm=90) == pick("Some GPU", 1, table=pdl) == v(2, 2, 2)
    assert pick("Some GPU", 1, table=pdl, sm=80) == v(2, 2, 1)  # programmatic launch needs sm_90: stepped back
    assert pick("Some GPU", 1, given=dict(launch=2), table=t, sm=80) == v(4, 3, 2)  # given: kept, and refused
    assert cuda_graph.refusals(v(4, 3, 2), 1, sm=80) == {"launch": "launch=2 needs an sm_90 or newer GPU, this one "
                                                                   "is sm_80"}
    assert not cuda_graph.refusals(v(4, 3, 2), 1, sm=90) and not cuda_graph.refusals(v(4, 3, 2), 1)
    assert set(cuda_graph.refusals(v(3, 3), 33)) == {"gemv", "kv_write"}
    assert set(cuda_graph.refusals(v(3, 3), 4, "bf16")) == {"gemv"} and not cuda_graph.refusals(v(None, 3), 4, "bf16")


def test_the_packaged_variant_table_names_known_variants():
    from gpt2kern.decode import cuda_graph
    tables = dict(cuda_graph.variant_table(), unlisted=dict(by_batch=cuda_graph.UNLISTED))
    for gpu, entry in tables.items():
        for b, v in entry["by_batch"].items():
            assert int(b) >= 1 and set(v) == set(cuda_graph.VARIANTS), (gpu, b, v)
            assert all(v[k] in cuda_graph.VARIANTS[k] for k in v), (gpu, b, v)
            assert not cuda_graph.refusals(v, int(b)), (gpu, b, v)  # fp32 at its own batch size runs it as measured


@pytest.mark.parametrize("name", ["DECODE_SMALL", "RACE_SMALL"])
def test_the_sanitizer_steps_name_tests_that_exist(name):
    """gpu_check.sh's racecheck and *_decode steps name tests by id: each must still be collected (here, where it
    skips), or the step would fail on the GPU machine for a renamed parametrization."""
    import re
    text = SCRIPT.read_text()
    block = text[text.index(f"{name}=("):]
    ids = re.findall(r'"(tests/[^"]+)"', block[:block.index(")\n")])
    assert len(ids) >= 5
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *ids],
                       capture_output=True, text=True, cwd=SCRIPT.parent.parent, timeout=120)
    assert r.returncode == 0 and f"{len(ids)} tests collected" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_gpu_bench_kernel_summary_splits_busy_time_from_gaps():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    # two steps of three kernels: 2 + 1 + 3 us busy per step over a 10 us span per step
    ks = [("gemv_nk_kernel<1, true>(float const*)", 0, 2), ("attention", 4, 5), ("gemv_nk_kernel<1, true>(x)", 7, 10),
          ("gemv_nk_kernel<1, true>(float const*)", 10, 12), ("attention", 14, 15), ("ln", 17, 20)]
    a = gpu_bench.kernel_summary(ks, 2, top=2)
    assert a["kernels_per_step"] == 3 and a["busy_us_per_step"] == 6 and a["span_us_per_step"] == 10
    assert a["busy_fraction"] == 0.6
    assert a["top"] == [dict(kernel="gemv_nk_kernel<1, true>", us_per_step=3.5), dict(kernel="ln", us_per_step=1.5)]
    assert "3 kernels/step" in gpu_bench.anatomy_line(a) and "(60%)" in gpu_bench.anatomy_line(a)
    assert gpu_bench.kernel_summary([], 4)["busy_fraction"] is None
    assert "no kernel profile (RuntimeError: x)" in gpu_bench.anatomy_line(dict(error="RuntimeError: x"))
