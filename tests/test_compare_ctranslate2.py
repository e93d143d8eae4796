"""bench/compare_ctranslate2.py: the same weights reach CTranslate2 (its fp32 tokens and logits equal HF's), and
the report holds every row."""
import json
import os
import sys

import pytest

pytest.importorskip("ctranslate2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import compare_ctranslate2  # noqa: E402


def test_comparison_on_tiny(tmp_path, capsys):
    out = tmp_path / "ct2.json"
    assert compare_ctranslate2.main(["--model", "random:tiny", "--reps", "1", "--new-tokens", "8", "--prefill", "16",
                                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["decode"]) == {"gpt2kern", "gpt2kern int8", "ct2 float32", "ct2 int8"}
    for k in ("gpt2kern", "ct2 float32"):
        assert res["decode"][k]["tokens_identical_to_hf"] == "8/8" and res["decode"][k]["new_tokens"] == 8
        assert res["prefill"]["T=16"][k]["max_abs_dlogits"] < 1e-4
    assert all(r["ms_per_token"] > 0 for r in res["decode"].values())
    for k in ("gpt2kern int8", "ct2 int8"):  # the error of each int8 mode is measured, on the same ids
        assert 0 <= res["prefill"]["T=16"][k]["mean_kld"] < 1 and 0 <= res["prefill"]["T=16"][k]["top1_agreement"] <= 1
    assert "gpt2kern vs CTranslate2" in capsys.readouterr().out
