"""Gradients of parameters a model casts to a coarser dtype (autosp_verify/precision.py): compared
at that dtype's tolerance, and only those."""
import os

import torch

from autosp_verify import verify_file
from autosp_verify.compare import compare, tolerance_for
from autosp_verify.core import Reference
from autosp_verify.precision import CastRecorder
from autosp_verify.report import format_table

GEMMA3 = os.path.join(os.path.dirname(__file__), "gemma3_model.py")


def test_gemma3_as_loaded_is_exact_its_float32_norms_at_float32s_tolerance():
    """Gemma3's norms sum their weights' gradients in float32 over the positions: one device and
    two ranks sum them in another order (~1e-7 apart), so a float64 case compares those at
    float32's tolerance, says so, and every other gradient at float64's. As loaded, Gemma3 also
    keeps a sliding-window cache (not built under autosp.compile) and attends through the window
    (5 keys of 13: torch's fused kernel, tests/compiler/test_sliding_window.py)."""
    from autosp import masked_attention as ma
    ma.KERNELS.clear()
    result = verify_file(GEMMA3, impl="autosp-eager", world_size=2, seq_len=13, steps=1, accounting=False)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert ma.KERNELS.get("fused", 0) > 0 and ma.KERNELS.get("blocks", 0) == 0, dict(ma.KERNELS)
    assert result.cast_grads and set(result.cast_grads.values()) == {"float32"}
    assert all(name.endswith("norm.weight") for name in result.cast_grads), result.cast_grads
    assert "compared at float32's tolerance" in format_table([result])


def test_only_the_parameters_cast_are_recorded():
    weight, bias = (torch.nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2))
    with CastRecorder({"weight": weight, "bias": bias}) as casts:
        (weight.float().double() + bias + bias.to(torch.float64)).sum()  # bias: no coarser cast
    assert casts.cast == {"weight": torch.float32}


def _checks(cast_grads, relative_error):
    ref = Reference(torch.tensor(1.0, dtype=torch.float64), {},
                    {"cast": torch.ones(4, dtype=torch.float64), "kept": torch.ones(4, dtype=torch.float64)})
    rank = {"loss": torch.tensor(1.0, dtype=torch.float64), "outputs": {},
            "grads": {n: g * (1 + relative_error) / 2 for n, g in ref.grads.items()}}
    return {c.name: c.passed for c in compare(ref, [rank, rank], tolerance_for(torch.float64), cast_grads).grads}


def test_negative_control_the_coarser_tolerance_applies_to_the_cast_gradients_alone():
    """1e-7 apart: the cast gradient passes, the other (float64's tolerance) fails; 1e-3 apart (a
    real bug, e.g. a rank's share lost in part) both fail; nothing cast: both fail at 1e-7."""
    cast = {"cast": torch.float32}
    assert _checks(cast, 1e-7) == {"grad cast": True, "grad kept": False}
    assert _checks(cast, 1e-3) == {"grad cast": False, "grad kept": False}
    assert _checks({}, 1e-7) == {"grad cast": False, "grad kept": False}
