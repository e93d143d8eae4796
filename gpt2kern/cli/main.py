"""`gpt2kern` — GPT-2 on the fast path, one question per command.

    gpt2kern generate PROMPT    stream a continuation (stops at <|endoftext|>), tokens/s; --compare-hf
    gpt2kern next PROMPT        the next-token distribution: token, id, probability, logit
    gpt2kern trace PROMPT       every named step of the forward in execution order, each vs HF; --layer NAME
    gpt2kern parity             layer-by-layer and end-to-end parity vs HF eager; exit 1 over tolerance

Also `python -m gpt2kern ...`. Expected problems exit 2 with one `error:` line on stderr (see ui.py).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import random
import re
import sys
import time
from typing import Annotated, Callable, List, Optional

import typer

try:  # typer >= 0.2x carries its own copy of click; older typer uses click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

from . import ui
from .ui import CliError, console, cpu_count, emit_json, expected_errors, fmt_num, notice, print_table


class _LazyTorch:
    """`torch`, imported on first use. Importing torch (and transformers) takes seconds; `gpt2kern --help` and
    argument errors answer before any command body runs, so they never pay for it (tests/test_cli_startup.py)."""

    def __getattr__(self, name):
        import torch as _torch

        return getattr(_torch, name)


torch = _LazyTorch()

app = typer.Typer(
    name="gpt2kern",
    help="GPT-2 inference on gpt2kern's hand-written kernels: generate, inspect, and check it against HF.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---------------------------------------------------------------- options shared by the commands

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="M",
    help="random:<config> (random:distilgpt2, random:tiny, ...), a local save_pretrained directory, or a Hub "
         "name (needs the Hub or the local HF cache). Default: distilgpt2 if cached, else random:distilgpt2.")]


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run.")]


class Weights(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


WeightsOpt = Annotated[Weights, typer.Option(
    "--weights", help="How the matmul weights are stored: fp32 (exact, HF's own tensors), fp16, bf16 or int8 "
                      "(fewer bytes per token, a measured error: gpt2kern parity --weights).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
IdsOpt = Annotated[bool, typer.Option(
    "--ids", help="Read PROMPT as token ids ('464 2068 7586' or '464,2068'), even when the model has a tokenizer.")]
PromptArg = Annotated[List[str], typer.Argument(
    help="Text, through the model's tokenizer (random:* models but random:tiny have GPT-2's), or token ids "
         "separated by spaces/commas (--ids, or a model without a tokenizer); several words are joined with spaces. "
         "An empty prompt starts from <|endoftext|>.", show_default=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", "-t", metavar="N", help="CPU threads for torch and the kernels (torch.set_num_threads); default: "
    "torch's, one per core. Fewer than the cores is faster when other programs keep some busy; more than the CPUs "
    "is allowed, with a note (they take turns).", show_default=False)]


MAX_THREADS = 1024  # (or 4 per CPU, if more): beyond, OpenMP would start thousands of threads; refused


def set_threads(threads: int | None) -> int:
    """--threads: torch.set_num_threads (the kernels split their work over at::get_num_threads()). Returns the
    number of threads in use. More threads than CPUs is kept as asked (an experiment may want it), with a note:
    they take turns on the CPUs, and every kernel waits for its slowest thread."""
    if threads is not None:
        if threads < 1:
            raise CliError(f"--threads must be >= 1, got {threads}")
        n = cpu_count()
        if threads > max(MAX_THREADS, 4 * n):
            raise CliError(f"--threads must be at most {max(MAX_THREADS, 4 * n)} (this machine has {n} CPU"
                           f"{'s' if n > 1 else ''}), got {threads}")
        if threads > n:
            notice(f"--threads {threads} is more than the {n} CPU{'s' if n > 1 else ''} this process can run on: "
                   f"kept as asked, but the threads take turns and each kernel waits for the slowest, usually "
                   f"slower than --threads {n}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------- prompts and tokens

_IDS_RE = re.compile(r"\s*\d+(?:\s*[,\s]\s*\d+)*\s*,?\s*")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def prompt_text(prompt: str | list[str]) -> str:
    """PROMPT's words joined with spaces; CliError when it is not valid UTF-8. Linux hands Python the bytes of argv
    that do not decode as UTF-8 as lone surrogates (U+DC80..U+DCFF, 'surrogateescape'), which no tokenizer takes
    and no terminal prints: the prompt is refused, naming the first such byte, rather than changed behind the
    user's back."""
    if not isinstance(prompt, str):
        prompt = " ".join(prompt)
    bad = _LONE_SURROGATE.search(prompt)
    if bad:
        c, at = ord(bad.group()), len(prompt[:bad.start()].encode("utf-8"))
        what = (f"byte 0x{c - 0xDC00:02x} at offset {at}" if 0xDC80 <= c <= 0xDCFF
                else f"a lone surrogate U+{c:04X} at offset {at}")
        raise CliError(f"the prompt is not valid UTF-8 ({what}); give it as UTF-8 text (iconv -t UTF-8 converts "
                       f"it)")
    return prompt


SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.manual_seed and torch.Generator.manual_seed take


def check_seed(seed: int | None) -> None:
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise CliError(f"--seed must be in -2**63..2**64-1 (what torch.manual_seed takes), got {seed}")


def _example_ids(config) -> str:
    return "464 2068 7586" if config.vocab_size > 7586 else "1 2 3"


