"""The local length's own symbol (autosp/local_symbol.py): the inner backend compiles sizes in a
plain symbol L, Dynamo's guards stay in S alone, and one compile serves lengths P does and does
not divide."""
import torch
from torch.utils._sympy.functions import FloorDiv

import autosp
from autosp.local_symbol import stands_for
from fixtures import hf_llama


class _AotEagerKeepingInputs:
    """aot_eager, keeping what it was handed."""

    def __init__(self):
        self.calls = []

    def __call__(self, gm, example_inputs):
        self.calls.append((gm, list(example_inputs)))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _batch(seq_len):
    return hf_llama.inputs_fn(2, seq_len, torch.Generator().manual_seed(0))


def test_the_inner_backend_compiles_the_local_length_as_a_symbol_and_guards_stay_in_s():
    torch._dynamo.reset()  # one compile: no automatic-dynamic state left by earlier tests in this process
    torch.manual_seed(0)
    keep = _AotEagerKeepingInputs()
    autosp.compile(hf_llama.model_fn(), config=autosp.SPConfig(backend=keep)).warm_up(4, **_batch(13))
    ((gm, inputs),) = keep.calls
    local = inputs[-1]
    assert isinstance(local, torch.SymInt) and local.node.expr.is_Symbol and local.node.hint == 4
    env = local.node.shape_env
    (full,) = {i.node.expr for i in inputs[:-1] if isinstance(i, torch.SymInt)}
    assert stands_for(env) == {local.node.expr: FloorDiv(full + 3, 4)}
    assert not any(n.target is FloorDiv for n in gm.graph.nodes)
    assert all(local.node.expr not in g.expr.free_symbols for g in env.guards)  # rewritten in S


def test_one_compile_serves_lengths_p_does_and_does_not_divide():
    torch.manual_seed(0)
    compiled = autosp.compile(hf_llama.model_fn(), backend="aot_eager")
    graphs = autosp.COUNTERS["graphs"]
    for seq_len in (13, 16, 17, 64):
        compiled.warm_up(4, **_batch(seq_len))
    assert autosp.COUNTERS["graphs"] == graphs + 1
    compiled.warm_up(4, **_batch(3))  # a local length of 1: L's range starts at 1, not at 2
