"""``python -m autosp_verify.scale``: tables, refusals, the figure and JSON; bad input named."""
import json
import os

import pytest
import torch

from autosp_verify.scale.cli import main
from autosp_verify.scale.report import parse_bytes, parse_tokens
from autosp_verify.scale.simulate import Scenario, Simulator

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "tiny_lm.py")
FIXTURES = os.path.join(HERE, "..", "..", "fixtures")


@pytest.mark.slow  # the CLI end to end (about 30 s); the simulator itself: test_validation.py, test_layers.py
def test_tables_refusal_png_and_json(tmp_path, capsys):
    png, js = tmp_path / "scale.png", tmp_path / "scale.json"
    rc = main([TINY, "--impl", "autosp", "--world-size", "2,16", "--seq-len", "1k,4k", "--budget", "64MiB",
               "--checkpointing", "none", "--png", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "autosp P=2" in out and "longest trainable sequence within 0.1 GiB per rank" in out
    assert "autosp P=16" in out  # 8 query heads: Ulysses over 8 ranks, keys and values gathered over 2
    data = json.loads(js.read_text())
    longest = {r["sp"]: r["tokens"] for r in data["longest"]}
    assert longest[16] > longest[2] > 4096  # fits past the lengths shown
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["missing.py"], "no such file"),
    ([TINY, "--seq-len", "1"], "at least 2"),
    ([TINY, "--budget", "80XB"], "cannot read '80XB' as a size"),
    ([TINY, "--world-size", "0"], "ranks must be >= 1"),
    ([TINY, "--impl", "ring"], "unknown ring"),
    ([TINY, "--zero", "3"], "invalid choice"),
])
def test_bad_input_is_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_parsers():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512") == 512
    assert parse_tokens("128k") == 131072 and parse_tokens("1M") == 1 << 20 and parse_tokens("4096") == 4096
    with pytest.raises(ValueError):
        parse_tokens("1.5M")


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="ring"), "impl must be one of"),
    (dict(impl="autosp", sp=0), "sp and dp must be >= 1"),
    (dict(impl="plain_dp", sp=2), "no sequence parallelism"),
    (dict(impl="one_device", dp=2), "use plain_dp"),
])
def test_bad_scenarios(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scenario(**kwargs)


@pytest.mark.parametrize("name, billions", [("scale_llama3_8b", 8.03), ("scale_llama3_1b", 1.24),
                                            ("scale_qwen3_8b", 8.19)])
def test_scale_fixtures_never_build_real_weights(name, billions):
    """Their model_fn refuses outside a fake mode or the meta device; the simulator builds them
    on meta (no storage) and counts the parameters of the real model."""
    from autosp_verify.model_file import load_model_file
    loaded = load_model_file(os.path.join(FIXTURES, f"{name}.py"))
    with pytest.raises(ValueError, match="real-size model"):
        loaded.model_fn()
    with torch.device("meta"):
        loaded.model_fn()  # allowed there
    sim = Simulator(loaded.model_fn, loaded.inputs_fn)
    assert round(sim.sizes["param_numel"] / 1e9, 2) == billions
    assert sim.not_periodic is None and sim.layers in (16, 32, 36)
