"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: dev (few examples, the default), ci
(derandomized, no database, 15 examples, no deadline), nightly (hundreds)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=15, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("nightly", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core already: torch's own threads would only contend
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _many_compiles_in_one_process():
    """One test process compiles the same models' forward under many configs (passes, group
    sizes, checkpointing, backends). Dynamo's recompile limit guards a training job against
    runaway recompiles; under fullgraph it is a hard error, so a test would fail on what other
    tests in its worker compiled. Lifted for the session, as the verifier lifts it for a case.
    Set, not patched: a patch holds for the patching thread only, and ranks compile in threads."""
    config = torch._dynamo.config
    saved = config.recompile_limit, config.accumulated_recompile_limit
    config.recompile_limit = config.accumulated_recompile_limit = 100_000
    yield
    config.recompile_limit, config.accumulated_recompile_limit = saved
