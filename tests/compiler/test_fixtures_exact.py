"""Every bundled fixture, through the verifier against one device: P in {2, 4, 8} on threads and
{2, 4} on gloo (`make test-all`; the default run's gloo exactness: tests/compiler/test_runtime.py),
lengths that P does and does not divide, float64 and float32, with and without position_ids. The
table's tolerances (float64 1e-10, float32 1e-5 relative) decide."""
import glob
import os

import pytest
import torch

from autosp_verify import verify, verify_file
from autosp_verify.model_file import load_model_file

from fixtures import MULTIMODAL, SCALE  # noqa: E402  (autosp-wrap: tests/multimodal; scale: no real weights)

FIXTURES = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "[!_]*.py"))
                  if os.path.basename(p)[:-3] not in MULTIMODAL | SCALE)
IDS = [os.path.basename(p)[:-3] for p in FIXTURES]


def _with_positions(inputs_fn):
    def inputs(batch, seq_len, generator):
        out = inputs_fn(batch, seq_len, generator)
        out["position_ids"] = torch.arange(seq_len).expand(batch, seq_len)
        return out
    return inputs


def _check(path, impl="autosp-eager", positions=False, dtype=torch.float64, simulator="threaded", steps=1, **case):
    """One step per case in the grid (the second draw of the batch is covered where it matters:
    the aot test below, tests/verify/test_robustness.py)."""
    loaded = load_model_file(path)
    inputs_fn = _with_positions(loaded.inputs_fn) if positions else loaded.inputs_fn
    result = verify(loaded.model_fn, inputs_fn, impl=impl, dtype=dtype, simulator=simulator, steps=steps, **case)
    assert result.passed, (result.status, result.error, result.failures[:5])
    return result


SLOW = pytest.mark.slow  # `make test-all`; the default run keeps one representative of each kind
# (P=4 runs by default in the float32 / position_ids test and through AOTAutograd below; there,
# every fixture on threads, four through AOTAutograd)


@pytest.mark.parametrize("path", FIXTURES, ids=IDS)
@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=SLOW), pytest.param(8, marks=SLOW)])
def test_fixture_is_exact_on_threads(path, world_size):
    for seq_len in (16, 13):  # divisible by P, and not
        _check(path, world_size=world_size, seq_len=seq_len)


@pytest.mark.parametrize("path", FIXTURES, ids=IDS)
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=SLOW), 4, pytest.param(8, marks=SLOW)])
def test_fixture_is_exact_with_position_ids_and_in_float32(path, world_size):
    for seq_len in (16, 13):
        _check(path, positions=True, world_size=world_size, seq_len=seq_len)
        _check(path, dtype=torch.float32, world_size=world_size, seq_len=seq_len)


AOT_DEFAULT = {"gpt_style", "hf_llama", "hf_olmo2_padded", "hf_qwen3_packed"}  # hand-written, GQA, padding, packed


@pytest.mark.parametrize("path", [p if name in AOT_DEFAULT else pytest.param(p, marks=SLOW)
                                  for p, name in zip(FIXTURES, IDS)], ids=IDS)
def test_fixture_is_exact_through_aot_autograd(path):
    """The default impl: the rewritten graph through AOTAutograd (what Inductor receives)."""
    _check(path, impl="autosp", world_size=4, seq_len=11, steps=2)


@pytest.mark.multiproc
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=SLOW), pytest.param(4, marks=SLOW)])
def test_fixture_is_exact_on_gloo_processes(world_size):
    path = next(p for p in FIXTURES if p.endswith("hf_llama.py"))  # by path: each process loads it
    result = verify_file(path, impl="autosp", simulator="gloo", world_size=world_size, seq_len=13, timeout=300)
    assert result.passed, (result.status, result.error, result.failures[:5])
