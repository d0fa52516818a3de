"""`make seam VLLM=0.34.0`: run the seam's checks (streaming_tutorial/server/seam.py) against another vLLM.

1. Fetches that vLLM's wheel (`pip download --no-deps`) into a scratch folder outside the repository (default
   /tmp/vllm-seam/<version>), and unpacks its Python source.
2. Reads that source, patch by patch: the target exists with the parameters the patch expects, vLLM's code still
   calls it by the name replaced (the app builder: along the launcher's own path), or the patch is not needed.
3. Installs the wheel without its dependencies into a scratch virtualenv that also sees this project's packages
   (so this machine's CPU torch, not the wheel's), and there, as far as that vLLM imports without its own build
   of torch and kernels: the names vLLM moved, streaming_server.py's imports, the seam as the server runs it, and
   this server's command line through that vLLM's own parser.

Exits 1 if a patch's checks fail or a step that could run failed. Not part of `make test` or CI: the wheel is
hundreds of MB. The result for each version is in docs/seam.md.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from streaming_tutorial.server.seam import CLI_ARGS, CLI_ENV_SETUP, PATCHES, Seam, Source, binds

ROOT = Path(__file__).resolve().parent.parent

MOVED = {name: CLI_ARGS for name in ("make_arg_parser", "validate_parsed_serve_args",
                                     "propagate_flash_late_interaction")} | {"cli_env_setup": CLI_ENV_SETUP}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, command)), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def fetch(version: str, scratch: Path) -> Path:
    """The wheel of vLLM `version` in `scratch` (downloaded once), with its Python source unpacked in src/."""
    scratch.mkdir(parents=True, exist_ok=True)
    wheels = sorted(scratch.glob(f"vllm-{version}-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"vllm=={version}", "-d", str(scratch)])
        wheels = sorted(scratch.glob(f"vllm-{version}-*.whl"))
    src = scratch / "src"
    if not (src / "vllm" / "__init__.py").exists():
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(src, [n for n in wheel.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    return wheels[0]


def read_source(version: str, src: Source) -> bool:
    """Step 2: every patch's checks against the unpacked source. True when none fails."""
    ok = True
    print(f"\n== vLLM {version}, read from its wheel: each patch of the seam")
    for patch in PATCHES:
        needless = patch.needed(src)
        problems = [] if needless else patch.checks(src)
        verdict = (f"not needed ({needless})" if needless else "FAILS: " + "; ".join(problems) if problems
                   else "holds")
        ok &= not problems
        print(f"  {patch.name:16} {verdict}\n  {'':16} targets: {', '.join(patch.targets)}")
    for cpu, where in ((True, "a CPU"), (False, "a GPU")):
        seam = Seam(version=version, src=src, on_cpu=cpu)
        print(f"  on {where}, the server would put in place: "
              f"{', '.join(d.patch.name for d in seam.decisions() if d.on) or 'nothing'}")
    print(f"\n== vLLM {version}: names this server imports from where vLLM moved them")
    for name, modules in MOVED.items():
        found = [m for m in modules if binds(src.tree(m), name)]
        ok &= bool(found)
        print(f"  {name:34} {found[0] if found else 'MISSING from ' + ' and '.join(modules)}")
    return ok