def encode_prompt(prompt: str | list[str], tok, config, as_ids: bool = False) -> torch.Tensor:
    """PROMPT -> input ids [1, T]. Text through the model's HF tokenizer; ids as given. CliError on bad input.

    An empty (or all-blank) prompt starts from the bos token, <|endoftext|> for GPT-2 (its unconditional start),
    with a note saying so."""
    prompt = prompt_text(prompt)
    if not prompt.strip():  # GPT-2's unconditional start
        bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
        if bos is None:
            raise CliError("the prompt is empty and the model has no bos/eos token to start from; give a prompt")
        ids = [int(bos)]
        what = repr(tok.decode(ids)) if tok is not None else "the bos token"
        notice(f"the prompt is empty: starting from {what} (id {bos}), the model's start-of-text token")
    elif as_ids or tok is None:
        if not _IDS_RE.fullmatch(prompt):
            if as_ids:
                raise CliError(f"--ids reads the prompt as token ids separated by spaces or commas (e.g. "
                               f"'{_example_ids(config)}'), got {prompt!r}"
                               + ("; drop --ids to read it as text" if tok is not None else ""))
            raise CliError(f"this model has no tokenizer: give the prompt as token ids, e.g. "
                           f"'{_example_ids(config)}' (0..{config.vocab_size - 1}), or use a model saved with its "
                           f"tokenizer")
        ids = [int(x) for x in re.split(r"[,\s]+", prompt.strip().rstrip(",")) if x]
        bad = [i for i in ids if i >= config.vocab_size]
        if bad:
            raise CliError(f"token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
    else:
        ids = list(tok(prompt)["input_ids"])
        if _IDS_RE.fullmatch(prompt):
            notice(f"the prompt was read as text ({len(ids)} tokens); pass --ids to read it as token ids")
    n_pos = config.n_positions
    if len(ids) > n_pos:
        raise CliError(f"the prompt is {len(ids)} tokens, longer than the model's context (n_positions={n_pos})")
    return torch.tensor([ids], dtype=torch.long)


def token_text(tok, token_id: int) -> str:
    """How a token reads, quoted so that leading spaces show: ' the'. '—' without a tokenizer."""
    if tok is None:
        return "—"
    return repr(tok.decode([token_id]))


def eos_id(model, tok) -> int | None:
    """The token that ends generation: the generation config's, else the model config's, else the tokenizer's."""
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              model.config.eos_token_id, getattr(tok, "eos_token_id", None)):
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return None


# ---------------------------------------------------------------- generation

MIN_TEMPERATURE = 1e-6  # below, sampling is greedy decoding, and logits / temperature overflow float32 sooner or later


@dataclasses.dataclass
class GenSettings:
    max_new_tokens: int = 50
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: int | None = None
    speculative: str | None = None  # the draft: the model's copy in a weight mode, or a model name; None: off
    draft_tokens: int | None = None  # tokens drafted per round (None: chosen per round)

    def check(self, prompt_len: int | None = None, n_positions: int | None = None) -> "GenSettings":
        """ValueError for values generation cannot use."""
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0 or math.isinf(self.temperature):  # also rejects NaN
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"--temperature must be > 0 and at least {MIN_TEMPERATURE:g} (sampling that cold is "
                             f"greedy decoding: use --greedy), got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if self.draft_tokens is not None and not (self.speculative is not None and 1 <= self.draft_tokens <= 8):
            raise ValueError(f"--draft-tokens must be in 1..8 and goes with --speculative, got {self.draft_tokens}")
        if self.speculative is not None and self.speculative in ("", "fp32"):
            raise ValueError(f"--speculative must be fp16, bf16, int8 or a draft model (the model's copy in that "
                             f"mode drafts, or a smaller model), got {self.speculative!r}")
        if prompt_len is not None and n_positions is not None and prompt_len + self.max_new_tokens > n_positions:
            raise ValueError(f"the prompt ({prompt_len} tokens) + --max-new-tokens {self.max_new_tokens} = "
                             f"{prompt_len + self.max_new_tokens} passes the model's context "
                             f"(n_positions={n_positions}); use --max-new-tokens "
                             f"{max(n_positions - prompt_len, 0)} or less")
        return self


def _generate(model, ids: torch.Tensor, s: GenSettings, on_token: Callable[[int], None] | None = None,
              draft=None) -> torch.Tensor:
    """THE fast-path token generator of the CLI: ids [1, T] -> [1, T + new], calling on_token for each new id.
    gpt2kern.generate: the C++ decode engine (HF's generate on CPU float32 models it does not serve). `draft`: the
    draft model --speculative named, if it named one."""
    import gpt2kern

    stream = (lambda t: on_token(int(t[0]))) if on_token is not None else None
    return gpt2kern.generate(model, ids, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                             temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             eos_token_id=s.eos_token_id if s.eos_token_id is not None else [],
                             pad_token_id=s.eos_token_id if s.eos_token_id is not None else 0,
                             seed=s.seed, streamer=stream, speculative=draft if draft is not None else s.speculative,
                             draft_tokens=s.draft_tokens)


def _hf_generate(model, ids: torch.Tensor, s: GenSettings, on_token: Callable[[int], None] | None = None):
    """HF's own generate on HF's own forward (the reference for --compare-hf and parity): gpt2kern.generate's
    fallback, hf_generate, with the same settings (model not optimized)."""
    from ..decode.generate import hf_generate

    stream = (lambda t: on_token(int(t[0]))) if on_token is not None else None
    return hf_generate(model, ids, torch.ones_like(ids), s.max_new_tokens, do_sample=s.do_sample,
                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       eos=[s.eos_token_id] if s.eos_token_id is not None else [],
                       pad_token_id=s.eos_token_id if s.eos_token_id is not None else 0, seed=s.seed,
                       streamer=stream)


class _TokenPrinter:
    """Streams generated tokens to stdout as text (or ids), holding back incomplete UTF-8; notes the eos."""

    def __init__(self, tok, eos: int | None, echo: bool):
        self.tok, self.eos, self.echo = tok, eos, echo
        self.ids: list[int] = []
        self.hit_eos = False
        self.printed = ""
        self.t_first: float | None = None

    def __call__(self, token_id: int):
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.hit_eos:
            return
        if token_id == self.eos:
            self.hit_eos = True
            return
        self.ids.append(token_id)
        if not self.echo:
            return
        if self.tok is None:
            sys.stdout.write(f" {token_id}")
        else:
            text = self.tok.decode(self.ids)
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                return
            sys.stdout.write(text[len(self.printed):])
            self.printed = text
        sys.stdout.flush()

    def text(self) -> str | None:
        return None if self.tok is None else self.tok.decode(self.ids)

    def finish(self):
        if self.echo:
            if self.tok is not None:
                rest = self.text()[len(self.printed):]
                sys.stdout.write(rest)
            sys.stdout.write("\n")
            sys.stdout.flush()


def _sampling(greedy: bool | None, temperature, top_k, top_p) -> tuple[bool, float, int, float]:
    given = [n for n, v in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p)) if v is not None]
    if greedy is True and given:
        raise CliError(f"--greedy cannot be combined with {', '.join(given)} (those are sampling settings)")
    do_sample = greedy is False or (greedy is None and bool(given))
    return (do_sample, 1.0 if temperature is None else temperature, 0 if top_k is None else top_k,
            1.0 if top_p is None else top_p)


