"""Fixtures for the HTTP tests (helpers in tests/lib/sglang_testing.py)."""

import pytest
from sglang_testing import Server


@pytest.fixture(scope="session")
def server():
    s = Server("--admin-api-key", "admin-secret")
    yield s
    s.stop()
