"""Test-wide settings: strict dtype promotion, float32 on CPU, XLA's LLVM back end at -O0, and
hypothesis profiles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling dominates this suite (every test jits its own small programs, which then run for
# milliseconds). LLVM code generation at -O0 made compile-heavy files 20-26% faster; XLA's HLO
# passes (fusion, algebraic simplification: what decides the numerics) run as in production.
# QFLAX_TEST_XLA_OPT=1 runs the suite with the default back end (all tests pass either way).
if os.environ.get("QFLAX_TEST_XLA_OPT") != "1":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

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
