"""Test-wide settings: strict dtype promotion, float32 on CPU, and hypothesis profiles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Catches silent int8 -> float promotion and similar mistakes: mixing dtypes must be explicit.
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile(
    "qflax",
    max_examples=25,
    deadline=None,  # the first example of a shape compiles
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.register_profile("thorough", parent=settings.get_profile("qflax"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "qflax"))
