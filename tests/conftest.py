"""pytest setup: float32 math at full matmul precision for every test."""

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