@app.command()
def generate(
    prompt: PromptArg,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to add.")] = 50,
    greedy: Annotated[Optional[bool], typer.Option(
        "--greedy/--sample", help="Greedy decoding (the default), or sampling (implied by any of the next three).",
        show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature, > 0 [default: 1.0].",
                                                         show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens; 0 = all "
                                                 "[default: 0].", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1] "
                                                   "[default: 1.0].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling (torch.manual_seed).",
                                                show_default=False)] = None,
    device: DeviceOpt = Device.cpu,
    compare_hf: Annotated[bool, typer.Option("--compare-hf", help="Also run HF's own forward with the same "
                                             "settings: token agreement and speed ratio.")] = False,
    ids: IdsOpt = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    weights: WeightsOpt = Weights.fp32,
    speculative: Annotated[Optional[str], typer.Option(
        "--speculative", metavar="DRAFT", help="Speculative decoding (CPU): the model's fp16, bf16 or int8 copy, or "
        "a smaller model (a name or directory, as --model takes), drafts tokens; the model checks them in one step. "
        "Greedy: exactly the tokens without it; sampling: exactly the same distribution.",
        show_default=False)] = None,
    draft_tokens: Annotated[Optional[int], typer.Option(
        "--draft-tokens", metavar="K", help="With --speculative: tokens drafted per round, 1..8 [default: chosen each "
        "round from the measured times and acceptance].", show_default=False)] = None,
):
    """Stream a continuation of PROMPT on the fast path; stops at <|endoftext|>; prints tokens/s at the end."""
    device = Device(device).value
    weights = Weights(weights).value
    prompt = prompt_text(prompt)
    do_sample, t, k, p = _sampling(greedy, temperature, top_k, top_p)
    s = GenSettings(max_new_tokens, do_sample, t, k, p, seed, speculative=speculative, draft_tokens=draft_tokens)
    check_seed(seed)
    with expected_errors():
        s.check()
    if speculative is not None and device != "cpu":
        raise CliError(f"--speculative runs on CPU only (--device cpu), not {device}")
    n_threads = set_threads(threads)
    import gpt2kern
    name, m, tok = ui.load_model(model, device)
    input_ids = encode_prompt(prompt, tok, m.config, ids)
    with expected_errors():
        s.check(input_ids.shape[1], m.config.n_positions)
    draft = None
    if speculative is not None and speculative not in ("fp16", "bf16", "int8"):
        try:
            _, draft, _ = ui.load_model(speculative, device)
        except CliError as e:
            raise CliError(f"--speculative must be fp16, bf16, int8 or a draft model: {e}") from None
        if draft.config.vocab_size != m.config.vocab_size:
            raise CliError(f"--speculative {speculative}: its vocabulary ({draft.config.vocab_size} tokens) is not "
                           f"the model's ({m.config.vocab_size}); a draft model must share the tokenizer")
        if input_ids.shape[1] + s.max_new_tokens > draft.config.n_positions:
            raise CliError(f"--speculative {speculative}: its context (n_positions={draft.config.n_positions}) is "
                           f"shorter than the prompt + --max-new-tokens")
    s.eos_token_id = eos_id(m, tok)
    if compare_hf and s.do_sample and s.seed is None:
        s.seed = random.randrange(2 ** 31)
        notice(f"--compare-hf with sampling: both runs use --seed {s.seed}")
    input_ids = input_ids.to(device)
    with expected_errors():
        gpt2kern.optimize(m, weights=weights)
    with torch.no_grad():
        m(input_ids[:, :1])  # warm-up: thread pools and allocations out of the timing
    why = gpt2kern.fallback_reason(m)

    printer = _TokenPrinter(tok, s.eos_token_id, echo=not json_)
    ui.flush_notices()  # the input checks passed: say which model this is before streaming from it
    if printer.echo:  # the prompt, in the form the continuation streams in (an empty one: nothing, a note says where
        # it starts): text as given; ids as ids without a tokenizer, else as the text they read as (--ids: not ids
        # run into text)
        sys.stdout.write("" if not prompt.strip() else " ".join(map(str, input_ids[0].tolist())) if tok is None
                         else tok.decode(input_ids[0].tolist()) if ids else prompt)
        sys.stdout.flush()
    interrupted = False
    t0 = time.perf_counter()
    try:
        _generate(m, input_ids, s, printer, draft)
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - t0
    printer.finish()
    n_new = len(printer.ids) + printer.hit_eos
    res = dict(model=name, device=device, prompt_ids=input_ids[0].tolist(), new_ids=printer.ids,
               text=printer.text(), new_tokens=n_new, stopped_at_eos=printer.hit_eos, interrupted=interrupted,
               seconds=elapsed, tokens_per_s=n_new / elapsed if elapsed > 0 else None,
               first_token_s=(printer.t_first - t0) if printer.t_first else None,
               settings=dataclasses.asdict(s), threads=n_threads, fast_path=why is None, fallback_reason=why,
               weights=weights)
    if interrupted:
        if json_:
            emit_json(res)
        ui.err_console.print(f"interrupted after {n_new} tokens", markup=False)
        return ui.EXIT_INTERRUPTED

    if compare_hf:
        gpt2kern.restore(m, unfreeze=False)
        with torch.no_grad():
            m(input_ids[:, :1])  # same warm-up for HF
        hf_ids: list[int] = []
        t0 = time.perf_counter()
        _hf_generate(m, input_ids, s, hf_ids.append)
        hf_s = time.perf_counter() - t0
        ours_all = printer.ids + ([s.eos_token_id] if printer.hit_eos else [])
        same = 0
        for a, b in zip(ours_all, hf_ids):
            if a != b:
                break
            same += 1
        res["compare_hf"] = dict(hf_new_ids=hf_ids, hf_seconds=hf_s,
                                 hf_tokens_per_s=len(hf_ids) / hf_s if hf_s > 0 else None,
                                 agreeing_prefix=same, identical=ours_all == hf_ids,
                                 speedup=(hf_s / len(hf_ids)) / (elapsed / n_new) if n_new and hf_ids else None)
    if json_:
        emit_json(res)
        return 0
    end = " (stopped at eos)" if printer.hit_eos else ""
    first = f", first token {res['first_token_s'] * 1e3:.0f} ms" if res["first_token_s"] is not None else ""
    threads = f", {n_threads} thread" + ("s" if n_threads > 1 else "") if device == "cpu" else ""
    console.print(f"[dim]{n_new} tokens in {elapsed:.2f} s: {fmt_num(res['tokens_per_s'], 3)} tokens/s{first}{end}"
                  f" — gpt2kern, {device}{threads}"
                  f"{'' if weights == 'fp32' else f', {weights} weights'}[/dim]")
    if why is not None:
        notice(f"the fast path did not run ({why}): these are HF's numbers")
    if compare_hf:
        c = res["compare_hf"]
        print_table([("run", "left"), ("tokens", "right"), ("seconds", "right"), ("tokens/s", "right")],
                    [("gpt2kern", n_new, elapsed, res["tokens_per_s"]),
                     ("HF eager", len(hf_ids), c["hf_seconds"], c["hf_tokens_per_s"])],
                    title="--compare-hf (same prompt, settings and seed)" +
                    ("" if weights == "fp32" else f"; gpt2kern with {weights} weights, HF in fp32"))
        agree = ("identical tokens" if c["identical"] else
                 f"tokens agree for the first {c['agreeing_prefix']} of {max(len(hf_ids), n_new)}")
        console.print(f"{agree}; speed {fmt_num(c['speedup'], 3)}× HF (per token)")
    return 0


