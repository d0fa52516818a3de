"""Fixtures of the robustness tests. The shared `server`, `http`, `client`, `model_name` live in ../conftest.py."""

from __future__ import annotations

import pytest

from server_checks import WORKSHOP_KEY, WORKSHOP_MAX_MODEL_LEN, WORKSHOP_MODEL, WORKSHOP_ROOT_PATH, own_server


@pytest.fixture(scope="session")
def keyed_server():
    """A server as a workshop runs it: an API key, plus flags checked end to end: a served model name,
    a --max-model-len overriding our CPU default, and a --root-path (as behind a reverse proxy)."""
    with own_server("keyed-server", ["--served-model-name", WORKSHOP_MODEL,
                                     "--max-model-len", str(WORKSHOP_MAX_MODEL_LEN),
                                     "--root-path", WORKSHOP_ROOT_PATH], api_key=WORKSHOP_KEY) as running:
        yield running
