"""Seeded inputs for the kernel tests: every draw comes from the ``gen`` fixture or a seeded Generator.

A kernel test that fails must fail again on the next run with the same numbers, so the tests never
draw from torch's global generator: ``gen`` is seeded from the test's id (each parametrisation gets
its own reproducible draws), and ``_global_generator_untouched`` fails a test that used the global
generator after all (an unseeded ``torch.randn``, ``torch.rand``, ``randn_like``, ...).
"""

import pytest
import torch

from helpers import seeded


@pytest.fixture
def gen(request) -> torch.Generator:
    return seeded(request.node.nodeid)


@pytest.fixture(autouse=True)
def _global_generator_untouched():
    before = torch.random.get_rng_state()
    yield
    assert torch.equal(torch.random.get_rng_state(), before), (
        "this test drew from torch's global generator: pass generator=gen (the seeded fixture)")