# ---------------------------------------------------------------- next

@app.command("next")
def next_token(
    prompt: PromptArg,
    model: ModelOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="How many of the most likely tokens to list.")] = 10,
    device: DeviceOpt = Device.cpu,
    ids: IdsOpt = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    weights: WeightsOpt = Weights.fp32,
):
    """The next-token distribution after PROMPT: token, id, probability (softmax of the logits), logit."""
    device = Device(device).value
    weights = Weights(weights).value
    prompt = prompt_text(prompt)
    if top_k < 1:
        raise CliError(f"--top-k must be >= 1, got {top_k}")
    n_threads = set_threads(threads)
    import gpt2kern

    name, m, tok = ui.load_model(model, device)
    input_ids = encode_prompt(prompt, tok, m.config, ids).to(device)
    with torch.no_grad():
        ref = m(input_ids).logits[0, -1].double().cpu()  # HF's forward, for the agreement line
        with expected_errors():
            gpt2kern.optimize(m, weights=weights)
        logits = m(input_ids).logits[0, -1].double().cpu()
    why = gpt2kern.fallback_reason(m)
    probs = torch.softmax(logits, -1)
    k = min(top_k, logits.numel())
    top = torch.topk(probs, k)
    ref_top = torch.topk(torch.softmax(ref, -1), k).indices
    rows = [dict(rank=r + 1, token=None if tok is None else tok.decode([i]), id=i, probability=probs[i].item(),
                 logit=logits[i].item()) for r, i in enumerate(top.indices.tolist())]
    res = dict(model=name, prompt_ids=input_ids[0].tolist(), top=rows,
               top_mass=float(top.values.sum()), max_abs_logit_diff_vs_hf=(logits - ref).abs().max().item(),
               same_top_k_as_hf=bool(torch.equal(top.indices, ref_top)), threads=n_threads, fast_path=why is None,
               fallback_reason=why, weights=weights)
    if json_:
        emit_json(res)
        return 0
    print_table([("#", "right"), "token", ("id", "right"), ("probability", "right"), ("logit", "right")],
                [(r["rank"], token_text(tok, r["id"]), r["id"], fmt_num(r["probability"], 4), f"{r['logit']:.3f}")
                 for r in rows],
                title=f"next token after {input_ids.shape[1]} prompt tokens — {name}"
                      + ("" if weights == "fp32" else f", {weights} weights"),
                caption=f"probability = softmax(logits); these {k} hold {res['top_mass'] * 100:.3g}% of the mass")
    console.print(f"vs HF: max |Δlogit| = {fmt_num(res['max_abs_logit_diff_vs_hf'])}, "
                  f"same top-{k}: {'yes' if res['same_top_k_as_hf'] else 'NO'}"
                  + ("" if weights == "fp32" else f" (HF in fp32; {weights}'s expected error: gpt2kern parity "
                                                  f"--weights {weights})"))
    if why is not None:
        notice(f"the fast path did not run ({why})")
    return 0


# ---------------------------------------------------------------- trace

def _head(t: torch.Tensor, n: int = 3) -> str:
    v = t.reshape(-1, t.shape[-1])[-1, :n].tolist() if t.dim() else [t.item()]
    more = ", …" if t.dim() and t.shape[-1] > n else ""
    return "[" + ", ".join(f"{x:.3g}" for x in v) + more + "]"


