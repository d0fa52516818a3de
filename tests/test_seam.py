"""The seam (streaming_tutorial/server/seam.py): each patch of vLLM is still called by vLLM where it is installed,
its checks catch the change that would make it silently useless, and on a vLLM version the seam was not checked
against the server turns off what it cannot verify, says so in one line each, and still streams.

Most of this runs in-process, against the installed vLLM (no server); one real server start pretends an unknown
vLLM version."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from server_checks import own_server
from vllm.entrypoints.launchers import launcher
from vllm.entrypoints.launchers.api_server import entry
from vllm.entrypoints.serve.engine import serving
from vllm.entrypoints.serve.exception_handling.handlers import vllm_error

from streaming_tutorial.client.sse import sse_events
from streaming_tutorial.processes.local_server import SERVER_SCRIPT
from streaming_tutorial.server import seam
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.cpu_defaults import running_on_cpu

STRUCTURAL = {p.name for p in seam.PATCHES if p.rule == "structure"}
VERSION_BOUND = {p.name for p in seam.PATCHES if p.rule == "version"}
UNKNOWN = "0.99.0"


class Called(Exception):
    """Raised by a stand-in: proof that vLLM called the name it replaced."""


def stand_in(*args, **kwargs):
    raise Called(args, kwargs)


class Mutated(seam.Source):
    """The installed vLLM's source with one module's text changed, as a future vLLM might change it."""

    def __init__(self, tmp_path: Path, module: str, old: str, new: str) -> None:
        super().__init__()
        text = super().path(module).read_text()
        assert old in text, f"{module} no longer contains {old!r}: update this test"
        self.changed = tmp_path / f"{module}.py"
        self.changed.write_text(text.replace(old, new))
        self.module = module

    def path(self, module: str) -> Path | None:
        return self.changed if module == self.module else super().path(module)


@pytest.fixture(autouse=True)
def fresh_seam():
    """Each test decides afresh; the process's seam is put back afterwards."""
    before = seam.current()
    yield
    seam.reset(before)


# ---- the decisions ----

def test_on_the_installed_vllm_every_patch_is_verified_and_on():
    decisions = seam.Seam(on_cpu=True).decisions()
    assert [d.patch.name for d in decisions if not d.on] == [], [d.why for d in decisions if not d.on]
    assert seam.Seam(on_cpu=True).lines() == []


def test_on_a_gpu_the_cpu_fixes_stay_off_without_a_word():
    gpu = seam.Seam(on_cpu=False)
    off = {d.patch.name for d in gpu.decisions() if not d.on}
    assert off == {"compile-cache", "top-p", "seeded-rewind"}
    assert gpu.lines() == []


