"""Shared pieces of the `gpt2kern` command line: errors, model resolution, tables, progress, --json.

Every command (generate, next, trace, parity, and bench) uses these, so they all look and fail alike:
  * expected problems (bad option values, unknown model, missing dir, prompt too long, no GPU) raise `CliError`;
    `gpt2kern.cli.main.main` prints it as ONE line `error: ...` on stderr and exits 2 — never a traceback; it is the
    last line there: the notes the command gathered before it failed (the default model, say) come first, one
    `note: ...` line each;
  * tables are rich tables on stdout; notices and progress go to stderr, so stdout stays the result;
  * `--json` replaces the table (and streamed text) with one JSON document on stdout (`emit_json`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

# stdout: results (tables, generated text, JSON).  stderr: notices, progress, errors.
# Piped output (not a terminal, no COLUMNS) gets 120 columns rather than rich's 80, so tables are not squeezed.
_PIPE_WIDTH = None if os.environ.get("COLUMNS") else 120
console = Console(highlight=False, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _PIPE_WIDTH)

DEFAULT_HUB_MODEL = "distilgpt2"
OFFLINE_DEFAULT = "random:distilgpt2"
EXIT_USAGE = 2  # bad input (what click uses for usage errors too)
EXIT_FAILED = 1  # a check failed (parity over tolerance)
EXIT_INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    """An expected problem with what the user asked for: printed as one `error:` line, exit code 2."""


def one_line(msg: Any) -> str:
    """The first non-empty line of an exception message (HF's OSErrors are paragraphs)."""
    for line in str(msg).splitlines():
        if line.strip():
            return line.strip()
    return type(msg).__name__ if isinstance(msg, BaseException) else "unknown error"


@contextlib.contextmanager
def expected_errors(what: str = ""):
    """Turn the errors that loading and argument validation raise on bad input into CliError."""
    try:
        yield
    except CliError:
        raise
    except (ValueError, TypeError, OSError) as e:  # FileNotFoundError is an OSError
        raise CliError(f"{what}{one_line(e)}") from None


_notes: list[str] = []  # notices of this command, printed when it ends (see flush_notices)


def fail(msg: str, code: int = EXIT_USAGE) -> int:
    """Print `error: msg` (one line) on stderr, after the command's pending notices (a `note:` line each, so the
    error line is the last line and holds the error alone); returns the exit code to use."""
    flush_notices()
    err_console.print(f"error: {one_line(msg)}", markup=False, highlight=False, soft_wrap=True)
    return code


def notice(msg: str) -> None:
    """A `note:` line on stderr, printed when the command ends (before its `error:` line if it fails), or earlier
    by flush_notices()."""
    _notes.append(msg)


def flush_notices() -> None:
    for msg in _notes:
        err_console.print(f"note: {msg}", markup=False, soft_wrap=True)
    _notes.clear()


# ---------------------------------------------------------------- models

def cached_hub_model(name: str = DEFAULT_HUB_MODEL) -> bool:
    """Is this Hub model in the local HF cache (config + weights)? Never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    for repo in (name, f"distilbert/{name}" if name == "distilgpt2" else None):
        if repo is None:
            continue
        cfg = try_to_load_from_cache(repo, "config.json")
        if isinstance(cfg, str) and os.path.exists(cfg):
            return True
    return False


def resolve_model_name(model: str | None) -> str:
    """--model as given, or the default: distilgpt2 from the local HF cache, else random:distilgpt2 (with a note)."""
    if model:
        return model
    if cached_hub_model(DEFAULT_HUB_MODEL):
        return DEFAULT_HUB_MODEL
    notice(f"{DEFAULT_HUB_MODEL} is not in the local Hugging Face cache; using {OFFLINE_DEFAULT} "
           f"(GPT-2's tokenizer, random weights: the text it writes is gibberish). Pass --model DIR to use a saved "
           f"model.")
    return OFFLINE_DEFAULT


def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                           "use --device cpu")
        return device
    raise CliError(f"--device must be cpu or cuda, got {device!r}")


def load_model(model: str | None, device: str = "cpu"):
    """(name, model, tokenizer or None), the model in eval mode on `device`; bad names/dirs raise CliError."""
    import gpt2kern

    check_device(device)
    name = resolve_model_name(model)
    _quiet_hf()
    with status(f"loading {name}"), expected_errors(f"cannot load model {name!r}: "):
        m, tok = gpt2kern.load(name)
    if device != "cpu":
        m = m.to(device)
    return name, m, tok


def _quiet_hf() -> None:
    """HF's info/warning chatter and download bars would break the one-line-on-stderr contract."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


# ---------------------------------------------------------------- output

def fmt_num(x: Any, digits: int = 4) -> str:
    """Numbers for tables: ints as is, floats to `digits` significant digits (1e-07 style when small)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.{max(1, digits - 1)}e}"
        return f"{x:.{digits}g}"
    return str(x)


def print_table(columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any]], title: str | None = None,
                caption: str | None = None) -> None:
    """A rich table on stdout. columns: names, or (name, justify) with justify left/right/center."""
    t = Table(title=title, caption=caption, show_lines=False, header_style="bold", title_justify="left",
              caption_justify="left")
    for c in columns:
        name, justify = (c, "left") if isinstance(c, str) else c
        t.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        t.add_row(*[Text(v if isinstance(v, str) else fmt_num(v)) for v in r])  # no markup in cells
    console.print(t)


def _jsonable(o):
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def emit_json(obj: Any) -> None:
    """The --json output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def status(msg: str):
    """A spinner on stderr while something slow runs (nothing is left behind; silent when not a terminal)."""
    if not err_console.is_terminal:
        yield
        return
    with err_console.status(msg):
        yield


@contextlib.contextmanager
def progress(total: int, description: str):
    """Progress on stderr; yields advance(n=1, done=None), done naming a section that just ended. On a terminal a
    transient bar (showing the last section); elsewhere (a log, CI, a pipe) one line per section with its time, so a
    long run is never silent."""
    import time

    t0 = last = time.perf_counter()
    count = 0
    if not err_console.is_terminal:
        def line(n=1, done=None):
            nonlocal count, last
            count += n
            if done:
                now = time.perf_counter()
                err_console.print(f"{description}: {done} ({now - last:.1f} s; {count}/{total}, "
                                  f"{now - t0:.0f} s in all)", markup=False, highlight=False)
                last = now
        yield line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as p:
        task = p.add_task(description, total=total)

        def bar(n=1, done=None):
            p.update(task, advance=n, description=f"{description}: {done}" if done else None)
        yield bar


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, a container's cpuset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1
