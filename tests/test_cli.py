"""The `gpt2kern` command line: the real console script in subprocesses (output, exit codes, one-line errors,
Ctrl-C), and the rest in-process through the same entry point, main(argv)."""
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from conftest import no_gpu

import gpt2kern
import gpt2kern.model.loading
from gpt2kern.cli import main as cli
from gpt2kern.model import steps

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS="160", PYTHONUNBUFFERED="1")


def run(*args, timeout=180):
    """The console script as users run it: python -m gpt2kern ..., with this checkout on the path."""
    return subprocess.run([sys.executable, "-m", "gpt2kern", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


@pytest.fixture
def cli_run(capsys, monkeypatch):
    """In-process: main(argv) -> (exit code, stdout, stderr)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def go(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return go


def assert_one_line_error(code, err, *needles, notes=()):
    """Exit 2 and one `error:` line holding the needles, the last line on stderr; before it exactly one `note:` line
    per entry of `notes`, holding that text (none by default)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 + len(notes) and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[-1], lines[-1]
    for line, n in zip(lines, notes):
        assert line.startswith("note: ") and n in line, err


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """A tiny GPT-2 saved with a real HF GPT-2 (byte-level BPE) tokenizer, trained here: no Hub needed."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    d = tmp_path_factory.mktemp("text_model")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The quick brown fox jumps over the lazy dog. Hello world, said the model. " * 4],
                            vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = GPT2Tokenizer(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                        unk_token="<|endoftext|>")
    eos = tok.eos_token_id
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos,
                     eos_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory):
    """random:tiny saved with its eos set to the 3rd token greedy decoding produces after '1 2 3'."""
    m, _ = gpt2kern.load("random:tiny")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones_like(ids))
    eos = int(out[0, -1])
    m.config.eos_token_id = m.generation_config.eos_token_id = eos
    d = tmp_path_factory.mktemp("eos_model")
    m.save_pretrained(d)
    return d, eos, out[0, 3:].tolist()


# ---------------------------------------------------------------- the real console script

def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["gpt2kern"] == "gpt2kern.cli.main:main"
    assert {"typer", "rich"} <= {re.split(r"[<>=\[ ]", d)[0] for d in meta["project"]["dependencies"]}
    assert cli.main(["--help"]) == 0


def test_the_installed_gpt2kern_executable():
    """The `gpt2kern` command pip installed (what users type), not only `python -m gpt2kern`."""
    exe = Path(sysconfig.get_path("scripts")) / "gpt2kern"
    assert exe.is_file(), f"{exe} is missing: install the project (pip install --no-build-isolation -e .)"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "next", "trace", "parity", "bench"))
    r = subprocess.run([str(exe), "next", "1 2", "-m", "random:tiny", "--json"], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["top"]) == 10
    r = subprocess.run([str(exe), "generate", "1 2", "-m", "random:tiny", "--temperature", "0"], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=120)
    assert_one_line_error(r.returncode, r.stderr, "temperature")


def test_generate_ids_on_random_tiny():
    r = run("generate", "1 2 3", "--model", "random:tiny", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    ids = lines[0].split()
    assert ids[:3] == ["1", "2", "3"] and 3 < len(ids) <= 11 and all(i.isdigit() for i in ids)
    assert re.search(r"\d+ tokens in [\d.]+ s: [\d.e+]+ tokens/s", r.stdout)
    assert "Traceback" not in r.stderr


def test_generate_text_streams_and_compares_with_hf(text_model_dir):
    r = run("generate", "Hello world, the", "-m", text_model_dir, "-n", "6", "--compare-hf")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello world, the")
    assert "tokens/s" in r.stdout and "HF eager" in r.stdout
    assert "identical tokens" in r.stdout and "× HF" in r.stdout


def _sigint_as_a_terminal_delivers_it():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite started in the background inherits SIGINT ignored


def test_generate_ctrl_c_stops_cleanly():
    p = subprocess.Popen([sys.executable, "-m", "gpt2kern", "generate", "46 20", "-m", "random:tiny",
                          "-n", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                         preexec_fn=_sigint_as_a_terminal_delivers_it)
    try:
        got = ""
        deadline = time.time() + 120
        while len(got.split()) < 4 and time.time() < deadline:  # the prompt's 2 ids, then generated ones
            got += p.stdout.read(1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted after" in err
    assert (got + out).split()[:2] == ["46", "20"] and len((got + out).split()) < 502


def test_next_table(text_model_dir):
    r = run("next", "The quick brown", "-m", text_model_dir)
    assert r.returncode == 0, r.stderr
    for col in ("token", "id", "probability", "logit"):
        assert col in r.stdout
    assert len(re.findall(r"^│\s+\d+ │", r.stdout, re.M)) == 10  # the default --top-k 10 rows
    assert "vs HF: max |Δlogit|" in r.stdout


def test_trace_table_in_execution_order():
    r = run("trace", "1 2 3", "-m", "random:tiny")
    assert r.returncode == 0, r.stderr
    names = steps.step_names(gpt2kern.model.loading.random_config("tiny"))
    pos = [r.stdout.find(f" {n} ") for n in names]
    assert all(p > 0 for p in pos) and pos == sorted(pos), "steps missing or out of execution order"


def test_trace_layer_wpe_prints_the_position_embeddings(cli_run):
    code, out, err = cli_run("trace", "1 2 3", "-m", "random:tiny", "--layer", "wpe")
    assert code == 0, err
    assert "position embedding" in out and "[3, 32]" in out and "tensor(" in out
    wpe = gpt2kern.load("random:tiny")[0].transformer.wpe.weight
    assert f"{wpe[0, 0].item():.4f}" in out and f"{wpe[2, 1].item():.4f}" in out


def test_next_json(cli_run):
    code, out, err = cli_run("next", "1 2 3", "-m", "random:tiny", "--top-k", "5", "--json")
    assert code == 0, err
    res = json.loads(out)
    probs = [t["probability"] for t in res["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    logits = [t["logit"] for t in res["top"]]
    assert logits == sorted(logits, reverse=True)
    assert res["fast_path"] and res["same_top_k_as_hf"] and res["max_abs_logit_diff_vs_hf"] < 1e-4
    m, _ = gpt2kern.load("random:tiny")
    with torch.no_grad():
        ref = torch.softmax(m(torch.tensor([[1, 2, 3]])).logits[0, -1].double(), -1)
    assert abs(ref.max().item() - probs[0]) < 1e-6 and ref.argmax().item() == res["top"][0]["id"]


def test_parity_random_tiny():
    r = run("parity", "-m", "random:tiny")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity OK" in r.stdout and "h.1.mlp.act" in r.stdout and "greedy tokens identical" in r.stdout


def test_parity_random_distilgpt2(cli_run):
    code, out, err = cli_run("parity", "-m", "random:distilgpt2", "--seq-len", "8", "--batch", "1",
                             "--new-tokens", "4", "--json")
    assert code == 0, out + err
    res = json.loads(out)
    assert res["ok"] and res["fast_path"] and len(res["steps"]) == 3 + 7 * 6 + 1
    assert all(s["ok"] for s in res["steps"]) and all(e["ok"] for e in res["end_to_end"])


@pytest.mark.parametrize("args,needle", [
    (["generate", "1", "-m", "random:nope"], "unknown random config"),
    (["generate", "1", "-m", "random:tiny", "--bogus"], "No such option"),
])
def test_errors_from_the_console_script(args, needle):
    r = run(*args)
    assert_one_line_error(r.returncode, r.stderr, needle)
    assert r.stdout == ""


# ---------------------------------------------------------------- in-process, same entry point

@pytest.mark.parametrize("args,needle", [
    (["generate", "1", "-m", "surely-not-a-cached-model-xyz"], "random:distilgpt2"),  # offline Hub, fails fast
    (["next", "1", "-m", "./no/such/dir"], "does not exist"),
    (["generate", "1", "-m", "random:tiny", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "1", "-m", "random:tiny", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "1", "-m", "random:tiny", "--top-k", "-1"], "--top-k must be >= 0"),
    (["generate", "1", "-m", "random:tiny", "--temperature", "0"], "--temperature must be > 0"),
    (["generate", "1", "-m", "random:tiny", "--temperature", "-0.5"], "--temperature must be > 0"),
    (["trace", "1", "-m", "random:tiny", "--layer", "h.9.ln_1"], "unknown layer"),
    (["generate", "1", "-m", "random:tiny", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "1 2 3", "-m", "random:tiny", "--max-new-tokens", "510"], "n_positions=512"),
    (["next", " ".join(["5"] * 513), "-m", "random:tiny"], "longer than the model's context"),
    (["trace", " ".join(["5"] * 513), "-m", "random:tiny"], "longer than the model's context"),
    (["generate", "hello", "-m", "random:tiny"], "no tokenizer"),
    (["next", "1 2 999", "-m", "random:tiny"], "outside the vocabulary"),
    (["generate", "1", "-m", "random:tiny", "--greedy", "--top-k", "5"], "--greedy cannot be combined"),
    (["generate", "1", "-m", "random:tiny", "--device", "tpu"], "--device"),
    (["trace", "1", "-m", "random:tiny", "--layer", "nope"], "unknown layer"),
    (["trace", "1", "-m", "random:tiny", "--layer", "h.0.mlp.c_fc"], "h.0.mlp.act"),
    (["next", "1", "-m", "random:tiny", "--top-k", "0"], "--top-k must be >= 1"),
    (["parity", "-m", "random:tiny", "--seq-len", "600"], "n_positions=512"),
    (["generate"], "Missing argument"),
    (["generate", "1", "-m", "random:tiny", "--temperature", "1e-300"], "at least 1e-06"),
    (["generate", "1", "-m", "random:tiny", "--sample", "--seed", str(2 ** 64)], "--seed must be in"),
    (["parity", "-m", "random:tiny", "--seed", str(-2 ** 63 - 1)], "--seed must be in"),
    (["parity", "-m", "random:tiny", "--batch", "65"], "--batch must be at most 64"),
    (["next", "1", "-m", "random:tiny", "--threads", str(10 ** 20)], "--threads must be at most"),
    (["next", "1", "-m", "random:tiny", "--weights", "q4"], "--weights"),
    (["generate", "1", "-m", "random:tiny", "--speculative", "q4"], "--speculative must be fp16, bf16, int8 or a"),
    (["generate", "1", "-m", "random:tiny", "--speculative", "fp32"], "--speculative must be fp16, bf16, int8 or a"),
    (["generate", "1", "-m", "random:distilgpt2", "--ids", "--speculative", "random:tiny"], "its vocabulary (99"),
    (["generate", "1", "-m", "random:tiny", "--speculative", "int8", "--draft-tokens", "9"], "--draft-tokens must be"),
    (["generate", "1", "-m", "random:tiny", "--draft-tokens", "2"], "--draft-tokens must be"),
])
def test_errors_are_one_line_exit_2(cli_run, args, needle):
    code, out, err = cli_run(*args)
    assert_one_line_error(code, err, needle)


@no_gpu
def test_device_cuda_without_gpu(cli_run):
    code, _, err = cli_run("generate", "1", "-m", "random:tiny", "--device", "cuda")
    assert_one_line_error(code, err, "no CUDA GPU")


def test_missing_dir_that_is_not_a_model(cli_run, tmp_path):
    code, _, err = cli_run("next", "1", "-m", str(tmp_path))
    assert_one_line_error(code, err, "cannot load model")


def test_generate_stops_at_eos(cli_run, eos_model_dir):
    d, eos, greedy = eos_model_dir
    code, out, err = cli_run("generate", "1 2 3", "-m", d, "-n", "20", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["stopped_at_eos"] and eos not in res["new_ids"]
    assert res["new_ids"] == greedy[:greedy.index(eos)] and res["new_tokens"] <= 3
    code, out, _ = cli_run("generate", "1 2 3", "-m", d, "-n", "20")
    assert "(stopped at eos)" in out


def test_sampling_is_reproducible_by_seed(cli_run):
    res = []
    for seed in (7, 7, 8):
        code, out, err = cli_run("generate", "1 2 3", "-m", "random:tiny", "-n", "12", "--temperature", "1.5",
                                 "--top-k", "40", "--top-p", "0.95", "--seed", seed, "--json")
        assert code == 0, err
        r = json.loads(out)
        assert r["settings"]["do_sample"] and r["settings"]["top_k"] == 40
        res.append(r["new_ids"])
    assert res[0] == res[1] and res[0] != res[2]


def test_sampling_compare_hf_agrees(cli_run):
    code, out, err = cli_run("generate", "4 5", "-m", "random:tiny", "-n", "10", "--sample", "--seed", "3",
                             "--compare-hf", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["compare_hf"]["identical"] and r["compare_hf"]["agreeing_prefix"] == 10
    assert r["compare_hf"]["speedup"] > 0


def test_text_prompts_through_the_model_tokenizer(cli_run, text_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_model_dir)
    code, out, err = cli_run("generate", "The quick", "brown", "-m", text_model_dir, "-n", "5", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_ids"] == tok("The quick brown").input_ids
    assert r["text"] == tok.decode(r["new_ids"])
    code, out, err = cli_run("trace", "The quick brown", "-m", text_model_dir, "--layer", "h.0.ln_1", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["name"] == "h.0.ln_1" and r["shape"] == [1, len(tok("The quick brown").input_ids), 32]
    assert r["ok"] and r["max_abs_diff"] < 1e-4
    code, out, err = cli_run("parity", "-m", text_model_dir, "--seq-len", "16")
    assert code == 0 and "parity OK" in out, out + err


def test_trace_json_and_hf_names(cli_run):
    code, out, err = cli_run("trace", "1 2 3 4", "-m", "random:tiny", "--json")
    assert code == 0, err
    r = json.loads(out)
    names = [s["name"] for s in r["steps"]]
    assert names == steps.step_names(gpt2kern.model.loading.random_config("tiny"))
    assert all(s["ok"] for s in r["steps"]) and all(len(s["head"]) == 3 for s in r["steps"])
    mlp = next(s for s in r["steps"] if s["name"] == "h.0.mlp.act")
    assert "gelu_new" in mlp["runs"]
    code, out, _ = cli_run("trace", "1 2", "-m", "random:tiny", "--layer", "transformer.h.1.mlp.c_proj")
    assert code == 0 and out.startswith("h.1.mlp — conv1d c_proj")
    code, out, _ = cli_run("trace", "1 2", "-m", "random:tiny", "--layer", "lm_head", "--full")
    assert code == 0 and "..." not in out and out.count("[") >= 3  # 2 positions × 99 logits, no elision


def test_parity_failure_exits_1(cli_run, monkeypatch):
    monkeypatch.setattr(steps, "ATOL", -1.0)  # nothing can meet a negative tolerance
    code, out, err = cli_run("parity", "-m", "random:tiny", "--seq-len", "4", "--new-tokens", "2")
    assert code == 1 and "parity FAILED" in out and "✗" in out


def test_default_model_notice_and_distilgpt2(cli_run, monkeypatch):
    from gpt2kern.cli import ui as _ui

    monkeypatch.setattr(_ui, "cached_hub_model", lambda name="distilgpt2": False)
    code, out, err = cli_run("next", "464 2068 7586", "--ids")
    assert code == 0, err
    assert err.strip().splitlines() == [err.strip()] and "using random:distilgpt2" in err
    assert "random:distilgpt2" in out and "same top-10: yes" in out
    code, out, err = cli_run("trace", "The quick", "--ids")  # an error with the default model: the note on its own
    assert_one_line_error(code, err, "--ids", notes=["distilgpt2 is not in the local Hugging Face cache"])
    assert "note" not in err.strip().splitlines()[-1] and len(err.strip().splitlines()[-1]) < 160
    code, out, err = cli_run("generate", "464 2068", "--ids", "-m", "random:distilgpt2", "-n", "3", "--json")
    assert code == 0 and json.loads(out)["fast_path"], err
    code, out, err = cli_run("trace", "The quick", "-m", "random:distilgpt2", "--layer", "wpe")  # text, offline
    assert code == 0 and "[2, 768]" in out, err


def test_generate_speculative_gives_the_same_tokens(cli_run):
    args = ("generate", "464 2068 7586", "--ids", "-m", "random:distilgpt2", "-n", "12", "--json")
    code, out, err = cli_run(*args)
    assert code == 0, err
    code2, out2, err2 = cli_run(*args, "--speculative", "int8", "--draft-tokens", "3")
    assert code2 == 0, err2
    a, b = json.loads(out), json.loads(out2)
    assert b["new_ids"] == a["new_ids"] and b["settings"]["speculative"] == "int8"
    code3, out3, err3 = cli_run(*args, "--speculative", "random:distilgpt2")  # a draft model (here: the same one)
    assert code3 == 0 and json.loads(out3)["new_ids"] == a["new_ids"], err3


def test_generate_speculative_sampling_runs(cli_run):
    code, out, err = cli_run("generate", "464 2068", "--ids", "-m", "random:distilgpt2", "-n", "10", "--json",
                             "--sample", "--top-k", "5", "--seed", "3", "--speculative", "int8")
    assert code == 0, err
    assert len(json.loads(out)["new_ids"]) == 10


def test_canonical_layer_names():
    cfg = gpt2kern.model.loading.random_config("tiny")
    assert steps.canonical_layer("transformer.h.1.ln_2", cfg) == "h.1.ln_2"
    assert steps.canonical_layer("h.0.attn.c_proj", cfg) == "h.0.attn"
    assert steps.canonical_layer("lm_head", cfg) == "lm_head"
    for bad in ("h.2.ln_1", "h.0.mlp.c_fc", "h.0.foo", ""):
        with pytest.raises(ValueError):
            steps.canonical_layer(bad, cfg)


def test_parity_exits_1_when_the_fast_path_never_ran(cli_run, tmp_path):
    """A model the kernels cannot serve (gelu, not gelu_new): HF would be compared with itself — that is no pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32, activation_function="gelu",
                     bos_token_id=49, eos_token_id=49)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gelu")
    code, out, err = cli_run("parity", "-m", tmp_path / "gelu", "--seq-len", "4", "--new-tokens", "2", "--json")
    res = json.loads(out)
    assert code == 1 and not res["ok"] and not res["fast_path"]
    ran = [r for r in res["end_to_end"] if r["check"].startswith("fast path ran")][0]
    assert not ran["ok"] and "activation_function" in ran["value"]
    code, out, err = cli_run("parity", "-m", tmp_path / "gelu", "--seq-len", "4", "--new-tokens", "2")
    assert code == 1 and "parity FAILED" in out and "proves nothing" in err


def test_parity_exits_1_when_a_step_has_no_reference(cli_run, monkeypatch):
    real = steps.hf_steps

    def drop_one(model, ids, **kw):
        rec = real(model, ids, **kw)
        del rec["h.0.ln_2"]
        return rec
    monkeypatch.setattr(steps, "hf_steps", drop_one)
    code, out, err = cli_run("parity", "-m", "random:tiny", "--seq-len", "4", "--new-tokens", "2", "--json")
    res = json.loads(out)
    assert code == 1 and not res["ok"]
    assert [r for r in res["steps"] if r["name"] == "h.0.ln_2"][0]["ok"] is None
    row = [r for r in res["end_to_end"] if r["check"].startswith("every step")][0]
    assert not row["ok"] and "h.0.ln_2" in row["value"]


# ---------------------------------------------------------------- weight modes

def test_parity_weights_reports_the_modes_error_and_fails_beyond_its_tolerance(cli_run, monkeypatch):
    from gpt2kern.cli import accuracy

    code, out, err = cli_run("parity", "-m", "random:distilgpt2", "--weights", "bf16", "--new-tokens", "4", "--json")
    assert code == 0, out + err
    res = json.loads(out)
    assert res["ok"] and res["weights"] == "bf16" and 0 < res["measures"]["mean_kld"] < 1e-5
    assert {c["check"] for c in res["checks"]} == {"rel_l2", "mean_kld", "top1_agreement", "fast path ran"}
    monkeypatch.setitem(accuracy.TOLERANCE, "int8", dict(rel_l2=1e-9, mean_kld=1e-12, top1_agreement=1.0))
    code, out, err = cli_run("parity", "-m", "random:distilgpt2", "--weights", "int8", "--new-tokens", "2")
    assert code == 1 and "tolerance is exceeded" in out and "✗" in out


def test_generate_weights_and_bad_values(cli_run):
    code, out, err = cli_run("generate", "464 2068 7586", "--ids", "-m", "random:distilgpt2", "--weights", "int8",
                             "-n", "5", "--compare-hf", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["weights"] == "int8" and res["fast_path"] and len(res["compare_hf"]["hf_new_ids"]) == 5
    code, out, err = cli_run("generate", "1", "--ids", "-m", "random:tiny", "--weights", "q4")
    assert_one_line_error(code, err, "--weights")
    code, out, err = cli_run("parity", "-m", "random:tiny", "--weights", "fp16", "--device", "cuda")
    assert_one_line_error(code, err, "measures the CPU path")
    code, out, err = cli_run("bench", "--weights", "fp8")
    assert_one_line_error(code, err, "--weights must be 'all' or a comma list")


# ---------------------------------------------------------------- every input validated

@pytest.mark.parametrize("cmd", ["generate", "next", "trace"])
def test_a_prompt_that_is_not_utf8_is_refused(cmd):
    """Linux hands argv bytes that are not UTF-8 to Python as lone surrogates: one error line naming the byte, before
    torch is imported (no model is loaded for it)."""
    r = subprocess.run([sys.executable, "-m", "gpt2kern", cmd, b"caf\xe9 \xff\xfe", "-m", "random:distilgpt2"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert_one_line_error(r.returncode, r.stderr, "the prompt is not valid UTF-8 (byte 0xe9 at offset 3)",
                          "UTF-8 text")
    assert r.stdout == ""


def test_a_lone_surrogate_in_process(cli_run):
    code, _, err = cli_run("generate", "a\ud800b", "-m", "random:distilgpt2")
    assert_one_line_error(code, err, "lone surrogate U+D800 at offset 1")
    with pytest.raises(cli.CliError, match="byte 0xff at offset 3"):
        cli.encode_prompt(["é", "\udcff"], None, gpt2kern.model.loading.random_config("tiny"))
    code, out, err = cli_run("next", "café ☕", "-m", "random:distilgpt2", "--json")  # valid UTF-8 is text
    assert code == 0 and len(json.loads(out)["prompt_ids"]) > 2, err


def test_threads_beyond_the_cpus_are_kept_with_a_note(cli_run):
    before = torch.get_num_threads()
    n = cli.cpu_count() + 1
    try:
        code, out, err = cli_run("next", "1 2", "-m", "random:tiny", "--json", "-t", n)
        assert code == 0 and json.loads(out)["threads"] == n, err
        notes = err.strip().splitlines()
        assert len(notes) == 1 and notes[0].startswith(f"note: --threads {n} is more than the {n - 1} CPU"), err
        code, out, err = cli_run("next", "1 2", "-m", "random:tiny", "--json", "-t", n - 1)
        assert code == 0 and "note" not in err, err
    finally:
        torch.set_num_threads(before)


def test_next_takes_weights_like_generate(cli_run):
    code, out, err = cli_run("next", "464 2068 7586", "--ids", "-m", "random:distilgpt2", "--weights", "int8",
                             "-k", "3", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["weights"] == "int8" and res["fast_path"] and len(res["top"]) == 3
    assert 0 < res["max_abs_logit_diff_vs_hf"] < 1  # int8's error: measured, not zero
    code, out, err = cli_run("next", "1 2", "-m", "random:tiny", "--weights", "fp16", "-k", "2")
    assert code == 0 and "fp16 weights" in out and "HF in fp32" in out, err
    code, out, err = cli_run("next", "1 2", "-m", "random:tiny", "--json")
    assert json.loads(out)["weights"] == "fp32"


def test_generate_ids_with_a_tokenizer_streams_one_text(cli_run):
    """--ids on a model with a tokenizer: the continuation streams as text, so the prompt is echoed as the text its
    ids read as ("The quick brown" + continuation), not as ids run into text ("464 2068 7586imil")."""
    from gpt2kern.model.loading import gpt2_tokenizer

    code, out, err = cli_run("generate", "464 2068 7586", "--ids", "-m", "random:distilgpt2", "-n", "4", "--json")
    new = json.loads(out)["new_ids"]
    code, out, err = cli_run("generate", "464 2068 7586", "--ids", "-m", "random:distilgpt2", "-n", "4")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first == "The quick brown" + gpt2_tokenizer().decode(new), first
    code, out, err = cli_run("generate", "1 2", "-m", "random:tiny", "-n", "2")  # no tokenizer: ids, spaced
    assert code == 0 and re.fullmatch(r"1 2 \d+ \d+", out.splitlines()[0]), out
