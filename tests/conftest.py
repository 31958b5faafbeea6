"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: dev (few examples, the default), ci
(derandomized, no database, a fixed count, no deadline), nightly (hundreds)."""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=50, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("nightly", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
