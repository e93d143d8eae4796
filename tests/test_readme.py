"""The README runs as written: every ```python block, and the `gpt2kern` lines of every ```bash block, the way a new
user pastes them after the set-up — offline (HF_HUB_OFFLINE=1, an empty Hugging Face cache, no GPU), from an empty
directory — exit 0, and where the README shows what they print, they print that.

What each block is, is said in the README, by an HTML comment (invisible on GitHub) on the line right before it:

    <!-- not run: WHY -->                   a python or bash block this test skips, and why (a GPU, the Hub, minutes)
    <!-- output of the block above -->      a plain block: what the python block right above prints on stdout
    <!-- output of: gpt2kern ARGS -->       a plain block: what that command prints (stdout, then stderr)
    ... (numbers vary) -->                  at the end of an output marker: any number matches any number (timings,
                                            |Δ| that depend on the CPU)

An output block's lines must appear in the output in that order, consecutive; a line `...` stands for any lines;
runs of spaces and of a table's rule characters count as one (column widths follow the numbers in them). Every
python or bash block without `not run` must run: a bash block may hold only comments, `gpt2kern` lines and the PATH
line (`. .venv/bin/activate`). The block holding the PATH line runs first, as written, in bash, from a directory whose
`.venv` is the environment running this test, with that environment's bin/ taken off PATH: so the README's own line
is what puts `gpt2kern` on PATH. The other `gpt2kern` lines then run in that shell's python, all in one process
(gpt2kern.cli.main.main, which the console script calls: one torch import instead of one per line). PYTHONPATH is this
checkout, so this checkout is what runs (an editable install may point at another).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PATH_LINE = ". .venv/bin/activate"
WIDTH = "200"  # COLUMNS: a terminal wide enough for the trace table, as the README shows it


@dataclasses.dataclass
class Block:
    lang: str  # "python", "bash", "" (text/output)
    lineno: int  # of the opening fence, 1-based
    lines: list[str]
    marker: str | None  # the HTML comment right before the fence, without <!-- -->

    @property
    def where(self) -> str:
        return f"README.md:{self.lineno}"

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if re.fullmatch(r"```\s*", lines[j]))
        prev = lines[i - 1].strip() if i else ""
        mk = re.fullmatch(r"<!--\s*(.*?)\s*-->", prev)
        blocks.append(Block(m.group(1), i + 1, lines[i + 1:end], mk.group(1) if mk else None))
        i = end + 1
    return blocks


def not_run(b: Block) -> str | None:
    m = re.fullmatch(r"not run:\s*(.*)", b.marker or "")
    return m.group(1) if m else None


def output_of(b: Block) -> tuple[str, bool] | None:
    """(the command, or "" for the block above; whether numbers vary) for an output block."""
    m = re.fullmatch(r"output of(?:: (.+?)| the block above)( \(numbers vary\))?", b.marker or "")
    return (m.group(1) or "", bool(m.group(2))) if m else None


def command_lines(b: Block) -> list[str]:
    """A runnable bash block's lines that are commands (no comments, no blank lines)."""
    return [ln.strip() for ln in b.lines if ln.strip() and not ln.strip().startswith("#")]


def is_cli(line: str) -> bool:
    return shlex.split(line, comments=True)[:1] == ["gpt2kern"]


def is_path_line(line: str) -> bool:
    return shlex.split(line, comments=True) == shlex.split(PATH_LINE)


def runnable(blocks: list[Block], lang: str) -> list[Block]:
    return [b for b in blocks if b.lang == lang and not_run(b) is None]


BLOCKS = readme_blocks()
PYTHON_BLOCKS = runnable(BLOCKS, "python")
BASH_BLOCKS = runnable(BLOCKS, "bash")
PATH_BLOCKS = [b for b in BASH_BLOCKS if any(map(is_path_line, command_lines(b)))]
OUTPUTS = [b for b in BLOCKS if output_of(b) is not None]


# ---------------------------------------------------------------- what the README says of its blocks