@app.command()
def trace(
    prompt: PromptArg,
    model: ModelOpt = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", "-l", help="Print this step's tensor: wte, wpe, h.0.ln_1, h.0.attn.c_attn, h.0.attn, h.0.ln_2, "
        "h.0.mlp.act, h.0.mlp, h.0, ln_f, lm_head (HF names like transformer.h.0.mlp.c_proj work too).",
        show_default=False)] = None,
    full: Annotated[bool, typer.Option("--full", help="Print whole tensors, no '…' (with --layer: that one; "
                                       "without: every step).")] = False,
    device: DeviceOpt = Device.cpu,
    ids: IdsOpt = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
):
    """Every named step of the fast forward in execution order: shape, a few values, max |Δ| vs HF, tolerance."""
    device = Device(device).value
    prompt = prompt_text(prompt)
    set_threads(threads)
    import gpt2kern

    from ..model import steps as S

    name, m, tok = ui.load_model(model, device)
    want = None
    if layer is not None:
        with expected_errors("--layer: "):
            want = S.canonical_layer(layer, m.config)
    input_ids = encode_prompt(prompt, tok, m.config, ids).to(device)
    hf = S.hf_steps(m, input_ids)
    gpt2kern.optimize(m)
    with expected_errors():
        fast = S.fast_steps(m, input_ids)
    rows = S.compare(hf, fast)
    tensors = dict(fast)
    if want is not None:
        t = tensors[want]
        row = next(r for r in rows if r["name"] == want)
        t2 = t[0] if t.dim() == 3 and t.shape[0] == 1 else t
        if json_:
            emit_json(dict(model=name, prompt_ids=input_ids[0].tolist(), **row, runs=S.describe(want),
                           values=t2.cpu()))
            return 0
        console.print(f"{want} — {S.describe(want)}", markup=False, highlight=False)
        console.print(f"shape {list(t.shape)} (printed as {list(t2.shape)}: "
                      f"{'positions × features' if t2.dim() == 2 else 'values'}), "
                      f"max |Δ| vs HF = {fmt_num(row['max_abs_diff'])}"
                      + (f" (tolerance {fmt_num(row['tol'])} = {S.ATOL:g} + {S.RTOL:g}·max|HF| "
                         f"{fmt_num(row['max_abs_ref'])}: {'ok' if row['ok'] else 'OVER'})" if row["tol"] is not None
                         else ""), markup=False, soft_wrap=True)
        _print_tensor(t2, full)
        return 0
    if json_:
        out = dict(model=name, prompt_ids=input_ids[0].tolist(),
                   steps=[dict(r, runs=S.describe(r["name"]), head=tensors[r["name"]].reshape(
                       -1, tensors[r["name"]].shape[-1])[-1, :3].tolist()) for r in rows])
        if full:
            for st in out["steps"]:
                st["values"] = tensors[st["name"]].cpu()
        emit_json(out)
        return 0
    mark = {True: "✓", False: "✗", None: "—"}
    print_table([("#", "right"), "step", "runs (fast path)", "shape", "values (last position)",
                 ("max |Δ| vs HF", "right"), ("tolerance", "right"), ("ok", "center")],
                [(i, r["name"], S.describe(r["name"], short=True), "×".join(map(str, r["shape"])),
                  _head(tensors[r["name"]]), fmt_num(r["max_abs_diff"]), fmt_num(r["tol"]), mark[r["ok"]])
                 for i, r in enumerate(rows)],
                title=f"trace — {name}, {input_ids.shape[1]} prompt tokens, execution order",
                caption=f"tolerance = {S.ATOL:g} + {S.RTOL:g}·max|HF| per step: GPT-2's residual stream carries "
                        f"channels in the thousands (max|HF| is in --json and `gpt2kern parity`); dropout is the "
                        f"identity in eval mode; --layer NAME prints one step's tensor and what it runs")
    if full:
        for n_, t in fast:
            console.print(f"\n{n_} {list(t.shape)}", markup=False)
            _print_tensor(t[0] if t.dim() == 3 and t.shape[0] == 1 else t, True)
    return 0


def _print_tensor(t: torch.Tensor, full: bool):
    opts = dict(precision=4, linewidth=max(console.width, 80), sci_mode=False)
    torch.set_printoptions(profile="full" if full else "default")
    torch.set_printoptions(**opts)
    try:
        console.print(str(t.cpu()), markup=False, highlight=False, soft_wrap=True)
    finally:
        torch.set_printoptions(profile="default")


# ---------------------------------------------------------------- parity

MAX_PARITY_BATCH = 64