# Runs inside the scratch virtualenv, from the repository: what the server does at start-up, short of an engine.
PROBE = r"""
import json, sys, tempfile
out = {}
def step(name, function):
    try:
        out[name] = {"ok": True, "detail": function()}
    except BaseException as error:  # a SystemExit from argparse is a result too
        out[name] = {"ok": False, "detail": f"{type(error).__name__}: {error}"}

import vllm
out["version"] = vllm.__version__
step("platform", lambda: type(__import__("vllm.platforms", fromlist=["x"]).current_platform).__name__)
step("streaming_server.py imports", lambda: bool(__import__("streaming_server")))
def seam_decisions():
    from streaming_tutorial.server import seam
    return {d.patch.name: "on" if d.on else f"off: {d.why}" for d in seam.current().decisions()}
step("the seam, as the server runs it", seam_decisions)
def launcher_calls_build_app():
    from vllm.entrypoints.launchers.api_server import entry
    assert "build_app" in entry.build_and_serve.__code__.co_names, entry.build_and_serve.__code__.co_names
    assert "build_and_serve" in entry.run_server_worker.__code__.co_names
    return "entry.build_and_serve looks up build_app as a global (co_names)"
step("the launcher calls entry.build_app", launcher_calls_build_app)
def parse_our_flags():
    from streaming_tutorial.server.args import parse_args
    from streaming_tutorial.server.request_checks import FLAGS
    from streaming_tutorial.server.seam import cli_args
    keys = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    keys.write("alice:" + "k" * 24 + "\n"); keys.close()
    argv = ["--api-key", "one", "--api-key", "two", "--api-keys-file", keys.name, "--no-page", "--restart-engine",
            "--port", "8123", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(1 << 28)]
    for flag, _env, default, _help in FLAGS.values():
        argv += [flag, str(default + 1)]
    args = parse_args(argv)
    cli_args("validate_parsed_serve_args")(args)
    assert args.api_key == ["one", "two"], args.api_key
    return f"{len(argv)} arguments parsed and validated by vLLM's own parser"
step("this server's flags through vLLM's parser", parse_our_flags)
def our_app_on_vllms():
    from starlette.testclient import TestClient
    from streaming_tutorial.server import app as ours
    from streaming_tutorial.server.args import parse_args
    app = ours.create_app(parse_args(["--api-key", "probe-key"]), ("generate",))
    health = [r for r in app.routes if getattr(r, "path", None) == "/health"]
    assert len(health) == 1 and health[0].endpoint is ours.health, health
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/").status_code == 200, "the page"
    assert client.post("/v1/completions", json={}).status_code == 401, "the key check"
    return f"{len(app.routes)} routes: /health is ours, the page answers, a request without the key gets 401"
step("this server's app on vLLM's app builder (no engine)", our_app_on_vllms)
print("PROBE " + json.dumps(out))
"""


def scratch_venv(wheel: Path, scratch: Path) -> Path:
    """A virtualenv with only the wheel installed (no dependencies), seeing this project's packages after its own."""
    venv = scratch / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)])
    ours = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    theirs = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    # A .pth line that starts with `import` runs: this project's site-packages (and its .pth files: the
    # editable install) come after the wheel's own, so `import vllm` finds the wheel.
    Path(theirs, "zz_streaming_tutorial.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


def probe(python: Path) -> bool:
    """Step 3. True when every step that ran passed."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(python), "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if not lines:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return False
    result = json.loads(lines[-1].removeprefix("PROBE "))
    print(f"\n== vLLM {result.pop('version')}, installed without its dependencies beside this machine's CPU torch")
    ok = True
    for name, outcome in result.items():
        ok &= outcome["ok"]
        detail = outcome["detail"]
        if isinstance(detail, dict):
            detail = "".join(f"\n      {k:16} {v}" for k, v in detail.items())
        print(f"  {'ok  ' if outcome['ok'] else 'FAIL'} {name}: {detail}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="the vLLM version to check, e.g. 0.34.0")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "vllm-seam",
                        help="where wheels, sources and virtualenvs go (outside the repository)")
    parser.add_argument("--no-install", action="store_true", help="only read the source (no scratch virtualenv)")
    args = parser.parse_args()
    scratch = (args.scratch / args.version).resolve()
    if scratch.is_relative_to(ROOT):
        sys.exit(f"error: --scratch must be outside the repository ({ROOT})")
    wheel = fetch(args.version, scratch)
    ok = read_source(args.version, Source(scratch / "src"))
    if not args.no_install:
        ok &= probe(scratch_venv(wheel, scratch))
    print(f"\nmake seam VLLM={args.version}: {'passed' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
