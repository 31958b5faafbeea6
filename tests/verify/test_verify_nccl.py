"""The nccl simulator: a skip (not a failure) without enough GPUs; a real run with them."""
import pytest

from autosp_verify import verify_file
from autosp_verify.cli import main
from autosp_verify.simulators.nccl import gpu_count

from .conftest import TINY, ulysses


def test_too_few_gpus_is_reported_as_skipped(capsys):
    wanted = gpu_count() + 1
    r = verify_file(TINY, impl=ulysses(), simulator="nccl", world_size=wanted)
    assert r.status == "skipped" and r.error == f"skipped: needs {wanted} GPUs, found {gpu_count()}"
    assert main([TINY, "--impl", ulysses(), "--simulator", "nccl", "--world-size", str(wanted)]) == 4
    assert "SKIPPED" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.multiproc
def test_ulysses_on_nccl():
    if gpu_count() < 2:
        pytest.skip(f"skipped: needs 2 GPUs, found {gpu_count()}")
    r = verify_file(TINY, impl=ulysses(), simulator="nccl", world_size=2)
    assert r.status == "pass", r
