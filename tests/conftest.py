"""pytest setup: 8 host CPU devices for the sharding tests (set before JAX starts), float32
math at full matmul precision for every test, and deterministic property tests."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI must not be flaky by chance).
settings.register_profile("jaxkv", derandomize=True, deadline=None)
settings.load_profile("jaxkv")

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