@app.command()
def parity(
    model: ModelOpt = None,
    device: DeviceOpt = Device.cpu,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Prompt length of the random-id test batch.")] = 32,
    batch: Annotated[int, typer.Option(help=f"Batch size of the test batch (1..{MAX_PARITY_BATCH}).")] = 2,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Greedy tokens to compare.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the random test ids.")] = 0,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    weights: WeightsOpt = Weights.fp32,
):
    """Layer-by-layer and end-to-end parity of the fast path vs HF eager; exit 1 if a tolerance is exceeded.
    With --weights fp16/bf16/int8: that mode's error against HF's fp32 logits (teacher-forced, up to 512 tokens:
    relative L2, mean KLD, top-1 agreement; greedy agreement of --new-tokens) against its documented tolerance."""
    device = Device(device).value
    weights = Weights(weights).value
    check_seed(seed)
    if weights != "fp32":
        return _parity_mode(model, device, weights, new_tokens, seed, threads, json_)
    for opt, v in (("--seq-len", seq_len), ("--batch", batch), ("--new-tokens", new_tokens)):
        if v < 1:
            raise CliError(f"{opt} must be >= 1, got {v}")
    if batch > MAX_PARITY_BATCH:  # HF's every step is kept for the comparison: memory grows with batch·seq_len
        raise CliError(f"--batch must be at most {MAX_PARITY_BATCH}, got {batch}")
    set_threads(threads)
    import gpt2kern

    from ..model import steps as S
    name, m, _ = ui.load_model(model, device)
    cfg = m.config
    if seq_len > cfg.n_positions:
        raise CliError(f"--seq-len {seq_len} is longer than the model's context (n_positions={cfg.n_positions})")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g).to(device)
    prompt = x[:1, : min(8, seq_len)]
    gs = GenSettings(max_new_tokens=min(new_tokens, cfg.n_positions - prompt.shape[1]), eos_token_id=None)
    if gs.max_new_tokens < 1:
        raise CliError("no room for generated tokens within n_positions")
    one = x[:1, :1]
    with ui.progress(4, "parity") as advance, torch.no_grad():
        hf = S.hf_steps(m, x)
        hf_one = m(one).logits
        advance()
        hf_gen = _hf_generate(m, prompt, gs)[0, prompt.shape[1]:].tolist()
        advance()
        gpt2kern.optimize(m)
        try:
            fast = S.fast_steps(m, x)
            why = None
        except ValueError:
            fast, why = [], gpt2kern.fallback_reason(m)
        ours_one = m(one).logits
        why_one = gpt2kern.fallback_reason(m)
        advance()
        ours_gen = _generate(m, prompt, gs)[0, prompt.shape[1]:].tolist()
        why_gen = gpt2kern.generate_fallback_reason()
        advance()
    from ..model.steps import ATOL
    layer_rows = S.compare(hf, fast)
    fast_d = dict(fast)
    e2e = []
    if fast:
        d = (fast_d["lm_head"].double() - hf["lm_head"].double()).abs().max().item()
        e2e.append(dict(check=f"logits B={batch} T={seq_len}", value=d, tol=ATOL, ok=d <= ATOL))
    d1 = (ours_one.double() - hf_one.double()).abs().max().item()
    e2e.append(dict(check="logits B=1 T=1", value=d1, tol=ATOL, ok=d1 <= ATOL))
    same = sum(1 for _ in _prefix(ours_gen, hf_gen))
    e2e.append(dict(check=f"greedy tokens identical ({len(hf_gen)} from an {prompt.shape[1]}-token prompt)",
                    value=f"{same}/{len(hf_gen)}", tol="all", ok=ours_gen == hf_gen))
    # a check of HF against itself proves nothing: the fast path must have run every call, and every step must have
    # had HF's value to compare with
    skipped = [w for w in (why, why_one, why_gen) if w is not None]
    e2e.append(dict(check="fast path ran (forward, one-token forward, gpt2kern.generate)",
                    value="yes" if not skipped else f"no: {skipped[0]}", tol="all", ok=not skipped))
    no_ref = [r["name"] for r in layer_rows if r["ok"] is None]
    e2e.append(dict(check="every step had HF's value to compare with", value=f"{len(layer_rows) - len(no_ref)}/"
                    f"{len(layer_rows)}" + (f" (missing: {', '.join(no_ref[:3])})" if no_ref else ""),
                    tol="all", ok=bool(layer_rows) and not no_ref))
    ok = all(r["ok"] is True for r in layer_rows) and all(r["ok"] for r in e2e)
    res = dict(model=name, device=device, fast_path=why is None, fallback_reason=why, ok=ok,
               tolerance=dict(atol=S.ATOL, rtol=S.RTOL, logits_atol=ATOL), steps=layer_rows, end_to_end=e2e)
    if json_:
        emit_json(res)
        return 0 if ok else ui.EXIT_FAILED
    mark = {True: "✓", False: "✗ FAIL", None: "—"}
    if layer_rows:
        print_table(["step", "shape", ("max |Δ|", "right"), ("max |HF|", "right"), ("tolerance", "right"),
                     ("ok", "center")],
                    [(r["name"], "×".join(map(str, r["shape"])), r["max_abs_diff"], r["max_abs_ref"], r["tol"],
                      mark[r["ok"]]) for r in layer_rows],
                    title=f"layer by layer vs HF eager — {name}, {device}, B={batch} T={seq_len}",
                    caption=f"tolerance = {S.ATOL:g} + {S.RTOL:g}·max|HF| (GPT-2's residual stream has channels "
                            f"in the thousands)")
    print_table(["end to end", ("value", "right"), ("tolerance", "right"), ("ok", "center")],
                [(r["check"], r["value"], r["tol"], mark[r["ok"]]) for r in e2e])
    if skipped:
        notice(f"the fast path did not run on {device} ({skipped[0]}): HF was compared with itself, which proves "
               f"nothing")
    worst = max((r for r in layer_rows if r["max_abs_diff"] is not None), key=lambda r: r["max_abs_diff"] /
                r["tol"], default=None)
    summary = (f"{len(layer_rows)} steps and {len(e2e)} end-to-end checks" +
               (f"; worst step {worst['name']} at {worst['max_abs_diff'] / worst['tol'] * 100:.2g}% of its "
                f"tolerance" if worst else ""))
    console.print(("parity OK: " if ok else "parity FAILED: ") + summary, markup=False)
    return 0 if ok else ui.EXIT_FAILED


