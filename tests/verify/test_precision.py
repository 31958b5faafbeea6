"""A model that computes in a dtype coarser than the case's (autosp_verify/precision.py): a tensor
failing the case's tolerance is held to that dtype's, named, and only then."""
import os

import torch

from autosp_verify import verify_file
from autosp_verify.compare import compare, tolerance_for
from autosp_verify.core import Reference
from autosp_verify.precision import CastRecorder
from autosp_verify.report import format_table

GEMMA3 = os.path.join(os.path.dirname(__file__), "gemma3_model.py")


def test_gemma3_as_loaded_is_exact_to_the_float32_it_computes_in():
    """Gemma3's norms compute in float32 whatever the model's dtype, and sum their weights'
    gradients over the positions there: one device and two ranks sum them in another order (~1e-7
    apart). A float64 case says which tensors agree to float32's precision only, and where the
    model computes in it. As loaded, Gemma3 also keeps a sliding-window cache (not built under
    autosp.compile) and attends through the window (5 keys of 13: torch's fused kernel,
    tests/compiler/test_sliding_window.py)."""
    from autosp import masked_attention as ma
    ma.KERNELS.clear()
    result = verify_file(GEMMA3, impl="autosp-eager", world_size=2, seq_len=13, steps=1, accounting=False)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert ma.KERNELS.get("fused", 0) > 0 and ma.KERNELS.get("blocks", 0) == 0, dict(ma.KERNELS)
    assert result.coarser and set(result.coarser.values()) == {"float32"}, result.coarser
    assert result.computes_in["dtype"] == "float32" and "modeling_gemma3.py" in result.computes_in["where"]
    assert "agree to float32's precision only" in format_table([result])


def test_the_first_cast_down_is_recorded_with_the_models_line():
    x = torch.ones(3, dtype=torch.float64)
    with CastRecorder() as finer:
        x.float().double(), torch.arange(3).double()  # back up, and from integers: nothing coarser
    assert finer.computes_in is torch.float32  # x.float() itself
    with CastRecorder() as none:
        x.double(), torch.arange(3).float(), x * 2
    assert none.computes_in is None
    with CastRecorder() as down:
        x.to(torch.bfloat16)
    assert down.computes_in is torch.bfloat16 and "test_precision.py" in down.where, down.where


def _checks(computes_in, relative_error):
    ref = Reference(torch.tensor(1.0, dtype=torch.float64), {}, {"w": torch.ones(4, dtype=torch.float64)})
    rank = {"loss": torch.tensor(1.0, dtype=torch.float64), "outputs": {},
            "grads": {n: g * (1 + relative_error) / 2 for n, g in ref.grads.items()}}
    check = compare(ref, [rank, rank], tolerance_for(torch.float64), computes_in).grads[0]
    return check.passed, check.coarser


def test_negative_control_the_coarser_tolerance_holds_only_where_the_model_computes_in_it():
    """1e-7 apart: passes at float32's tolerance, marked so, only for a model computing in float32;
    1e-3 apart (a real bug, e.g. a rank's share lost in part) fails either way."""
    assert _checks(torch.float32, 1e-7) == (True, "float32")
    assert _checks(None, 1e-7) == (False, "")
    assert _checks(torch.float32, 1e-3) == (False, "")
    assert _checks(torch.float32, 1e-12) == (True, "")  # within float64's: nothing said
