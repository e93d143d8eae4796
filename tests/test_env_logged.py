"""scripts/env.sh's `logged`: the set-up's progress lines (pip's, the compiler's [k/n]) are shown as the command prints
them, not when it ends. Each test runs the function itself, cut out of env.sh, in bash with its output a pipe (as
when the set-up runs under CI or `| tee`), where a block-buffering stage such as `cut` held every line back."""
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def logged_script(tmp_path, body: str) -> str:
    src = (ROOT / "scripts" / "env.sh").read_text()
    m = re.search(r"^logged\(\) \{\n.*?^\}\n", src, re.S | re.M)
    assert m, "scripts/env.sh defines no logged() function"
    return (f'set -uo pipefail\nsay() {{ echo "env.sh: $*"; }}\nENV_LOG={tmp_path}/env.log\n: > "$ENV_LOG"\n'
            f"{m.group(0)}\n{body}\n")


def test_lines_arrive_while_the_command_runs(tmp_path):
    cmd = "logged '^(step|done)' bash -c 'echo noise; echo \"step 1\"; sleep 3; echo done'; echo \"rc=$?\""
    p = subprocess.Popen(["bash", "-c", logged_script(tmp_path, cmd)], stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    first = p.stdout.readline()
    t_first = time.monotonic() - t0
    rest = p.stdout.read()
    t_all = time.monotonic() - t0
    assert p.wait(timeout=30) == 0
    assert first == "    step 1\n"
    assert rest == "    done\nrc=0\n"
    assert t_all >= 3
    assert t_first < 2, (f"the first line came {t_first:.1f} s after the start, with the command's end "
                         f"({t_all:.1f} s): a stage of logged's pipe buffers its output")
    assert (tmp_path / "env.log").read_text() == "noise\nstep 1\ndone\n"  # the whole output, in the log


def test_show_rewrites_lines_are_cut_at_150_and_failure_shows_the_log(tmp_path):
    long = "x" * 200
    body = (f"SHOW='s/^step/STEP/' logged '^step' bash -c 'echo step {long}'; echo \"rc=$?\"\n"
            "logged '^never' bash -c 'echo the cause; exit 3'; echo \"rc=$?\"")
    out = subprocess.run(["bash", "-c", logged_script(tmp_path, body)], capture_output=True, text=True,
                         timeout=30).stdout.splitlines()
    assert out[0] == "    " + ("STEP " + long)[:150]
    assert out[1] == "rc=0"
    assert out[2].startswith("env.sh: FAILED: bash -c echo the cause; exit 3")
    assert "the cause" in out[3:-1] and out[-1] == "rc=1"
