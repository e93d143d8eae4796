"""Property: whatever bytes and arguments reach the `gpt2kern` console script, each subcommand answers (exit 0), or
says what is wrong in one `error:` line (exit 2; `note:` lines may come before it) — never a traceback.

Each example is the real console script in a subprocess, its argv given as bytes (what a shell hands over: not
always UTF-8). Small on purpose: an example that gets past argument checking imports torch (~2-3 s); the "ci" profile
runs 20 derandomized examples (about a minute here), `pytest --fuzz` 200.
"""
import os
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_cli import ENV, ROOT, text_model_dir  # noqa: F401  (fixture)

N_EXAMPLES = 20 if settings.default.max_examples <= 100 else 200

# what a shell can pass: any bytes but NUL (C strings)
junk = st.binary(min_size=0, max_size=12).map(lambda b: b.replace(b"\0", b""))
small_int = st.integers(-2, 6).map(lambda i: str(i).encode())
any_int = st.one_of(small_int, st.integers(-2 ** 70, 2 ** 70).map(lambda i: str(i).encode()), junk)
number = st.one_of(st.sampled_from([b"0", b"1", b"0.5", b"-1", b"nan", b"inf", b"1e-300", b"1e300"]), junk)
prompt = st.one_of(junk, st.sampled_from([b"1 2 3", b"5,6", b"", b"  ", b"The quick", b"caf\xc3\xa9 \xe2\x98\x95",
                                          b"464 2068", b"1 2 999", b"caf\xe9", b"\xed\xa0\x80"]))
# TEXT: a tiny model saved with a byte-level BPE tokenizer (test_cli's text_model_dir: text prompts reach a real
# tokenizer, quickly); random:tiny (ids, no tokenizer); random:distilgpt2 (GPT-2's own tokenizer, slower) now and
# then; junk and missing models (an error before anything heavy)
TEXT = b"<text model>"
JUNK = b"<junk>"
model = st.sampled_from([TEXT, TEXT, TEXT, b"random:tiny", b"random:tiny", b"random:distilgpt2", JUNK, b"random:nope",
                         b"./no/such/dir", b"."]).flatmap(lambda m: junk if m == JUNK else st.just(m))
weights = st.one_of(st.sampled_from([b"fp32", b"fp16", b"bf16", b"int8"]), junk)

OPTIONS = {  # per subcommand: (option, its value's strategy or None for a flag)
    "generate": [(b"-n", small_int), (b"--temperature", number), (b"--top-k", any_int), (b"--top-p", number),
                 (b"--seed", any_int), (b"--greedy", None), (b"--sample", None), (b"--compare-hf", None),
                 (b"--weights", weights)],
    "next": [(b"-k", any_int), (b"--weights", weights)],
    "trace": [(b"--layer", st.one_of(junk, st.sampled_from([b"wpe", b"h.1.mlp", b"h.9.ln_1", b"lm_head",
                                                              b"transformer.h.0.attn.c_proj"]))), (b"--full", None)],
    "parity": [(b"--seq-len", small_int), (b"--batch", small_int), (b"--new-tokens", small_int),
               (b"--seed", any_int), (b"--weights", weights)],
    # --quick (M = 1, 128; one prefill, one decode) on random:tiny; its argument errors are the cheap common case
    "bench": [(b"--new-tokens", small_int), (b"--weights", st.one_of(weights, st.just(b"fp16,int8")))],
}
COMMON = [(b"--threads", st.one_of(small_int, any_int)), (b"--json", None), (b"--device", st.one_of(
    st.sampled_from([b"cpu", b"cpu", b"cuda"]), junk))]
PROMPTED = ("generate", "next", "trace")


@st.composite
def argv(draw):
    cmd = draw(st.sampled_from(list(OPTIONS)))
    args = [cmd.encode()]
    if cmd in PROMPTED:
        args.append(draw(prompt))
        args += [b"--ids"] if draw(st.booleans()) and draw(st.booleans()) else []
    common = COMMON if cmd != "bench" else [c for c in COMMON if c[0] != b"--json"]  # (bench --json names a file)
    if cmd == "bench":  # a run that passes its checks takes ~15 s: --reps 5 in a third of them only
        args += [b"--quick", b"--new-tokens", b"2", b"--reps", str(draw(st.integers(3, 5))).encode()]
    args += [b"-m", draw(model)]
    for opt, value in draw(st.lists(st.sampled_from(OPTIONS[cmd] + common), max_size=3, unique=True)):
        args.append(opt)
        if value is not None:
            args.append(draw(value))
    defaults = {"generate": [(b"-n", b"3")], "parity": [(b"--new-tokens", b"2"), (b"--seq-len", b"4")]}
    for opt, value in defaults.get(cmd, []):  # short runs, unless the draw set these
        if opt not in args:
            args += [opt, value]
    return args


@settings(max_examples=N_EXAMPLES)
@given(argv())
@example([b"generate", b"\xff\xfe", b"-m", TEXT, b"-n", b"2"])  # the issue's: TextEncodeInput's traceback, exit 1
@example([b"next", b"caf\xe9", b"-m", TEXT])
@example([b"trace", b"\x80 1", b"-m", TEXT, b"--layer", b"wpe"])
def test_every_subcommand_answers_or_says_one_error_line(text_model_dir, args):  # noqa: F811 (the fixture)
    args = [os.fsencode(text_model_dir) if a == TEXT else a for a in args]
    r = subprocess.run([sys.executable, "-m", "gpt2kern", *args], capture_output=True, env=ENV, cwd=ROOT,
                       timeout=300)
    err = r.stderr.decode("utf-8", "backslashreplace")
    assert "Traceback" not in err, err
    allowed = (0, 1, 2) if args[0] == b"parity" else (0, 2)  # parity: 1 = a check over its tolerance (a result)
    assert r.returncode in allowed, err
    lines = err.strip().splitlines()
    if r.returncode == 2:
        assert lines and lines[-1].startswith("error: "), err
        assert all(line.startswith("note: ") for line in lines[:-1]), err
    else:
        assert not any(line.startswith("error") for line in lines), err


@pytest.mark.parametrize("args", [
    [b"generate", b"\xff\xfe", b"-m", b"random:distilgpt2"],  # the example: a traceback before
    [b"next", b"caf\xe9", b"-m", b"random:distilgpt2"],
    [b"generate", b"1 2", b"-m", b"random:tiny", b"--sample", b"--temperature", b"1e-300"],  # logits/T overflowed
    [b"next", b"1 2", b"-m", b"random:tiny", b"-t", b"99999999999999999999"],  # torch.set_num_threads overflowed
    [b"parity", b"-m", b"random:tiny", b"--seed", b"99999999999999999999999"],  # manual_seed overflowed
])
def test_what_the_fuzz_found(args):
    r = subprocess.run([sys.executable, "-m", "gpt2kern", *args], capture_output=True, env=ENV, cwd=ROOT,
                       timeout=300)
    err = r.stderr.decode("utf-8", "backslashreplace")
    assert r.returncode == 2 and "Traceback" not in err and err.startswith("error: "), err
    assert len(err.strip().splitlines()) == 1, err
