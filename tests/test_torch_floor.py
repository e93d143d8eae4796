"""The torch that pyproject.toml accepts (>= 2.6) is the torch the code needs: no API newer than the floor is used.

The GPU machines' image has torch 2.11, where the graph decoder once called CUDAGraph.register_capture_end_hook
(torch 2.14) and failed. The APIs below are newer than the floor (checked against torch 2.6's and 2.11's
sources): the package must not reach them, and the paths that once did must run with them removed. transformers'
floor has its own run: scripts/floor.sh."""
import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import needs_cuda

import gpt2kern
from gpt2kern import ops
from gpt2kern.decode import cuda_graph

ROOT = Path(__file__).resolve().parents[1]
FLOOR = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)

# torch.cuda.CUDAGraph members some supported torch lacks: 2.11 has no capture-end hook, and 2.6 keeps no template
# graph after capture (no keep_graph=True, so raw_cuda_graph() has nothing to return)
NEWER_GRAPH_APIS = ("register_capture_end_hook", "raw_cuda_graph")


def test_the_declared_floor_is_the_audited_one():
    assert FLOOR == "2.6", "a new floor needs a new audit of NEWER_GRAPH_APIS"


@pytest.mark.parametrize("path", sorted([*(ROOT / "gpt2kern").glob("*.py"), *(ROOT / "bench").glob("*.py")]),
                         ids=lambda p: p.name)
def test_no_code_reaches_an_api_newer_than_the_floor(path):
    names = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
    assert not names & set(NEWER_GRAPH_APIS), f"{path.name} uses {names & set(NEWER_GRAPH_APIS)}"


@pytest.fixture
def floor_torch(monkeypatch):
    """torch.cuda.CUDAGraph as the floor has it: the newer members raise AttributeError (some are the C++ base's,
    which cannot be deleted, so a subclass hides them)."""
    class FloorGraph(torch.cuda.CUDAGraph):
        def __getattribute__(self, name):
            if name in NEWER_GRAPH_APIS:
                raise AttributeError(f"'CUDAGraph' object has no attribute '{name}' (torch {FLOOR})")
            return super().__getattribute__(name)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FloorGraph)
    return FloorGraph


@torch.no_grad()
def test_the_decoders_cpu_parts_run_on_the_floor(floor_torch, tiny):
    # the variant chooser and gpt2kern.generate (which builds a CUDA decoder only on CUDA models)
    with pytest.raises(AttributeError):
        _ = torch.cuda.CUDAGraph.__new__(floor_torch).register_capture_end_hook  # what the decoder once called
    v = cuda_graph.default_variants("Some GPU", 1, table={})
    assert set(v) == set(cuda_graph.VARIANTS)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 4))
    ours = gpt2kern.generate(tiny, ids, max_new_tokens=5)
    hf = tiny.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours[:, : hf.shape[1]], hf)


@needs_cuda
@torch.no_grad()
def test_cuda_graph_decoder_counts_its_nodes_on_the_floor(floor_torch, distil):
    ref = copy.deepcopy(distil).to("cuda")
    ids = torch.randint(0, distil.config.vocab_size, (1, 5), device="cuda")
    dec = cuda_graph.CudaGraphDecoder(ref, batch_size=1, max_len=20)
    counts = dec.launches_per_token
    assert counts["kernel"] > 0 and counts["total"] == sum(counts[k] for k in ("kernel", "memcpy", "memset", "other"))
    ours = dec.generate(ids, 10)
    hf = ref.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours[:, : hf.shape[1]], hf)
    assert torch.equal(gpt2kern.generate(ref, ids, max_new_tokens=10)[:, : hf.shape[1]], hf)


@needs_cuda
def test_capture_node_counts_outside_a_capture_is_a_value_error_cuda():
    with pytest.raises(ValueError, match="not capturing a graph"):
        ops.capture_node_counts()
