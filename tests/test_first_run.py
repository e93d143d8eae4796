"""What a new user meets first: text prompts on the offline default model, the empty prompt, --threads,
and trace's tolerance column."""
import json
import subprocess
import sys

import pytest
import torch
from test_cli import ENV, ROOT, assert_one_line_error, cli_run  # noqa: F401  (fixture)

from gpt2kern.cli import main as cli
from gpt2kern.cli.ui import CliError
from gpt2kern.model.loading import gpt2_tokenizer, random_config

QUICK = ["The", "quick", "brown"]


def test_readme_generate_works_offline_and_prints_text():
    """The README's first example, as typed, on the offline default model: text in, text out."""
    r = subprocess.run([sys.executable, "-m", "gpt2kern", "generate", "The quick brown", "--max-new-tokens", "20"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("The quick brown") and len(first) > len("The quick brown") + 5
    assert not any(c.isdigit() for c in first[:20]), first  # text, not ids
    assert "tokens/s" in r.stdout and "Traceback" not in r.stderr


def test_text_prompt_on_random_model_uses_gpt2_ids(cli_run):  # noqa: F811
    code, out, err = cli_run("generate", "The quick brown", "-m", "random:distilgpt2", "-n", "4", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_ids"] == [464, 2068, 7586]
    assert r["text"] == gpt2_tokenizer().decode(r["new_ids"]) and len(r["new_ids"]) == 4
    code, out, err = cli_run("next", *QUICK, "-m", "random:distilgpt2", "-k", "3", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_ids"] == [464, 2068, 7586] and all(isinstance(t["token"], str) for t in r["top"])
    code, out, err = cli_run("next", "The quick brown", "-m", "random:distilgpt2", "-k", "3")
    assert code == 0, err
    cells = [line.split("│")[2].strip() for line in out.splitlines() if line.startswith("│")]
    assert len(cells) == 3 and all(c.startswith("'") and c.endswith("'") for c in cells), out  # quoted text, no —


def test_ids_flag_messages(cli_run):  # noqa: F811
    code, _, err = cli_run("generate", "hello there", "--ids", "-m", "random:distilgpt2")
    assert_one_line_error(code, err, "--ids reads the prompt as token ids", "drop --ids")
    assert "tokenizer" not in err
    code, _, err = cli_run("generate", "hello", "--ids", "-m", "random:tiny")
    assert_one_line_error(code, err, "--ids reads the prompt as token ids", "'1 2 3'")
    code, _, err = cli_run("generate", "hello", "-m", "random:tiny")  # no tokenizer, no --ids: say so
    assert_one_line_error(code, err, "no tokenizer", "'1 2 3'", "0..98")
    code, out, err = cli_run("next", "464 2068", "--ids", "-m", "random:distilgpt2", "--json")
    assert code == 0 and json.loads(out)["prompt_ids"] == [464, 2068], err
    code, out, err = cli_run("next", "464 2068", "-m", "random:distilgpt2", "--json")  # digits as text: a note
    assert code == 0 and json.loads(out)["prompt_ids"] == gpt2_tokenizer()("464 2068")["input_ids"], err
    assert "read as text" in err and "--ids" in err


@pytest.mark.parametrize("prompt", ["", "  ", "\t"])
def test_empty_prompt_starts_from_endoftext_with_a_note(cli_run, prompt):  # noqa: F811
    code, out, err = cli_run("generate", prompt, "-m", "random:distilgpt2", "-n", "3", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_ids"] == [50256] and len(r["new_ids"]) == 3
    assert "note: the prompt is empty: starting from '<|endoftext|>' (id 50256)" in err


def test_empty_prompt_streams_only_the_continuation(cli_run):  # noqa: F811
    code, out, err = cli_run("generate", "", "-m", "random:distilgpt2", "-n", "3")
    assert code == 0, err
    assert "50256" not in out and "<|endoftext|>" not in out.splitlines()[0]
    code, out, err = cli_run("next", " ", "-m", "random:tiny", "--json")  # no tokenizer: the bos id, said so
    assert code == 0 and json.loads(out)["prompt_ids"] == [98], err
    assert "the prompt is empty" in err and "id 98" in err


def test_empty_prompt_without_a_start_token_is_refused():
    cfg = random_config("tiny")
    cfg.bos_token_id = cfg.eos_token_id = None
    with pytest.raises(CliError, match="the prompt is empty"):
        cli.encode_prompt("  ", None, cfg)


@pytest.mark.parametrize("cmd", [
    ["generate", "1 2", "-m", "random:tiny", "-n", "2", "--json"],
    ["next", "1 2", "-m", "random:tiny", "--json"],
    ["trace", "1 2", "-m", "random:tiny", "--json"],
    ["parity", "-m", "random:tiny", "--seq-len", "4", "--new-tokens", "2", "--json"],
])
def test_threads_option(cli_run, cmd):  # noqa: F811
    before = torch.get_num_threads()
    want = before + 1  # differs from the default on any machine
    try:
        code, out, err = cli_run(*cmd, "--threads", want)
        assert code == 0, err
        assert torch.get_num_threads() == want
        r = json.loads(out)
        if cmd[0] in ("generate", "next"):
            assert r["threads"] == want
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "-2"):
        code, _, err = cli_run(*cmd, "--threads", bad)
        assert_one_line_error(code, err, "--threads must be >= 1")
    assert torch.get_num_threads() == before


def test_threads_in_a_fresh_process():
    """--threads 1 in the console script: the run says 1 thread (the kernels split work by at::get_num_threads)."""
    r = subprocess.run([sys.executable, "-m", "gpt2kern", "generate", "1 2", "-m", "random:tiny", "-n", "3",
                        "-t", "1"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "gpt2kern, cpu, 1 thread\n" in r.stdout


def test_trace_shows_tolerance_and_ok(cli_run):  # noqa: F811
    code, out, err = cli_run("trace", "The quick brown", "-m", "random:distilgpt2")
    assert code == 0, err
    header = next(line for line in out.splitlines() if "max |Δ| vs HF" in line)
    assert "tolerance" in header and " ok " in header
    rows = [line for line in out.splitlines() if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert len(rows) == 3 + 7 * 6 + 1 and all(line.split("│")[-2].strip() == "✓" for line in rows), out
    assert "✗" not in out and "1e-05·max|HF|" in out
    code, out, err = cli_run("trace", "The quick brown", "-m", "random:distilgpt2", "--json")
    steps = json.loads(out)["steps"]
    assert all(s["ok"] and s["max_abs_diff"] <= s["tol"] for s in steps)
    # the residual stream's planted outlier channels (~3000) make the block outputs' tolerance large
    assert max(s["tol"] for s in steps if s["name"] == "h.5") > 0.01
    code, out, err = cli_run("trace", "The quick brown", "-m", "random:distilgpt2", "--layer", "h.1")
    assert code == 0 and "(tolerance " in out and ": ok)" in out, err
