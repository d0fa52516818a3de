"""Fixtures of the robustness tests. The shared `server`, `http`, `client`, `model_name` live in ../conftest.py."""

from __future__ import annotations

import secrets

import pytest
from server_checks import WORKSHOP_KEY, WORKSHOP_MAX_MODEL_LEN, WORKSHOP_MODEL, WORKSHOP_ROOT_PATH, own_server

from streaming_tutorial.server.keys import example_keys_file

# The keys file of `keyed_server`: students by name (the default limit of requests in flight), the hog and its
# neighbour of the hog test, and an instructor with a limit of their own (tests/test_limits.py, test_keys.py).
WORKSHOP_STUDENTS = ["hog", "neighbour", *(f"student-{i}" for i in range(1, 7))]
WORKSHOP_INSTRUCTOR_LIMIT = 16
# Small, so that the queue bound is reached with a few dozen streams: vLLM runs at most 8 sequences at once, and
# refuses new requests while 8 wait. Output tokens are capped below the bundled model's default (512), so the cap
# is seen on a request that gives none.
WORKSHOP_MAX_NUM_SEQS = 8
WORKSHOP_MAX_WAITING = 8
WORKSHOP_MAX_OUTPUT_TOKENS = 300


def read_keys(text: str) -> dict[str, str]:
    return dict(line.split(":")[:2] for line in text.splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory):
    """A server as a workshop runs it: an API key (`--api-key`), plus flags checked end to end: a served model
    name, a --max-model-len overriding our CPU default, a --root-path (as behind a reverse proxy), and a keys
    file with the shared-server limits (`running.keys_file`, `running.keys`: name -> key, `running.settings`)."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    text = example_keys_file(WORKSHOP_STUDENTS)
    text += f"instructor:{secrets.token_urlsafe(16)}:{WORKSHOP_INSTRUCTOR_LIMIT}\n"
    keys_file.write_text(text)
    with own_server("keyed-server", ["--served-model-name", WORKSHOP_MODEL,
                                     "--max-model-len", str(WORKSHOP_MAX_MODEL_LEN),
                                     "--root-path", WORKSHOP_ROOT_PATH,
                                     "--api-keys-file", str(keys_file),
                                     "--max-num-seqs", str(WORKSHOP_MAX_NUM_SEQS),
                                     "--max-waiting", str(WORKSHOP_MAX_WAITING),
                                     "--max-output-tokens", str(WORKSHOP_MAX_OUTPUT_TOKENS)],
                    api_key=WORKSHOP_KEY) as running:
        running.keys_file = keys_file
        running.keys = read_keys(text)
        running.settings = {"max_num_seqs": WORKSHOP_MAX_NUM_SEQS, "max_waiting": WORKSHOP_MAX_WAITING,
                            "max_output_tokens": WORKSHOP_MAX_OUTPUT_TOKENS,
                            "instructor_limit": WORKSHOP_INSTRUCTOR_LIMIT}
        yield running


# Tests marked `nginx` (tests/test_proxy.py) run a real nginx. `make test` finds or installs one first (`make nginx`)
# and sets TUTORIAL_REQUIRE_NGINX=1, so there a missing one fails; a quick `pytest -m "not server"` on a machine
# without one skips those tests and says how to get one (as ../conftest.py does for the browser).
_nginx: list[str | None] = []  # found once per session


def nginx_or_skip(item) -> None:
    import os

    if os.environ.get("TUTORIAL_REQUIRE_NGINX") == "1" or item.get_closest_marker("nginx") is None:
        return
    from streaming_tutorial.processes.proxy import HOW_TO_GET_ONE, find_nginx

    if not _nginx:
        _nginx.append(find_nginx())
    if _nginx[0] is None:
        pytest.skip(HOW_TO_GET_ONE)


def pytest_runtest_setup(item):
    nginx_or_skip(item)
