"""Test-wide JAX settings and a fresh, reported random seed per test."""

import os
import secrets

import jax
import numpy as np
import pytest

# Silent broadcasting between mismatched ranks hides shape bugs; make it loud.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
  """A NumPy Generator with a fresh seed each run (STREAMLEARN_TEST_SEED pins it).

  The seed is attached to the test report so a failure can be replayed.
  """
  seed = int(os.environ.get("STREAMLEARN_TEST_SEED", secrets.randbits(32)))
  request.node.user_properties.append(("seed", seed))
  request.node.streamlearn_seed = seed
  return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  seed = getattr(item, "streamlearn_seed", None)
  if report.failed and seed is not None:
    report.sections.append(("random seed", f"STREAMLEARN_TEST_SEED={seed} replays this test"))