def test_on_an_unknown_version_only_the_patches_its_checks_verify_stay_on(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", UNKNOWN)
    pretend = seam.Seam(on_cpu=True)
    assert {d.patch.name for d in pretend.decisions() if d.on} == STRUCTURAL
    lines = pretend.lines()
    assert UNKNOWN in lines[0] and "not a version this server was checked against" in lines[0]
    assert len(lines) == 1 + len(VERSION_BOUND)  # a head line, then one line per patch that is off
    for name in VERSION_BOUND:
        (line,) = [line for line in lines if line.startswith(f"Patch {name} off")]
        assert "checked only on vLLM" in line and "Without it, " in line, line


def test_report_logs_one_warning_per_patch_off_and_one_line_of_what_is_on(monkeypatch, caplog):
    seam.reset(seam.Seam(version=UNKNOWN, on_cpu=True))
    with caplog.at_level("INFO", logger="test.seam"):
        seam.report(logging.getLogger("test.seam"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 + len(VERSION_BOUND)
    (on,) = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert all(name in on for name in STRUCTURAL) and not any(name in on for name in VERSION_BOUND)


def moved_launcher(tmp_path: Path) -> Mutated:
    """What a vLLM pull request (not in 0.34) does: the serve path moves to api_server/single.py, which imports its
    own build_app; entry.build_app is then never called."""
    return Mutated(tmp_path, seam.ENTRY, "    await run_server_worker(listen_address, sock, args, **uvicorn_kwargs)",
                   "    from .single import run_server_worker\n\n"
                   "    await run_server_worker(listen_address, sock, args, **uvicorn_kwargs)")


def test_a_launcher_that_imports_its_own_build_app_turns_the_app_off_in_one_line(tmp_path):
    pretend = seam.Seam(version="0.32.0", src=moved_launcher(tmp_path), on_cpu=True)
    app = pretend.decision("app")
    assert not app.on and "run_server no longer calls the module's run_server_worker" in app.why
    (line,) = [line for line in pretend.lines() if "app" in line.split(":")[0]]
    assert line.startswith("Cannot add this server's parts to vLLM 0.32.0's app") and "keys" in line


def test_a_build_and_serve_that_binds_build_app_itself_is_caught_too(tmp_path):
    local = Mutated(tmp_path, seam.ENTRY, "    app = build_app(args, supported_tasks, model_config)",
                    "    from ..app import build_app\n\n    app = build_app(args, supported_tasks, model_config)")
    assert "build_and_serve no longer calls the module's build_app" in seam.decide(
        seam.BY_NAME["app"], "0.32.0", local, True).why


@pytest.mark.parametrize(("patch", "module", "old", "new", "problem"), [
    ("top-p", seam.TOPK_TOPP, "return apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=is_cpu)",
     "return logits", "apply_top_k_top_p no longer calls the module's apply_top_k_top_p_pytorch"),
    ("compile-cache", seam.DECORATORS, "loaded_fn._artifacts.compiled_fn.finalize_loading(model.vllm_config)",
     "pass", "no longer calls finalize_loading"),
    ("engine-death", seam.LAUNCHER, "def terminate_if_errored(server: uvicorn.Server, engine: EngineClient):",
     "def terminate_if_errored(server: uvicorn.Server, engine: EngineClient, reason=None):", None),
    ("engine-death", seam.LAUNCHER, "        terminate_if_errored(server, engine)\n",
     "        pass\n", "watchdog_loop no longer calls the module's terminate_if_errored"),
    ("engine-restart", seam.ENTRY, "            disable_log_stats=engine_args.disable_log_stats,",
     "            disable_log_stats=engine_args.disable_log_stats,\n            kv_events=None,",
     "now passes kv_events, which the copy does not"),
    ("token-counting", "vllm.entrypoints.openai.chat_completion.serving", "self.engine_client.generate(",
     "self.engine_client.stream(", "no longer calls engine_client.generate"),
])
def test_each_check_catches_the_change_that_would_make_its_patch_useless(tmp_path, patch, module, old, new,
                                                                       problem):
    decision = seam.decide(seam.BY_NAME[patch], "0.32.0", Mutated(tmp_path, module, old, new), True)
    assert decision.on is (problem is None), decision.why  # an added parameter with a default still fits
    if problem:
        assert problem in decision.why


def test_a_model_runner_without_the_generator_rewind_needs_no_seeded_fix(tmp_path):
    runner = "vllm.v1.worker.gpu_model_runner"
    no_rewind = Mutated(tmp_path, runner, "gen.set_offset(gen.get_offset() - 4)", "pass")
    no_rewind.root = tmp_path  # files_containing() scans a tree: give it one with the changed runner only
    (tmp_path / "vllm" / "v1" / "worker").mkdir(parents=True)
    no_rewind.changed.rename(tmp_path / "vllm" / "v1" / "worker" / "gpu_model_runner.py")
    decision = seam.decide(seam.BY_NAME["seeded-rewind"], "0.34.0", no_rewind, True)
    assert not decision.on and decision.needless and "not needed" in decision.why
    assert "Without it" not in decision.line("0.34.0")


# ---- vLLM still calls each target, where the patch replaces it ----

def test_vllms_serve_path_builds_its_app_through_entry_build_app(monkeypatch):
    monkeypatch.setattr(entry, "build_app", stand_in)
    engine = SimpleNamespace(model_config="model config", get_supported_tasks=lambda: asyncio.sleep(0, ("generate",)))
    with pytest.raises(Called) as called:
        asyncio.run(entry.build_and_serve(engine, "127.0.0.1:0", None, parse_args([])))
    assert called.value.args[0][1:] == (("generate",), "model config")  # (args, supported_tasks, model_config)
    assert "build_and_serve" in entry.run_server_worker.__code__.co_names
    assert "run_server_worker" in entry.run_server.__code__.co_names


def test_vllms_serve_path_starts_its_engine_through_entry_build_async_engine_client(monkeypatch):
    monkeypatch.setattr(entry, "build_async_engine_client", stand_in)
    with pytest.raises(Called):
        asyncio.run(entry.run_server_worker("127.0.0.1:0", None, parse_args([])))


def test_vllms_watchdog_and_error_handler_call_terminate_if_errored(monkeypatch):
    async def no_wait(_seconds):
        pass

    monkeypatch.setattr(launcher, "terminate_if_errored", stand_in)
    monkeypatch.setattr(launcher.asyncio, "sleep", no_wait)
    with pytest.raises(Called):
        asyncio.run(launcher.watchdog_loop("server", "engine"))
    monkeypatch.undo()
    monkeypatch.setattr(vllm_error, "terminate_if_errored", stand_in)
    with pytest.raises(Called):
        asyncio.run(vllm_error.engine_error_handler(engine_request(), RuntimeError("engine died")))


def test_vllms_error_answers_are_made_by_the_create_error_response_the_patch_replaces(monkeypatch):
    made = []

    def recording(message, *args, **kwargs):
        made.append(message)
        return original(message, *args, **kwargs)

    original = serving.create_error_response
    monkeypatch.setattr(serving, "create_error_response", recording)
    serving.BaseServing.create_error_response("from a stream")
    monkeypatch.setattr(vllm_error, "create_error_response", recording)
    monkeypatch.setattr(vllm_error, "terminate_if_errored", lambda server, engine: None)
    from vllm.v1.engine.exceptions import EngineDeadError

    asyncio.run(vllm_error.engine_error_handler(engine_request(), EngineDeadError()))
    assert made[0] == "from a stream" and isinstance(made[1], EngineDeadError)


def engine_request():
    state = SimpleNamespace(args=SimpleNamespace(log_error_stack=False), server="server", engine_client="engine")
    return SimpleNamespace(app=SimpleNamespace(state=state), state=SimpleNamespace())


def test_the_engine_restart_builds_its_engine_as_vllms_launcher_does(monkeypatch):
    """engine_restart.start_engine copies vLLM's engine build: the same keyword arguments reach
    AsyncLLM.from_vllm_config, but for those of several API server processes."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from streaming_tutorial.server.engine_restart import start_engine

    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        raise Called()

    monkeypatch.setattr(AsyncLLM, "from_vllm_config", record)
    monkeypatch.setattr(AsyncEngineArgs, "create_engine_config", lambda self, usage_context=None: "vllm config")

    async def vllms_build():
        async with entry.build_async_engine_client(parse_args([])):
            pass

    with pytest.raises(Called):
        asyncio.run(vllms_build())
    with pytest.raises(Called):
        start_engine(parse_args([]))
    vllms, ours = calls
    assert set(vllms) - seam.MULTI_SERVER_KWARGS == set(ours) == seam.RESTART_KWARGS
    assert {k: v for k, v in vllms.items() if k in ours} == ours
    assert callable(AsyncLLM._run_output_handler)


def test_vllm_loads_its_saved_compiled_model_through_torch_compiler_load_compiled_function():
    from vllm.compilation import decorators

    loaders = [f for f in vars(decorators).values() if callable(f) and "load_compiled_function" in
               getattr(getattr(f, "__code__", None), "co_names", ())]
    assert loaders, "vLLM no longer calls torch.compiler.load_compiled_function"
    assert all("compiler" in f.__code__.co_names and "finalize_loading" in f.__code__.co_names for f in loaders)


def test_vllms_cpu_runner_rewinds_seeded_generators_and_fills_its_batch_through_add_request():
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert "set_offset" in GPUModelRunner._bookkeeping_sync.__code__.co_names
    assert "add_request" in GPUModelRunner._update_states.__code__.co_names
    assert list(inspect.signature(InputBatch.add_request).parameters)[:2] == ["self", "request"]


def test_a_seeded_generator_handed_to_vllms_batch_ignores_the_rewind(monkeypatch):
    from vllm.v1.worker.gpu_input_batch import InputBatch

    from streaming_tutorial.server.seeded_sampling import let_seeded_prefill_chunks_rewind

    seen = []
    monkeypatch.setattr(InputBatch, "add_request", lambda self, request: seen.append(request.generator))
    let_seeded_prefill_chunks_rewind()
    request = SimpleNamespace(generator=torch.Generator().manual_seed(7))
    InputBatch.add_request(None, request)
    seen[0].set_offset(seen[0].get_offset() - 4)  # what vLLM 0.32 does after a partial prefill: no error now


# ---- the server, as it starts ----

def test_with_api_keys_a_server_whose_app_cannot_be_extended_refuses_to_start(tmp_path, monkeypatch):
    """Never serve without the keys the user asked for: one line, then exit, before the model or the engine."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() sets variables for vLLM's processes
    monkeypatch.setattr(seam, "install_at_import", lambda engine_process: [])
    server = runpy.run_path(str(SERVER_SCRIPT), run_name="streaming_server_under_test")
    seam.reset(seam.Seam(src=moved_launcher(tmp_path)))
    reported = []
    monkeypatch.setattr(seam, "report", lambda log: reported.extend(seam.current().lines()))  # logs them (above)
    with pytest.raises(SystemExit) as stopped:
        server["main"](["--api-key", "secret"])
    assert str(stopped.value.code).startswith("error: API keys need this server's app, which cannot be added")
    assert [line for line in reported if line.startswith("Cannot add this server's parts")]


PRETEND = """# streaming_server.py on a vLLM that pretends to be {version} (tests/test_seam.py)
import vllm

vllm.__version__ = {version!r}
# vLLM spawns its engine process from this file (as __mp_main__), so the engine pretends too.
exec(compile(open({script!r}).read(), {script!r}, "exec"))
"""


@pytest.mark.server
def test_on_an_unknown_vllm_version_the_server_says_what_is_off_and_still_streams(tmp_path):
    wrapper = tmp_path / "pretend_server.py"
    wrapper.write_text(PRETEND.format(version=UNKNOWN, script=str(SERVER_SCRIPT)))
    with own_server("seam-unknown-version", command=[sys.executable, str(wrapper)]) as server:
        health = server.health
        assert health["vllm_version"] == UNKNOWN and health["status"] == "healthy"
        assert set(health["patches"]) == STRUCTURAL  # our app is there: /health is ours
        log = server.log_path.read_text(errors="replace")
        assert f"vLLM {UNKNOWN} is not a version this server was checked against" in log
        for name in VERSION_BOUND:
            assert log.count(f"Patch {name} off") == 1, name  # once: the engine process decides silently
        with httpx.stream("POST", server.url_for("v1", "chat", "completions"), timeout=120, json={
                "model": health["model"], "stream": True, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Say hello"}]}) as response:
            assert response.status_code == 200
            events = list(sse_events(response.iter_lines()))
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


def test_the_session_server_has_every_patch_on_and_lists_them_in_health(server):
    """On the vLLM the project pins, nothing is off: no line says so, and /health lists every patch."""
    assert server.health["patches"] == [p.name for p in seam.PATCHES if running_on_cpu() or not p.cpu_only]
    log = server.log_path.read_text(errors="replace")
    assert "Patches of vLLM" in log and " off (" not in log and "Cannot add this server's parts" not in log