def test_every_block_runs_or_says_why_not():
    problems = []
    for k, b in enumerate(BLOCKS):
        if b.lang not in ("python", "bash", ""):
            problems.append(f"{b.where}: a ```{b.lang} block: code is ```python or ```bash (run here), text is "
                            "a plain ``` block")
        if b.marker is not None and not_run(b) is None and output_of(b) is None:
            problems.append(f"{b.where}: unknown marker <!-- {b.marker} --> (not run: WHY / output of ...)")
        if not_run(b) is not None:
            if b.lang not in ("python", "bash") or not not_run(b):
                problems.append(f"{b.where}: `not run` marks a python or bash block, and says why")
        elif output_of(b) is not None:
            cmd, _ = output_of(b)
            if b.lang:
                problems.append(f"{b.where}: an output block is a plain ``` block")
            if not cmd and (k == 0 or BLOCKS[k - 1] not in PYTHON_BLOCKS):
                problems.append(f"{b.where}: `output of the block above` follows a python block that runs")
            if cmd and not is_cli(cmd):
                problems.append(f"{b.where}: `output of:` names a `gpt2kern ...` command, got {cmd!r}")
        elif b.lang == "bash":
            bad = [ln for ln in command_lines(b) if not is_path_line(ln) and not is_cli(ln)]
            if bad or not command_lines(b):
                problems.append(f"{b.where}: a bash block this test cannot run ({bad[:1]}): only `gpt2kern` lines "
                                f"and `{PATH_LINE}` run here; mark it <!-- not run: WHY -->")
    assert not problems, "\n".join(problems)
    assert PYTHON_BLOCKS and BASH_BLOCKS and OUTPUTS


def test_the_path_line_comes_before_the_commands():
    """The `gpt2kern` command lives in .venv/bin after the set-up: the README says how to put it on PATH before the
    first example that uses it."""
    assert len(PATH_BLOCKS) == 1, f"one bash block with `{PATH_LINE}`, found {len(PATH_BLOCKS)}"
    uses = [b.lineno for b in BASH_BLOCKS if b not in PATH_BLOCKS and any(map(is_cli, command_lines(b)))]
    uses += [b.lineno for b in OUTPUTS if output_of(b)[0]]
    assert uses and PATH_BLOCKS[0].lineno < min(uses)


def test_the_setup_sample_counts_the_cpu_sources():
    """The set-up's sample output shows ninja's [k/n] lines: n is the number of files of the CPU build (setup.py's
    csrc/*.cpp, csrc/common/*.cpp, csrc/cpu/*.cpp)."""
    n = sum(len(glob.glob(str(ROOT / "csrc" / d / "*.cpp"))) for d in ("", "common", "cpu"))
    shown = re.findall(r"\[(\d+)/(\d+)\] compiling csrc/", README.read_text())
    assert shown, "the set-up sample shows no [k/n] compiler lines"
    assert {int(total) for _, total in shown} == {n}, f"the CPU build compiles {n} files; the README shows {shown}"


def test_no_references_outside_the_repository():
    outside = "../" + "shared"
    for f in [README, *sorted((ROOT / "bench").glob("*.md"))]:
        assert outside not in f.read_text(), f"{f.relative_to(ROOT)} points at {outside}/, which a clone lacks"


def test_the_matcher():
    assert matches(["a 1.5 s", "...", "z"], ["title", "a 2 s", "b", "z"], numbers_vary=True) is None
    assert matches(["a 1.5 s"], ["a 2 s"], numbers_vary=False) == ["a 1.5 s"]
    assert matches(["┏━━┳━┓", "│ x  │ 1 │"], ["┏━━━┳━━━━┓", "│ x │ 1 │"], numbers_vary=False) is None
    assert matches(["b", "a"], ["a", "b"], numbers_vary=False) == ["b", "a"]
    assert matches(["b", "...", "a"], ["a", "b"], numbers_vary=False) == ["a"]


# ---------------------------------------------------------------- running them

