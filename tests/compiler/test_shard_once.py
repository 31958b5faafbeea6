"""A full value is sharded once: HF unsqueezes the rotary tables again in every layer, and those
identical views share one ``autosp::shard`` (pass shard_inputs), so the shards in the graph do
not grow with the depth of the model."""
import torch

import autosp
from autosp.passes import shard_inputs
from fixtures import hf_llama

SHARD = torch.ops.autosp.shard.default


def _shards_in_graph(layers: int) -> int:
    """The autosp::shard nodes of hf_llama's config with ``layers`` layers, after the passes."""
    graphs = []

    def keep(gm, example_inputs):  # the graph after the passes, run as it is
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = hf_llama.model_fn()
    model = type(model)(type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": layers}))
    batch = hf_llama.inputs_fn(2, 16, torch.Generator().manual_seed(0))
    autosp.compile(model, config=autosp.SPConfig(backend=keep)).warm_up(4, **batch)
    (gm,) = graphs
    return sum(n.target is SHARD for n in gm.graph.nodes)


def test_the_shards_do_not_grow_with_the_layers():
    torch._dynamo.reset()
    before = autosp.COUNTERS["shard_shared"]
    two, four = _shards_in_graph(2), _shards_in_graph(4)
    assert two == four == 4  # input ids, labels, cos, sin
    assert autosp.COUNTERS["shard_shared"] - before == 2 * (2 - 1) + 2 * (4 - 1)  # cos and sin, every later layer


def test_negative_control_a_shard_per_view_grows_with_the_layers(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(shard_inputs, "_same_value", lambda node: node)  # no two views share a shard
    assert _shards_in_graph(4) == 2 + 2 * 4
