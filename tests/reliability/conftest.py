"""The world every bad-input test aims at, built once per test process."""

import pytest

from cli_world import build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))