def _prefix(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def _parity_mode(model, device, weights, new_tokens, seed, threads, json_):
    """parity --weights MODE: the mode's measured error against its tolerance (gpt2kern/cli/accuracy.py)."""
    if device != "cpu":
        raise CliError(f"parity --weights {weights} measures the CPU path (its CUDA twin: bench/gpu_bench.py)")
    if new_tokens < 1:
        raise CliError(f"--new-tokens must be >= 1, got {new_tokens}")
    set_threads(threads)
    import copy

    import gpt2kern

    from . import accuracy
    name, m, _ = ui.load_model(model, device)
    T = min(512, m.config.n_positions)
    n = min(new_tokens, m.config.n_positions - 16)
    with ui.progress(1, "parity") as advance:
        opt = gpt2kern.optimize(copy.deepcopy(m), weights=weights)
        res = accuracy.measure(m, weights, T=T, n_greedy=n, seed=seed, model=opt)
        why = gpt2kern.fallback_reason(opt)
        advance()
    rows = [dict(check=k, value=v, tol=lim, ok=ok) for k, v, lim, ok in accuracy.within(res)]
    rows.append(dict(check="fast path ran", value="yes" if why is None else f"no: {why}", tol="all", ok=why is None))
    ok = all(r["ok"] for r in rows)
    out = dict(model=name, device=device, weights=weights, ok=ok, measures=res, checks=rows)
    if json_:
        emit_json(out)
        return 0 if ok else ui.EXIT_FAILED
    mark = {True: "✓", False: "✗ FAIL"}
    print_table(["measure (vs HF fp32)", ("value", "right"), ("tolerance", "right"), ("ok", "center")],
                [(r["check"], f"{r['value']:.3g}" if isinstance(r["value"], float) else r["value"],
                  (("≥ " if r["check"] == "top1_agreement" else "≤ ") + f"{r['tol']:.3g}")
                  if isinstance(r["tol"], float) else r["tol"], mark[r["ok"]]) for r in rows],
                title=f"{weights} weights: error on a {T}-token sequence, teacher-forced ({name})")
    console.print(f"greedy: {res['greedy_same']}/{res['greedy_total']} tokens equal HF fp32's, the first "
                  f"{res['greedy_prefix']} in a row (informational: random weights give flat distributions)",
                  markup=False)
    console.print("✓ within the mode's tolerance" if ok else "✗ the mode's tolerance is exceeded", markup=False)
    return 0 if ok else ui.EXIT_FAILED


# ---------------------------------------------------------------- bench

@app.command()
def bench(
    model: ModelOpt = None,
    device: DeviceOpt = Device.cpu,
    reps: Annotated[int, typer.Option(help="Timed runs per measurement (median; >= 5).")] = 7,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Greedy tokens per decode run.")] = 128,
    threads: ThreadsOpt = None,
    quick: Annotated[bool, typer.Option(help="Fewer shapes (M=1 and 128, T=128, B=1): a fast smoke run.")] = False,
    contend: Annotated[bool, typer.Option(help="Also decode with one CPU kept busy by another process, at 1 thread "
                                               "and at --threads (a user's machine is rarely idle).")] = False,
    json_file: Annotated[Optional[str], typer.Option("--json", help="Also write every number to this JSON file.")]
    = None,
    plot_file: Annotated[Optional[str], typer.Option("--plot", help="Also draw the speed-ups into this PNG.")] = None,
    weights: Annotated[str, typer.Option("--weights", help="Also compare weight modes: all, or a comma list of "
                                                           "fp32, fp16, bf16, int8 (speed and error, CPU).")] = "fp32",
    speculative: Annotated[bool, typer.Option("--speculative", help="Also measure speculative decoding (int8 draft) "
                                              "against plain fp32 decode, and its worst case (CPU).")] = False,
):
    """Kernels vs torch and end to end vs HF (sdpa, and eager), with roofline fractions (see gpt2kern/cli/bench.py)."""
    device = Device(device).value
    modes = ["fp32", "fp16", "bf16", "int8"] if weights == "all" else [w.strip() for w in weights.split(",")]
    bad = [w for w in modes if w not in ("fp32", "fp16", "bf16", "int8")]
    if bad or not modes:
        raise CliError(f"--weights must be 'all' or a comma list of fp32, fp16, bf16, int8; got {weights!r}")
    if modes != ["fp32"] and device != "cpu":
        raise CliError("--weights other than fp32 measures the CPU path (--device cpu)")
    if reps < 5:
        raise CliError(f"--reps must be >= 5 (medians of fewer runs are noise), got {reps}")
    if new_tokens < 1:
        raise CliError(f"--new-tokens must be >= 1, got {new_tokens}")
    if contend and device != "cpu":
        raise CliError("--contend measures the CPU path (--device cpu)")
    if speculative and device != "cpu":
        raise CliError("--speculative measures the CPU path (--device cpu)")
    set_threads(threads)
    from . import bench as B

    if plot_file:  # before minutes of measuring
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib (pip install matplotlib)") from None
    name, m, _ = ui.load_model(model, device)
    if 16 + new_tokens > m.config.n_positions:
        raise CliError(f"--new-tokens {new_tokens} + the 16-token prompt passes n_positions={m.config.n_positions}")
    ui.flush_notices()  # what the figures are of (e.g. random weights) before minutes of measuring
    with ui.progress(B.steps(quick, m.config.n_positions, contend, modes, speculative), "bench") as advance:
        res = B.run(name, device, reps, new_tokens, quick, advance, model=m, contend=contend, weights=modes,
                    spec=speculative)
    load = res["machine_load"]
    if not load["trusted"]:
        console.print(f"warning: {load['warning']}", style="bold yellow", markup=False)
    if json_file:
        with ui.expected_errors("--json"), open(json_file, "w") as f:
            json.dump(res, f, indent=1)
    if plot_file:
        with ui.expected_errors("--plot"):
            B.plot(res, plot_file)
    console.print(f"gpt2kern bench — {res['model']} on {res['device']} ({res['gpu'] or res['cpu']}), "
                  f"{res['threads']} threads, ISA {res['isa']}, torch {res['torch']}, {res['date']}", markup=False)
    console.print(f"roofline inputs: read bandwidth {res['read_bandwidth_GBps']:.1f} GB/s, fp32 FMA peak "
                  f"{res['fma_peak_GFLOPs']:.0f} GFLOP/s; optimize() added {res['rss_added_MiB']:.0f} MiB to RSS "
                  f"({res['weights_MiB']:.0f} MiB of weights)", markup=False)
    print_table(["kernel", ("M", "right"), ("ours ms", "right"), ("torch ms", "right"), ("ratio", "right"),
                 ("GFLOP/s", "right"), ("% roofline", "right")],
                [(k["kernel"], k["M"], f"{k['ours_ms']:.4f}", f"{k['torch_ms']:.4f}", f"{k['ratio']:.2f}",
                  f"{k['gflops']:.1f}" if k["gflops"] else "", f"{k['roofline_pct']:.0f}") for k in res["kernels"]],
                title="kernels vs torch (ratio > 1: gpt2kern faster)",
                caption="M: rows (tokens) per call — up to 8: a decode step at batch M (attention: one new token "
                        "per sequence over a 512-token cache), more: a prefill of M tokens (causal attention over "
                        "them); ours ms, torch ms: median time per call; ratio = torch ms ÷ ours ms; GFLOP/s: ours, "
                        "on the rows that multiply (matmuls, attention); % roofline = the time the roofline allows "
                        "(bytes at the read bandwidth or FLOPs at the FMA peak, whichever is longer) ÷ ours ms: rows "
                        "whose data fit in cache can pass 100")
    hf_attn, eager = res["hf_attn"], res["hf_second_attn"]
    print_table(["end to end", ("ours ms", "right"), (f"HF {hf_attn} ms", "right"), ("ratio", "right")]
                + ([(f"HF {eager} ms", "right"), ("ratio", "right")] if eager else []) + [("% roofline", "right")],
                [(e["measure"], f"{e['ours_ms']:.2f}", f"{e['hf_ms']:.2f}", f"{e['ratio']:.2f}")
                 + ((f"{e['hf_eager_ms']:.2f}", f"{e['ratio_eager']:.2f}") if eager else ())
                 + (f"{e['roofline_pct']:.0f}",) for e in res["end_to_end"]],
                title=f"end to end vs HF ({hf_attn} attention, as from_pretrained gives it"
                      + (f"; and {eager}, the parity reference)" if eager else ")"),
                caption=f"ours ms, HF ms: median per prefill call, per decoded token (B=1) or per decode step "
                        f"(B=8: 8 tokens); each ratio = that HF column's ms ÷ ours ms (> 1: gpt2kern faster); "
                        f"% roofline = the roofline's time ÷ ours ms. Decode roofline: {res['decode_floor_ms']:.2f} "
                        f"ms/token to read every weight once at the "
                        f"{res['decode_read_bandwidth_GBps']:.1f} GB/s measured between the decodes; prefill "
                        f"roofline: FLOPs at the FMA peak")
    guard = next((r for r in res["dropin"] if r.get("share_pct") is not None), None)
    print_table(["drop-in", ("ms", "right"), "vs", ("its ms", "right"), ("ratio", "right")],
                [(r["measure"], f"{r['ms']:.4f}", r["baseline"], f"{r['baseline_ms']:.4f}",
                  "—" if r["ratio"] is None else f"{r['ratio']:.2f}") for r in res["dropin"]],
                title="drop-in: the guard, calls that need autograd, torch.compile (ratio > 1: the row is faster)",
                caption="ms: the row's median time per call; vs, its ms: what it is compared with, and that one's "
                        "time; ratio = its ms ÷ ms" + (
                            f". The guard is a cost, not a race (no ratio): {guard['ms'] * 1e3:.1f} µs per call, "
                            f"{guard['share_pct']:.2g}% of the whole T=1 forward it guards" if guard else ""))
    if res.get("contend"):
        print_table(["--contend", ("threads", "right"), ("ms/token", "right"), ("1 thread ms/token", "right"),
                     ("ratio", "right")],
                    [(r["measure"], r["threads"], f"{r['ms']:.2f}", f"{r['one_thread_ms']:.2f}", f"{r['ratio']:.2f}")
                     for r in res["contend"]],
                    title="decode with a busy core (ratio <= 1: more threads never hurt)",
                    caption=f"threads: the run's (--threads); ms/token at those threads, and at 1 thread in the same "
                            f"interleaved rounds; ratio = ms/token ÷ 1 thread ms/token. OMP_WAIT_POLICY="
                            f"{os.environ.get('OMP_WAIT_POLICY', '(unset: OpenMP default)')}")
    if res.get("speculative"):
        print_table(["speculative", ("ms/token", "right"), ("fp32 ms/token", "right"), ("×", "right"),
                     ("drafted", "right"), ("kept", "right"), ("tokens/pass", "right")],
                    [(r["measure"], f"{r['ms']:.2f}", f"{r['fp32_ms']:.2f}", f"{r['speedup']:.2f}", r["drafted"],
                      f"{r['kept_pct']:.0f}%", f"{r['tokens_per_pass']:.2f}") for r in res["speculative"]],
                    title="speculative decoding vs plain fp32 gpt2kern.generate (same tokens, checked)",
                    caption="ms/token (per step at B=8): speculative, and plain fp32 in the same interleaved rounds; "
                            "× = fp32 ÷ speculative; drafted: draft tokens checked in the last run; kept: the share "
                            "of them kept; tokens/pass: new tokens per target forward after the prefill")
    if res.get("modes"):
        md = res["modes"]
        T = next(k for k in md[0] if k.startswith("prefill_T") and k.endswith("_ms"))[len("prefill_T"):-len("_last_ms")]
        has8 = "decode_B8_ms" in md[0]
        print_table(["weights", ("MiB/tok", "right"), ("+MiB", "right"), ("B=1 ms", "right"), ("×", "right")]
                    + ([("B=8 ms", "right"), ("×", "right")] if has8 else [])
                    + [(f"T={T} ms", "right"), ("×", "right"), ("rel L2", "right"),
                       ("KLD", "right"), ("top-1", "right")]
                    + ([("greedy", "right")] if "greedy_same" in md[0] else []),
                    [(r["mode"], f"{r['weight_MiB']:.0f}", f"{r['added_MiB']:.0f}", f"{r['decode_B1_ms']:.2f}",
                      f"{r['decode_B1_vs_fp32']:.2f}")
                     + ((f"{r['decode_B8_ms']:.2f}", f"{r['decode_B8_vs_fp32']:.2f}") if has8 else ())
                     + (f"{r[f'prefill_T{T}_last_ms']:.1f}", f"{r[f'prefill_T{T}_vs_fp32']:.2f}", f"{r['rel_l2']:.1e}",
                        f"{r['mean_kld']:.1e}", f"{100 * r['top1_agreement']:.1f}%")
                     + ((f"{r['greedy_same']}/{r['greedy_total']}",) if "greedy_same" in r else ()) for r in md],
                    title="weight modes: decode B=1 ms/token, B=8 ms/step, prefill (last-position logits) ms; × = "
                          "speed vs fp32 (same rounds); error vs HF fp32, teacher-forced",
                    caption="MiB/tok: weight bytes a token streams; +MiB: the copy optimize() holds beside HF's "
                            "parameters; rel L2: ‖logits − HF's‖ ÷ ‖HF's‖; KLD: mean KL(HF ‖ mode) of the next-token "
                            "distributions; top-1: positions whose most likely token is HF's"
                            + ("; greedy: greedy tokens equal to HF fp32's" if "greedy_same" in md[0] else ""))
    console.print("parity (vs HF eager): " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                                       for k, v in res["parity"].items()), markup=False)
    before, during = load["other_cpus_before"], load["other_cpus_during"]
    console.print("machine load: " + (f"other processes used {before:.2f} CPUs before and {during:.2f} during the run; "
                                      if before is not None and during is not None else "")
                  + (f"repeated timings spread {100 * load['median_spread']:.0f} % (median)"
                     if load["median_spread"] is not None else ""), markup=False)
    if not load["trusted"]:
        console.print(f"warning: {load['warning']}", style="bold yellow", markup=False)
    return 0




# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`gpt2kern`, `python -m gpt2kern`): returns the exit code.

    0 ok; 1 a check failed (parity); 2 bad input — one `error:` line on stderr; 130 interrupted."""
    cmd = typer.main.get_command(app)
    try:
        rv = _run(cmd, argv)
    finally:
        ui.flush_notices()  # (after a failure, fail() has printed them before its line already)
    return rv


def _run(cmd, argv) -> int:
    try:
        rv = cmd.main(args=argv, prog_name="gpt2kern", standalone_mode=False)
    except getattr(_cx, "NoArgsIsHelpError", ()) as e:  # plain `gpt2kern`: the help
        console.print(e.ctx.get_help(), markup=False, highlight=False)
        return 0
    except _cx.UsageError as e:  # click's own: missing argument, no such option, bad choice -> one line too
        hint = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
        return ui.fail(f"{e.format_message()}{hint}")
    except _cx.ClickException as e:
        return ui.fail(e.format_message())
    except CliError as e:
        return ui.fail(str(e))
    except (typer.Abort, KeyboardInterrupt):
        ui.err_console.print("interrupted", markup=False)
        return ui.EXIT_INTERRUPTED
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