def user_env(tmp: Path) -> dict[str, str]:
    """A new user's shell after the set-up: gpt2kern not on PATH yet, offline, no Hugging Face cache, no GPU."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "LINES")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != venv_bin)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf-home"), CUDA_VISIBLE_DEVICES="",
               COLUMNS=WIDTH, PYTHONPATH=str(ROOT))
    return env


NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _norm(line: str, numbers_vary: bool) -> str:
    line = re.sub(r"([━─═])\1+", r"\1", line)
    if numbers_vary:
        line = NUMBER.sub("#", line)
    return " ".join(line.split())


def matches(expected: list[str], actual: list[str], numbers_vary: bool) -> list[str] | None:
    """None if the expected lines appear in `actual` in order, each run between `...` lines consecutive; else the
    first run that does not."""
    act = [_norm(ln, numbers_vary) for ln in actual]
    runs, cur = [], []
    for ln in expected:
        if ln.strip() == "...":
            runs.append(cur)
            cur = []
        else:
            cur.append(ln)
    runs.append(cur)
    pos = 0
    for run in filter(None, runs):
        want = [_norm(ln, numbers_vary) for ln in run]
        at = next((i for i in range(pos, len(act) - len(want) + 1) if act[i:i + len(want)] == want), None)
        if at is None:
            return run
        pos = at + len(want)
    return None


def check_output(block: Block, actual: str, what: str):
    _, numbers_vary = output_of(block)
    missing = matches(block.lines, actual.splitlines(), numbers_vary)
    assert missing is None, (f"{block.where}: the README shows what {what} prints, and it printed something else; "
                             f"not found{' (numbers vary)' if numbers_vary else ''}:\n" + "\n".join(missing)
                             + "\n--- it printed:\n" + actual)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"line{b.lineno}")
def test_python_block(block, tmp_path):
    (tmp_path / "block.py").write_text(block.text)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=user_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    print(f"{block.where}: {time.monotonic() - t0:.1f} s")
    assert p.returncode == 0, f"{block.where} exits {p.returncode}:\n{p.stdout}\n{p.stderr}"
    k = BLOCKS.index(block)
    shown = BLOCKS[k + 1] if k + 1 < len(BLOCKS) else None
    if shown is not None and (output_of(shown) or ("x",))[0] == "":
        check_output(shown, p.stdout, f"the python block at {block.where}")


RUNNER = r'''
import contextlib, io, json, shlex, sys, time, traceback
from gpt2kern.cli.main import main
results = []
for line in json.load(open(sys.argv[1])):
    out, err, t0 = io.StringIO(), io.StringIO(), time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(shlex.split(line, comments=True)[1:])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = "exception"
    results.append(dict(line=line, rc=rc, stdout=out.getvalue(), stderr=err.getvalue(), s=time.monotonic() - t0))
json.dump(results, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run the PATH block as written, then every other `gpt2kern` line of the README (and of its output markers)
    once, in that shell's python: {line: result}."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if not activate.exists():
        pytest.skip(f"the tests run outside a virtual environment ({sys.prefix}): the README's PATH line needs .venv")
    script = Path(sys.prefix) / "bin" / "gpt2kern"
    assert script.exists(), f"{script} is missing: the set-up (pip install -e .) installs the `gpt2kern` command"
    tmp = tmp_path_factory.mktemp("readme")
    (tmp / ".venv").symlink_to(sys.prefix)
    lines = [ln for b in BASH_BLOCKS if b not in PATH_BLOCKS for ln in command_lines(b)]
    lines += [output_of(b)[0] for b in OUTPUTS if output_of(b)[0]]
    lines = list(dict.fromkeys(lines))
    (tmp / "lines.json").write_text(json.dumps(lines))
    (tmp / "runner.py").write_text(RUNNER)
    bash = (f"set -eo pipefail\n{PATH_BLOCKS[0].text}\n"
            f'test "$(command -v gpt2kern)" -ef {shlex.quote(str(script))} || '
            f'{{ echo "the PATH line did not put {script} on PATH: $(command -v gpt2kern)" >&2; exit 97; }}\n'
            "python runner.py lines.json results.json\n")
    t0 = time.monotonic()
    p = subprocess.run(["bash", "-c", bash], cwd=tmp, env=user_env(tmp), capture_output=True, text=True, timeout=600)
    results = json.loads((tmp / "results.json").read_text()) if p.returncode == 0 else []
    print(f"README CLI: {len(lines)} lines in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{r['s']:.1f}" for r in results))
    return p, {r["line"]: r for r in results}


def test_the_path_block_and_every_cli_line_exit_0(cli_runs):
    p, results = cli_runs
    assert p.returncode == 0, (f"README.md:{PATH_BLOCKS[0].lineno}: the PATH block, then the `gpt2kern` lines, in "
                               f"bash: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    assert "Usage: gpt2kern" in p.stdout  # the PATH block's `gpt2kern --help`, by the console script on PATH
    failed = [f"{r['line']}: exit {r['rc']}\n{r['stderr'][-2000:]}" for r in results.values() if r["rc"] != 0]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("block", [b for b in OUTPUTS if output_of(b)[0]], ids=lambda b: f"line{b.lineno}")
def test_cli_output_is_the_readmes(block, cli_runs):
    p, results = cli_runs
    line = output_of(block)[0]
    if line not in results:
        pytest.fail(f"{line} did not run (see test_the_path_block_and_every_cli_line_exit_0)")
    r = results[line]
    assert r["rc"] == 0, f"{line}: exit {r['rc']}\n{r['stderr']}"
    check_output(block, r["stdout"] + r["stderr"], f"`{line}`")
