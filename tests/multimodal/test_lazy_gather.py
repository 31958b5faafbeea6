"""The residual stream stays sharded from layer to layer: a layer's output is all-gathered only
when something other than the next wrapped layer reads it (``autosp/multimodal/lazy.py``), and
that reader gets the exact full value. Counted with autosp's per-rank collective counters."""
import os

import pytest

from autosp_verify.run import verify, verify_file

from . import wrap_impls
from .readers_model import Readers, inputs_fn

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "fixtures")

# how the model reads its 4 layers' outputs -> the layer outputs gathered in the forward (each
# read from outside the layers; the final norm reads the last), each with a reduce-scatter back
GATHERED = {"last": 1, "metadata": 1, "recorded": 2, "inplace": 3, "no_grad_first": 2}


@pytest.mark.parametrize("read", list(GATHERED))
def test_gathered_only_where_read_outside_the_layers(read):
    result = verify(lambda: Readers(read), inputs_fn, impl="autosp-wrap", world_size=2, seq_len=7, steps=1)
    assert result.status == "pass", (result.status, result.error, result.failures[:3])
    measured = result.accounting["collectives"]["measured"]
    assert (measured["all_gather"], measured["reduce_scatter"]) == (GATHERED[read], GATHERED[read]), measured
    assert measured["all_to_all"] == 4 * 4 * 2  # 4 layers x (q, k, v, out) x (forward, backward)


def test_all_gathers_per_step_drop_on_llava():
    """LLaVA at P=2, 2 vision and 2 language layers: vision layer 0's output is read by the feature
    layer (-2) and gathered, with a reduce-scatter; layer 1's by CLIP's pooler (no gradient: no
    reduce-scatter); language layer 0's goes to layer 1 as its chunk, layer 1's stays sharded
    (fusion adapter). Gathering every layer's output cost 3 all-gathers."""
    result = verify_file(os.path.join(FIXTURES, "hf_llava.py"), impl="autosp-wrap", world_size=2, seq_len=19,
                         steps=1)
    assert result.status == "pass", (result.error, result.failures[:3])
    measured = result.accounting["collectives"]["measured"]
    assert (measured["all_gather"], measured["reduce_scatter"], measured["all_reduce"]) == (2, 1, 1), measured


def test_output_hidden_states_are_the_full_values():
    """HF's output recorders keep every layer's output and the first layer's input: all returned
    whole (the input too: the layer's forward, not a hook, takes the chunk)."""
    import sys
    sys.path.insert(0, FIXTURES)
    from hf_vit import inputs_fn as vit_inputs, model_fn as vit_model

    def inputs(batch, seq_len, generator):
        return {**vit_inputs(batch, seq_len, generator), "output_hidden_states": True}
    result = verify(vit_model, inputs, impl="autosp-wrap", world_size=2, seq_len=13, steps=1)
    assert result.status == "pass", (result.status, result.error, result.failures[:3])


@pytest.mark.parametrize("bug,read", [("outside_reader_gets_own_chunk", "recorded"),
                                      ("stale_chunk_after_inplace", "inplace")])
def test_planted_lazy_gather_bug_is_caught(bug, read, monkeypatch):
    wrap_impls.BUGS[bug](monkeypatch)
    result = verify(lambda: Readers(read), inputs_fn, impl="autosp-wrap", world_size=2, seq_len=7, steps=1)
    assert result.status == "fail", (result.status, result.error)
